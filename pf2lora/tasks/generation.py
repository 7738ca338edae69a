"""Real text generation with a pretrained causal LM (task kind ``generation``).

The model is ``AutoModelForCausalLM`` for ``task.model`` (default SmolLM2-135M; any local Hugging
Face directory or hub name), frozen, with LoRA on the architecture's default projections (Llama:
q_proj, v_proj). Nothing else is trained (no head).

Data (``task.dataset``), each example a prompt and a target:

* ``wordnet-definitions``: ``"bank (noun):"`` -> ``" sloping land beside a body of water"``,
  clients by WordNet topic (lexicographer file: noun.artifact, verb.motion ...);
* ``shakespeare``: the line spoken just before -> the role's next line, clients by speaking role
  (LEAF's split of the same Gutenberg text);
* ``e2e``, ``webnlg``, ``csv``/``tsv``/``jsonl``: source text -> target text.

A sequence is ``prompt + target + <eos>``, at most ``task.max_length`` tokens: the prompt keeps its
last tokens (at most half the budget when the target needs the rest), the target its first; any
cut is counted and warned about once. The loss is the next-token cross-entropy of the target
tokens only (the prompt and the padding are masked out), averaged over target tokens.

Metrics per client test split: ``loss`` and ``perplexity`` (exp of the per-token loss over the
whole split), and BLEU (sacrebleu, 0-100) and ROUGE-L F1 (rouge-score, 0-100) of greedy decodes of
at most ``task.max_new_tokens`` tokens for the first ``task.eval_generate`` test examples against
their full reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from pf2lora import lora, metrics, models
from pf2lora import state as st
from pf2lora.config import RunConfig, text_dataset
from pf2lora.data.text import TextDataset
from pf2lora.tasks.base import Batch, ClientData, Task
from pf2lora.tasks.text_data import Splits, client_splits, length_sorted_chunks, load_dataset, padded_width, warn_truncated

IGNORE = -100
EVAL_CHUNK = 64
GENERATE_CHUNK = 32
DEFAULT_MODEL = models.SMOL


def prompt_and_target(dataset: str, text: str, target: str) -> tuple[str, str]:
    """The strings a data set's example is tokenised from (the target follows the prompt directly)."""
    if dataset == "wordnet-definitions":
        return f"{text}:", f" {target}"
    return f"{text}\n", target


def encode(
    tok: Any, prompt: str, target: str, max_length: int, eos: int
) -> tuple[list[int], list[int], list[int], bool]:
    """(prompt ids, target ids ending in ``eos``, the whole prompt's ids, whether anything was cut):
    prompt + target fit in ``max_length``."""
    full = tok(prompt, add_special_tokens=True)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"] + [eos]
    if len(full) + len(t) <= max_length:
        return full, t, full, False
    p_keep = min(len(full), max(max_length // 2, max_length - len(t)))
    return full[len(full) - p_keep :], t[: max_length - p_keep], full, True


class GenerationTask(Task):
    """A frozen pretrained causal LM with LoRA, generating each client's kind of text."""

    primary_metric = "loss"
    higher_is_better = False
    table_columns = ("loss", "perplexity", "bleu", "rouge_l", "global_loss")

    def __init__(self, cfg: RunConfig):
        tc = cfg.task
        self.cfg = cfg
        self.model_name = tc.model.strip() or DEFAULT_MODEL
        self.dataset_name = text_dataset(tc)
        self.max_length = tc.max_length
        self.eval_generate = tc.eval_generate
        self.max_new_tokens = tc.max_new_tokens
        ds: TextDataset = load_dataset(tc)
        if ds.targets is None:  # pragma: no cover - the loaders of this kind always give targets
            raise ValueError(f"{ds.name} has no targets")
        self.splits: Splits = client_splits(ds, tc)
        self.name = f"generation:{self.dataset_name}"

        self.tok = models.load_tokenizer(self.model_name)
        self.model = models.load_causal_lm(self.model_name)
        if cfg.pf2lora.estimator == "exact" and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation("eager")  # double backward through SDPA fails on CPU
        self.model.eval()
        eos = self.tok.eos_token_id
        if eos is None:
            raise ValueError(f"the tokenizer of {self.model_name} has no end-of-sequence token")
        self.eos = int(eos)
        self.pad = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else eos)
        targets = cfg.lora.target_modules or lora.default_targets(self.model.config.model_type)
        self.targets = lora.inject(self.model, targets, {lora.COMMON: cfg.lora.alpha, lora.PRIVATE: cfg.lora.private_alpha})

        self._references = ds.targets
        self.clients = []
        cut = total = 0
        for cs in self.splits.clients:
            parts: dict[str, Batch] = {}
            for split, idx in (("train", cs.train), ("test", cs.test)):
                parts[split], n_cut = self._tensors(ds, idx)
                cut += n_cut
                total += len(idx)
            info: dict[str, Any] = {"train_indices": cs.train, "test_indices": cs.test}
            if cs.group is not None:
                info["group"] = cs.group
            self.clients.append(ClientData(cs.client_id, parts["train"], parts["test"], info=info))
        self.truncation = warn_truncated(cut, total, tc.max_length, "examples (prompt + target)")

    def _tensors(self, ds: TextDataset, idx: list[int]) -> tuple[Batch, int]:
        L = self.max_length
        n = len(idx)
        input_ids = torch.full((n, L), self.pad, dtype=torch.long)
        attention = torch.zeros((n, L), dtype=torch.long)
        labels = torch.full((n, L), IGNORE, dtype=torch.long)
        prompt_ids = torch.full((n, L), self.pad, dtype=torch.long)  # left-padded, for decoding
        prompt_mask = torch.zeros((n, L), dtype=torch.long)
        cut = 0
        for row, i in enumerate(idx):
            prompt, target = prompt_and_target(self.dataset_name, ds.text[i], ds.targets[i])  # type: ignore[index]
            p, t, full, was_cut = encode(self.tok, prompt, target, L, self.eos)
            cut += was_cut
            seq = p + t
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            labels[row, len(p) : len(seq)] = torch.tensor(t)
            # the decode prompt leaves room for max_new_tokens
            q = full[-max(1, L - self.max_new_tokens) :]
            prompt_ids[row, L - len(q) :] = torch.tensor(q)
            prompt_mask[row, L - len(q) :] = 1
        batch = {
            "input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "ref_index": torch.tensor(idx, dtype=torch.long),
        }
        return batch, cut

    # -- the Task interface ----------------------------------------------------------------------

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        width = padded_width(batch["attention_mask"])
        return {"input_ids": batch["input_ids"][:, :width], "attention_mask": batch["attention_mask"][:, :width]}

    def _token_losses(self, params: Mapping[str, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed target-token cross-entropy and the number of target tokens."""
        inputs = self.model_inputs(batch)
        width = inputs["input_ids"].shape[1]
        logits = self.forward(params, batch).logits
        labels = batch["labels"][:, 1:width]
        total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
        return total, (labels != IGNORE).sum()

    def loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        total, count = self._token_losses(params, batch)
        return total / count.clamp(min=1)

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, torch.Tensor], data: Batch) -> dict[str, float]:
        n = len(data["labels"])
        if n == 0:
            return {}
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        for _, chunk in length_sorted_chunks(data, EVAL_CHUNK):
            s, c = self._token_losses(params, chunk)
            total += float(s)
            count += int(c)
        loss = float(total / max(count, 1))
        out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        k = min(self.eval_generate, n)
        if k > 0:
            hyps = self.generate(params, data["prompt_ids"][:k], data["prompt_mask"][:k])
            refs = [self._references[int(j)] for j in data["ref_index"][:k]]
            out["bleu"] = metrics.bleu(hyps, refs)
            out["rouge_l"] = metrics.rouge_l(hyps, refs)
        return out

    # -- greedy decoding with the functional parameters ------------------------------------------

    def _call(self, params: Mapping[str, torch.Tensor], **kwargs: Any) -> Any:
        return functional_call(self.model, dict(params), args=(), kwargs=kwargs, strict=False)

    @torch.no_grad()
    def generate(self, params: Mapping[str, torch.Tensor], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[str]:
        """Greedy decodes (text after the prompt, up to ``<eos>`` or ``max_new_tokens``)."""
        out: list[str] = []
        for i in range(0, len(prompt_ids), GENERATE_CHUNK):
            out += self._greedy(params, prompt_ids[i : i + GENERATE_CHUNK], prompt_mask[i : i + GENERATE_CHUNK])
        return out

    def _greedy(self, params: Mapping[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else ids.shape[1] - 1
        ids, mask = ids[:, start:], mask[:, start:]
        pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
        res = self._call(params, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past = res.past_key_values
        nxt = res.logits[:, -1].argmax(dim=-1)
        done = torch.zeros(len(ids), dtype=torch.bool)
        steps: list[torch.Tensor] = []
        pos = pos[:, -1:]
        for step in range(self.max_new_tokens):
            nxt = torch.where(done, torch.full_like(nxt, self.eos), nxt)
            steps.append(nxt)
            done |= nxt == self.eos
            if bool(done.all()) or step == self.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=mask.dtype)], dim=1)
            pos = pos + 1
            res = self._call(params, input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = res.logits[:, -1].argmax(dim=-1)
        gen = torch.stack(steps, dim=1) if steps else torch.zeros(len(ids), 0, dtype=torch.long)
        texts = []
        for row in gen.tolist():
            row = row[: row.index(self.eos)] if self.eos in row else row
            texts.append(self.tok.decode(row, skip_special_tokens=True).strip())
        return texts

    def report_notes(self) -> list[str]:
        sizes = ", ".join(f"{c.client_id} {c.num_train}/{c.num_test}" for c in self.clients)
        notes = [
            f"{self.name}: {self.model_name} ({self.model.config.num_hidden_layers} layers, hidden "
            f"{self.model.config.hidden_size}), LoRA on {', '.join(sorted({t.path.rsplit('.', 1)[-1] for t in self.targets}))}; "
            f"max_length {self.max_length}; loss = next-token cross-entropy of the target tokens only.",
            *self.splits.notes,
            f"Train/test examples per client: {sizes}.",
            f"bleu (sacrebleu corpus BLEU) and rouge_l (ROUGE-L F1 x 100) score greedy decodes of at most "
            f"{self.max_new_tokens} tokens for the first {self.eval_generate} test examples of each client.",
        ]
        groups = {c.client_id: c.info["group"] for c in self.clients if "group" in c.info}
        if groups:
            notes.append("Client groups: " + "; ".join(f"{cid} = {g}" for cid, g in groups.items()) + ".")
        if self.truncation:
            notes.append(self.truncation + ".")
        return notes

    def write_figures(self, out_dir: str | Path) -> list[str]:
        """No task-specific figure for generation (the method is here so callers need not check)."""
        return []


def _register() -> None:
    from pf2lora.tasks import register_task

    register_task("generation")(GenerationTask)


_register()
