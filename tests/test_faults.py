"""Faults found in review: what a technique leaves behind (threads, global hooks, output, ddp stores), user
factories that hang or return meta tensors, and processes that outlive the one that started them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.nn.modules import module as torch_module

import isolation_suite as iso
from isolation_suite.execution import sandbox as sandbox_mod
from isolation_suite.execution.sandbox import Sandbox
from isolation_suite.model.factory import ModelFactoryError, factory_name, factory_tree, make
from isolation_suite.techniques.triggers import DDP_FROZEN, PASS_UPSTREAM

sys.path.insert(0, str(Path(__file__).parent))
import hostile  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent


def _gone(pid: int) -> bool:
    """Ended: no such process, or a zombie nobody has reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


def _wait_for_file(path: Path, seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} was never written")


# --- 1. a thread left running is a state leak ---------------------------------------------------

@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "non-daemon"])
@pytest.mark.parametrize("sandbox", ["on", "off"])
def test_a_thread_left_running_is_a_state_leak(sandbox, daemon, monkeypatch):
    monkeypatch.setenv("ISOLATION_SANDBOX", sandbox)
    technique = hostile.LeavesThread(daemon)
    try:
        verdict = iso.check(technique, PASS_UPSTREAM)
    finally:
        hostile.LeavesThread.stop.set()  # in-process, the thread is this process's
    assert verdict.invariants == ("state-restored",), str(verdict)
    assert "thread 'hostile-worker' was left running" in verdict.first.message
    assert ("(daemon)" in verdict.first.message) == daemon


def test_a_child_that_left_a_thread_is_retired():
    hostile.require_fork_sandbox()
    with Sandbox(hostile.LeavesThread(), timeout=30) as sandbox:
        trace = sandbox.run(PASS_UPSTREAM, "cpu")
        assert sandbox.pid is None  # the thread went with the child
    assert any("thread 'hostile-worker' was left running" in leak for _, leak in trace.state_leaks)


def test_a_timer_left_behind_is_caught_at_the_run_that_started_it():
    """Found by the old sandbox test: the timer ended the child only between runs."""
    hostile.require_fork_sandbox()
    with Sandbox(hostile.ExitsLater(), timeout=30) as sandbox:
        trace = sandbox.run(PASS_UPSTREAM, "cpu")
    assert trace.crash is None and any("was left running" in leak for _, leak in trace.state_leaks)


def test_threads_the_harness_and_torch_start_are_not_the_techniques():
    before = sandbox_mod.snapshot()
    from isolation_suite.execution.lifetime import harness_thread
    stop = threading.Event()
    ours = harness_thread(threading.Thread(target=stop.wait, args=(30,), daemon=True))
    ours.start()
    try:
        assert sandbox_mod.changes(before, sandbox_mod.snapshot()) == []
    finally:
        stop.set()


# --- 2. a global module hook left registered is a state leak ------------------------------------

#: torch.nn.modules.module.register_module_<kind> -> what the leak's line calls it
HOOK_KINDS = {"forward_hook": "global module forward hook", "forward_pre_hook": "global module forward pre-hook",
              "full_backward_hook": "global module backward hook",
              "full_backward_pre_hook": "global module backward pre-hook",
              "module_registration_hook": "global module registration hook",
              "parameter_registration_hook": "global parameter registration hook",
              "buffer_registration_hook": "global buffer registration hook"}


def _global_hooks() -> dict:
    return {name: dict(getattr(torch_module, name)) for name in vars(torch_module) if name.startswith("_global_")
            and isinstance(getattr(torch_module, name), dict)}


@pytest.mark.parametrize("kind", HOOK_KINDS)
@pytest.mark.parametrize("sandbox", ["on", "off"])
def test_a_global_module_hook_left_registered_is_a_state_leak_and_is_removed(sandbox, kind, monkeypatch):
    monkeypatch.setenv("ISOLATION_SANDBOX", sandbox)
    hooks = _global_hooks()
    verdict = iso.check(hostile.LeavesGlobalHook(kind), PASS_UPSTREAM)
    assert verdict.invariants == ("state-restored",), str(verdict)
    assert f"{HOOK_KINDS[kind]} _quiet_hook was left registered" in verdict.first.message, verdict.first.message
    assert _global_hooks() == hooks  # in-process: taken out again


def test_a_hook_the_technique_removes_is_no_leak():
    before = sandbox_mod.snapshot()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    found = sandbox_mod.changes(before, sandbox_mod.snapshot())
    handle.remove()
    assert len(found) == 1 and found[0].startswith("global module forward hook test_a_hook")
    assert found[0].endswith("<lambda> was left registered")
    assert sandbox_mod.changes(before, sandbox_mod.snapshot()) == []


# --- 3. what the technique prints is labelled ---------------------------------------------------

def test_what_the_technique_prints_is_labelled_on_stderr(capsys):
    hostile.require_fork_sandbox()
    capsys.readouterr()
    with Sandbox(hostile.Prints(), timeout=30) as sandbox:
        assert sandbox.run(PASS_UPSTREAM, "cpu").crash is None
    out, err = capsys.readouterr()
    assert "[technique hostile.prints] hello from setup\n" in err
    assert "[technique hostile.prints] written to fd 2\n" in err  # file descriptor 2: C code's too
    assert "hello" not in out and "written" not in out


def test_a_technique_printing_without_end_is_cut_at_the_cap_and_never_blocks(capsys):
    hostile.require_fork_sandbox()
    capsys.readouterr()
    with Sandbox(hostile.Prints(size=1 << 20), timeout=30) as sandbox:  # 1 MB: 16 pipe buffers
        assert sandbox.run(PASS_UPSTREAM, "cpu").crash is None
        assert sandbox.run(PASS_UPSTREAM, "cpu").crash is None  # the cap is per search, not per run
    err = capsys.readouterr().err
    assert err.count("more output dropped: over 64 KB") == 1
    label = "[technique hostile.prints] "
    lines = err.splitlines()
    assert all(line.startswith(label) for line in lines)
    shown = sum(len(line) - len(label) + 1 for line in lines[:-1])  # the technique's bytes, but the note
    assert sandbox_mod.OUTPUT_CAP - 100 < shown <= sandbox_mod.OUTPUT_CAP + 1


# --- 4. a ddp run leaves no store folder, however it ends ---------------------------------------

@pytest.mark.parametrize("what, rank", [("hang", 0), ("segfault", 0), ("kill", 0), ("kill", 1)],
                         ids=["rank-0-timeout", "rank-0-segfault", "rank-0-killed", "rank-1-killed"])
def test_a_ddp_run_leaves_no_store_behind(what, rank, tmp_path, monkeypatch):
    hostile.require_fork_sandbox()
    import dataclasses
    import tempfile
    from isolation_suite.execution import modes
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # the sandbox waits a grace past the timeout for a ddp run: a short one, for a short test
    monkeypatch.setattr(sandbox_mod, "mode_info", lambda mode: dataclasses.replace(modes.info(mode), grace=0.2))
    with Sandbox(hostile.OnRank(what, rank), timeout=1.0) as sandbox:
        trace = sandbox.run(DDP_FROZEN, "cpu")
    assert trace.crash is not None and trace.crash.phase == "setup", trace.crash
    assert trace.crash.timed_out == (what == "hang")
    assert list(tmp_path.glob("isolation-ddp-*")) == []


# --- 5 and 6. user factories: bounded, and real tensors only ------------------------------------

def _hangs():
    time.sleep(30)


def _meta_inputs():
    return torch.nn.Linear(2, 2), torch.randn(3, 2, device="meta")


def _meta_parameters():
    with torch.device("meta"):
        model = torch.nn.Linear(2, 2)
    return model, torch.randn(3, 2)


def test_a_factory_that_hangs_is_one_line_within_its_limit():
    name = factory_name(_hangs)
    started = time.monotonic()
    with pytest.raises(ModelFactoryError) as info:
        factory_tree(name, limit=1.0)
    assert time.monotonic() - started < 5
    assert str(info.value) == f"model factory {name!r} did not return within 1 s"


def test_the_factory_limit_leaves_an_outer_alarm_as_it_was():
    """An in-process run's timeout alarm is running when the run builds the model: it must survive."""
    fired = []

    def outer(signum, frame):
        fired.append(signum)
    previous = signal.signal(signal.SIGALRM, outer)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30)
        make("isolation_suite.zoo:siamese", 0, limit=10)
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 25 < left <= 30 and not fired
        assert signal.getsignal(signal.SIGALRM) is outer
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("factory, what", [(_meta_inputs, "inputs"), (_meta_parameters, "parameters")])
def test_a_factory_returning_meta_tensors_is_one_line(factory, what):
    name = factory_name(factory)
    with pytest.raises(ModelFactoryError) as info:
        factory_tree(name)
    assert str(info.value) == f"model factory {name!r} returned {what} on the meta device; give real tensors"


class _TwoLayers(torch.nn.Module):
    """Two layers whose output ``finish`` turns into what a broken model returns."""

    def __init__(self, finish):
        super().__init__()
        self.a, self.b, self.finish = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), finish

    def forward(self, x):
        return self.finish(self.b(torch.tanh(self.a(x))))


def _two(finish, loss=None):
    def factory():
        made = (_TwoLayers(finish), (torch.randn(2, 3),))
        return made if loss is None else (*made, loss)
    return factory


@pytest.mark.parametrize("factory, says", [
    (_two(lambda y: y.argmax(-1)), "does not run on its example inputs: ValueError: the model's output has no "
                                   "floating-point tensor to train on (Tensor)"),
    (_two(lambda y: {"label": "cat"}), "no floating-point tensor to train on (dict)"),
    (_two(lambda y: y, loss=lambda out, target: 1 / 0), "does not run on its example inputs: ZeroDivisionError"),
    (_two(lambda y: y, loss=lambda out, target: 3.0), "the loss of its example inputs is float; expected a "
                                                       "floating-point tensor with one element"),
    (_two(lambda y: y, loss=lambda out, target: (out - target[0]) ** 2), "the loss of its example inputs is a "
                                                                         "torch.float32 tensor of shape [2, 3]"),
    (_two(lambda y: y * float("nan")), "the loss of its example inputs is nan before any training"),
])
def test_a_model_whose_output_or_loss_cannot_be_trained_on_is_one_line(factory, says):
    """Before any search: a run of such a model fails in the reference too, and an output of NaN would
    match the reference's NaN, so every verdict would hold."""
    name = factory_name(factory)
    with pytest.raises(ModelFactoryError) as info:
        factory_tree(name)
    assert says in str(info.value) and "\n" not in str(info.value)


# --- 7 and 8. nothing outlives the process that started it --------------------------------------

def _python(code: str, extra_env: dict | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
           **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, **kwargs)


def _dies_with(parent: subprocess.Popen, pid_file) -> int:
    """Kill ``parent`` (SIGKILL) once the process it started has written its pid to ``pid_file``;
    assert that process is gone within 3 s; its pid."""
    try:
        pid = int(_wait_for_file(pid_file))
        parent.kill()
        parent.wait()
        assert _wait_gone(pid, 3.0)
        return pid
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.parametrize("fallback", [False, True], ids=["prctl", "polling"])
def test_a_process_that_asked_to_dies_with_its_parent(fallback, tmp_path):
    pid_file = tmp_path / "child"
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import os, time
        from isolation_suite.execution import lifetime
        if {fallback}:
            lifetime._pdeathsig = lambda: False
        lifetime.exit_with_parent()
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
    """))
    parent = _python(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, {str(child)!r}])
        time.sleep(60)
    """)
    _dies_with(parent, pid_file)


def test_a_sandbox_child_dies_with_the_process_that_forked_it(tmp_path):
    """A worker killed mid-run (SIGKILL, or a fuzz run stopped) leaves no technique running on."""
    pid_file = tmp_path / "child"
    parent = _python(f"""
        import os, time
        import isolation_suite as iso
        from isolation_suite.execution.sandbox import Sandbox
        from isolation_suite.techniques.triggers import PASS_UPSTREAM

        class Hangs(iso.Technique):
            name = "hangs"
            capabilities = frozenset({{iso.Capability.PASS_THROUGH}})

            def setup(self, model, intent):
                open({str(pid_file)!r}, "w").write(str(os.getpid()))
                time.sleep(60)

        Sandbox(Hangs(), timeout=60).run(PASS_UPSTREAM, "cpu")
    """)
    assert _dies_with(parent, pid_file) != parent.pid


def _busy_test(tmp_path):
    """A test that writes its worker's pid to a file and then sleeps: (the pid file, the test file)."""
    pid_file = tmp_path / "worker"
    test_file = tmp_path / "test_busy.py"
    test_file.write_text(textwrap.dedent(f"""
        import os, time

        def test_busy():
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            time.sleep(60)
    """))
    return pid_file, test_file


def test_sigterm_ends_an_xdist_run_at_once_when_the_controller_ends_its_workers(tmp_path):
    """xdist waits 10 s for a busy worker to finish its item before it kills it, twice over; the
    fuzz controller's SIGTERM handler ends its workers first (``lifetime.end_children``)."""
    pid_file, test_file = _busy_test(tmp_path)
    controller = _python(f"""
        import signal, sys
        import pytest
        from isolation_suite.execution.lifetime import end_children

        def on_sigterm(signum, frame):  # what cli.py's fuzz does on SIGTERM
            end_children()
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_sigterm)
        sys.exit(pytest.main(["-p", "xdist.plugin", "-n", "1", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                              "--rootdir", {str(tmp_path)!r}, {str(test_file)!r}]))
    """, extra_env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        worker = int(_wait_for_file(pid_file))
        started = time.monotonic()
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(timeout=30) == pytest.ExitCode.INTERRUPTED
        assert time.monotonic() - started < 3.0
        assert _wait_gone(worker, 1.0)
    finally:
        controller.kill()
        controller.wait()


def test_an_xdist_worker_that_asked_to_dies_with_its_controller(tmp_path):
    """What the plug-in does in each xdist worker: a fuzz controller killed (SIGKILL) leaves no worker
    running its item on for nobody."""
    pid_file, test_file = _busy_test(tmp_path)
    (tmp_path / "dies_with_controller.py").write_text(textwrap.dedent("""
        from isolation_suite.execution.lifetime import exit_with_parent

        def pytest_configure(config):
            if hasattr(config, "workerinput"):
                exit_with_parent()
    """))
    controller = _python(f"""
        import sys
        import pytest
        sys.exit(pytest.main(["-p", "xdist.plugin", "-p", "dies_with_controller", "-n", "1", "-q",
                              "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", {str(tmp_path)!r},
                              {str(test_file)!r}]))
    """, extra_env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path), os.environ.get("PYTHONPATH", "")])},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        worker = int(_wait_for_file(pid_file))
        controller.kill()
        controller.wait()
        assert _wait_gone(worker, 3.0)
    finally:
        controller.kill()
        controller.wait()
