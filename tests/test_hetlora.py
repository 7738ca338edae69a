"""HETLoRA's heterogeneous-rank bookkeeping: a client of rank r_k applies alpha / r_k, the server's
rank-r_max adapter alpha / r_max; broadcast and aggregation must keep Delta W meaning the same."""

from __future__ import annotations

import pytest
import torch

from conftest import small_task
from pf2lora import lora
from pf2lora import state as st
from pf2lora.methods import ClientUpdate
from pf2lora.methods.hetlora import HETLoRA

R_MIN, R_MAX, ALPHA = 2, 6, 3.0


@pytest.fixture
def het():
    cfg, task = small_task(
        f"hetlora.rank_min={R_MIN}", f"hetlora.rank_max={R_MAX}", f"lora.alpha={ALPHA}", "lora.rank=4", "lora.private_rank=2"
    )
    return HETLoRA(cfg, task)


def _server(method: HETLoRA, seed: int = 0) -> st.Tensors:
    server = method.init_server(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    server = {k: torch.randn(v.shape, generator=g) for k, v in server.items()}  # B non-zero too
    (t,) = method.task.targets
    k_a, k_b = lora.adapter_keys(t, lora.COMMON, st.SHARED)
    assert server[k_a].shape[0] == R_MAX and server[k_b].shape[1] == R_MAX
    return server


def _keys(method: HETLoRA) -> tuple[str, str]:
    (t,) = method.task.targets
    return lora.adapter_keys(t, lora.COMMON, st.SHARED)


def _client_delta(method: HETLoRA, adapter: st.Tensors) -> torch.Tensor:
    """The client's Delta W exactly as its LoRA layer applies it (scale alpha / rank of A)."""
    k_a, k_b = _keys(method)
    layer = method.task.model.get_submodule(method.task.targets[0].path)
    assert isinstance(layer, lora.LoRALinear)
    return layer.delta_weight({lora.COMMON: adapter[k_a]}, {lora.COMMON: adapter[k_b]})


def _server_truncated_delta(method: HETLoRA, server: st.Tensors, rank: int) -> torch.Tensor:
    k_a, k_b = _keys(method)
    return (ALPHA / R_MAX) * server[k_b][:, :rank] @ server[k_a][:rank]


def _check_broadcast(method: HETLoRA, server: st.Tensors, ranks: dict[str, int]) -> float:
    """Largest relative error between a client's applied Delta W and the server's truncated one."""
    k_a, _ = _keys(method)
    server = {**server, **{f"meta/rank/{c}": torch.tensor(r) for c, r in ranks.items()}}
    worst = 0.0
    for cid, r in ranks.items():
        received = method.broadcast(server, cid)
        assert received[k_a].shape[0] == r
        assert not any(k.startswith("meta/") for k in received)
        want = _server_truncated_delta(method, server, r)
        got = _client_delta(method, received)
        worst = max(worst, float((got - want).norm() / want.norm()))
    return worst


def test_broadcast_keeps_delta_w_at_each_client_rank(het):
    assert (het.rank_min, het.rank_max) == (R_MIN, R_MAX)
    server = _server(het)
    assert _check_broadcast(het, server, {"client_0": 2, "client_1": 5}) < 1e-6


def test_broadcast_model_output_matches_server_truncation(het):
    """Through the real forward pass: the client's model is W0 + the server's truncated Delta W."""
    server = _server(het)
    cid = het.task.clients[1].client_id
    received = het.broadcast({**server, f"meta/rank/{cid}": torch.tensor(3)}, cid)
    batch = {k: v[:8] for k, v in het.task.clients[1].test.items()}
    out = het.task.forward(st.model_params(received), batch)
    w0 = het.task.model.get_submodule(het.task.targets[0].path).base.weight
    want = batch["inputs"] @ (w0 + _server_truncated_delta(het, server, 3)).T
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


class _NaiveHETLoRA(HETLoRA):
    """The classic bug: slice and zero-pad B without converting between alpha/r_k and alpha/r_max."""

    def to_client(self, server, rank):
        return {k: (v[:, :rank] if lora.is_b(k) else v[:rank]) for k, v in server.items() if not st.is_meta(k)}

    def to_server(self, upload):
        out = {}
        for k, v in upload.items():
            if lora.is_b(k):
                out[k] = torch.zeros(v.shape[0], self.rank_max).index_copy_(1, torch.arange(v.shape[1]), v)
            else:
                out[k] = torch.zeros(self.rank_max, v.shape[1]).index_copy_(0, torch.arange(v.shape[0]), v)
        return out


def test_the_scale_check_catches_a_missing_conversion(het):
    naive = _NaiveHETLoRA(het.cfg, het.task)
    assert _check_broadcast(naive, _server(het), {"client_0": 2, "client_1": 5}) > 0.1


def _round_trip_error(method: HETLoRA, server: st.Tensors, rank: int) -> float:
    """Clients of one rank send back what they received; re-broadcast; compare each client's Delta W."""
    ids = [c.client_id for c in method.task.clients]
    server = {**server, **{f"meta/rank/{c}": torch.tensor(rank) for c in ids}}
    received = {c: st.clone(method.broadcast(server, c)) for c in ids}
    updates = [ClientUpdate(c, st.outgoing(received[c]), n) for c, n in zip(ids, (10, 40), strict=True)]
    new_server = method.aggregate(server, updates)
    assert all(int(new_server[f"meta/rank/{c}"]) == rank for c in ids)
    worst = 0.0
    for c in ids:
        before = _client_delta(method, received[c])
        after = _client_delta(method, method.broadcast(new_server, c))
        worst = max(worst, float((after - before).norm() / before.norm()))
    return worst


@pytest.mark.parametrize("rank", [R_MIN, 4, R_MAX])
def test_aggregate_then_broadcast_preserves_delta_w(het, rank):
    assert _round_trip_error(het, _server(het), rank) < 1e-6


class _NoUploadRescale(HETLoRA):
    """Rescales on the way out but forgets to rescale the upload back to alpha / r_max."""

    to_server = _NaiveHETLoRA.to_server


@pytest.mark.parametrize("rank", [R_MIN, 4])
def test_round_trip_check_catches_a_missing_upload_conversion(het, rank):
    half = _NoUploadRescale(het.cfg, het.task)
    assert _check_broadcast(half, _server(het), {"client_0": rank}) < 1e-6  # broadcast alone is fine
    assert _round_trip_error(half, _server(het), rank) > 0.1


def test_upload_is_stored_at_server_scale(het):
    """to_server(to_client(S, r)) is S's first r ranks, zero-padded: no drift of B by r / r_max."""
    server = _server(het)
    k_a, k_b = _keys(het)
    for r in (R_MIN, 4, R_MAX):
        back = het.to_server(het.to_client(server, r))
        torch.testing.assert_close(back[k_b][:, :r], server[k_b][:, :r])
        torch.testing.assert_close(back[k_a][:r], server[k_a][:r])
        assert not back[k_b][:, r:].any() and not back[k_a][r:].any()


def test_aggregate_records_ranks_and_pads_mixed_ranks(het):
    server = _server(het)
    k_a, k_b = _keys(het)
    ids = [c.client_id for c in het.task.clients]
    ranks = dict(zip(ids, (2, 5), strict=True))
    s = {**server, **{f"meta/rank/{c}": torch.tensor(r) for c, r in ranks.items()}}
    ups = [ClientUpdate(c, st.outgoing(het.broadcast(s, c)), 10) for c in ids]
    new = het.aggregate(s, ups)
    assert new[k_a].shape == (R_MAX, server[k_a].shape[1]) and new[k_b].shape == (server[k_b].shape[0], R_MAX)
    assert {int(new[f"meta/rank/{c}"]) for c in ids} == {2, 5}
    # Ranks 5..5 only came from client_1, rank 6 from nobody: weights sum to one over all clients,
    # so column j of B is (sum of the weights of clients holding rank j) * the server's column j.
    w = [het.delta_norm(u.shared) for u in ups]
    share = [sum(wi for wi, u in zip(w, ups, strict=True) if ranks[u.client_id] > j) / sum(w) for j in range(R_MAX)]
    for j in range(R_MAX):
        torch.testing.assert_close(new[k_b][:, j], share[j] * server[k_b][:, j])


def test_prune_keeps_the_kept_part_of_delta_w(het):
    server = _server(het)
    k_a, k_b = _keys(het)
    rank, cut = 5, 4
    w = het.to_client(server, rank)
    pruned = het._prune(w, rank, cut)
    assert pruned[k_a].shape[0] == cut and pruned[k_b].shape[1] == cut
    kept_before = (ALPHA / rank) * w[k_b][:, :cut] @ w[k_a][:cut]
    torch.testing.assert_close(_client_delta(het, pruned), kept_before, rtol=1e-5, atol=1e-6)
    assert w[k_a].shape[0] == rank  # the input was not modified


def test_client_ranks_stay_in_range_and_are_data_independent(het):
    ranks = [het.assigned_rank(f"client_{i}") for i in range(40)]
    assert all(R_MIN <= r <= R_MAX for r in ranks)
    assert len(set(ranks)) > 1
    assert ranks == [het.assigned_rank(f"client_{i}") for i in range(40)]
