"""Command line: ``pf2lora run CONFIG [--set key=value ...] [--out DIR] [--dry-run]``, ``pf2lora export
RUN --out DIR``, ``pf2lora predict RUN ...``, ``pf2lora methods``, ``pf2lora datasets``, ``pf2lora
config-keys``. User mistakes print one line and exit with code 2, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pf2lora.errors import UserError

DESCRIPTION = (
    "pf2lora: personalised federated fine-tuning of language models with LoRA. "
    "Run a config (pf2lora run CONFIG), then use what it trained (pf2lora export, pf2lora predict)."
)


def _machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} (torch CPU threads: {_threads()})"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def cmd_methods(_: argparse.Namespace) -> int:
    from pf2lora.methods import registry

    width = max(len(n) for n in registry())
    for name, cls in sorted(registry().items()):
        print(f"{name:<{width}}  {cls.description}")
    return 0


def cmd_datasets(_: argparse.Namespace) -> int:
    from pf2lora.data import catalogue

    print("\n".join(catalogue.describe()))
    return 0


def cmd_config_keys(_: argparse.Namespace) -> int:
    from pf2lora import config

    for key, default, help_text in config.describe():
        print(f"{key} = {default}\n    {help_text}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pf2lora import runs

    written = runs.export(args.run_dir, args.out, method=args.method, client=args.client, merge=args.merge, device=args.device)
    print(f"wrote {len(written)} {'merged models' if args.merge else 'adapters'} under {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pf2lora import runs

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected a positive integer")
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise UserError(f"--out {args.out}: expected a .csv or .jsonl file")
    rows = runs.predict(
        args.run_dir, args.method, args.client, input_path=args.input, split=args.split, batch_size=args.batch_size, device=args.device
    )
    text = runs.write_rows(rows, args.out)
    if text is not None:
        sys.stdout.write(text)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pf2lora import checkpoint, config, plan, report, secagg
    from pf2lora.engines import ENGINES
    from pf2lora.engines.local import LocalEngine
    from pf2lora.io import atomic_write

    if args.engine is not None and args.engine not in ENGINES:
        raise UserError(f"unknown engine {args.engine!r} (known: {', '.join(ENGINES)})")
    load = plan.load_for_dry_run if args.dry_run else plan.load  # the dry run lets an empty task.data_path pass
    if args.resume:
        # a checkpoint is device-independent: only the device may change on resuming
        if args.config or any(s.split("=", 1)[0].strip() != "device" for s in args.set or []):
            raise UserError("--resume continues a run with its own config.toml: give neither CONFIG nor --set (except --set device=...)")
        out = Path(args.resume)
        saved = checkpoint.load(out)
        _resume_engine(args, saved)
    args.engine = args.engine or "local"
    if args.superlink and args.engine != "flower-deploy":
        raise UserError("--superlink needs --engine flower-deploy")
    if args.root_certificates and not args.superlink:
        raise UserError("--root-certificates needs --superlink HOST:PORT (a SuperLink that uses TLS)")
    if args.root_certificates and not Path(args.root_certificates).is_file():
        raise UserError(f"{args.root_certificates}: CA certificate file not found")
    if args.resume:
        cfg = load(out / "config.toml", args.set or [])
        secagg.check_engine(cfg, args.engine)
        if args.dry_run:
            return _dry_run(args, cfg, f"resumes {out} ({len(saved['completed'])} of {len(cfg.methods)} methods completed)")
    else:
        if not args.config:
            raise UserError("run: give a CONFIG file, or --resume DIR")
        cfg = load(args.config, args.set or [])
        secagg.check_engine(cfg, args.engine)  # before the run directory is made
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if args.dry_run:
            report.check_run_dir(out, args.overwrite)
            return _dry_run(args, cfg, f"{out} (not created)")
        report.check_run_dir(out, args.overwrite)
        saved = {"completed": [], "current": None, "metrics_lines": []}
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    tensorboard = args.tensorboard or cfg.log.tensorboard
    if tensorboard:
        from pf2lora.tensorboard import require

        require()  # the missing package is said before any work
    if cfg.task.partition == "node" and args.engine == "local":
        from pf2lora.data import catalogue

        files = catalogue.client_files(cfg.task)
        if not files or not all(files):
            raise UserError(
                'task.partition = "node" without a file for every client in task.data_path: the local engine runs every '
                "client on this machine (data kept on SuperNodes needs --engine flower-deploy --superlink HOST:PORT)"
            )
    task = plan.build_task(cfg)  # bad data stops the run here, before its directory exists
    if not args.resume:
        report.prepare_run_dir(out, overwrite=args.overwrite)
        atomic_write(out / "config.toml", config.dumps(cfg))
    engine = LocalEngine(cfg, task, progress=not args.quiet)
    lines: list[str] = list(saved["metrics_lines"])
    tb = _tensorboard(out, lines) if tensorboard else None

    # metrics.jsonl is appended line by line (rewriting it every round is quadratic); a resumed run
    # first rewrites it from the checkpoint, so a line of a lost round never survives.
    atomic_write(out / "metrics.jsonl", "".join(line + "\n" for line in lines))

    def on_round(record: dict) -> None:
        lines.append(json.dumps(report.finite_or_none(record), allow_nan=False))
        with open(out / "metrics.jsonl", "a") as f:
            f.write(lines[-1] + "\n")
        if tb is not None:
            tb.add(json.loads(lines[-1]))

    try:
        finished = (
            _run_flower(args, cfg, task, out, on_round, saved)
            if args.engine != "local"
            else _run_local(cfg, engine, out, saved, lines, on_round)
        )
        if tb is not None and finished is not None:
            tb.add_final(finished, cfg.rounds)
    finally:
        if tb is not None:
            tb.close()
    if finished is None:
        return 130
    results = finished
    extra = {
        "name": cfg.name,
        "seed": cfg.seed,
        "rounds": cfg.rounds,
        "engine": args.engine,
        "rank_threshold": cfg.eval.rank_threshold,
        "machine": _machine(),
        "device": str(task.device),
        "device_name": plan.device_name(task.device),
        "precision": cfg.precision,
    }
    summary = report.summarize(task, results, extra)
    report.write_json(out / "summary.json", summary)
    figures = report.plot_figures(out, task, summary, results)
    if hasattr(task, "write_figures"):  # e.g. the label distribution of real-data tasks
        figures += task.write_figures(out)
    command = "pf2lora " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report.write_report(out, task, summary, figures, command)
    print()
    print(report.task_table(task, summary))
    kept = ", adapters/" if (out / "adapters").is_dir() else ""
    print(f"\nrun directory: {out}  (summary.json, metrics.jsonl, report.md{kept}, {', '.join(figures)})")
    return 0


def _tensorboard(out: Path, lines: list[str]):
    """TensorBoard scalars under RUN/tb, starting with the records a resumed run already has."""
    from pf2lora.tensorboard import ScalarLog

    return ScalarLog(out, [json.loads(line) for line in lines])


def _dry_run(args: argparse.Namespace, cfg, where: str) -> int:
    """``run --dry-run``, once the config has passed the run's checks (same errors): the plan the
    run would follow. Nothing is trained, downloaded, converted or written (no run directory
    either); exit 0 also when all that is missing is the hub model or the user's data file: the
    plan names them ("needs the hub: NAME", "needs task.data_path (...)") and leaves their part unknown."""
    from pf2lora import plan

    with _hub_offline():
        result = plan.dry_run(cfg)
    source = args.config or str(Path(args.resume) / "config.toml")
    print(f"pf2lora run --dry-run: {source} (name {cfg.name}, seed {cfg.seed}, engine {args.engine}); nothing is run or written")
    for line in plan.dry_run_lines(cfg, result):
        print(line)
    print(f"run dir      {where}")
    print("ready        " + ("no: " + "; ".join(result.missing) if result.missing else "yes: everything the run needs is here"))
    return 0


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """The Hugging Face libraries in offline mode (as HF_HUB_OFFLINE=1) for the dry run: it reads
    local files only, and a library that would otherwise ask the hub (e.g. for a newer revision)
    must not; the previous mode is restored afterwards."""
    import huggingface_hub.constants as hub

    before, env = hub.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    hub.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env


def _resume_engine(args: argparse.Namespace, saved: dict) -> None:
    """``--resume``: the engine the run was started on (and, for flower-deploy, its SuperLink and CA
    file unless given again: a SuperLink's address or a CA file may move)."""
    engine = saved.get("engine", "local")
    if args.engine is not None and args.engine != engine:
        raise UserError(f"--resume: this run was started with --engine {engine}; it continues there (leave --engine out)")
    args.engine = engine
    if engine == "flower-deploy":
        args.superlink = args.superlink or saved.get("superlink") or None
        args.root_certificates = args.root_certificates or saved.get("root_certificates") or None


def _run_flower(args: argparse.Namespace, cfg, task, out: Path, on_round, saved: dict) -> list | None:
    """The same methods on Flower: simulated (Ray) or deployed (SuperLink + SuperNodes). With
    ``checkpoint`` on, the server side checkpoints after every round into ``out`` and a resumed run
    continues from it (the nodes keep their clients' states: flower-sim under ``RUN/flower/state``
    unless ``flower.state_dir`` is set, a loopback federation under ``RUN/flower/state/node-K``).
    None when interrupted (Ctrl-C)."""
    from pf2lora import checkpoint
    from pf2lora.engines.local import RoundFailure

    try:
        from pf2lora.engines import flower
        from pf2lora.engines.flower.resume import ServerCheckpoint
    except ImportError as e:
        raise UserError(f"--engine {args.engine} needs Flower: pip install 'pf2lora[flower]' ({e})") from None
    ckpt = None
    if cfg.checkpoint:
        where = {"superlink": args.superlink, "root_certificates": args.root_certificates} if args.superlink else {}
        head = checkpoint.header(args.engine, **where)
        ckpt = ServerCheckpoint.resumed(saved, head, path=(out / checkpoint.FILENAME).resolve())
    try:
        if args.engine == "flower-sim":
            from pf2lora.engines.flower.sim import default_state_dir

            state_dir = cfg.flower.state_dir or (default_state_dir(out).resolve() if ckpt is not None else None)
            return flower.run_flower_sim(
                cfg, task, on_round=on_round, progress=not args.quiet, adapters_root=out / "adapters", checkpoint=ckpt, state_dir=state_dir
            )
        return flower.run_flower_deploy(
            cfg,
            args.superlink,
            on_round=on_round,
            workdir=out / "flower",
            root_certificates=args.root_certificates,
            adapters_root=out / "adapters",
            checkpoint=ckpt,
        )
    except (flower.FlowerEngineError, RoundFailure) as e:
        kept = f"; the last good round is checkpointed in {out}" if ckpt is not None and (out / checkpoint.FILENAME).exists() else ""
        raise UserError(f"{e}{kept}") from None
    except KeyboardInterrupt:
        if ckpt is None or not (out / checkpoint.FILENAME).exists():
            raise
        print(
            f"\npf2lora: interrupted; the last completed round is checkpointed in {out}.\n"
            f"Resume with: pf2lora run --resume {shlex.quote(str(out))}",
            file=sys.stderr,
        )
        return None


TEST_HOLD_ENV = "PF2LORA_TEST_HOLD_AFTER"
"""Test-only: ``METHOD:ROUND``. A run holds (sleeps until signalled) right after that round is
checkpointed and says so on stderr, so a test can Ctrl-C or kill it at a known state instead of
racing it (on Flower, the server side holds: ``pf2lora.engines.flower.resume.HOLD_ENV``). Never set by
pf2lora itself; unset, it costs one string comparison per round."""


def _run_local(cfg, engine, out: Path, saved: dict, lines: list[str], on_round) -> list | None:
    """The in-process engine with per-round checkpoints; None when interrupted (Ctrl-C)."""
    from dataclasses import asdict

    from pf2lora import checkpoint
    from pf2lora.engines.local import RunState
    from pf2lora.engines.rounds import MethodResult, RoundFailure

    completed: list[dict] = list(saved["completed"])
    current: dict | None = saved["current"]

    hold = os.environ.get(TEST_HOLD_ENV, "")
    last: dict[str, RunState] = {}

    def keep(state: RunState, metrics: dict | None, final: bool) -> None:
        """The trained models of ``state``: every client's adapter (and, once finished, the state
        ``pf2lora export`` reads)."""
        from pf2lora import adapters, runs
        from pf2lora.engines.rounds import save_adapters
        from pf2lora.methods import registry

        method = registry()[state.method](cfg, engine.task)
        save_adapters(out / adapters.DIRNAME, cfg, engine.task, method, state.server, state.clients, state.round, metrics)
        if final:
            runs.save_final_state(out, state.method, state.round, state.server, state.clients)

    def on_state(state: RunState) -> None:
        last["state"] = state
        if cfg.checkpoint:
            checkpoint.save(out, {"engine": "local", "completed": completed, "current": asdict(state), "metrics_lines": lines})
        if cfg.save_every and state.round % cfg.save_every == 0 and state.round < cfg.rounds:
            keep(state, None, final=False)
        if hold and hold == f"{state.method}:{state.round}":  # test-only, see TEST_HOLD_ENV
            print(f"pf2lora: holding after {hold} ({TEST_HOLD_ENV})", file=sys.stderr, flush=True)
            while True:  # short sleeps: a signal handled by another thread does not end a long sleep early
                time.sleep(0.05)

    done = {r["method"] for r in completed}
    running = ""
    try:
        for name in cfg.methods:
            if name in done:
                continue
            running = name
            resume = RunState(**current) if current is not None and current["method"] == name else None
            last.clear()
            result = engine.run(name, on_round=on_round, resume=resume, on_state=on_state)
            final = last.get("state") or resume  # a run resumed after its last round trains no more
            if final is not None:
                keep(final, result.clients, final=True)
            completed.append(asdict(result))
            current = None
            if cfg.checkpoint:
                checkpoint.save(out, {"engine": "local", "completed": completed, "current": None, "metrics_lines": lines})
    except KeyboardInterrupt:
        print(
            f"\npf2lora: interrupted during {running}; the last completed round is checkpointed in {out}.\n"
            f"Resume with: pf2lora run --resume {shlex.quote(str(out))}",
            file=sys.stderr,
        )
        return None
    except RoundFailure as e:
        kept = f"; the last good round is checkpointed in {out}" if (out / checkpoint.FILENAME).exists() else ""
        raise UserError(f"{e}{kept}") from None
    return [MethodResult(**r) for r in completed]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pf2lora", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the methods of a config on the in-process engine")
    run.add_argument("config", nargs="?", help="TOML config file (see configs/)")
    run.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its last checkpoint")
    run.add_argument(
        "--engine",
        default=None,
        metavar="ENGINE",
        help="local (default, in-process), flower-sim (Flower simulation on Ray) or flower-deploy (SuperLink + SuperNodes); "
        "--resume continues on the engine the run was started with",
    )
    run.add_argument(
        "--superlink",
        metavar="HOST:PORT",
        help="flower-deploy: submit to this running SuperLink (one SuperNode per client running); default: start a loopback federation here",
    )
    run.add_argument(
        "--root-certificates",
        metavar="CA.pem",
        help="flower-deploy with --superlink: the CA certificate of a SuperLink that uses TLS (default: insecure)",
    )
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. --set rounds=2 (repeatable)")
    run.add_argument("--out", help="run directory (default: runs/NAME-TIMESTAMP)")
    run.add_argument("--overwrite", action="store_true", help="allow replacing an existing run in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config as run does and print the plan (methods, clients, steps, parameters and bytes per client and "
        "round); trains, downloads and writes nothing. Exit 0 also when only the hub model or the data file is missing",
    )
    run.add_argument(
        "--tensorboard", action="store_true", help="also write the metrics as TensorBoard scalars under RUN/tb (log.tensorboard)"
    )
    run.set_defaults(func=cmd_run)
    export = sub.add_parser("export", help="write a run's trained adapters (or merged models) to a folder")
    export.add_argument("run_dir", metavar="RUN", help="a run directory (finished, or interrupted: its checkpoint)")
    export.add_argument("--method", help="only this method (default: every method of the run)")
    export.add_argument("--client", help="only this client (default: every client)")
    export.add_argument("--out", required=True, help="folder to write OUT/METHOD/CLIENT into")
    export.add_argument("--merge", action="store_true", help="write each client's full model with its adapter merged into the base weights")
    export.add_argument(
        "--device", default="auto", help="where to rebuild the models (auto, cpu, cuda, cuda:N; default auto, whatever the run used)"
    )
    export.set_defaults(func=cmd_export)
    pred = sub.add_parser("predict", help="predict with a client's personalised model of a run")
    pred.add_argument("run_dir", metavar="RUN", help="a run directory")
    pred.add_argument("--method", required=True, help="the method whose model predicts")
    pred.add_argument("--client", required=True, help="the client whose personalised model predicts")
    source = pred.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="FILE", help="a .csv, .jsonl or .txt file; the text is in the config's task.text_column")
    source.add_argument("--split", choices=("test", "train"), help="that client's own split of the run's data instead")
    pred.add_argument("--out", help="a .csv or .jsonl file (default: CSV on standard output)")
    pred.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (default 64)")
    pred.add_argument("--device", default="auto", help="where to predict (auto, cpu, cuda, cuda:N; default auto, whatever the run used)")
    pred.set_defaults(func=cmd_predict)
    sub.add_parser("methods", help="list the available methods").set_defaults(func=cmd_methods)
    sub.add_parser("datasets", help="list the data sets of the text tasks (task.dataset)").set_defaults(func=cmd_datasets)
    sub.add_parser("config-keys", help="list every config key with its default and help").set_defaults(func=cmd_config_keys)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings meant for the user (truncated texts, ...) as one line, without our source line."""
    return f"pf2lora: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except UserError as e:
        print(f"pf2lora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pf2lora: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`pf2lora datasets | head`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 0
    except OSError as e:  # e.g. a full disk while writing a report: one line, not a traceback
        print(f"pf2lora: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
