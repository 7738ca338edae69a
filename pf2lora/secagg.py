"""Secure aggregation (Flower's SecAgg+): which runs may use it, its parameters, its error bound.

Engine-agnostic and free of Flower imports: config validation and the CLI use it. The protocol
itself runs in :mod:`pf2lora.engines.flower.secagg`.

With ``server.secure_aggregation = true`` the server learns only the ``num_examples``-weighted
mean of a round's uploads, never one client's upload. So it is allowed only where nothing else
needs the individual uploads:

* every method must declare ``Method.plain_mean_aggregation`` (its ``aggregate`` uses the uploads
  only through their weighted mean);
* no robust aggregator (median, trimmed mean), no ``server.clip_norm``, no client-level DP (each
  needs every upload on the server), no ``faults.deadline_s`` (leaving a late upload out of the
  sum needs it apart);
* at least 2 clients per round, and only on the Flower engines (the local engine has no SecAgg+).
"""

from __future__ import annotations

from collections.abc import Sequence

from pf2lora.config import RunConfig
from pf2lora.errors import UserError

MODULUS_RANGE = 2**32
"""Flower's default mask modulus: the masked sums live in Z / 2**32."""
ENGINES = ("flower-sim", "flower-deploy")
"""Engines that run SecAgg+."""


def clients_per_round(cfg: RunConfig) -> int:
    """Clients sampled each round (as :func:`pf2lora.engines.local.sample_clients` picks them)."""
    return min(cfg.task.num_clients, max(1, round(cfg.client_fraction * cfg.task.num_clients)))


def _count_or_fraction(value: float) -> int | float:
    """Flower's convention: a float is a fraction, an int a count; ours: <= 1 is a fraction."""
    return float(value) if value <= 1 else int(value)


def num_shares(cfg: RunConfig) -> int | float:
    return _count_or_fraction(cfg.server.secagg_num_shares)


def reconstruction_threshold(cfg: RunConfig) -> int | float:
    return _count_or_fraction(cfg.server.secagg_reconstruction_threshold)


def check_config(cfg: RunConfig, not_plain_mean: Sequence[str], source: str = "config") -> None:
    """Raise :class:`UserError` (one line) if ``cfg`` asks for secure aggregation where it cannot
    run. ``not_plain_mean``: the run's methods that do not declare ``plain_mean_aggregation``."""
    if not cfg.server.secure_aggregation:
        return
    where = f"{source}: server.secure_aggregation = true"
    bad = list(not_plain_mean)
    if bad:
        raise UserError(
            f"{where} needs methods whose aggregation is a plain weighted mean of the uploads (the server sees only that "
            f"mean); not: {', '.join(bad)}"
        )
    sc = cfg.server
    refused = [
        (sc.aggregator != "mean", f"server.aggregator = {sc.aggregator!r} (it needs every upload; use 'mean')"),
        (sc.clip_norm > 0, "server.clip_norm > 0 (clipping needs every upload)"),
        (sc.dp_noise_multiplier > 0, "server.dp_noise_multiplier > 0 (client-level DP clips every upload on the server)"),
        (cfg.faults.deadline_s > 0, "faults.deadline_s > 0 (leaving a late upload out of the sum needs it apart)"),
    ]
    for hit, why in refused:
        if hit:
            raise UserError(f"{where} cannot be combined with {why}")
    k = clients_per_round(cfg)
    if k < 2:
        raise UserError(f"{where} needs at least 2 clients per round (task.num_clients x client_fraction gives {k})")
    shares, threshold = sc.secagg_num_shares, sc.secagg_reconstruction_threshold
    if shares > 1 and (shares != int(shares) or shares < 3 or shares > k):
        raise UserError(f"{where}: server.secagg_num_shares as a count must be an integer in 3..{k} (clients per round), got {shares:g}")
    if threshold > 1 and threshold != int(threshold):
        raise UserError(f"{where}: server.secagg_reconstruction_threshold as a count must be an integer, got {threshold:g}")
    share_count = int(shares) if shares > 1 else None
    if threshold > 1 and share_count is not None and threshold >= share_count:
        raise UserError(
            f"{where}: server.secagg_reconstruction_threshold ({threshold:g}) must be below server.secagg_num_shares ({shares:g})"
        )
    if threshold > 1 and threshold > k:
        raise UserError(f"{where}: server.secagg_reconstruction_threshold ({threshold:g}) exceeds the {k} clients per round")
    if sc.secagg_quantization_range * k >= MODULUS_RANGE:
        raise UserError(
            f"{where}: server.secagg_quantization_range x clients per round ({sc.secagg_quantization_range} x {k}) must stay "
            f"below 2**32, else the masked sum overflows"
        )


def check_engine(cfg: RunConfig, engine: str) -> None:
    """Refuse secure aggregation on an engine that has none (the local engine)."""
    if cfg.server.secure_aggregation and engine not in ENGINES:
        raise UserError(
            f"server.secure_aggregation = true needs --engine flower-sim or flower-deploy (Flower's SecAgg+); the {engine} "
            f"engine has no secure aggregation"
        )


def error_bound(clipping_range: float, quantization_range: int, weights: Sequence[float]) -> float:
    """Largest difference, per value, between the SecAgg+ mean and the exact weighted mean of the
    same uploads, when every value lies in [-c, c].

    Client k multiplies its values by r_k = round(Q w_k / w_max) / Q (its weight, quantized) and
    rounds them stochastically to the grid of step 2c / Q: an error below one step each. The
    server divides the sum by sum r_k, so the rounding adds less than K (2c / Q) / sum r_k; the
    weights' own rounding (|r_k - w_k / w_max| <= 1 / 2Q, values at most 2c from the mean) adds
    less than K c / (Q sum r_k). Together: 3 K c / (Q sum_k w_k / w_max), e.g. 5.7e-6 for equal
    weights with the defaults (c = 8, Q = 2**22).
    """
    if not weights or max(weights) <= 0:
        raise ValueError("error_bound needs positive weights")
    top = max(weights)
    # sum r_k >= sum (w_k / w_max - 1 / 2Q)
    total = sum(w / top for w in weights) - len(weights) / (2 * quantization_range)
    return 3.0 * len(weights) * clipping_range / (quantization_range * total)
