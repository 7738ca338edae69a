"""Keeping and using what a run trained: adapters in the run directory, `pf2lora export`,
`pf2lora predict`, TensorBoard scalars, and the small things a user trips over (a tiny RoBERTa
and a CSV of class names stand in for a real model and the user's data)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from conftest import EXE, read_metrics, read_summary, run_cli, save_tiny_roberta
from pf2lora import adapters, runs
from pf2lora.cli import TEST_HOLD_ENV, main
from pf2lora.data import user_files

POS = ["a fine film", "great fun", "loved it", "a warm story", "so good", "what a joy"]
NEG = ["a dull film", "awful plot", "hated it", "a cold story", "so bad", "what a bore"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("use")
    model = save_tiny_roberta(d / "model")
    rows = [(f"{t} {i}", "positive") for i in range(8) for t in POS] + [(f"{t} {i}", "negative") for i in range(8) for t in NEG]
    data = d / "reviews.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    config = d / "run.toml"
    config.write_text(
        f"""
name = "use"
methods = ["homlora", "pf2lora"]
rounds = 2
local_steps = 2
batch_size = 8
num_threads = 1
device = "cpu"
[task]
kind = "text-classification"
model = "{model}"
dataset = "csv"
data_path = "{data}"
partition = "iid"
num_clients = 2
train_samples = 24
test_samples = 12
max_length = 32
[optim]
lr = 1e-2
lower_lr = 0.5
"""
    )
    return {"model": model, "data": data, "config": config}


@pytest.fixture(scope="module")
def run(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "D"
    assert main(["run", str(files["config"]), "--out", str(out), "--quiet", "--tensorboard"]) == 0
    return out


def _base(files):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(files["model"], num_labels=2).eval()


def _peft(files, adapter: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return PeftModel.from_pretrained(_base(files), adapter).eval()


def _tok(files):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(files["model"])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_client_and_the_global_model_are_peft_adapters(run, files):
    summary = read_summary(run)
    for method in ("homlora", "pf2lora"):
        clients = sorted(summary["methods"][method]["clients"])
        kept = sorted(p.name for p in (run / "adapters" / method).iterdir())
        assert kept == sorted([*clients, "global"])
        meta = json.loads((run / "adapters" / method / clients[0] / adapters.META).read_text())
        assert meta["method"] == method and meta["round"] == 2 and meta["id2label"] == {"0": "negative", "1": "positive"}
        assert meta["metrics"]["accuracy"] == summary["methods"][method]["clients"][clients[0]]["accuracy"]
    assert (run / "states" / "pf2lora.pt").is_file()
    assert oct((run / "summary.json").stat().st_mode & 0o044) == oct(0o044 & ~_umask())  # readable by others as the umask allows


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_predict_split_matches_the_summary_and_plain_peft(run, files, tmp_path):
    summary = read_summary(run)
    cid = sorted(summary["methods"]["pf2lora"]["clients"])[1]
    out = tmp_path / "P.csv"
    assert main(["predict", str(run), "--method", "pf2lora", "--client", cid, "--split", "test", "--out", str(out)]) == 0
    rows = _read_csv(out)
    assert {"text", "prediction", "label", "p_negative", "p_positive"} <= set(rows[0])
    accuracy = sum(r["prediction"] == r["label"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(summary["methods"]["pf2lora"]["clients"][cid]["accuracy"])
    model, tok = _peft(files, run / "adapters" / "pf2lora" / cid), _tok(files)
    with torch.no_grad():
        logits = model(**tok([r["text"] for r in rows], return_tensors="pt", padding=True, truncation=True, max_length=32)).logits
    names = ["negative", "positive"]
    assert [names[i] for i in logits.argmax(-1).tolist()] == [r["prediction"] for r in rows]


def test_predict_an_input_file_jsonl_out_and_stdout(run, tmp_path, capsys):
    cid = sorted(read_summary(run)["methods"]["homlora"]["clients"])[0]
    txt = tmp_path / "in.txt"
    txt.write_text("a fine film 3\nawful plot 1\n")
    assert main(["predict", str(run), "--method", "homlora", "--client", cid, "--input", str(txt)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("text,prediction") and len(lines) == 3
    jl = tmp_path / "P.jsonl"
    assert main(["predict", str(run), "--method", "homlora", "--client", cid, "--input", str(txt), "--out", str(jl)]) == 0
    assert [json.loads(x)["text"] for x in jl.read_text().splitlines()] == ["a fine film 3", "awful plot 1"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--method", "fdlora", "--client", "X", "--split", "test"], "no adapters of method 'fdlora'"),
        (["--method", "homlora", "--client", "nobody", "--split", "test"], "no client 'nobody'"),
        (["--method", "homlora", "--client", "C", "--input", "missing.csv"], "missing.csv: input file not found"),
    ],
)
def test_predict_bad_input_is_one_line(run, argv, needle, capsys):
    argv = [a if a != "C" else sorted(read_summary(run)["methods"]["homlora"]["clients"])[0] for a in argv]
    assert main(["predict", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_export_again_is_byte_identical_and_merge_reproduces_the_adapter(run, files, tmp_path):
    summary = read_summary(run)
    cid = sorted(summary["methods"]["pf2lora"]["clients"])[0]
    assert main(["export", str(run), "--method", "pf2lora", "--client", cid, "--out", str(tmp_path / "E")]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", adapters.META):
        assert (tmp_path / "E" / "pf2lora" / cid / name).read_bytes() == (run / "adapters" / "pf2lora" / cid / name).read_bytes()
    assert main(["export", str(run), "--method", "pf2lora", "--client", cid, "--merge", "--out", str(tmp_path / "M")]) == 0
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "M" / "pf2lora" / cid).eval()
    batch = _tok(files)(["a fine film 1", "awful plot 2"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**batch).logits, _peft(files, run / "adapters" / "pf2lora" / cid)(**batch).logits, atol=1e-5, rtol=0
        )
    assert main(["export", str(run), "--method", "nope", "--out", str(tmp_path / "X")]) == 2


def test_tensorboard_scalars_equal_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for method in ("homlora", "pf2lora"):
        acc = EventAccumulator(str(run / "tb" / method))
        acc.Reload()
        logged = [(e.step, e.value) for e in acc.Scalars("train_loss")]
        expected = [(r["round"], r["train_loss"]) for r in read_metrics(run) if r["method"] == method]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_labels_inferred_from_names_in_the_data(files):
    ds = user_files.load_table(files["data"], label="label")
    assert ds.label_names == ["negative", "positive"] and ds.info["label_names_inferred"]
    assert ds.labels[0] == 1 and ds.labels[-1] == 0


def test_a_run_stopped_by_bad_data_leaves_no_run_and_the_retry_goes_ahead(files, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nx,positive\n")
    out = tmp_path / "R"
    assert main(["run", str(files["config"]), "--set", f'task.data_path="{bad}"', "--out", str(out), "--quiet"]) == 2
    assert "no column 'text'" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "config.toml").write_text("# left by an older failed run\n")  # not a run: a retry may replace it
    assert main(["run", str(files["config"]), "--set", 'methods=["homlora"]', "--set", "rounds=1", "--out", str(out), "--quiet"]) == 0
    assert (out / "adapters" / "homlora").is_dir()


def test_help_is_plain_text():
    text = run_cli("--help").stdout
    assert "``" not in text and "pf2lora export" in text


def _adapter_bytes(run_dir: Path, method: str, root: bool = False) -> dict[str, bytes]:
    """Every file of a method's adapters (``root``: ``run_dir`` is the adapters folder itself)."""
    root_dir = (run_dir if root else run_dir / "adapters") / method
    return {str(p.relative_to(root_dir)): p.read_bytes() for p in sorted(root_dir.rglob("*")) if p.is_file()}


def test_killed_after_the_first_method_and_resumed_keeps_identical_adapters(files, tmp_path):
    straight = tmp_path / "straight"
    assert run_cli("run", str(files["config"]), "--out", str(straight), "--quiet").returncode == 0
    killed = tmp_path / "killed"
    env = {**os.environ, TEST_HOLD_ENV: "pf2lora:1"}
    proc = subprocess.Popen(
        [str(EXE), "run", str(files["config"]), "--out", str(killed), "--quiet"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in proc.stderr:  # wait for the hold: homlora is done, pf2lora checkpointed round 1
            if "holding after" in line:
                break
        before = _adapter_bytes(killed, "homlora")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert before == _adapter_bytes(straight, "homlora")
    assert run_cli("run", "--resume", str(killed), "--quiet").returncode == 0
    for method in ("homlora", "pf2lora"):
        assert _adapter_bytes(killed, method) == _adapter_bytes(straight, method)
    assert runs.load_run(killed)[1].methods == ["homlora", "pf2lora"]


@pytest.mark.slow
def test_the_demo_configs_adapters_load_with_plain_peft_and_reproduce_the_logits(tmp_path):
    """The issue's check on the real encoder: `pf2lora run configs/vader_demo.toml --set rounds=1
    --set local_steps=1`, then plain peft on paraphrase-MiniLM-L3-v2 gives pf2lora's own logits for
    a client, and homlora's global adapter the global model's."""
    from transformers import AutoModelForSequenceClassification

    from pf2lora import models, plan
    from pf2lora import state as st
    from pf2lora.engines.rounds import personal_model
    from pf2lora.methods import registry

    try:
        base_dir = models.resolve_model(models.L3)
        models.source(models.L3)
    except Exception:
        pytest.skip("paraphrase-MiniLM-L3-v2 or the VADER data not prepared (make assets)")
    config = Path(__file__).resolve().parents[1] / "configs" / "vader_demo.toml"
    out = tmp_path / "D"
    small = [
        "rounds=1",
        "local_steps=1",
        'methods=["pf2lora","homlora"]',
        "task.train_samples=24",
        "task.train_samples_min=8",
        "task.test_samples=8",
        "num_threads=1",
    ]
    args = [a for s in small for a in ("--set", s)]
    assert main(["run", str(config), "--out", str(out), "--quiet", *args]) == 0
    cfg = plan.load(out / "config.toml", [])
    task = plan.build_task(cfg)
    client = task.clients[1]
    batch = {k: v[:8] for k, v in client.test.items()}
    for method, who in (("pf2lora", client.client_id), ("homlora", "global")):
        final = torch.load(out / "states" / f"{method}.pt", weights_only=True)
        m = registry()[method](cfg, task)
        received = st.clone(m.broadcast(final["server"], client.client_id))
        if who == "global":
            params = m.global_params(received, {})
        else:
            params = personal_model(cfg, task, m, client, received, final["clients"][client.client_id], final["round"])
        with torch.no_grad():
            ours = task.logits(st.model_params(params), batch)
            base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2).eval()
            from peft import PeftModel

            theirs = PeftModel.from_pretrained(base, out / "adapters" / method / who).eval()(**task.model_inputs(batch)).logits
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_predict_generates_with_a_clients_model(tmp_path, capsys):
    """Generation: the client's model decodes each input (its own split, or a file)."""
    from conftest import save_tiny_gpt2

    model = save_tiny_gpt2(tmp_path / "gpt2")
    data = tmp_path / "defs.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "target"])
        w.writerows([(f"word {i}", f"a thing number {i % 5}") for i in range(40)])
    config = tmp_path / "gen.toml"
    config.write_text(
        f"""
methods = ["homlora"]
rounds = 1
local_steps = 1
batch_size = 4
num_threads = 1
device = "cpu"
[task]
kind = "generation"
model = "{model}"
dataset = "csv"
data_path = "{data}"
target_column = "target"
partition = "iid"
num_clients = 2
train_samples = 12
test_samples = 6  # 20 examples a client: 4 held out (test_fraction 0.2)
max_length = 32
max_new_tokens = 4
eval_generate = 2
"""
    )
    out = tmp_path / "G"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    cid = sorted(read_summary(out)["methods"]["homlora"]["clients"])[0]
    rows = runs.predict(out, "homlora", cid, split="test")
    assert len(rows) == 4 and all(isinstance(r["prediction"], str) and r["label"].startswith("a thing") for r in rows)
    txt = tmp_path / "in.txt"
    txt.write_text("word 3\nword 7\n")
    assert [r["text"] for r in runs.predict(out, "homlora", cid, input_path=txt)] == ["word 3", "word 7"]


def test_predict_reads_labels_as_training_does(run, tmp_path, capsys):
    cid = sorted(read_summary(run)["methods"]["homlora"]["clients"])[0]
    good = tmp_path / "lab.csv"
    good.write_text("text,label\na fine film 1,positive\nawful plot 2,0\n")
    rows = runs.predict(run, "homlora", cid, input_path=good)
    assert [r["label"] for r in rows] == ["positive", "negative"]  # a class name, or an index of label_names
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\na fine film 1,positive\nawful plot 2,meh\n")
    assert main(["predict", str(run), "--method", "homlora", "--client", cid, "--input", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.csv: row 3" in err and "'meh'" in err and len(err.splitlines()) == 1
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"text": "fine"}\n{"sentence": "awful"}\n')
    assert main(["predict", str(run), "--method", "homlora", "--client", cid, "--input", str(notext)]) == 2
    assert "notext.jsonl: line 2: column 'text'" in capsys.readouterr().err


def test_tensorboard_has_the_final_evaluation(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = read_summary(run)
    acc = EventAccumulator(str(run / "tb" / "pf2lora"))
    acc.Reload()
    last = acc.Scalars("eval/accuracy")[-1]
    assert last.step == 2 and last.value == pytest.approx(summary["methods"]["pf2lora"]["mean"]["accuracy"], rel=1e-6)


@pytest.mark.parametrize("methods", [["she-lora", "fdlora", "hetlora", "fed-hello"]])
def test_export_from_the_saved_states_equals_what_the_run_wrote(methods, tmp_path):
    """states/METHOD.pt keeps what a method's model needs (a client's rank, its fusion weights,
    its keys), so `pf2lora export` writes the run's own adapters again."""
    from conftest import SYNTH_CFG, sets

    out = tmp_path / "D"
    small = ["rounds=2", "local_steps=1", "task.num_clients=3", "task.dim=8", "task.shared_rank=2", "task.private_ranks=[0,1]"]
    small += ["task.train_samples=64", "task.test_samples=32", f"methods={json.dumps(methods)}"]
    assert main(["run", SYNTH_CFG, "--out", str(out), "--quiet", *sets(*small)]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "E")]) == 0
    for method in methods:
        assert _adapter_bytes(tmp_path / "E", method, root=True) == _adapter_bytes(out, method), method
