"""The data layer: loaders on fixtures written here, their one-line errors, partitioners, real data when fetched."""

from __future__ import annotations

import bz2
import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pf2lora import config, plan
from pf2lora.config import TaskConfig
from pf2lora.data import assets, catalogue, corpora, user_files
from pf2lora.data import partition as part
from pf2lora.data.dataset import TextDataset
from pf2lora.errors import UserError


def one_line_error(excinfo: pytest.ExceptionInfo[UserError], *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ---------------------------------------------------------------------------------------------
# assets


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_dir() == Path.home() / ".cache" / "pf2lora"


def test_missing_asset_names_file_and_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    for call, needle in [
        (lambda: assets.vader_file("tweet"), "tweets_GroundTruth.txt"),
        (assets.rotten_tomatoes_file, "rotten_tomatoes_corpus_full.csv.bz2"),
        (assets.wordnet_dir, "data.noun"),
        (assets.shakespeare_file, "shaks12.txt"),
        (corpora.load_vader, "movieReviewSnippets"),
        (corpora.load_shakespeare, "shaks12.txt"),
    ]:
        with pytest.raises(UserError) as e:
            call()
        one_line_error(e, needle, assets.FETCH_COMMAND, str(tmp_path))
    assert assets.available() == dict.fromkeys(["vader", "rotten_tomatoes", "wordnet", "shakespeare"], False)
    with pytest.raises(UserError) as e:
        assets.vader_file("imdb")
    one_line_error(e, "imdb", "movie")


# ---------------------------------------------------------------------------------------------
# TextDataset


def test_dataset_subset_records_and_validation():
    ds = TextDataset("d", ["a", "b", "c"], labels=[0, 1, 1], groups=["x", "y", "x"], label_names=["n", "p"], extra={"r": [1, 2, 3]})
    sub = ds.subset([2, 0])
    assert sub.text == ["c", "a"] and sub.labels == [1, 0] and sub.groups == ["x", "x"] and sub.extra["r"] == [3, 1]
    assert list(sub.records()) == [{"text": "c", "label": 1, "group": "x"}, {"text": "a", "label": 0, "group": "x"}]
    assert ds.kind == "classification" and ds.num_labels == 2
    assert ds.label_counts() == {"n": 1, "p": 2} and ds.group_counts() == {"x": 2, "y": 1}
    with pytest.raises(ValueError):
        TextDataset("d", ["a"], labels=[0], targets=["t"])
    with pytest.raises(ValueError):
        TextDataset("d", ["a", "b"], labels=[0])
    with pytest.raises(ValueError):
        TextDataset("d", ["a"], labels=[2], label_names=["n", "p"])
    gen = TextDataset("g", ["a"], targets=["b"])
    assert gen.kind == "generation" and gen.label_counts() == {}


# ---------------------------------------------------------------------------------------------
# Bring your own data


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_load_table_csv_classification_with_pairs_and_clients(tmp_path):
    f = write_csv(tmp_path / "d.csv", [["q", "a", "y", "user"], ["hi, there", "yo\nmultiline", "1", "u1"], ["x", "z", "0", "u2"]])
    ds = user_files.load_table(f, text="q", text_pair="a", label="y", client="user")
    assert ds.text == ["hi, there", "x"] and ds.text_pair == ["yo\nmultiline", "z"]
    assert ds.labels == [1, 0] and ds.groups == ["u1", "u2"] and ds.group_name == "user" and ds.label_names == ["0", "1"]


def test_load_table_label_names_and_generation(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "y": "pos", "c": 3}, {"text": "b", "y": 0, "c": 4}])
    ds = user_files.load_table(f, label="y", client="c", label_names=["neg", "pos"])
    assert ds.labels == [1, 0] and ds.groups == ["3", "4"]
    g = write_jsonl(tmp_path / "g.jsonl", [{"src": "a", "tgt": "b"}])
    gen = user_files.load_table(g, text="src", target="tgt")
    assert gen.kind == "generation" and gen.targets == ["b"]
    tsv = write_csv(tmp_path / "d.tsv", [["text", "label"], ['say "hi"', "1"]], delimiter="\t")
    assert user_files.load_table(tsv, label="label").text == ['say "hi"']
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps([{"text": "a", "label": 1}]))
    assert user_files.load_table(arr, label="label").labels == [1]


@pytest.mark.parametrize(
    "name, content, kwargs, needles",
    [
        ("missing.csv", None, {"label": "label"}, ["not found", "missing.csv"]),
        ("empty.csv", "", {"label": "label"}, ["empty.csv", "empty"]),
        ("header.csv", "text,label\n", {"label": "label"}, ["header.csv", "no examples"]),
        ("cols.csv", "sentence,label\nx,1\n", {"label": "label"}, ["cols.csv", "'text'", "sentence, label"]),
        ("ragged.csv", "text,label\nx,1,extra\n", {"label": "label"}, ["ragged.csv", "row 2", "3 fields"]),
        ("lab.csv", "text,label\nx,1\ny,positive\n", {"label": "label"}, ["lab.csv", "row 3", "'positive'", "label_names"]),
        ("neg.csv", "text,label\nx,-1\n", {"label": "label"}, ["neg.csv", "-1"]),
        ("range.csv", "text,label\nx,2\n", {"label": "label", "label_names": ["a", "b"]}, ["range.csv", "0..1"]),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n', {"label": "label"}, ["bad.jsonl", "line 2", "bad JSON"]),
        ("float.jsonl", '{"text": "a", "label": 0.5}\n', {"label": "label"}, ["float.jsonl", "line 1", "0.5"]),
        ("textnum.jsonl", '{"text": 7, "label": 1}\n', {"label": "label"}, ["textnum.jsonl", "'text'", "expected a string"]),
        ("nocol.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', {"label": "label"}, ["nocol.jsonl", "line 2", "'label'"]),
        ("list.jsonl", "[1, 2]\n", {"label": "label"}, ["list.jsonl", "JSON object"]),
        ("blank.jsonl", "\n\n", {"label": "label"}, ["blank.jsonl", "empty"]),
        ("data.parquet", "x", {"label": "label"}, ["data.parquet", "unknown format"]),
        ("both.csv", "text,label\nx,1\n", {"label": "label", "target": "label"}, ["exactly one"]),
    ],
)
def test_load_table_errors_are_one_line(tmp_path, name, content, kwargs, needles):
    f = tmp_path / name
    if content is not None:
        f.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as e:
        user_files.load_table(f, **kwargs)
    one_line_error(e, *needles)


def test_load_table_unreadable_bytes(tmp_path):
    f = tmp_path / "latin.csv"
    f.write_bytes(b"text,label\ncaf\xe9,1\n")
    with pytest.raises(UserError) as e:
        user_files.load_table(f, label="label")
    one_line_error(e, "latin.csv", "utf-8")


# ---------------------------------------------------------------------------------------------
# GLUE, E2E, WebNLG fixtures (official column layouts)


def _glue_fixture(root: Path) -> Path:
    tsv = {
        "SST-2/train.tsv": "sentence\tlabel\nit 's a charming \" journey \t1\nbad movie\t0\n",
        "CoLA/train.tsv": "gj04\t1\t\tOur friends won't buy this analysis.\nclc95\t0\t*\tThey drank the pub.\n",
        "MNLI/train.tsv": (
            "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
            "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
            "0\t1\t1n\tgovernment\t(\t(\t(\t(\tA premise.\tA hypothesis.\tneutral\tneutral\n"
            "1\t2\t2e\tfiction\t(\t(\t(\t(\tHe ran.\tHe moved.\tentailment\tentailment\n"
        ),
        "MNLI/dev_matched.tsv": (
            "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
            "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
            "0\t1\t1c\ttelephone\t(\t(\t(\t(\tYes.\tNo.\tcontradiction\tc\tc\tc\tc\tcontradiction\n"
            "1\t2\t2x\ttelephone\t(\t(\t(\t(\tMaybe.\tSo.\tneutral\te\tc\tn\tn\t-\n"
        ),
        "QNLI/dev.tsv": "index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tentailment\n1\tWhy?\tNo.\tnot_entailment\n",
        "QQP/train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tA?\tB?\t0\n1\t3\t4\tC?\tC!\t1\n2\t5\t6\tbroken row\n",
        "RTE/train.tsv": "index\tsentence1\tsentence2\tlabel\n0\tP.\tH.\tnot_entailment\n",
        "MRPC/train.tsv": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tSame.\tSame!\n0\t3\t4\tOne.\tTwo.\n",
    }
    for rel, content in tsv.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content, encoding="utf-8")
    return root


def test_glue_loaders_read_official_tsv_layouts(tmp_path):
    root = _glue_fixture(tmp_path)
    sst = user_files.load_glue("SST-2", root / "SST-2")
    assert sst.text == ["it 's a charming \" journey ", "bad movie"] and sst.labels == [1, 0]
    assert sst.label_names == ["negative", "positive"] and sst.text_pair is None
    cola = user_files.load_glue("cola", root / "CoLA")
    assert cola.text[1] == "They drank the pub." and cola.labels == [1, 0]
    mnli = user_files.load_glue("mnli", root / "MNLI")
    assert mnli.text_pair == ["A hypothesis.", "He moved."] and mnli.labels == [1, 0] and mnli.groups == ["government", "fiction"]
    dev = user_files.load_glue("mnli", root / "MNLI", split="validation_matched")
    assert dev.labels == [2] and dev.info["skipped"] == 1  # gold label "-" is dropped
    qnli = user_files.load_glue("qnli", root / "QNLI", split="dev")
    assert qnli.labels == [0, 1] and qnli.text_pair == ["Him.", "No."]
    qqp = user_files.load_glue("qqp", root / "QQP")
    assert qqp.labels == [0, 1] and qqp.info["skipped"] == 1
    assert user_files.load_glue("rte", root / "RTE").labels == [1]
    mrpc = user_files.load_glue("mrpc", root / "MRPC")
    assert mrpc.text == ["Same.", "One."] and mrpc.labels == [1, 0]


def test_glue_errors(tmp_path):
    root = _glue_fixture(tmp_path)
    cases = [
        (lambda: user_files.load_glue("wnli", root), ["wnli", "sst2"]),
        (lambda: user_files.load_glue("sst2", root / "SST-2", split="test"), ["no labels"]),
        (lambda: user_files.load_glue("rte", root / "RTE", split="dev"), ["not found", "dev.tsv"]),
        (lambda: user_files.load_glue("qnli", root / "SST-2", split="train"), ["train.tsv", "'question'", "sentence, label"]),
    ]
    (root / "SST-2" / "dev.tsv").write_text("text\tlabel\nx\t1\n")
    cases.append((lambda: user_files.load_glue("sst2", root / "SST-2", split="dev"), ["dev.tsv", "'sentence'", "text, label"]))
    for call, needles in cases:
        with pytest.raises(UserError) as e:
            call()
        one_line_error(e, *needles)


def test_e2e_and_webnlg(tmp_path):
    e2e = write_csv(
        tmp_path / "trainset.csv",
        [
            ["mr", "ref"],
            ["name[The Vaults], eatType[pub], food[French]", "The Vaults is a French pub."],
            ["name[Alimentum], area[city centre]", "Alimentum is in the city centre."],
        ],
    )
    ds = user_files.load_e2e(e2e, group_attr="eatType")
    assert ds.targets[0] == "The Vaults is a French pub." and ds.groups == ["pub", "none"]
    assert user_files.parse_mr(ds.text[1]) == {"name": "Alimentum", "area": "city centre"}
    hf_record = {
        "category": "Astronaut",
        "size": 2,
        "eid": "Id1",
        "modified_triple_sets": {"mtriple_set": [["Alan_Bean | birthPlace | Wheeler,_Texas", "Alan_Bean | occupation | Test_pilot"]]},
        "lex": {
            "comment": ["good", "good"],
            "lid": ["Id1", "Id2"],
            "text": ["Alan Bean, born in Wheeler, was a test pilot.", "Test pilot Alan Bean was born in Texas."],
            "lang": ["", ""],
        },
    }
    simple = {"category": "Food", "triples": [["Bacon", "ingredient", "Pork"]], "lexicalisations": ["Bacon is made of pork."]}
    web = write_jsonl(tmp_path / "webnlg.jsonl", [hf_record, simple])
    w = user_files.load_webnlg(web)
    assert len(w) == 3 and w.groups == ["Astronaut", "Astronaut", "Food"]
    assert w.text[0] == "Alan Bean | birthPlace | Wheeler, Texas && Alan Bean | occupation | Test pilot"
    assert w.text[2] == "Bacon | ingredient | Pork" and w.targets[2] == "Bacon is made of pork."
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"category": "X", "lex": {"text": ["t"]}}])
    with pytest.raises(UserError) as e:
        user_files.load_webnlg(bad)
    one_line_error(e, "bad.jsonl", "line 1", "no triples")


# ---------------------------------------------------------------------------------------------
# Real-data loaders on miniature copies of the real formats


def test_vader_format(tmp_path):
    (tmp_path / "tweets_GroundTruth.txt").write_text("1\t2.5\tgreat day\r\n2\t0\tmeh\r\n3\t-0.25\tugh\r\n")
    ds = corpora.load_vader(["tweet"], root=tmp_path)
    assert ds.text == ["great day", "ugh"] and ds.labels == [1, 0] and ds.groups == ["tweet", "tweet"]
    assert ds.extra["rating"] == [2.5, -0.25]
    (tmp_path / "nytEditorialSnippets_GroundTruth.txt").write_text("1\tbig\ttext\n")
    with pytest.raises(UserError) as e:
        corpora.load_vader(["nyt"], root=tmp_path)
    one_line_error(e, "nytEditorialSnippets_GroundTruth.txt", "line 1", "'big'")


def test_loaders_find_data_in_the_env_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    (tmp_path / "vader").mkdir()
    for i, stem in enumerate(assets.VADER_DOMAINS.values()):
        (tmp_path / "vader" / f"{stem}_GroundTruth.txt").write_text(f"1\t{i - 1.5}\ttext {i}\n")
    ds = corpora.load_vader()
    assert ds.groups == ["movie", "tweet", "amazon", "nyt"] and ds.labels == [0, 0, 1, 1]
    assert corpora.load_vader(["nyt"]).text == ["text 3"]
    assert assets.available()["vader"] and not assets.available()["wordnet"]


def test_rotten_tomatoes_format(tmp_path):
    f = tmp_path / "rt.csv.bz2"
    rows = [
        ["category", "text", "movie_name", "has_plot_and_reviews"],
        ["plot", "A plot,\nlong.", "m1", "True"],
        ["fresh", "Loved it.", "m1", "True"],
        ["rotten", "Hated it.", "m2", "False"],
    ]
    with bz2.open(f, "wt", newline="", encoding="utf-8") as h:
        csv.writer(h).writerows(rows)
    ds = corpora.load_rotten_tomatoes(f)
    assert ds.text == ["Loved it.", "Hated it."] and ds.labels == [1, 0] and ds.groups == ["m1", "m2"]
    assert ds.label_names == ["rotten", "fresh"]


def _wordnet_fixture(root: Path) -> Path:
    header = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton University  \n"
    (root / "lexnames").write_text("00\tadj.all\t3\n02\tadv.all\t4\n03\tnoun.Tops\t1\n05\tnoun.animal\t1\n29\tverb.body\t2\n")
    (root / "data.noun").write_text(
        header
        + '00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known; "it is an entity"  \n'
        + "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 000 | a member of the genus Canis; "
        + '"the dog barked all night"; "a good dog"  \n'
    )
    (root / "data.verb").write_text(header + "00001740 29 v 01 breathe 0 000 01 + 02 00 | draw air into, and expel out of, the lungs  \n")
    (root / "data.adj").write_text(
        header + '00001740 00 a 01 able(a) 0 000 | (usually followed by `to\') having the necessary means; "able to swim"  \n'
    )
    (root / "data.adv").write_text(
        header + '00001740 02 r 01 a_cappella 0 000 | without musical accompaniment; "they performed a cappella"  \n'
    )
    return root


def test_wordnet_format(tmp_path):
    root = _wordnet_fixture(tmp_path)
    synsets = corpora.read_wordnet(root)
    assert [s.words[0] for s in synsets] == ["entity", "dog", "breathe", "able", "a cappella"]
    dog = synsets[1]
    assert dog.words == ["dog", "domestic dog", "Canis familiaris"] and dog.topic == "noun.animal"
    assert dog.definition == "a member of the genus Canis" and dog.examples == ["the dog barked all night", "a good dog"]
    topics = corpora.load_wordnet_topics(root)
    assert topics.label_names == ["adj.all", "adv.all", "noun.Tops", "noun.animal", "verb.body"]
    assert [topics.label_names[y] for y in topics.labels] == ["noun.Tops", "noun.animal", "verb.body", "adj.all", "adv.all"]
    assert topics.text[2] == "draw air into, and expel out of, the lungs"
    assert corpora.load_wordnet_topics(root, group_by="pos").groups == ["noun", "noun", "verb", "adjective", "adverb"]
    defs = corpora.load_wordnet_definitions(root)
    assert defs.text[:2] == ["entity (noun)", "dog (noun)"] and defs.targets[4] == "without musical accompaniment"
    assert defs.groups[1] == "noun.animal"
    assert len(corpora.load_wordnet_definitions(root, all_words=True)) == 7
    (root / "data.adv").write_text("00001740 02 r zz a 0 | gloss\n")
    with pytest.raises(UserError) as e:
        corpora.read_wordnet(root)
    one_line_error(e, "data.adv", "line 1")


SHAKS = """\
<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.
SERVICE THAT CHARGES FOR DOWNLOAD TIME OR FOR MEMBERSHIP.>>

1609

THE SONNETS

by William Shakespeare

                     1
  From fairest creatures we desire increase,
  Die to themselves. Sweet roses do not so,

1600

THE TRAGEDY OF TESTING

by William Shakespeare

ACT I. SCENE 1.
Elsinore.

Enter two

  HAMLET. To be, or not to be: that is the question.
    Whether 'tis nobler in the mind to suffer       Exit.
  FIRST LORD. My lord?
                                          Exeunt all.
    [Aside] Indeed.
  HAMLET. Speak.
  MRS. PAGE. I will.
{hamlet}
ACT I. SCENE 2.

  Ham. A new scene.
  1. Play. Aye.

1590

THE COMEDY OF TESTS

by William Shakespeare

ACT I. SCENE 1

AEGEON. Proceed, Solinus, to procure my fall,
  And by the doom of death end woes and all.
DUKE. Merchant of Syracuse, plead no more;
Enter ANTIPHOLUS.
{duke}"""


def test_shakespeare_parsing_rules(tmp_path):
    # 20 more speeches per play: a work with fewer than 20 speaker lines counts as a poem
    body = SHAKS.format(
        hamlet="".join(f"  HAMLET. Filler {i}.\n" for i in range(20)), duke="".join(f"DUKE. More {i}.\n" for i in range(20))
    )
    lines = corpora.parse_shakespeare(body)
    testing = [(s.speaker, s.text, s.scene) for s in lines if s.play == "THE TRAGEDY OF TESTING"]
    assert testing[:6] == [
        ("HAMLET", "To be, or not to be: that is the question.", 1),
        ("HAMLET", "Whether 'tis nobler in the mind to suffer", 1),
        ("FIRST LORD", "My lord?", 1),
        ("FIRST LORD", "Indeed.", 1),
        ("HAMLET", "Speak.", 1),
        ("MRS. PAGE", "I will.", 1),
    ]
    assert testing[-2:] == [("Ham", "A new scene.", 2), ("1. Play", "Aye.", 2)]
    comedy = [(s.speaker, s.text) for s in lines if s.play == "THE COMEDY OF TESTS"]
    assert comedy[:3] == [
        ("AEGEON", "Proceed, Solinus, to procure my fall,"),
        ("AEGEON", "And by the doom of death end woes and all."),
        ("DUKE", "Merchant of Syracuse, plead no more;"),
    ]
    assert len(comedy) == 23 and not [s for s in lines if s.play == "THE SONNETS"]

    f = tmp_path / "shaks.txt"
    f.write_text(body, encoding="latin-1")
    ds = corpora.load_shakespeare(f, min_lines=5)
    assert set(ds.groups) == {"THE TRAGEDY OF TESTING/HAMLET", "THE COMEDY OF TESTS/DUKE"}
    i = ds.targets.index("Whether 'tis nobler in the mind to suffer")
    assert ds.text[i] == "To be, or not to be: that is the question."
    assert "To be, or not to be: that is the question." not in ds.targets  # a scene's first line has no context
    two = corpora.load_shakespeare(f, min_lines=5, context_lines=2)
    assert two.text[two.targets.index("Speak.")] == "My lord?\nIndeed."
    chars = corpora.load_shakespeare(f, mode="chars", min_lines=5, seq_len=10, stride=3)
    assert chars.text[0] == "To be, or " and chars.targets[0] == "n" and chars.text[1] == "be, or not"
    assert all(len(x) == 10 and len(y) == 1 for x, y in zip(chars.text, chars.targets))
    with pytest.raises(UserError) as e:
        corpora.load_shakespeare(f, min_lines=10_000)
    one_line_error(e, "shaks.txt", "10000")


# ---------------------------------------------------------------------------------------------
# Partitioners


def _labels(n: int = 400, k: int = 2, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, k, n).tolist()


def _covers(p: part.Partition, n: int) -> None:
    part.check_partition(p, n)
    assert sorted(i for idx in p.values() for i in idx) == list(range(n))


def test_iid_deterministic_balanced():
    a, b, c = part.iid(103, 4, seed=1), part.iid(103, 4, seed=1), part.iid(103, 4, seed=2)
    assert a == b and a != c
    assert list(a) == ["client_0", "client_1", "client_2", "client_3"]
    assert sorted(len(v) for v in a.values()) == [25, 26, 26, 26]
    _covers(a, 103)
    with pytest.raises(UserError) as e:
        part.iid(3, 4)
    one_line_error(e, "3 examples", "4 clients")


def test_dirichlet_skew_min_size_and_determinism():
    y = _labels(600, k=4)
    p = part.dirichlet(y, 6, alpha=0.1, min_size=20, seed=3)
    assert p == part.dirichlet(y, 6, alpha=0.1, min_size=20, seed=3)
    assert min(len(v) for v in p.values()) >= 20
    _covers(p, 600)
    skewed = part.label_counts(p, y, 4)
    flat = part.label_counts(part.dirichlet(y, 6, alpha=1000.0, min_size=1, seed=3), y, 4)
    # small alpha: clients dominated by few labels; huge alpha: near the global mix
    dom = lambda m: np.mean(m.max(1) / m.sum(1))
    assert dom(skewed) > 0.6 > 0.35 > dom(flat)
    with pytest.raises(UserError) as e:
        part.dirichlet(y, 6, alpha=0.5, min_size=101)
    one_line_error(e, "min_size=101", "600 examples")
    with pytest.raises(UserError) as e:
        part.dirichlet(y, 6, alpha=0.001, min_size=99, seed=0, max_tries=5)
    one_line_error(e, "5 tries", "raise alpha")


def test_s_similarity_extremes_for_binary_labels():
    y = _labels(400, k=2, seed=4)
    iid_like = part.s_similarity(y, 8, s=1.0, seed=0)
    sorted_ = part.s_similarity(y, 8, s=0.0, seed=0)
    assert iid_like == part.s_similarity(y, 8, s=1.0, seed=0)
    for p in (iid_like, sorted_, part.s_similarity(y, 8, s=0.3, seed=0)):
        _covers(p, 400)
        assert {len(v) for v in p.values()} == {50}
    pos_rate = np.mean(y)
    frac = lambda p: part.label_counts(p, y, 2)[:, 1] / 50
    assert np.all(np.abs(frac(iid_like) - pos_rate) < 0.25)
    purity = part.label_counts(sorted_, y, 2).max(1) / 50
    assert (purity == 1.0).sum() >= 7  # all clients but the one holding the label boundary are single-label
    with pytest.raises(UserError):
        part.s_similarity(y, 8, s=1.5)


def test_natural_groups_and_splitting():
    groups = ["a"] * 10 + ["b"] * 5 + ["c"] * 2
    p = part.natural(groups)
    assert list(p) == ["a", "b", "c"] and p["c"] == [15, 16]
    q = part.natural(groups, clients_per_group={"a": 3}, seed=1)
    assert list(q) == ["a/0", "a/1", "a/2", "b", "c"] and sorted(len(v) for v in q.values()) == [2, 3, 3, 4, 5]
    assert q == part.natural(groups, clients_per_group={"a": 3}, seed=1)
    _covers(q, 17)
    assert list(part.natural(groups, min_size=5)) == ["a", "b"]
    assert list(part.natural(groups, include=["c", "a"])) == ["c", "a"]
    with pytest.raises(UserError) as e:
        part.natural(groups, clients_per_group=3)
    one_line_error(e, "'c/2'", "without examples")
    with pytest.raises(UserError) as e:
        part.natural(groups, include=["zzz"])
    one_line_error(e, "'zzz'")


def test_partition_dispatch():
    y = _labels(100)
    assert part.make_partition("iid", labels=y, num_clients=4, seed=0) == part.iid(100, 4, 0)
    assert part.make_partition("s_similarity", labels=y, num_clients=4, s=0.2) == part.s_similarity(y, 4, 0.2)
    assert list(part.make_partition("natural", groups=["x", "y"] * 5)) == ["x", "y"]
    with pytest.raises(UserError) as e:
        part.make_partition("natural", labels=y)
    one_line_error(e, "group")
    with pytest.raises(UserError) as e:
        part.make_partition("pathological", labels=y)
    one_line_error(e, "pathological", "dirichlet")


def test_train_test_split_and_subsample():
    p = part.iid(100, 4, seed=0)
    train, test = part.train_test_split_per_client(p, 0.2, seed=5)
    assert (train, test) == part.train_test_split_per_client(p, 0.2, seed=5)
    for name in p:
        assert len(test[name]) == 5 and len(train[name]) == 20
        assert sorted(train[name] + test[name]) == p[name]
    small = part.subsample(train, 7, seed=0)
    assert all(len(v) == 7 and set(v) <= set(train[name]) for name, v in small.items())
    assert part.subsample(train, 1000) == train
    with pytest.raises(UserError) as e:
        part.train_test_split_per_client({"lonely": [3], "ok": [1, 2, 4]}, 0.5)
    one_line_error(e, "'lonely'", "1 example")
    with pytest.raises(UserError):
        part.train_test_split_per_client(p, 1.0)
    with pytest.raises(UserError) as e:
        part.check_partition({"a": [1], "b": []})
    one_line_error(e, "'b'")


def test_plot_label_distribution_writes_png(tmp_path):
    y = _labels(300, k=3)
    p = part.dirichlet(y, 5, alpha=0.3, min_size=5, seed=0)
    out = part.plot_label_distribution(p, y, tmp_path / "plots" / "labels.png", label_names=["a", "b", "c"], title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in out.parent.iterdir()] == ["labels.png"]  # no temporary file left


def test_partition_properties_with_hypothesis():
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=40, deadline=None)
    @hyp.given(st.lists(st.integers(0, 3), min_size=8, max_size=120), st.integers(1, 8), st.floats(0, 1), st.integers(0, 99))
    def prop(y, k, s, seed):
        hyp.assume(len(y) >= k)
        for p in (part.iid(len(y), k, seed), part.s_similarity(y, k, s, seed)):
            _covers(p, len(y))
            assert len(p) == k

    prop()


def test_wordnet_noun_topics_keep_noun_topics_only(tmp_path):
    """wordnet-topics serves nouns only, noun.Tops (the unique beginners) dropped."""
    ds = corpora.load_wordnet_noun_topics(_wordnet_fixture(tmp_path))
    assert ds.label_names == ["noun.animal"] and ds.labels == [0] and ds.text == ["a member of the genus Canis"]


# ---------------------------------------------------------------------------------------------
# The data catalogue and the plan's check of task.dataset


def _task(**kw: str) -> TaskConfig:
    return TaskConfig(**kw)  # type: ignore[arg-type]


def test_catalogue_is_one_table():
    names = [d.name for d in catalogue.CATALOGUE]
    assert len(set(names)) == len(names)
    assert catalogue.choices("text-classification") == [
        "vader",
        "rotten-tomatoes",
        "wordnet-topics",
        "glue-sst2",
        "glue-cola",
        "glue-mnli",
        "glue-qnli",
        "glue-qqp",
        "glue-rte",
        "glue-mrpc",
        "csv",
        "tsv",
        "jsonl",
    ]
    assert catalogue.choices("generation") == ["wordnet-definitions", "shakespeare", "e2e", "webnlg", "csv", "tsv", "jsonl"]
    needs = {d.name for d in catalogue.CATALOGUE if d.needs_path}
    assert needs == {f"glue-{t}" for t in user_files.GLUE} | {"e2e", "webnlg", "csv", "tsv", "jsonl"}
    # names are normalised, aliases resolved, an empty name is the kind's default
    assert catalogue.resolve(_task(kind="text-classification", dataset=" GLUE_SST_2 ")).name == "glue-sst2"
    assert catalogue.resolve(_task(kind="generation", dataset="ndjson")).name == "jsonl"
    assert catalogue.resolve(_task(kind="text-classification")).name == "vader"
    assert catalogue.resolve(_task(kind="generation")).name == "wordnet-definitions"
    # the docs read the table: one line per data set
    lines = catalogue.describe()
    assert len(lines) == len(names) and all(line.startswith(n) for line, n in zip(lines, names))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (['task.dataset="csv"'], "defaults (with --set): task.dataset = 'csv' needs task.data_path (the data file)"),
        (['task.dataset="glue-rte"'], "task.dataset = 'glue-rte' needs task.data_path (the data folder)"),
        (['task.dataset="shakespeare"'], "key 'task.dataset': 'shakespeare' is not a text-classification data set (choose from vader,"),
        (['task.dataset="csv"', 'task.data_path="x.csv"', 'task.label_column=" "'], "task.label_column must name a column"),
    ],
)
def test_plan_checks_the_data_set(overrides, needle):
    with pytest.raises(UserError) as e:
        plan.load(None, ['task.kind="text-classification"', *overrides])
    one_line_error(e, needle)
    config.load(None, ['task.kind="text-classification"', *overrides])  # config alone does not know the catalogue


def test_catalogue_load_refuses_an_unchecked_config():
    """A config that skipped plan.validate still gets the one line, not a crash in a loader."""
    with pytest.raises(UserError) as e:
        catalogue.load(_task(kind="generation", dataset="webnlg"))
    one_line_error(e, "'webnlg' needs task.data_path")


def test_catalogue_loads_users_files(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("q\tout\twho\nhello\tworld\ta\n")
    tc = _task(kind="generation", dataset="tsv", data_path=str(f), text_column="q", target_column="out", group_column="who")
    ds = catalogue.load(tc)
    assert ds.text == ["hello"] and ds.targets == ["world"] and ds.groups == ["a"]
    assert catalogue.resolve(tc).prompt_and_target("x", "y") == ("x\n", "y")
    assert catalogue.resolve(_task(kind="generation")).prompt_and_target("bank (noun)", "land") == ("bank (noun):", " land")


# ---------------------------------------------------------------------------------------------
# The real data (skipped until `scripts/fetch_data.sh` has run)

HAVE = assets.available()


@pytest.mark.skipif(not HAVE["vader"], reason="VADER data not fetched (scripts/fetch_data.sh)")
def test_real_vader_counts():
    ds = corpora.load_vader()
    assert len(ds) == 23_320
    assert Counter(ds.groups) == {"movie": 10_568, "tweet": 4_196, "amazon": 3_610, "nyt": 4_946}
    by = {d: np.mean([y for y, g in zip(ds.labels, ds.groups) if g == d]) for d in assets.VADER_DOMAINS}
    assert by["tweet"] > 0.65 and by["nyt"] < 0.5  # the natural label shift between domains
    p = part.natural(ds.groups)
    assert {k: len(v) for k, v in p.items()} == dict(Counter(ds.groups))


@pytest.mark.skipif(not HAVE["rotten_tomatoes"], reason="Rotten Tomatoes data not fetched (scripts/fetch_data.sh)")
def test_real_rotten_tomatoes():
    ds = corpora.load_rotten_tomatoes()
    assert len(ds) == 12_808 and ds.label_counts() == {"rotten": 5_405, "fresh": 7_403}
    assert len(set(ds.groups)) == 508


@pytest.mark.skipif(not HAVE["wordnet"], reason="WordNet data not fetched (scripts/fetch_data.sh)")
def test_real_wordnet():
    topics = corpora.load_wordnet_topics()  # one load (~2 s); the generation loader reads the same synsets
    assert len(topics) == 117_659 and len(set(topics.groups)) == topics.num_labels == 45
    assert topics.extra["word"][0] == "entity" and topics.label_names[topics.labels[0]] == "noun.Tops"
    assert not any(t.startswith('"') or '; "' in t for t in topics.text)
    assert Counter(topics.extra["pos"]) == {"noun": 82_115, "verb": 13_767, "adjective": 18_156, "adverb": 3_621}


@pytest.mark.skipif(not HAVE["shakespeare"], reason="Shakespeare text not fetched (scripts/fetch_data.sh)")
def test_real_shakespeare_roles():
    ds = corpora.load_shakespeare(min_lines=64)
    roles = ds.group_counts()
    assert 300 <= len(roles) <= 450 and len(ds) > 80_000
    assert "THE TRAGEDY OF HAMLET, PRINCE OF DENMARK/Ham" in roles and "THE TRAGEDY OF OTHELLO, MOOR OF VENICE/IAGO" in roles
    assert len({play for play in ds.extra["play"]}) == 36  # all plays; the Sonnets and A Lover's Complaint have no roles
