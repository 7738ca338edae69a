"""Configuration loading and the command line: bad input gives one line on stderr and exit code 2."""

from __future__ import annotations

import pytest

from conftest import CORE_METHODS, read_metrics, read_summary, run_cli, sets
from conftest import SYNTH_CFG as CFG
from pf2lora import config
from pf2lora.cli import main
from pf2lora.errors import UserError
from pf2lora.methods import registry

TINY_RUN = [
    *sets(
        "rounds=1",
        "local_steps=1",
        "task.num_clients=2",
        "task.dim=8",
        "task.train_samples=16",
        "task.test_samples=16",
        'methods=["homlora"]',
    ),
    "--quiet",
]


def _fails(capsys, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "override, needles",
    [
        ("nosuchkey=1", ["nosuchkey"]),
        ("task.nosuch=1", ["task.nosuch"]),
        ("rounds=abc", ["rounds", "abc"]),
        ('rounds="3"', ["rounds", "'3'"]),
        ("rounds=1.5", ["rounds", "1.5"]),
        ('methods=["nope"]', ["nope"]),
        ("methods=[]", ["methods"]),
        ("lora.rank=0", ["lora.rank", "0"]),
        ("lora.private_rank=-1", ["lora.private_rank", "-1"]),
        ("task.private_ranks=[1,-2]", ["task.private_ranks"]),
        ("hetlora.gamma=1.5", ["hetlora.gamma", "1.5"]),
        ("pf2lora.estimator=magic", ["pf2lora.estimator", "magic"]),
        ("lora=3", ["lora"]),
        ("rounds", ["rounds"]),
    ],
)
def test_bad_overrides(capsys, tmp_path, override, needles):
    out = tmp_path / "run"
    _fails(capsys, ["run", CFG, "--set", override, "--out", str(out)], *needles)
    assert not out.exists()  # nothing created for a bad config


@pytest.mark.parametrize("override", ["client_fraction=nan", "optim.lr=nan", "optim.lower_lr=inf"])
def test_non_finite_numbers_are_rejected(override):
    with pytest.raises(UserError, match=override.split("=")[0]):
        config.load(None, [override])


def test_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "nope.toml"
    _fails(capsys, ["run", str(missing)], str(missing))


def test_bad_values_in_config_file(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('rounds = "abc"\n')
    _fails(capsys, ["run", str(bad)], str(bad), "rounds", "abc")
    bad.write_text("[lora]\nrank = 0\n")
    _fails(capsys, ["run", str(bad)], "lora.rank")
    bad.write_text("[lora]\nrnak = 4\n")
    _fails(capsys, ["run", str(bad)], "lora.rnak")
    bad.write_text("rounds = \n")
    _fails(capsys, ["run", str(bad)], str(bad), "TOML")


def test_existing_run_directory_is_refused_and_untouched(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    files = {"summary.json": '{"keep": 1}\n', "metrics.jsonl": "old\n", "report.md": "# old\n", "config.toml": "x = 1\n"}
    for name, text in files.items():
        (out / name).write_text(text)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    _fails(capsys, ["run", CFG, *TINY_RUN, "--out", str(out)], str(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    for name, text in files.items():
        assert (out / name).read_text() == text
        assert (out / name).stat().st_mtime_ns == stamps[name]
    # With --overwrite the run replaces them.
    assert main(["run", CFG, *TINY_RUN, "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert "homlora" in read_summary(out)["methods"]


def test_output_path_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep")
    _fails(capsys, ["run", CFG, *TINY_RUN, "--out", str(f)], str(f))
    assert f.read_text() == "keep"


def test_diverging_run_fails_loudly_in_one_line(capsys, tmp_path):
    """Every client diverges (NaN loss): each update is rejected, and a round without a single
    good update stops the run with one line (not a traceback, not a silent NaN summary)."""
    out = tmp_path / "run"
    rc = main(
        ["run", CFG, *TINY_RUN, "--set", 'methods=["pf2lora"]', "--set", "local_steps=3", "--set", "optim.lower_lr=1e20", "--out", str(out)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "min_clients" in err[0] and "rejected" in err[0]
    assert not (out / "summary.json").exists()


def test_diverging_client_among_good_ones_still_finishes(tmp_path):
    """A diverged client's non-finite metrics become null in summary.json (valid JSON)."""
    from pf2lora.report import finite_or_none

    assert finite_or_none({"a": [float("nan"), 1.0, float("inf")]}) == {"a": [None, 1.0, None]}


def test_cli_subprocess_error_is_one_line():
    proc = run_cli("run", CFG, "--set", "rounds=abc", timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "rounds" in line and "abc" in line


def test_cli_lists_all_methods():
    proc = run_cli("methods", timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.strip().splitlines()]
    assert names == sorted(registry())
    assert set(CORE_METHODS) <= set(names)


def test_datasets_lists_the_catalogue(capsys):
    from pf2lora.data import catalogue

    assert main(["datasets"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [d.name for d in catalogue.CATALOGUE]


def test_config_keys_lists_every_key(capsys):
    assert main(["config-keys"]) == 0
    out = capsys.readouterr().out
    keys = [line.split(" = ")[0] for line in out.splitlines() if not line.startswith(" ")]
    for k in ("rounds", "lora.rank", "lora.private_rank", "pf2lora.estimator", "hetlora.gamma", "eval.rank_threshold"):
        assert k in keys


def test_config_round_trips_through_toml(tmp_path):
    cfg = config.load(CFG, ["rounds=7", "pf2lora.estimator=exact", "task.private_ranks=[0,2]"])
    assert cfg.rounds == 7 and cfg.pf2lora.estimator == "exact" and cfg.task.private_ranks == [0, 2]
    path = tmp_path / "config.toml"
    path.write_text(config.dumps(cfg))
    assert config.to_dict(config.load(path)) == config.to_dict(cfg)


def test_cross_field_validation():
    with pytest.raises(UserError, match="task.dim"):
        config.load(None, ["task.dim=4", "task.shared_rank=4", "task.private_ranks=[1]"])
    with pytest.raises(UserError, match="singular_min"):
        config.load(None, ["task.singular_min=2.0", "task.singular_max=1.0"])
    with pytest.raises(UserError, match="twice"):
        config.load(None, ['methods=["pf2lora","pf2lora"]'])


@pytest.mark.slow
def test_end_to_end_run(capsys, tmp_path):
    out = tmp_path / "x"
    rc = main(["run", CFG, "--set", "rounds=2", "--set", "task.train_samples=64", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err
    for name in ("config.toml", "metrics.jsonl", "summary.json", "report.md", "train_loss.png", "spectra.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cfg = config.load(out / "config.toml")
    assert cfg.rounds == 2 and cfg.task.train_samples == 64
    methods = ["pf2lora", "pf2lora-fo", "homlora", "hetlora", "local"]
    assert cfg.methods == methods

    records = read_metrics(out)
    assert len(records) == 2 * 5
    assert [(r["method"], r["round"]) for r in records] == [(m, i) for m in methods for i in (1, 2)]

    summary = read_summary(out)
    assert summary["task"] == "synthetic-rank"
    assert list(summary["methods"]) == methods
    true_ranks = [4, 4, 4, 5, 5, 5, 6, 6]
    for name, entry in summary["methods"].items():
        assert sorted(entry["clients"]) == [f"client_{k}" for k in range(8)], name
        for k, cid in enumerate(f"client_{k}" for k in range(8)):
            c = entry["clients"][cid]
            assert {"effective_rank", "true_rank", "test_mse"} <= set(c), (name, cid)
            assert c["true_rank"] == true_ranks[k]
            assert isinstance(c["effective_rank"], int) and 0 <= c["effective_rank"] <= cfg.task.dim
            assert c["test_mse"] > 0
        mean = sum(c["test_mse"] for c in entry["clients"].values()) / 8
        assert entry["mean"]["test_mse"] == pytest.approx(mean)
    assert summary["methods"]["local"]["upload_bytes_per_client_per_round"] == 0
    assert summary["methods"]["pf2lora"]["upload_bytes_per_client_per_round"] > 0

    report = (out / "report.md").read_text()
    for name in methods:
        assert name in report
    assert "train_loss.png" in report and "spectra.png" in report
