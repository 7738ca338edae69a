"""Export to standard PEFT: a fresh base model + PeftModel.from_pretrained reproduces our logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch.func import functional_call
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from pf2lora import lora
from pf2lora import state as st
from pf2lora.export import export_peft, fold, import_peft, unwrap

ALPHA, PRIVATE_ALPHA = 8.0, 3.0
RANK, PRIVATE_RANK = 4, 2
ATOL = 1e-5


def _bert():
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg), ("query", "value")


def _llama():
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg), ("q_proj", "v_proj")


def _gpt2():
    cfg = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return GPT2LMHeadModel(cfg), ("c_attn",)


BUILDERS = {"bert": _bert, "llama": _llama, "gpt2": _gpt2}


def _random_adapter(targets, name, role, rank, g):
    out = {}
    for t in targets:
        k_a, k_b = lora.adapter_keys(t, name, role)
        out[k_a] = torch.randn(rank, t.in_features, generator=g) * 0.3
        out[k_b] = torch.randn(t.out_features, rank, generator=g) * 0.3
    return out


def _setup(kind, tmp_path):
    """Our model with LoRA injected, a fresh-base loader, random adapters and a trained head."""
    torch.manual_seed(0)
    model, names = BUILDERS[kind]()
    model.eval()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    cls = type(model)
    targets = lora.inject(model, names, {lora.COMMON: ALPHA, lora.PRIVATE: PRIVATE_ALPHA})
    g = torch.Generator().manual_seed(1)
    common = _random_adapter(targets, lora.COMMON, st.SHARED, RANK, g)
    private = _random_adapter(targets, lora.PRIVATE, st.PRIVATE, PRIVATE_RANK, g)
    if kind == "bert":  # a trained task head, different from the base model's
        common["shared:classifier.weight"] = torch.randn(3, 32, generator=g)
        common["shared:classifier.bias"] = torch.randn(3, generator=g)
    inputs = {"input_ids": torch.randint(0, 50, (3, 12), generator=g)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])

    def ours(params):
        with torch.no_grad():
            return functional_call(model, st.model_params(params), args=(), kwargs=inputs, strict=False).logits

    def fresh():
        return cls.from_pretrained(base_dir).eval()

    return model, targets, common, private, inputs, ours, fresh


def _peft_logits(fresh, adapter_dir, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. peft's "missing adapter keys" warning
        peft_model = PeftModel.from_pretrained(fresh(), adapter_dir).eval()
    with torch.no_grad():
        return peft_model(**inputs).logits


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_export_matches_logits(kind, tmp_path):
    model, targets, common, private, inputs, ours, fresh = _setup(kind, tmp_path)
    personal = {**common, **private}
    logits_personal, logits_common = ours(personal), ours(common)
    assert not torch.allclose(logits_personal, logits_common, atol=1e-3)  # the private adapter matters

    out = export_peft(model, targets, personal, tmp_path / "personal", base_model_name_or_path="base")
    got = _peft_logits(fresh, out, inputs)
    torch.testing.assert_close(got, logits_personal, atol=ATOL, rtol=0)

    out = export_peft(model, targets, common, tmp_path / "common")
    got = _peft_logits(fresh, out, inputs)
    torch.testing.assert_close(got, logits_common, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_exported_format(kind, tmp_path):
    model, targets, common, private, _, _, _ = _setup(kind, tmp_path)
    out = export_peft(model, targets, {**common, **private}, tmp_path / "a", base_model_name_or_path="my/base")
    cfg = json.loads((out / "adapter_config.json").read_text())
    total = RANK + PRIVATE_RANK
    assert cfg["peft_type"] == "LORA" and cfg["r"] == total and cfg["lora_alpha"] == total
    assert cfg["base_model_name_or_path"] == "my/base"
    assert cfg["fan_in_fan_out"] is (kind == "gpt2")
    assert cfg["modules_to_save"] == (["classifier"] if kind == "bert" else None)
    weights = load_file(out / "adapter_model.safetensors")
    a_keys = [k for k in weights if k.endswith("lora_A.weight")]
    assert len(a_keys) == len(targets)
    assert all(weights[k].shape[0] == total for k in a_keys)
    if kind == "bert":
        torch.testing.assert_close(weights["base_model.model.classifier.weight"], common["shared:classifier.weight"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_fold_is_the_layer_update(tmp_path):
    model, targets, common, private, _, _, _ = _setup("llama", tmp_path)
    folded, heads = fold(model, targets, {**common, **private})
    assert heads == {}
    deltas = lora.delta_weights(model, targets, st.model_params(common, private))
    for t in targets:
        A, B = folded[t.path]
        torch.testing.assert_close(B @ A, deltas[t.path], atol=1e-6, rtol=0)


def test_private_head_and_task_type(tmp_path):
    """A private head exports the same; task_type='SEQ_CLS' loads as PeftModelForSequenceClassification."""
    model, targets, common, private, inputs, ours, fresh = _setup("bert", tmp_path)
    params = {k: v for k, v in common.items() if ".lora_" in k} | private
    params["private:classifier.weight"] = common["shared:classifier.weight"]  # bias: the model's own
    out = export_peft(model, targets, params, tmp_path / "seqcls", task_type="SEQ_CLS")
    peft_model = PeftModel.from_pretrained(fresh(), out).eval()
    assert type(peft_model).__name__ == "PeftModelForSequenceClassification"
    with torch.no_grad():
        got = peft_model(**inputs).logits
    torch.testing.assert_close(got, ours(params), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_import_round_trip(kind, tmp_path):
    model, targets, common, private, inputs, ours, _ = _setup(kind, tmp_path)
    personal = {**common, **private}
    out = export_peft(model, targets, personal, tmp_path / "a")
    imported = import_peft(model, targets, out, adapter=lora.COMMON, role=st.SHARED, head_role=st.PRIVATE)
    assert all(st.role_of(k) == st.SHARED for k in imported if ".lora_" in k)
    assert all(v.shape[0] == RANK + PRIVATE_RANK for k, v in imported.items() if ".lora_A." in k)
    if kind == "bert":
        assert set(k for k in imported if ".lora_" not in k) == {"private:classifier.weight", "private:classifier.bias"}
    torch.testing.assert_close(ours(imported), ours(personal), atol=ATOL, rtol=0)


def test_overwrite_and_errors(tmp_path):
    model, targets, common, private, _, _, _ = _setup("llama", tmp_path)
    out = export_peft(model, targets, common, tmp_path / "a")
    export_peft(model, targets, {**common, **private}, tmp_path / "a")  # replaced atomically
    assert json.loads((out / "adapter_config.json").read_text())["r"] == RANK + PRIVATE_RANK
    with pytest.raises(FileExistsError):
        export_peft(model, targets, common, tmp_path / "a", overwrite=False)
    with pytest.raises(ValueError, match="nothing to export"):
        export_peft(model, targets, {}, tmp_path / "b")
    bad = dict(common)
    bad["shared:model.layers.0.self_attn.k_proj.lora_A.common"] = torch.zeros(RANK, 32)
    with pytest.raises(ValueError, match="not a LoRA target"):
        export_peft(model, targets, bad, tmp_path / "b")
    with pytest.raises(ValueError, match="held twice"):
        export_peft(model, targets, {**common, **{k.replace("shared:", "private:"): v for k, v in common.items()}}, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_unwrap_restores_base(tmp_path):
    model, targets, _, _, inputs, _, fresh = _setup("gpt2", tmp_path)
    unwrap(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, fresh()(**inputs).logits)
