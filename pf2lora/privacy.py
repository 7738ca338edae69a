"""Client-level differential privacy of the shared update (DP-FedAvg, trusted server).

The Gaussian mechanism of McMahan et al. 2018 ("Learning differentially private recurrent
language models"): each participating client's delta ``update - reference`` is clipped to L2 norm
``C``, the m clipped deltas are averaged with uniform weights, and Gaussian noise of std
``z * C / m`` is added to every coordinate of the average (noise ``z * C`` on the sum, whose
sensitivity to adding or removing one client is ``C``). The server is trusted: it sees the raw
uploads, the released model is what is private.

:class:`PrivacyAccountant` tracks the spent ``(epsilon, delta)`` with Opacus' RDP accountant,
one step per round at the client sampling rate. Two stated assumptions of that bound: the
accountant assumes Poisson client sampling with rate ``sample_rate`` (a fixed-size sample, as the
in-process engine draws, is the usual approximation), and the noise is calibrated to the number
of participants actually aggregated, ``m``.

Pure functions over dicts of named tensors; no engine or Flower import. Opacus is imported only
when an accountant is created (it is slow to import).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pf2lora.config import ServerConfig
from pf2lora.robust import Tensors, clip_update


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def dp_aggregate(
    reference: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> Tensors:
    """``reference + mean_k clip(update_k - reference, clip_norm) + N(0, (noise_multiplier *
    clip_norm / m)^2)`` per coordinate, m = ``len(updates)``.

    Noise is drawn from ``generator`` (a CPU ``torch.Generator``) key by key in sorted key order,
    so a run is reproducible; ``noise_multiplier=0`` draws nothing and returns the clipped mean.
    Raises ``ValueError`` for no updates, a bad ``clip_norm`` / ``noise_multiplier``, or updates
    whose keys or shapes differ from ``reference``. Nothing is mutated.
    """
    if not updates:
        raise ValueError("dp_aggregate needs at least one update")
    if not (_finite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    if not (_finite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    for k, v in reference.items():
        if not v.is_floating_point():
            raise ValueError(f"dp_aggregate: reference key {k!r} has non-floating dtype {v.dtype}")
    m = len(updates)
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in reference.items()}
    for u in updates:
        clipped, _ = clip_update(u, reference, clip_norm)
        for k in total:
            total[k] += (clipped[k] - reference[k].detach()).to(torch.float64)
    std = noise_multiplier * clip_norm / m
    out: Tensors = {}
    for k in sorted(total):
        ref = reference[k].detach()
        mean_delta = total[k] / m
        if std > 0:
            noise = torch.randn(ref.shape, generator=generator, dtype=torch.float64, device=generator.device)
            mean_delta = mean_delta + std * noise.to(mean_delta.device)
        out[k] = ref + mean_delta.to(ref.dtype)
    return {k: out[k] for k in reference}


def _rdp_accountant() -> Any:
    """A fresh ``opacus.accountants.RDPAccountant``, imported late (importing opacus takes seconds).

    Importing opacus calls ``logging.basicConfig`` (a root stderr handler, which would turn any
    later ``basicConfig`` of ours into a no-op); the root logger's handlers are restored.
    """
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        from opacus.accountants import RDPAccountant
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
    return RDPAccountant()


class PrivacyAccountant:
    """(epsilon, delta) spent by DP-FedAvg rounds, by Opacus' RDP accountant.

    ``step()`` once per aggregated round; ``epsilon()`` the spent epsilon at ``delta``.
    ``state_dict()`` is plain Python (floats, ints, lists) for checkpoints; ``load_state_dict``
    restores the history (which records each step's noise multiplier and rate, so a resumed run
    with other settings still composes correctly).
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float):
        if not (_finite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be a finite number > 0 for accounting, got {noise_multiplier!r}")
        if not (_finite(sample_rate) and 0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if not (_finite(delta) and 0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self._accountant = _rdp_accountant()

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self._accountant.history)

    def step(self) -> None:
        """Record one round of the Gaussian mechanism."""
        self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self, delta: float | None = None) -> float:
        """The epsilon spent so far at ``delta`` (default: the accountant's); 0.0 before any step."""
        d = self.delta if delta is None else delta
        if not (_finite(d) and 0 < d < 1):
            raise ValueError(f"delta must be in (0, 1), got {d!r}")
        if not self._accountant.history:
            return 0.0
        return float(self._accountant.get_epsilon(delta=d))

    def state_dict(self) -> dict[str, Any]:
        return {
            "mechanism": "rdp",
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "history": [[float(z), float(q), int(n)] for z, q, n in self._accountant.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history of :meth:`state_dict` (this accountant's settings are kept)."""
        if not isinstance(state, Mapping) or "history" not in state:
            raise ValueError("privacy accountant state must be a mapping with a 'history' list")
        if state.get("mechanism", "rdp") != "rdp":
            raise ValueError(f"privacy accountant state is for mechanism {state.get('mechanism')!r}, not 'rdp'")
        history = state["history"]
        if not isinstance(history, (list, tuple)):
            raise ValueError("privacy accountant 'history' must be a list of [noise_multiplier, sample_rate, steps]")
        restored: list[tuple[float, float, int]] = []
        for i, entry in enumerate(history):
            ok = isinstance(entry, (list, tuple)) and len(entry) == 3
            if ok:
                z, q, n = entry
                ok = _finite(z) and z > 0 and _finite(q) and 0 < q <= 1 and isinstance(n, int) and not isinstance(n, bool) and n >= 1
            if not ok:
                raise ValueError(
                    f"privacy accountant history entry {i} is not [noise_multiplier > 0, sample_rate in (0, 1], steps >= 1]: {entry!r}"
                )
            restored.append((float(z), float(q), int(n)))
        self._accountant.history = restored


# -- a run's accounting (every engine charges rounds the same way) ---------------------------------


def accountant_for(server: ServerConfig, sample_rate: float) -> PrivacyAccountant | None:
    """The client-level DP accountant of a run, or None when it adds no DP noise."""
    if server.dp_noise_multiplier <= 0:
        return None
    return PrivacyAccountant(server.dp_noise_multiplier, sample_rate, server.dp_delta)


def charge_round(accountant: PrivacyAccountant | None, record: dict[str, Any]) -> None:
    """Charge one round to ``accountant`` (if any) and note the epsilon spent so far in ``record``."""
    if accountant is not None:
        accountant.step()
        record["dp_epsilon"] = accountant.epsilon()


def report(server: ServerConfig, accountant: PrivacyAccountant, rounds: Sequence[Mapping[str, Any]], num_rounds: int) -> dict[str, Any]:
    """The ``privacy`` entry of a method's result: the budget spent and how it was spent."""
    return {
        "epsilon": accountant.epsilon(),
        "delta": server.dp_delta,
        "noise_multiplier": server.dp_noise_multiplier,
        "clip_norm": server.dp_clip_norm,
        "sample_rate": accountant.sample_rate,
        "rounds": num_rounds,
        "epsilon_per_round": [r.get("dp_epsilon") for r in rounds],
    }
