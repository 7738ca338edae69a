"""What pf2lora's Flower messages hold, as typed contents: one class per message kind, each with
the one function that writes it into a Flower ``RecordDict`` and the one that reads it back.

The server (:mod:`.server`), the strategy (:mod:`.strategy`), SecAgg+ (:mod:`.secagg`) and the
nodes (:mod:`.runtime`) read and write messages only through these classes, so the field names
below are the whole wire format: a record ``"config"`` with the scalars and a record ``"arrays"``
with the tensors (numpy arrays only, no pickle; see :mod:`.transport`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pf2lora import state as st
from pf2lora.engines.flower import env, transport

env.apply()

from flwr.app import ConfigRecord, RecordDict

CONFIG, ARRAYS = "config", "arrays"
"""The two records of a message's content."""

Tensors = dict[str, torch.Tensor]


class MalformedReply(ValueError):
    """A reply whose fields are present but wrong (the message says what)."""


def _config(content: RecordDict) -> ConfigRecord:
    return content[CONFIG]  # type: ignore[return-value]


@dataclass(frozen=True)
class Instruction:
    """What every train / evaluate message tells a node: which method, run and client, the round,
    the tensors the method broadcast to that client, and the last round whose training the server
    counted for the client whose state is used (the node commits that round's pending state)."""

    method: str
    run_key: str
    client_id: str
    round: int
    accepted_round: int
    received: Tensors

    def fields(self) -> dict[str, Any]:
        """The scalar fields (SecAgg+ carries them in its legacy FitIns config)."""
        return {
            "method": self.method,
            "run_key": self.run_key,
            "client_id": self.client_id,
            "round": self.round,
            "accepted_round": self.accepted_round,
        }

    def content(self) -> RecordDict:
        arrays, dtypes = transport.to_record(self.received)
        return RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({**self.fields(), "dtypes": dtypes})})

    @staticmethod
    def _read(c: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "method": str(c["method"]),
            "run_key": str(c["run_key"]),
            "client_id": str(c["client_id"]),
            "round": int(c["round"]),
            "accepted_round": int(c.get("accepted_round", -1)),
        }


EVALUATION = "evaluation"
"""The record of a train reply that also carries an evaluation (see :attr:`TrainIns.evaluate_round`)."""


@dataclass(frozen=True)
class TrainIns(Instruction):
    """Train ``client_id`` on ``received`` (``inject_crash``: an injected fault, for tests).

    ``evaluate_round`` >= 0: first evaluate ``client_id`` on ``received`` with its state, as the
    evaluation after that round (the server's state has not changed since: what a client is sent
    to train in round R+1 is what it would be sent to evaluate after round R). One message per
    round instead of two; the reply carries both (:data:`EVALUATION`)."""

    inject_crash: bool = False
    evaluate_round: int = -1

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "inject_crash": self.inject_crash, "evaluate_round": self.evaluate_round}

    @classmethod
    def parse(cls, content: RecordDict) -> TrainIns:
        c = _config(content)
        received = transport.from_record(content[ARRAYS], str(c.get("dtypes", "{}")))  # type: ignore[arg-type]
        return cls(
            **cls._read(c),
            received=received,
            inject_crash=bool(c.get("inject_crash", False)),
            evaluate_round=int(c.get("evaluate_round", -1)),  # type: ignore[arg-type]
        )

    @classmethod
    def from_fields(cls, c: Mapping[str, Any], received: Tensors) -> TrainIns:
        """The instruction of a SecAgg+ train message (its fields in the legacy config)."""
        return cls(**cls._read(c), received=received, inject_crash=bool(c.get("inject_crash", False)))


def with_evaluate_round(content: RecordDict, round_: int) -> RecordDict:
    """A train message's content asking the node to evaluate first, as the evaluation after
    ``round_`` (:attr:`TrainIns.evaluate_round`): a new content sharing the tensors, which are
    not serialized again."""
    config = ConfigRecord({**_config(content), "evaluate_round": round_})
    return RecordDict({**content, CONFIG: config})


@dataclass(frozen=True)
class EvaluateIns(Instruction):
    """Evaluate client ``client_id`` with the state of ``state_of`` (a pooled method's clients are
    all evaluated with the pooled client's state)."""

    state_of: str = ""

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "state_of": self.state_of or self.client_id}

    @classmethod
    def parse(cls, content: RecordDict) -> EvaluateIns:
        c = _config(content)
        received = transport.from_record(content[ARRAYS], str(c.get("dtypes", "{}")))  # type: ignore[arg-type]
        return cls(**cls._read(c), received=received, state_of=str(c["state_of"]))


@dataclass(frozen=True)
class TrainReply:
    """A client's upload (``shared:`` tensors only) with its example count, training metrics and
    the seconds its training took."""

    client_id: str
    upload: Tensors
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    took_s: float = 0.0

    def content(self) -> RecordDict:
        arrays, dtypes = transport.to_record(st.outgoing(self.upload))  # the one gate: raises on any private tensor
        return RecordDict(
            {
                ARRAYS: arrays,
                CONFIG: ConfigRecord(
                    {
                        "client_id": self.client_id,
                        "num_examples": int(self.num_examples),
                        "took_s": float(self.took_s),
                        "metrics": transport.dumps(self.metrics),
                        "dtypes": dtypes,
                    }
                ),
            }
        )

    @classmethod
    def parse(cls, content: RecordDict) -> TrainReply:
        """The reply as sent; raises MalformedReply (or a KeyError / TypeError) on a malformed one."""
        c = _config(content)
        upload = transport.from_record(content[ARRAYS], str(c.get("dtypes", "{}")))  # type: ignore[arg-type]
        metrics = transport.loads(str(c.get("metrics", "{}")))
        if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
            raise MalformedReply("malformed metrics in the reply")
        raw_num = c["num_examples"]
        if isinstance(raw_num, list):
            raise TypeError(f"num_examples is a list: {raw_num!r}")
        num = int(raw_num)
        if num < 0:
            raise MalformedReply(f"negative num_examples {num}")
        took_s = c.get("took_s", 0.0)
        if isinstance(took_s, list):
            raise TypeError(f"took_s is a list: {took_s!r}")
        return cls(str(c["client_id"]), upload, num, {k: float(v) for k, v in metrics.items()}, float(took_s))


@dataclass(frozen=True)
class EvaluateReply:
    """One client's personalised and global metrics."""

    client_id: str
    metrics: dict[str, Any]

    def record(self) -> ConfigRecord:
        return ConfigRecord({"client_id": self.client_id, "metrics": transport.dumps(self.metrics)})

    def content(self) -> RecordDict:
        return RecordDict({CONFIG: self.record()})

    @classmethod
    def parse(cls, content: RecordDict) -> EvaluateReply:
        """An evaluate reply, or the evaluation a train reply carries (:data:`EVALUATION`)."""
        c: Any = content[EVALUATION] if EVALUATION in content else _config(content)
        return cls(str(c["client_id"]), transport.loads(str(c["metrics"])))


@dataclass(frozen=True)
class TrainFailure:
    """In place of the upload: why a client's training failed after the evaluation its train
    message asked for first succeeded (the reply still carries that evaluation)."""

    client_id: str
    reason: str

    def content(self) -> RecordDict:
        return RecordDict({CONFIG: ConfigRecord({"client_id": self.client_id, "train_error": self.reason})})

    @classmethod
    def parse(cls, content: RecordDict) -> TrainFailure | None:
        """The failure a train reply reports, or None if it reports none."""
        c = _config(content)
        return cls(str(c.get("client_id", "")), str(c["train_error"])) if "train_error" in c else None


def claimed_client(content: RecordDict) -> str | None:
    """The client a reply says it comes from (None if it names none)."""
    try:
        return str(_config(content)["client_id"])
    except Exception:  # noqa: BLE001 - a malformed reply names no client
        return None
