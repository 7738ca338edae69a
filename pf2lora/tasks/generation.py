"""Real text generation with a pretrained causal LM (task kind ``generation``).

The model is ``AutoModelForCausalLM`` for ``task.model`` (default SmolLM2-135M; any local Hugging
Face directory or hub name), frozen, with LoRA on the architecture's default projections (Llama:
q_proj, v_proj). Nothing else is trained (no head).

Data (``task.dataset``, see :mod:`pf2lora.data.catalogue`, which also says how an example reads
as a prompt and a target), each example a prompt and a target:

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
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from pf2lora import metrics, models
from pf2lora.config import RunConfig
from pf2lora.data.dataset import TextDataset
from pf2lora.tasks import register_task
from pf2lora.tasks.base import Batch
from pf2lora.tasks.text_base import TextTask
from pf2lora.tasks.text_data import model_mask, trim, with_lengths

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

IGNORE = -100
GENERATE_CHUNK = 32
DEFAULT_MODEL = models.SMOL


def encode(tok: Any, prompt: str, target: str, max_length: int, eos: int) -> tuple[list[int], list[int], list[int], bool]:
    """(prompt ids, target ids ending in ``eos``, the whole prompt's ids, whether anything was cut):
    prompt + target fit in ``max_length``."""
    full = tok(prompt, add_special_tokens=True)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"] + [eos]
    if len(full) + len(t) <= max_length:
        return full, t, full, False
    p_keep = min(len(full), max(max_length // 2, max_length - len(t)))
    return full[len(full) - p_keep :], t[: max_length - p_keep], full, True


@register_task("generation")
class GenerationTask(TextTask):
    """A frozen pretrained causal LM with LoRA, generating each client's kind of text."""

    primary_metric = "loss"
    higher_is_better = False
    table_columns = ("loss", "perplexity", "bleu", "rouge_l", "global_loss")
    default_model = DEFAULT_MODEL
    data_kind = "generation"
    truncated_what = "examples (prompt + target)"

    def __init__(self, cfg: RunConfig, *, double_backward: bool = False):
        self.eval_generate = cfg.task.eval_generate
        self.max_new_tokens = cfg.task.max_new_tokens
        super().__init__(cfg, double_backward=double_backward)

    def _use_dataset(self, ds: TextDataset) -> None:
        if ds.targets is None:  # pragma: no cover - TextTask checks the data set's kind first
            raise ValueError(f"{ds.name} has no targets")
        self._references: list[str] = ds.targets

    def _load_model(self) -> PreTrainedModel:
        return models.load_causal_lm(self.model_name)

    def _prepare_model(self) -> None:
        eos = self.tok.eos_token_id
        if eos is None:
            raise ValueError(f"the tokenizer of {self.model_name} has no end-of-sequence token")
        self.eos = int(eos)
        self.pad = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else eos)

    def _encode(self, ds: TextDataset, idx: list[int]) -> tuple[Batch, int]:
        L = self.max_length
        n = len(idx)
        input_ids = torch.full((n, L), self.pad, dtype=torch.long)
        attention = torch.zeros((n, L), dtype=torch.long)
        labels = torch.full((n, L), IGNORE, dtype=torch.long)
        prompt_ids = torch.full((n, L), self.pad, dtype=torch.long)  # left-padded, for decoding
        prompt_mask = torch.zeros((n, L), dtype=torch.long)
        cut = 0
        for row, i in enumerate(idx):
            prompt, target = self.dataset.prompt_and_target(ds.text[i], ds.targets[i])  # type: ignore[index]
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
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "ref_index": torch.tensor(idx, dtype=torch.long),
        }
        return with_lengths(batch), cut

    # -- the Task interface ----------------------------------------------------------------------

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The batch trimmed to its longest example (its width from the lengths kept on the CPU)
        with the mask :func:`~pf2lora.tasks.text_data.model_mask` gives: off the CPU, no read
        from the device."""
        b = trim(batch)
        mask = model_mask(self.model, b)
        return {"input_ids": b["input_ids"]} if mask is None else {"input_ids": b["input_ids"], "attention_mask": mask}

    def _token_losses(self, params: Mapping[str, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed target-token cross-entropy and the number of target tokens."""
        inputs = self.model_inputs(batch)
        width = inputs["input_ids"].shape[1]
        out = cast("CausalLMOutput", self.forward(params, batch))
        if out.logits is None:  # pragma: no cover - a causal LM always returns logits
            raise ValueError(f"{self.model_name} returned no logits")
        logits = out.logits
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
        for _, chunk in self.eval_chunks(data):
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
        with self.autocast():  # as :meth:`forward`: decoding needs only the argmax, no float32 copy
            return self.parameter_slots().call(params, kwargs)

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
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        steps: list[torch.Tensor] = []
        pos = pos[:, -1:]
        for step in range(self.max_new_tokens):
            nxt = torch.where(done, torch.full_like(nxt, self.eos), nxt)
            steps.append(nxt)
            done |= nxt == self.eos
            if bool(done.all()) or step == self.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=mask.dtype, device=mask.device)], dim=1)
            pos = pos + 1
            res = self._call(params, input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = res.logits[:, -1].argmax(dim=-1)
        gen = torch.stack(steps, dim=1) if steps else torch.zeros(len(ids), 0, dtype=torch.long, device=ids.device)
        texts = []
        for row in gen.tolist():
            row = row[: row.index(self.eos)] if self.eos in row else row
            texts.append(self.tok.decode(row, skip_special_tokens=True).strip())
        return texts

    def _model_note(self) -> str:
        return f"max_length {self.max_length}; loss = next-token cross-entropy of the target tokens only."

    def _metrics_note(self) -> str:
        return (
            f"bleu (sacrebleu corpus BLEU) and rouge_l (ROUGE-L F1 x 100) score greedy decodes of at most "
            f"{self.max_new_tokens} tokens for the first {self.eval_generate} test examples of each client."
        )
