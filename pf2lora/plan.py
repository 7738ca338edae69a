"""The run plan: checks that span modules, and the task built for the methods that will train on it.

:mod:`pf2lora.config` checks each key on its own (types, ranges) and imports nothing else of
pf2lora; what needs another module's knowledge (is a method registered? is ``task.dataset`` in the
data catalogue? may these methods be secure-aggregated? does a method need double backward?) is
decided here, in one place, before anything is built. The CLI, the benchmarks and the engines
load configs and build tasks through this module.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import torch

from pf2lora import config, lora, models, secagg, tasks
from pf2lora import state as st
from pf2lora.config import RunConfig, TaskConfig
from pf2lora.data import catalogue
from pf2lora.errors import UserError
from pf2lora.methods import registry
from pf2lora.tasks import Task


def validate(cfg: RunConfig, source: str = "config", *, data_path_optional: bool = False) -> None:
    """One-line :class:`~pf2lora.errors.UserError` (naming ``source``) for a config that no single
    section can judge on its own, or whose ``device`` this machine lacks.

    ``data_path_optional`` (the dry run): an empty ``task.data_path`` of a data set that needs the
    user's file passes (:func:`missing_data` names it); everything else about the data set is checked."""
    methods = registry()
    for m in cfg.methods:
        if m not in methods:
            raise UserError(f"{source}: unknown method {m!r} (known: {', '.join(sorted(methods))})")
    task = cfg.task
    if data_path_optional and missing_data(task) is not None:
        task = dataclasses.replace(task, data_path=".")  # a stand-in path: the columns etc. are still checked
    catalogue.check(task, source)
    secagg.check_config(cfg, [m for m in cfg.methods if not methods[m].plain_mean_aggregation], source)
    device = resolve_device(cfg.device, source)
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f'{source}: precision = "bf16": {device_name(device)} has no bfloat16 support; use precision = "fp32"')
    if cfg.precision == "bf16" and "pf2lora" in cfg.methods and cfg.pf2lora.estimator == "finite-difference":
        warnings.warn(
            f'{source}: precision = "bf16" with pf2lora.estimator = "finite-difference": bfloat16 rounding swamps the '
            "finite difference (its step pf2lora.fd_eps is below bfloat16's resolution), so the hypergradient is mostly noise; "
            'use pf2lora.estimator = "exact"',
            UserWarning,
            stacklevel=2,
        )


def resolve_device(spec: str, source: str = "config") -> torch.device:
    """The torch device that ``device = spec`` (:attr:`RunConfig.device`) names on this machine:
    ``auto`` is CUDA when present, else the CPU. A device this machine lacks is a one-line
    :class:`~pf2lora.errors.UserError` (naming ``source``), never a CUDA error mid-run."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f'{source}: device = {spec!r} is not a device (use "auto", "cpu", "cuda", "cuda:N" or "mps")') from None
    use = 'use device = "cpu" or "auto"'
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = f"torch {torch.__version__} built without CUDA" if torch.version.cuda is None else "no CUDA GPU found"
            raise UserError(f"{source}: device = {spec!r}: CUDA is not available on this machine ({why}); {use}")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise UserError(f"{source}: device = {spec!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
        if device.index is None:  # the current one, named: tensors and summaries then say cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{source}: device = {spec!r}: MPS (Apple GPU) is not available on this machine; {use}")
        # Aggregation (robust means, DP, norms), FlexLoRA's SVD and the finite difference's norm
        # accumulate in float64, which MPS lacks: refuse before the run rather than fail in round 1.
        raise UserError(f"{source}: device = {spec!r}: MPS is not supported yet (pf2lora accumulates in float64, which MPS lacks); {use}")
    return device


def device_name(device: torch.device) -> str:
    """What ``device`` is, for summaries: the GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return _cpu_model() or platform.processor() or "cpu"


def _cpu_model() -> str | None:
    """The CPU's model name where the OS says it (Linux: /proc/cpuinfo; platform.processor() there
    gives only the architecture)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return None


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """:func:`pf2lora.config.load` and :func:`validate`: a config ready to run."""
    cfg = config.load(path, overrides)
    validate(cfg, config.source_of(path, overrides))
    return cfg


def double_backward(cfg: RunConfig) -> bool:
    """Whether any method of the run differentiates through a gradient (its class says so)."""
    methods = registry()
    return any(methods[name].needs_double_backward(cfg) for name in cfg.methods)


def build_task(cfg: RunConfig) -> Task:
    """The task of ``cfg``, set up for the methods that will train on it (e.g. eager attention
    when one needs double backward), its model and clients' data on ``cfg.device``, computing in
    ``cfg.precision``."""
    task = tasks.build_task(cfg, double_backward=double_backward(cfg))
    task.precision = cfg.precision
    return task.to(resolve_device(cfg.device))


# ---------------------------------------------------------------------------------------------
# The dry run (`pf2lora run CONFIG --dry-run`): what a run would do, running and writing nothing

NEEDS_HUB = models.NEEDS_HUB
"""How the dry run names a model only the Hugging Face hub has (not built in, not a local directory,
not in the local hub cache); the run would download it."""
NEEDS_DATA = "needs task.data_path"
"""How the dry run names a user's data file that the config leaves empty."""

_DATA_FILES = {
    "e2e": "the E2E NLG CSV, e.g. e2e-dataset/trainset.csv: columns mr (meaning representation) and ref (reference text)",
    "webnlg": "WebNLG in the Hugging Face datasets layout, JSON lines or a JSON list: records with modified_triple_sets, lex and category",
}
"""What the users' files of the data-to-text sets are (the GLUE folders and own tables are described from the catalogue)."""

_GLUE_FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mnli": "MNLI", "qnli": "QNLI", "qqp": "QQP", "rte": "RTE", "mrpc": "MRPC"}


def missing_data(tc: TaskConfig) -> str | None:
    """``needs task.data_path (what it should be)`` when the task's data set is a user's file and
    ``task.data_path`` is empty; else None (an unknown data set is :func:`validate`'s to report)."""
    if tc.kind not in catalogue.KINDS:
        return None
    try:
        entry = catalogue.resolve(tc)
    except UserError:
        return None
    if not entry.needs_path or tc.data_path.strip():
        return None
    if entry.name.startswith("glue-"):
        task = entry.name.removeprefix("glue-")
        what = f"the task's folder of the official GLUE distribution, holding train.tsv, e.g. glue_data/{_GLUE_FOLDERS.get(task, task.upper())}"
    elif entry.user_columns:
        columns = ["task.text_column", "task.label_column" if tc.kind == catalogue.CLASSIFICATION else "task.target_column"]
        what = f"your {entry.name.upper()} file with the columns named by {' and '.join(columns)}"
    else:
        what = _DATA_FILES.get(entry.name, f"a {entry.path_is}: {entry.about}")
    return f"{NEEDS_DATA} ({what})"


def load_for_dry_run(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """:func:`load`, except that an empty ``task.data_path`` of a data set that needs one passes
    (the dry run names it): every other error is the run's, word for word."""
    cfg = config.load(path, overrides)
    validate(cfg, config.source_of(path, overrides), data_path_optional=True)
    return cfg


@dataclasses.dataclass
class MethodCost:
    """A method's size per client, one entry per client: the parameters it holds (its adapters, in
    whatever factorisation the method uses, and the task's head) and the bytes up and down in a
    round (the first round: HETLoRA's uploads shrink as clients prune)."""

    method: str
    adapter: list[int]
    head: list[int]
    upload: list[int]
    download: list[int]


@dataclasses.dataclass
class DryRun:
    """What :func:`dry_run` resolved, and what it could not."""

    model: str
    data: str
    clients: list[str]
    costs: list[MethodCost] | None
    """None when the model's shapes are unknown (``unknown`` says why)."""
    unknown: str = ""
    missing: list[str] = dataclasses.field(default_factory=list)
    """What the run needs that is not here: ``needs the hub: NAME``, ``needs task.data_path (...)``."""


class _Skeleton:
    """What the methods' state initialisers read of a task (its LoRA targets and its head's shapes),
    from a model built on the meta device: no weights loaded, no data encoded."""

    def __init__(self, targets: list[lora.LoRATarget], head: dict[str, tuple[int, ...]]):
        self.targets = targets
        self.head = head

    def init_head(self, role: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {st.key(role, name): torch.zeros(shape) for name, shape in self.head.items()}


def _skeleton(cfg: RunConfig, model_dir: Path, num_labels: int | None) -> tuple[_Skeleton, str]:
    """The model of ``model_dir`` built on the meta device with LoRA injected as the run injects it,
    and a line describing it. Errors loading it are the run's one line."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from pf2lora.tasks.text_classification import checkpoint_keys, fresh_parameters

    classification = cfg.task.kind == catalogue.CLASSIFICATION
    try:
        with models.quiet_transformers():
            models.load_tokenizer(str(model_dir))  # the run loads it before the model: its errors come first
            hf_config = AutoConfig.from_pretrained(model_dir)
            if classification:
                hf_config.num_labels = num_labels or 2
            with torch.device("meta"):
                auto = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
                model = auto.from_config(hf_config)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model in {model_dir}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    total = sum(p.numel() for p in model.parameters())
    head: dict[str, tuple[int, ...]] = {}
    if classification:  # as TextClassificationTask._prepare_model: what the checkpoint does not hold
        names = fresh_parameters(model, checkpoint_keys(model_dir)) or [
            n for n, _ in model.named_parameters() if n.startswith("classifier.")
        ]
        shapes = dict(model.named_parameters())
        head = {n: tuple(shapes[n].shape) for n in names}
    try:
        wanted = cfg.lora.target_modules or lora.default_targets(hf_config.model_type)
        targets = lora.inject(model, wanted, {lora.COMMON: cfg.lora.alpha, lora.PRIVATE: cfg.lora.private_alpha})
    except ValueError as e:
        raise UserError(f"{model_dir}: {e}") from None
    adapted = ", ".join(sorted({t.path.rsplit(".", 1)[-1] for t in targets}))
    layers = getattr(hf_config, "num_hidden_layers", "?")
    hidden = getattr(hf_config, "hidden_size", "?")
    line = f"{hf_config.model_type}, {layers} layers, hidden {hidden}, {total / 1e6:.1f}M parameters; LoRA on {adapted} ({len(targets)} layers)"
    if head:
        line += f"; trained head: {', '.join(head)}"
    return _Skeleton(targets, head), line


def method_costs(cfg: RunConfig, task: Task | _Skeleton, client_ids: Sequence[str]) -> list[MethodCost]:
    """Per method of ``cfg`` and per client: the parameters it holds (received shared tensors and
    its own private ones, as the benchmarks count them; head = the task's :meth:`init_head`
    tensors, adapter = the rest) and the bytes of its first round's download (the broadcast) and
    upload (the method's :meth:`upload_spec`, a free rank taken at the size received), as the
    engines count them (numel x element size)."""
    head_paths = {st.path_of(k) for k in task.init_head(st.SHARED, torch.Generator().manual_seed(0))}
    costs = []
    for name in cfg.methods:
        method = registry()[name](cfg, cast(Task, task))
        server = method.init_server(torch.Generator().manual_seed(cfg.seed))
        cost = MethodCost(name, [], [], [], [])
        for cid in client_ids:
            received = method.broadcast(server, cid)
            client = method.init_client(cid, torch.Generator().manual_seed(cfg.seed))
            held = {**{k: v for k, v in received.items() if st.is_param(k)}, **st.params_of(client)}
            cost.adapter.append(sum(v.numel() for k, v in held.items() if st.path_of(k) not in head_paths))
            cost.head.append(sum(v.numel() for k, v in held.items() if st.path_of(k) in head_paths))
            cost.download.append(sum(v.numel() * v.element_size() for v in received.values()))
            upload = 0
            for key, dims in method.upload_spec(received).items():
                sent = received.get(key)
                shape = [d if d is not None else (sent.shape[i] if sent is not None else 0) for i, d in enumerate(dims)]
                size = sent.element_size() if sent is not None else 1 if st.is_bytes(key) else 4  # a byte payload: uint8
                upload += math.prod(shape) * size
            cost.upload.append(upload)
        costs.append(cost)
    return costs


def _num_labels_without_data(tc: TaskConfig) -> int | None:
    """The classes of a data set whose file is not given, where the config or the format fixes them."""
    from pf2lora.data import user_files

    entry = catalogue.resolve(tc)
    if entry.user_columns and tc.label_names:
        return len(tc.label_names)
    glue = user_files.GLUE.get(entry.name.removeprefix("glue-")) if entry.name.startswith("glue-") else None
    return len(glue.label_names) if glue is not None else None


def dry_run(cfg: RunConfig) -> DryRun:
    """Resolve what a run of ``cfg`` would use, with the run's errors, but without training,
    downloading, converting or writing: the data set (loaded and dealt to clients, unless it is a
    user's file the config leaves empty), the model's shapes (from its config on the meta device,
    unless only the hub has it) and each method's parameters and bytes per client and round."""
    tc = cfg.task
    if tc.kind not in catalogue.KINDS:  # synthetic, tiny-text: generated in memory, cheap to build
        task = tasks.build_task(cfg)
        ids = [c.client_id for c in task.clients]
        sizes = [f"{c.client_id} {c.num_train}/{c.num_test}" for c in task.clients]
        return DryRun(
            model=f"{tc.kind}: built in memory (no pretrained model)",
            data=f"{tc.kind}: generated (task.data_seed = {tc.data_seed})",
            clients=[f"train/test examples per client: {', '.join(sizes)}"],
            costs=method_costs(cfg, task, ids),
        )
    from pf2lora.tasks.generation import GenerationTask
    from pf2lora.tasks.text_classification import TextClassificationTask
    from pf2lora.tasks.text_data import client_splits

    missing: list[str] = []
    entry = catalogue.resolve(tc)
    need = missing_data(tc)
    client_ids: list[str] | None = None
    clients: list[str] = []
    num_labels: int | None = None
    files = catalogue.client_files(tc) if tc.partition == "node" else []
    if tc.partition == "node" and not (files and all(files)):  # the data lives on the SuperNodes
        data = f'{entry.name}: on the SuperNodes (task.partition = "node": each node\'s own file, node config data-path)'
        client_ids = [f"client_{k}" for k in range(tc.num_clients)]
        clients = [f"{tc.num_clients} clients, one per SuperNode; example counts are the nodes' to report"]
        num_labels = len(tc.label_names) or None
    elif need is not None:
        missing.append(need)
        data = f"{entry.name}: {need}"
        num_labels = _num_labels_without_data(tc) if tc.kind == catalogue.CLASSIFICATION else None
    else:  # loaded and dealt as the run does: its errors (a missing file, too few groups...) are the run's
        ds = catalogue.load(tc)
        splits = client_splits(ds, tc)
        data = f"{entry.name} ({tc.data_path.strip() or 'fetched copy'}): {splits.notes[0]}"
        client_ids = [c.client_id for c in splits.clients]
        sizes = [
            f"{c.client_id}{f' ({c.group})' if c.group and c.group.lower() != c.client_id else ''} {len(c.train)}/{len(c.test)}"
            for c in splits.clients
        ]
        clients = [f"train/test examples per client: {', '.join(sizes)}"]
        num_labels = len(ds.label_names or []) if ds.labels is not None else None

    default = TextClassificationTask.default_model if tc.kind == catalogue.CLASSIFICATION else GenerationTask.default_model
    name = tc.model.strip() or default
    model_dir, found = models.locate(name)
    if model_dir is None:
        line = f"{name}: {found}"
        if found.startswith(NEEDS_HUB):
            missing.append(found)
            line = f"{found} (not built in, not a local directory, not in the local Hugging Face cache; the run downloads it once)"
        return DryRun(line, data, clients, None, f"unknown until the model's shapes are known ({found})", missing)
    skeleton, line = _skeleton(cfg, model_dir, num_labels)
    unknown = ""
    if client_ids is None:
        client_ids = [f"client_{k}" for k in range(tc.num_clients)]
        unknown = "client ids unknown without the data: HETLoRA/FlexLoRA ranks (drawn per client id) shown for client_0.."
    costs = method_costs(cfg, skeleton, client_ids)
    if tc.kind == catalogue.CLASSIFICATION and num_labels is None:
        unknown = "the head's size depends on the data's classes (2 assumed)" + (f"; {unknown}" if unknown else "")
    return DryRun(f"{name}: {found}; {line}", data, clients, costs, unknown, missing)


def _span(values: Sequence[int], fmt: Callable[[int], str] = "{:,}".format) -> str:
    """One value, or ``min..max`` when the clients differ."""
    lo, hi = min(values), max(values)
    return fmt(lo) if lo == hi else f"{fmt(lo)}..{fmt(hi)}"


def dry_run_lines(cfg: RunConfig, result: DryRun) -> list[str]:
    """The plan as the dry run prints it."""
    steps = cfg.rounds * cfg.local_steps
    sampled = "all sampled every round" if cfg.client_fraction >= 1 else f"a fraction {cfg.client_fraction:g} sampled per round"
    per_client = f"{steps} steps per client" + (
        "" if cfg.client_fraction >= 1 else f" when sampled every round (about {steps * cfg.client_fraction:.0f} expected)"
    )
    lr = f"AdamW lr {cfg.optim.lr:g} (shared / upper level, every method)"
    bilevel = [m for m in cfg.methods if m in ("pf2lora", "pf2lora-fo", "perfedavg")]
    if any(m.startswith("pf2lora") for m in bilevel):
        lr += f"; SGD lr {cfg.optim.lower_lr:g} (private / lower level, optim.lower_lr)"
    if "perfedavg" in bilevel:
        lr += f"; Per-FedAvg inner SGD {cfg.perfedavg.inner_lr:g}"
    device = resolve_device(cfg.device)
    lines = [
        f"methods      {len(cfg.methods)}: {', '.join(cfg.methods)}",
        f"clients      {cfg.task.num_clients} ({sampled})",
        f"training     {cfg.rounds} rounds x {cfg.local_steps} local steps = {per_client}; batch {cfg.batch_size}",
        f"optimizer    {lr}",
        f"LoRA         r = {cfg.lora.rank} (alpha {cfg.lora.alpha:g}), r~ = {cfg.lora.private_rank} (alpha~ {cfg.lora.private_alpha:g})"
        + (f"; head {cfg.lora.head}" if cfg.task.kind == catalogue.CLASSIFICATION else ""),
        f"evaluation   {f'every {cfg.eval.every} rounds and at the end' if cfg.eval.every else 'at the end'}",
        f"device       {device} ({device_name(device)}), {cfg.precision}, parallel_clients = {cfg.parallel_clients}",
        f"model        {result.model}",
        f"data         {result.data}",
        *(f"             {line}" for line in result.clients),
    ]
    if result.costs is None:
        lines.append(f"per client   parameters and bytes per round: {result.unknown}")
    else:
        rows = [("method", "adapter params", "head params", "upload B/round", "download B/round")]
        for c in result.costs:
            rows.append((c.method, _span(c.adapter), _span(c.head), _span(c.upload), _span(c.download)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        frozen = "; ffa-lora trains its B only, A stays frozen" if "ffa-lora" in cfg.methods else ""
        lines.append(f"per client   (parameters a client trains, shared and private{frozen}; bytes of round 1)")
        lines += [
            "  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows
        ]
        if result.unknown:
            lines.append(f"             note: {result.unknown}")
        het = [c.method for c in result.costs if len(set(c.adapter)) > 1 or len(set(c.upload)) > 1]
        if het:
            lines.append(f"             min..max over clients where they differ ({', '.join(het)}: ranks per client)")
    return lines
