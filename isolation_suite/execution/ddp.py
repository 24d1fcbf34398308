"""The ``ddp`` execution mode: ``DistributedDataParallel`` over two CPU processes, started by the harness.

Rank 0 is the process that calls :func:`isolation_suite.execution.runner.run` (the sandbox's child, or the
caller itself where there is none); rank 1 is forked from it. They meet through a ``FileStore`` in a
temporary folder (no port to race for) and talk gloo over the loopback interface. Both build the
model from the same seeds, run the technique's ``setup``, wrap the model in
``DistributedDataParallel(model, find_unused_parameters=..., static_graph=...)`` (after ``setup`` by
default, the user's usual order: build, freeze, wrap; before it for a technique whose ``ddp_wrap`` is
``"before_setup"``) and train on their half of every batch (rows ``[rank * n, (rank + 1) * n)``),
against the matching half of the whole batch's targets.

Why the trace is the same: the loss of a half is the mean over its rows, so the whole batch's loss
is the average of the two halves' losses, and DDP averages the gradients of the two ranks: the
averaged gradient is the single-process gradient of the whole batch. Rank 0 records the trace:
its parameters and (averaged) gradients as they are, the loss as the average of both ranks' losses
(an all-reduce), and the input gradient as both ranks' input gradients stacked and divided by the
world size (an all-gather): a rank's input gradient is that of its own half-loss, ``2 *
dL/dx_half``, since the other half's loss does not depend on its rows. Averaging reorders a sum, so
a float32 run rounds differently from the reference; a float32 mismatch counts only where the
float64 twin shows it too, as everywhere else. Layers whose training-mode output depends on the
batch would make per-rank runs differ from the whole batch by design: generated dropout draws the
whole batch's mask and keeps its rows (``layers.batch_share``), so it is exact; a BatchNorm that
trains is not drawn in this mode (SyncBatchNorm does not run on the CPU).

Whatever rank 1 does becomes rank 0's verdict: a crash there (raised in the technique's code, a
process exit, a fatal signal) is reported with rank 1's phase and step, and rank 0, blocked in a
collective, is released at once because gloo sees the peer's sockets close; a hang there is stopped
after the run's timeout by a watchdog that kills rank 1, reported as ``timeout`` with rank 1's
phase. Rank 1 also dies with rank 0 (``PR_SET_PDEATHSIG``), so a rank 0 killed by the sandbox's own
timeout leaves nothing behind. The store's folder is named after rank 0's pid: rank 0 removes it
when it retires the pool, and the sandbox, whose child rank 0 is, removes what a rank 0 that died or
was killed left (``remove_stores``).

**The pool.** Forking rank 1 and setting up a gloo group cost far more than a run, so rank 1 and the
process group outlive a run: rank 0 keeps a :class:`Pool` (rank 1's pid, two pipes, the store's
folder, the group) and the next ddp run of the same technique is served by it. Rank 1 is forked on
the first run, which it trains with the work it inherited; then it waits on a pipe for the next
run's work: the scenario, device and timeout (pickled) and what a fork made now would inherit of
rank 0's generators (torch's and numpy's states; Python's ``random`` is reseeded, as in every forked
child). It rebuilds the run from the driver it inherited, so the technique is the same object in both
ranks (the sandbox's child serves one technique; an in-process pool is keyed by the technique's
identity and holds it). Every run builds its own model and its own ``DistributedDataParallel`` on the
shared group: DDP's constructor broadcasts rank 0's parameters and buffers and builds a fresh reducer,
so buckets, comm hooks and unused-parameter state are the run's; the wrapper is freed once the run
ended cleanly on both ranks.

Why reuse cannot change a verdict: a pooled run starts from what a fresh pair of ranks would start
from. The runner reseeds every run as before and rank 1 takes rank 0's generators; rank 1 puts back
grad mode, default dtype and thread count after a run, as the runner does on rank 0; and a pool
serves a run only if both ranks ended the last one cleanly and nothing a fresh fork would copy
differently has changed since. A pool is **retired** (rank 1 killed and reaped, the store's folder
removed, the group deregistered but not freed, see below), and the next run starts a fresh one, on:

* any fault of the run, on either rank: a crash or exit (rank 1 exits after any run that was not
  clean), a timeout, a harness error, a state leak the run reported (grad mode, dtype,
  ``requires_grad``), or a global the technique changed on rank 1 (``state.changes``: flags,
  patched functions, global hooks, threads left running; rank 0's are the sandbox's to report, and it
  retires its child for them);
* a group that is no longer the pool's alone (destroyed, replaced as the default, another created),
  or a different count of collectives on the two ranks at the end of the run (one issued a
  collective the other did not: later runs would pair the wrong ones);
* at the next run: another technique, timeout (the group's), ``ddp_wrap``, world size or backend; a
  technique run of rank 0 that the pool did not serve (another mode's run in the same child: both
  copies of the technique must have run the same runs since the fork); one of the technique's
  attributes rebound, or a global of rank 0 changed, since the last run (an in-process caller's
  doing); rank 1 gone; another thread or process (a fork of rank 0 forgets the pool it inherited and
  deregisters its copy of the group, leaving the owner's rank 1 alone).

What this cannot see: state a technique keeps across runs inside an object (a mutated list, a
module-level cache) is rank 1's own copy, advanced by the same runs rank 0's was; it equals rank 0's
unless the technique's code itself treats the ranks differently and remembers it from run to run.

A rank 1 that finished its run cleanly stays alive, where before it exited; had rank 0 then started
a collective rank 1 will never join, the exit released it at once. So a watcher on rank 0, once rank
1 has reported, compares the ranks' collective counts while rank 0 runs on and kills rank 1 as soon
as rank 0 is ahead: the same release, the same verdict.

Not freed: a retired pool's group (and its run's ``DistributedDataParallel``) is deregistered but
kept until the process ends. Freeing a gloo process group from Python can deadlock on the GIL (its
destructor joins worker threads that need the GIL to drop their work's thread-local state), so the
sandbox retires its child after a ddp run that left one (:func:`unfreed`: after a fault, or with the
pool off), and an in-process caller keeps them (``retire_pool`` deregisters an in-process pool's
group, at exit too). A clean run's wrapper is freed: its group is alive and idle on both ranks.
``ISOLATION_DDP_POOL=off`` retires the pool after every run: the behaviour before the pool (a fresh
rank 1, group and sandbox child per run), for benchmarks and tests.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import glob
import mmap
import os
import pickle
import random
import resource
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from isolation_suite.execution.lifetime import exit_with_parent, harness_thread
from isolation_suite.execution.pipes import read_frame, write_frame
from isolation_suite.execution.state import changes, snapshot
from isolation_suite.execution.trace import PHASES, Crash, Trace
from isolation_suite.model.layers import batch_share as layers_share
from isolation_suite.spec.scenario import Mode

WORLD = 2
BACKEND = "gloo"
#: a run without a timeout still cannot wait forever on a peer
DEFAULT_TIMEOUT = 600.0
#: the sandbox waits this much longer than the timeout for a ddp run, so that rank 0 can report a
#: hang of rank 1 itself (with rank 1's phase) before the sandbox would kill rank 0
GRACE = 5.0
#: how long rank 0, having failed itself, waits for rank 1's report before it stops rank 1
STOP_WAIT = 2.0
#: how often rank 0's watcher, once rank 1 has finished a run cleanly and while rank 0 still runs,
#: looks whether rank 0 has started a collective that rank 1 will never join
POLL = 0.005
#: ``off``: a fresh rank 1 and process group for every run (the pool retired after each), as before
#: the pool; read when a run starts, in the process that is rank 0
POOL_ENV = "ISOLATION_DDP_POOL"

#: this run's DistributedDataParallel wrappers: freed after a clean run, kept with the group otherwise
_RUN: list[nn.Module] = []
#: (pid, what) retired pools' groups and wrappers, deregistered and kept (see the module's docstring)
_UNFREED: list[tuple[int, list]] = []
#: groups and wrappers a forked process inherited from a pool of its parent's: never touched again
_INHERITED: list[Any] = []


def pooling() -> bool:
    """Whether ddp runs share a pool (``ISOLATION_DDP_POOL``, on by default)."""
    return os.environ.get(POOL_ENV, "on").strip().lower() not in ("off", "0", "no", "false")


def ranks_cpu() -> float:
    """The CPU seconds of this process's children: the pool's rank 1 while it lives (from
    ``/proc/PID/schedstat``; nothing where that cannot be read) and every child reaped since the
    process started (``RUSAGE_CHILDREN``: retired ranks among them). A sandbox child adds it to its
    own, so that a ddp run's CPU time counts both ranks."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = used.ru_utime + used.ru_stime
    if _POOL is not None and _POOL.pid is not None and _POOL.owner == os.getpid():
        try:
            with open(f"/proc/{_POOL.pid}/schedstat") as stat:
                total += int(stat.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
    return total


def unfreed() -> int:
    """How many retired pools' process groups this process holds without freeing them: a sandbox
    child that holds one is retired after its run (see the module's docstring)."""
    me = os.getpid()
    return sum(1 for pid, _ in _UNFREED if pid == me)


@dataclass(frozen=True)
class Shard:
    """One rank's share of the batch: its rows along each input's batch dimension (``dims``: one per
    input, None for an input every rank gets whole; generated models split every input along 0)."""

    rank: int
    world: int = WORLD

    def rows(self, x: torch.Tensor, dim: int | None = 0) -> torch.Tensor:
        """This rank's rows of a whole-batch tensor along ``dim`` (None: all of it)."""
        if dim is None:
            return x
        n = x.shape[dim] // self.world
        return x.narrow(dim, self.rank * n, n)

    # --- what rank 0 records: the whole batch's values -----------------------------------------

    def whole_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The whole batch's loss: the average of the ranks' (mean-reduced, equal halves)."""
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total / self.world

    def whole_input_grads(self, inputs: list[torch.Tensor], dims: list[int | None] | None = None
                          ) -> list[torch.Tensor | None]:
        """Each input's gradient of the whole batch's loss, the average of the ranks' losses: the
        ranks' input gradients joined along the input's batch dimension (an input every rank has
        whole: summed) and divided by the world size. None where no rank has one.
        One all-gather per input: each rank's gradient (zeros where it has none) and a last entry
        saying whether it has one."""
        out = []
        for x, dim in zip(inputs, dims or [0] * len(inputs)):
            grad = torch.zeros_like(x) if x.grad is None else x.grad.detach()
            mine = torch.cat([grad.reshape(-1), grad.new_full((1,), float(x.grad is not None))])
            parts = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(parts, mine)
            if not any(part[-1].item() for part in parts):
                out.append(None)
                continue
            grads = [part[:-1].view(grad.shape) for part in parts]
            joined = torch.stack(grads).sum(0) if dim is None else torch.cat(grads, dim)
            out.append(joined / self.world)
        return out


def wrap(model: nn.Module, mode: Mode, tree: Any = None) -> nn.Module:
    """``DistributedDataParallel`` over ``model`` with the mode's options, on the pool's group
    (broadcasts rank 0's parameters and buffers, builds a fresh reducer)."""
    return hold(nn.parallel.DistributedDataParallel(model, find_unused_parameters=mode.find_unused,
                                                    static_graph=mode.static_graph))


def hold(wrapped: nn.Module) -> nn.Module:
    """Keep this run's wrapper (``DistributedDataParallel``, a ``fully_shard``-ed model) with the
    pool: freed after a clean run, kept with the group otherwise (see the module's docstring)."""
    _RUN.append(wrapped)
    return wrapped


# --- the pool: rank 1 and the process group, kept across runs ---------------------------------

@dataclass(eq=False)
class Pool:
    """Rank 1 and the process group, as rank 0 holds them between runs."""

    pid: int | None  # rank 1; None once reaped
    requests: int  # rank 0 -> rank 1: the next run's work
    reports: int  # rank 1 -> rank 0: how each run ended
    progress: mmap.mmap  # rank 1's step and phase, shared
    folder: str  # the FileStore's folder
    key: tuple  # what rank 1 was forked for (``_key``)
    technique: Any  # held, so that its id in the key stays its own
    base: dict  # rank 0's global state when rank 1 was forked
    owner: int = field(default_factory=os.getpid)  # rank 0
    group: Any = None  # the default process group, once rank 0 has joined it
    serial: int = 0  # the last technique run it served (``runner.Work.serial``)
    attributes: tuple = ()  # the technique's attributes after that run, by identity
    runs: int = 0  # runs served
    status: int | None = None  # rank 1's wait status, once reaped


#: this process's pool (one at a time: there is one default process group)
_POOL: Pool | None = None


def run(train: Callable[[Shard, Any], Any], phase: Callable[[Any], Any], timeout: float | None,
        progress_struct) -> Any:
    """Run ``train(shard, at)`` as rank 0 here and as rank 1 (the pool's, forked now if there is none
    to reuse); rank 0's trace, with rank 1's failure as its crash where rank 1 failed first.

    ``phase(progress)`` makes a ``runner.Phase`` mirroring into ``progress`` (rank 1 gets its own
    shared buffer, so rank 0 can place a hang of rank 1); ``progress_struct`` reads it. A ``train``
    that can be sent to rank 1 (``runner.Work``: ``request``, ``again``, ``serial``) may reuse the
    pool; any other is run by a fresh rank 1 that inherits it, and the pool is retired after it."""
    limit = DEFAULT_TIMEOUT if timeout is None else timeout
    generators = _random_state()  # as rank 0's are now: what a rank 1 forked now would inherit
    pool = _warm(train, limit)
    if pool is not None:
        progress_struct.pack_into(pool.progress, 0, 0, -1)
        if not _send_work(pool, train, generators):
            _retire(pool)  # rank 1 ended between runs (it is not this run's doing)
            pool = None
    first = pool is None
    if first:
        pool = _start(train, phase, limit, progress_struct)
    peer = Peer(pool, limit, progress_struct)
    trace, error, kept = None, None, False
    try:
        peer.watch()
        try:
            if first:  # joining fails too where rank 1 died first: its verdict, as a collective's failure
                pool.group = _join(0, os.path.join(pool.folder, "store"), limit)
            with batch_share(0):
                trace = train(Shard(0), None)
        except BaseException as exc:  # noqa: BLE001 - settled below, with rank 1's outcome
            error = exc
        peer.stop_watching()
        failed = error is not None or trace.crash is not None
        left = max(0.0, limit - (time.monotonic() - peer.started))
        # rank 0 failed: a rank 1 that failed first has already reported; one still running waits on
        # rank 0 in a collective and is stopped
        peer.finish(min(left, STOP_WAIT) if failed else left, stop=failed)
        kept = not failed and not trace.state_leaks and peer.clean() and _reusable(train) and pooling() \
            and _intact(pool.group) and peer.report[4] is not None and peer.report[4] == _sequence(pool.group)
    finally:
        peer.stop_watching()
        if kept:
            pool.serial, pool.attributes, pool.runs = train.serial, _attributes(pool.technique), pool.runs + 1
            _RUN.clear()  # this run's wrappers: the group is alive and idle on both ranks
        else:
            _retire(pool)
        peer.close()
    return settle(trace, error, peer.outcome())


def _warm(train, limit: float) -> Pool | None:
    """This process's pool where it may serve ``train``; otherwise it is retired (or, inherited
    through fork, forgotten) and None."""
    pool = _POOL
    if pool is None:
        return None
    if pool.owner != os.getpid():
        _forget(pool)
        return None
    if pooling() and _reusable(train) and pool.key == _key(train, limit) and pool.technique is _technique(train) \
            and train.serial == pool.serial + 1 and pool.attributes == _attributes(pool.technique) \
            and _alive(pool) and _intact(pool.group) and not _changes(pool.base, threads=False):
        return pool
    _retire(pool)
    return None


def _reusable(train) -> bool:
    """A run whose work can be sent to a waiting rank 1 (``runner.Work``), numbered as a technique run."""
    return callable(getattr(train, "again", None)) and getattr(train, "serial", 0) > 0


def _technique(train) -> Any:
    driver = getattr(train, "driver", train)
    return getattr(driver, "technique", driver)


def _key(train, limit: float) -> tuple:
    """What a rank 1 is forked for: this process and thread (rank 1 dies with the thread that forked
    it), the technique, the timeout (the group's), how the technique wraps, world size and backend."""
    driver = getattr(train, "driver", None)
    return (os.getpid(), threading.get_ident(), id(_technique(train)), limit,
            getattr(driver, "ddp_wrap", "after_setup"), WORLD, BACKEND)


def _attributes(obj: Any) -> tuple:
    """``obj``'s attributes, by identity (rebinding one changes it; a mutation inside one does not)."""
    try:
        return tuple(sorted((name, id(value)) for name, value in vars(obj).items()))
    except TypeError:
        return ()


def _start(train, phase, limit: float, progress_struct) -> Pool:
    """Fork rank 1 for a new pool; it trains ``train`` first, then waits for more work."""
    global _POOL
    folder = tempfile.mkdtemp(prefix=_store_prefix(os.getpid()))
    progress = mmap.mmap(-1, progress_struct.size)
    progress_struct.pack_into(progress, 0, 0, -1)
    base = _state(threads=False)
    requests_r, requests_w = os.pipe()
    reports_r, reports_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # rank 1: never returns
        os.close(requests_w)
        os.close(reports_r)
        _rank_one(train, phase, progress, os.path.join(folder, "store"), limit, requests_r, reports_w, parent)
    os.close(requests_r)
    os.close(reports_w)
    _POOL = Pool(pid, requests_w, reports_r, progress, folder, _key(train, limit), _technique(train), base)
    return _POOL


def _send_work(pool: Pool, train, generators) -> bool:
    try:
        _send(pool.requests, (train.request(), generators))
        return True
    except OSError:  # a broken pipe: rank 1 has ended
        return False


def _alive(pool: Pool) -> bool:
    """Rank 1 is still running (reaped here if it is not)."""
    if pool.pid is None:
        return False
    try:
        pid, status = os.waitpid(pool.pid, os.WNOHANG)
    except ChildProcessError:
        pool.pid = None
        return False
    if pid == 0:
        return True
    pool.pid, pool.status = None, status
    return False


def _retire(pool: Pool) -> None:
    """Kill and reap rank 1, remove the store's folder, deregister the group without freeing it."""
    global _POOL
    if _POOL is pool:
        _POOL = None
    if pool.pid is not None:
        _kill(pool.pid)
        with contextlib.suppress(ChildProcessError):
            pool.status = os.waitpid(pool.pid, 0)[1]
        pool.pid = None
    for fd in (pool.requests, pool.reports):
        with contextlib.suppress(OSError):
            os.close(fd)
    pool.requests = pool.reports = -1
    shutil.rmtree(pool.folder, ignore_errors=True)
    held = list(_RUN)
    if pool.group is not None:
        held.append(pool.group)
        if dist.is_initialized():  # this run's group, or what the technique left in its place
            held.extend(_registered())
            with contextlib.suppress(Exception):  # a registry the technique broke: the run's verdict first
                dist.destroy_process_group()
        pool.group = None
    _RUN.clear()
    if held:
        _UNFREED.append((os.getpid(), held))


def _forget(pool: Pool) -> None:
    """A pool inherited through fork (this process is a copy of its owner): the owner's rank 1 is left
    alone; the group, registered here too but without its threads, is deregistered and never freed."""
    global _POOL
    if _POOL is pool:
        _POOL = None
    for fd in (pool.requests, pool.reports):
        with contextlib.suppress(OSError):
            os.close(fd)
    _INHERITED.extend(_RUN)
    _RUN.clear()
    if pool.group is not None and dist.is_initialized() and dist.group.WORLD is pool.group:
        _INHERITED.extend(_registered())
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@atexit.register
def retire_pool() -> None:
    """Retire this process's pool now (at exit; tests, and an in-process caller that wants
    ``torch.distributed``'s default group for itself, call it)."""
    pool = _POOL
    if pool is not None:
        (_retire if pool.owner == os.getpid() else _forget)(pool)


def _registered() -> list:
    world = getattr(dist.distributed_c10d, "_world", None)
    return list(getattr(world, "pg_map", {}) or {})


def _intact(group) -> bool:
    """``group`` is still this process's default group, and its only one."""
    return group is not None and dist.is_initialized() and dist.group.WORLD is group and len(_registered()) == 1


def _sequence(group) -> int | None:
    """How many collectives this rank has issued on ``group`` (None: unknown, never equal)."""
    try:
        return int(group._get_sequence_number_for_group())
    except Exception:  # noqa: BLE001 - a backend without it: no pool is kept
        return None


def _state(threads: bool) -> dict:
    """The globals the sandbox watches (``state.snapshot``); without threads for rank 0, whose
    caller's own threads are not the pool's business."""
    state = snapshot()
    if not threads:
        state["threads"] = set()
    return state


def _changes(base: dict, threads: bool) -> list[str]:
    return changes(base, _state(threads))


def _random_state() -> tuple:
    """What a fork inherits of rank 0's generators: torch's CPU generator (as bytes: pickling a tensor
    would leave ``torch.Tensor.__slotnames__`` behind, a change the sandbox reports) and numpy's
    global one where numpy is loaded. (Python's ``random`` is reseeded in every forked child.)"""
    numpy = sys.modules.get("numpy")
    return bytes(torch.get_rng_state().numpy()), None if numpy is None else numpy.random.get_state()


def _set_random_state(state: tuple) -> None:
    """Rank 1's generators as a fork of rank 0 made now would have them."""
    generator, numpy_state = state
    torch.set_rng_state(torch.frombuffer(bytearray(generator), dtype=torch.uint8))
    random.seed()  # as ``random`` does in every forked child (``os.register_at_fork``)
    if numpy_state is not None:
        import numpy
        numpy.random.set_state(numpy_state)


def _store_prefix(rank_zero: int) -> str:
    return f"isolation-ddp-{rank_zero}-"


def remove_stores(rank_zero: int) -> None:
    """Remove the store folders of the ddp runs that process ``rank_zero`` started and could not
    remove itself (it was killed, or its technique ended it). Call it once that process has ended
    and before it is reaped, so that its pid cannot belong to another process's run."""
    for folder in glob.glob(os.path.join(glob.escape(tempfile.gettempdir()), _store_prefix(rank_zero) + "*")):
        shutil.rmtree(folder, ignore_errors=True)


def _join(rank: int, store: str, limit: float):
    """Join the pool's process group (gloo over loopback) as ``rank``: the default group; returned."""
    previous = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a hostname that resolves nowhere must not matter
    try:
        dist.init_process_group(BACKEND, store=dist.FileStore(store, WORLD), rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=limit))
    finally:
        if previous is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
    return dist.group.WORLD


@contextlib.contextmanager
def batch_share(rank: int) -> Iterator[None]:
    with layers_share(rank, WORLD):
        yield


# --- rank 1 ------------------------------------------------------------------------------------

def _rank_one(train, phase, progress: mmap.mmap, store: str, limit: float, requests: int, report: int,
              parent: int) -> None:
    """Rank 1: join the group, train ``train``'s half and then every run rank 0 sends, reporting how
    each ended; exit without cleanup after a run that was not clean, or once rank 0 closes the pipe."""
    code = 0
    try:
        exit_with_parent(parent)  # killed when rank 0 ends, however it ends
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        group = _join(1, store, limit)
        base = _state(threads=True)
        while _serve(train, phase(progress), group, base, report):
            message = _receive(requests)
            if message is None:
                break
            work, generators = message
            _set_random_state(generators)
            train = train.again(work)
    except BaseException as exc:  # noqa: BLE001 - the harness's side failed: rank 0 settles it
        try:
            _send(report, ("harness", f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}", [],
                           False, None))
        except BaseException:  # noqa: BLE001
            code = 70
    finally:
        os._exit(code)  # no destructors: a gloo process group freed from Python can deadlock


def _serve(train, at, group, base: dict, report: int) -> bool:
    """One run on rank 1, reported; True when it was clean and rank 1 stays for the next."""
    grad, dtype, threads = torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_num_threads()
    try:
        with batch_share(1):
            trace = train(Shard(1), at)
    finally:  # as the runner puts them back on rank 0
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    leaks = [(s, f"{c} (rank 1)") for s, c in trace.state_leaks]
    stays = pooling() and _reusable(train) and trace.crash is None and not leaks and _intact(group) \
        and not _changes(base, threads=True)
    _send(report, ("done", trace.crash, leaks, stays, _sequence(group)))
    if stays:
        _RUN.clear()
    return stays


# --- rank 1 as rank 0 sees it --------------------------------------------------------------------

class Peer:
    """Rank 1 during one run, as rank 0 sees it: its report, its progress, and how it ended."""

    def __init__(self, pool: Pool, limit: float, progress_struct):
        self.pool, self.struct = pool, progress_struct
        self.started = time.monotonic()
        self.deadline = self.started + limit
        self.hung = self.stopped = self.released = False
        self.where: tuple[int, int] | None = None
        self.data: bytes | None = None  # rank 1's report; b"": its pipe ended without one
        self.report: tuple | None = None
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = os.pipe()
        self.thread: threading.Thread | None = None

    def watch(self) -> None:
        self.thread = harness_thread(threading.Thread(target=self._watch, name="isolation-ddp-rank-1", daemon=True))
        self.thread.start()

    def _watch(self) -> None:
        """While rank 0 trains: take rank 1's report when it comes; past the timeout, kill rank 1 (the
        watchdog: that also releases rank 0 from any collective it waits in); once rank 1 has finished
        cleanly and stays, kill it as soon as rank 0 has issued a collective it will never join (a rank
        1 that exited after its run released rank 0 so)."""
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                self.kill_hung()
                return
            polling = self.clean() and not self.released and self.report[4] is not None
            waiting = [self.wake_r] if self.data is not None else [self.wake_r, self.pool.reports]
            wait = min(POLL, self.deadline - now) if polling else self.deadline - now
            ready = select.select(waiting, [], [], wait)[0]
            if self.wake_r in ready:
                return
            if self.pool.reports in ready:
                try:
                    self._take(_read_frame(self.pool.reports, self.deadline))
                except TimeoutError:
                    self.kill_hung()
                    return
            elif polling and (_sequence(self.pool.group) or 0) > self.report[4]:
                self.released = True
                _kill(self.pool.pid)

    def stop_watching(self) -> None:
        if self.thread is not None:
            os.write(self.wake_w, b".")
            self.thread.join()
            self.thread = None

    def kill_hung(self) -> None:
        """Rank 1 is past the timeout; killing it also releases rank 0 from any collective it waits in."""
        with self.lock:
            if not self.hung:
                self.hung = True
                self.where = self.struct.unpack_from(self.pool.progress, 0)
                _kill(self.pool.pid)

    def finish(self, wait: float, stop: bool = False) -> None:
        """Read rank 1's report unless it came already, waiting at most ``wait`` seconds. Past the
        wait it is hung, or, with ``stop`` (rank 0 failed first), stopped."""
        if self.data is not None or self.hung:
            return
        try:
            self._take(_read_frame(self.pool.reports, time.monotonic() + wait))
        except TimeoutError:
            if stop:
                self.stopped = True
            else:
                self.kill_hung()

    def _take(self, data: bytes) -> None:
        self.data = data
        self.report = pickle.loads(data) if data else None

    def clean(self) -> bool:
        """Rank 1 ran to the end without a fault of any kind and waits for the next run."""
        return self.report is not None and self.report[0] == "done" and self.report[1] is None \
            and not self.report[2] and self.report[3] and not (self.hung or self.stopped or self.released)

    def outcome(self) -> "Outcome":
        """How rank 1's run ended (once a rank 1 that did not stay has been reaped: ``pool.status``)."""
        if self.stopped and not self.hung:
            return Outcome("stopped")
        where = self.where or self.struct.unpack_from(self.pool.progress, 0)
        return Outcome.read(self.data or b"", self.pool.status, self.hung, where)

    def close(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _kill(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Outcome:
    """How rank 1's run ended: ``kind`` is ``done`` (its ``crash`` or None), ``harness`` (the
    harness's side failed there, usually because rank 0 went away), ``lost`` (it exited or was
    killed without a report), ``hung`` (the watchdog killed it) or ``stopped`` (rank 0 failed
    first and stopped it)."""

    kind: str
    crash: Any = None
    detail: str = ""
    where: tuple[int, int] = (0, -1)
    leaks: list = None

    @classmethod
    def read(cls, data: bytes, status: int | None, hung: bool, where: tuple[int, int]) -> "Outcome":
        if hung:
            return cls("hung", where=where)
        if data:
            kind, payload, leaks, _stays, _sequence = pickle.loads(data)
            if kind == "done":
                return cls("done", crash=payload, leaks=leaks)
            return cls("harness", detail=payload)
        return cls("lost", detail=_status_text(status), where=where)


def _status_text(status: int | None) -> str:
    if status is not None and os.WIFSIGNALED(status):
        return f"rank 1 was killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    if status is not None and os.WIFEXITED(status):
        return f"rank 1 exited with code {os.WEXITSTATUS(status)} (os._exit or a fatal error)"
    return "rank 1 ended without a report"


def settle(trace, error: BaseException | None, peer: Outcome):
    """Rank 0's trace, with rank 1's failure as its crash where rank 1 failed first: rank 0 then
    only failed because its peer went away (a collective raised, in the technique's phase or in
    the harness's own code)."""
    failed = _rank_one_crash(peer, Crash, PHASES)
    if trace is not None and peer.leaks:
        trace.state_leaks.extend(leak for leak in peer.leaks if leak not in trace.state_leaks)
    if failed is None:
        if error is not None:
            raise error
        return trace
    if trace is None:
        trace = Trace("cpu")
    own = trace.crash if error is None else None
    if own is None or _position(failed, PHASES) < _position(own, PHASES) or (
            _position(failed, PHASES) == _position(own, PHASES) and _communication(own)):
        trace.crash = failed
    return trace


def _rank_one_crash(peer: Outcome, Crash, phases) -> Any:
    """Rank 1's failure as a ``runner.Crash`` on rank 1 (None when it ran to the end)."""
    if peer.kind == "done":
        if peer.crash is None:
            return None
        c = peer.crash
        return Crash(c.step, c.phase, f"{c.error} (on rank 1)", c.detail, c.timed_out)
    step, index = peer.where
    phase = phases[index] if 0 <= index < len(phases) else "the harness's own code"
    if peer.kind == "hung":
        error = "rank 1 took longer than the timeout and was killed"
        return Crash(step, phase, error, error, timed_out=True)
    if peer.kind == "lost":
        return Crash(step, phase, peer.detail, peer.detail)
    return None  # stopped, or a harness failure on rank 1: both follow a failure of rank 0, which it reports


def _position(crash, phases) -> tuple[int, int]:
    return crash.step, (phases.index(crash.phase) if crash.phase in phases else len(phases))


def _communication(crash) -> bool:
    """A crash that is a collective failing because the other rank went away."""
    return "gloo" in crash.detail or "Connection closed by peer" in crash.error or "Connection reset" in crash.error


def _send(fd: int, obj: Any) -> None:
    """One message (length-prefixed pickle) on a pipe."""
    write_frame(fd, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _receive(fd: int) -> Any:
    """The next message on ``fd`` (blocking); None once its writer has ended."""
    data = _read_frame(fd, None)
    return pickle.loads(data) if data else None


def _read_frame(fd: int, deadline: float | None) -> bytes:
    """The next message's bytes on ``fd``; b"" once its writer has ended (before or within it);
    TimeoutError past ``deadline``."""
    return read_frame(fd, deadline) or b""
