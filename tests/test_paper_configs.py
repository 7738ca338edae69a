"""The paper's protocol as configs (``configs/paper/``) and ``pf2lora run CONFIG --dry-run``.

Every config of the folder passes the dry run offline (exit 0; the GLUE / NLG ones name the hub
model and the data file they need) and writes nothing; bad input gets the run's one-line error;
and each GLUE / NLG config runs end to end with its hub model swapped for a tiny random model of
the same family (RoBERTa, GPT-2, byte-level BPE tokenizers built here) and its data for a fixture
in the loader's format, reduced to 1 round, 1 local step, 2 clients and two methods.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, SMALL, read_summary, run_cli, save_tiny_gpt2, save_tiny_roberta, sets
from pf2lora import plan
from pf2lora.cli import main
from pf2lora.methods import registry

PAPER = ROOT / "configs" / "paper"
CONFIGS = sorted(PAPER.glob("*.toml"))
GLUE = {"glue_cola": "cola", "glue_sst2": "sst2", "glue_qnli": "qnli", "glue_mnli": "mnli", "glue_qqp": "qqp"}
NLG = {"e2e", "webnlg"}
MINE = {*GLUE, *NLG}
"""The paper's GLUE / NLG configs (hub models, users' files); the folder's other configs are offline stand-ins."""
QUICK = ["rounds=1", "local_steps=1", "task.num_clients=2", 'methods=["pf2lora","homlora"]', 'device="cpu"']


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path_factory):
    """No network attempts and an empty Hugging Face cache: roberta-base / gpt2-medium are never found."""
    import huggingface_hub.constants as hc

    cache = tmp_path_factory.mktemp("hub")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_paper_configs_are_there():
    assert MINE.issubset(p.stem for p in CONFIGS)


# ---------------------------------------------------------------------------------------------
# (a) every config of configs/paper/ passes the dry run, writing nothing


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_dry_run_passes_and_writes_nothing(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default run directory would be runs/NAME-TIMESTAMP here
    rc = main(["run", str(path), "--dry-run"])
    out, err = capsys.readouterr()
    if rc == 2 and path.stem not in MINE and "make assets" in err:
        pytest.skip(f"the offline assets are not installed here: {err.strip()}")
    assert rc == 0, err
    assert list(tmp_path.iterdir()) == [], "the dry run wrote into the working directory"
    cfg = plan.load_for_dry_run(path)
    assert f"{len(cfg.methods)}: {', '.join(cfg.methods)}" in out
    assert f"{cfg.rounds} rounds x {cfg.local_steps} local steps = {cfg.rounds * cfg.local_steps} steps per client" in out
    assert f"r = {cfg.lora.rank} " in out and f"r~ = {cfg.lora.private_rank} " in out
    if path.stem in MINE:
        hub = "roberta-base" if path.stem in GLUE else "gpt2-medium"
        assert f"needs the hub: {hub}" in out
        assert "needs task.data_path (" in out
        assert "ready        no:" in out
        assert "unknown until the model's shapes are known" in out
    else:
        assert "ready        yes" in out


def test_paper_protocol_in_the_glue_and_nlg_configs():
    """What the issue fixes: 8 clients, r = 8 / r~ = 2, 10 local steps, the rounds per task, the
    methods, s-similarity 0.3 for GLUE, natural groups for NLG, a learning curve."""
    rounds = {"glue_cola": 50, "glue_sst2": 100, "glue_qnli": 100, "glue_mnli": 300, "glue_qqp": 300, "e2e": 100, "webnlg": 100}
    methods = ["pf2lora", "pf2lora-fo", "homlora", "hetlora", "perfedavg", "local", "fedsa-lora", "pfedlora", "fdlora"]
    for stem, n in rounds.items():
        cfg = plan.load_for_dry_run(PAPER / f"{stem}.toml")
        assert (cfg.rounds, cfg.local_steps, cfg.task.num_clients) == (n, 10, 8), stem
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.private_rank, cfg.lora.private_alpha) == (8, 8.0, 2, 2.0), stem
        assert cfg.methods == methods and cfg.task.data_path == "" and 0 < cfg.eval.every < cfg.rounds, stem
        if stem in GLUE:
            assert (cfg.task.model, cfg.task.dataset, cfg.task.partition, cfg.task.similarity) == (
                "roberta-base",
                f"glue-{GLUE[stem]}",
                "s-similarity",
                0.3,
            )
        else:
            assert (cfg.task.model, cfg.task.dataset, cfg.task.partition) == ("gpt2-medium", stem, "natural")
        text = (PAPER / f"{stem}.toml").read_text()
        assert text.startswith("# ") and "--dry-run" in text and "Needs" in text


# ---------------------------------------------------------------------------------------------
# (b) bad input: the run's one line, exit 2


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pf2lora: error: "), err
    assert "Traceback" not in err
    return lines[0]


BAD = {
    "unknown key": ("glue_sst2", ["task.nope=1"]),
    "bad value": ("glue_sst2", ["rounds=0"]),
    "bad type": ("glue_qnli", ['lora.rank="eight"']),
    "unknown method": ("glue_mnli", ['methods=["pf2lora","no-such-method"]']),
    "unknown data set": ("glue_qqp", ['task.dataset="glue-nope"']),
    "generation with s-similarity": ("e2e", ['task.partition="s-similarity"']),
    "missing data folder": ("glue_sst2", ['task.data_path="/nonexistent/glue_data/SST-2"']),
    "missing data file": ("e2e", ['task.data_path="/nonexistent/e2e-dataset/trainset.csv"']),
    "too few groups": ("webnlg", ['task.data_path="{webnlg}"']),
    "missing model directory": ("glue_cola", ['task.model="./no-such-model-dir"', 'task.data_path="{glue_cola}"']),
}


@pytest.mark.parametrize(("stem", "overrides"), BAD.values(), ids=BAD.keys())
def test_dry_run_bad_input_is_the_runs_one_line(stem, overrides, data, tmp_path, monkeypatch, capsys):
    """Exit 2 and one line, the same line as the run's (which may have made its run directory by then)."""
    monkeypatch.chdir(tmp_path)
    cfg = str(PAPER / f"{stem}.toml")
    overrides = [o.format(**{k: str(v) for k, v in data.items()}) for o in overrides]
    dry = _error(capsys, ["run", cfg, *sets(*overrides), "--dry-run"])
    assert list(tmp_path.iterdir()) == []
    run = _error(capsys, ["run", cfg, *sets(*overrides), "--out", str(tmp_path / "out"), "--quiet"])
    assert dry == run


def test_dry_run_refuses_what_the_run_refuses(tmp_path, monkeypatch, capsys):
    cfg = str(PAPER / "glue_cola.toml")
    assert "not available offline" in _error(capsys, ["run", cfg, "--set", 'task.model="not a valid/repo id"', "--dry-run"])
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text("{}")
    line = _error(capsys, ["run", cfg, "--out", str(done), "--dry-run"])
    assert "already holds a run" in line
    monkeypatch.chdir(tmp_path)
    assert main(["run", cfg, "--out", str(tmp_path / "new"), "--dry-run"]) == 0
    assert not (tmp_path / "new").exists()


def test_dry_run_console_script_one_line_no_traceback(tmp_path):
    proc = run_cli("run", str(PAPER / "webnlg.toml"), "--set", "task.nope=1", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown config key 'task.nope'" in proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_dry_run_bytes_are_what_a_run_measures(tmp_path, capsys):
    """Per method, the dry run's first-round upload / download bytes per client equal what a run
    counts (synthetic task, every method; HETLoRA may prune before uploading: at most)."""
    from pf2lora.engines.local import LocalEngine

    overrides = [*SMALL, "rounds=1", "methods=[" + ",".join(f'"{m}"' for m in sorted(registry())) + "]"]
    cfg = plan.load(None, overrides)
    dry = plan.dry_run(cfg)
    assert dry.costs is not None and not dry.missing
    adapters = {c.method: c.adapter for c in dry.costs}
    assert adapters["homlora"] == [2 * (8 + 8)] * 2 and adapters["pf2lora"] == [2 * (8 + 8) + 1 * (8 + 8)] * 2  # d = 8, r = 2, r~ = 1
    task = plan.build_task(cfg)
    engine = LocalEngine(cfg, task, progress=False)
    for cost in dry.costs:
        result = engine.run(cost.method)
        (rnd,) = result.rounds
        assert rnd["download_bytes_per_client"] == pytest.approx(sum(cost.download) / len(cost.download)), cost.method
        if cost.method == "hetlora":
            assert rnd["upload_bytes_per_client"] <= max(cost.upload)
        elif cost.method == "she-lora":  # its key-less CKKS context has no size before it is made: a lower bound
            assert rnd["upload_bytes_per_client"] >= max(cost.upload)
        elif not registry()[cost.method].pools_data:
            assert rnd["upload_bytes_per_client"] == pytest.approx(sum(cost.upload) / len(cost.upload)), cost.method


def test_dry_run_with_the_model_but_without_the_data(tiny_roberta, tmp_path, monkeypatch, capsys):
    """A local model and no data file: exit 0, the data named as missing, the sizes resolved (the
    head from MNLI's three classes, which the GLUE format fixes)."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(PAPER / "glue_mnli.toml"), "--set", f'task.model="{tiny_roberta}"', "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "needs task.data_path (" in out and "needs the hub" not in out and "ready        no" in out
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["homlora"])
    hidden, r = 16, 8
    assert row[1:3] == [f"{2 * r * (hidden + hidden):,}", f"{hidden * hidden + hidden + hidden * 3 + 3:,}"]  # q, v; dense + out_proj
    assert "client ids unknown without the data" in out
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# (c) each GLUE / NLG config end to end, on a tiny model of its family and a fixture file


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory) -> Path:
    return save_tiny_roberta(tmp_path_factory.mktemp("tiny_roberta"))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


POS = ["a fine film", "great fun", "loved it", "a warm story"]
NEG = ["a dull film", "awful plot", "hated it", "a cold story"]


def _glue_rows(task: str, i: int) -> tuple[list[str], list[str] | None]:
    """Row ``i`` of a GLUE task's train.tsv (official columns), and the header (None: CoLA has none)."""
    y = i % 2 if task != "mnli" else i % 3
    text, other = (POS if y == 0 else NEG)[i % 4], POS[(i + 1) % 4]
    if task == "sst2":
        return [text, str(y)], ["sentence", "label"]
    if task == "cola":
        return ["gj04", str(y), "*" if y == 0 else "", text], None
    if task == "qnli":
        return [str(i), f"what is {other}?", text, ["entailment", "not_entailment"][y]], ["index", "question", "sentence", "label"]
    if task == "mnli":
        label = ["entailment", "neutral", "contradiction"][y]
        return [str(i), ["fiction", "travel"][i % 2], text, other, label], ["index", "genre", "sentence1", "sentence2", "gold_label"]
    return [str(i), str(2 * i), str(2 * i + 1), f"is {text} good?", f"is {other} good?", str(y)], [
        "id",
        "qid1",
        "qid2",
        "question1",
        "question2",
        "is_duplicate",
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A tiny file in each loader's format: GLUE task folders (train.tsv), E2E's CSV, WebNLG JSON lines."""
    root = tmp_path_factory.mktemp("paper_data")
    out: dict[str, Path] = {}
    for stem, task in GLUE.items():
        folder = root / task
        folder.mkdir()
        rows = [_glue_rows(task, i) for i in range(36)]
        header = rows[0][1]
        lines = ([header] if header else []) + [r for r, _ in rows]
        (folder / "train.tsv").write_text("".join("\t".join(cells) + "\n" for cells in lines))
        out[stem] = folder
    e2e = root / "trainset.csv"
    with open(e2e, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref"])
        for i in range(36):
            food = ["French", "Italian", "Chinese"][i % 3]
            w.writerow([f"name[Inn {i % 5}], eatType[pub], food[{food}]", f"Inn {i % 5} is a pub with {food} food."])
    out["e2e"] = e2e
    webnlg = root / "train.jsonl"
    recs = []
    for i in range(24):
        cat = ["Airport", "Astronaut", "City"][i % 3]
        triple = f"Thing_{i % 4} | locatedIn | {cat}_{i % 2}"
        recs.append(
            {"category": cat, "modified_triple_sets": {"mtriple_set": [[triple]]}, "lex": {"text": [f"Thing {i % 4} is in {cat}."]}}
        )
    webnlg.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out["webnlg"] = webnlg
    return out


@pytest.mark.parametrize("stem", sorted(MINE))
def test_paper_config_end_to_end_on_tiny_stand_ins(stem, tiny_roberta, tiny_gpt2, data, tmp_path, monkeypatch, capsys):
    """The config as shipped, but for the model (a tiny one of its family), the data (a fixture) and
    the size (1 round of 1 step, 2 clients, pf2lora and homlora): the dry run resolves everything
    and its bytes match the run's; the run finishes with a summary for both methods."""
    monkeypatch.chdir(tmp_path)
    model = tiny_roberta if stem in GLUE else tiny_gpt2
    swap = [f'task.model="{model}"', f'task.data_path="{data[stem]}"', *QUICK]
    if stem in NLG:
        swap += ["task.eval_generate=2", "task.max_new_tokens=4"]
    cfg = str(PAPER / f"{stem}.toml")

    assert main(["run", cfg, *sets(*swap), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ready        yes" in out and "needs the hub" not in out and "needs task.data_path" not in out
    assert re.search(r"roberta, 1 layers.*LoRA on query, value" if stem in GLUE else r"gpt2, 1 layers.*LoRA on c_attn", out)
    assert list(tmp_path.iterdir()) == []

    run_dir = tmp_path / "run"
    assert main(["run", cfg, *sets(*swap), "--out", str(run_dir), "--quiet"]) == 0
    capsys.readouterr()
    summary = read_summary(run_dir)
    assert set(summary["methods"]) == {"pf2lora", "homlora"}
    metric = "accuracy" if stem in GLUE else "loss"
    dry = plan.dry_run(plan.load(cfg, swap))
    assert dry.costs is not None
    for cost in dry.costs:
        m = summary["methods"][cost.method]
        assert len(m["clients"]) == 2 and all(metric in c for c in m["clients"].values())
        assert m["upload_bytes_per_client_per_round"] == pytest.approx(sum(cost.upload) / len(cost.upload))
        assert m["download_bytes_per_client_per_round"] == pytest.approx(sum(cost.download) / len(cost.download))
