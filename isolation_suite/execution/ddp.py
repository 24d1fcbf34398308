"""The ``ddp`` execution mode: ``DistributedDataParallel`` over two CPU processes, started by the harness.

Rank 0 is the process that calls :func:`isolation_suite.execution.runner.run` (the sandbox's child, or the
caller itself where there is none); rank 1 is forked from it at the start of every run. They meet
through a ``FileStore`` in a fresh temporary folder (no port to race for) and talk gloo over the
loopback interface. Both build the model from the same seeds, run the technique's ``setup``, wrap
the model in ``DistributedDataParallel(model, find_unused_parameters=..., static_graph=...)``
(after ``setup`` by default, the user's usual order: build, freeze, wrap; before it for a technique
whose ``ddp_wrap`` is ``"before_setup"``) and train on their half of every batch (rows
``[rank * n, (rank + 1) * n)``), against the matching half of the whole batch's targets.

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
phase. Rank 1 is always killed and reaped, and the process group destroyed, whatever happened.
Rank 1 also dies with rank 0 (``PR_SET_PDEATHSIG``), so a rank 0 killed by the sandbox's own
timeout leaves nothing behind.

Not freed: rank 0 keeps each run's ``DistributedDataParallel`` (and so its gloo process group)
until the process ends. Freeing a gloo process group from Python can deadlock on the GIL (its
destructor joins worker threads that need the GIL to drop their work's thread-local state), so the
sandbox retires its child after every ddp run instead, and an in-process run keeps them.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import mmap
import os
import pickle
import select
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from isolation_suite.execution.trace import PHASES, Crash, Trace
from isolation_suite.model.layers import batch_share as layers_share
from isolation_suite.spec.scenario import Mode

WORLD = 2
#: a run without a timeout still cannot wait forever on a peer
DEFAULT_TIMEOUT = 600.0
#: the sandbox waits this much longer than the timeout for a ddp run, so that rank 0 can report a
#: hang of rank 1 itself (with rank 1's phase) before the sandbox would kill rank 0
GRACE = 5.0
#: how long rank 0, having failed itself, waits for rank 1's report before it stops rank 1
STOP_WAIT = 2.0
#: every run's DistributedDataParallel, kept alive (see the module's docstring)
_KEPT: list[nn.Module] = []


@dataclass(frozen=True)
class Shard:
    """One rank's share of the batch."""

    rank: int
    world: int = WORLD

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole-batch tensor."""
        n = x.shape[0] // self.world
        return x[self.rank * n:(self.rank + 1) * n]

    def whole(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """The whole batch's shape, from this rank's."""
        return (shape[0] * self.world,) + tuple(shape[1:])

    # --- what rank 0 records: the whole batch's values -----------------------------------------

    def whole_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The whole batch's loss: the average of the ranks' (mean-reduced, equal halves)."""
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total / self.world

    def whole_input_grads(self, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each input's gradient of the whole batch's loss: the ranks' input gradients stacked and
        divided by the world size (a rank's is that of its own half-loss). None where no rank has one."""
        out = []
        for x in inputs:
            has = torch.tensor([float(x.grad is not None)])
            dist.all_reduce(has)
            grad = torch.zeros_like(x) if x.grad is None else x.grad.detach()
            parts = [torch.empty_like(grad) for _ in range(self.world)]
            dist.all_gather(parts, grad.contiguous())
            out.append(torch.cat(parts) / self.world if has.item() else None)
        return out


def wrap(model: nn.Module, mode: Mode) -> nn.Module:
    """``DistributedDataParallel`` over ``model`` with the mode's options (broadcasts rank 0's state)."""
    wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=mode.find_unused,
                                                  static_graph=mode.static_graph)
    _KEPT.append(wrapped)
    return wrapped


# --- the two processes ------------------------------------------------------------------------

def run(train: Callable[[Shard, Any], Any], phase: Callable[[Any], Any], timeout: float | None,
        progress_struct) -> Any:
    """Run ``train(shard, at)`` as rank 0 here and as rank 1 in a forked process; rank 0's trace,
    with rank 1's failure as its crash where rank 1 failed first.

    ``phase(progress)`` makes a ``runner.Phase`` mirroring into ``progress`` (rank 1 gets its own
    shared buffer, so rank 0 can place a hang of rank 1); ``progress_struct`` reads it."""
    limit = DEFAULT_TIMEOUT if timeout is None else timeout
    folder = tempfile.mkdtemp(prefix="isolation-ddp-")
    store = os.path.join(folder, "store")
    progress = mmap.mmap(-1, progress_struct.size)
    progress_struct.pack_into(progress, 0, 0, -1)
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # rank 1: never returns
        os.close(read_end)
        _rank_one(train, phase(progress), store, limit, write_end, parent)
    os.close(write_end)
    peer = Peer(pid, read_end, progress, progress_struct)
    watchdog = threading.Timer(limit, peer.kill_hung)
    watchdog.daemon = True
    watchdog.start()
    trace, error = None, None
    try:
        with _process_group(0, store, limit):
            try:
                trace = train(Shard(0), None)
            except BaseException as exc:  # noqa: BLE001 - settled below, with rank 1's outcome
                error = exc
            watchdog.cancel()
            failed = error is not None or trace.crash is not None
            left = max(0.0, limit - (time.monotonic() - peer.started))
            # rank 0 failed: a rank 1 that failed first has already ended and reported; one still
            # running waits on rank 0 in a collective and is stopped
            peer.finish(min(left, STOP_WAIT) if failed else left, stop=failed)
    finally:
        watchdog.cancel()
        peer.close()
        shutil.rmtree(folder, ignore_errors=True)
    return settle(trace, error, peer.outcome)


def _rank_one(train, at, store: str, limit: float, report: int, parent: int) -> None:
    """Rank 1: train its half, send back how it ended (a crash or None), exit without cleanup."""
    code = 0
    try:
        _die_with_parent(parent)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with _process_group(1, store, limit, destroy=False):
            trace = train(Shard(1), at)
        _send(report, ("done", trace.crash, [(s, f"{c} (rank 1)") for s, c in trace.state_leaks]))
    except BaseException as exc:  # noqa: BLE001 - the harness's side failed: rank 0 settles it
        try:
            _send(report, ("harness", f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}", []))
        except BaseException:  # noqa: BLE001
            code = 70
    finally:
        os._exit(code)  # no destructors: a gloo process group freed from Python can deadlock


def _die_with_parent(parent: int) -> None:
    """Rank 1 is killed when rank 0 ends, however it ends (Linux ``PR_SET_PDEATHSIG``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # rank 0 ended before the request took effect
        os._exit(0)


@contextlib.contextmanager
def _process_group(rank: int, store: str, limit: float, destroy: bool = True) -> Iterator[None]:
    """The default process group of this run (gloo over loopback), destroyed after it on rank 0."""
    previous = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a hostname that resolves nowhere must not matter
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store, WORLD), rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=limit))
    finally:
        if previous is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
    try:
        with batch_share(rank):
            yield
    finally:
        if destroy and dist.is_initialized():
            _KEPT.append(dist.group.WORLD)  # destroyed, not freed (see the module's docstring)
            dist.destroy_process_group()


@contextlib.contextmanager
def batch_share(rank: int) -> Iterator[None]:
    with layers_share(rank, WORLD):
        yield


class Peer:
    """Rank 1 as rank 0 sees it: its report, its progress, and how it ended."""

    def __init__(self, pid: int, report: int, progress: mmap.mmap, progress_struct):
        self.pid, self.report, self.progress, self.struct = pid, report, progress, progress_struct
        self.started = time.monotonic()
        self.hung = self.stopped = False
        self.outcome: Outcome | None = None
        self.lock = threading.Lock()

    def kill_hung(self) -> None:
        """The watchdog: rank 1 is past the timeout; killing it also releases rank 0 from any
        collective it waits in."""
        with self.lock:
            if self.pid is not None:
                self.hung = True
                self.where = self.struct.unpack_from(self.progress, 0)
                _kill(self.pid)

    def finish(self, wait: float, stop: bool = False) -> None:
        """Read rank 1's report (waiting at most ``wait`` seconds for it to end), then reap it.
        Past the wait it is hung, or, with ``stop`` (rank 0 failed first), stopped."""
        try:
            data = _read_all(self.report, time.monotonic() + wait)
        except TimeoutError:
            if stop:
                self.stopped = True
            else:
                self.kill_hung()
            data = b""
        self._reap(data)

    def close(self) -> None:
        if self.outcome is None:
            self._reap(b"")
        with contextlib.suppress(OSError):
            os.close(self.report)

    def _reap(self, data: bytes) -> None:
        with self.lock:
            pid, self.pid = self.pid, None
        if pid is None and self.outcome is not None:
            return
        where = getattr(self, "where", None) or self.struct.unpack_from(self.progress, 0)
        if pid is not None:
            _kill(pid)
            status = os.waitpid(pid, 0)[1]
        else:
            status = None
        self.outcome = Outcome("stopped") if self.stopped and not self.hung else \
            Outcome.read(data, status, self.hung, where)


def _kill(pid: int) -> None:
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
            kind, payload, leaks = pickle.loads(data)
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
    view = memoryview(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    while view:
        view = view[os.write(fd, view):]


def _read_all(fd: int, deadline: float) -> bytes:
    """Everything written to ``fd`` until its writer ends; TimeoutError past ``deadline``."""
    chunks = []
    while True:
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([fd], [], [], wait)[0]:
            raise TimeoutError
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
