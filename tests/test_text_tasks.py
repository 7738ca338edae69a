"""Real-language tasks (text-classification, generation) on tiny local models and fixture files,
plus slow end-to-end runs of the shipped configs on the fetched assets (skipped without them)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import sets
from pf2lora import config, lora, metrics, plan
from pf2lora import state as st
from pf2lora.engines.local import LocalEngine
from pf2lora.errors import UserError
from pf2lora.plan import build_task

WORDS = [
    "good",
    "great",
    "fine",
    "nice",
    "love",
    "best",
    "fun",
    "happy",
    "bad",
    "awful",
    "poor",
    "sad",
    "hate",
    "worst",
    "dull",
    "boring",
    "movie",
    "film",
    "book",
    "song",
    "food",
    "cafe",
    "plot",
    "actor",
    "cast",
    "story",
    "the",
    "a",
    "was",
    "is",
    "it",
    "this",
    "very",
    "not",
    "so",
    "and",
    "of",
    "to",
]
POS = ["good", "great", "fine", "nice", "love", "best", "fun", "happy"]
NEG = ["bad", "awful", "poor", "sad", "hate", "worst", "dull", "boring"]
NOUNS = ["movie", "film", "book", "song", "food", "cafe", "plot", "actor"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny BERT, a tiny Llama, small data files


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A saved 1-layer BertModel without a pooler (like paraphrase-MiniLM-L3-v2) and its tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(d)
    cfg = BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(cfg, add_pooling_layer=False).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A saved 1-layer Llama with a word-level tokenizer (eos = </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny_llama")
    specials = ["<pad>", "<unk>", "</s>"]
    words = specials + WORDS + [":", "(", ")", "noun", "adjective"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>").save_pretrained(d)
    cfg = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def sentence(i: int, positive: bool, extra: int = 0) -> str:
    words = POS if positive else NEG
    body = [NOUNS[i % len(NOUNS)], "was", words[i % len(words)], words[(i * 3 + 1) % len(words)]]
    return " ".join(["the", *body, *(["very"] * extra)])


@pytest.fixture(scope="module")
def cls_csv(tmp_path_factory) -> Path:
    """90 rows, 3 natural clients (a, b, c) with different label balance."""
    p = tmp_path_factory.mktemp("data") / "reviews.csv"
    rows = ["text,label,client"]
    for g, frac in (("a", 0.8), ("b", 0.5), ("c", 0.2)):
        for i in range(30):
            y = int(i < frac * 30)
            rows.append(f"{sentence(i, bool(y))},{y},{g}")
    p.write_text("\n".join(rows) + "\n")
    return p


@pytest.fixture(scope="module")
def gen_jsonl(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "defs.jsonl"
    lines = []
    for i in range(40):
        g = "pos" if i % 2 else "neg"
        words = POS if g == "pos" else NEG
        lines.append(
            json.dumps(
                {"src": f"{NOUNS[i % 8]} ( noun )", "tgt": f"a {words[i % 8]} {NOUNS[(i + 1) % 8]} of the {NOUNS[(i + 2) % 8]}", "who": g}
            )
        )
    p.write_text("\n".join(lines) + "\n")
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
            "task.test_fraction=0.3",
            "task.max_length=16",
            "batch_size=8",
            "local_steps=2",
            "rounds=1",
            "lora.rank=2",
            "lora.alpha=2.0",
            "lora.private_rank=1",
            "lora.private_alpha=1.0",
            "optim.lr=1e-2",
            *extra,
        ],
    )


def gen_cfg(model: Path, data: Path, *extra: str):
    return plan.load(
        None,
        [
            'task.kind="generation"',
            f'task.model="{model}"',
            'task.dataset="jsonl"',
            f'task.data_path="{data}"',
            'task.text_column="src"',
            'task.target_column="tgt"',
            'task.group_column="who"',
            "task.num_clients=2",
            "task.max_length=16",
            "task.eval_generate=4",
            "task.max_new_tokens=5",
            "batch_size=4",
            "local_steps=1",
            "rounds=1",
            "lora.rank=2",
            "lora.alpha=2.0",
            "lora.private_rank=1",
            "lora.private_alpha=1.0",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def cls_task(tiny_bert, cls_csv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_task(cls_cfg(tiny_bert, cls_csv))


@pytest.fixture(scope="module")
def gen_task(tiny_llama, gen_jsonl):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_task(gen_cfg(tiny_llama, gen_jsonl))


def adapter(task, role=st.SHARED, rank=2, seed=0, head=True):
    g = torch.Generator().manual_seed(seed)
    out = lora.init_adapter(task.targets, lora.COMMON, role, rank, g)
    for k in out:
        if ".lora_B." in k:
            out[k] = torch.randn(out[k].shape, generator=g) * 0.1
    return {**out, **(task.init_head(role, g) if head else {})}


# ---------------------------------------------------------------------------------------------
# Metrics


def test_classification_metrics_known_values():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert metrics.mcc(y, y, 3) == pytest.approx(1.0)
    assert metrics.mcc(1 - y[:4], y[:4], 2) == pytest.approx(-1.0)
    assert metrics.mcc(torch.zeros(4, dtype=torch.long), y[:4], 2) == 0.0  # constant prediction
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    # sklearn: matthews_corrcoef = 0.5222329678670935, balanced_accuracy = 0.6666, f1_macro = 0.6555
    assert metrics.mcc(pred, y, 3) == pytest.approx(0.5222329678670935)
    assert metrics.balanced_accuracy(pred, y, 3) == pytest.approx(2 / 3)
    assert metrics.macro_f1(pred, y, 3) == pytest.approx((2 / 3 + 0.8 + 0.5) / 3)
    assert metrics.majority_accuracy(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0, 0]), 2) == (1, 0.25)
    # labels 2, 2, 2, 0 (majority 2, share 3/4); predicted 2 three times of four, whatever the truth
    got = metrics.majority_shares(torch.tensor([2, 2, 0, 2]), torch.tensor([2, 2, 2, 0]), 3)
    assert got == {"majority_share": 0.75, "majority_predicted": 0.75}
    got = metrics.majority_shares(torch.tensor([1, 1]), torch.tensor([0, 1]), 2)  # a tie: label 0
    assert got == {"majority_share": 0.5, "majority_predicted": 0.0}


def test_generation_metrics():
    refs = ["a sloping bank of land", "the cat sat on the mat"]
    assert metrics.bleu(refs, refs) == pytest.approx(100.0)
    assert metrics.rouge_l(refs, refs) == pytest.approx(100.0)
    assert metrics.rouge_l(["dog"], ["the cat"]) == 0.0
    assert 0.0 < metrics.rouge_l(["the cat sat"], ["the cat sat on the mat"]) < 100.0


# ---------------------------------------------------------------------------------------------
# Text classification


def test_classification_task_builds(cls_task):
    t = cls_task
    assert t.primary_metric == "accuracy" and t.higher_is_better
    assert t.table_columns == ("accuracy", "macro_f1", "balanced_accuracy", "global_accuracy")
    assert t.reference == ("majority_accuracy", "majority class (reference)")
    assert [c.client_id for c in t.clients] == ["a", "b", "c"]
    # the saved model has no pooler: it is trained with the classifier, as on paraphrase-MiniLM-L3-v2
    assert sorted(t.head_names) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]
    assert not any(p.requires_grad for p in t.model.parameters())
    for c in t.clients:
        assert c.num_train == 21 and c.num_test == 9
        assert c.train["input_ids"].shape == (21, 16) and c.train["labels"].dtype == torch.long
        maj = c.info["majority_accuracy"]
        labels = c.test["labels"]
        assert maj == pytest.approx(float((labels == c.train["labels"].mode().values).float().mean()))
    # a batch is trimmed to its longest example
    b = {k: v[:4] for k, v in t.clients[0].train.items()}
    width = int(b["attention_mask"].sum(1).max())
    assert t.model_inputs(b)["input_ids"].shape == (4, width) < (4, 16)


def test_attention_follows_the_methods_need_for_double_backward(tiny_bert, cls_csv):
    """A method that differentiates through gradients gets eager attention (SDPA's fused kernels
    cannot double-backward on CPU); first-order methods keep the default."""
    exact = cls_cfg(tiny_bert, cls_csv, 'methods=["homlora", "pf2lora"]', "pf2lora.estimator=exact")
    first_order = cls_cfg(tiny_bert, cls_csv, 'methods=["homlora", "pf2lora"]', "pf2lora.estimator=finite-difference")
    assert plan.double_backward(exact) and not plan.double_backward(first_order)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build_task(exact).model.config._attn_implementation == "eager"
        assert build_task(first_order).model.config._attn_implementation != "eager"


def test_classification_head_loss_and_metrics(cls_task):
    t = cls_task
    params = adapter(t)
    head = {k: v for k, v in params.items() if ".lora_" not in k}
    assert {st.path_of(k) for k in head} == set(t.head_names)
    assert head[st.key(st.SHARED, "classifier.weight")].shape == (2, 16)
    assert torch.all(head[st.key(st.SHARED, "classifier.bias")] == 0)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    batch = {k: v[:8] for k, v in t.clients[0].train.items()}
    loss = t.loss(st.model_params(leaves), batch)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    assert math.isfinite(float(loss.detach())) and all(g.abs().sum() > 0 for g in grads)
    # trimming does not change the logits
    full = t.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    assert full.shape == t.logits(st.model_params(params), batch).shape
    m = t.evaluate(st.model_params(params), t.clients[1].test)
    assert set(m) == {"accuracy", "macro_f1", "balanced_accuracy", "mcc", "loss", "majority_share", "majority_predicted"}
    pred = t.logits(st.model_params(params), t.clients[1].test).argmax(-1)
    test_labels = t.clients[1].test["labels"]
    top = int(torch.bincount(test_labels).argmax())
    assert m["majority_predicted"] == pytest.approx(float((pred == top).float().mean()))
    assert m["majority_share"] == pytest.approx(float((test_labels == top).float().mean()))
    assert 0 <= m["accuracy"] <= 1 and -1 <= m["mcc"] <= 1
    bare = t.diagnostics(t.clients[1], {}, {})
    assert bare["majority_accuracy"] == t.clients[1].info["majority_accuracy"]
    assert bare["layer_ranks"] == {target.path: 0 for target in t.targets} and bare["private_norm"] == 0.0


def test_diagnostics_rank_of_the_learned_update_per_layer(cls_task):
    """The effective rank counts the personalised update's directions per adapted layer; the
    private norm is what the client adds to the common adapter."""
    t = cls_task
    g = torch.Generator().manual_seed(3)
    common = st.model_params(lora.init_adapter(t.targets, lora.COMMON, st.SHARED, 3, g))
    common = {k: torch.randn(v.shape, generator=g) for k, v in common.items()}  # B != 0: a rank-3 update
    private = st.model_params(lora.init_adapter(t.targets, lora.PRIVATE, st.PRIVATE, 2, g))
    private = {k: torch.randn(v.shape, generator=g) for k, v in private.items()}
    d = t.diagnostics(t.clients[0], {**common, **private}, common)
    assert d["layer_ranks"] == {target.path: 5 for target in t.targets}
    assert d["private_norm"] > 0
    only_common = t.diagnostics(t.clients[0], common, common)
    assert set(only_common["layer_ranks"].values()) == {3} and only_common["private_norm"] == 0.0


def test_trimmed_logits_equal_padded_logits(cls_task):
    t = cls_task
    params = st.model_params(adapter(t))
    batch = {k: v[:5] for k, v in t.clients[2].test.items()}
    trimmed = t.logits(params, batch)
    from torch.func import functional_call

    padded = functional_call(
        t.model, params, args=(), kwargs={k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}, strict=False
    ).logits
    torch.testing.assert_close(trimmed, padded, atol=1e-5, rtol=1e-5)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that read a tensor's value back to the host (``.item()``, ``int()``,
    ``bool()``): on a GPU each one waits for every kernel queued before it."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func.__name__.split(".")[0] in ("_local_scalar_dense", "is_nonzero")
        return func(*args, **(kwargs or {}))


def test_a_training_step_on_the_gpu_path_reads_nothing_back_and_computes_the_same(cls_task, monkeypatch):
    """Off the CPU a batch is trimmed by the lengths kept on the CPU and the model gets the 4-D mask
    transformers would build (text_data.model_mask): the same logits as the CPU path's, bit for
    bit, and a forward and backward without a single read to the host (the lengths are read as a
    list, which dispatches nothing, so what is counted are reads of the data; on the CPU path
    transformers reads the mask)."""
    from pf2lora.autodiff import grads, leaves
    from pf2lora.tasks import text_data

    t = cls_task
    params = st.model_params(adapter(t))
    batch = {k: v[:6].clone() for k, v in t.clients[2].train.items()}
    mask, lengths = batch["attention_mask"], batch[text_data.LENGTHS]
    n = int(lengths[0])
    mask[0, n - 2 : n], batch["input_ids"][0, n - 2 : n], lengths[0] = 0, t.tok.pad_token_id, n - 2  # a shorter text in row 0
    assert torch.equal(lengths, mask.sum(1)) and lengths.device.type == "cpu"
    assert int(lengths.min()) < int(lengths.max()) < mask.shape[1]  # padded rows, and columns a trim drops
    cpu_path = t.logits(params, batch)
    xl = leaves(params)
    with _HostReads() as reads_cpu:
        grads(t.loss(xl, batch), xl)
    assert reads_cpu.reads > 0
    monkeypatch.setattr(text_data, "SYNC_FREE_ON_CPU", True)
    inputs = t.model_inputs(batch)
    assert inputs["attention_mask"].dim() == 4 and inputs["input_ids"].shape == (6, int(lengths.max()))
    assert torch.equal(t.logits(params, batch), cpu_path)
    with _HostReads() as reads_device:
        g = grads(t.loss(xl, batch), xl)
    assert reads_device.reads == 0
    assert all(torch.isfinite(v).all() for v in g.values())
    full = {k: v[:3] for k, v in t.clients[2].train.items() if k != text_data.LENGTHS}
    assert "attention_mask" in t.model_inputs(full)  # no lengths: the 2-D mask, as before
    unpadded = {k: v[lengths == lengths.max()][:1] for k, v in batch.items()}
    assert "attention_mask" not in t.model_inputs(unpadded)  # nothing padded: no mask, as transformers would do


def _decoder(name: str):
    """A 2-layer random decoder: a Llama classifier, a Llama LM or a GPT-2 LM."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    llama = dict(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "llama-classifier":
            return LlamaForSequenceClassification(LlamaConfig(**llama, num_labels=2)).eval()
        if name == "llama-lm":
            return LlamaForCausalLM(LlamaConfig(**llama)).eval()
        gpt2 = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=1)
        return GPT2LMHeadModel(gpt2).eval()


@pytest.mark.parametrize("name", ["llama-classifier", "llama-lm", "gpt2-lm"])
def test_a_decoder_on_the_gpu_path_gets_the_causal_mask(name, monkeypatch):
    """Off the CPU a decoder (a causal LM, or a classifier on one) gets the prepared 4-D mask of a
    causal model: the same outputs as with the 2-D padding mask. Two layers, so that a token that
    saw a later one would change what the next layer gives every position (with the encoder's
    bidirectional mask they differ: checked, so the test can fail)."""
    from pf2lora.tasks import text_data

    model = _decoder(name)
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14], [3, 4, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask, text_data.LENGTHS: mask.sum(1)}
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        assert text_data.model_mask(model, batch) is mask  # the CPU path: the 2-D mask, as always
        monkeypatch.setattr(text_data, "SYNC_FREE_ON_CPU", True)
        prepared = text_data.model_mask(model, batch)
        assert prepared is not None and prepared.dim() == 4 and text_data.is_causal(model)
        assert torch.equal(model(input_ids=ids, attention_mask=prepared).logits, reference)
        monkeypatch.setattr(text_data, "is_causal", lambda m: False)  # the encoder's mask
        wrong = model(input_ids=ids, attention_mask=text_data.prepared_mask(model, mask)).logits
    assert not torch.allclose(wrong, reference, atol=1e-6)


def test_a_generation_step_on_the_gpu_path_reads_nothing_back_and_computes_the_same(gen_task, monkeypatch):
    from pf2lora.autodiff import grads, leaves
    from pf2lora.tasks import text_data

    t = gen_task
    params = st.model_params(adapter(t, head=False))
    batch = {k: v[:4].clone() for k, v in t.clients[0].train.items()}
    lengths = batch[text_data.LENGTHS]
    n = int(lengths[0])  # a shorter text in row 0: its last two tokens become padding
    batch["attention_mask"][0, n - 2 : n], batch["input_ids"][0, n - 2 : n], batch["labels"][0, n - 2 : n] = 0, t.pad, -100
    lengths[0] = n - 2
    assert int(lengths.min()) < int(lengths.max())  # padded rows
    xl = leaves(params)
    with _HostReads() as reads_cpu:
        cpu_loss = t.loss(xl, batch)
        grads(cpu_loss, xl)
    assert reads_cpu.reads > 0  # transformers reads the 2-D mask
    monkeypatch.setattr(text_data, "SYNC_FREE_ON_CPU", True)
    assert t.model_inputs(batch)["attention_mask"].dim() == 4
    with _HostReads() as reads_device:
        loss = t.loss(xl, batch)
        g = grads(loss, xl)
    assert reads_device.reads == 0 and torch.equal(loss, cpu_loss)
    assert all(torch.isfinite(v).all() for v in g.values())


def test_write_figures(cls_task, gen_task, tmp_path):
    assert cls_task.write_figures(tmp_path) == ["label_distribution.png"]
    assert (tmp_path / "label_distribution.png").read_bytes()[:4] == b"\x89PNG"
    assert gen_task.write_figures(tmp_path) == []
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.warns(UserWarning, match="not written"):
        assert cls_task.write_figures(blocked / "sub") == []  # never raises


@pytest.mark.parametrize(
    ("extra", "sizes"),
    [
        (['task.partition="iid"', "task.num_clients=4"], None),
        (['task.partition="dirichlet"', "task.num_clients=3", "task.dirichlet_alpha=0.3", "task.min_client_size=10"], None),
        (['task.partition="s-similarity"', "task.num_clients=3", "task.similarity=0.0"], None),
        (["task.train_samples=5", "task.test_samples=3"], [(5, 3)] * 3),
        (["task.train_samples=20", "task.train_samples_min=4"], "spread"),
    ],
)
def test_partitions_and_caps(tiny_bert, cls_csv, extra, sizes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = build_task(cls_cfg(tiny_bert, cls_csv, *extra))
    n = sum(c.num_train + c.num_test for c in t.clients)
    if sizes is None:
        assert n == 90
        assert len(t.clients) == config.load(None, [*extra, 'task.kind="text-classification"']).task.num_clients
        seen = [i for c in t.clients for i in c.info["train_indices"] + c.info["test_indices"]]
        assert sorted(seen) == list(range(90))  # disjoint and complete
    elif sizes == "spread":
        assert sorted(c.num_train for c in t.clients) == [4, 12, 20]
    else:
        assert [(c.num_train, c.num_test) for c in t.clients] == sizes
    if "similarity=0.0" in " ".join(extra):  # sorted by label: at most one client holds both labels
        assert sum(len(set(c.train["labels"].tolist() + c.test["labels"].tolist())) > 1 for c in t.clients) <= 1


def test_over_long_text_is_truncated_counted_and_warned_once(tiny_bert, tmp_path):
    p = tmp_path / "long.csv"
    rows = ["text,label,client"] + [f"{sentence(i, i % 2 == 0, extra=20 if i < 3 else 0)},{i % 2},{'ab'[i % 2]}" for i in range(20)]
    p.write_text("\n".join(rows) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = build_task(cls_cfg(tiny_bert, p, "task.num_clients=2"))
    ours = [w for w in caught if "truncated" in str(w.message)]
    assert len(ours) == 1
    assert str(ours[0].message).startswith("3 of 20 texts longer than 16 tokens were truncated")
    assert any("3 of 20 texts" in n for n in t.report_notes())
    assert max(int(c.train["attention_mask"].sum(1).max()) for c in t.clients) == 16


def _one_line_error(cfg_or_build) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError) as e:
            cfg_or_build()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs_are_one_line_user_errors(tiny_bert, cls_csv, tmp_path):
    missing = tmp_path / "nope.csv"
    assert "not found" in _one_line_error(lambda: build_task(cls_cfg(tiny_bert, missing)))
    msg = _one_line_error(lambda: build_task(cls_cfg(tiny_bert, cls_csv, 'task.label_column="stars"')))
    assert "no column 'stars'" in msg
    bad = tmp_path / "bad_label.csv"
    bad.write_text("text,label,client\nthe movie was good,1,a\nthe film was bad,positive,a\n")
    msg = _one_line_error(lambda: build_task(cls_cfg(tiny_bert, bad)))
    assert "row 3" in msg and "'positive'" in msg
    # a partition that would leave a client without examples
    msg = _one_line_error(lambda: build_task(cls_cfg(tiny_bert, cls_csv, 'task.partition="iid"', "task.num_clients=200")))
    assert "200 clients" in msg
    msg = _one_line_error(lambda: build_task(cls_cfg(tiny_bert, cls_csv, 'task.partition="dirichlet"', "task.min_client_size=40")))
    assert "exceeds" in msg
    msg = _one_line_error(lambda: build_task(cls_cfg(tiny_bert, cls_csv, "task.num_clients=4")))
    assert "has 3 groups" in msg or "has 3 clients" in msg
    msg = _one_line_error(lambda: build_task(cls_cfg(tiny_bert, cls_csv, 'task.groups=["a","z"]', "task.num_clients=2")))
    assert "'z'" in msg
    # config-level checks
    assert "needs task.data_path" in _one_line_error(lambda: plan.load(None, ['task.kind="text-classification"', 'task.dataset="csv"']))
    assert "not a text-classification data set" in _one_line_error(
        lambda: plan.load(None, ['task.kind="text-classification"', 'task.dataset="shakespeare"'])
    )
    assert "needs class labels" in _one_line_error(lambda: config.load(None, ['task.kind="generation"', 'task.partition="dirichlet"']))
    assert "model directory" in _one_line_error(lambda: build_task(cls_cfg(tmp_path / "no_model", cls_csv)))


def test_engine_runs_methods_on_tiny_classification(cls_task):
    cfg = cls_cfg(Path("unused"), Path("unused"), 'methods=["pf2lora", "homlora", "local"]')
    engine = LocalEngine(cfg, cls_task, progress=False)
    for name in cfg.methods:
        result = engine.run(name)
        for cid, m in result.clients.items():
            assert {"accuracy", "macro_f1", "mcc", "balanced_accuracy", "loss", "majority_accuracy"} <= set(m), (name, cid)
            assert math.isfinite(m["loss"])
        if name != "local":
            assert all("global_accuracy" in m for m in result.clients.values())


def test_per_round_and_per_client_figures(cls_task, tmp_path):
    """eval.every gives a per-round personalised metric, and the report draws it and each client's."""
    from pf2lora import report

    cfg = cls_cfg(Path("unused"), Path("unused"), 'methods=["homlora", "local"]', "rounds=3", "eval.every=1")
    engine = LocalEngine(cfg, cls_task, progress=False)
    results = [engine.run(name) for name in cfg.methods]
    for r in results:
        # Rounds 1 and 2 are evaluated in the loop; the last round's figure is the final evaluation.
        assert [("eval" in x) for x in r.rounds] == [True, True, False], r.method
        assert all(0.0 <= x["eval"] <= 1.0 for x in r.rounds[:2])
    summary = report.summarize(cls_task, results, {})
    files = report.plot_figures(tmp_path, cls_task, summary, results)
    assert {"accuracy_per_round.png", "accuracy_per_client.png"} <= set(files)
    for name in ("accuracy_per_round.png", "accuracy_per_client.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# Generation


def test_generation_masks_the_prompt_and_scores(gen_task):
    t = gen_task
    assert t.primary_metric == "loss" and not t.higher_is_better
    assert [c.client_id for c in t.clients] == ["neg", "pos"]
    c = t.clients[0]
    row = c.train
    # the labels are the target tokens (+ eos) only; the prompt and the padding are ignored
    eos = t.tok.eos_token_id
    for i in range(len(row["labels"])):
        ids, lab, mask = row["input_ids"][i], row["labels"][i], row["attention_mask"][i]
        kept = lab != -100
        assert kept.any() and int(lab[kept][-1]) == eos
        assert torch.equal(lab[kept], ids[kept])
        first = int(kept.nonzero()[0])
        assert first > 0 and not kept[:first].any() and not kept[mask == 0].any()
    params = st.model_params(adapter(t, head=False))
    batch = {k: v[:4] for k, v in row.items()}
    logits = t.forward(params, batch).logits
    width = logits.shape[1]
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:width].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(t.loss(params, batch), manual)
    m = t.evaluate(params, c.test)
    assert set(m) == {"loss", "perplexity", "bleu", "rouge_l"}
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert 0 <= m["bleu"] <= 100 and 0 <= m["rouge_l"] <= 100


def test_greedy_decode_with_cache_matches_plain_argmax(gen_task):
    t = gen_task
    params = st.model_params(adapter(t, head=False, seed=3))
    test = t.clients[1].test
    got = t.generate(params, test["prompt_ids"][:3], test["prompt_mask"][:3])
    for i in range(3):
        ids = test["prompt_ids"][i][test["prompt_mask"][i].bool()].tolist()
        out = []
        for _ in range(t.max_new_tokens):
            x = torch.tensor([ids])
            nxt = int(t.forward(params, {"input_ids": x, "attention_mask": torch.ones_like(x)}).logits[0, -1].argmax())
            if nxt == t.eos:
                break
            ids.append(nxt)
            out.append(nxt)
        assert got[i] == t.tok.decode(out, skip_special_tokens=True).strip()


def test_generation_truncation_and_engine(tiny_llama, gen_jsonl):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = build_task(gen_cfg(tiny_llama, gen_jsonl, "task.max_length=8", "task.max_new_tokens=3"))
    ours = [w for w in caught if "truncated" in str(w.message)]
    assert len(ours) == 1 and str(ours[0].message).startswith("40 of 40 examples (prompt + target) longer than 8 tokens")
    assert all(int(c.train["attention_mask"].sum(1).max()) <= 8 for c in t.clients)
    cfg = gen_cfg(tiny_llama, gen_jsonl, 'methods=["pf2lora", "homlora"]')
    engine = LocalEngine(cfg, t, progress=False)
    for name in cfg.methods:
        result = engine.run(name)
        for m in result.clients.values():
            assert {"loss", "perplexity", "bleu", "rouge_l", "global_loss"} <= set(m)


# ---------------------------------------------------------------------------------------------
# The shipped configs on the real assets (slow)


def _assets_ready(*models_needed: str) -> bool:
    from pf2lora import models
    from pf2lora.data import assets

    if not all(assets.available().values()):
        return False
    try:
        for m in models_needed:
            models.source(m)
    except UserError:
        return False
    return True


def test_shipped_configs_load():
    """Every config we ship parses and validates (a typo in one fails here, not in a user's run)."""
    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.glob("*.toml"))
    names = {p.stem for p in paths}
    assert {
        "vader_domains",
        "vader_demo",
        "vader_compare",
        "rt_similarity",
        "rt_compare",
        "wordnet_topics",
        "wordnet_nlg",
        "shakespeare",
    } <= names
    for path in paths:
        cfg = plan.load(path)
        assert cfg.task.kind in ("text-classification", "generation", "synthetic"), path.name
        if cfg.task.kind != "synthetic":
            assert cfg.num_threads == 0, path.name  # text configs use every core unless told otherwise


@pytest.mark.slow
def test_vader_domains_config_end_to_end(tmp_path):
    if not _assets_ready("all-MiniLM-L6-v2"):
        pytest.skip("models or data not fetched (make assets)")
    from pf2lora import cli

    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli.main(
            [
                "run",
                str(root / "configs/vader_domains.toml"),
                "--out",
                str(out),
                "--quiet",
                *sets(
                    "rounds=1",
                    "local_steps=1",
                    "batch_size=4",
                    "task.train_samples=24",
                    "task.train_samples_min=8",
                    "task.test_samples=8",
                    "task.max_length=32",
                    "checkpoint=false",
                ),
            ]
        )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    cfg = config.load(root / "configs/vader_domains.toml")
    assert list(summary["methods"]) == cfg.methods
    for name, m in summary["methods"].items():
        assert len(m["clients"]) == 8
        for cid, c in m["clients"].items():
            assert 0 <= c["accuracy"] <= 1 and 0 <= c["macro_f1"] <= 1, (name, cid)
            assert 0 <= c["majority_accuracy"] <= 1
        for metric in ("accuracy", "macro_f1"):
            assert set(m["stats"][metric]) >= {"mean", "weighted_mean", "std", "min", "p10"}
    assert {c.split("_")[0] for c in summary["methods"]["pf2lora"]["clients"]} == {"movie", "tweet", "amazon", "nyt"}


@pytest.mark.slow
def test_wordnet_nlg_config_end_to_end(tmp_path):
    if not _assets_ready("SmolLM2-135M"):
        pytest.skip("models or data not fetched (make assets)")
    root = Path(__file__).resolve().parents[1]
    cfg = plan.load(
        root / "configs/wordnet_nlg.toml",
        [
            'methods=["homlora"]',
            "rounds=1",
            "local_steps=1",
            "batch_size=2",
            "task.num_clients=2",
            'task.groups=["noun.plant", "verb.change"]',
            "task.train_samples=4",
            "task.test_samples=2",
            "task.eval_generate=1",
            "task.max_new_tokens=4",
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = build_task(cfg)
    result = LocalEngine(cfg, task, progress=False).run("homlora")
    assert len(result.clients) == 2
    for m in result.clients.values():
        assert math.isfinite(m["loss"]) and m["perplexity"] > 1 and "bleu" in m and "rouge_l" in m


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "overrides", "model"),
    [
        ("rt_similarity", ["task.similarity=0.3"], "all-MiniLM-L6-v2"),
        ("rt_similarity", ["task.similarity=0.5"], "all-MiniLM-L6-v2"),
        ("wordnet_topics", ["task.min_client_size=8"], "all-MiniLM-L6-v2"),
        ("shakespeare", ["batch_size=2", "task.eval_generate=1", "task.max_new_tokens=4", "task.max_length=32"], "SmolLM2-135M"),
    ],
)
def test_other_shipped_configs_end_to_end(name, overrides, model):
    """Each shipped real-data config builds its 8 clients and runs a PF2LoRA round at small scale."""
    if not _assets_ready(model):
        pytest.skip("models or data not fetched (make assets)")
    root = Path(__file__).resolve().parents[1]
    cfg = plan.load(
        root / f"configs/{name}.toml",
        [
            'methods=["pf2lora"]',
            "rounds=1",
            "local_steps=1",
            "task.train_samples=16",
            "task.test_samples=4",
            "checkpoint=false",
            *overrides,
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = build_task(cfg)
    result = LocalEngine(cfg, task, progress=False).run("pf2lora")
    assert len(result.clients) == 8
    for cid, m in result.clients.items():
        if cfg.task.kind == "generation":
            assert math.isfinite(m["loss"]) and m["perplexity"] > 1, cid
        else:
            assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1, cid
            assert 0 <= m["majority_accuracy"] <= 1, cid
