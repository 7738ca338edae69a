"""Client-level DP (DP-FedAvg Gaussian mechanism) and its RDP accountant (pf2lora.privacy)."""

from __future__ import annotations

import json

import pytest
import torch

from pf2lora import robust
from pf2lora.privacy import PrivacyAccountant, dp_aggregate

A = "shared:layer.lora_A.common"
B = "shared:layer.lora_B.common"


def state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: scale * torch.randn(4, 8, generator=g), B: scale * torch.randn(6, 4, generator=g)}


def test_no_noise_equals_clipped_uniform_mean():
    ref = state(0)
    # two large deltas (clipped), one small (kept)
    updates = [state(1), state(2, scale=3.0), {k: v + 1e-3 for k, v in ref.items()}]
    before = [{k: v.clone() for k, v in u.items()} for u in updates]
    out = dp_aggregate(ref, updates, clip_norm=0.7, noise_multiplier=0.0, generator=torch.Generator().manual_seed(0))
    clipped = [robust.clip_update(u, ref, 0.7)[0] for u in updates]
    expected = robust.weighted_mean(clipped, [1.0, 1.0, 1.0])
    assert list(out) == list(ref)
    for k in ref:
        assert torch.allclose(out[k], expected[k], atol=1e-6)
        assert out[k].dtype == ref[k].dtype
    assert all(torch.equal(u[k], b[k]) for u, b in zip(updates, before) for k in u)
    # the released delta's norm is at most clip_norm (mean of vectors within the ball)
    assert robust.global_norm({k: out[k] - ref[k] for k in ref}) <= 0.7 + 1e-5


def test_noise_std_matches_calibration():
    big = 200
    ref = {A: torch.zeros(big, big)}  # 40k coordinates
    m, clip, z = 4, 2.0, 1.5
    updates = [{A: torch.zeros(big, big)} for _ in range(m)]  # zero deltas: the output is the noise
    out = dp_aggregate(ref, updates, clip, z, torch.Generator().manual_seed(123))
    noise = out[A].double()
    expected = z * clip / m
    # std of a sample std of n Gaussians ~ sigma / sqrt(2n): 5 sigma tolerance
    tol = 5 * expected / (2 * noise.numel()) ** 0.5
    assert abs(float(noise.std()) - expected) < tol
    assert abs(float(noise.mean())) < 5 * expected / noise.numel() ** 0.5


def test_noise_is_reproducible_and_seed_dependent():
    ref, updates = state(0), [state(1), state(2)]
    a = dp_aggregate(ref, updates, 1.0, 1.0, torch.Generator().manual_seed(5))
    b = dp_aggregate(ref, updates, 1.0, 1.0, torch.Generator().manual_seed(5))
    c = dp_aggregate(ref, updates, 1.0, 1.0, torch.Generator().manual_seed(6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[A], c[A])


def test_dp_aggregate_validates():
    ref, g = state(0), torch.Generator()
    with pytest.raises(ValueError, match="at least one"):
        dp_aggregate(ref, [], 1.0, 1.0, g)
    for clip in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip_norm"):
            dp_aggregate(ref, [ref], clip, 1.0, g)
    for z in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise_multiplier"):
            dp_aggregate(ref, [ref], 1.0, z, g)
    with pytest.raises(ValueError, match="generator"):
        dp_aggregate(ref, [ref], 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="key sets"):
        dp_aggregate(ref, [{A: ref[A]}], 1.0, 1.0, g)
    with pytest.raises(ValueError, match="not finite"):
        dp_aggregate(ref, [{**ref, A: torch.full((4, 8), float("nan"))}], 1.0, 1.0, g)


# -- accountant --------------------------------------------------------------------------------


def test_opacus_import_leaves_root_logging_alone():
    """Opacus runs logging.basicConfig on import; the accountant undoes it. (First accountant test
    in the file, so in a normal run this is where opacus is first imported.)"""
    import logging

    before = list(logging.getLogger().handlers)
    PrivacyAccountant(1.0, 0.1, 1e-5)
    assert logging.getLogger().handlers == before


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    acc = PrivacyAccountant(1.0, 0.1, 1e-5)
    assert acc.epsilon() == 0.0
    eps = []
    for _ in range(5):
        acc.step()
        eps.append(acc.epsilon())
    assert all(b > a > 0 for a, b in zip(eps, eps[1:]))
    assert acc.steps == 5
    noisier = PrivacyAccountant(2.0, 0.1, 1e-5)
    for _ in range(5):
        noisier.step()
    assert noisier.epsilon() < eps[-1]
    assert acc.epsilon(delta=1e-3) < acc.epsilon()  # a looser delta costs less epsilon


def test_matches_opacus_directly():
    ours = PrivacyAccountant(1.1, 0.25, 1e-5)
    RDPAccountant = type(ours._accountant)  # opacus' class, without importing opacus here (see above)
    assert f"{RDPAccountant.__module__}.{RDPAccountant.__name__}" == "opacus.accountants.rdp.RDPAccountant"
    theirs = RDPAccountant()
    for _ in range(20):
        ours.step()
        theirs.step(noise_multiplier=1.1, sample_rate=0.25)
    assert ours.epsilon() == pytest.approx(theirs.get_epsilon(delta=1e-5), rel=1e-12)


def test_state_dict_round_trip_through_json():
    acc = PrivacyAccountant(1.0, 0.5, 1e-5)
    for _ in range(7):
        acc.step()
    saved = json.loads(json.dumps(acc.state_dict()))
    restored = PrivacyAccountant(1.0, 0.5, 1e-5)
    restored.load_state_dict(saved)
    assert restored.steps == 7 and restored.epsilon() == acc.epsilon()
    acc.step()
    restored.step()  # continues the same history entry after the restore
    assert restored.epsilon() == acc.epsilon() and len(restored.state_dict()["history"]) == 1
    # a resumed run with another noise multiplier composes both histories
    other = PrivacyAccountant(2.0, 0.5, 1e-5)
    other.load_state_dict(saved)
    other.step()
    assert [h[0] for h in other.state_dict()["history"]] == [1.0, 2.0]


def test_accountant_validates():
    for args in [
        (0.0, 0.1, 1e-5),
        (-1.0, 0.1, 1e-5),
        (float("nan"), 0.1, 1e-5),
        (1.0, 0.0, 1e-5),
        (1.0, 1.5, 1e-5),
        (1.0, 0.1, 0.0),
        (1.0, 0.1, 1.0),
        (True, 0.1, 1e-5),
    ]:
        with pytest.raises(ValueError):
            PrivacyAccountant(*args)
    acc = PrivacyAccountant(1.0, 0.1, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        acc.epsilon(delta=2.0)
    for bad in [
        None,
        {},
        {"history": 3},
        {"history": [[1.0, 0.1]]},
        {"history": [[1.0, 0.1, 0]]},
        {"history": [[1.0, 2.0, 1]]},
        {"history": [], "mechanism": "gdp"},
    ]:
        with pytest.raises(ValueError):
            acc.load_state_dict(bad)
