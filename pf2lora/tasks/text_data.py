"""How the real-language tasks deal a data set to clients, cut and cap the splits, and batch text.

:class:`~pf2lora.tasks.text_base.TextTask` calls :func:`client_splits`, which returns, per client,
the indices of its training and test examples in the loaded
:class:`~pf2lora.data.dataset.TextDataset` (:func:`pf2lora.data.catalogue.load`):

1. partition the whole data set (``task.partition``: natural groups, Dirichlet label skew,
   s-similarity or i.i.d.; seeded by ``task.data_seed``);
2. cut each client's share into train and test (``task.test_fraction``), so the test split does not
   depend on how much training data is kept;
3. cap each client's training split at ``task.train_samples`` (or at a per-client cap spread over
   ``[task.train_samples_min, task.train_samples]``) and its test split at ``task.test_samples``.

Every user mistake (unknown group, too few groups, a client left empty, a missing file or column)
is a one-line :class:`~pf2lora.errors.UserError`.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from pf2lora.config import TaskConfig
from pf2lora.data import catalogue
from pf2lora.data import partition as part
from pf2lora.data.dataset import TextDataset
from pf2lora.errors import UserError
from pf2lora.tasks.base import HOST, Batch, take

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class ClientSplit:
    client_id: str
    train: list[int]
    test: list[int]
    group: str | None = None
    """The natural group (domain, topic, role) the client was dealt from, if any."""


@dataclass
class Splits:
    dataset: TextDataset
    clients: list[ClientSplit]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Clients


def slug(text: str, limit: int = 24) -> str:
    """A short client id from a group name: lower case, runs of other characters -> ``-``."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].strip("-") or "group"


def _group_id(group: str) -> str:
    """Role groups are ``PLAY/SPEAKER``: the speaker names the client (the play is in the notes)."""
    return slug(group.rsplit("/", 1)[-1] if "/" in group else group)


def choose_groups(ds: TextDataset, tc: TaskConfig) -> list[str]:
    """``task.groups`` (checked), else the ``num_clients / clients_per_group`` largest groups."""
    if ds.groups is None:
        raise UserError(
            f"natural partition: {ds.name} has no natural client column"
            + ("; set task.group_column" if catalogue.resolve(tc).group_column else "; use another task.partition")
        )
    counts = ds.group_counts()
    what = ds.group_name or "group"
    if tc.groups:
        missing = [g for g in tc.groups if g not in counts]
        if missing:
            known = ", ".join(list(counts)[:8]) + (" ..." if len(counts) > 8 else "")
            raise UserError(f"natural partition: no {what} {missing[0]!r} in {ds.name} (largest: {known})")
        return list(tc.groups)
    need = tc.num_clients // tc.clients_per_group
    if need > len(counts):
        raise UserError(
            f"natural partition: {ds.name} has {len(counts)} {what}s, but task.num_clients = {tc.num_clients} with "
            f"task.clients_per_group = {tc.clients_per_group} needs {need}"
        )
    return list(counts)[:need]  # group_counts is largest first, ties in order of appearance


def _caps(tc: TaskConfig, k: int) -> list[int]:
    if tc.train_samples_min <= 0 or k == 1:
        return [tc.train_samples] * k
    evenly = np.linspace(tc.train_samples_min, tc.train_samples, k).round().astype(int)
    order = np.random.default_rng([tc.data_seed, 3]).permutation(k)
    return [int(evenly[i]) for i in order]


def client_splits(ds: TextDataset, tc: TaskConfig) -> Splits:
    """Partition ``ds`` among clients, then cut and cap each client's train and test split."""
    seed = tc.data_seed
    groups_of: dict[str, str] = {}
    if tc.partition == "node":  # one client per file (catalogue.load tags rows with their client), each cut on its own
        own = []
        for k, cid in enumerate(part.client_names(tc.num_clients)):
            rows = [i for i, g in enumerate(ds.groups or []) if g == cid]
            if rows:
                tr, te = part.own_file_split(len(rows), k, tc)
                own.append(ClientSplit(cid, [rows[i] for i in tr], [rows[i] for i in te]))
        return Splits(ds, own, [f"{ds.summary()}; partition {describe_partition(tc)}"])
    if tc.partition == "natural":
        chosen = choose_groups(ds, tc)
        raw = part.natural(ds.groups, tc.clients_per_group, seed, include=chosen)  # type: ignore[arg-type]
        partition: dict[str, list[int]] = {}
        used: Counter[str] = Counter()
        for name, idx in raw.items():
            group, _, j = name.rpartition("/") if tc.clients_per_group > 1 else (name, "", "")
            cid = _group_id(group) + (f"_{j}" if j else "")
            used[cid] += 1
            if used[cid] > 1:  # two roles of the same name in different plays
                cid = f"{cid}-{used[cid]}"
            partition[cid] = idx
            groups_of[cid] = group
    else:
        partition = part.make_partition(
            tc.partition,
            labels=ds.labels,
            n=len(ds),
            num_clients=tc.num_clients,
            seed=seed,
            alpha=tc.dirichlet_alpha,
            min_size=tc.min_client_size,
            s=tc.similarity,
        )
    train, test = part.train_test_split_per_client(partition, tc.test_fraction, seed + 1)
    caps = _caps(tc, len(train))
    clients = []
    for (cid, tr), cap in zip(train.items(), caps):
        tr_kept = part.subsample({cid: tr}, cap, seed + 2)[cid]
        te_kept = part.subsample({cid: test[cid]}, tc.test_samples, seed + 2)[cid]
        clients.append(ClientSplit(cid, tr_kept, te_kept, groups_of.get(cid)))
    notes = [f"{ds.summary()}; partition {describe_partition(tc)}"]
    return Splits(ds, clients, notes)


def describe_partition(tc: TaskConfig) -> str:
    if tc.partition == "natural":
        by = f"{tc.clients_per_group} client(s) per group"
        return f"natural ({by})"
    if tc.partition == "dirichlet":
        return f"dirichlet (alpha = {tc.dirichlet_alpha:g}, at least {tc.min_client_size} examples per client)"
    if tc.partition == "s-similarity":
        return f"s-similarity (s = {tc.similarity:g})"
    if tc.partition == "node":
        return "node (one client per file, each cut into train/test on its own)"
    return "iid"


# ---------------------------------------------------------------------------------------------
# Truncation


def warn_truncated(count: int, total: int, limit: int, what: str = "texts") -> str | None:
    """One warning for the whole task: how many of the tokenised texts were cut at ``limit`` tokens."""
    if count <= 0:
        return None
    msg = f"{count} of {total} {what} longer than {limit} tokens were truncated (raise task.max_length to keep more)"
    warnings.warn(msg, UserWarning, stacklevel=3)
    return msg


def padded_width(mask: torch.Tensor) -> int:
    """Columns a right-padded batch needs: its longest example (at least 1)."""
    return max(1, int(mask.sum(dim=1).max())) if len(mask) else mask.shape[1]


LENGTHS = HOST + "lengths"
"""Each example's tokens (its mask's sum), kept on the CPU (:data:`~pf2lora.tasks.base.HOST`): a
batch's width without reading the device back (read as a list: no tensor operation at all)."""

SYNC_FREE_ON_CPU = False
"""Whether a CPU batch gets the mask a GPU batch gets (:func:`model_mask`): tests set it to check,
on a CPU, that a training step reads nothing back to the host."""


def with_lengths(enc: Batch) -> Batch:
    """``enc`` with :data:`LENGTHS`, from its right-padded ``attention_mask``."""
    return {**enc, LENGTHS: enc["attention_mask"].sum(dim=1)}


def width(batch: Batch) -> int:
    """Columns ``batch`` needs: its longest example (at least 1), read from :data:`LENGTHS` where
    the batch has them (no read from the device), else from the mask."""
    lengths = batch.get(LENGTHS)
    if lengths is None:
        return padded_width(batch["attention_mask"])
    return max(1, *lengths.tolist()) if len(lengths) else batch["attention_mask"].shape[1]


def model_mask(model: PreTrainedModel, batch: Batch) -> torch.Tensor | None:
    """The attention mask to give ``model`` for a trimmed ``batch``. Off the CPU a step must not
    read the device back, and given a 2-D mask transformers does (to see whether it may skip it:
    a synchronisation per forward), so there, with :data:`LENGTHS` at hand, it gets none where no
    example is padded (what transformers would do) and else the 4-D mask transformers would build
    (:func:`prepared_mask`: causal for a decoder, bidirectional for an encoder): the same
    computation either way. On a CPU that read is free: the 2-D mask, as always."""
    mask, lengths = batch["attention_mask"], batch.get(LENGTHS)
    if lengths is None or (mask.device.type == "cpu" and not SYNC_FREE_ON_CPU):
        return mask
    if len(lengths) and min(lengths.tolist()) >= mask.shape[1]:
        return None
    return prepared_mask(model, mask)


def prepared_mask(model: PreTrainedModel, mask: torch.Tensor) -> torch.Tensor:
    """The 4-D attention mask ``model`` builds from the 2-D padding ``mask``, built here without
    reading ``mask`` back to the host (given a 2-D mask, transformers reads it to see whether it may
    skip it: a device synchronisation per forward). The model takes a 4-D mask as it is, so the
    computation is the same as with the 2-D one wherever any example is padded (tested): for a
    decoder (Llama, GPT-2, a classifier on one too) the causal mask with the padding, for an
    encoder the bidirectional one; a decoder given the encoder's would attend to later tokens."""
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    embeds = mask.new_empty((mask.shape[0], mask.shape[1], 0), dtype=model.dtype)  # what it reads: shape, dtype, device
    if is_causal(model):
        out = create_causal_mask(
            config=model.config, inputs_embeds=embeds, attention_mask=mask, past_key_values=None, allow_is_causal_skip=False
        )
    else:
        out = create_bidirectional_mask(config=model.config, inputs_embeds=embeds, attention_mask=mask, allow_is_bidirectional_skip=False)
    return out if isinstance(out, torch.Tensor) else mask


_CAUSAL: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def is_causal(model: torch.nn.Module) -> bool:
    """Whether ``model`` attends causally: transformers' attention modules say so (``is_causal``:
    Llama's, GPT-2's; BERT's is False, MPNet's has none). Found once per model."""
    found = _CAUSAL.get(model)
    if found is None:
        found = _CAUSAL[model] = any(getattr(m, "is_causal", False) is True for m in model.modules())
    return found


def trim(batch: Batch) -> Batch:
    """Drop the padding columns every example of ``batch`` has (right padding): padding costs nothing."""
    mask = batch["attention_mask"]
    if mask.shape[0] == 0:
        return batch
    w = width(batch)
    return {k: (v[:, :w] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v) for k, v in batch.items()}


def length_sorted_chunks(data: Batch, size: int) -> Iterator[tuple[torch.Tensor, Batch]]:
    """``data`` in chunks of ``size`` examples of similar length (with their indices), so that each
    chunk, trimmed to its longest example, computes little padding."""
    lengths = data[LENGTHS] if LENGTHS in data else data["attention_mask"].sum(dim=1).cpu()  # the order on the CPU, as the index it becomes
    order = torch.argsort(lengths, stable=True)
    for i in range(0, len(order), size):
        idx = order[i : i + size]
        yield idx, take(data, idx)
