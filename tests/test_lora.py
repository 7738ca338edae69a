"""The LoRA layer: forward pass and delta_weight agree, any rank, adapters passed at call time."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from pf2lora import lora
from pf2lora import state as st


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 4, bias=True)
        self.other = nn.Linear(4, 4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.other(self.proj(inputs))


def test_forward_equals_base_plus_delta_weight():
    torch.manual_seed(0)
    net = _Net()
    targets = lora.inject(net, ["proj"], {lora.COMMON: 3.0, lora.PRIVATE: 0.5})
    assert targets == [lora.LoRATarget("proj", 6, 4)]
    assert not any(p.requires_grad for p in net.parameters())
    layer = net.proj
    A = {lora.COMMON: torch.randn(3, 6), lora.PRIVATE: torch.randn(2, 6)}
    B = {lora.COMMON: torch.randn(4, 3), lora.PRIVATE: torch.randn(4, 2)}
    params = {f"proj.lora_A.{a}": A[a] for a in A} | {f"proj.lora_B.{a}": B[a] for a in B}
    u = torch.randn(5, 6)
    out = functional_call(layer, {k.removeprefix("proj."): v for k, v in params.items()}, (u,), strict=False)
    delta = layer.delta_weight(A, B)
    want_delta = (3.0 / 3) * B[lora.COMMON] @ A[lora.COMMON] + (0.5 / 2) * B[lora.PRIVATE] @ A[lora.PRIVATE]
    torch.testing.assert_close(delta, want_delta)
    torch.testing.assert_close(out, u @ (layer.base.weight + delta).T + layer.base.bias)
    torch.testing.assert_close(lora.delta_weights(net, targets, params)["proj"], want_delta)
    # No adapter passed: the frozen model, unchanged.
    torch.testing.assert_close(layer(u), layer.base(u))


def test_init_adapter_and_keys():
    net = _Net()
    targets = lora.inject(net, ["proj", "other"], {lora.COMMON: 1.0})
    ad = lora.init_adapter(targets, lora.COMMON, st.SHARED, 3, torch.Generator().manual_seed(0))
    assert sorted(ad) == sorted(
        [*lora.adapter_keys(targets[0], lora.COMMON, st.SHARED), *lora.adapter_keys(targets[1], lora.COMMON, st.SHARED)]
    )
    a, b = lora.adapter_keys(targets[0], lora.COMMON, st.SHARED)
    assert a == "shared:proj.lora_A.common" and b == "shared:proj.lora_B.common"
    assert ad[a].shape == (3, 6) and ad[b].shape == (4, 3)
    assert ad[a].abs().max() <= 1 / 6**0.5 and ad[a].any() and not ad[b].any()


def test_inject_without_match_raises():
    with pytest.raises(ValueError, match="nothing"):
        lora.inject(_Net(), ["nothing"], {lora.COMMON: 1.0})


def test_model_params_refuses_a_parameter_held_twice():
    t = torch.zeros(1)
    assert st.model_params({"shared:a": t}, {"private:b": t}) == {"a": t, "b": t}
    with pytest.raises(ValueError):
        st.model_params({"shared:a": t}, {"private:a": t})
    with pytest.raises(ValueError):
        st.role_of("common:a")


def test_key_grammar_names_and_parses_adapter_factors():
    t = lora.LoRATarget("enc.proj", 6, 4)
    a, b = lora.adapter_keys(t, lora.PRIVATE, st.PRIVATE)
    assert (st.path_of(a), st.path_of(b)) == (lora.a_path("enc.proj", lora.PRIVATE), lora.b_path("enc.proj", lora.PRIVATE))
    assert lora.is_a(a) and not lora.is_b(a) and lora.is_b(b) and not lora.is_a(b)
    assert lora.is_adapter(a) and lora.is_adapter(b) and not lora.is_adapter("private:classifier.weight")
    assert lora.b_of(a) == b
    assert lora.split_path(st.path_of(b)) == ("enc.proj", "B", lora.PRIVATE)
    assert lora.split_path("classifier.weight") is None
    assert lora.rank_of({"private:classifier.weight": torch.zeros(2, 9), b: torch.zeros(4, 5), a: torch.zeros(5, 6)}) == 5


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=16, n_embd=8, n_layer=1, n_head=2, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    lora.inject(model, ["c_attn"], {lora.COMMON: 2.0})
    return model


def test_parameter_slots_call_is_functional_call():
    """Same outputs and gradients as ``functional_call``, the model's own parameters untouched
    afterwards (also when the call raises), unknown keys refused, a tied weight under both names."""
    model = _tiny_gpt2()
    slots = lora.ParameterSlots(model)
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    embedding = model.transformer.wte.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 8, generator=g, requires_grad=True)
    B = torch.randn(24, 3, generator=g, requires_grad=True)
    params = {"transformer.h.0.attn.c_attn.lora_A.common": A, "transformer.h.0.attn.c_attn.lora_B.common": B}
    inputs = {"input_ids": torch.randint(0, 40, (2, 5), generator=g)}

    ours = slots.call(params, inputs).logits
    (ga, gb) = torch.autograd.grad(ours.square().sum(), (A, B))
    theirs = functional_call(model, params, args=(), kwargs=inputs, strict=False).logits
    (wa, wb) = torch.autograd.grad(theirs.square().sum(), (A, B))
    assert torch.equal(ours, theirs) and torch.equal(ga, wa) and torch.equal(gb, wb)
    assert ours.abs().sum() > 0 and not torch.equal(ours, model(**inputs).logits)  # the adapter was used
    assert all(p is before[n] for n, p in model.named_parameters(remove_duplicate=False))

    with pytest.raises(KeyError, match="not parameters of the model"):
        slots.call({"transformer.h.0.attn.c_attn.lora_A.typo": A}, inputs)
    with pytest.raises(RuntimeError):  # a shape the layer cannot use: the call fails part-way
        slots.call({**params, "transformer.h.0.attn.c_attn.lora_B.common": torch.randn(5, 3)}, inputs)
    assert all(p is before[n] for n, p in model.named_parameters(remove_duplicate=False))

    wte = torch.randn(40, 8, generator=g)  # tied to lm_head.weight: both names take it
    assert {"transformer.wte.weight", "lm_head.weight"} <= slots._tied
    tied = slots.call({"transformer.wte.weight": wte}, inputs).logits
    other = copy.deepcopy(model)  # the reference: a model whose (tied) embedding is that tensor
    with torch.no_grad():
        other.transformer.wte.weight.copy_(wte)
    assert torch.equal(tied, other(**inputs).logits)
    assert torch.equal(model.transformer.wte.weight, embedding)  # the model's own values untouched
