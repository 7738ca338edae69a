"""SecAgg+ rounds on the Flower engines (``server.secure_aggregation = true``, see :mod:`pf2lora.secagg`).

Flower 1.41's ``SecAggPlusWorkflow`` runs only inside the legacy strategy API, so one round goes:

* server (:func:`secure_round`): a :class:`RoundStrategy` (a thin legacy ``Strategy``) whose
  ``configure_fit`` hands the workflow one ``FitIns`` per sampled client: the tensors the method
  broadcast to it, in sorted key order, and a config with pf2lora's own fields (method, run key,
  client, round, the last counted round of that client, the key orders). The workflow runs the
  four SecAgg+ stages over the Grid (through :class:`_StageGrid`: pf2lora's short poll, per-node
  error reasons, byte counts and the reply hook) and hands the unmasked weighted mean to
  ``aggregate_fit``; it comes back as named tensors and the engine gives it to the method's own
  ``aggregate`` as a single update (exact for methods with ``plain_mean_aggregation``).
* client: :func:`pf2lora.engines.flower.client.secure_aggregation_mod` routes the SecAgg+
  messages through Flower's ``secaggplus_mod``; at the masked-vector stage it calls the ClientApp's
  train, which (:meth:`~pf2lora.engines.flower.runtime.ClientRuntime.train`) trains as in normal
  mode, keeps the new private state as pending exactly as in normal mode, checks its own upload
  and replies in the legacy ``FitRes`` record format (:func:`fitres_content`); the mod masks it.

The server never holds one client's upload: only the masked vectors, their sum, and each client's
``num_examples`` and training metrics (which travel in the clear, as in normal mode).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pf2lora import secagg
from pf2lora.engines.flower import env, transport
from pf2lora.engines.flower.channel import Channel
from pf2lora.engines.flower.common import FlowerEngineError
from pf2lora.engines.rounds import trainers
from pf2lora.robust import validate_update

env.apply()

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

if TYPE_CHECKING:
    from pf2lora.engines.flower.server import FlowerServer

log = logging.getLogger("pf2lora.flower")

FITINS = "fitins.config"
"""The config record of a legacy FitIns: a train message in this record format is a SecAgg+ one."""


# -- tensors <-> legacy Parameters, in a fixed key order -------------------------------------------


def to_parameters(tensors: Mapping[str, torch.Tensor], keys: Sequence[str]) -> Parameters:
    arrays = []
    for k in keys:
        t = tensors[k].detach().cpu()
        t = t.to(transport.UPCAST.get(t.dtype, t.dtype))
        arrays.append(np.ascontiguousarray(t.numpy()).copy())
    return ndarrays_to_parameters(arrays)


def from_parameters(parameters: Parameters, keys: Sequence[str], like: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Named tensors from ``parameters`` (in ``keys`` order), cast to the dtypes of ``like``."""
    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(keys):
        raise ValueError(f"expected {len(keys)} arrays, got {len(arrays)}")
    out = {}
    for k, a in zip(keys, arrays, strict=True):
        t = torch.from_numpy(np.array(a, copy=True))
        out[k] = t.to(like[k].dtype) if like is not None and k in like else t
    return out


def fitres_content(upload: Mapping[str, torch.Tensor], keys: Sequence[str], num_examples: int, metrics: dict[str, Any]) -> RecordDict:
    """A client's reply in the legacy FitRes record format ``secaggplus_mod`` reads."""
    res = FitRes(Status(Code.OK, ""), to_parameters(upload, keys), int(num_examples), metrics)
    return compat.fitres_to_recorddict(res, keep_input=True)


def fitins_of(content: RecordDict) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, received tensors) of a SecAgg+ train message."""
    ins = compat.recorddict_to_fitins(content, keep_input=True)
    c = dict(ins.config)
    received = from_parameters(ins.parameters, json.loads(str(c["keys"])))
    for k, dtype in json.loads(str(c.get("dtypes", "{}"))).items():
        if k in received and dtype == str(torch.bfloat16):
            received[k] = received[k].to(torch.bfloat16)
    return c, received


def check_upload(upload: Mapping[str, torch.Tensor], spec: Mapping[str, tuple], keys: Sequence[str], clipping_range: float) -> str | None:
    """The client's own check of its upload before masking (the server cannot see it): the
    expected keys and shapes, finite, inside [-clipping_range, clipping_range]. None if fine."""
    if list(keys) != sorted(spec):
        return "the server's upload key order does not match this client's upload spec"
    reason = validate_update(upload, spec, dtype=None)
    if reason is not None:
        return reason
    for k in keys:
        top = float(upload[k].detach().abs().max()) if upload[k].numel() else 0.0
        if top > clipping_range:
            return (
                f"value {top:.4g} in {k!r} is outside server.secagg_clipping_range = {clipping_range:g} "
                f"(SecAgg+ would clip it): raise server.secagg_clipping_range"
            )
    return None


# -- server ------------------------------------------------------------------------------------------


class RoundStrategy(Strategy):
    """The legacy Strategy SecAgg+ needs, for one round: the FitIns are made in advance (the
    method's own broadcast per client), ``aggregate_fit`` keeps the unmasked mean."""

    def __init__(self, fitins: dict[int, FitIns], grid: Any):
        self.fitins = fitins
        self.grid = grid
        self.results: list[tuple[Any, FitRes]] = []
        self.failures: list[Any] = []
        self.mean: Parameters | None = None

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[tuple[ClientProxy, FitIns]]:
        return [(GridClientProxy(node, self.grid, 0), ins) for node, ins in self.fitins.items()]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Parameters | None, dict]:
        self.results, self.failures = list(results), list(failures)
        # the workflow put the same unmasked weighted mean into every result's parameters
        self.mean = results[0][1].parameters if results else None
        return self.mean, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[float | None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict] | None:
        return None


class _StageGrid:
    """The Grid the workflow talks to: the server's channel (short poll, reply hook), with each
    node's first error reason recorded."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.errors: dict[int, str] = {}

    def get_node_ids(self) -> Iterable[int]:
        return self.channel.grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stage = {m.metadata.dst_node_id: _stage(m) for m in messages}
        replies = self.channel.push_pull(messages, timeout)
        seen = set()
        for r in replies:
            node = r.metadata.src_node_id
            seen.add(node)
            if self.channel.on_reply is not None:
                self.channel.on_reply(f"secagg-{stage.get(node, '?')}", r)
            if r.has_error() and node not in self.errors:
                self.errors[node] = f"SecAgg+ {stage.get(node, '?')} stage: {r.error.reason or 'client error'}"
        for node, name in stage.items():
            if node not in seen and node not in self.errors:
                self.errors[node] = f"SecAgg+ {name} stage: no reply within flower.round_timeout_s"
        return replies


def _stage(msg: Message) -> str:
    try:
        return str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
    except Exception:  # noqa: BLE001
        return "?"


@dataclass
class SecureRound:
    """What one SecAgg+ round gave: the mean (None if the protocol halted), who is in it."""

    mean: dict[str, torch.Tensor] | None
    included: list[str]
    num_examples: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def secure_round(
    server: FlowerServer,
    method: Any,
    round_: int,
    sent: dict[str, dict[str, torch.Tensor]],
    configs: dict[str, dict[str, Any]],
) -> SecureRound:
    """Run one SecAgg+ round over the clients of ``sent`` (client id -> what the method broadcast
    to it; ``configs``: pf2lora's per-client message fields). Returns the weighted mean of their
    uploads (keys and dtypes of ``method.upload_spec``) and who is in it."""
    cfg = server.cfg
    specs = {cid: method.upload_spec(received) for cid, received in sent.items()}
    spec = next(iter(specs.values()))
    if any(s != spec for s in specs.values()):
        raise FlowerEngineError(f"{method.name}: clients would upload different keys or shapes; secure aggregation needs the same for all")
    upload_keys = sorted(spec)
    reference = next(iter(sent.values()))
    weights = [float(d.num_train) for d in trainers(cfg, server.task, method)[0]]
    max_weight = max(1.0, max(weights))
    grid = _StageGrid(server.channel)
    node_to_cid = {server.node_of[cid]: cid for cid in sent}
    fitins = {}
    for cid, received in sent.items():
        keys = sorted(received)
        c = {
            **configs[cid],
            "keys": json.dumps(keys),
            "upload_keys": json.dumps(upload_keys),
            "dtypes": json.dumps(transport.upcast(received)),
            "secagg_clipping_range": float(cfg.server.secagg_clipping_range),
            "secagg_max_weight": float(max_weight),
        }
        fitins[server.node_of[cid]] = FitIns(to_parameters(received, keys), c)
    strategy = RoundStrategy(fitins, server.grid)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=cfg.rounds),
        strategy=strategy,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=secagg.num_shares(cfg),
        reconstruction_threshold=secagg.reconstruction_threshold(cfg),
        max_weight=max_weight,
        clipping_range=float(cfg.server.secagg_clipping_range),
        quantization_range=int(cfg.server.secagg_quantization_range),
        modulus_range=secagg.MODULUS_RANGE,
        timeout=cfg.flower.round_timeout_s or None,
    )
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if level < logging.WARNING and not log.isEnabledFor(logging.DEBUG):
        flwr_log.setLevel(logging.WARNING)  # the workflow logs every stage at INFO
    try:
        workflow(grid, context)  # type: ignore[arg-type]
    finally:
        flwr_log.setLevel(level)
    out = SecureRound(None, [])
    for proxy, res in strategy.results:
        cid = node_to_cid[proxy.node_id]
        metrics = dict(res.metrics)
        if str(metrics.get("client_id", "")) != cid:
            raise FlowerEngineError(f"{method.name} round {round_}: the node of {cid!r} replied as {metrics.get('client_id')!r}")
        out.included.append(cid)
        out.num_examples[cid] = int(res.num_examples)
        loaded = json.loads(str(metrics.get("metrics", "{}")))
        out.metrics[cid] = {k: float(v) for k, v in loaded.items() if isinstance(v, (int, float))}
    order = {cid: i for i, cid in enumerate(sent)}
    out.included.sort(key=order.__getitem__)  # sampling order, as the normal path
    halted = "the SecAgg+ protocol halted (too few clients left for the reconstruction threshold, or fewer than 2)"
    for cid in sent:
        if cid not in out.included:
            out.failed[cid] = grid.errors.get(server.node_of[cid], halted if strategy.mean is None else "SecAgg+ left this client out")
    if strategy.mean is not None:
        mean = from_parameters(strategy.mean, upload_keys, reference)
        for k in upload_keys:
            if tuple(mean[k].shape) != tuple(spec[k]):
                raise FlowerEngineError(
                    f"{method.name} round {round_}: the secure aggregate of {k!r} has shape {tuple(mean[k].shape)}, expected {spec[k]}"
                )
        out.mean = mean
    return out


def out_of_range(mean: Mapping[str, torch.Tensor], clipping_range: float) -> str | None:
    """A mean of values clipped to [-c, c] lies in [-c, c] (up to the quantization error): one
    outside is a malformed masked vector (e.g. a client quantized a NaN). None if in range."""
    slack = clipping_range * (1 + 1e-3)
    for k, v in mean.items():
        if v.numel() and (not bool(torch.isfinite(v).all()) or float(v.abs().max()) > slack):
            return f"the secure aggregate of {k!r} is outside [-c, c] (c = server.secagg_clipping_range): a client sent a malformed masked vector"
    return None
