"""Real text classification with a pretrained encoder (task kind ``text-classification``).

The model is ``AutoModelForSequenceClassification`` for ``task.model`` (default all-MiniLM-L6-v2;
paraphrase-MiniLM-L3-v2 is the fast one; any local Hugging Face directory or hub name), frozen,
with LoRA on the architecture's default projections (BERT: query, value). The weights the
checkpoint does not hold (the classifier; for paraphrase-MiniLM-L3-v2 also the pooler, which its
ONNX export lacks) are the trained *head*: methods get them from :meth:`init_head` and share them or
keep them private (``lora.head``).

Data: ``task.dataset`` (VADER's 4 domains, Rotten Tomatoes, WordNet noun topics, a GLUE task
folder, or your own CSV/TSV/JSONL; see :mod:`pf2lora.data.catalogue`), dealt to clients by
``task.partition`` (see :mod:`pf2lora.tasks.text_data`; the loading and dealing the text tasks share
is :class:`~pf2lora.tasks.text_base.TextTask`). Each client's examples are tokenised once, padded to
``task.max_length`` (longer texts are cut; how many is counted and warned about once); a batch is
trimmed to its longest example before the forward pass, so padding costs nothing (its width read
from the examples' lengths, kept on the CPU: :data:`~pf2lora.tasks.text_data.LENGTHS`).

Metrics per client test split: accuracy, macro-F1, balanced accuracy, MCC (CoLA's metric; always
computed), mean cross-entropy loss; the diagnostic ``majority_accuracy`` is what always predicting
the client's majority training label scores, the floor a useful model must beat.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from pf2lora import lora, metrics, models
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.data import partition as part
from pf2lora.data.dataset import TextDataset
from pf2lora.errors import UserError
from pf2lora.tasks import register_task
from pf2lora.tasks.base import Batch, ClientData, flatten_clients, per_client_cross_entropy
from pf2lora.tasks.text_base import TextTask
from pf2lora.tasks.text_data import model_mask, trim, with_lengths

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.modeling_outputs import SequenceClassifierOutput

DEFAULT_MODEL = models.L6


def checkpoint_keys(model_dir: Path) -> set[str] | None:
    """Tensor names stored in a model directory (safetensors or PyTorch bin), None if unreadable."""
    keys: set[str] = set()
    st_files = sorted(model_dir.glob("*.safetensors"))
    try:
        if st_files:
            from safetensors import safe_open

            for f in st_files:
                with safe_open(str(f), "pt") as fh:
                    keys.update(fh.keys())
            return keys
        bins = sorted(model_dir.glob("pytorch_model*.bin"))
        for f in bins:
            keys.update(torch.load(f, map_location="meta", weights_only=True, mmap=True).keys())
        return keys or None
    except Exception:  # noqa: BLE001 - unreadable: fall back to the classifier only
        return None


def fresh_parameters(model: torch.nn.Module, stored: set[str] | None) -> list[str]:
    """Parameters of ``model`` the checkpoint did not provide (the new head, a missing pooler)."""
    names = [n for n, _ in model.named_parameters()]
    if stored is None:
        return [n for n in names if n.startswith("classifier.")]
    prefix = getattr(model, "base_model_prefix", "") + "."
    fresh = []
    for n in names:
        alt = n[len(prefix) :] if n.startswith(prefix) else prefix + n
        if n not in stored and alt not in stored:
            fresh.append(n)
    return fresh


def tokenize(tok: Any, text: list[str], pair: list[str] | None, max_length: int) -> tuple[Batch, int]:
    """``input_ids``/``attention_mask``(/``token_type_ids``) padded to ``max_length``, and how many were cut."""
    full = tok(text, pair, add_special_tokens=True, truncation=False, verbose=False)["input_ids"] if text else []
    cut = sum(len(ids) > max_length for ids in full)
    enc = tok(text, pair, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"]
    return out, cut


@register_task("text-classification")
class TextClassificationTask(TextTask):
    """A frozen pretrained encoder with LoRA, classifying real heterogeneous text per client."""

    primary_metric = "accuracy"
    higher_is_better = True
    table_columns = ("accuracy", "macro_f1", "balanced_accuracy", "global_accuracy")
    reference = ("majority_accuracy", "majority class (reference)")
    default_model = DEFAULT_MODEL
    data_kind = "classification"

    def __init__(self, cfg: RunConfig, *, double_backward: bool = False):
        super().__init__(cfg, double_backward=double_backward)
        self._shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters() if n in self.head_names}

    def _use_dataset(self, ds: TextDataset) -> None:
        self.label_names = list(ds.label_names or [])
        self.num_labels = len(self.label_names)
        self.labels_inferred = bool(ds.info.get("label_names_inferred"))
        if ds.labels is None:  # pragma: no cover - TextTask checks the data set's kind first
            raise ValueError(f"{ds.name} has no labels")
        self._labels: list[int] = ds.labels
        self._label_tensor = torch.tensor(ds.labels, dtype=torch.long)

    def _load_model(self) -> PreTrainedModel:
        return models.load_classifier(self.model_name, self.num_labels, seed=self.cfg.task.data_seed)

    def _prepare_model(self) -> None:
        """The trained head: what the checkpoint did not provide (read before LoRA renames layers)."""
        try:  # the model directory (for a hub name: its cached snapshot, present once loaded)
            model_dir: Path | None = models.resolve_model(self.model_name)
        except UserError:
            model_dir = None
        self.head_names = fresh_parameters(self.model, checkpoint_keys(model_dir) if model_dir is not None else None)
        if not self.head_names:
            self.head_names = [n for n, _ in self.model.named_parameters() if n.startswith("classifier.")]
        self.init_std = float(getattr(self.model.config, "initializer_range", 0.02))
        lora.stackable_heads(self.model, self.head_names)

    def _encode(self, ds: TextDataset, idx: list[int]) -> tuple[Batch, int]:
        texts = [ds.text[i] for i in idx]
        pairs = [ds.text_pair[i] for i in idx] if ds.text_pair is not None else None
        enc, cut = tokenize(self.tok, texts, pairs, self.max_length)
        enc["labels"] = self._label_tensor[torch.tensor(idx, dtype=torch.long)]
        return with_lengths(enc), cut

    def _client_info(self, parts: dict[str, Batch]) -> dict[str, Any]:
        majority, maj_acc = metrics.majority_accuracy(parts["train"]["labels"], parts["test"]["labels"], self.num_labels)
        counts = torch.bincount(parts["train"]["labels"], minlength=self.num_labels).tolist()
        return {"majority_label": self.label_names[majority], "majority_accuracy": maj_acc, "train_label_counts": counts}

    # -- the Task interface ----------------------------------------------------------------------

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The model's inputs, trimmed to the batch's longest example, with the mask
        :func:`~pf2lora.tasks.text_data.model_mask` gives (off the CPU: no read from the device)."""
        b = trim(batch)
        inputs: dict[str, torch.Tensor] = {k: b[k] for k in ("input_ids", "token_type_ids") if k in b}
        mask = model_mask(self.model, b)
        return inputs if mask is None else {**inputs, "attention_mask": mask}

    def logits(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        out = cast("SequenceClassifierOutput", self.forward(params, batch))
        if out.logits is None:  # pragma: no cover - a sequence classifier always returns logits
            raise ValueError(f"{self.model_name} returned no logits")
        return out.logits

    def loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(params, batch), batch["labels"])

    def stacked_loss(self, params: Mapping[str, torch.Tensor], batch: Batch, k: int) -> torch.Tensor:
        """The clients' batches as one forward, trimmed to the longest text among them."""
        flat = flatten_clients(batch)
        return per_client_cross_entropy(self.logits(params, flat), flat["labels"], k)

    @torch.no_grad()
    def evaluate(self, params: Mapping[str, torch.Tensor], data: Batch) -> dict[str, float]:
        labels = data["labels"]
        n = len(labels)
        if n == 0:
            return {}
        chunks = [(idx, self.logits(params, chunk)) for idx, chunk in self.eval_chunks(data)]
        first = chunks[0][1]
        logits = torch.empty(n, first.shape[-1], dtype=first.dtype, device=first.device)
        for idx, chunk_logits in chunks:
            logits[idx] = chunk_logits
        pred = logits.argmax(dim=-1)
        out = metrics.classification_metrics(pred, labels, self.num_labels)
        out["loss"] = float(F.cross_entropy(logits, labels))
        out.update(metrics.majority_shares(pred, labels, self.num_labels))
        return out

    def init_head(self, role: str, generator: torch.Generator) -> st.Tensors:
        """The fresh tensors as BERT initialises them: N(0, initializer_range^2) weights, zero biases
        (LayerNorm weights, if any, one)."""
        out: st.Tensors = {}
        for name in self.head_names:
            shape = self._shapes[name]
            if name.endswith("bias"):
                value = torch.zeros(shape)
            elif len(shape) == 1:
                value = torch.ones(shape)
            else:
                value = torch.randn(shape, generator=generator) * self.init_std
            out[st.key(role, name)] = value
        return out

    def diagnostics(
        self, client: ClientData, personalized: Mapping[str, torch.Tensor], common: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        return {**super().diagnostics(client, personalized, common), "majority_accuracy": client.info.get("majority_accuracy")}

    def _model_note(self) -> str:
        return f"trained head: {', '.join(self.head_names)}; max_length {self.max_length}."

    def _metrics_note(self) -> str:
        inferred = (
            f" Classes (read from the label column, sorted; set task.label_names for another order): {', '.join(self.label_names)}."
            if self.labels_inferred
            else ""
        )
        return (
            "majority_accuracy: always predicting the client's majority training label (the floor to beat); "
            "mcc is the Matthews correlation (CoLA's metric)." + inferred
        )

    def _groups_need_note(self, groups: dict[str, str]) -> bool:
        return any(cid.split("_")[0] != g.lower() for cid, g in groups.items())

    def write_figures(self, out_dir: str | Path) -> list[str]:
        """``label_distribution.png`` (training labels per client) in ``out_dir``; the file names
        written, relative to ``out_dir``. Never raises: a failure is a warning and ``[]``."""
        import warnings

        name = "label_distribution.png"
        if any("train_indices" not in c.info for c in self.clients):  # a client's data is on its node (partition "node")
            return []
        try:
            partition = {c.client_id: c.info["train_indices"] for c in self.clients}
            title = f"{self.dataset_name}: training labels per client ({self.cfg.task.partition} partition)"
            part.plot_label_distribution(partition, self._labels, Path(out_dir) / name, self.label_names, title)
        except Exception as e:  # noqa: BLE001 - a figure must never fail a finished run
            warnings.warn(f"label distribution figure not written: {type(e).__name__}: {e}", stacklevel=2)
            return []
        return [name]
