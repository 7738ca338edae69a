"""What the real-language tasks share: :class:`TextTask` loads a pretrained model and a catalogued
data set, deals the data to clients, encodes each client's splits once, and writes the notes.

A subclass (:mod:`~pf2lora.tasks.text_classification`, :mod:`~pf2lora.tasks.generation`) says only
what differs: which model class, how an example becomes tensors, the loss and the metrics.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from pf2lora import lora, models
from pf2lora.config import RunConfig
from pf2lora.data import catalogue
from pf2lora.data import partition as part
from pf2lora.data.dataset import TextDataset
from pf2lora.errors import UserError
from pf2lora.metrics import effective_rank
from pf2lora.tasks.base import Batch, ClientData, Task
from pf2lora.tasks.text_data import Splits, client_splits, length_sorted_chunks, warn_truncated

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EVAL_CHUNK = 64
"""Examples per forward pass when evaluating a whole split."""


@dataclass
class RemoteClient(ClientData):
    """A client whose data is not on this machine (``task.partition = "node"``: its own file is on
    its SuperNode): the server and the other nodes know its id, never its examples. Its sizes are
    what its node reported (``reported``, set by the Flower server), else unknown: asking for them
    here is a one-line error (e.g. a local run of a config whose data is on the nodes)."""

    reported: tuple[int, int] | None = None

    def _sizes(self) -> tuple[int, int]:
        if self.reported is None:
            raise UserError(
                f'{self.client_id}\'s data is on its SuperNode (task.partition = "node" and task.data_path gives no file '
                "for it here): run on Flower (--engine flower-deploy --superlink HOST:PORT), or list its file in task.data_path"
            )
        return self.reported

    @property
    def num_train(self) -> int:
        return self._sizes()[0]

    @property
    def num_test(self) -> int:
        return self._sizes()[1]


class TextTask(Task):
    """A frozen pretrained model with LoRA, and real text dealt to clients (``task.partition``)."""

    default_model: ClassVar[str]
    """``task.model`` when it is empty."""
    data_kind: ClassVar[str]
    """:attr:`TextDataset.kind` the task needs (``classification`` or ``generation``)."""
    truncated_what: ClassVar[str] = "texts"
    """What the truncation warning counts."""
    model: PreTrainedModel

    def __init__(self, cfg: RunConfig, *, double_backward: bool = False):
        """``double_backward``: a method will differentiate through gradients (e.g. PF2LoRA's exact
        hypergradient), which PyTorch's fused attention (SDPA) cannot do on CPU: use eager attention."""
        tc = cfg.task
        self.cfg = cfg
        self.model_name = tc.model.strip() or self.default_model
        self.dataset = catalogue.resolve(tc)
        self.dataset_name = self.dataset.name
        self.max_length = tc.max_length
        ds = catalogue.load(tc)
        if ds.kind != self.data_kind:  # pragma: no cover - the catalogue lists a data set only under kinds it serves
            raise ValueError(f"{ds.name} is a {ds.kind} data set, not {self.data_kind}")
        self.splits: Splits = client_splits(ds, tc)
        self.name = f"{tc.kind}:{self.dataset_name}"
        self._use_dataset(ds)

        self.tok = models.load_tokenizer(self.model_name)
        self.model = self._load_model()
        if double_backward and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation("eager")
        self.model.eval()
        self._prepare_model()
        try:
            targets = cfg.lora.target_modules or lora.default_targets(self.model.config.model_type)
        except ValueError as e:  # a model type we know no default for: the user names the modules
            raise UserError(f"task.model = {self.model_name!r}: {e}") from None
        self.targets = lora.inject(self.model, targets, {lora.COMMON: cfg.lora.alpha, lora.PRIVATE: cfg.lora.private_alpha})

        self.clients = []
        cut = total = 0
        for cs in self.splits.clients:
            parts: dict[str, Batch] = {}
            for split, idx in (("train", cs.train), ("test", cs.test)):
                parts[split], n_cut = self._encode(ds, idx)
                cut += n_cut
                total += len(idx)
            info: dict[str, Any] = {**self._client_info(parts), "train_indices": cs.train, "test_indices": cs.test}
            if cs.group is not None:
                info["group"] = cs.group
            self.clients.append(ClientData(cs.client_id, parts["train"], parts["test"], info=info))
        if tc.partition == catalogue.NODE:  # every client in its place; those whose file is elsewhere, by id only
            here = {c.client_id: c for c in self.clients}
            self.clients = [here.get(cid) or RemoteClient(cid, {}, {}) for cid in part.client_names(tc.num_clients)]
        self.truncation = warn_truncated(cut, total, tc.max_length, self.truncated_what)

    # -- what a subclass says --------------------------------------------------------------------

    def _use_dataset(self, ds: TextDataset) -> None:
        """Keep what the task needs of the whole data set (label names, references), before the model loads."""

    @abstractmethod
    def _load_model(self) -> PreTrainedModel:
        """The pretrained model (frozen; LoRA is injected afterwards)."""

    def _prepare_model(self) -> None:
        """Read what the loaded model implies (the head to train, special tokens) before LoRA goes in."""

    @abstractmethod
    def _encode(self, ds: TextDataset, idx: list[int]) -> tuple[Batch, int]:
        """The tensors of the examples ``idx`` of ``ds``, and how many of them were truncated."""

    def _client_info(self, parts: dict[str, Batch]) -> dict[str, Any]:
        """Extra ``ClientData.info`` from a client's encoded ``train``/``test`` splits."""
        return {}

    @abstractmethod
    def _model_note(self) -> str:
        """The end of the report's first note (after the model and its LoRA layers)."""

    @abstractmethod
    def _metrics_note(self) -> str:
        """What the metrics mean, for the report."""

    def _groups_need_note(self, groups: dict[str, str]) -> bool:
        """Whether the report lists client id -> group (not when the ids say it already)."""
        return True

    # -- shared plumbing -------------------------------------------------------------------------

    @staticmethod
    def eval_chunks(data: Batch) -> Iterator[tuple[torch.Tensor, Batch]]:
        """A whole split in chunks of similar length (with their indices), for evaluation."""
        return length_sorted_chunks(data, EVAL_CHUNK)

    def diagnostics(
        self, client: ClientData, personalized: Mapping[str, torch.Tensor], common: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        """The learned update's effective rank per adapted layer (common + private adapters, the
        paper's claim that a client's rank adapts to its data, made measurable on real text) and
        the norm of what the client adds to the common adapter (0 for a method without one)."""
        threshold = self.cfg.eval.rank_threshold
        deltas = lora.delta_weights(self.model, self.targets, personalized)
        ranks = {path: effective_rank(delta, threshold)[0] for path, delta in deltas.items()}
        shared = lora.delta_weights(self.model, self.targets, common) if common else {}
        own = [deltas[p] - shared[p] if p in shared else deltas[p] for p in deltas]
        return {
            "layer_ranks": ranks,
            "private_norm": float(torch.stack([d.double().norm() for d in own]).norm()) if own else 0.0,
        }

    def report_notes(self) -> list[str]:
        sizes = ", ".join(
            f"{c.client_id} on its SuperNode"
            if isinstance(c, RemoteClient) and c.reported is None
            else f"{c.client_id} {c.num_train}/{c.num_test}"
            for c in self.clients
        )
        adapted = ", ".join(sorted({t.path.rsplit(".", 1)[-1] for t in self.targets}))
        notes = [
            f"{self.name}: {self.model_name} ({self.model.config.num_hidden_layers} layers, hidden "
            f"{self.model.config.hidden_size}), LoRA on {adapted}; {self._model_note()}",
            *self.splits.notes,
            f"Train/test examples per client: {sizes}.",
            self._metrics_note(),
        ]
        groups = {c.client_id: c.info["group"] for c in self.clients if "group" in c.info}
        if groups and self._groups_need_note(groups):
            notes.append("Client groups: " + "; ".join(f"{cid} = {g}" for cid, g in groups.items()) + ".")
        if self.truncation:
            notes.append(self.truncation + ".")
        return notes

    def write_figures(self, out_dir: str | Path) -> list[str]:
        """Task-specific figures written to ``out_dir`` (file names relative to it); none by default."""
        return []
