"""Splitting a data set among clients: i.i.d., Dirichlet label skew, SCAFFOLD's s-similarity, natural groups.

A :data:`Partition` maps a client id to the sorted indices of its examples (into a
:class:`~pf2lora.data.dataset.TextDataset` or any label list). Every partitioner is deterministic
given its ``seed`` (its own ``numpy`` generator, untouched by global random state) and refuses to
return a client without examples: that is a one-line :class:`~pf2lora.errors.UserError` naming
the client. :func:`train_test_split_per_client` and :func:`subsample` then cut each client's share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pf2lora.config import TaskConfig
from pf2lora.errors import UserError
from pf2lora.io import atomic_write

Partition = dict[str, list[int]]
"""Client id -> sorted example indices (clients in a fixed order)."""


def _rng(seed: int) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"partition seed must be an integer >= 0, got {seed!r}")
    return np.random.default_rng(seed)


def client_names(num_clients: int) -> list[str]:
    width = len(str(max(num_clients - 1, 0)))
    return [f"client_{i:0{width}d}" for i in range(num_clients)]


def _finish(parts: Mapping[str, Sequence[int] | np.ndarray], what: str) -> Partition:
    out: Partition = {}
    for name, idx in parts.items():
        if len(idx) == 0:
            raise UserError(f"{what} leaves client {name!r} without examples; use fewer clients or more data")
        out[name] = sorted(int(i) for i in idx)
    return out


def _check_clients(n: int, num_clients: int, what: str) -> None:
    if num_clients < 1:
        raise UserError(f"{what}: num_clients must be >= 1, got {num_clients}")
    if n < num_clients:
        raise UserError(f"{what}: {n} examples cannot give {num_clients} clients one each")


def check_partition(partition: Mapping[str, Sequence[int]], n: int | None = None) -> None:
    """Raise if a client is empty, an index repeats across clients, or (given ``n``) is out of range."""
    seen: set[int] = set()
    for name, idx in partition.items():
        if len(idx) == 0:
            raise UserError(f"client {name!r} has no examples")
        for i in idx:
            if i in seen:
                raise UserError(f"example {i} is given to more than one client (again to {name!r})")
            if n is not None and not 0 <= i < n:
                raise UserError(f"client {name!r} has index {i}, outside the data set of {n} examples")
            seen.add(i)


# ---------------------------------------------------------------------------------------------
# Partitioners


def iid(n: int, num_clients: int, seed: int = 0) -> Partition:
    """A uniform random split of ``range(n)`` into ``num_clients`` near-equal shares."""
    _check_clients(n, num_clients, "iid partition")
    perm = _rng(seed).permutation(n)
    return _finish(dict(zip(client_names(num_clients), np.array_split(perm, num_clients))), "iid partition")


def dirichlet(
    labels: Sequence[int],
    num_clients: int,
    alpha: float,
    min_size: int = 1,
    seed: int = 0,
    max_tries: int = 1000,
) -> Partition:
    """Label skew: each class is spread over clients with proportions drawn from Dirichlet(``alpha``).

    The usual recipe (Yurochkin et al. 2019, Li et al. NIID-Bench): per class, draw
    ``p ~ Dir(alpha * 1)``, zero the share of clients that already hold ``n / num_clients``
    examples, renormalise, and cut the class's shuffled examples at the cumulative proportions. The
    whole draw is repeated until every client has at least ``min_size`` examples; small ``alpha``
    means few classes per client, large ``alpha`` approaches i.i.d. Raises a clear error when
    ``min_size * num_clients`` exceeds the data or ``max_tries`` draws all fail.
    """
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    what = f"dirichlet partition (alpha={alpha}, min_size={min_size})"
    _check_clients(n, num_clients, what)
    if not alpha > 0:
        raise UserError(f"{what}: alpha must be > 0")
    if min_size < 1:
        raise UserError(f"{what}: min_size must be >= 1")
    if min_size * num_clients > n:
        raise UserError(f"{what}: {num_clients} clients x {min_size} examples exceeds the {n} examples")
    rng = _rng(seed)
    classes = np.unique(y)
    cap = n / num_clients
    best = 0
    for _ in range(max_tries):
        shares: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            sizes = np.array([len(s) for s in shares])
            p = np.where(sizes < cap, p, 0.0)
            p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for share, part in zip(shares, np.split(idx, cuts)):
                share.extend(part.tolist())
        smallest = min(len(s) for s in shares)
        best = max(best, smallest)
        if smallest >= min_size:
            return _finish(dict(zip(client_names(num_clients), shares)), what)
    raise UserError(
        f"{what}: no draw in {max_tries} tries gave every client {min_size} examples (best smallest client: {best}); "
        "raise alpha, lower min_size or use fewer clients"
    )


def s_similarity(labels: Sequence[int], num_clients: int, s: float, seed: int = 0) -> Partition:
    """SCAFFOLD's similarity split (Karimireddy et al. 2020, sec. 7): a fraction ``s`` of the data
    is dealt i.i.d., the rest is sorted by label and cut into ``num_clients`` contiguous shards.

    ``s=1`` is an i.i.d. split; ``s=0`` gives each client a contiguous run of labels (with binary
    labels, all clients but at most one hold a single label). Every client gets about
    ``n / num_clients`` examples. Which shard a client gets is random (``seed``).
    """
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    what = f"s-similarity partition (s={s})"
    _check_clients(n, num_clients, what)
    if not 0.0 <= s <= 1.0:
        raise UserError(f"{what}: s must be in [0, 1]")
    rng = _rng(seed)
    perm = rng.permutation(n)
    n_iid = int(round(s * n))
    iid_part, rest = perm[:n_iid], perm[n_iid:]
    rest = rest[np.argsort(y[rest], kind="stable")]  # shuffled within each label, labels ascending
    # equal client sizes: shard sizes complement each client's i.i.d. share
    iid_chunks = np.array_split(iid_part, num_clients)
    totals = [len(c) for c in np.array_split(np.arange(n), num_clients)]
    order = rng.permutation(num_clients)
    need = [totals[k] - len(iid_chunks[k]) for k in range(num_clients)]
    shares: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    start = 0
    for k in order:
        shares[k] = np.concatenate([iid_chunks[k], rest[start : start + need[k]]])
        start += need[k]
    return _finish(dict(zip(client_names(num_clients), shares)), what)


def natural(
    groups: Sequence[str],
    clients_per_group: int | Mapping[str, int] = 1,
    seed: int = 0,
    min_size: int = 1,
    include: Sequence[str] | None = None,
) -> Partition:
    """One client per group value (domain, topic, role ...), in order of first appearance.

    ``clients_per_group`` splits a group at random into ``k`` near-equal clients named
    ``group/0 ... group/k-1`` (an int for all groups, or a mapping group -> k, 1 when absent).
    ``min_size`` drops groups with fewer examples (before splitting); ``include`` keeps only the
    named groups (in that order). A client left empty raises, naming it.
    """
    g = [str(x) for x in groups]
    order: dict[str, list[int]] = {}
    for i, v in enumerate(g):
        order.setdefault(v, []).append(i)
    if include is not None:
        missing = [v for v in include if v not in order]
        if missing:
            raise UserError(f"natural partition: no examples of group(s) {', '.join(map(repr, missing))}")
        order = {v: order[v] for v in include}
    order = {v: idx for v, idx in order.items() if len(idx) >= min_size}
    if not order:
        raise UserError(f"natural partition: no group has {min_size} examples")
    rng = _rng(seed)
    parts: dict[str, np.ndarray | list[int]] = {}
    for v, idx in order.items():
        k = clients_per_group.get(v, 1) if isinstance(clients_per_group, Mapping) else clients_per_group
        if k < 1:
            raise UserError(f"natural partition: clients for group {v!r} must be >= 1, got {k}")
        if k == 1:
            parts[v] = idx
            continue
        for j, chunk in enumerate(np.array_split(rng.permutation(idx), k)):
            parts[f"{v}/{j}"] = chunk
    return _finish(parts, "natural partition")


def make_partition(
    scheme: str,
    *,
    labels: Sequence[int] | None = None,
    groups: Sequence[str] | None = None,
    n: int | None = None,
    num_clients: int = 1,
    seed: int = 0,
    alpha: float = 0.5,
    min_size: int = 1,
    s: float = 0.5,
    clients_per_group: int = 1,
) -> Partition:
    """Dispatch by name (``iid``, ``dirichlet``, ``s-similarity``, ``natural``) for configs."""
    scheme = scheme.replace("_", "-")
    if scheme == "iid":
        size = n if n is not None else len(labels if labels is not None else groups or [])
        return iid(size, num_clients, seed)
    if scheme in ("dirichlet", "s-similarity"):
        if labels is None:
            raise UserError(f"{scheme} partition needs labels (a classification data set)")
        if scheme == "dirichlet":
            return dirichlet(labels, num_clients, alpha, min_size, seed)
        return s_similarity(labels, num_clients, s, seed)
    if scheme == "natural":
        if groups is None:
            raise UserError("natural partition needs a group/client column in the data")
        return natural(groups, clients_per_group, seed, min_size)
    raise UserError(f"unknown partition {scheme!r}; choose from iid, dirichlet, s-similarity, natural")


# ---------------------------------------------------------------------------------------------
# Per-client cuts


def train_test_split_per_client(partition: Mapping[str, Sequence[int]], test_fraction: float, seed: int = 0) -> tuple[Partition, Partition]:
    """Each client's examples cut into (train, test) at random; test gets ``round(fraction * n)``,
    at least 1. A client that would end with an empty train or test share raises, naming it."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test fraction must be in (0, 1), got {test_fraction}")
    rng = _rng(seed)
    train: Partition = {}
    test: Partition = {}
    for name, idx in partition.items():
        k = max(1, int(round(test_fraction * len(idx))))
        if len(idx) - k < 1:
            raise UserError(f"client {name!r} has {len(idx)} example(s): too few to split into train and test (fraction {test_fraction})")
        perm = rng.permutation(np.asarray(idx, dtype=np.int64))
        test[name] = sorted(perm[:k].tolist())
        train[name] = sorted(perm[k:].tolist())
    return train, test


def subsample(partition: Mapping[str, Sequence[int]], max_per_client: int, seed: int = 0) -> Partition:
    """At most ``max_per_client`` examples per client, drawn at random (smaller clients kept whole)."""
    if max_per_client < 1:
        raise UserError(f"max examples per client must be >= 1, got {max_per_client}")
    rng = _rng(seed)
    out: Partition = {}
    for name, idx in partition.items():
        arr = np.asarray(idx, dtype=np.int64)
        out[name] = sorted(arr.tolist() if len(arr) <= max_per_client else rng.choice(arr, max_per_client, replace=False).tolist())
    return _finish(out, "subsampling")


def own_file_split(n: int, position: int, tc: TaskConfig) -> tuple[list[int], list[int]]:
    """(train, test) rows of client ``position``'s own file of ``n`` examples (``task.partition =
    "node"``): cut and capped as :func:`pf2lora.tasks.text_data.client_splits` cuts a client's share
    (``task.test_fraction``; training capped at ``task.train_samples``, or at this client's cap of
    ``[task.train_samples_min, task.train_samples]``; test at ``task.test_samples``), but from a
    random stream of this client's own (``task.data_seed``, its position): a SuperNode that holds only
    its own file cuts it exactly as a machine holding every client's file does."""
    seed = tc.data_seed
    if not 0.0 < tc.test_fraction < 1.0:
        raise UserError(f"test fraction must be in (0, 1), got {tc.test_fraction}")
    k = max(1, int(round(tc.test_fraction * n)))
    if n - k < 1:
        raise UserError(f"{n} example(s): too few to split into train and test (task.test_fraction = {tc.test_fraction})")
    perm = np.random.default_rng([seed + 1, position]).permutation(n)
    cap = tc.train_samples
    if tc.train_samples_min > 0 and tc.num_clients > 1:  # as text_data's caps: spread evenly, in a seeded order
        evenly = np.linspace(tc.train_samples_min, tc.train_samples, tc.num_clients).round().astype(int)
        cap = int(evenly[np.random.default_rng([seed, 3]).permutation(tc.num_clients)[position]])
    train = subsample({"c": sorted(perm[k:].tolist())}, cap, seed + 2)["c"]
    test = subsample({"c": sorted(perm[:k].tolist())}, tc.test_samples, seed + 2)["c"]
    return train, test


# ---------------------------------------------------------------------------------------------
# Inspection


def label_counts(partition: Mapping[str, Sequence[int]], labels: Sequence[int], num_labels: int | None = None) -> np.ndarray:
    """Matrix ``[client, label]`` of example counts, clients in the partition's order."""
    y = np.asarray(labels, dtype=np.int64)
    k = int(num_labels if num_labels is not None else (y.max() + 1 if len(y) else 0))
    return np.stack([np.bincount(y[np.asarray(idx, dtype=np.int64)], minlength=k) for idx in partition.values()])


def plot_label_distribution(
    partition: Mapping[str, Sequence[int]],
    labels: Sequence[int],
    path: str | Path,
    label_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """A stacked bar chart of label counts per client, written as PNG (atomically: tmp + rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = label_counts(partition, labels, len(label_names) if label_names is not None else None)
    names = list(label_names) if label_names is not None else [str(i) for i in range(counts.shape[1])]
    clients = list(partition)
    width = min(max(6.0, 0.35 * len(clients) + 2.0), 40.0)
    fig, ax = plt.subplots(figsize=(width, 4.5))
    try:
        bottom = np.zeros(len(clients))
        cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
        for j, name in enumerate(names):
            ax.bar(range(len(clients)), counts[:, j], bottom=bottom, label=name, color=cmap(j % cmap.N), width=0.85)
            bottom += counts[:, j]
        ax.set_xticks(range(len(clients)))
        ax.set_xticklabels(clients, rotation=90 if len(clients) > 8 else 0, fontsize=7 if len(clients) > 20 else 9)
        ax.set_ylabel("examples")
        ax.set_title(title or f"label distribution over {len(clients)} clients")
        if len(names) <= 20:
            ax.legend(fontsize=7, ncol=max(1, len(names) // 10), loc="upper right", framealpha=0.8)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return out
