"""Hostile techniques cannot pass, hang or poison the judge: in the sandbox and in-process."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import isolation_suite as iso
from isolation_suite.engine.check import search_line
from isolation_suite.execution.sandbox import Sandbox, changes, restore, snapshot
from isolation_suite.techniques.triggers import NAMES_COLLIDE, PASS_UPSTREAM

sys.path.insert(0, str(Path(__file__).parent))
import hostile  # noqa: E402

#: every technique that ends the run; what its verdict must say (sandbox / in-process)
ENDINGS = [
    (hostile.SysExit, "no-crash", "SystemExit: 0 (in forward at step 1"),
    (hostile.RaisesKeyboardInterrupt, "no-crash", "KeyboardInterrupt:  (in forward at step 1"),
    (hostile.RaisesGeneratorExit, "no-crash", "GeneratorExit:  (in forward at step 1"),
    (hostile.BusyLoop, "timeout", "the run took longer than 1s"),
    (hostile.Sleeps, "timeout", "the run took longer than 1s"),
]
#: what only a process boundary can survive
PROCESS_ENDINGS = [
    (hostile.OsExit, "no-crash", "the process exited with code 0 (os._exit or a fatal error) (in forward at step 1"),
    (hostile.Segfault, "no-crash", "the process was killed by signal SIGSEGV (in forward at step 1"),
]


@pytest.mark.parametrize("technique, invariant, message", ENDINGS + PROCESS_ENDINGS,
                         ids=[t.name for t, _, _ in ENDINGS + PROCESS_ENDINGS])
def test_whatever_ends_the_run_is_a_verdict_in_the_sandbox(technique, invariant, message):
    hostile.require_fork_sandbox()
    verdict = iso.check(technique(), PASS_UPSTREAM, timeout=1.0)
    assert verdict.invariants == (invariant,), str(verdict)
    assert verdict.first.message.startswith(message), verdict.first.message


@pytest.mark.parametrize("technique, invariant, message", ENDINGS, ids=[t.name for t, _, _ in ENDINGS])
def test_whatever_ends_the_run_is_a_verdict_in_process_too(technique, invariant, message, monkeypatch):
    monkeypatch.setenv("ISOLATION_SANDBOX", "off")
    verdict = iso.check(technique(), PASS_UPSTREAM, timeout=1.0)
    assert verdict.invariants == (invariant,), str(verdict)
    assert verdict.first.message.startswith(message.replace("killed", "stopped")), verdict.first.message


@pytest.mark.parametrize("sandbox", ["on", "off"])
def test_a_hostile_search_is_caught_without_shrinking_a_hang_and_never_passes(sandbox, monkeypatch):
    monkeypatch.setenv("ISOLATION_SANDBOX", sandbox)
    for technique in (hostile.SysExit(), hostile.RaisesKeyboardInterrupt(), hostile.Sleeps()):
        result = iso.search(technique, max_examples=5, timeout=0.5)
        assert result.failure is not None and result.found_by == "explicit", technique.name
        assert result.failure.first.invariant in ("no-crash", "timeout")


@pytest.mark.parametrize("sandbox", ["on", "off"])
def test_a_leaked_monkeypatch_is_reported_and_does_not_reach_the_next_technique(sandbox, monkeypatch):
    monkeypatch.setenv("ISOLATION_SANDBOX", sandbox)
    linear = F.linear
    verdict = iso.check(hostile.PatchesLinear(), PASS_UPSTREAM)
    leak = next(v for v in verdict.violations if v.invariant == "state-restored")
    assert "torch.nn.functional.linear was replaced" in leak.message
    assert F.linear is linear
    # the next technique still sees the real F.linear: name_substring is caught as before
    after = iso.check(iso.catalog()["name_substring"], NAMES_COLLIDE)
    assert after.first.invariant == "trainable-trains"


@pytest.mark.parametrize("sandbox", ["on", "off"])
def test_backend_flags_are_reported_and_put_back(sandbox, monkeypatch):
    monkeypatch.setenv("ISOLATION_SANDBOX", sandbox)
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    verdict = iso.check(hostile.SetsCudnnFlags(), PASS_UPSTREAM)
    assert verdict.invariants == ("state-restored",)
    assert "torch.backends.cudnn" in verdict.first.message and "changed" in verdict.first.message
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == flags


def test_the_class_cache_a_first_copy_writes_is_not_a_patch_but_a_new_tensor_method_is():
    """``copyreg`` caches ``__slotnames__`` on ``torch.Tensor`` the first time a process pickles a
    tensor (a sandbox child sends a sparse gradient as one): the runs after it leaked nothing."""
    import pickle
    if "__slotnames__" in vars(torch.Tensor):
        del torch.Tensor.__slotnames__
    before = snapshot()
    pickle.dumps(torch.ones(2))
    assert "__slotnames__" in vars(torch.Tensor) and changes(before, snapshot()) == []
    torch.Tensor.isolation_probe = lambda self: self
    try:
        assert changes(before, snapshot()) == ["torch.Tensor.isolation_probe was replaced"]
    finally:
        restore(before, snapshot())
    assert not hasattr(torch.Tensor, "isolation_probe") and "__slotnames__" in vars(torch.Tensor)


def test_snapshot_sees_each_kind_of_global_and_restore_puts_it_back():
    before = snapshot()
    original_relu, original_add = torch.relu, torch.Tensor.add
    try:
        torch.set_grad_enabled(False)
        torch.autograd.set_detect_anomaly(True)
        torch.use_deterministic_algorithms(True)
        torch.relu = lambda x: x
        torch.Tensor.add = lambda self, other: self
        found = changes(before, snapshot())
        assert {"grad mode changed True -> False", "anomaly mode changed False -> True",
                "deterministic algorithms changed False -> True", "torch.relu was replaced",
                "torch.Tensor.add was replaced"} <= set(found)
    finally:
        restore(before, snapshot())
    assert torch.is_grad_enabled() and not torch.is_anomaly_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.relu is original_relu and torch.Tensor.add is original_add
    assert changes(before, snapshot()) == []


def test_a_sound_technique_keeps_one_child_for_the_whole_search():
    hostile.require_fork_sandbox()
    technique = iso.catalog()["functional_detach"]
    with Sandbox(technique, timeout=30) as sandbox:
        first = sandbox.run(PASS_UPSTREAM, "cpu")
        pid = sandbox.pid
        second = sandbox.run(PASS_UPSTREAM, "cpu")
        assert pid is not None and sandbox.pid == pid and first.crash is None
        torch.testing.assert_close(first.steps[-1].params, second.steps[-1].params, rtol=0, atol=0)
    assert sandbox.pid is None  # closed: no child left behind


def test_a_child_that_leaked_is_replaced_by_a_fresh_one():
    hostile.require_fork_sandbox()
    with Sandbox(hostile.PatchesLinear(), timeout=30) as sandbox:
        sandbox.run(PASS_UPSTREAM, "cpu")
        assert sandbox.pid is None  # retired after the leak
        trace = sandbox.run(PASS_UPSTREAM, "cpu")
        assert any("linear was replaced" in leak for _, leak in trace.state_leaks)


def test_the_repro_of_a_hostile_technique_reproduces(tmp_path):
    import subprocess
    from isolation_suite.reporting.repro import write_repro
    script = write_repro(tmp_path / "exit.py", hostile.SysExit(), PASS_UPSTREAM, "cpu", "no-crash: SystemExit")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "no-crash: SystemExit: 0" in run.stdout and "reproduced" in run.stdout


def test_a_process_ended_between_runs_is_a_crash_of_the_next_run():
    hostile.require_fork_sandbox()
    import time
    with Sandbox(hostile.ExitsLaterByAlarm(), timeout=30) as sandbox:
        assert sandbox.run(PASS_UPSTREAM, "cpu").crash is None
        time.sleep(1.0)  # the technique's timer ends the child in the meantime
        trace = sandbox.run(PASS_UPSTREAM, "cpu")
    assert trace.crash is not None and "exited with code 3" in trace.crash.error


def test_a_parent_that_ran_parallel_kernels_does_not_deadlock_its_child():
    """OpenMP's pool does not survive fork; the child must not wait on it (found by a check run)."""
    hostile.require_fork_sandbox()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        big = torch.randn(512, 512)
        (big @ big).sum()  # starts the parent's OpenMP pool
        with Sandbox(iso.catalog()["freeze_and_eval"], timeout=20) as sandbox:
            from isolation_suite.techniques.triggers import FROZEN_BATCHNORM
            trace = sandbox.run(FROZEN_BATCHNORM, "cpu")
        assert trace.crash is None, trace.crash
    finally:
        torch.set_num_threads(threads)


def test_where_a_child_cannot_run_autograd_the_runs_fall_back_in_process(monkeypatch):
    """On a CUDA build, autograd's device threads do not survive fork: the child's first backward
    raises. Made here deterministically: backward raises in any process but this one."""
    from isolation_suite.execution import sandbox as sandbox_mod
    monkeypatch.setattr(sandbox_mod, "_FORK_UNUSABLE", [])
    parent, backward = os.getpid(), torch.Tensor.backward

    def backward_not_after_fork(self, *args, **kwargs):
        if os.getpid() != parent:
            raise RuntimeError("Unable to handle autograd's threading in combination with fork-based multiprocessing.")
        return backward(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "backward", backward_not_after_fork)
    verdict = iso.check(hostile.SysExit(), PASS_UPSTREAM)
    assert verdict.invariants == ("no-crash",) and "SystemExit" in verdict.first.message
    assert sandbox_mod.mode().startswith("in-process (a forked child cannot run autograd here: Unable to handle")
    result = iso.search(iso.catalog()["functional_detach"], max_examples=3)
    assert result.ok and result.sandbox.startswith("in-process")
    assert "; technique code ran in-process (a forked child cannot run autograd" in search_line(result)


def test_every_run_uses_one_thread_whatever_the_caller_set():
    """Technique (sandboxed or not) and reference must round alike: one thread for every run."""
    from isolation_suite.execution.reference import Reference
    from isolation_suite.execution.runner import run

    class Recording(Reference):
        def setup(self, model, intent):
            self.threads = torch.get_num_threads()
            super().setup(model, intent)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        driver = Recording()
        run(PASS_UPSTREAM, driver)
        assert driver.threads == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
