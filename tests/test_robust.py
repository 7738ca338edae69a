"""Server-side safety: upload validation, delta clipping, robust aggregation (pf2lora.robust)."""

from __future__ import annotations

import pytest
import torch

from pf2lora import robust
from pf2lora.methods.base import weighted_mean as base_weighted_mean

A = "shared:layer.lora_A.common"
B = "shared:layer.lora_B.common"
H = "shared:head.weight"


def upload(rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(rank, 8, generator=g), B: torch.randn(6, rank, generator=g), H: torch.randn(3, 6, generator=g)}


SPEC = robust.default_upload_spec(upload())


# -- validation --------------------------------------------------------------------------------


def test_default_spec_is_shared_shapes_only():
    received = {**upload(), "private:layer.lora_A.private": torch.zeros(2, 8), "meta/rank/c0": torch.tensor(3)}
    assert robust.default_upload_spec(received) == {A: (4, 8), B: (6, 4), H: (3, 6)}


def test_valid_upload_accepted():
    assert robust.validate_update(upload(), SPEC) is None


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda u: u.pop(B), "missing 1 key"),
        (lambda u: u.__setitem__("shared:extra", torch.zeros(1)), "unexpected 1 key"),
        (lambda u: u.__setitem__("private:layer.lora_A.private", torch.zeros(2, 8)), "outside 'shared:'"),
        (lambda u: u.__setitem__("meta/rank", torch.tensor(1)), "outside 'shared:'"),
        (lambda u: u.__setitem__(A, torch.zeros(4, 8, 1)), "3 dim(s)"),
        (lambda u: u.__setitem__(A, torch.zeros(4, 9)), "shape [4, 9]"),
        (lambda u: u.__setitem__(A, torch.zeros(4, 8, dtype=torch.float64)), "dtype torch.float64"),
        (lambda u: u.__setitem__(A, torch.zeros(4, 8, dtype=torch.int64)), "dtype torch.int64"),
        (lambda u: u.__setitem__(A, [[0.0] * 8] * 4), "not a tensor"),
        (lambda u: u.__setitem__(A, None), "not a tensor"),
        (lambda u: u.__setitem__(7, torch.zeros(1)), "not strings"),
        (lambda u: u.__setitem__(A, torch.zeros(4, 8).to_sparse()), "not a dense tensor"),
        (lambda u: u.__setitem__(A, torch.zeros(4, 8, device="meta")), "meta tensor"),
    ],
)
def test_each_defect_is_caught(mutate, fragment):
    u = upload()
    mutate(u)
    reason = robust.validate_update(u, SPEC)
    assert reason is not None and fragment in reason, reason
    assert "\n" not in reason


def test_non_finite_rejected_and_counted():
    u = upload()
    u[B] = u[B].clone()
    u[B][0, 0] = float("nan")
    u[B][1, 1] = float("inf")
    u[B][2, 2] = float("-inf")
    reason = robust.validate_update(u, SPEC)
    assert reason is not None and "3 non-finite value(s)" in reason and repr(B) in reason


def test_not_a_mapping_and_weird_keys_never_raise():
    assert "not a mapping" in robust.validate_update([1, 2], SPEC)
    assert "not a mapping" in robust.validate_update(None, SPEC)
    weird = {("tuple", "key"): torch.zeros(1), "x\ny" * 50: 1}
    reason = robust.validate_update(weird, SPEC)
    assert reason is not None and "\n" not in reason


def test_many_missing_keys_are_abbreviated():
    spec = {f"shared:k{i}": (1,) for i in range(10)}
    reason = robust.validate_update({}, spec)
    assert "missing 10 key(s)" in reason and "(+7 more)" in reason


def test_wildcard_ranks():
    spec = robust.rank_wildcard_spec(upload(rank=8))
    assert spec == {A: (None, 8), B: (6, None), H: (3, 6)}
    for r in (1, 3, 8):
        assert robust.validate_update(upload(rank=r), spec) is None
    assert "shape [0, 8]" in robust.validate_update({**upload(), A: torch.zeros(0, 8)}, spec)  # rank 0: no
    assert "expected [*, 8]" in robust.validate_update({**upload(), A: torch.zeros(3, 7)}, spec)
    assert robust.validate_update(upload(rank=3), SPEC) is not None  # exact spec refuses another rank


def test_dtype_none_accepts_any_float():
    u = {k: v.double() for k, v in upload().items()}
    assert robust.validate_update(u, SPEC, dtype=None) is None
    assert robust.validate_update(u, SPEC) is not None
    assert "not floating point" in robust.validate_update({k: v.long() for k, v in u.items()}, SPEC, dtype=None)


def test_screen():
    bad = {**upload(), B: torch.full((6, 4), float("nan"))}
    ok, rejected = robust.screen([upload(), bad, {}], SPEC)
    assert ok == [0] and set(rejected) == {1, 2}


# -- clipping ----------------------------------------------------------------------------------


def test_clip_reduces_norm_to_max_norm():
    ref, u = upload(seed=1), upload(seed=2)
    norm = robust.global_norm({k: u[k] - ref[k] for k in u})
    before = {k: v.clone() for k, v in u.items()}
    clipped, original = robust.clip_update(u, ref, 0.5)
    assert original == pytest.approx(norm, rel=1e-6)
    assert norm > 0.5
    assert robust.global_norm({k: clipped[k] - ref[k] for k in u}) == pytest.approx(0.5, rel=1e-5)
    # same direction
    d0 = torch.cat([(u[k] - ref[k]).flatten() for k in sorted(u)])
    d1 = torch.cat([(clipped[k] - ref[k]).flatten() for k in sorted(u)])
    assert torch.allclose(d1, d0 * (0.5 / norm), atol=1e-6)
    assert all(torch.equal(u[k], before[k]) for k in u)  # not mutated


def test_clip_leaves_small_delta_unchanged():
    ref = upload(seed=1)
    u = {k: v + 1e-3 for k, v in ref.items()}
    clipped, original = robust.clip_update(u, ref, 10.0)
    assert original < 10.0
    assert all(torch.equal(clipped[k], u[k]) and clipped[k] is not u[k] for k in u)


def test_clip_rejects_bad_input():
    ref = upload()
    with pytest.raises(ValueError, match="max_norm"):
        robust.clip_update(ref, ref, 0.0)
    with pytest.raises(ValueError, match="max_norm"):
        robust.clip_update(ref, ref, float("inf"))
    with pytest.raises(ValueError, match="key sets"):
        robust.clip_update({A: ref[A]}, ref, 1.0)
    with pytest.raises(ValueError, match="shape"):
        robust.clip_update({**ref, A: torch.zeros(2, 8)}, ref, 1.0)
    with pytest.raises(ValueError, match="not finite"):
        robust.clip_update({**ref, A: torch.full((4, 8), float("nan"))}, ref, 1.0)


# -- aggregation -------------------------------------------------------------------------------


def honest_and_attacker(n_honest: int = 6) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    honest = [{k: v * 0.1 + 1.0 for k, v in upload(seed=s).items()} for s in range(n_honest)]
    attacker = {k: v * 1e6 for k, v in upload(seed=99).items()}
    return honest, [*honest, attacker]


def test_weighted_mean_matches_base():
    states = [upload(seed=s) for s in range(4)]
    w = [1.0, 2.0, 3.0, 4.0]
    ours, theirs = robust.weighted_mean(states, w), base_weighted_mean(states, w)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
    with pytest.raises(ValueError, match="sum to zero"):
        robust.weighted_mean(states, [0, 0, 0, 0])
    with pytest.raises(ValueError, match=">= 0"):
        robust.weighted_mean(states, [1, -1, 1, 1])
    with pytest.raises(ValueError, match="weights"):
        robust.weighted_mean(states, [1, 1])


def test_median_odd_and_even():
    s = [{"shared:x": torch.tensor([float(v), -float(v)])} for v in (3, 1, 2)]
    assert torch.equal(robust.coordinate_median(s)["shared:x"], torch.tensor([2.0, -2.0]))
    s.append({"shared:x": torch.tensor([10.0, -10.0])})
    assert torch.equal(robust.coordinate_median(s)["shared:x"], torch.tensor([2.5, -2.5]))


def test_trimmed_mean_by_hand():
    s = [{"shared:x": torch.tensor([float(v)])} for v in (1, 2, 3, 4, 100)]
    assert robust.trimmed_mean(s, 0.2)["shared:x"].item() == pytest.approx(3.0)  # k=1: mean(2,3,4)
    assert robust.trimmed_mean(s, 0.1)["shared:x"].item() == pytest.approx(22.0)  # k=0
    assert robust.trim_count(5, 0.49) == 2
    with pytest.raises(ValueError, match="trim_fraction"):
        robust.trimmed_mean(s, 0.5)
    with pytest.raises(ValueError, match="trim_fraction"):
        robust.trimmed_mean(s, -0.1)


def test_trim_zero_equals_mean():
    states = [upload(seed=s) for s in range(5)]
    a = robust.trimmed_mean(states, 0.0)
    b = robust.weighted_mean(states, [1.0] * 5)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_robust_aggregators_resist_one_scaled_update(name):
    honest, attacked = honest_and_attacker()
    target = robust.weighted_mean(honest, [1.0] * len(honest))
    robust_out = robust.aggregate(name, attacked, [1.0] * len(attacked), 0.2)
    mean_out = robust.aggregate("mean", attacked, [1.0] * len(attacked), 0.2)
    for k in target:
        assert (robust_out[k] - target[k]).abs().max() < 0.5
        assert (mean_out[k] - target[k]).abs().max() > 1e4


def test_aggregators_reject_mismatch_and_unknown():
    with pytest.raises(ValueError, match="no states"):
        robust.coordinate_median([])
    with pytest.raises(ValueError, match="key sets"):
        robust.trimmed_mean([upload(), {A: upload()[A]}], 0.0)
    with pytest.raises(ValueError, match="shape"):
        robust.coordinate_median([upload(rank=4), upload(rank=3)])
    with pytest.raises(ValueError, match="unknown aggregator"):
        robust.aggregate("krum", [upload()], [1.0])
    assert set(robust.AGGREGATORS) == {"mean", "median", "trimmed-mean"}


def test_aggregators_do_not_mutate_or_alias():
    states = [upload(seed=s) for s in range(3)]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    for name in robust.AGGREGATORS:
        out = robust.aggregate(name, states, [1.0, 1.0, 1.0], 0.0)
        for k in out:
            out[k].add_(1.0)
    assert all(torch.equal(s[k], b[k]) for s, b in zip(states, before) for k in s)


def test_non_finite_check_names_the_first_bad_key_in_order(packing):
    """The one-reduction check reports what the key-by-key check did: the first key (sorted) with
    a problem, a non-finite value before a later key's wrong shape, and a shape before a later
    key's non-finite value."""
    u = upload()  # sorted: H, A, B
    u[B] = torch.full((6, 4), float("nan"))
    u[A] = u[A].clone()
    u[A][0, 0] = float("inf")
    reason = robust.validate_update(u, SPEC)
    assert reason is not None and repr(A) in reason and "1 non-finite value(s) of 32" in reason
    u = upload()
    u[A] = u[A].clone()
    u[A][1, 1] = float("nan")
    u[B] = torch.zeros(5, 4)  # a wrong shape after the bad value
    reason = robust.validate_update(u, SPEC)
    assert reason is not None and repr(A) in reason and "non-finite" in reason
    u = upload()
    u[A] = torch.zeros(5, 8)  # a wrong shape before the bad value
    u[B] = torch.full((6, 4), float("-inf"))
    reason = robust.validate_update(u, SPEC)
    assert reason is not None and repr(A) in reason and "shape" in reason
    big = {k: v * 1e30 for k, v in upload().items()}  # finite, however large (no norm that overflows)
    assert robust.validate_update(big, SPEC) is None


def test_weighted_mean_is_the_key_by_key_arithmetic_exactly(packing):
    """Packing the keys into one vector per state changes no bit of the mean (float64 either way)
    and keeps integer entries on their own path; the results alias no input."""
    states = [{**upload(seed=s), "shared:count": torch.tensor([s, 2 * s])} for s in range(5)]
    w = [1.0, 2.0, 3.0, 0.5, 7.0]
    total = sum(w)
    ours = robust.weighted_mean(states, w)
    assert list(ours) == list(states[0])
    for k in states[0]:
        wide = [s[k].double() if s[k].is_floating_point() else s[k] for s in states]
        by_key = sum((x / total) * t for t, x in zip(wide, w, strict=True)).to(states[0][k].dtype)
        assert torch.equal(ours[k], by_key) and ours[k].dtype == states[0][k].dtype, k
    inputs = {t.data_ptr() for s in states for t in s.values()}
    assert not any(t.data_ptr() in inputs for t in ours.values())
