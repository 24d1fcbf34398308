"""Where technique code runs: a child process that cannot hurt the judge.

The technique under test is hostile user code. On the CPU (Linux), each search forks one child
process that runs the technique's training runs and sends their traces back; the reference and
the invariants stay in the parent. So:

* whatever the technique raises (``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit`` too)
  is a ``no-crash`` violation with its phase and step;
* a process exit (``os._exit``) or a fatal signal is a ``no-crash`` violation naming the exit
  code or signal and the last phase the child reported;
* an example that runs past the timeout is killed and is a ``timeout`` violation;
* global state the technique changed (grad mode, default dtype, ``torch.backends`` flags,
  anomaly mode, deterministic algorithms, functions of ``torch``,
  ``torch.nn.functional`` and ``torch.Tensor`` it replaced, global module hooks it left
  registered, threads it left running) is reported as ``state-restored``, and the child is
  retired, so the next example starts from a clean copy of the parent;
* what the technique prints (file descriptors 1 and 2 of the child) is shown on the parent's
  stderr, each line labelled ``[technique NAME]``, up to ``OUTPUT_CAP`` bytes per search.

Where a child cannot be forked (CUDA runs, a platform without ``fork``, a CUDA build where a
forked child cannot run autograd, or ``ISOLATION_SANDBOX=off`` for debugging), the run is
in-process: exceptions of every kind are still verdicts, the global state is checked and put
back (a thread left running is reported, never stopped), and the timeout is a ``SIGALRM`` in
the main thread, which cannot stop code that blocks signals or hangs inside a C call, nor survive
a process exit. The README says so.
"""
from __future__ import annotations

import collections
import dataclasses
import faulthandler
import fcntl
import importlib
import mmap
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch

from isolation_suite.execution.ddp import ranks_cpu, remove_stores, unfreed
from isolation_suite.execution.state import RUN_END, changes, restore, snapshot
from isolation_suite.execution.lifetime import exit_with_parent, harness_thread
from isolation_suite.execution.modes import info as mode_info
from isolation_suite.execution.modes import own_compile_cache
from isolation_suite.execution.pipes import read_frame, write_frame
from isolation_suite.execution.runner import TechniqueDriver, run
from isolation_suite.execution.trace import PHASES, PROGRESS, Crash, ExampleTimeout, Trace
from isolation_suite.model.layers import warm_up_kernels
from isolation_suite.technique import Technique

SANDBOX_ENV = "ISOLATION_SANDBOX"
DEFAULT_TIMEOUT = 60.0  # seconds per training run; the profiles may set their own


class SandboxError(RuntimeError):
    """The harness's own code failed in the child (never the technique's): a bug to report."""


def settle_lazy_imports(scenarios: Sequence = ()) -> None:
    """Import what torch imports lazily and that rewrites torch's own namespace when it loads
    (``torch._dynamo`` wraps ``torch.manual_seed``; optimizers load it on their first step), so
    it happens once in the parent, before any snapshot and before any child is forked; and what the
    modes of ``scenarios`` load or build on first use (``ModeInfo.inherited_imports``,
    ``ModeInfo.warm_up``), for the child to inherit; and what torch's CPU kernels build on first use
    (``warm_up_kernels``)."""
    import torch._dynamo  # noqa: F401
    import torch.distributed  # noqa: F401 - the ddp mode's, before any child is forked
    warm_up_kernels()
    rows = {mode_info(scenario.mode) for scenario in scenarios}
    for name in {name for row in rows for name in row.inherited_imports}:
        importlib.import_module(name)
    for row in rows:
        row.warm_up()
    _PREPARED.update(row.kind for row in rows if row.prepares_parent)


#: the modes this process was prepared for (``settle_lazy_imports``): a child forked since inherits that
_PREPARED: set[str] = set()


def _unprepared(scenarios: Sequence, prepared: frozenset[str]) -> bool:
    """Some of ``scenarios`` run in a mode whose preparation a child forked with ``prepared`` lacks."""
    return any(row.prepares_parent and row.kind not in prepared for row in map(mode_info, (s.mode for s in scenarios)))


# --- the user's Ctrl-C, told apart from a technique raising KeyboardInterrupt ----------------

# --- the child process ---------------------------------------------------------------------



def _map_arrays(x: Any, convert: Callable[[Any], Any]) -> Any:
    """Every tensor or array in ``x`` (a trace, its records, dicts and lists of them) converted;
    dataclasses are changed in place (each side owns the trace it converts)."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return convert(x)
    if isinstance(x, dict):
        return {k: _map_arrays(v, convert) for k, v in x.items()}
    if isinstance(x, list):
        return [_map_arrays(v, convert) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            setattr(x, f.name, _map_arrays(getattr(x, f.name), convert))
    return x


def _to_numpy(t):
    # numpy arrays pickle an order of magnitude faster than tensors; anything numpy cannot hold stays a tensor
    try:
        return t.numpy() if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.requires_grad else t
    except TypeError:  # bfloat16 and friends
        return t


def _to_tensor(a):
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


def _send(fd: int, obj: Any) -> None:
    _write(fd, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _write(fd: int, data: bytes) -> None:
    write_frame(fd, data)


#: the last request pickled, with the scenarios it was pickled from (held, so their ids stay their own):
#: a sweep sends the same scenarios to every technique's child, and pickles them once
_LAST_REQUEST: list = [(), None, b""]


def _request(scenarios: Sequence, device: str) -> bytes:
    held, held_device, _ = _LAST_REQUEST
    if held_device != device or len(held) != len(scenarios) or any(a is not b for a, b in zip(held, scenarios)):
        runs = [(scenario, device) for scenario in scenarios]
        _LAST_REQUEST[:] = [tuple(scenarios), device, pickle.dumps(runs, protocol=pickle.HIGHEST_PROTOCOL)]
    return _LAST_REQUEST[2]


def _widen(fd: int) -> None:
    """A pipe of 1 MiB where the system allows it: a child sent several runs rarely waits for this
    process to read a trace before starting the next run, nor this process for the child to read."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except (AttributeError, OSError):
        pass


@dataclasses.dataclass
class _Ahead:
    """A run sent to the child (``Sandbox.prefetch``), and its trace once the child's reply is read."""

    scenario: Any
    device: str
    trace: Trace | None = None


def _receive(fd: int, deadline: float | None = None) -> Any:
    body = read_frame(fd, deadline)
    return _EOF if body is None else pickle.loads(body)


_EOF = object()


#: why forked children cannot run technique code in this process any more (None while they can)
_FORK_UNUSABLE: list[str] = []


def fork_available() -> bool:
    return hasattr(os, "fork") and sys.platform.startswith("linux") and not _FORK_UNUSABLE \
        and os.environ.get(SANDBOX_ENV, "on").strip().lower() not in ("off", "0", "no", "false")


def mode() -> str:
    """Where technique code runs in this process now, in words (reports print it)."""
    if os.environ.get(SANDBOX_ENV, "on").strip().lower() in ("off", "0", "no", "false"):
        return f"in-process ({SANDBOX_ENV}=off)"
    if not (hasattr(os, "fork") and sys.platform.startswith("linux")):
        return "in-process (no fork on this platform)"
    if _FORK_UNUSABLE:
        return f"in-process ({_FORK_UNUSABLE[0]})"
    return "forked child"


class Sandbox:
    """Runs one technique's training runs in a forked child; ``run`` returns the trace.

    One child serves a whole search; a child that crashed, hung, or leaked global state is
    replaced by a fresh fork at the next run. Use as a context manager (or call ``close``).
    """

    def __init__(self, technique: Technique, timeout: float | None = DEFAULT_TIMEOUT):
        self.technique, self.timeout = technique, timeout
        self.pid: int | None = None
        self.output = _Output(technique.name)
        self.progress = mmap.mmap(-1, PROGRESS.size)  # shared with the child: where it is now
        # where a child's runs spend their time (benchmarks read it): runs answered, and seconds
        # inside the training loop in the child
        self.runs, self.child_seconds = 0, 0.0
        # the child's CPU seconds over its runs (its own clock, summed over the children it had)
        self.child_cpu, self._cpu_seen = 0.0, 0.0
        self.ahead: collections.deque[_Ahead] = collections.deque()  # runs sent, in the order sent
        self.prepared: frozenset[str] = frozenset()  # the modes the child was forked prepared for
        self._since = 0.0  # when the child last started a run, at the latest

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prefetch(self, scenarios: Sequence, device: str, *, keep: bool = False) -> None:
        """Send ``scenarios`` to the child now, in one request: it runs them back to back (after what
        it was sent before) while this process does other work (computing the reference), and ``run``
        answers each of them from what came back, in any order. What was sent before and not asked
        for is kept with ``keep``, and dropped otherwise (``drop_ahead``). A run that crashed, hung or
        leaked is answered as ``run`` would answer it, and the runs sent after it go to a fresh child
        when asked for. In-process (CUDA runs, no fork) nothing is sent ahead."""
        if not keep:
            self.drop_ahead()
        device = str(device)
        if self.pid is not None and _unprepared(scenarios, self.prepared):
            self._retire_unprepared()
        if not scenarios or device.startswith("cuda") or (self.pid is None and not (fork_available()
                                                                                   and self._start(scenarios))):
            return
        if not self._send(scenarios, device):  # the child ended between runs (a thread the technique left)
            self.ahead.append(_Ahead(scenarios[0], device, self._lost(device, timed_out=False)))
            return
        self.ahead.extend(_Ahead(scenario, device) for scenario in scenarios)

    def drop_ahead(self) -> None:
        """Forget the runs sent ahead and not asked for. A child still owing one of them is ended
        rather than waited for (a run nobody wants could hang until its timeout): the next run forks
        a fresh child."""
        if any(entry.trace is None for entry in self.ahead):
            self.close()
        self.ahead.clear()

    def _retire_unprepared(self) -> None:
        """End a child forked before this process prepared for a mode it is now sent runs of (a
        compiled run after eager ones: the imports and the warm-up compile, about 2 s that every run's
        child would otherwise pay itself), once it has answered what it owes; the next run forks a
        prepared one. The answers stay."""
        owed = [entry for entry in self.ahead if entry.trace is None]
        if owed:
            self._answer_through(owed[-1])
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            self._reap()

    def run(self, scenario, device: str) -> Trace:
        device = str(device)
        sent = self._sent(scenario, device)
        if sent is None:  # not sent ahead: sent now, after what the child still owes (those answers kept)
            self.prefetch([scenario], device, keep=True)
            sent = self._sent(scenario, device)
            if sent is None:  # in-process (CUDA runs, no fork)
                return run_in_process(self.technique, scenario, device, self.timeout)
        self._answer_through(sent)
        if sent not in self.ahead:  # its child was gone before it: a fresh child runs it
            return self.run(scenario, device)
        self.ahead.remove(sent)
        return sent.trace

    def _sent(self, scenario, device: str) -> "_Ahead | None":
        return next((entry for entry in self.ahead if entry.scenario is scenario and entry.device == device), None)

    def _send(self, scenarios: Sequence, device: str) -> bool:
        """One request for ``scenarios``; False when the child is gone."""
        if not self.ahead or all(entry.trace is not None for entry in self.ahead):
            PROGRESS.pack_into(self.progress, 0, 0, -1)  # (else the child is still on an earlier run)
        try:
            _write(self.to_child, _request(scenarios, device))
        except BrokenPipeError:
            return False
        # the next reply's run started by now at the latest: a deadline counted from here is never short
        self._since = time.monotonic()
        return True

    def _answer(self, entry: "_Ahead") -> bool:
        """Read the child's reply for ``entry``, the first run sent and not yet answered; True when
        the child is gone after it (lost or retired): it answers no later run."""
        # the child starts a run once it has sent the previous reply, which is before this process
        # read it: the timeout counts from then on at the latest, never short of a whole run
        grace = mode_info(entry.scenario.mode).grace  # a ddp run's rank 0 reports its rank 1's hang itself
        deadline = None if self.timeout is None else self._since + self.timeout + grace
        try:
            reply = _receive(self.from_child, deadline)
        except TimeoutError:
            reply = None
        self._since = time.monotonic()
        if reply is None or reply is _EOF:
            entry.trace = self._lost(entry.device, timed_out=reply is None)
            return True
        kind, payload, retire, in_child, cpu = reply
        if retire:
            self._reap()
        self.runs, self.child_seconds = self.runs + 1, self.child_seconds + in_child
        self.child_cpu, self._cpu_seen = self.child_cpu + max(0.0, cpu - self._cpu_seen), cpu
        if kind == "error":
            self.ahead.clear()
            self.close()
            raise SandboxError(payload)
        entry.trace = _map_arrays(payload, _to_tensor)
        return bool(retire)

    def _answer_through(self, last: "_Ahead") -> None:
        """Read the replies owed, in the order sent, up to ``last``'s; a child gone before it answers
        none of the later runs: they are dropped (``last`` too, if it was one), to run afresh."""
        for i, entry in enumerate(list(self.ahead)):
            if entry.trace is None and self._answer(entry):
                while len(self.ahead) > i + 1:
                    self.ahead.pop()
                return
            if entry is last:
                return

    def _start(self, scenarios: Sequence) -> bool:
        """Fork the child; False (and every later run of this process in-process) when a child
        cannot run autograd: on a CUDA build, autograd's device threads, started by the parent's
        first backward, do not survive fork."""
        settle_lazy_imports(scenarios)
        self.prepared = frozenset(_PREPARED)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        output_r, output_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        with warnings.catch_warnings():
            # Python 3.12 warns of fork in a threaded process: the two hazards that concern this child
            # (OpenMP's pool, autograd's device threads) are handled in _child_main and by the probe
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(to_child_w)
            os.close(from_child_r)
            os.close(output_r)
            exit_with_parent(parent)  # a hung technique must not run on for nobody
            _child_main(self.technique, to_child_r, from_child_w, self.progress, self.timeout, output_w)
        os.close(to_child_r)
        os.close(from_child_w)
        os.close(output_w)
        self.output.start(output_r)
        self.pid, self.to_child, self.from_child = pid, to_child_w, from_child_r
        self._cpu_seen = 0.0
        _widen(from_child_r)
        _widen(to_child_w)
        try:
            hello = _receive(self.from_child, time.monotonic() + 120)
        except TimeoutError:
            hello = _EOF
        if hello is _EOF or hello[0] != "ready":
            reason = hello[1] if hello is not _EOF else "the child did not start"
            _FORK_UNUSABLE.append(f"a forked child cannot run autograd here: {reason}")
            self.close()
            return False
        return True

    def _lost(self, device: str, timed_out: bool) -> Trace:
        """The child hung or died mid-run: its trace is a crash at the last phase it reported."""
        step, index = PROGRESS.unpack_from(self.progress, 0)
        phase = PHASES[index] if 0 <= index < len(PHASES) else "the harness's own code"
        if timed_out:
            os.kill(self.pid, signal.SIGKILL)
        status = self._reap()
        if timed_out:
            error = f"the run took longer than {self.timeout:g}s and was killed"
        elif status is not None and os.WIFSIGNALED(status):
            error = f"the process was killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
        elif status is not None and os.WIFEXITED(status):
            error = f"the process exited with code {os.WEXITSTATUS(status)} (os._exit or a fatal error)"
        else:
            error = "the process ended without a trace"
        return Trace(str(device), crash=Crash(step, phase, error, error, timed_out=timed_out))

    def _reap(self) -> int | None:
        pid, self.pid = self.pid, None
        for fd in (self.to_child, self.from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        if pid is None:
            return None
        try:
            # ended, not yet reaped (its pid cannot be reused): a ddp run it left behind is removed
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            remove_stores(pid)
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:
            return None
        finally:
            self.output.join()  # everything it printed is shown before its trace is used

    def close(self) -> None:
        self.ahead.clear()
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap()

    def __del__(self) -> None:  # a search that raised still leaves no child behind
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _child_main(technique: Technique, requests: int, replies: int, progress: mmap.mmap,
                timeout: float | None, output: int) -> None:
    """Serve runs until told to stop, a leak retires this copy, or the technique ends the process.

    A ``ddp`` run keeps its rank 1 and process group for the next (``ddp``'s pool); one that left a
    group this copy cannot free (a fault retired the pool) retires it too, so that the next rank 1
    is forked from a copy that holds none."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the user's Ctrl-C belongs to the parent
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _capture_output(output)
        faulthandler.disable()  # a fatal signal is reported by the parent, with the phase and step
        # OpenMP's thread pool does not survive fork: a parent that ran parallel kernels leaves the
        # child's pool deadlocked on its first parallel region. One thread never enters the pool.
        torch.set_num_threads(1)
        own_compile_cache()  # only the technique's runs compile here: Dynamo's cache is kept across them
        try:  # can this copy run autograd at all?
            probe = torch.ones(1, requires_grad=True)
            (probe * 2).sum().backward()
        except RuntimeError as exc:
            _send(replies, ("unavailable", (str(exc).strip().splitlines() or [""])[0], True, 0.0, 0.0))
            return
        _send(replies, ("ready", None, False, 0.0, 0.0))
        before = snapshot()
        serving = True
        while serving:
            request = _receive(requests)
            if request is _EOF:
                break
            for scenario, device in request:  # one run, or several sent ahead: back to back
                PROGRESS.pack_into(progress, 0, 0, -1)
                started = time.perf_counter()
                try:
                    trace = run(scenario, _driver(technique), device, progress=progress, timeout=timeout)
                except BaseException as exc:  # noqa: BLE001 - the harness's own failure, reported upstairs
                    _send(replies, ("error", f"{type(exc).__name__}: {exc}", True, 0.0, _cpu_so_far()))
                    serving = False
                    break
                seconds = time.perf_counter() - started
                # the state after this run is the state before the next: only reading the next request
                # (the harness's own code) happens in between, so one snapshot serves both
                after = snapshot()
                leaks = changes(before, after)
                before = after
                trace.state_leaks.extend((RUN_END, leak) for leak in leaks)
                retire = bool(leaks) or mode_info(scenario.mode).retire or unfreed() > 0
                _send(replies, ("trace", _map_arrays(trace, _to_numpy), retire, seconds, _cpu_so_far()))
                if retire:  # isolated: the runs after this one go to a fresh copy of the parent
                    serving = False
                    break
    except BaseException:  # noqa: BLE001 - the parent reads a lost child as a crash
        code = 70
    finally:
        for stream in (sys.stdout, sys.stderr):  # a last line printed without its newline
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - the technique replaced or closed it
                pass
        os._exit(code)


def _cpu_so_far() -> float:
    """This child's CPU seconds with its ranks' (a ddp run's rank 1): a check's whole work, as the
    benchmarks count it (``Sandbox.child_cpu``)."""
    return time.process_time() + ranks_cpu()


def _capture_output(fd: int) -> None:
    """The technique's output goes to the parent: file descriptors 1 and 2 (C code prints there
    too), and Python's streams over them, line-buffered (whatever pytest or the caller had put in
    ``sys.stdout`` wrote elsewhere), so a line printed just before a crash still arrives."""
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)


#: how much of a technique's own output the parent shows, per Sandbox (a search)
OUTPUT_CAP = 64 * 1024


class _Output:
    """Shows what a child prints on this process's stderr, line by line as it comes, each line
    labelled ``[technique NAME]``; at most ``OUTPUT_CAP`` bytes per Sandbox, then one line saying
    the rest was dropped (the rest is still read, so a child printing without end never blocks)."""

    def __init__(self, name: str):
        self.label, self.left = f"[technique {name}] ", OUTPUT_CAP
        self.thread: threading.Thread | None = None

    def start(self, fd: int) -> None:
        self.thread = harness_thread(threading.Thread(target=self._read, args=(fd,), daemon=True,
                                                      name="isolation-sandbox-output"))
        self.thread.start()

    def join(self, timeout: float = 1.0) -> None:
        """Until the child's output ends (its last writer, a process it started too, has exited)."""
        if self.thread is not None:
            self.thread.join(timeout)

    def _read(self, fd: int) -> None:
        pending = b""
        try:
            while chunk := os.read(fd, 1 << 16):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._show(line)
                if len(pending) > max(self.left, 0):  # a line without end: shown as far as the cap goes
                    self._show(pending)
                    pending = b""
        except OSError:
            pass
        finally:
            os.close(fd)
        if pending:
            self._show(pending)

    def _show(self, line: bytes) -> None:
        if self.left < 0:
            return
        text = self.label + line[:self.left].decode(errors="replace")
        self.left -= len(line) + 1
        if self.left < 0:
            text += f"\n{self.label}... (more output dropped: over {OUTPUT_CAP // 1024} KB)"
        try:
            print(text, file=sys.stderr, flush=True)
        except (OSError, ValueError):  # our stderr is closed: nowhere to show it
            pass


def _driver(technique: Technique):
    return TechniqueDriver(technique)


def run_in_process(technique: Technique, scenario, device: str, timeout: float | None) -> Trace:
    """The same run without a child: state checked and restored, a SIGALRM timeout where possible."""
    settle_lazy_imports()
    before = snapshot()
    alarm = timeout is not None and threading.current_thread() is threading.main_thread()
    if alarm:
        previous = signal.signal(signal.SIGALRM, _raise_timeout)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        trace = run(scenario, _driver(technique), device, timeout=timeout)
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        after = snapshot()
        leaks = changes(before, after)
        if leaks:  # changes() compares everything restore() would put back
            restore(before, after)
    trace.state_leaks.extend((RUN_END, leak) for leak in leaks)
    return trace


def _raise_timeout(signum, frame):
    raise ExampleTimeout()
