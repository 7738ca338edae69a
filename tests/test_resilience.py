"""Long runs that survive: checkpoint/resume after SIGKILL, Ctrl-C, client faults, poisoned updates,
a full disk. These drive the real CLI (in-process or as a subprocess) on a small synthetic config."""

from __future__ import annotations

import errno
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import SYNTH_CFG as CFG
from conftest import read_metrics, read_summary, sets, start_run_holding
from pf2lora import checkpoint
from pf2lora.cli import main

SMALL_OVERRIDES = [
    "task.train_samples=64",
    "task.test_samples=64",
    "task.dim=8",
    "task.shared_rank=2",
    "task.private_ranks=[0,1]",
    "task.num_clients=4",
    "lora.rank=2",
    "lora.alpha=2.0",
    "lora.private_rank=1",
    "lora.private_alpha=1.0",
    "batch_size=16",
    "local_steps=3",
]
SMALL = sets(*SMALL_OVERRIDES)


def _summary_metrics(path: Path) -> dict:
    """summary.json without what legitimately differs between runs (wall time, machine)."""
    s = read_summary(path)
    s.pop("machine", None)
    for m in s["methods"].values():
        m.pop("wall_time_s", None)
    return s


def _assert_close(a, b, where=""):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _run(args: list[str]) -> int:
    return main(["run", CFG, *SMALL, "--quiet", *args])


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """A real `pf2lora run` killed with SIGKILL mid-run resumes to the same summary (1e-6)."""
    methods = '["pf2lora","hetlora","fdlora"]'
    rounds = "50"
    ref = tmp_path / "ref"
    assert _run(["--set", f"methods={methods}", "--set", f"rounds={rounds}", "--out", str(ref)]) == 0

    killed = tmp_path / "killed"
    # The run holds right after checkpointing hetlora's round 10 (the second method, mid-way): the
    # kill lands at that state, not wherever a timer happens to find the run.
    proc = start_run_holding(
        [CFG, *SMALL, "--quiet", "--set", f"methods={methods}", "--set", f"rounds={rounds}", "--out", str(killed)], hold="hetlora:10"
    )
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists()
    assert main(["run", "--resume", str(killed), "--quiet"]) == 0
    _assert_close(_summary_metrics(ref), _summary_metrics(killed))
    ref_lines = (ref / "metrics.jsonl").read_text().splitlines()
    got_lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(ref_lines) == len(got_lines) == 3 * int(rounds)
    assert ref_lines == got_lines


def test_ctrl_c_checkpoints_and_prints_how_to_resume(tmp_path):
    out = tmp_path / "run"
    # Held after round 3 is checkpointed: the run cannot finish before the interrupt lands.
    proc = start_run_holding(
        [CFG, *SMALL, "--quiet", "--set", 'methods=["pf2lora"]', "--set", "rounds=400", "--out", str(out)], hold="pf2lora:3"
    )
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    err = proc.stderr.read()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"pf2lora run --resume {out}" in err
    state = checkpoint.load(out)
    assert state["current"]["method"] == "pf2lora" and state["current"]["round"] == 3
    assert main(["run", "--resume", str(out), "--quiet", "--set", "rounds=2"]) == 2  # no --set on resume


def test_dropout_is_reported_and_run_completes(tmp_path):
    out = tmp_path / "run"
    assert (
        _run(["--set", 'methods=["pf2lora","homlora"]', "--set", "rounds=12", "--set", "faults.dropout_prob=0.3", "--out", str(out)]) == 0
    )
    s = read_summary(out)
    part = s["methods"]["pf2lora"]["participation"]
    assert len(part) == 12 and min(part) < 4 and all(p >= 1 for p in part)
    dropped = [f for f in s["methods"]["pf2lora"]["faults"] if f["fault"] == "dropped"]
    assert len(dropped) == 12 * 4 - sum(part)
    lines = read_metrics(out)
    assert any("dropped" in r for r in lines)


def test_crashing_client_is_recorded_not_averaged(tmp_path):
    out = tmp_path / "run"
    assert _run(["--set", 'methods=["homlora"]', "--set", "rounds=6", "--set", "faults.crash_prob=0.4", "--out", str(out)]) == 0
    s = read_summary(out)
    crashed = [f for f in s["methods"]["homlora"]["faults"] if f["fault"] == "crashed"]
    assert crashed and all("InjectedCrash" in f["reason"] for f in crashed)
    assert sum(s["methods"]["homlora"]["participation"]) == 6 * 4 - len(crashed)


def test_straggler_beyond_deadline_is_left_out(tmp_path):
    out = tmp_path / "run"
    assert (
        _run(
            [
                *sets(
                    'methods=["homlora"]', "rounds=5", "faults.straggler_prob=0.5", "faults.straggler_delay_s=100", "faults.deadline_s=50"
                ),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    s = read_summary(out)
    late = [f for f in s["methods"]["homlora"]["faults"] if f["fault"] == "late"]
    assert late and sum(s["methods"]["homlora"]["participation"]) == 5 * 4 - len(late)


def test_too_few_clients_fails_loudly_and_keeps_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    rc = _run(
        [
            *sets('methods=["homlora"]', "rounds=30", "faults.dropout_prob=0.6", "server.min_clients=4"),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "min_clients" in err[0] and "round" in err[0]
    assert not (out / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean"])
def test_nan_and_scaled_attackers_do_not_poison_the_shared_adapter(tmp_path, aggregator):
    """1 NaN client (rejected by validation) and 1 client scaling its change by 1e6 out of 8."""
    common = [
        *sets("task.num_clients=8", 'methods=["homlora","pf2lora"]', "rounds=15", "server.trim_fraction=0.25"),
    ]  # trims 2 of 8 per side; 0.1 would trim nothing
    clean = tmp_path / "clean"
    assert _run([*common, "--set", f"server.aggregator={aggregator}", "--out", str(clean)]) == 0
    attacked = tmp_path / "attacked"
    assert (
        _run(
            [
                *common,
                *sets(f"server.aggregator={aggregator}", 'faults.poison_clients=["client_1"]', "faults.poison=nan"),
                "--out",
                str(tmp_path / "nan_only"),
            ]
        )
        == 0
    )
    assert (
        _run(
            [
                *common,
                *sets(f"server.aggregator={aggregator}", 'faults.poison_clients=["client_1","client_5"]', "faults.poison=scale"),
                "--out",
                str(attacked),
            ]
        )
        == 0
    )
    nan_run = read_summary(tmp_path / "nan_only")
    for m in nan_run["methods"].values():
        assert m["rejected_clients"] == ["client_1"]
        assert {f["round"] for f in m["faults"] if f["fault"] == "rejected"} == set(range(1, 16))
    s_clean = read_summary(clean)
    s_att = read_summary(attacked)
    for name in ("homlora", "pf2lora"):
        honest = [c for c in s_att["methods"][name]["clients"] if c not in ("client_1", "client_5")]
        for cid in honest:
            a = s_att["methods"][name]["clients"][cid]["test_mse"]
            b = s_clean["methods"][name]["clients"][cid]["test_mse"]
            assert math.isfinite(a) and a < 1.5 * b + 0.01, (name, cid, a, b)


def test_scaled_attacker_breaks_plain_mean_without_defences(tmp_path):
    """The attack above is real: with the plain mean the honest clients' error explodes."""
    out = tmp_path / "att"
    assert (
        _run(
            [
                *sets("task.num_clients=8", 'methods=["homlora"]', "rounds=5", 'faults.poison_clients=["client_5"]', "faults.poison=scale"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    s = read_summary(out)
    assert s["methods"]["homlora"]["mean"]["test_mse"] > 100


def test_clipping_defends_the_mean(tmp_path):
    out = tmp_path / "clip"
    assert (
        _run(
            [
                *sets(
                    "task.num_clients=8",
                    'methods=["homlora"]',
                    "rounds=15",
                    'faults.poison_clients=["client_5"]',
                    "faults.poison=scale",
                    "server.clip_norm=0.5",
                ),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    s = read_summary(out)
    assert s["methods"]["homlora"]["mean"]["test_mse"] < 1.0


def test_diverging_client_is_excluded_and_restored(tmp_path):
    """A NaN training loss is detected; the client is excluded and its private state kept."""
    from pf2lora import config
    from pf2lora.engines.local import LocalEngine
    from pf2lora.tasks.synthetic import SyntheticRankTask

    cfg = config.load(CFG, [*SMALL_OVERRIDES, "rounds=3", 'methods=["pf2lora"]'])
    task = SyntheticRankTask(cfg)
    task.clients[2].train["targets"][:, 0] = float("nan")  # client_2 diverges: every batch has a NaN target
    engine = LocalEngine(cfg, task, progress=False)
    snapshots = []
    result = engine.run("pf2lora", on_state=lambda rs: snapshots.append({k: v.clone() for k, v in rs.clients["client_2"].items()}))
    rejected = [f for f in result.faults if f["fault"] == "rejected"]
    assert {f["client"] for f in rejected} == {"client_2"} and len(rejected) == 3
    assert all("non-finite" in f["reason"] for f in rejected)
    first = snapshots[0]
    assert all(torch.isfinite(v).all() for v in first.values())
    assert all(torch.equal(first[k], snapshots[-1][k]) for k in first)  # restored each round: never changes
    assert all(math.isfinite(c["test_mse"]) for cid, c in result.clients.items() if cid != "client_2")


def test_full_disk_gives_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    rc = _run(["--set", 'methods=["homlora"]', "--set", "rounds=10", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "No space left on device" in err[0] and "intact" in err[0]
    monkeypatch.setattr(torch, "save", real_save)
    state = checkpoint.load(out)
    assert state["current"]["round"] == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint")]  # no temp files left


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    rc = _run(["--out", str(ro / "run")])
    assert rc == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_unwritable_output_directory_as_root_safe(tmp_path, capsys, monkeypatch):
    """Same as above for root (which ignores permissions): a failing probe write is a clear error."""
    import tempfile

    def refuse(*a, **k):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    rc = _run(["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Permission denied" in err[0]


def test_resume_of_a_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text("")
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["run", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint" in err[0]


@pytest.mark.slow
def test_client_level_dp_reports_epsilon_per_round(tmp_path):
    out = tmp_path / "dp"
    plain = tmp_path / "plain"
    common = ["--set", 'methods=["homlora","pf2lora"]', "--set", "rounds=6"]
    assert _run([*common, "--set", "server.dp_noise_multiplier=1.0", "--set", "server.dp_clip_norm=0.5", "--out", str(out)]) == 0
    assert _run([*common, "--out", str(plain)]) == 0
    s = read_summary(out)
    p = read_summary(plain)
    for name in ("homlora", "pf2lora"):
        priv = s["methods"][name]["privacy"]
        eps = priv["epsilon_per_round"]
        assert len(eps) == 6 and all(b > a > 0 for a, b in zip(eps, eps[1:]))
        assert priv["epsilon"] == eps[-1] and priv["delta"] == 1e-5 and priv["sample_rate"] == 1.0
        assert "privacy" not in p["methods"][name]
        assert s["methods"][name]["mean"]["test_mse"] != p["methods"][name]["mean"]["test_mse"]  # noise was added
