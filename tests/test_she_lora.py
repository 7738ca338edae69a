"""SHE-LoRA: the encrypted aggregate equals the plaintext one, the server sees no protected column
and holds no key, the negotiation's list, and the command line end to end."""

from __future__ import annotations

import json
import math
import struct
import sys

import pytest

pytest.importorskip("tenseal", reason="the 'he' extra is not installed (pip install 'pf2lora[he]')")

import torch

from conftest import SYNTH_CFG, TINY_TEXT, client_context, read_summary, small_cfg, small_task
from pf2lora import lora, plan
from pf2lora import state as st
from pf2lora.cli import main
from pf2lora.engines.rounds import initial_client, initial_server
from pf2lora.errors import UserError
from pf2lora.methods import she_lora as she
from pf2lora.methods.flexlora import FlexLoRA
from pf2lora.methods.she_lora import SHELoRA

TIERS = "she_lora.column_budgets=[0.3, 1.0]"
"""Two budgets on a 96 x 96 layer: 29 and 96 columns, 2784 and 9216 values (1 and 3 ciphertexts)."""


def federate(cfg, task, rounds: int = 2, participants=None):
    """Every client trains every round, as an engine would run them, keeping what each call saw:
    the method, the final server state, the client states, and per (round, client) the message
    received, the upload, and the tensors its training started from and ended with (before anything
    was protected). ``participants(round)``: the indices of the clients that train that round (all)."""
    method = SHELoRA(cfg, task)
    server = initial_server(cfg, method)
    states = {c.client_id: initial_client(cfg, method, c.client_id) for c in task.clients}
    log = []
    for round_ in range(1, rounds + 1):
        updates = []
        for k, c in enumerate(task.clients):
            if participants is not None and k not in participants(round_):
                continue
            received = st.clone(method.broadcast(server, c.client_id))
            start: dict[str, torch.Tensor] = {}
            trained: dict[str, torch.Tensor] = {}
            method.train_steps = _spy(method, start, trained)
            update, states[c.client_id] = method.client_update(client_context(cfg, task, k, round_), received, states[c.client_id])
            del method.train_steps
            log.append({"round": round_, "client": c.client_id, "received": received, "update": update, "start": start, "trained": trained})
            updates.append(update)
        method.begin_round(round_)
        server = method.aggregate(server, updates)
    return method, server, states, log


def _spy(method, start: dict, trained: dict):
    """``method.train_steps`` that also keeps the tensors it started from and ended with."""
    train_steps = method.train_steps

    def spy(ctx, params, *args, **kwargs):
        start.update(st.clone(params))
        run = train_steps(ctx, params, *args, **kwargs)
        trained.update(st.clone(run.params))
        return run

    return spy


def secret_of(state) -> bytes:
    return she.as_bytes(state[she._SECRET])


def plaintext_mean(method, entries, target) -> torch.Tensor:
    """FlexLoRA's aggregate of the same trained adapters: sum n_k Delta W_k / sum n_k, in float64."""
    total = sum(e["update"].num_examples for e in entries)
    return sum(e["update"].num_examples * method.client_delta(e["trained"], target).double() for e in entries) / total


# -- the cryptography ---------------------------------------------------------------------------------


def test_ckks_sums_integers_exactly_and_a_public_context_cannot_decrypt():
    secret = she.new_secret_context(8192)
    public = she.context(she.public_context(secret))
    ctx = she.context(secret)
    assert ctx.is_private() and not public.is_private()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(-(2**31), 2**31, (5000,), generator=g).double() for _ in range(4)]
    chunks = [she.encrypt(ctx, x[: 5000 - 1000 * i], 4096) for i, x in enumerate(xs)]  # 2, 1, 1, 1 ciphertexts
    assert [len(c) for c in chunks] == [2, 1, 1, 1]
    total = she.add(public, chunks)
    expected = sum(torch.cat([x[: 5000 - 1000 * i], torch.zeros(1000 * i, dtype=torch.float64)]) for i, x in enumerate(xs))
    assert torch.equal(she.decrypt(ctx, total, 5000), expected)  # rounded: exact, not merely close
    with pytest.raises(ValueError, match="secret"):
        she.decrypt(public, total, 5000)
    with pytest.raises(ValueError):
        she.encrypt(public, xs[0], 4096)
    assert she.unframe(she.frame(total)) == total


# -- the aggregate ------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", [("task.dim=32",), ("task.dim=96", TIERS)], ids=["three-tiers", "multi-ciphertext"])
def test_encrypted_aggregate_equals_the_plaintext_one(setting):
    """Clients of different ranks and budgets: every client decrypts FlexLoRA's weighted mean of
    the same updates, to the fixed-point bound: |error| <= K 2^-(bits+1) / sum w_k per entry (each
    encrypting client's rounding), plus the float32 of the plaintext part (<= 1e-6 relative)."""
    cfg, task = small_task("task.num_clients=3", "task.private_ranks=[0,1,2]", "lora.rank=3", *setting)
    method, server, states, log = federate(cfg, task)
    last = [e for e in log if e["round"] == 2]
    assert len({int(s[method.RANK]) for s in states.values()}) > 1  # heterogeneous ranks
    assert len({method.budget(cid) for cid in states}) > 1  # and budgets
    unit = float(server[she.UNIT].sum())
    weight_sum = sum(e["update"].num_examples / unit for e in last)
    bound = len(last) * 2.0 ** -(cfg.she_lora.fixed_point_bits + 1) / weight_sum
    decoded = [method.aggregate_delta(method.broadcast(server, cid), secret_of(states[cid])) for cid in states]
    for t in task.targets:
        ref = plaintext_mean(method, last, t)
        err = (decoded[0][t.path] - ref).abs().max().item()
        assert err <= bound + 1e-6 * ref.abs().max().item(), (err, bound)
        assert all(torch.equal(d[t.path], decoded[0][t.path]) for d in decoded)  # every client decodes the same
    # Each client continues from the truncated SVD of that aggregate at its own rank (FlexLoRA's).
    cid = task.clients[0].client_id
    rank = int(states[cid][method.RANK])
    adapter = method.factors(method.initial_a(states[cid], rank), rank, decoded[0])
    a, b = lora.adapter_keys(task.targets[0], lora.COMMON, st.SHARED)
    ref_a, ref_b = method.factorize(decoded[0][task.targets[0].path], int(states[cid][method.RANK]), adapter[a])
    torch.testing.assert_close(adapter[b] @ adapter[a], (ref_b @ ref_a).float())


def test_encrypting_everything_leaves_no_plaintext_part_and_the_same_bound():
    cfg, task = small_task("task.num_clients=3", "she_lora.column_budgets=[1.0]")
    method, server, states, log = federate(cfg, task)
    last = [e for e in log if e["round"] == 2]
    t = task.targets[0]
    for e in last:
        assert not e["update"].shared[lora.adapter_keys(t, lora.COMMON, st.SHARED)[0]].any()  # every column of A is protected
    dense, left, right = she.plain_keys(t)
    plain = server[dense] if dense in server else server[left] @ server[right]
    assert not plain.any()
    unit = float(server[she.UNIT].sum())
    bound = len(last) * 2.0 ** -(cfg.she_lora.fixed_point_bits + 1) / sum(e["update"].num_examples / unit for e in last)
    decoded = method.aggregate_delta(method.broadcast(server, "client_0"), secret_of(states["client_0"]))
    assert (decoded[t.path] - plaintext_mean(method, last, t)).abs().max().item() <= bound


def test_round_two_starts_from_the_clients_own_round_one_adapter():
    cfg, task = small_task("task.num_clients=2")
    method, server, states, log = federate(cfg, task, rounds=2)
    for cid in states:
        first, second = (next(e for e in log if e["round"] == r and e["client"] == cid) for r in (1, 2))
        assert float(second["received"][she.WEIGHT].sum()) == 0.0  # nothing aggregated after the negotiation
        for k, v in first["trained"].items():  # its round-1 training is not lost
            if lora.is_adapter(k):
                assert torch.equal(second["start"][k], v), k
        assert not first["start"][lora.adapter_keys(task.targets[0], lora.COMMON, st.SHARED)[1]].any()  # round 1: B = 0


def test_with_one_round_each_client_evaluates_its_trained_adapter():
    """After the negotiation alone (``rounds = 1``) there is no aggregate: a client's model is the
    adapter it trained (not the initial A with B = 0), as evaluation and export see it."""
    cfg, task = small_task("task.num_clients=2", "rounds=1")
    method, server, states, log = federate(cfg, task, rounds=1)
    assert float(server[she.WEIGHT].sum()) == 0.0
    for k, c in enumerate(task.clients):
        trained = next(e["trained"] for e in log if e["client"] == c.client_id)
        received = method.broadcast(server, c.client_id)
        model = method.personalized(client_context(cfg, task, k, 1), received, states[c.client_id])
        for t in task.targets:
            k_a, k_b = lora.adapter_keys(t, lora.COMMON, st.SHARED)
            assert model[k_b].any()  # trained, not B = 0
            assert torch.equal(model[k_a], trained[k_a]) and torch.equal(model[k_b], trained[k_b])
        assert method.global_params(received, states[c.client_id]).keys() == model.keys()


# -- what the server sees and holds --------------------------------------------------------------------


def _float_values(upload) -> torch.Tensor:
    return torch.cat([v.flatten().float() for k, v in upload.items() if v.is_floating_point()])


def test_the_server_sees_no_protected_column_and_holds_no_key():
    cfg = small_cfg(*TINY_TEXT, "she_lora.column_budgets=[0.1, 0.25]")
    task = plan.build_task(cfg)
    method, server, states, log = federate(cfg, task)
    lists = method.lists(server, task.targets)
    secret = secret_of(states["client_0"])
    secret_slice = secret[len(secret) // 2 : len(secret) // 2 + 64]
    for e in log:
        shared = e["update"].shared
        assert set(shared) == set(method.upload_spec(e["received"]))
        for k, v in shared.items():  # no key material: the secret is in no payload
            if st.is_bytes(k):
                assert secret_slice not in she.as_bytes(v)
        if e["round"] == 1:  # the negotiation: indices, a key-less context, a key id
            assert not she.context(she.as_bytes(shared[she.CONTEXT])).is_private()
            for t in task.targets:
                assert shared[she.vote_key(t)].shape == (she.column_count(t, method.budget(e["client"])),)
            continue
        cipher = she.as_bytes(shared[she.CIPHER])
        uploaded = _float_values(shared)
        for t in task.targets:
            k_a = lora.adapter_keys(t, lora.COMMON, st.SHARED)[0]
            protected = lists[t.path][: she.column_count(t, method.budget(e["client"]))]
            assert not shared[k_a][:, protected].any()  # zero in the plaintext A
            assert not method.client_delta(shared, t)[:, protected].any()  # so in what the server can compute
            true_a = e["trained"][k_a][:, protected]
            true_delta = method.client_delta(e["trained"], t)[:, protected]
            assert true_delta.abs().min() > 0
            assert not torch.isin(torch.cat([true_a.flatten(), true_delta.flatten()]).float(), uploaded).any()
            for x in true_delta.flatten()[:16].tolist():  # nor its float64 bytes in the ciphertexts
                assert struct.pack("<d", x) not in cipher
    # The server's state: no secret, a context without one (so it cannot decrypt), and its
    # plaintext part is zero on the columns every client protected.
    assert not any(k.startswith(she._SECRET) for k in server)
    public = she.context(she.as_bytes(server[she._SERVER_CONTEXT]))
    assert not public.is_private()
    with pytest.raises(ValueError, match="secret"):
        she.decrypt(public, she.unframe(server[she.CIPHER]), 10)
    smallest = min(she.column_count(t, min(cfg.she_lora.column_budgets)) for t in task.targets)
    for t in task.targets:
        dense, left, right = she.plain_keys(t)
        plain = server[dense] if dense in server else server[left] @ server[right]
        assert plain[:, lists[t.path][:smallest]].abs().max() <= 1e-6 * plain.abs().max()
    # The server's code paths never use the clients' key channel.
    channel = she.CHANNEL
    try:
        she.CHANNEL = None  # type: ignore[assignment]
        method.broadcast(server, "client_0")
        method.aggregate(server, [e["update"] for e in log if e["round"] == 2])
    finally:
        she.CHANNEL = channel


def _relative_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return float((estimate - truth).norm() / truth.norm())


def test_the_server_holds_no_initial_a_and_cannot_estimate_protected_columns_from_b(monkeypatch):
    """Every client's A starts from the key holders' initial A (A moves little in a few steps), and
    the server sees ``B_k``: knowing that init would give ``(alpha / r_k) B_k init[:, P]`` as an
    estimate of the protected columns P of ``Delta W_k``. The init comes from the clients' shared
    seed: the server's state and broadcasts hold no init A, and every init the server could make
    (from its state, the run's seed and generators, the plaintext part it holds) estimates the
    protected columns no better than chance, where the true init does well."""
    import random

    from pf2lora.engines.rounds import generator

    monkeypatch.setattr(she, "CHANNEL", she.KeyChannel(random.Random(0).randbytes))  # a repeatable init seed
    cfg = small_cfg(*TINY_TEXT, "optim.lr=1e-3", "she_lora.column_budgets=[0.1, 0.25]")
    task = plan.build_task(cfg)
    method, server, states, log = federate(cfg, task)
    assert not any("init" in k for k in server)
    for e in log:
        assert not any("init" in k for k in e["received"])
    seeds = {she.as_bytes(s[she._INIT_SEED]) for s in states.values()}
    assert len(seeds) == 1 and len(next(iter(seeds))) == she.INIT_SEED_BYTES  # the key holders share one
    state_0 = states[task.clients[0].client_id]
    true_init = method.initial_a(state_0, method.rank_max)
    server_floats = torch.cat([v.flatten().float().cpu() for v in server.values() if v.is_floating_point()] or [torch.zeros(0)])
    for t in task.targets:  # no init value anywhere in the server's state
        assert not torch.isin(true_init[t.path].flatten().float().cpu(), server_floats).any()
    # What the server could make an init from: its own generator and each client's (the config is
    # no secret to it), FlexLoRA's init of the same run, and the right factor of its plaintext part.
    guesses = {
        name: lora.init_adapter(task.targets, lora.COMMON, st.SHARED, method.rank_max, generator(cfg.seed, "init", who))
        for name, who in [("server", "server"), *((c.client_id, c.client_id) for c in task.clients)]
    }
    guesses["flexlora"] = {k: v for k, v in FlexLoRA(cfg, task).init_server(generator(cfg.seed, "init", "server")).items()}
    lists = method.lists(server, task.targets)
    errors: dict[str, list[float]] = {"true init": []}
    for e in (e for e in log if e["round"] == 2):
        f = method.budget(e["client"])
        for t in task.targets:
            k_a, k_b = lora.adapter_keys(t, lora.COMMON, st.SHARED)
            B = e["update"].shared[k_b].double()
            r = B.shape[1]
            P = lists[t.path][: she.column_count(t, f)]
            truth = method.client_delta(e["trained"], t).double()[:, P]
            scale = method.alpha / r
            errors["true init"].append(_relative_error(scale * B @ true_init[t.path][:r, P].double(), truth))
            for name, g in guesses.items():
                key = k_a if k_a in g else f"meta/init_A/{t.path}"
                errors.setdefault(name, []).append(_relative_error(scale * B @ g[key][:r, P].double(), truth))
            dense, left, right = she.plain_keys(t)
            if right in server:  # the plaintext part's row space
                errors.setdefault("plain right factor", []).append(_relative_error(scale * B @ server[right][:r, P].double(), truth))
    median = {name: sorted(v)[len(v) // 2] for name, v in errors.items()}
    assert median["true init"] < 0.3, median  # the attack works with the init the clients share ...
    for name, m in median.items():  # ... and with nothing the server has
        if name != "true init":
            assert m > 0.75, (name, median)


def test_the_server_refuses_a_secret_context_and_mixed_keys():
    cfg, task = small_task("task.num_clients=2")
    method, server, states, log = federate(cfg, task, rounds=1)
    votes = [e["update"] for e in log]
    leaked = she.ClientUpdate(votes[0].client_id, {**votes[0].shared, she.CONTEXT: she.as_tensor(secret_of(states["client_0"]))}, 10)
    with pytest.raises(ValueError, match="secret key"):
        method.aggregate(initial_server(cfg, method), [leaked, votes[1]])
    from pf2lora.robust import validate_update

    received = log[0]["received"]
    longer = {**votes[0].shared, she.vote_key(task.targets[0]): torch.zeros(task.targets[0].in_features)}
    assert "shape" in validate_update(longer, method.upload_spec(received))  # a vote must be the client's budget long
    other = she.ClientUpdate(votes[1].client_id, {**votes[1].shared, she.KEY_ID: torch.zeros(she.KEY_ID_BYTES, dtype=torch.uint8)}, 10)
    with pytest.raises(ValueError, match="another CKKS key"):
        method.aggregate(initial_server(cfg, method), [votes[0], other])


def test_the_server_never_creates_a_secret_context(monkeypatch):
    """Validating uploads, broadcasting and aggregating make no CKKS context (so no secret key):
    the server checks the key-less context it receives (no key, the federation's parameters)."""
    cfg, task = small_task("task.num_clients=2")
    method, server, states, log = federate(cfg, task, rounds=1)
    votes = [e["update"] for e in log]

    def refuse(*args, **kwargs):
        raise AssertionError("the server made a CKKS context")

    monkeypatch.setattr(she, "new_secret_context", refuse)
    monkeypatch.setattr(she.tenseal(), "context", refuse)
    from pf2lora.robust import validate_update

    fresh = SHELoRA(cfg, task)
    start = initial_server(cfg, fresh)
    for e in log:
        assert validate_update(e["update"].shared, fresh.upload_spec(fresh.broadcast(start, e["client"]))) is None
    after = fresh.aggregate(start, votes)
    assert not she.context(she.as_bytes(after[she._SERVER_CONTEXT])).is_private()
    fresh.broadcast(after, "client_0")
    monkeypatch.undo()
    different = she.public_context(she.new_secret_context(16384))  # other parameters: refused
    odd = she.ClientUpdate(votes[1].client_id, {**votes[1].shared, she.CONTEXT: she.as_tensor(different)}, 10)
    with pytest.raises(ValueError, match="another CKKS context"):
        fresh.aggregate(start, [votes[0], odd])


# -- the negotiation -----------------------------------------------------------------------------------


def test_votes_merge_into_one_list_by_tier_count_then_best_rank():
    cfg, task = small_task("she_lora.column_budgets=[0.25, 0.5]")  # d_in = 8: tiers of 2 and 4 columns
    method = SHELoRA(cfg, task)
    t = task.targets[0]
    votes = [torch.tensor(v, dtype=torch.float32) for v in ([3, 1], [3, 5, 6, 1], [5, 3, 0, 2])]
    # positions 0-1 (every client encrypts them): 3 (3 votes), 5 (2 votes, best rank 0), 1 (2, best 1)
    # positions 2-3 (the 4-column clients): of their votes, 0 and 6 (best rank 2) before 1 and 2 (3)
    assert method.merge(t, votes).tolist() == [3, 5, 0, 6]
    # a malformed vote is cleaned (repeats, out of range): [7, 6], too short for positions 2-3
    assert method.merge(t, [torch.tensor([7.0, 7.0, 6.0, 99.0, -1.0])]).tolist() == [7, 6, 0, 1]


def test_a_segment_stays_open_until_a_client_of_its_tier_votes():
    """Partial participation: round 1 has only the 2-column client, so only the first segment is
    fixed (not the second in index order); the 4-column client votes when it first takes part
    (round 2, while the other already encrypts), which fixes the second segment from its vote; in
    round 3 both encrypt and the aggregate is the plaintext one."""
    cfg, task = small_task("she_lora.column_budgets=[0.25, 0.5]")  # d_in = 8: 2 and 4 columns
    t = task.targets[0]
    method, server, states, log = federate(cfg, task, rounds=3, participants=lambda r: [0] if r == 1 else [0, 1])
    first = next(e for e in log if e["round"] == 1)
    vote_0 = first["update"].shared[she.vote_key(t)].long().tolist()
    seen = [e for e in log if e["round"] == 2]
    assert she.vote_key(t) not in seen[0]["update"].shared and she.CIPHER in seen[0]["update"].shared  # client_0 encrypts
    assert she.SHELoRA.closed(seen[0]["received"]) == 1 and seen[0]["received"][she.columns_key(t)].tolist() == vote_0
    vote_1 = seen[1]["update"].shared[she.vote_key(t)].long().tolist()  # client_1 votes on first taking part
    assert she.CIPHER not in seen[1]["update"].shared
    after = [e["received"] for e in log if e["round"] == 3]
    assert all(she.SHELoRA.closed(r) == 2 for r in after)
    assert after[0][she.columns_key(t)].tolist() == vote_0 + [j for j in vote_1 if j not in vote_0][: 4 - len(vote_0)]
    # the round-2 aggregate (client_0's encrypted segment alone) and round 3's (both) decode exactly
    unit = float(server[she.UNIT].sum())
    last = [e for e in log if e["round"] == 3]
    assert all(she.CIPHER in e["update"].shared for e in last)
    decoded = method.aggregate_delta(method.broadcast(server, "client_1"), secret_of(states["client_1"]))
    bound = len(last) * 2.0 ** -(cfg.she_lora.fixed_point_bits + 1) / sum(e["update"].num_examples / unit for e in last)
    assert (decoded[t.path] - plaintext_mean(method, last, t)).abs().max().item() <= bound + 1e-6


def test_partial_participation_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    sets = ['methods=["she-lora"]', "rounds=4", "task.num_clients=4", "client_fraction=0.5"]
    assert main(["run", SYNTH_CFG, *(x for kv in sets for x in ("--set", kv)), "--out", str(out)]) == 0
    entry = read_summary(out)["methods"]["she-lora"]
    assert entry["mean"]["ciphertext_bytes_per_client_per_round"] > 0


def test_vote_ranks_columns_by_wanda_sensitivity():
    cfg, task = small_task("task.dim=16", "she_lora.calibration_samples=10", "she_lora.column_budgets=[0.25]")
    method = SHELoRA(cfg, task)
    ctx = client_context(cfg, task)
    g = torch.Generator().manual_seed(1)
    a, b = lora.adapter_keys(task.targets[0], lora.COMMON, st.SHARED)
    params = {a: torch.randn(3, 16, generator=g), b: torch.randn(16, 3, generator=g)}
    norms = method.input_norms(ctx, params)[task.targets[0].path]
    torch.testing.assert_close(norms, ctx.client.train["inputs"][:10].double().norm(dim=0))  # the layer's input: hooks saw it
    expected = torch.sort(params[a].abs().double().sum(0) * norms, descending=True, stable=True).indices[:4]
    assert method.vote(ctx, params)[she.vote_key(task.targets[0])].long().tolist() == expected.tolist()


# -- packing, reporting, refusals, the command line ---------------------------------------------------


def test_ciphertexts_are_packed_densely_and_their_bytes_reported():
    cfg, task = small_task("task.num_clients=2", "task.dim=96", TIERS)
    method, server, states, log = federate(cfg, task, rounds=3)
    slots = cfg.she_lora.poly_modulus_degree // 2
    for e in log:
        if e["round"] == 1:
            continue
        f = method.budget(e["client"])
        values = sum(t.out_features * she.column_count(t, f) for t in task.targets)
        chunks = she.unframe(e["update"].shared[she.CIPHER])
        assert len(chunks) == math.ceil(values / slots)  # as many values per ciphertext as slots
        assert e["update"].metrics["ciphertext_bytes"] == e["update"].shared[she.CIPHER].numel()
    for cid, state in states.items():
        sent = [e["update"].shared[she.CIPHER].numel() for e in log if e["client"] == cid and she.CIPHER in e["update"].shared]
        assert len(sent) == 2  # rounds 2 and 3: the mean over the rounds it encrypted in, not its vote's 0 bytes
        assert method.describe_client(server, state)["ciphertext_bytes_per_client_per_round"] == sum(sent) / len(sent)


def test_byte_payloads_pass_validation_only_as_uint8():
    from pf2lora.robust import validate_update

    spec = {she.CIPHER: (None,), "shared:w": (2,)}
    good = {she.CIPHER: torch.zeros(7, dtype=torch.uint8), "shared:w": torch.zeros(2)}
    assert validate_update(good, spec) is None
    assert "uint8" in validate_update({**good, she.CIPHER: torch.zeros(7)}, spec)
    assert "float32" in validate_update({**good, "shared:w": torch.zeros(2, dtype=torch.uint8)}, spec)  # only byte keys


def test_refuses_server_options_that_need_every_update():
    cfg, task = small_task('server.aggregator="median"')
    with pytest.raises(UserError, match="server.aggregator"):
        SHELoRA(cfg, task)


def test_without_tenseal_she_lora_fails_with_one_line_saying_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tenseal", None)  # import tenseal raises ImportError
    code = main(["run", SYNTH_CFG, "--set", 'methods=["she-lora"]', "--set", "rounds=1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "pip install 'pf2lora[he]'" in err[0] and "make install" in err[0], err


def test_cli_end_to_end_reports_ciphertext_bytes_per_client_per_round(tmp_path):
    out = tmp_path / "run"
    assert main(["run", SYNTH_CFG, "--set", 'methods=["she-lora"]', "--set", "rounds=2", "--out", str(out)]) == 0
    entry = read_summary(out)["methods"]["she-lora"]
    ct = entry["mean"]["ciphertext_bytes_per_client_per_round"]
    assert all(c["ciphertext_bytes_per_client_per_round"] > 0 for c in entry["clients"].values())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_round = [line["ciphertext_bytes_per_client"] for line in lines if line["method"] == "she-lora"]
    assert per_round[0] == 0 < per_round[1]  # round 1 sends votes, round 2 ciphertexts
    # the summary's figure is over the rounds with ciphertexts (round 2 only), not halved by the vote
    assert ct == pytest.approx(per_round[1])
    assert per_round[1] / 2 < entry["upload_bytes_per_client_per_round"] < ct + per_round[1]
