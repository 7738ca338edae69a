"""Typed run configuration: dataclasses loaded from TOML, overridable with ``--set key=value``.

Every field has a default and a help text (``metadata["help"]``). Loading rejects unknown keys,
wrong types and out-of-range values with one line that names the file and key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from pf2lora.errors import UserError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class FileList(list[str]):
    """``task.data_path`` written as a list: one file per client (``task.partition = "node"``).
    ``strip()`` is the files joined by ", " (empty when none is given), so code that asks
    ``data_path.strip()`` whether a path is set, or shows it, reads both forms alike."""

    def strip(self, chars: str | None = None) -> str:
        return ", ".join(p.strip(chars) for p in self if p.strip(chars))


@dataclass
class TaskConfig:
    kind: Literal["synthetic", "tiny-text", "text-classification", "generation"] = _f(
        "synthetic",
        "which task: synthetic rank recovery, tiny random-BERT text classification, a pretrained encoder on real "
        "text classification, or a pretrained causal LM on real text generation",
    )
    num_clients: int = _f(8, "number of clients", min=1)
    dim: int = _f(32, "synthetic: input and output dimension d", min=1)
    shared_rank: int = _f(4, "synthetic: rank r_c of the component all clients share", min=0)
    private_ranks: list[int] = _f([0, 0, 0, 1, 1, 1, 2, 2], "synthetic: rank s_k of each client's own component (cycled over clients)")
    train_samples: int = _f(2000, "training samples per client", min=1)
    test_samples: int = _f(1000, "test samples per client", min=1)
    noise: float = _f(0.1, "synthetic: std of the Gaussian target noise", min=0.0)
    singular_min: float = _f(0.5, "synthetic: smallest singular value of a true component", min=0.0)
    singular_max: float = _f(1.5, "synthetic: largest singular value of a true component", min=0.0)
    num_labels: int = _f(2, "tiny-text: number of classes", min=2)
    seq_len: int = _f(16, "tiny-text: tokens per example", min=2)
    data_seed: int = _f(1234, "seed of the data generator (kept apart from the training seed)", min=0, max=2**63 - 1)
    # -- real language tasks (text-classification, generation) ------------------------------------
    model: str = _f(
        "",
        "text tasks: model name (all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2, SmolLM2-135M), a local "
        "Hugging Face model directory or a hub name; empty = all-MiniLM-L6-v2 (classification), SmolLM2-135M (generation)",
    )
    dataset: str = _f(
        "",
        "text tasks: data set, a name from the data catalogue (`pf2lora datasets` lists them), "
        "e.g. vader, glue-sst2, wordnet-definitions, csv; "
        "empty = the kind's default (vader / wordnet-definitions)",
    )
    data_path: str | FileList = _f(
        "",
        "text tasks: the data file or folder (required for glue-*, e2e, webnlg, csv, tsv, jsonl; "
        "else overrides the fetched copy in the cache); partition = 'node': a list of one csv/tsv/jsonl file per client "
        '("" or empty = that client\'s file is only on its SuperNode, node config data-path)',
    )
    text_column: str = _f("text", "csv/tsv/jsonl: column of the input text")
    text_pair_column: str = _f("", "csv/tsv/jsonl: column of the second text of a sentence pair (empty = none)")
    label_column: str = _f("label", "csv/tsv/jsonl classification: column of the label (class index, or a name from label_names)")
    target_column: str = _f("target", "csv/tsv/jsonl generation: column of the target text")
    group_column: str = _f("", "csv/tsv/jsonl: column of natural client ids for partition = 'natural' (e2e: the slot, e.g. eatType)")
    label_names: list[str] = _f([], "csv/tsv/jsonl classification: class names in index order (empty = integer labels)")
    partition: Literal["natural", "dirichlet", "s-similarity", "iid", "node"] = _f(
        "natural",
        "text tasks: how examples are dealt to clients: by natural group (domain, topic, role), Dirichlet "
        "label skew, SCAFFOLD's s-similarity, i.i.d., or node: one client per file, each client's own file "
        "(task.data_path's list, or on a Flower deployment its SuperNode's data-path), cut into train/test on its own",
    )
    groups: list[str] = _f([], "natural partition: the groups to keep, in order (empty = the num_clients / clients_per_group largest)")
    clients_per_group: int = _f(1, "natural partition: clients each group is split into at random", min=1)
    dirichlet_alpha: float = _f(0.5, "dirichlet partition: concentration (small = few labels per client)", gt=0.0)
    min_client_size: int = _f(20, "dirichlet partition: redraw until every client holds at least this many examples", min=2)
    similarity: float = _f(0.5, "s-similarity partition: fraction s dealt i.i.d. (1 = iid, 0 = sorted by label)", min=0.0, max=1.0)
    test_fraction: float = _f(0.2, "text tasks: fraction of each client's examples held out as its test split", gt=0.0, max=0.9)
    train_samples_min: int = _f(
        0,
        "text tasks: when > 0, client training caps are spread evenly over "
        "[train_samples_min, train_samples] in a random order (size heterogeneity)",
        min=0,
    )
    max_length: int = _f(64, "text tasks: tokens per example; longer texts are truncated (counted, one warning)", min=8)
    eval_generate: int = _f(32, "generation: test examples per client decoded greedily for BLEU / ROUGE-L (0 = none)", min=0)
    max_new_tokens: int = _f(24, "generation: most tokens a greedy decode adds", min=1)


@dataclass
class LoRAConfig:
    rank: int = _f(8, "rank r of the common (shared) adapter", min=1)
    alpha: float = _f(8.0, "alpha of the common adapter; its scale is alpha / rank", gt=0.0)
    private_rank: int = _f(2, "rank r~ of each client's private adapter", min=1)
    private_alpha: float = _f(2.0, "alpha~ of the private adapter; its scale is alpha~ / r~", gt=0.0)
    target_modules: list[str] = _f([], "module names to adapt; empty = the architecture's default")
    head: Literal["shared", "private"] = _f("shared", "whether a trained task head is averaged (shared) or kept per client")


@dataclass
class OptimConfig:
    lr: float = _f(1e-2, "AdamW learning rate of the shared (upper-level) parameters, same for every method", gt=0.0)
    weight_decay: float = _f(0.0, "AdamW weight decay", min=0.0)
    beta1: float = _f(0.9, "AdamW beta1", min=0.0)
    beta2: float = _f(0.999, "AdamW beta2", min=0.0)
    lower_lr: float = _f(5e-2, "SGD learning rate eta_y of private (lower-level) adapters", gt=0.0)


@dataclass
class PF2LoRAConfig:
    estimator: Literal["finite-difference", "exact", "first-order"] = _f(
        "finite-difference", "hypergradient estimator for the mixed Hessian-vector product"
    )
    fd_eps: float = _f(1e-3, "finite-difference step e0; the perturbation is e0 / ||v||", gt=0.0)
    fd_one_sided: bool = _f(
        True,
        "one-sided difference reusing the lower step's gradient: 3 forward/backward passes a step instead of the central "
        "difference's 4, error O(e0) instead of O(e0^2) (1e-3 to 1e-2 relative at e0 = 1e-3, far below mini-batch noise)",
    )
    hvp_every: int = _f(
        1,
        "recompute the mixed Hessian-vector product H_xy v every k-th local step of a round and reuse it in between "
        "(an approximation: a stale H_xy v; 2 passes on a reuse step); 1 = every step (exact to the estimator)",
        min=1,
    )
    one_batch: bool = _f(
        False,
        "the lower step and the upper gradient on one mini-batch instead of two independent ones: an ablation of the "
        "unrolled step's second batch (the paper draws two; the hypergradient's estimate is unbiased only then)",
    )


@dataclass
class HETLoRAConfig:
    rank_min: int = _f(0, "smallest client rank; 0 = rank - private_rank", min=0)
    rank_max: int = _f(0, "largest client rank (the server's); 0 = rank + private_rank", min=0)
    gamma: float = _f(0.99, "pruning factor: a prune keeps floor(gamma * r_k) ranks", gt=0.0, max=1.0)
    reg: float = _f(1e-3, "rank regulariser weight lambda on ||B_tail|| * ||A_tail||", min=0.0)
    prune_tol: float = _f(0.05, "prune only when the tail's share of ||B A||_F is below this (see docs)", min=0.0)


@dataclass
class PerFedAvgConfig:
    inner_lr: float = _f(5e-2, "SGD step a of the inner (adaptation) step, also used once before evaluation", gt=0.0)


@dataclass
class PFedLoRAConfig:
    private_steps: int = _f(0, "steps of the private phase each round (shared adapter frozen); 0 = local_steps // 2", min=0)


@dataclass
class FDLoRAConfig:
    server_lr: float = _f(1.0, "server outer SGD learning rate on the pseudo-gradient", gt=0.0)
    server_momentum: float = _f(0.5, "server outer SGD momentum", min=0.0)
    nesterov: bool = _f(True, "Nesterov momentum for the server outer optimizer")
    personal_every: int = _f(5, "refresh the personal adapter by local training every N rounds", min=1)
    fusion_holdout: float = _f(0.05, "fraction of each client's training data held out to fit the fusion weights", gt=0.0, max=0.5)
    fusion_bound: float = _f(1.5, "fusion weights are searched in [-bound, bound]", gt=0.0)
    fusion_l1: float = _f(0.05, "L1 penalty on the fusion weights", min=0.0)
    fusion_evals: int = _f(60, "loss evaluations of the gradient-free fusion search", min=1)


@dataclass
class FedLoRAOptConfig:
    local_stage_steps: int = _f(0, "steps of the local stage (B magnitude) each round; 0 = local_steps // 2", min=0)


@dataclass
class FlexLoRAConfig:
    rank_min: int = _f(0, "smallest client rank; 0 = rank - private_rank", min=0)
    rank_max: int = _f(0, "largest client rank; 0 = rank + private_rank", min=0)


@dataclass
class SHELoRAConfig:
    """SHE-LoRA (selective homomorphic encryption); owned by pf2lora/methods/she_lora.py."""

    column_budgets: list[float] = _f(
        [0.05, 0.1, 0.2],
        "fraction of each adapted layer's input columns (of LoRA A) a client encrypts, ceil(f d_in) and at least 1, cycled over "
        "the clients in their order (its resources); 1.0 = encrypt everything",
        gt=0.0,
        max=1.0,
    )
    calibration_samples: int = _f(
        16, "training examples per client whose adapted-layer inputs rank its columns (|A[:, j]| ||X_j||, in round 1)", min=1
    )
    poly_modulus_degree: int = _f(8192, "CKKS ring degree N (a power of two); a ciphertext holds N / 2 values", min=8192, max=32768)
    fixed_point_bits: int = _f(
        24,
        "encrypted values are rounded to multiples of 2^-bits, so decrypted sums are exact; a client's weighted update must stay "
        "below 2^(34 - bits) / clients in magnitude",
        min=8,
        max=30,
    )

    def __post_init__(self) -> None:
        if not self.column_budgets:
            raise UserError("key 'she_lora.column_budgets' must list at least one budget")
        if self.poly_modulus_degree & (self.poly_modulus_degree - 1):
            raise UserError(f"key 'she_lora.poly_modulus_degree' must be a power of two, got {self.poly_modulus_degree}")


@dataclass
class FedHeLLoConfig:
    """Fed-HeLLo (heterogeneous LoRA layer allocation); owned by pf2lora/methods/fed_hello.py."""

    layer_budgets: list[float] = _f(
        [1.0, 0.75, 0.5],
        "fraction of the adapted layers a client trains (its resources), cycled over the clients (client_i gets budget "
        "(i + a seeded offset) mod the list's length); a client trains floor(budget * layers) layers, at least one",
        gt=0.0,
        max=1.0,
    )
    allocation: Literal["gd", "rgd", "fim"] = _f(
        "fim",
        "which layers a client trains each round: gd = the top-k layers of fed_hello.pattern (deterministic), rgd = k layers "
        "sampled without replacement with the pattern's probabilities (per client per round), fim = sampled with probabilities "
        "from the clients' per-layer Fisher scores of the global model (the pattern's rgd until the first scores arrive)",
    )
    pattern: Literal["uniform", "triangle", "inverted-triangle", "bottleneck"] = _f(
        "bottleneck",
        "geometric prior over depth: uniform, triangle (most clients train the layers nearest the input), inverted-triangle "
        "(nearest the output), bottleneck (both ends, fewest in the middle)",
    )
    layer_unit: Literal["block", "module"] = _f(
        "block",
        "what one allocated layer is: block = a transformer block's adapted modules together (e.g. its query and value), module = each",
    )
    fisher_every: int = _f(
        5, "fim: clients send per-layer Fisher scores in rounds N, 2N, ...; each set is used from the next round on", min=1
    )
    fisher_samples: int = _f(16, "fim: training examples per client whose per-example gradients give its Fisher scores", min=1)
    fisher_levels: int = _f(
        3, "fim: the scores are clustered (1-D k-means) into this many levels; level j (1 = lowest) has weight j", min=1
    )

    def __post_init__(self) -> None:
        if not self.layer_budgets:
            raise UserError("key 'fed_hello.layer_budgets' must list at least one budget")


@dataclass
class ServerConfig:
    aggregator: Literal["mean", "median", "trimmed-mean"] = _f(
        "mean", "how the server combines client uploads: weighted mean, coordinate-wise median or trimmed mean"
    )
    trim_fraction: float = _f(
        0.1, "trimmed-mean: fraction of the largest and of the smallest values dropped per coordinate", min=0.0, max=0.49
    )
    clip_norm: float = _f(
        0.0, "clip each client's change (upload minus what it received) to this L2 norm before aggregating; 0 = off", min=0.0
    )
    min_clients: int = _f(1, "a round with fewer successful client updates fails the run loudly", min=1)
    dp_noise_multiplier: float = _f(0.0, "client-level DP: Gaussian noise std = multiplier * dp_clip_norm / clients; 0 = off", min=0.0)
    dp_clip_norm: float = _f(1.0, "client-level DP: each client's change is clipped to this L2 norm", gt=0.0)
    dp_delta: float = _f(1e-5, "client-level DP: the delta of the reported (epsilon, delta)", gt=0.0, max=1.0)
    # -- secure aggregation (Flower SecAgg+; checked by pf2lora.secagg, see docs/flower.md) --------
    secure_aggregation: bool = _f(
        False,
        "flower engines: aggregate uploads with Flower's SecAgg+, so the server sees only their "
        "weighted mean; for plain-mean methods only, without robust aggregators, clipping or DP",
    )
    secagg_num_shares: float = _f(
        1.0,
        "secure aggregation: shares of each client's secrets, a fraction (<= 1) of the round's clients or a count (an integer >= 3)",
        gt=0.0,
    )
    secagg_reconstruction_threshold: float = _f(
        0.7,
        "secure aggregation: shares needed to rebuild a secret, a fraction (<= 1) "
        "of the shares or a count (>= 2); shares - threshold clients may drop out",
        gt=0.0,
    )
    secagg_clipping_range: float = _f(
        8.0, "secure aggregation: every uploaded value must lie in [-c, c]; a client with a value outside drops out of the round", gt=0.0
    )
    secagg_quantization_range: int = _f(
        2**22, "secure aggregation: integer levels over [-c, c] (step 2c / levels); levels x clients per round must stay below 2**32", min=2
    )


@dataclass
class FaultsConfig:
    dropout_prob: float = _f(0.0, "injected: probability that a sampled client drops out of a round", min=0.0, max=1.0)
    crash_prob: float = _f(0.0, "injected: probability that a sampled client raises during its update", min=0.0, max=1.0)
    straggler_prob: float = _f(0.0, "injected: probability that a client is slowed by straggler_delay_s", min=0.0, max=1.0)
    straggler_delay_s: float = _f(0.0, "injected: simulated extra seconds of a straggler (added to its measured time, not slept)", min=0.0)
    deadline_s: float = _f(0.0, "round deadline per client in seconds; a slower update is left out of the round (0 = none)", min=0.0)
    poison_clients: list[str] = _f([], "injected attack: these clients' uploads are replaced (see poison)")
    poison: Literal["nan", "scale"] = _f("nan", "injected attack: NaN uploads, or the honest change multiplied by poison_scale")
    poison_scale: float = _f(1e6, "injected attack: factor for poison = 'scale'")


@dataclass
class LogConfig:
    tensorboard: bool = _f(
        False, "also write every metric of metrics.jsonl as TensorBoard scalars under RUN/tb/METHOD (pip install 'pf2lora[tensorboard]')"
    )


@dataclass
class EvalConfig:
    rank_threshold: float = _f(0.1, "effective rank counts singular values above this fraction of the largest", gt=0.0, max=1.0)
    every: int = _f(0, "evaluate every N rounds (0 = only at the end)", min=0)


@dataclass
class FlowerConfig:
    client_cpus: float = _f(1.0, "flower-sim: CPU cores Ray reserves per simulated client (how many clients train at once)", gt=0.0)
    round_timeout_s: float = _f(
        0.0,
        "flower: seconds the server waits for a round's replies; a client that has not replied is recorded as crashed (0 = wait for all)",
        min=0.0,
    )
    node_wait_s: float = _f(120.0, "flower: seconds the server waits for every client's SuperNode to connect", gt=0.0)
    state_dir: str = _f(
        "",
        "flower: folder where client nodes keep their private state between rounds (one file per client); empty = a temporary folder per run",
    )
    node_cache: bool = _f(
        True,
        "flower-deploy: each node keeps its task (model, data) in one worker process between messages instead of rebuilding it "
        "in the new ClientApp process Flower starts for every message",
    )
    node_cache_idle_s: float = _f(600.0, "flower-deploy: seconds a node's worker waits for a message before it exits", gt=0.0)


@dataclass
class RunConfig:
    name: str = _f("run", "name of the experiment, used in reports")
    seed: int = _f(0, "training seed: client sampling, initialisation, mini-batches", min=0, max=2**63 - 1)
    methods: list[str] = _f(["pf2lora"], "methods to run, in order (see `pf2lora methods`)")
    rounds: int = _f(50, "communication rounds", min=1)
    local_steps: int = _f(10, "local steps per client per round", min=1)
    client_fraction: float = _f(1.0, "fraction of clients sampled each round", gt=0.0, max=1.0)
    batch_size: int = _f(32, "mini-batch size", min=1)
    num_threads: int = _f(0, "torch CPU threads (0 = torch's default); tiny models run fastest on 1", min=0)
    device: str = _f(
        "auto",
        "where the model, adapters, optimizer state and batches live: auto (CUDA if present, else CPU), cpu, cuda or cuda:N (mps is refused: no float64 there)",
        pattern=r"auto|cpu|cuda(:[0-9]+)?|mps",
    )
    precision: Literal["fp32", "bf16"] = _f(
        "fp32", "fp32, or bf16: the frozen base computes in bfloat16 autocast; adapters and optimizer moments stay float32"
    )
    parallel_clients: int = _f(
        1,
        "clients of a round trained together in lockstep, one forward/backward per step (in-process engine); "
        "1 = one after another, 0 = auto (all sampled clients on a GPU, or on a CPU for the overhead-bound "
        "synthetic and tiny-text tasks; 1 for real text on a CPU)",
        min=0,
    )
    checkpoint: bool = _f(True, "write an atomic checkpoint after every round (resume with `pf2lora run --resume DIR`)")
    save_every: int = _f(
        0,
        "also write every client's adapter (RUN/adapters/METHOD/CLIENT) every N rounds; they are always written when a method finishes (0 = only then)",
        min=0,
    )
    task: TaskConfig = field(default_factory=TaskConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pf2lora: PF2LoRAConfig = field(default_factory=PF2LoRAConfig)
    hetlora: HETLoRAConfig = field(default_factory=HETLoRAConfig)
    perfedavg: PerFedAvgConfig = field(default_factory=PerFedAvgConfig)
    pfedlora: PFedLoRAConfig = field(default_factory=PFedLoRAConfig)
    fdlora: FDLoRAConfig = field(default_factory=FDLoRAConfig)
    fedlora_opt: FedLoRAOptConfig = field(default_factory=FedLoRAOptConfig)
    flexlora: FlexLoRAConfig = field(default_factory=FlexLoRAConfig)
    she_lora: SHELoRAConfig = field(default_factory=SHELoRAConfig)
    fed_hello: FedHeLLoConfig = field(default_factory=FedHeLLoConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)


# ---------------------------------------------------------------------------------------------
# Loading and validation


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is FileList:
        return "a list of strings"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    bad = UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        for alternative in typing.get_args(tp):
            try:
                return _coerce(value, alternative, where)
            except UserError:
                continue
        raise bad
    if tp is FileList:
        if not isinstance(value, list):
            raise bad
        return FileList(_coerce(v, str, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            return float(value)
        except OverflowError:
            raise bad from None
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp}")


def _check_range(value: Any, meta: typing.Mapping[str, Any], where: str) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, str) and "pattern" in meta and not re.fullmatch(meta["pattern"], v):
            raise UserError(f"{where}: must match {meta['pattern']}, got {v!r}")
        if not isinstance(v, (int, float)):
            return
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{where}: must be a finite number, got {v!r}")
        if "min" in meta and v < meta["min"]:
            raise UserError(f"{where}: must be >= {meta['min']}, got {v!r}")
        if "gt" in meta and v <= meta["gt"]:
            raise UserError(f"{where}: must be > {meta['gt']}, got {v!r}")
        if "max" in meta and v > meta["max"]:
            raise UserError(f"{where}: must be <= {meta['max']}, got {v!r}")


def _build(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = prefix + unknown[0]
        raise UserError(f"{source}: unknown config key {name!r} (known here: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        where = f"{source}: key {prefix + name!r}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if not isinstance(value, dict):
                raise UserError(f"{where}: expected a table [{prefix + name}], got {value!r}")
            kwargs[name] = _build(tp, value, source, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, tp, where)
            _check_range(kwargs[name], fields[name].metadata, where)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    word = raw.strip()
    if re.fullmatch(r"[A-Za-z_][\w.-]*", word) and word not in ("true", "false"):
        return key.split("."), word  # a bare word such as `--set pf2lora.estimator=exact` (or `nan`)
    if "\n" in raw or "\r" in raw:
        raise UserError(f"--set {key}: the value must be on one line")
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except (tomllib.TOMLDecodeError, RecursionError):
        return key.split("."), raw
    if set(parsed) != {"v"}:
        raise UserError(f"--set {key}: expected one value, got {raw!r}")
    value = parsed["v"]
    return key.split("."), value


def _validate(cfg: RunConfig, source: str) -> None:
    """Checks that need only the config; those that need the methods, the data catalogue or the
    SecAgg+ rules are :func:`pf2lora.plan.validate`."""
    if not cfg.methods:
        raise UserError(f"{source}: key 'methods' must name at least one method")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise UserError(f"{source}: key 'methods' lists a method twice: {cfg.methods}")
    if any(r < 0 for r in cfg.task.private_ranks) or not cfg.task.private_ranks:
        raise UserError(f"{source}: key 'task.private_ranks' must be a non-empty list of ranks >= 0")
    if cfg.task.singular_min > cfg.task.singular_max:
        raise UserError(f"{source}: task.singular_min must not exceed task.singular_max")
    for section in ("hetlora", "flexlora"):
        lo, hi = resolved_rank_range(cfg, getattr(cfg, section))
        if lo < 1 or hi < lo:
            raise UserError(f"{source}: {section} ranks must satisfy 1 <= rank_min <= rank_max, got [{lo}, {hi}]")
    if cfg.task.kind == "synthetic" and cfg.task.shared_rank + max(cfg.task.private_ranks) > cfg.task.dim:
        raise UserError(f"{source}: task.shared_rank + max(task.private_ranks) exceeds task.dim")
    if cfg.task.kind in ("text-classification", "generation"):
        _validate_text_clients(cfg.task, source)


def _validate_text_clients(tc: TaskConfig, source: str) -> None:
    """How the real-text tasks deal examples to clients; the data set itself is checked against
    the data catalogue by :func:`pf2lora.plan.validate`."""
    if tc.kind == "generation" and tc.partition in ("dirichlet", "s-similarity"):
        raise UserError(f"{source}: task.partition = {tc.partition!r} needs class labels; generation supports natural and iid")
    if tc.train_samples_min > tc.train_samples:
        raise UserError(f"{source}: task.train_samples_min ({tc.train_samples_min}) exceeds task.train_samples ({tc.train_samples})")
    if len(set(tc.groups)) != len(tc.groups):
        raise UserError(f"{source}: key 'task.groups' lists a group twice: {tc.groups}")
    if tc.partition == "natural" and tc.groups and tc.num_clients != len(tc.groups) * tc.clients_per_group:
        raise UserError(
            f"{source}: natural partition: task.num_clients ({tc.num_clients}) must equal len(task.groups) "
            f"({len(tc.groups)}) x task.clients_per_group ({tc.clients_per_group})"
        )
    if tc.partition == "natural" and not tc.groups and tc.num_clients % tc.clients_per_group:
        raise UserError(
            f"{source}: natural partition: task.num_clients ({tc.num_clients}) must be a multiple of "
            f"task.clients_per_group ({tc.clients_per_group}), or name the groups in task.groups"
        )


def resolved_rank_range(cfg: RunConfig, section: HETLoRAConfig | FlexLoRAConfig) -> tuple[int, int]:
    """Heterogeneous client ranks default to PF2LoRA's range [r - r~, r + r~] (spec, HETLoRA)."""
    lo = section.rank_min or max(1, cfg.lora.rank - cfg.lora.private_rank)
    hi = section.rank_max or cfg.lora.rank + cfg.lora.private_rank
    return lo, hi


def resolved_hetlora_ranks(cfg: RunConfig) -> tuple[int, int]:
    return resolved_rank_range(cfg, cfg.hetlora)


def from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    cfg = _build(RunConfig, data, source)
    _validate(cfg, source)
    return cfg


def source_of(path: str | Path | None, overrides: Sequence[str] = ()) -> str:
    """How error messages name a config loaded from ``path`` with ``overrides``."""
    source = "defaults" if path is None else str(Path(path))
    return f"{source} (with --set)" if overrides else source


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load ``path`` (or the defaults when None), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: config file not found")
        try:
            text = p.read_text()
        except UnicodeDecodeError as e:
            raise UserError(f"{p}: not valid TOML ({e})") from None
        data = _toml(text, str(p))
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise UserError(f"--set {item!r}: {k!r} is not a table")
            node = nxt
        node[keys[-1]] = value
    return from_dict(data, source_of(path, overrides))


def loads(text: str, source: str = "config") -> RunConfig:
    """The config :func:`dumps` wrote (e.g. sent to another process)."""
    return from_dict(_toml(text, source), source)


def _toml(text: str, source: str) -> dict[str, Any]:
    """``text`` parsed as TOML; a user error naming ``source`` if it is not."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise UserError(f"{source}: not valid TOML (nested too deeply)") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{source}: not valid TOML ({e})") from None


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dumps(cfg: RunConfig) -> str:
    return tomli_w.dumps(to_dict(cfg))


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every config key, for `pf2lora config-help` and the docs."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], prefix + f.name + ".")
        else:
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                raise TypeError(f"config key {prefix + f.name} has no default")
            rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows
