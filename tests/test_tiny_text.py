"""The tiny-text task: a tiny random BERT on a synthetic client-heterogeneous language."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY_TEXT
from pf2lora import lora
from pf2lora import state as st
from pf2lora.config import load
from pf2lora.engines.local import LocalEngine, mean_of
from pf2lora.hypergrad import bilevel_step
from pf2lora.metrics import macro_f1
from pf2lora.tasks import build_task
from pf2lora.tasks.tiny_text import TinyTextTask

SMALL = TINY_TEXT


def cfg_of(*extra: str):
    return load(None, [*SMALL, *extra])


@pytest.fixture(scope="module")
def task() -> TinyTextTask:
    t = build_task(cfg_of())
    assert isinstance(t, TinyTextTask)
    return t


def test_builds(task):
    assert task.name == "tiny-text" and task.primary_metric == "accuracy" and task.higher_is_better
    assert len(task.clients) == 3
    assert len(task.targets) == 4  # query and value in each of 2 layers
    assert {t.path.rsplit(".", 1)[-1] for t in task.targets} == {"query", "value"}
    assert not any(p.requires_grad for p in task.model.parameters())
    assert not task.model.training
    assert task.model.config._attn_implementation == "eager"
    vocab = task.model.config.vocab_size
    for c in task.clients:
        assert c.num_train == 64 and c.num_test == 32
        for split in (c.train, c.test):
            assert set(split) == {"input_ids", "attention_mask", "labels"}
            assert split["input_ids"].shape == (len(split["labels"]), 12)
            assert (split["input_ids"][:, 0] == 1).all()  # [CLS]
            assert int(split["input_ids"].max()) < vocab
            assert set(split["labels"].tolist()) <= {0, 1}


def test_deterministic_per_seed(task):
    again = build_task(cfg_of())
    for a, b in zip(task.clients, again.clients, strict=True):
        for k in a.train:
            assert torch.equal(a.train[k], b.train[k]) and torch.equal(a.test[k], b.test[k])
    for (n, p), (_, q) in zip(task.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    other = build_task(cfg_of("task.data_seed=7"))
    assert not torch.equal(other.clients[0].train["input_ids"], task.clients[0].train["input_ids"])
    assert not torch.equal(other.model.bert.embeddings.word_embeddings.weight, task.model.bert.embeddings.word_embeddings.weight)


def test_clients_differ(task):
    """Each client has its own cue-token mapping (and label prior): personalisation matters."""
    mappings = {str(c.info["client_cues"]) for c in task.clients}
    priors = {tuple(c.info["label_distribution"]) for c in task.clients}
    assert len(mappings) > 1 and len(priors) == len(task.clients)


def test_head_loss_and_metrics(task):
    g = torch.Generator().manual_seed(0)
    head = task.init_head(st.PRIVATE, g)
    assert set(head) == {"private:classifier.weight", "private:classifier.bias"}
    assert head["private:classifier.weight"].shape == task.model.classifier.weight.shape
    assert torch.equal(
        head["private:classifier.weight"], task.init_head(st.PRIVATE, torch.Generator().manual_seed(0))["private:classifier.weight"]
    )
    params = st.model_params(lora.init_adapter(task.targets, lora.COMMON, st.SHARED, 4, g), head)
    data = task.clients[0].test
    metrics = task.evaluate(params, data)
    assert set(metrics) == {"accuracy", "loss", "macro_f1", "balanced_accuracy"}
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0
    assert metrics["loss"] == pytest.approx(float(task.loss(params, data)), rel=1e-5)


def test_macro_f1():
    labels = torch.tensor([0, 0, 1, 1, 2])
    assert macro_f1(labels, labels, 3) == 1.0
    pred = torch.tensor([0, 1, 1, 1, 0])  # class 0: F1 1/2, class 1: 4/5, class 2: 0
    assert macro_f1(pred, labels, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_homlora_loss_decreases(task):
    cfg = cfg_of("rounds=4", 'methods=["homlora"]')
    result = LocalEngine(cfg, task, progress=False).run("homlora")
    losses = [r["train_loss"] for r in result.rounds]
    assert losses[-1] < losses[0], losses
    assert 0.0 <= mean_of(result.clients, "accuracy") <= 1.0


def test_pf2lora_exact_runs(task):
    cfg = cfg_of("rounds=2", "local_steps=2", 'methods=["pf2lora"]', "pf2lora.estimator=exact")
    result = LocalEngine(cfg, task, progress=False).run("pf2lora")
    assert all(math.isfinite(r["train_loss"]) for r in result.rounds)
    for metrics in result.clients.values():
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["global_loss"])


def test_exact_and_finite_difference_hypergradients_agree(task):
    """Double backward works through the eager attention, and the estimators agree."""
    g = torch.Generator().manual_seed(3)
    x = {**lora.init_adapter(task.targets, lora.COMMON, st.SHARED, 4, g), **task.init_head(st.SHARED, g)}
    x = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in x.items()}  # B != 0
    y = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in lora.init_adapter(task.targets, lora.PRIVATE, st.PRIVATE, 2, g).items()}
    data = task.clients[0].train
    xi, zeta = {k: v[:16] for k, v in data.items()}, {k: v[16:32] for k, v in data.items()}

    def loss_fn(a, b, batch):
        return task.loss(st.model_params(a, b), batch)

    exact = bilevel_step(loss_fn, x, y, xi, zeta, 0.5, "exact").hypergrad
    fd = bilevel_step(loss_fn, x, y, xi, zeta, 0.5, "finite-difference", eps=1e-3).hypergrad
    first = bilevel_step(loss_fn, x, y, xi, zeta, 0.5, "first-order").hypergrad
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])
    correction = (flat(exact) - flat(first)).norm()
    assert correction > 0
    assert (flat(exact) - flat(fd)).norm() < 1e-2 * correction
