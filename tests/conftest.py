"""Shared fixtures and helpers: a tiny synthetic configuration every core test can afford to run
many times, the CLI as a subprocess, run-directory readers, and waiting on a subprocess for a state
(a line it prints, a file it writes), never for a fixed time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pf2lora import plan
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.engines.rounds import client_context as engine_context
from pf2lora.methods import ClientContext, registry
from pf2lora.tasks.synthetic import SyntheticRankTask

ROOT = Path(__file__).resolve().parents[1]
SYNTH_CFG = str(ROOT / "configs" / "synthetic_rank.toml")
EXE = Path(sys.executable).with_name("pf2lora")
"""The installed ``pf2lora`` console script of this interpreter's environment."""

# Tiny models run fastest on one thread, and the suite must stay fast on two cores.
torch.set_num_threads(1)

SMALL = [
    "rounds=3",
    "local_steps=2",
    "batch_size=16",
    "task.num_clients=2",
    "task.dim=8",
    "task.shared_rank=2",
    "task.private_ranks=[0,1]",
    "task.train_samples=64",
    "task.test_samples=64",
    "lora.rank=2",
    "lora.alpha=2.0",
    "lora.private_rank=1",
    "lora.private_alpha=1.0",
]

CORE_METHODS = ["centralized", "hetlora", "homlora", "local", "perfedavg", "pf2lora", "pf2lora-fo"]
"""The methods this suite was written against; every registered method is tested generically."""
ALL_METHODS = sorted(registry())


TINY_TEXT = [
    'task.kind="tiny-text"',
    "task.num_clients=3",
    "task.train_samples=64",
    "task.test_samples=32",
    "task.seq_len=12",
    "batch_size=16",
    "local_steps=4",
    "lora.rank=4",
]
"""A small tiny-text run: three clients of 64 examples, 12 tokens each."""


def small_cfg(*overrides: str) -> RunConfig:
    """The tiny config with ``overrides`` applied after it (later keys win)."""
    return plan.load(None, [*SMALL, *overrides])  # as the CLI loads: every cross-module check too


def small_task(*overrides: str) -> tuple[RunConfig, SyntheticRankTask]:
    cfg = small_cfg(*overrides)
    return cfg, SyntheticRankTask(cfg)


@pytest.fixture
def cfg_task() -> tuple[RunConfig, SyntheticRankTask]:
    return small_task()


# Three clients and a smaller test split: what the per-method test files share.
TINY = ("task.num_clients=3", "task.test_samples=32")


def tiny_task(*overrides: str) -> tuple[RunConfig, SyntheticRankTask]:
    """``small_task`` with three clients (so averages differ from any one client's value)."""
    return small_task(*TINY, *overrides)


def client_context(cfg: RunConfig, task, k: int = 0, round_: int = 1, steps: int | None = None, purpose: str = "train") -> ClientContext:
    """Client ``k``'s context for ``round_``, as the engines make it."""
    return engine_context(cfg, task, task.clients[k], round_, purpose, cfg.local_steps if steps is None else steps)


def record_client_updates(monkeypatch, cls, calls: list[dict]) -> None:
    """Wrap ``cls.client_update`` to append, per call, its inputs (copied before the call, so a
    mutation would show) and outputs: round, client, received, state, update, new_state."""
    original = cls.client_update

    def wrapper(self, ctx, received, client_state):
        before_received, before_state = st.clone(received), st.clone(client_state)
        update, new_state = original(self, ctx, received, client_state)
        calls.append(
            {
                "round": ctx.round,
                "client": ctx.client.client_id,
                "received": before_received,
                "state": before_state,
                "update": update,
                "new_state": st.clone(new_state),
            }
        )
        return update, new_state

    monkeypatch.setattr(cls, "client_update", wrapper)


# -- the CLI as a subprocess, and its run directory ---------------------------------------------


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``pf2lora ARGS`` (the installed console script) to completion, output captured as text."""
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run directory, one dict per line (per method and round)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def methods_override(names) -> str:
    """``methods=["a","b"]``: the --set / override that selects ``names``."""
    return "methods=[" + ",".join(f'"{n}"' for n in names) + "]"


def sets(*overrides: str) -> list[str]:
    """``--set A --set B ...``: command-line overrides, one ``--set`` each."""
    return [arg for o in overrides for arg in ("--set", o)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- waiting on a subprocess for a state, never for a fixed time --------------------------------


def wait_for(
    condition: Callable[[], object], what: str, timeout: float = 120, proc: subprocess.Popen | None = None, poll: float = 0.05
) -> object:
    """Poll ``condition()`` until it is truthy and return it; fail with ``what`` after ``timeout``
    seconds (a generous bound for a hung run, not a timing assumption) or as soon as ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"the process exited ({proc.returncode}) before {what}: {err[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """Read ``proc.stderr`` line by line until a line contains ``needle``; the lines read.

    Fails when the process closes stderr (exits) first; a watchdog kills it after ``timeout``."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    seen: list[str] = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if needle in line:
                return seen
    finally:
        watchdog.cancel()
    proc.wait()
    pytest.fail(f"the process exited ({proc.returncode}) without printing {needle!r}: {''.join(seen)[-2000:]}")


HOLD_ENV = "PF2LORA_TEST_HOLD_AFTER"  # = pf2lora.cli.TEST_HOLD_ENV (a test-only hook)


CTRL_C_LIVE = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'pf2lora'; runpy.run_module('pf2lora.cli', run_name='__main__')"
)
"""``python -c`` code running the CLI with Ctrl-C raising KeyboardInterrupt even when this test
process was started with SIGINT ignored (a background job of a non-interactive shell, as a CI
runner may start it): Python leaves an inherited ignored SIGINT ignored, and the Ctrl-C test would
then wait forever."""


def start_run_holding(args: list[str], hold: str, timeout: float = 120) -> subprocess.Popen:
    """``pf2lora run ARGS`` in a subprocess (see :data:`CTRL_C_LIVE`), returned once it holds after ``hold``
    (``METHOD:ROUND``, checkpointed; see ``pf2lora.cli.TEST_HOLD_ENV``): signal it at a known state.
    It cannot finish meanwhile, however fast the machine. stderr stays a pipe for ``communicate``."""
    env = {**os.environ, HOLD_ENV: hold}
    cmd = [sys.executable, "-c", CTRL_C_LIVE, "run", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_line(proc, f"holding after {hold}", timeout)
    except BaseException:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        raise
    return proc


# -- tiny saved models of the real architectures, with offline tokenizers -----------------------


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def save_tiny_roberta(d: Path) -> Path:
    """A saved 1-layer RobertaModel (the classifier head is new, as on roberta-base) with a
    byte-level BPE tokenizer without merges (one token per byte), offline."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *_byte_alphabet(), "<mask>"])}
    RobertaTokenizer(vocab=vocab, merges=[]).save_pretrained(d)
    cfg = RobertaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=160,  # max_length 128 + RoBERTa's position offset
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        RobertaModel(cfg, add_pooling_layer=False).save_pretrained(d)
    return d


def save_tiny_gpt2(d: Path) -> Path:
    """A saved 1-layer GPT2LMHeadModel (Conv1D c_attn, as gpt2-medium) with a byte-level tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    vocab = {t: i for i, t in enumerate([*_byte_alphabet(), "<|endoftext|>"])}
    GPT2Tokenizer(vocab=vocab, merges=[]).save_pretrained(d)
    eos = len(vocab) - 1
    cfg = GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, n_positions=256, bos_token_id=eos, eos_token_id=eos)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(params=[False, True], ids=["per-tensor", "packed"])
def packing(request, monkeypatch) -> bool:
    """Both paths of :func:`pf2lora.state.packs` on a CPU: per tensor (a CPU's) and packed (a GPU's)."""
    monkeypatch.setattr(st, "PACK_ON_CPU", request.param)
    return request.param
