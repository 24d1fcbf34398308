"""Hostile techniques, written against the public contract only: each ends, stalls or poisons
the process in its own way inside ``call`` (or right after the optimizer step). Shared by the
sandbox, CLI, plug-in and fuzz tests; importable as ``hostile`` from the tests folder."""
import os
import signal
import time

import torch
import torch.nn.functional as F

import isolation_suite as iso

PASS = frozenset({iso.Capability.PASS_THROUGH})


class _Hostile(iso.Technique):
    capabilities = PASS

    def act(self):
        raise NotImplementedError

    def call(self, module, args, role):
        if role is iso.Role.PASS_THROUGH:
            self.act()
        return module(*args)


class SysExit(_Hostile):
    name = "hostile.sys_exit"

    def act(self):
        raise SystemExit(0)


class OsExit(_Hostile):
    name = "hostile.os_exit"

    def act(self):
        os._exit(0)


class Segfault(_Hostile):
    name = "hostile.segfault"

    def act(self):
        os.kill(os.getpid(), signal.SIGSEGV)


class BusyLoop(_Hostile):
    name = "hostile.busy_loop"

    def act(self):
        while True:
            pass


class Sleeps(_Hostile):
    name = "hostile.sleeps"

    def act(self):
        time.sleep(600)


class RaisesKeyboardInterrupt(_Hostile):
    name = "hostile.keyboard_interrupt"

    def act(self):
        raise KeyboardInterrupt


class RaisesGeneratorExit(_Hostile):
    name = "hostile.generator_exit"

    def act(self):
        raise GeneratorExit


def _detached_linear(x, weight, bias=None):
    return _ORIGINAL_LINEAR(x, weight.detach(), None if bias is None else bias.detach())


_ORIGINAL_LINEAR = F.linear


class PatchesLinear(iso.Technique):
    """'Isolates' every Linear by monkeypatching F.linear to detach weights, and never undoes it."""

    name = "hostile.patches_linear"
    capabilities = frozenset({iso.Capability.PASS_THROUGH})

    def call(self, module, args, role):
        F.linear = _detached_linear
        return module(*args)


class SetsCudnnFlags(iso.Technique):
    name = "hostile.cudnn_flags"
    capabilities = frozenset({iso.Capability.PASS_THROUGH})

    def call(self, module, args, role):
        torch.backends.cudnn.deterministic = True  # both False by default
        torch.backends.cudnn.benchmark = True
        if role is iso.Role.PASS_THROUGH:
            return torch.func.functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, args)
        return module(*args)


class ExitsLater(iso.Technique):
    """Leaves a thread behind that ends the process after the run has been reported."""

    name = "hostile.exits_later"
    capabilities = PASS

    def setup(self, model, intent):
        import threading
        threading.Timer(0.3, lambda: os._exit(3)).start()


class ExitsLaterByAlarm(iso.Technique):
    """Ends the process after the run has been reported, from a signal handler (no thread left
    running: the child is not retired, and the next run finds it gone)."""

    name = "hostile.exits_later_by_alarm"
    capabilities = PASS

    def setup(self, model, intent):
        signal.signal(signal.SIGALRM, lambda signum, frame: os._exit(3))
        signal.setitimer(signal.ITIMER_REAL, 0.3)


def fork_sandbox_works() -> bool:
    """Whether technique code runs in a forked child here once this process has run autograd itself.
    Not on a CUDA build of torch: autograd's device threads do not survive fork, and the sandbox
    then runs everything in-process (a process exit or a segfault then ends the process)."""
    from isolation_suite.execution import sandbox
    from isolation_suite.judging.judge import reference_trace
    from isolation_suite.techniques.triggers import PASS_UPSTREAM
    reference_trace(PASS_UPSTREAM)  # the parent's own backward, as in every judge call
    with sandbox.Sandbox(iso.catalog()["functional_detach"], timeout=60) as probe:
        probe.run(PASS_UPSTREAM, "cpu")
    return sandbox.mode() == "forked child"


def require_fork_sandbox():
    import pytest
    if not fork_sandbox_works():
        from isolation_suite.execution import sandbox
        pytest.skip(f"technique code runs {sandbox.mode()} on this machine")


class _Detaches(iso.Technique):
    """Sound pass-through (the parameters detached), so that only what a subclass adds is wrong."""

    capabilities = PASS

    def call(self, module, args, role):
        if role is iso.Role.PASS_THROUGH:
            return torch.func.functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, args)
        return module(*args)


class LeavesThread(_Detaches):
    """Starts a thread in setup that runs on after the run (until ``stop`` is set)."""

    name = "hostile.leaves_thread"
    stop = None  # a threading.Event, set by the test that made it

    def __init__(self, daemon: bool = True):
        import threading
        self.daemon = daemon
        LeavesThread.stop = threading.Event()

    def setup(self, model, intent):
        import threading
        threading.Thread(target=LeavesThread.stop.wait, args=(60,), name="hostile-worker", daemon=self.daemon).start()


class LeavesGlobalHook(_Detaches):
    """Registers a global module hook (``torch.nn.modules.module.register_module_<kind>``) and never removes it."""

    name = "hostile.leaves_global_hook"

    def __init__(self, kind: str = "forward_hook"):
        self.kind = kind

    def setup(self, model, intent):
        register = getattr(torch.nn.modules.module, f"register_module_{self.kind}")
        register(_quiet_hook)


def _quiet_hook(*args):
    return None


class Prints(_Detaches):
    """Prints in setup, from Python and from the file descriptor, and ``size`` more bytes in lines."""

    name = "hostile.prints"

    def __init__(self, size: int = 0):
        self.size = size

    def setup(self, model, intent):
        print("hello from setup")
        os.write(2, b"written to fd 2\n")
        for _ in range(self.size // 100):
            print("x" * 99)


class OnRank(iso.Technique):
    """A sound freeze that misbehaves in setup on one ddp rank: ``hang``, ``segfault``, or ``kill``
    (SIGKILL to itself)."""

    name = "hostile.on_rank"
    capabilities = frozenset({iso.Capability.FREEZE_MODULE})

    def __init__(self, what: str, rank: int):
        self.what, self.rank = what, rank

    def setup(self, model, intent):
        if torch.distributed.get_rank() == self.rank:
            if self.what == "hang":
                while True:
                    pass
            os.kill(os.getpid(), signal.SIGSEGV if self.what == "segfault" else signal.SIGKILL)
        for path in intent.frozen_modules:
            model.get_submodule(path).requires_grad_(False)

    def make_optimizer(self, model, intent, build):
        return build([p for p in model.parameters() if p.requires_grad])
