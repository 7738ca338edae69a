"""Tiny random-BERT text classification on a synthetic, client-heterogeneous language.

The model is a small BERT for sequence classification built from a ``transformers.BertConfig``
(random weights seeded by ``task.data_seed``; nothing is downloaded), frozen, with LoRA on the
attention projections. It needs no network and runs in seconds on a CPU, so every method can be
exercised end to end on a real transformer.

The language. Token 0 is ``[PAD]`` (unused), token 1 ``[CLS]`` (first position of every example);
the rest of the vocabulary is split into

* *global cue tokens*: ``GLOBAL_CUES`` tokens per label, meaning the same label for every client;
* *client cue tokens*: a pool of ``CLIENT_CUES`` tokens per label whose assignment to labels is a
  random permutation drawn per client (so the same token means different labels to different
  clients);
* *neutral tokens*: filler.

An example of label ``y`` holds, at random positions after ``[CLS]``, ``max(1, L // 4)`` global cue
tokens and ``max(1, L // 4)`` client cue tokens of label ``y`` (``L = seq_len - 1``); the rest is
neutral filler. With probability ``GLOBAL_NOISE`` the global cues are those of another label
instead: they are misleading, and only the client's own cues tell the truth. Labels are drawn from a
client-specific distribution (half uniform, half a Dirichlet(1) draw), a label skew on top.

So a single global model can reach about ``1 - GLOBAL_NOISE`` accuracy (from the global cues and
the label prior), while a model personalised to the client's cue mapping can approach 100%:
personalisation matters, and by how much is known in advance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

from pf2lora import lora, metrics
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.tasks import register_task
from pf2lora.tasks.base import Batch, ClientData, Task, flatten_clients, per_client_cross_entropy

PAD, CLS = 0, 1
GLOBAL_CUES = 3
"""Global cue tokens per label (same meaning for every client)."""
CLIENT_CUES = 2
"""Client cue tokens per label (meaning permuted per client)."""
GLOBAL_NOISE = 0.3
"""Probability that an example's global cues point at a wrong label."""
MIN_VOCAB = 100
EVAL_CHUNK = 512


def _label_distribution(num_labels: int, g: torch.Generator) -> torch.Tensor:
    """Half uniform, half Dirichlet(1, ..., 1) (uniform spacings): every label keeps some mass."""
    cuts = torch.sort(torch.rand(num_labels - 1, generator=g)).values
    edges = torch.cat([torch.zeros(1), cuts, torch.ones(1)])
    return 0.5 / num_labels + 0.5 * (edges[1:] - edges[:-1])


@register_task("tiny-text")
class TinyTextTask(Task):
    """A frozen tiny random BERT with LoRA, classifying the synthetic language above.

    The model's size can be changed with keyword arguments (the benchmarks use a larger one); the
    registered ``tiny-text`` task uses the defaults.
    """

    primary_metric = "accuracy"
    higher_is_better = True
    stacking_pays_on_cpu = True  # a tiny model: a step is overhead-bound
    model: BertForSequenceClassification

    def __init__(
        self,
        cfg: RunConfig,
        *,
        hidden_size: int = 32,
        num_layers: int = 2,
        num_heads: int = 2,
        intermediate_size: int = 64,
        double_backward: bool = False,
    ):
        """``double_backward`` changes nothing: the tiny model always runs eager attention (it costs
        little at this size and keeps the task's numbers the same whatever the methods)."""
        tc = cfg.task
        self.name = "tiny-text"
        self.num_labels = tc.num_labels
        self.seq_len = tc.seq_len
        g = torch.Generator().manual_seed(tc.data_seed)

        # Vocabulary layout: [PAD], [CLS], global cues, client cue pool, neutral filler.
        n_global = GLOBAL_CUES * tc.num_labels
        n_client = CLIENT_CUES * tc.num_labels
        first_global = 2
        first_client = first_global + n_global
        first_neutral = first_client + n_client
        vocab = max(MIN_VOCAB, first_neutral + 16)
        self.global_cues = torch.arange(first_global, first_client).view(tc.num_labels, GLOBAL_CUES)
        client_pool = torch.arange(first_client, first_neutral)
        neutral = torch.arange(first_neutral, vocab)

        # transformers' dataclass_transform __init__ lists no num_labels, which BertConfig accepts
        self.bert_config = BertConfig(  # type: ignore[call-arg]
            vocab_size=vocab,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max(64, tc.seq_len),
            num_labels=tc.num_labels,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0,
            pad_token_id=PAD,
            # BERT's 0.02 suits a trained model; a frozen random one needs ~1/sqrt(hidden) for its
            # features to carry the input through to [CLS] (with 0.02, nothing learns for many rounds).
            initializer_range=hidden_size**-0.5,
        )
        # transformers initialises from the global RNG: seed it in a fork so the caller's stream is
        # untouched and the model depends on data_seed only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tc.data_seed)
            self.model = BertForSequenceClassification(self.bert_config)
        # Exact Hessian-vector products (double backward) fail with SDPA attention on CPU.
        self.model.set_attn_implementation("eager")  # always, see double_backward above
        self.model.eval()
        lora.stackable_heads(self.model, ["classifier.weight"])
        targets = cfg.lora.target_modules or lora.default_targets(self.model.config.model_type)
        self.targets = lora.inject(self.model, targets, {lora.COMMON: cfg.lora.alpha, lora.PRIVATE: cfg.lora.private_alpha})

        body = tc.seq_len - 1
        n_g = max(1, body // 4)
        n_c = max(1, body // 4)
        self.clients = []
        for k in range(tc.num_clients):
            prior = _label_distribution(tc.num_labels, g)
            perm = client_pool[torch.randperm(n_client, generator=g)]
            client_cues = perm.view(tc.num_labels, CLIENT_CUES)  # row c: this client's cues of label c
            n = tc.train_samples + tc.test_samples
            labels = torch.multinomial(prior, n, replacement=True, generator=g)
            # Misleading global cues: another label, uniformly among the others.
            shift = torch.randint(1, tc.num_labels, (n,), generator=g)
            noisy = torch.rand(n, generator=g) < GLOBAL_NOISE
            global_label = torch.where(noisy, (labels + shift) % tc.num_labels, labels)

            ids = neutral[torch.randint(len(neutral), (n, body), generator=g)]
            g_tok = self.global_cues[global_label.unsqueeze(1), torch.randint(GLOBAL_CUES, (n, n_g), generator=g)]
            c_tok = client_cues[labels.unsqueeze(1), torch.randint(CLIENT_CUES, (n, n_c), generator=g)]
            cues = torch.cat([c_tok, g_tok], dim=1)[:, :body]  # client cues first if the body is short
            positions = torch.argsort(torch.rand(n, body, generator=g), dim=1)[:, : cues.shape[1]]
            ids.scatter_(1, positions, cues)
            input_ids = torch.cat([torch.full((n, 1), CLS), ids], dim=1)
            data = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
            tr = tc.train_samples
            train = {key: v[:tr] for key, v in data.items()}
            test = {key: v[tr:] for key, v in data.items()}
            self.clients.append(
                ClientData(
                    f"client_{k}",
                    train,
                    test,
                    info={"label_distribution": prior.tolist(), "client_cues": client_cues.tolist()},
                )
            )

    # -- the Task interface ----------------------------------------------------------------------

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The token ids alone: every example fills its row (the mask is all ones), and given a mask
        transformers reads it back to the host on every forward to find that out (to skip it): a
        device synchronisation per step on a GPU, for the same computation."""
        return {"input_ids": batch["input_ids"]}

    def logits(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        out = cast(SequenceClassifierOutput, self.forward(params, batch))
        if out.logits is None:  # pragma: no cover - a sequence classifier always returns logits
            raise ValueError("the BERT classifier returned no logits")
        return out.logits

    def loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(params, batch), batch["labels"])

    def stacked_loss(self, params: Mapping[str, torch.Tensor], batch: Batch, k: int) -> torch.Tensor:
        flat = flatten_clients(batch)
        return per_client_cross_entropy(self.logits(params, flat), flat["labels"], k)

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, torch.Tensor], data: Batch) -> dict[str, float]:
        n = len(data["labels"])
        logits = torch.cat([self.logits(params, {k: v[i : i + EVAL_CHUNK] for k, v in data.items()}) for i in range(0, n, EVAL_CHUNK)])
        labels = data["labels"]
        pred = logits.argmax(dim=-1)
        return {
            "accuracy": float((pred == labels).float().mean()),
            "loss": float(F.cross_entropy(logits, labels)),
            "macro_f1": metrics.macro_f1(pred, labels, self.num_labels),
            "balanced_accuracy": metrics.balanced_accuracy(pred, labels, self.num_labels),
        }

    def init_head(self, role: str, generator: torch.Generator) -> st.Tensors:
        """A fresh classifier as BERT initialises one: N(0, initializer_range^2) weight, zero bias."""
        head = self.model.classifier
        std = self.bert_config.initializer_range
        return {
            st.key(role, "classifier.weight"): torch.randn(head.out_features, head.in_features, generator=generator) * std,
            st.key(role, "classifier.bias"): torch.zeros(head.out_features),
        }

    def report_notes(self) -> list[str]:
        return [
            f"tiny-text: random {self.bert_config.num_hidden_layers}-layer BERT (hidden {self.bert_config.hidden_size}), "
            f"synthetic language with per-client cue tokens; global cues mislead with probability {GLOBAL_NOISE:g}, "
            f"so a non-personalised model tops out near {1 - GLOBAL_NOISE:.0%} accuracy.",
        ]
