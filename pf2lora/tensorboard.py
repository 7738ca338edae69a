"""A run's metrics as TensorBoard scalars, for users who watch training there (as Flower,
FederatedScope and the HF Trainer let them).

Every numeric field of a ``metrics.jsonl`` record becomes a scalar at step = its round, under
``RUN/tb/METHOD/`` (one TensorBoard run per method): ``train_loss``, the bytes per client, the
fault counts, and after an evaluation round (and the final one) ``eval/<metric>`` (the clients' means). A resumed
run rewrites the directory from the checkpoint's records, so no step is logged twice.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pf2lora.errors import UserError

DIRNAME = "tb"
INSTALL = "pip install 'pf2lora[tensorboard]' (or make install)"


def scalars(record: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) of every finite number in ``record`` (``eval_means`` as ``eval/<metric>``)."""
    for key, value in record.items():
        if key in ("round", "method", "eval"):
            continue
        if key == "eval_means" and isinstance(value, Mapping):
            for name, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                    yield f"eval/{name}", float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            yield key, float(value)
        elif isinstance(value, list) and key in ("dropped", "crashed", "late", "rejected"):
            yield f"faults/{key}", float(len(value))


def require() -> None:
    """One line, before any work, when the tensorboard package is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(f"log.tensorboard / --tensorboard needs the tensorboard package: {INSTALL}")


class ScalarLog:
    """Writes records as they come; ``close`` flushes every method's event file."""

    def __init__(self, run_dir: str | Path, records: Iterable[Mapping[str, Any]] = ()):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(f"log.tensorboard / --tensorboard needs the tensorboard package: {INSTALL}") from None
        self._writer_cls = SummaryWriter
        self.root = Path(run_dir) / DIRNAME
        shutil.rmtree(self.root, ignore_errors=True)  # a resumed run logs its saved records again
        self._writers: dict[str, Any] = {}
        for record in records:
            self.add(record, flush=False)
        self.flush()

    def add(self, record: Mapping[str, Any], *, flush: bool = True) -> None:
        method = str(record["method"])
        writer = self._writers.get(method)
        if writer is None:
            writer = self._writers[method] = self._writer_cls(log_dir=str(self.root / method))
        for tag, value in scalars(record):
            writer.add_scalar(tag, value, global_step=int(record["round"]))
        if flush:
            writer.flush()

    def add_final(self, results: Iterable[Any], rounds: int) -> None:
        """Each method's final evaluation (``eval/<metric>`` at step ``rounds``): the per-round
        records carry only the evaluations before the last round."""
        from pf2lora.engines.rounds import eval_means

        for result in results:
            self.add({"method": result.method, "round": rounds, "eval_means": eval_means(result.clients)})

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
