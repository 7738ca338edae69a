"""Where a run computes (``device``) and in what precision (``precision``).

The tests marked ``gpu`` need CUDA and are skipped without it (``pytest -m gpu`` runs only them).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import test_text_tasks as tt
from conftest import ROOT, SMALL, SYNTH_CFG, TINY_TEXT, client_context, read_summary, run_cli, sets, small_cfg
from pf2lora import checkpoint, plan
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.engines.local import LocalEngine, RunState
from pf2lora.engines.rounds import initial_client, initial_server
from pf2lora.errors import UserError
from pf2lora.methods import registry

tiny_bert, cls_csv, tiny_llama, gen_jsonl = tt.tiny_bert, tt.cls_csv, tt.tiny_llama, tt.gen_jsonl  # the text tasks' fixtures

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (torch.cuda.is_available() is False)")


BF16_METHODS = ["homlora", "pf2lora", "pf2lora-fo"]
"""What the bf16 tolerance was measured on: FedAvg of one adapter, PF2LoRA with the exact
hypergradient (see test_bf16_with_the_finite_difference_estimator_warns), its first-order variant."""

BF16_REL_TOL = 6e-3
"""Per-client test loss, bf16 vs fp32 after 3 rounds, relative: the largest measured difference
(2.05e-3, tiny-text homlora; synthetic 1.9e-3, pf2lora-fo) times 3, on an x86 CPU without AMX.
Measured by this file's test_bf16_test_losses_agree_with_fp32 (it prints the figures with -s)."""


def methods(*names: str) -> str:
    return "methods=[" + ",".join(f'"{n}"' for n in names) + "]"


def per_client(cfg: RunConfig, metric: str) -> dict[str, dict[str, float]]:
    """Method -> client -> ``metric`` after a run of ``cfg`` on the in-process engine."""
    engine = LocalEngine(cfg, plan.build_task(cfg), progress=False)
    return {m: {cid: c[metric] for cid, c in engine.run(m).clients.items()} for m in cfg.methods}


def worst_relative(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> float:
    return max(abs(a[m][c] - b[m][c]) / abs(a[m][c]) for m in a for c in a[m])


# -- the device resolver -----------------------------------------------------------------------------


def test_every_shipped_config_runs_on_cpu():
    paths = sorted((ROOT / "configs").glob("*.toml"))
    assert paths
    for path in paths:
        cfg = plan.load(path, ['device="cpu"'])
        plan.validate(cfg, path.name)
        assert plan.resolve_device(cfg.device) == torch.device("cpu"), path.name
        assert plan.load(path).device in ("auto", "cpu"), f"{path.name}: a shipped config must run on any machine"


def test_auto_is_cuda_when_present_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan.resolve_device("auto") == torch.device("cpu")
    assert plan.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert plan.resolve_device("auto") == plan.resolve_device("cuda") == torch.device("cuda", 0)
    assert plan.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_a_missing_device_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as e:
        plan.resolve_device("cuda", "run.toml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("run.toml: device = 'cuda': CUDA is not available on this machine")
    assert 'use device = "cpu" or "auto"' in msg
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"device = 'cuda:3': this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        plan.resolve_device("cuda:3")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="MPS .* is not available"):
        plan.resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(UserError, match="MPS is not supported yet .*float64"):
        plan.resolve_device("mps")


@pytest.mark.skipif(CUDA, reason="checks the error of a machine without CUDA")
def test_cli_device_cuda_without_cuda_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "run"
    p = run_cli("run", SYNTH_CFG, *sets("device=cuda"), "--out", str(out), "--quiet")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("pf2lora: error: ") and "device = 'cuda': CUDA is not available on this machine" in lines[0]
    assert not out.exists()  # refused before the run directory is made


def test_cli_run_records_the_device(tmp_path):
    out = tmp_path / "run"
    p = run_cli("run", SYNTH_CFG, *sets("rounds=2", "device=cpu"), "--out", str(out), "--quiet")
    assert p.returncode == 0, p.stderr
    summary = read_summary(out)
    assert summary["device"] == "cpu" and summary["device_name"] and summary["precision"] == "fp32"
    assert "device: cpu" in (out / "report.md").read_text()


# -- the task on its device ------------------------------------------------------------------------


def assert_on(cfg: RunConfig, task, device: torch.device) -> None:
    """The task and the initial states of its methods on ``device``; integer state tensors (step
    counts, ranks) stay on the CPU, where they are read."""
    assert task.device == device
    assert all(p.device == device for p in task.model.parameters())
    assert all(v.device == device for c in task.clients for v in [*c.train.values(), *c.test.values()])
    for name in ("pf2lora", "hetlora"):
        method = registry()[name](cfg, task)
        for s in (initial_server(cfg, method), initial_client(cfg, method, task.clients[0].client_id)):
            assert s
            for k, v in s.items():
                assert v.device == (device if v.is_floating_point() else torch.device("cpu")), (name, k)


def test_build_task_puts_model_data_and_states_on_the_device():
    cfg = small_cfg('device="cpu"', methods("pf2lora", "hetlora"))
    task = plan.build_task(cfg)
    assert task.precision == "fp32"
    assert_on(cfg, task, torch.device("cpu"))


# -- checkpoints ---------------------------------------------------------------------------------------


class Stop(Exception):
    pass


def run_checkpointed(cfg: RunConfig, method: str, out: Path, stop_after: int | None = None, resume: RunState | None = None):
    """Run ``method`` with a checkpoint after every round (as the CLI writes it); stop after round
    ``stop_after`` (as a kill would). Returns (the result or None, the last state seen, cloned)."""
    seen: dict[str, RunState] = {}
    out.mkdir(exist_ok=True)

    def on_state(state: RunState) -> None:
        checkpoint.save(out, {"completed": [], "current": asdict(state), "metrics_lines": []})
        seen["last"] = RunState(**asdict(state))  # asdict copies the tensors
        if state.round == stop_after:
            raise Stop

    engine = LocalEngine(cfg, plan.build_task(cfg), progress=False)
    try:
        result = engine.run(method, resume=resume, on_state=on_state)
    except Stop:
        result = None
    return result, seen["last"]


def resume_from(out: Path) -> RunState:
    payload = checkpoint.load(out)
    return RunState(**payload["current"])


def assert_states_equal(a: RunState, b: RunState, rel: float = 0.0) -> None:
    assert a.round == b.round and a.server.keys() == b.server.keys() and a.clients.keys() == b.clients.keys()
    pairs = [(a.server, b.server)] + [(a.clients[c], b.clients[c]) for c in a.clients]
    for x, y in pairs:
        assert x.keys() == y.keys()
        for k in x:
            u, v = x[k].cpu(), y[k].cpu()
            if rel == 0.0:
                assert torch.equal(u, v), k
            else:
                torch.testing.assert_close(u, v, rtol=rel, atol=rel * 1e-2, msg=k)


def test_checkpoint_is_device_independent_and_resumes(tmp_path):
    cfg = small_cfg('device="cpu"', methods("pf2lora"))
    full, final = run_checkpointed(cfg, "pf2lora", tmp_path / "full")
    _, at_2 = run_checkpointed(cfg, "pf2lora", tmp_path / "cut", stop_after=2)
    saved = resume_from(tmp_path / "cut")
    assert all(v.device.type == "cpu" for v in saved.server.values())
    assert all(v.device.type == "cpu" for s in saved.clients.values() for v in s.values())
    assert_states_equal(saved, at_2)
    resumed, final_resumed = run_checkpointed(cfg, "pf2lora", tmp_path / "cut", resume=saved)
    assert_states_equal(final_resumed, final)
    assert resumed is not None and full is not None and resumed.clients == full.clients


def test_cli_resume_may_move_the_run_to_another_device_only(tmp_path):
    from pf2lora.cli import main

    out = tmp_path / "run"
    assert main(["run", SYNTH_CFG, *sets("rounds=1", methods("local")), "--out", str(out), "--quiet"]) == 0
    assert main(["run", "--resume", str(out), *sets("device=cpu"), "--quiet"]) == 0
    assert read_summary(out)["device"] == "cpu"
    assert main(["run", "--resume", str(out), *sets("rounds=3"), "--quiet"]) == 2


# -- precision -----------------------------------------------------------------------------------------


def test_bf16_autocasts_the_base_and_keeps_trained_tensors_float32():
    cfg = plan.load(None, [*TINY_TEXT, 'precision="bf16"', 'device="cpu"', methods("pf2lora"), 'pf2lora.estimator="exact"'])
    task = plan.build_task(cfg)
    seen: list[torch.dtype] = []
    hook = task.model.bert.encoder.layer[0].attention.self.query.base.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    method = registry()["pf2lora"](cfg, task)
    client = task.clients[0]
    ctx = client_context(cfg, task, 0, steps=2)
    update, state = method.client_update(ctx, initial_server(cfg, method), initial_client(cfg, method, client.client_id))
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the frozen base computed in bfloat16
    trained = [*update.shared.values(), *state.values()]
    assert all(v.dtype == torch.float32 for v in trained if v.is_floating_point())  # adapters, heads, AdamW moments
    assert task.loss(st.model_params(update.shared, st.params_of(state)), client.test).dtype == torch.float32


@pytest.mark.parametrize(
    "overrides, metric",
    [((*SMALL,), "test_mse"), ((*TINY_TEXT, "rounds=3"), "loss")],
    ids=["synthetic", "tiny-text"],
)
def test_bf16_test_losses_agree_with_fp32(overrides, metric):
    """bf16 changes the numbers (the base computes in bfloat16), within BF16_REL_TOL after 3 rounds."""
    common = [*overrides, 'device="cpu"', methods(*BF16_METHODS), 'pf2lora.estimator="exact"']
    fp32 = per_client(plan.load(None, [*common, 'precision="fp32"']), metric)
    bf16 = per_client(plan.load(None, [*common, 'precision="bf16"']), metric)
    worst = worst_relative(fp32, bf16)
    print(f"bf16 vs fp32, worst relative difference of the per-client {metric}: {worst:.2e}")
    assert 0.0 < worst < BF16_REL_TOL


@pytest.mark.parametrize("kind", ["text-classification", "generation"])
def test_bf16_on_the_text_tasks(kind, tiny_bert, cls_csv, tiny_llama, gen_jsonl):
    """The pretrained-model tasks (a BERT classifier with a trained head, a causal LM with greedy
    decoding) train and evaluate under bf16, near their fp32 numbers after one round."""

    def make(*extra: str) -> RunConfig:
        if kind == "text-classification":
            return tt.cls_cfg(tiny_bert, cls_csv, *extra)
        return tt.gen_cfg(tiny_llama, gen_jsonl, *extra)

    common = ('device="cpu"', methods("homlora"))
    fp32 = per_client(make(*common, 'precision="fp32"'), "loss")
    bf16 = per_client(make(*common, 'precision="bf16"'), "loss")
    worst = worst_relative(fp32, bf16)
    print(f"{kind}: bf16 vs fp32, worst relative difference of the per-client loss: {worst:.2e}")
    assert 0.0 < worst < BF16_REL_TOL


def test_bf16_with_the_finite_difference_estimator_warns():
    with pytest.warns(UserWarning, match="bfloat16 rounding swamps the finite difference"):
        small_cfg('precision="bf16"', methods("pf2lora"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_cfg('precision="bf16"', methods("pf2lora"), 'pf2lora.estimator="exact"')
        small_cfg('precision="fp32"', methods("pf2lora"))


# -- on a GPU ------------------------------------------------------------------------------------------


@gpu
@needs_cuda
def test_cuda_run_equals_the_cpu_run():
    common = ("rounds=3", methods("homlora", "pf2lora", "pf2lora-fo"))
    cpu = per_client(small_cfg(*common, 'device="cpu"'), "test_mse")
    cuda = per_client(small_cfg(*common, 'device="cuda"'), "test_mse")
    assert worst_relative(cpu, cuda) < 1e-4


@gpu
@needs_cuda
def test_build_task_on_cuda():
    cfg = small_cfg('device="cuda"', methods("pf2lora", "hetlora"))
    task = plan.build_task(cfg)
    assert_on(cfg, task, torch.device("cuda", torch.cuda.current_device()))


@gpu
@needs_cuda
def test_exact_hvps_on_cuda():
    common = (*TINY_TEXT, "rounds=2", methods("pf2lora"), 'pf2lora.estimator="exact"')
    cpu = per_client(plan.load(None, [*common, 'device="cpu"']), "loss")
    cuda = per_client(plan.load(None, [*common, 'device="cuda"']), "loss")
    assert worst_relative(cpu, cuda) < 1e-3


@gpu
@needs_cuda
def test_bf16_on_cuda_agrees_with_fp32():
    common = [*TINY_TEXT, "rounds=3", 'device="cuda"', methods(*BF16_METHODS), 'pf2lora.estimator="exact"']
    fp32 = per_client(plan.load(None, [*common, 'precision="fp32"']), "loss")
    bf16 = per_client(plan.load(None, [*common, 'precision="bf16"']), "loss")
    assert worst_relative(fp32, bf16) < BF16_REL_TOL


@gpu
@needs_cuda
def test_checkpoint_written_on_cuda_resumes_on_cpu(tmp_path):
    on_cuda = small_cfg('device="cuda"', methods("pf2lora"))
    on_cpu = small_cfg('device="cpu"', methods("pf2lora"))
    full, final = run_checkpointed(on_cuda, "pf2lora", tmp_path / "full")
    run_checkpointed(on_cuda, "pf2lora", tmp_path / "cut", stop_after=2)
    saved = resume_from(tmp_path / "cut")
    assert all(v.device.type == "cpu" for v in saved.server.values())
    resumed, final_resumed = run_checkpointed(on_cpu, "pf2lora", tmp_path / "cut", resume=saved)
    assert all(v.device.type == "cpu" for v in final_resumed.server.values())
    assert_states_equal(final_resumed, final, rel=1e-4)
    assert resumed is not None and full is not None
    assert (
        worst_relative(
            {"m": {c: v["test_mse"] for c, v in full.clients.items()}}, {"m": {c: v["test_mse"] for c, v in resumed.clients.items()}}
        )
        < 1e-4
    )


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["text-classification", "generation", "tiny-text"])
@pytest.mark.parametrize("name", ["homlora", "pf2lora"])
def test_local_steps_on_cuda_never_wait_for_the_gpu(kind, name, tiny_bert, cls_csv, tiny_llama, gen_jsonl):
    """A local step queues its kernels and returns: nothing in it reads a value back to the host,
    which would make the host wait for the GPU on every step (CUDA's sync debug mode raises on a
    synchronising call). Padded text batches included (text_data.model_mask: an encoder's mask,
    and a causal LM's)."""
    extra = ('device="cuda"', methods(name), "local_steps=3")
    if kind == "text-classification":
        cfg = tt.cls_cfg(tiny_bert, cls_csv, *extra)
    elif kind == "generation":
        cfg = tt.gen_cfg(tiny_llama, gen_jsonl, *extra)
    else:
        cfg = plan.load(None, [*TINY_TEXT, *extra])
    task = plan.build_task(cfg)
    method = registry()[name](cfg, task)
    trained = {**initial_server(cfg, method), **st.params_of(initial_client(cfg, method, task.clients[0].client_id))}
    ctx, opt = client_context(cfg, task, 0), {}
    method.local_step(ctx, trained, {}, opt)  # the first step builds what is cached (CUDA context, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(cfg.local_steps):
            trained, opt, _ = method.local_step(ctx, trained, {}, opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(bool(torch.isfinite(v).all()) for v in trained.values())


@gpu
@needs_cuda
def test_fused_adamw_on_cuda_is_the_per_tensor_arithmetic():
    """On CUDA the fused divide by a number may round its reciprocal otherwise than the plain one:
    at most a unit in the last place, never more (the CPU's bit-identity is tests/test_optim.py's)."""
    from pf2lora import optim

    gen = torch.Generator().manual_seed(0)
    params = {f"p{i}": torch.randn(8, 64, generator=gen).cuda() for i in range(6)}
    state: dict[str, torch.Tensor] = {}
    per_params, per_state = dict(params), optim.adamw_state(params, {})
    for step in range(5):
        grads = {k: torch.randn(8, 64, generator=gen).cuda() for k in params}
        params, state = optim.adamw(params, grads, state, lr=1e-3)
        new_params: dict[str, torch.Tensor] = {}
        new_state: dict[str, torch.Tensor] = {"step": per_state["step"] + 1}
        for k in per_params:
            new_state[f"t/{k}"] = per_state[f"t/{k}"] + 1
            optim._adamw_one(k, per_params[k], grads[k], per_state, new_params, new_state, 1e-3, (0.9, 0.999), 1e-8, 0.0)
        per_params, per_state = new_params, new_state
        for k in params:
            torch.testing.assert_close(params[k], per_params[k], rtol=2e-7, atol=1e-9, msg=f"step {step}, {k}")
