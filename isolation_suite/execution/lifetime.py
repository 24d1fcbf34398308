"""What outlives what: processes that must not outlive their parent, and threads that are the harness's own.

* :func:`exit_with_parent`: this process dies when its parent does (an xdist worker whose
  ``fuzz`` controller was killed, a sandbox child whose worker was killed), instead of running
  its item or its hung technique on for nobody.
* :func:`end_children`: the ``fuzz`` controller, told to stop (SIGTERM), ends its xdist workers at
  once; xdist would otherwise wait 10 s for each to finish its item, then kill it, twice over.
* :func:`harness_thread`: threads the harness starts itself, which the sandbox's check for
  threads a technique left running must not count.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
import weakref

#: threads the harness started itself (the sandbox's output readers, the ddp watchdog, ...)
_HARNESS_THREADS: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()
PR_SET_PDEATHSIG = 1
#: how often the fallback (no ``prctl``) looks at its parent
POLL = 0.5


def harness_thread(thread: threading.Thread) -> threading.Thread:
    """Mark ``thread`` as the harness's own (not the technique's); returns it."""
    _HARNESS_THREADS.add(thread)
    return thread


def is_harness_thread(thread: threading.Thread) -> bool:
    return thread in _HARNESS_THREADS


def exit_with_parent(parent: int | None = None) -> None:
    """Make this process die (SIGKILL) when its parent does. ``parent``: the parent's pid where the
    caller knows it (after ``fork``), so that a parent already gone is noticed too.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, which fires when the *thread* that started this
    process ends (the harness forks from the main thread). Elsewhere, or where ``prctl`` fails, a
    daemon thread looks at ``os.getppid()`` every half second."""
    parent = os.getppid() if parent is None else parent
    if not _pdeathsig():
        harness_thread(threading.Thread(target=_watch_parent, args=(parent,), name="isolation-exit-with-parent",
                                        daemon=True)).start()
    if os.getppid() != parent:  # the parent ended before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _pdeathsig() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc to load, or no prctl in it (not Linux)
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL)
    os.kill(os.getpid(), signal.SIGKILL)


def children() -> list[int]:
    """The pids of this process's live children (Linux ``/proc``; empty elsewhere)."""
    me, found = os.getpid(), []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _parent_and_state(int(entry))[0] == me:
                found.append(int(entry))
    return found


def _parent_and_state(pid: int) -> tuple[int, str]:
    """(ppid, state letter) of ``pid``; (0, "") when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return 0, ""
    fields = stat[stat.rfind(")") + 2:].split()  # the name in parentheses may hold spaces
    return int(fields[1]), fields[0]


def end_children(grace: float = 0.5) -> list[int]:
    """SIGTERM every live child of this process, SIGKILL those still running after ``grace``
    seconds; returns their pids. Their own children die with them where they called
    :func:`exit_with_parent` (the sandbox's children do). Not reaped here: their owner (xdist's
    gateways) reaps them."""
    pids = children()
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.02)
    for pid in pids:
        if _running(pid):
            _signal(pid, signal.SIGKILL)
    return pids


def _running(pid: int) -> bool:
    return _parent_and_state(pid)[1] not in ("", "Z", "X")


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
