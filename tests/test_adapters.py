"""Every method's trained models leave a run as standard PEFT adapters that reproduce its logits."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel

from conftest import ALL_METHODS, TINY_TEXT
from pf2lora import adapters, lora, plan
from pf2lora import state as st
from pf2lora.engines.local import LocalEngine
from pf2lora.engines.rounds import global_model, personal_model, save_adapters
from pf2lora.export import unwrap
from pf2lora.methods import registry

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny-text config with a private head for half the methods' sake, and the plain base model."""
    cfg = plan.load(None, [*TINY_TEXT, "rounds=2", "local_steps=2", "lora.private_rank=2"])
    task = plan.build_task(cfg)
    base_dir = tmp_path_factory.mktemp("base")
    unwrap(copy.deepcopy(task.model)).save_pretrained(base_dir)
    return cfg, task, base_dir


def _peft_logits(base_dir, task, adapter, batch):
    fresh = type(task.model).from_pretrained(base_dir).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # peft's "missing adapter keys" warning fails the test
        model = PeftModel.from_pretrained(fresh, adapter).eval()
    with torch.no_grad():
        return model(**task.model_inputs(batch)).logits


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_exports_exactly(method, tiny, tmp_path):
    cfg, task, base_dir = tiny
    cfg = plan.load(None, [*TINY_TEXT, "rounds=2", "local_steps=2", "lora.private_rank=2", f'methods=["{method}"]'])
    last = {}
    LocalEngine(cfg, task, progress=False).run(method, on_state=lambda s: last.update(state=s))
    state = last["state"]
    m = registry()[method](cfg, task)
    written = save_adapters(tmp_path, cfg, task, m, state.server, state.clients, state.round)
    assert {p.name for p in written} >= {c.client_id for c in task.clients}
    for client in task.clients[:2]:
        cid = client.client_id
        cstate = state.clients.get(cid) or state.clients.get("pooled") or {}
        personal = personal_model(cfg, task, m, client, st.clone(m.broadcast(state.server, cid)), cstate, state.round)
        batch = {k: v[:6] for k, v in client.test.items()}
        with torch.no_grad():
            ours = task.logits(st.model_params(personal), batch)
        theirs = _peft_logits(base_dir, task, adapters.adapter_dir(tmp_path, method, cid), batch)
        torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
        meta = json.loads((adapters.adapter_dir(tmp_path, method, cid) / adapters.META).read_text())
        assert (meta["method"], meta["client"], meta["round"]) == (method, cid, 2)
    glob = adapters.adapter_dir(tmp_path, method, adapters.GLOBAL)
    global_params = global_model(task, m, state.server)
    assert glob.exists() == (global_params is not None)
    if method in ("hetlora", "flexlora"):  # per-client ranks: the global model at the server's full rank, not the first client's
        ranks = {lora.rank_of({k: v}) for k, v in global_params.items() if lora.is_a(k)}
        assert ranks == {m.rank_max} and m.rank_max > min(m.assigned_rank(c.client_id) for c in task.clients)
        assert json.loads((glob / "adapter_config.json").read_text())["r"] == m.rank_max
    if global_params is not None and cfg.lora.head == "shared":
        batch = {k: v[:6] for k, v in task.clients[0].test.items()}
        with torch.no_grad():
            ours = task.logits(st.model_params(global_params), batch)
        torch.testing.assert_close(_peft_logits(base_dir, task, glob, batch), ours, atol=ATOL, rtol=0)
