"""Node-local data on Flower (``task.partition = "node"``): each SuperNode reads its own CSV file
(node config ``data-path``), the server and the submitting machine need none and never open one,
and the numbers equal the local engine reading the same files as one client per file.

Fast tests drive the real ServerApp / ClientApp code through an in-process Grid (3 nodes, a tiny
saved RoBERTa with an offline tokenizer, tiny CSV files); one (slow) runs a loopback deployment
(SuperLink + 3 SuperNodes, each given a different file).
"""

from __future__ import annotations

import math
import os
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install 'pf2lora[flower]')")

from conftest import methods_override, save_tiny_roberta, wait_for
from pf2lora import config, plan
from pf2lora.config import FileList
from pf2lora.engines.flower import FlowerEngineError, nodedata
from pf2lora.engines.flower.client import make_client_app
from pf2lora.engines.flower.inprocess import InProcessGrid
from pf2lora.engines.flower.server import FlowerServer
from pf2lora.engines.local import LocalEngine, RoundFailure
from pf2lora.errors import UserError
from pf2lora.tasks.text_base import RemoteClient

WORDS = {
    0: ["good", "great", "fine", "nice", "calm", "warm"],
    1: ["bad", "awful", "poor", "sad", "cold", "grim"],
}


def _write_csv(path: Path, n: int, seed: int, *, label_col: str = "label", labels: tuple[str, ...] = ("neg", "pos")) -> Path:
    """``n`` short texts whose words lean to their label, with a per-file bias (each client differs)."""
    rng = random.Random(seed)
    rows = [f"text,{label_col}"]
    for _ in range(n):
        y = 1 if rng.random() < 0.3 + 0.2 * (seed % 3) else 0
        words = [rng.choice(WORDS[y] if rng.random() < 0.8 else WORDS[1 - y]) for _ in range(4)]
        rows.append(f"{' '.join(words)},{labels[y]}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("node-data")
    model = save_tiny_roberta(root / "model")
    files = [_write_csv(root / f"site{k}.csv", n, seed=k) for k, n in enumerate((20, 26, 32))]
    return {"root": root, "model": model, "files": files}


def _overrides(assets: dict, *extra: str, files: list[Path] | None = None) -> list[str]:
    listed = ",".join(f'"{f}"' for f in (assets["files"] if files is None else files))
    return [
        'task.kind="text-classification"',
        'task.dataset="csv"',
        'task.partition="node"',
        f'task.model="{assets["model"]}"',
        'task.label_names=["neg","pos"]',
        "task.num_clients=3",
        f"task.data_path=[{listed}]",
        "task.max_length=40",
        "task.test_fraction=0.25",
        "rounds=2",
        "local_steps=2",
        "batch_size=8",
        "num_threads=1",
        "lora.rank=2",
        "lora.private_rank=1",
        methods_override(["pf2lora", "homlora"]),
        *extra,
    ]


def _cfg(assets: dict, *extra: str, **kw):
    return plan.load(None, _overrides(assets, *extra, **kw))


def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for cid in a:
        assert a[cid].keys() == b[cid].keys(), cid
        for k, v in a[cid].items():
            w = b[cid][k]
            if (isinstance(v, float) and not math.isnan(v)) or isinstance(v, list):
                assert w == pytest.approx(v, rel=tol, abs=tol), (cid, k)
            else:
                assert v == w or (isinstance(v, float) and math.isnan(w)), (cid, k)


# -- recording what the server side opens -----------------------------------------------------------

_OPENS: dict = {"on": False, "in_node": False, "paths": []}


def _audit(event: str, args: tuple) -> None:
    if _OPENS["on"] and not _OPENS["in_node"] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENS["paths"].append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # an audit hook cannot be removed: it records only while a test turns it on


class NodeGrid(InProcessGrid):
    """Every node's ClientApp runs inside ``send_and_receive``: what opens a file outside it is the server."""

    def send_and_receive(self, messages, *, timeout=None):
        _OPENS["in_node"] = True
        try:
            return super().send_and_receive(messages, timeout=timeout)
        finally:
            _OPENS["in_node"] = False


def _flower(cfg, state: Path, node_files: list, **server_kw):
    """The ServerApp's code (server-side task built from the config without files, as the ServerApp
    does) over 3 in-process nodes, node K given ``node_files[K]`` as its data-path; the paths the
    server side opened."""
    served = nodedata.server_view(cfg)
    app = make_client_app(served, state)
    grid = NodeGrid(app, cfg.task.num_clients, node_configs=[{"data-path": str(f)} for f in node_files])
    _OPENS.update(on=True, paths=[])
    try:
        task = plan.build_task(served)
        results = FlowerServer(served, task, grid, **server_kw).run()
    finally:
        _OPENS["on"] = False
    return results, task, list(_OPENS["paths"])


# -- the config --------------------------------------------------------------------------------------


def test_the_config_says_node_local_data_and_a_string_path_still_works(assets, tmp_path):
    cfg = _cfg(assets)
    assert isinstance(cfg.task.data_path, FileList) and len(cfg.task.data_path) == 3
    (tmp_path / "run.toml").write_text(config.dumps(cfg))  # as a run directory / the Flower app keeps it
    again = config.load(tmp_path / "run.toml")
    assert again.task.data_path == cfg.task.data_path and isinstance(again.task.data_path, FileList)
    one = plan.load(None, _overrides(assets, 'task.partition="natural"', 'task.data_path="x.csv"', 'task.group_column="g"'))
    assert one.task.data_path == "x.csv" and not isinstance(one.task.data_path, FileList)
    # on the nodes only: the config names the kind, model, label_names and columns, no file
    deployed = _cfg(assets, 'task.data_path=""')
    assert nodedata.node_mode(deployed) and nodedata.server_view(cfg) == deployed


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (('task.partition="iid"',), 'one client per file is task.partition = "node"'),
        (("task.label_names=[]",), "needs task.label_names"),
        (("task.num_clients=2",), "gives 3 file(s) for task.num_clients = 2"),
        (('task.dataset="vader"',), "must be csv, tsv or jsonl"),
        (("task.data_path=[1,2]",), "expected a string or a list of strings"),
    ],
)
def test_config_mistakes_are_one_line(assets, extra, needle):
    with pytest.raises(UserError) as e:
        _cfg(assets, *extra)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_file_too_small_to_cut_or_one_path_for_several_clients_is_one_line(assets, tmp_path):
    tiny = _write_csv(tmp_path / "tiny.csv", 1, seed=0)
    with pytest.raises(UserError, match=r"tiny.csv: 1 example\(s\): too few to split into train and test"):
        plan.build_task(_cfg(assets, files=[assets["files"][0], tiny, assets["files"][2]]))
    with pytest.raises(UserError, match="must list one file per client"):
        plan.build_task(_cfg(assets, f'task.data_path="{assets["files"][0]}"'))


def test_dry_run_accepts_node_local_data(assets, tmp_path, capsys):
    from pf2lora.cli import main

    for i, extra in enumerate(((), ('task.data_path=""',))):
        toml = tmp_path / f"c{i}.toml"
        toml.write_text(config.dumps(_cfg(assets, *extra)))
        assert main(["run", str(toml), "--dry-run", "--out", str(tmp_path / "never")]) == 0
    out = capsys.readouterr().out
    assert "client_0 15/5, client_1 20/6, client_2 24/8" in out  # the files' own cuts (test_fraction 0.25)
    assert "on the SuperNodes" in out and "ready        yes" in out  # without files: nothing is missing here
    assert not (tmp_path / "never").exists()


def test_the_local_engine_refuses_data_kept_on_the_nodes_before_any_work(assets, tmp_path, capsys):
    from pf2lora.cli import main

    toml = tmp_path / "c.toml"
    toml.write_text(config.dumps(_cfg(assets, 'task.data_path=""')))
    assert main(["run", str(toml), "--out", str(tmp_path / "R"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the local engine runs every client on this machine" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "R").exists()


def test_a_machine_without_the_files_builds_the_task_but_cannot_train_locally(assets):
    cfg = _cfg(assets, 'task.data_path=""', methods_override(["pf2lora"]))
    task = plan.build_task(cfg)  # the submitting machine: model, LoRA, head, the label set; no data
    assert [type(c) for c in task.clients] == [RemoteClient] * 3 and task.num_labels == 2
    assert "client_1 on its SuperNode" in " ".join(task.report_notes())
    with pytest.raises(RoundFailure, match="crashed"):
        LocalEngine(cfg, task, progress=False).run("pf2lora")
    with pytest.raises(UserError, match="data is on its SuperNode"):
        task.clients[1].num_train  # noqa: B018
    from pf2lora.engines.flower.deploy import run_flower_deploy

    with pytest.raises(FlowerEngineError, match="list one file per client"):
        run_flower_deploy(cfg)  # a loopback federation needs the files here
    with pytest.raises(FlowerEngineError, match="pools every client's data"):
        run_flower_deploy(_cfg(assets, methods_override(["centralized"])))


# -- in-process nodes --------------------------------------------------------------------------------


def test_each_node_reads_its_own_file_and_the_numbers_equal_the_local_engine(assets, tmp_path):
    """Three nodes, each given a different CSV file: every per-client metric equals the local
    engine's reading the same three files as one client per file, and the server side opens
    none of them (it builds its task from the config alone: model, LoRA, head, label set)."""
    cfg = _cfg(assets, "eval.every=1")
    local_task = plan.build_task(cfg)
    local = [LocalEngine(cfg, local_task, progress=False).run(m) for m in cfg.methods]
    flower, server_task, opened = _flower(cfg, tmp_path / "state", assets["files"], adapters_root=tmp_path / "server")
    for a, b in zip(local, flower, strict=True):
        assert [r["train_loss"] for r in a.rounds] == pytest.approx([r["train_loss"] for r in b.rounds], rel=1e-5)
        _close(a.clients, b.clients)
    assert [c.num_train for c in local_task.clients] == [15, 20, 24]
    assert [c.reported for c in server_task.clients] == [(15, 5), (20, 6), (24, 8)]  # from the nodes' hellos
    csvs = {os.path.realpath(f) for f in assets["files"]}
    assert opened and any(str(assets["model"]) in p for p in opened)  # the recorder saw the server load its model
    assert not csvs & set(opened), "the server side opened a client's file"


@pytest.mark.parametrize(
    ("make_bad", "needle"),
    [
        (lambda d: d / "absent.csv", "data file not found"),
        (
            lambda d: _write_csv(d / "odd.csv", 12, seed=1, labels=("neg", "meh")),
            "label column 'label' holds 'meh'; expected one of neg, pos",
        ),
        (lambda d: _write_csv(d / "nolabel.csv", 12, seed=1, label_col="y"), "no column 'label'"),
    ],
)
def test_a_bad_node_file_stops_the_run_before_any_round_with_one_line_naming_the_node(assets, tmp_path, make_bad, needle):
    cfg = _cfg(assets)
    files = list(assets["files"])
    files[1] = make_bad(tmp_path)
    with pytest.raises(FlowerEngineError) as e:
        _flower(cfg, tmp_path / "state", files)
    msg = str(e.value)
    assert "\n" not in msg and "SuperNode 1001 (partition-id 1, client_1)" in msg and needle in msg
    assert "client_0" not in msg.replace("SuperNode 1001", "")  # only the bad node is named
    assert not list((tmp_path / "state").rglob("*.pt"))  # nobody trained: nothing lost anywhere


def test_a_node_without_data_path_is_named(assets, tmp_path):
    cfg = _cfg(assets, 'task.data_path=""')
    app = make_client_app(cfg, tmp_path)
    grid = InProcessGrid(app, 3, node_configs=[{"data-path": str(assets["files"][0])}, {}, {"data-path": str(assets["files"][2])}])
    with pytest.raises(FlowerEngineError, match=r"SuperNode 1001 \(partition-id 1, client_1\): no data-path in its node config"):
        FlowerServer(cfg, plan.build_task(cfg), grid).run()


# -- a loopback deployment ---------------------------------------------------------------------------


@pytest.mark.slow
def test_flower_deploy_on_loopback_with_a_file_per_node_matches_local_and_leaves_no_process(assets, tmp_path, monkeypatch):
    """`--engine flower-deploy` without --superlink: SuperNode K gets file K as its data-path and
    nothing else; the ServerApp process opens none of the files (Python's audit hook, recorded by
    the ServerApp itself), the numbers equal the local engine's, and no process is left behind."""
    from pf2lora.engines.flower.deploy import alive, run_flower_deploy
    from pf2lora.engines.flower.fab import AUDIT_OPENS_ENV

    cfg = _cfg(assets, "rounds=1", methods_override(["pf2lora"]))
    audit = tmp_path / "server-opens.txt"
    monkeypatch.setenv(AUDIT_OPENS_ENV, str(audit))
    started: list[int] = []
    (flower,) = run_flower_deploy(cfg, started=started, workdir=tmp_path / "flower", timeout_s=240)
    (local,) = [LocalEngine(cfg, plan.build_task(cfg), progress=False).run("pf2lora")]
    _close(local.clients, flower.clients)
    assert (tmp_path / "flower" / "node-1.toml").read_text().count(str(assets["files"][1].resolve())) == 1
    assert str(assets["root"]) not in (tmp_path / "flower" / "app" / "pf2lora_fab" / "run.toml").read_text().replace(
        str(assets["model"]), ""
    )  # the app carries the model's name, no client's file
    opened = {os.path.realpath(p) for p in audit.read_text().splitlines()}
    assert any(str(assets["model"]) in p for p in opened)  # the ServerApp recorded its opens
    assert not {os.path.realpath(f) for f in assets["files"]} & opened
    assert len(started) >= 5  # flwr run, SuperLink, 3 SuperNodes (and what they started)
    wait_for(lambda: alive(started) == [], f"the started processes to exit: {alive(started)}")
