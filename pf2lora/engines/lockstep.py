"""Clients of a round trained together: one forward/backward per local step serves up to K clients.

Each sampled client runs its method's ``client_update`` as ever, in a worker thread of its own.
When it reaches local training (:meth:`Method.train_steps`), it hands the request to this engine
(:func:`pf2lora.batching.lockstep`) and waits. Once every client is waiting or done, the engine
groups the requests that can share a step (same step function and step count, same tensor keys
and shapes, same mini-batch size), stacks each group's tensors along a leading client dimension,
runs the step once per local step for the whole group (:mod:`pf2lora.batching`), and hands each
client back its own slice. A method with several training phases (pFedLoRA, FedLoRA-OPT) meets
the others once per phase. The local steps run in the calling (main) thread; the worker threads
run the rest of ``client_update`` (preparing, packaging, FDLoRA's fusion search), one at a time
(they share the model), and the requests are grouped in the clients' order, so the numbers do not
depend on thread scheduling.

Each client keeps its own random stream (the stacked context draws each client's mini-batch from
its own generator, in client order), its own optimizer state and its own faults, so the results
equal the sequential engine's up to floating-point summation order.

Why threads: they let every method's ``client_update`` stay one plain function; the alternative,
cutting each method into phases the engine calls, would put the engine's needs into thirteen
method files.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from pf2lora import batching, lora
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.methods.base import ClientContext, LocalStep, Method, StackedContext, Trained, pool
from pf2lora.optim import adamw_state
from pf2lora.state import Tensors
from pf2lora.tasks.base import Batch, Task

T = TypeVar("T")


@dataclass
class _Request:
    """One client's local training, waiting for its group."""

    method: Method
    ctx: ClientContext
    trained: Tensors
    fixed: Mapping[str, torch.Tensor]
    opt: Tensors
    step: LocalStep
    job: int
    """The job (client) index: groups are formed in this order, whatever order the threads parked in."""
    result: Trained | BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    computed_s: float = 0.0
    """Seconds its group's steps took (its share of the waiting that is its own work)."""

    def signature(self) -> Hashable:
        """Requests with equal signatures can be stacked into one step (the LoRA factors' ranks
        left out where the method pads ranks and the request has one rank per adapter)."""
        step = getattr(self.step, "__func__", self.step)
        owner = id(getattr(self.step, "__self__", None))
        opt = adamw_state({k: v.to("meta") for k, v in self.trained.items()}, self.opt)  # shapes only: no allocation
        n = min(self.ctx.batch_size, self.ctx.client.num_train)
        free = self.method.pads_ranks and adapter_ranks(self.trained) is not None
        return (step, owner, self.ctx.local_steps, n, _shapes(self.trained, free), _shapes(self.fixed), _shapes(opt, free))


def _shapes(tensors: Mapping[str, torch.Tensor], free_rank: bool = False) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    """Each tensor's key, shape and dtype; with ``free_rank``, a LoRA factor's (or its moment's)
    rank dimension as -1."""
    factors = _factors(tensors) if free_rank else {}

    def shape(key: str, v: torch.Tensor) -> tuple[int, ...]:
        dim = factors[key][0] if key in factors else None
        return tuple(-1 if dim is not None and i == v.dim() + dim else n for i, n in enumerate(v.shape))

    return tuple(sorted((k, shape(k, v), v.dtype) for k, v in tensors.items()))


def _factors(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, str]]:
    """``(rank dimension, adapter name)`` of every LoRA factor in ``tensors`` (A: -2, B: -1): a
    role-keyed parameter (:func:`pf2lora.state.is_param`) or its AdamW moments (``m/KEY``, ``v/KEY``)."""
    out: dict[str, tuple[int, str]] = {}
    for key in tensors:
        param = key[2:] if key.startswith(("m/", "v/")) else key
        parts = lora.split_path(param) if st.is_param(param) else None
        if parts is not None:
            out[key] = (-2 if parts[1] == "A" else -1, parts[2])
    return out


def adapter_ranks(trained: Mapping[str, torch.Tensor]) -> dict[str, int] | None:
    """The rank of each adapter (by name) in ``trained``, or None if an adapter has layers of
    different ranks (its factors cannot then be padded to one width per client)."""
    ranks: dict[str, int] = {}
    for key, (dim, adapter) in _factors(trained).items():
        if ranks.setdefault(adapter, trained[key].shape[dim]) != trained[key].shape[dim]:
            return None
    return ranks


def _padded_group(group: Sequence[_Request]) -> list[dict[str, int]] | None:
    """Each client's rank per adapter where the method pads ranks and the group's ranks differ,
    else None (a group of one width)."""
    if not group[0].method.pads_ranks:
        return None
    ranks = [adapter_ranks(r.trained) for r in group]
    if any(r is None for r in ranks) or all(r == ranks[0] for r in ranks):
        return None
    return [r for r in ranks if r is not None]


def _pad_ranks(state: Mapping[str, torch.Tensor], width: Mapping[str, int]) -> Tensors:
    """``state`` (a client's trained tensors or optimizer state) with its LoRA factors and their
    moments zero-padded to ``width`` (per adapter name): the padding gets zero gradients, so it
    stays zero."""
    out = dict(state)
    for key, (dim, adapter) in _factors(state).items():
        v = state[key]
        if v.shape[dim] < width[adapter]:
            extra = list(v.shape)
            extra[dim] = width[adapter] - v.shape[dim]
            out[key] = torch.cat([v, v.new_zeros(extra)], dim=dim)
    return out


def _unpad_ranks(state: Mapping[str, torch.Tensor], ranks: Mapping[str, int]) -> Tensors:
    """One client's state cut back to its own ranks (a copy: no view into the padded storage)."""
    out = dict(state)
    for key, (dim, adapter) in _factors(state).items():
        if state[key].shape[dim] != ranks[adapter]:
            out[key] = state[key].narrow(dim, 0, ranks[adapter]).clone()
    return out


@dataclass
class Outcome(Generic[T]):
    """A job's end: its value, or the exception it raised; ``waited_s``: seconds it spent waiting
    for other clients (in lockstep), which its own time should not count."""

    value: T | None = None
    error: BaseException | None = None
    waited_s: float = 0.0

    @classmethod
    def of(cls, job: Callable[[], T]) -> Outcome[T]:
        """Run ``job`` here and now."""
        try:
            return cls(value=job())
        except Exception as e:  # noqa: BLE001 - a failing client is recorded, never takes the federation down
            return cls(error=e)


def parallel_clients(cfg: RunConfig, task: Task, sampled: int) -> int:
    """How many clients a round trains together: ``parallel_clients``, or for 0 (auto) all the
    sampled ones where stacking pays (a GPU, or a task whose step is overhead-bound on a CPU:
    :attr:`Task.stacking_pays_on_cpu`) and 1 where it does not (real text on a CPU is
    compute-bound: a joint batch only adds padding)."""
    if cfg.parallel_clients:
        return cfg.parallel_clients
    return sampled if task.device.type != "cpu" or task.stacking_pays_on_cpu else 1


@dataclass
class LockstepEngine:
    """Runs jobs (one client's training each) in worker threads, their local steps in lockstep.

    ``max_clients`` bounds a group (``parallel_clients``); ``note`` receives one line the first
    time a group cannot be stacked (method or task unable, or a stacked step that failed) and its
    clients are trained one by one instead.
    """

    max_clients: int
    note: Callable[[str], None] = print
    stacked_groups: int = 0
    """Groups trained stacked so far (for tests and benchmarks)."""
    sequential_requests: int = 0
    """Requests trained one by one so far."""
    memory_cap: int | None = None
    """The most clients a group may stack since one ran out of device memory (None: no limit
    found; ``max_clients`` stays what was asked for)."""
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _pending: list[_Request] = field(default_factory=list)
    _running: int = 0
    _noted: set[str] = field(default_factory=set)
    _turn: threading.Lock = field(default_factory=threading.Lock)
    """Held by the one worker thread that runs: the clients share one model, and
    ``functional_call`` swaps its parameters for the call's, so no two may use it at once."""
    _threads: ThreadPoolExecutor | None = None
    _pooled_data: PoolCache = field(default_factory=lambda: PoolCache())
    _thread_count: int = 0
    _aborted: BaseException | None = None
    _job: threading.local = field(default_factory=threading.local)
    """The job a worker thread runs now (``index``) and its seconds spent waiting (``waited_s``)."""

    # -- the worker side (pf2lora.batching.Lockstep) -----------------------------------------------

    def train(self, method: Any, ctx: Any, trained: Tensors, fixed: Mapping[str, torch.Tensor], opt: Tensors, step: Any) -> Trained:
        """Called by :meth:`Method.train_steps` in a worker thread: wait for the group's steps."""
        job = self._job.index
        request = _Request(method, ctx, trained, dict(fixed), opt, step, job)
        parked = time.perf_counter()
        with self._cond:
            if self._aborted is not None:
                raise RuntimeError("lockstep aborted") from self._aborted
            self._pending.append(request)
            self._running -= 1
            if self._running == 0:  # only the engine's thread waits, and only for the last one
                self._cond.notify_all()
        self._turn.release()
        request.done.wait()  # each client its own event: waking one wakes no other
        self._turn.acquire()
        self._job.waited_s += time.perf_counter() - parked - request.computed_s
        result = request.result
        if isinstance(result, BaseException):
            raise result
        assert result is not None  # set before done
        return result

    # -- the engine side ---------------------------------------------------------------------------

    def run(self, jobs: Sequence[Callable[[], T]]) -> list[Outcome[T]]:
        """Run every job to its end; the outcomes in the jobs' order (a value or the exception).

        An exception here (Ctrl-C) is handed to every waiting client and every client that comes to
        wait later, so the worker threads end and the exception reaches the caller."""
        outcomes: list[Outcome[T]] = [Outcome() for _ in jobs]

        def work(i: int) -> None:
            self._turn.acquire()
            self._job.index, self._job.waited_s = i, 0.0
            try:
                outcomes[i] = Outcome.of(jobs[i])  # an exception of the client's own is its outcome
            finally:
                outcomes[i].waited_s = self._job.waited_s
                self._turn.release()
                with self._cond:
                    self._running -= 1
                    if self._running == 0:
                        self._cond.notify_all()

        with self._cond:
            self._running, self._aborted = len(jobs), None
        pool = self._workers(len(jobs))
        for i in range(len(jobs)):
            pool.submit(work, i)
        requests: list[_Request] = []
        try:
            while True:
                with self._cond:
                    while self._running > 0:
                        self._cond.wait()
                    requests, self._pending = sorted(self._pending, key=lambda r: r.job), []
                if not requests:
                    break  # every job is done
                results = self._serve(requests)
                with self._cond:
                    self._running += len(requests)
                for request, result in zip(requests, results, strict=True):
                    request.result = result
                    request.done.set()
                requests = []
        except BaseException as e:
            with self._cond:
                self._aborted = e
                stranded, self._pending = [*requests, *self._pending], []
            for request in stranded:
                request.result = RuntimeError("lockstep aborted")
                request.done.set()
            raise
        self._pooled_data.keep_used()
        return outcomes

    def _workers(self, n: int) -> ThreadPoolExecutor:
        """A pool of at least ``n`` threads (every job must be able to wait at once), kept between
        rounds: starting threads costs more than a small model's step."""
        if self._threads is None or self._thread_count < n:
            if self._threads is not None:
                self._threads.shutdown(wait=True)
            threads_per_op = torch.get_num_threads()
            cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

            def init() -> None:
                # OpenMP's thread count is per thread: a new thread would use every core, and a
                # reduction split another way gives other last bits than the sequential engine's.
                torch.set_num_threads(threads_per_op)
                if cuda_device is not None:  # a CUDA context for the thread, before its first matmul
                    torch.cuda.set_device(cuda_device)  # (else cuBLAS warns that there is none)
                batching.serve(self)

            self._threads = ThreadPoolExecutor(max_workers=n, thread_name_prefix="pf2lora-client", initializer=init)
            self._thread_count = n
        return self._threads

    def close(self) -> None:
        """Stop the worker threads and let the pooled data go."""
        self._pooled_data = PoolCache()
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None

    def _serve(self, requests: list[_Request]) -> list[Trained | BaseException]:
        """Each request's result: its group trained stacked where it can be, else one by one."""
        groups: dict[Hashable, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.signature(), []).append(i)
        results: list[Trained | BaseException | None] = [None] * len(requests)
        size = min(self.max_clients, self.memory_cap or self.max_clients)
        for members in groups.values():
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                for i, result in zip(chunk, self._train_group([requests[i] for i in chunk]), strict=True):
                    results[i] = result
        return [r if r is not None else RuntimeError("lockstep: no result") for r in results]

    def _train_group(self, group: list[_Request]) -> list[Trained | BaseException]:
        method = group[0].method
        reason = None
        if len(group) > 1 and not method.batches:
            reason = f"{method.name} does not declare that its steps can run stacked (Method.batches)"
        elif len(group) > 1 and not method.task.can_stack():
            reason = f"task {method.task.name} has no per-client loss for stacked clients (Task.stacked_loss)"
        if len(group) > 1 and reason is None:
            states = [r.ctx.generator.get_state() for r in group]
            out_of_memory = False
            try:
                started = time.perf_counter()
                out = stacked_train(group, self._pooled_data)
                for r in group:
                    r.computed_s = time.perf_counter() - started
                self.stacked_groups += 1
                return list(out)
            except torch.OutOfMemoryError:
                out_of_memory = True  # halved below, once the traceback no longer holds the step's tensors
            except Exception as e:  # noqa: BLE001 - a step that cannot stack falls back, with a note
                reason = f"{method.name}: a stacked step failed ({type(e).__name__}: {e})"
            for r, s in zip(group, states, strict=True):
                r.ctx.generator.set_state(s)  # the halves or the fallback draw the same mini-batches
            if out_of_memory:
                return self._halve(group)
        if reason is not None and reason not in self._noted:
            self._noted.add(reason)
            self.note(f"parallel_clients: training one by one: {reason}")
        self.sequential_requests += len(group)
        return [_sequential(r) for r in group]

    def _halve(self, group: list[_Request]) -> list[Trained | BaseException]:
        """A group that ran out of device memory, trained as two halves (each halved again if it
        must); groups stay at most that size from then on, with one note: "as many clients as
        memory allows". Nothing is lost: a step is pure, and each client's stream was rewound."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = (len(group) + 1) // 2
        if self.memory_cap is None or half < self.memory_cap:
            self.memory_cap = half
            self.note(f"parallel_clients: out of device memory with {len(group)} clients stacked; at most {half} from now on")
        return [*self._train_group(group[:half]), *self._train_group(group[half:])]


def _sequential(r: _Request) -> Trained | BaseException:
    """One client's steps, here in the engine's thread (which serves no lockstep: a plain loop)."""
    started = time.perf_counter()
    try:
        return r.method.train_steps(r.ctx, r.trained, r.fixed, r.opt, r.step)
    except Exception as e:  # noqa: BLE001 - the client's own failure, raised in its thread
        return e
    finally:
        r.computed_s = time.perf_counter() - started


class PoolCache:
    """Pooled training sets (:func:`pf2lora.methods.base.pool`) kept between rounds: pooling
    copies every client's data, which a round of small steps would feel. An entry is used only
    while it was made from the very tensors the clients hold now (FDLoRA, say, deals a new
    training split every round)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, ...], tuple[list[weakref.ref[torch.Tensor]], Batch | None]] = {}
        self._used: set[tuple[str, ...]] = set()

    def get(self, contexts: Sequence[ClientContext]) -> Batch | None:
        key = tuple(c.client.client_id for c in contexts)
        self._used.add(key)
        sources = [v for c in contexts for v in c.client.train.values()]
        entry = self._entries.get(key)
        if entry is not None and len(entry[0]) == len(sources) and all(r() is v for r, v in zip(entry[0], sources, strict=True)):
            return entry[1]
        pooled = pool(contexts)
        self._entries[key] = ([weakref.ref(v) for v in sources], pooled)
        return pooled

    def keep_used(self) -> None:
        """Drop the entries the last round did not use (with client sampling, a round's groups are
        new sets of clients: kept, their copies of the data would pile up)."""
        self._entries = {k: v for k, v in self._entries.items() if k in self._used}
        self._used = set()


def stacked_train(group: Sequence[_Request], pools: PoolCache | None = None) -> list[Trained]:
    """The group's ``local_steps`` steps on stacked tensors; each client's own result."""
    k = len(group)
    contexts = [r.ctx for r in group]
    ctx = StackedContext.of(contexts, (pools or PoolCache()).get(contexts))
    trained_states = [r.trained for r in group]
    fresh = not any(r.opt for r in group)  # the usual case: optimizer state starts anew every round
    opt_states = [] if fresh else [adamw_state(r.trained, r.opt) for r in group]
    ranks = _padded_group(group)
    padded: dict[str, torch.Tensor] = {}
    if ranks is not None:  # one width per adapter; each client's own rank to the layers and the step
        width = {name: max(r[name] for r in ranks) for name in ranks[0]}
        trained_states = [_pad_ranks(t, width) for t in trained_states]
        opt_states = [_pad_ranks(o, width) for o in opt_states]
        device = next(iter(trained_states[0].values())).device
        padded = {
            n: torch.tensor([float(r[n]) for r in ranks], dtype=torch.float64, device=device)
            for n in width
            if len({r[n] for r in ranks}) > 1
        }
    trained = batching.stack(trained_states)
    fixed = batching.stack([r.fixed for r in group]) if group[0].fixed else {}
    opt = adamw_state(trained, {}, clients=k) if fresh else batching.stack(opt_states)
    step = group[0].step
    losses: list[torch.Tensor] = []
    with batching.stacked(k, padded):
        for _ in range(ctx.local_steps):
            trained, opt, loss = step(ctx, trained, fixed, opt)
            losses.append(loss)
    per_client = torch.stack(losses, dim=1).tolist() if losses else [[] for _ in group]  # one device sync
    params, moments = batching.unstack(trained, k), batching.unstack(opt, k)
    if ranks is not None:
        params = [_unpad_ranks(p, r) for p, r in zip(params, ranks, strict=True)]
        moments = [_unpad_ranks(o, r) for o, r in zip(moments, ranks, strict=True)]
    return [Trained(p, o, ls) for p, o, ls in zip(params, moments, per_client, strict=True)]
