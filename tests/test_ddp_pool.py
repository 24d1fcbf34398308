"""The ddp mode's pool: rank 1 and the process group serve many runs, never changing a verdict, and are
retired on any fault (see ``execution.ddp``)."""
import dataclasses
import glob
import os
import random
import threading
import time

import numpy
import pytest
import torch
import torch.distributed as dist

import isolation_suite as iso
from isolation_suite.execution import ddp
from isolation_suite.execution.sandbox import Sandbox, run_in_process
from isolation_suite.judging.judge import judge
from isolation_suite.spec.scenario import Mode, Scenario
from isolation_suite.techniques import in_mode, triggers

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the ddp mode forks its second rank")

FreezeAndEval = type(iso.catalog()["freeze_and_eval"])
FROZEN = triggers.DDP_FROZEN  # 2 steps, DDP's defaults, batch 6


def ddp_mode(scenario: Scenario, **options) -> Scenario:
    return dataclasses.replace(in_mode(scenario, "ddp"), mode=Mode("ddp", **options))


#: what a run judged after others must come out as when judged first: dropout, two micro-batches, an input
#: that needs gradient, DDP looking for unused parameters
TARGET = dataclasses.replace(ddp_mode(triggers.FROZEN_DROPOUT, find_unused=True), micro_batches=2,
                             data=dataclasses.replace(ddp_mode(triggers.FROZEN_DROPOUT).data, input_requires_grad=True))
#: runs of every kind before it: other models, options, step counts and dtypes
OTHERS = (FROZEN, triggers.DDP_FROZEN_ONE_STEP, ddp_mode(triggers.FROZEN_LINEAR, static_graph=True),
          dataclasses.replace(TARGET, dtype="float64"), ddp_mode(triggers.FROZEN_ONE_CYCLE),
          ddp_mode(triggers.FROZEN_DROPOUT), dataclasses.replace(FROZEN, init_seed=FROZEN.init_seed + 1))


class Probe(FreezeAndEval):
    """freeze_and_eval that notes rank 1's pid in every run (file ``rank1``) and misbehaves as the file
    ``what`` says when a run starts: on rank 1 ``raise``, ``exit``, ``hang``, ``flag`` (a global
    changed) or ``thread`` (one left running); ``extra``: rank 0 issues a collective of its own after
    the second step, when rank 1 has finished."""

    name = "pool_probe"

    def __init__(self, folder):
        self.folder = str(folder)

    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def setup(self, model, intent):
        path = os.path.join(self.folder, "what")
        self.doing, self.steps = (open(path).read().strip() if os.path.exists(path) else ""), 0
        if self.rank() == 1 and isinstance(model, torch.nn.Module):
            with open(os.path.join(self.folder, "rank1"), "a") as f:
                f.write(f"{os.getpid()}\n")
            if self.doing == "raise":
                raise ValueError("only rank 1 fails")
            if self.doing == "exit":
                os._exit(3)
            if self.doing == "hang":
                while True:
                    pass
            if self.doing == "flag":
                torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
            if self.doing == "thread":
                threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        super().setup(model, intent)

    def after_step(self, model, optimizer):
        self.steps += 1
        if self.doing == "extra" and self.steps == 2 and self.rank() == 0:
            dist.all_reduce(torch.ones(1))

    def rank_ones(self) -> list[int]:
        path = os.path.join(self.folder, "rank1")
        return [int(line) for line in open(path).read().split()] if os.path.exists(path) else []


class Noisy(Probe):
    """Scales the frozen module's output by a factor drawn in setup from torch's generator (which the
    runner puts back after every run, so every run draws the same)."""

    name = "pool_noisy"

    def setup(self, model, intent):
        super().setup(model, intent)
        self.scale = 1.0 + 1e-3 * torch.rand(()).item()

    def call(self, module, args, role):
        out = module(*args)
        return out * self.scale if isinstance(out, torch.Tensor) else out


class Draws(Probe):
    """Notes what each rank draws from torch's, Python's and numpy's generators in setup (file ``draws``)."""

    name = "pool_draws"

    def setup(self, model, intent):
        drawn = (torch.rand(()).item(), random.random(), float(numpy.random.rand()))
        with open(os.path.join(self.folder, "draws"), "a") as f:
            f.write(f"{self.rank()} {drawn}\n")
        super().setup(model, intent)


@pytest.fixture(autouse=True)
def no_pool_left():
    yield
    ddp.retire_pool()  # an in-process test's pool, in this worker


def assert_same_trace(a, b):
    assert a.crash is None and b.crash is None, (a.crash, b.crash)
    assert a.state_leaks == b.state_leaks and len(a.steps) == len(b.steps)
    for mine, theirs in zip(a.steps, b.steps):
        for name in ("losses", "input_grads"):
            assert len(getattr(mine, name)) == len(getattr(theirs, name))
            for x, y in zip(getattr(mine, name), getattr(theirs, name)):
                assert (x is None and y is None) or torch.equal(x, y), name
        for name in ("params", "grads", "buffers"):
            x, y = getattr(mine, name), getattr(theirs, name)
            assert x.keys() == y.keys(), name
            assert all((x[k] is None and y[k] is None) or torch.equal(x[k], y[k]) for k in x), name


# --- order independence ----------------------------------------------------------------------------

def test_a_run_in_a_warm_pool_gives_the_trace_of_a_run_in_a_fresh_one(tmp_path):
    technique = Noisy(tmp_path)
    with Sandbox(technique) as fresh:
        first = fresh.run(TARGET, "cpu")
    assert len(technique.rank_ones()) == 1
    with Sandbox(technique) as warm:
        for scenario in OTHERS:
            assert warm.run(scenario, "cpu").crash is None
        child = warm.pid
        again = warm.run(TARGET, "cpu")
        assert warm.pid == child  # the sandbox's child served every run
    pids = technique.rank_ones()[1:]
    assert len(pids) == len(OTHERS) + 1 and len(set(pids)) == 1  # and so did one rank 1
    assert_same_trace(first, again)


def test_the_pool_gives_the_traces_it_gives_without_it(tmp_path, monkeypatch):
    technique = Noisy(tmp_path)
    with Sandbox(technique) as sandbox:
        pooled = [sandbox.run(s, "cpu") for s in (TARGET, *OTHERS[:3], TARGET)]
    monkeypatch.setenv(ddp.POOL_ENV, "off")
    with Sandbox(technique) as sandbox:
        fresh = []
        for s in (TARGET, *OTHERS[:3], TARGET):
            fresh.append(sandbox.run(s, "cpu"))
            assert sandbox.pid is None  # without the pool, the child is retired after every ddp run
    for a, b in zip(pooled, fresh):
        assert_same_trace(a, b)
    pids = technique.rank_ones()
    assert len(set(pids[:5])) == 1 and len(set(pids[5:])) == 5


def test_rank_one_draws_what_rank_zero_draws_however_the_caller_moved_the_generators(tmp_path):
    """In-process, the caller's own draws between runs move rank 0's generators only: rank 1 gets their
    states with the work, as a fresh fork would have inherited them."""
    technique = Draws(tmp_path)
    for i in range(4):
        torch.rand(i + 1), random.random(), numpy.random.rand(i + 1)
        assert run_in_process(technique, FROZEN, "cpu", 60).crash is None
    assert len(technique.rank_ones()) == 4 and len(set(technique.rank_ones())) == 1
    lines = [line.split(" ", 1) for line in open(tmp_path / "draws").read().splitlines()]
    by_rank = {rank: [eval(drawn) for r, drawn in lines if r == rank] for rank in "01"}  # noqa: S307
    # torch's and numpy's as rank 0's (Python's ``random`` is reseeded in a forked child, as ever)
    same = {rank: [(t, n) for t, _, n in drawn] for rank, drawn in by_rank.items()}
    assert len(same["0"]) == 4 and same["0"] == same["1"]
    assert len(set(same["0"])) == 4  # the caller's draws did move them


# --- what a pool serves, and when it is retired -------------------------------------------------------

def test_in_process_the_pool_is_kept_per_technique_and_retired_cleanly(tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a, b = Probe(tmp_path / "a"), Probe(tmp_path / "b")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    for _ in range(3):
        assert run_in_process(a, FROZEN, "cpu", 60).crash is None
    assert len(set(a.rank_ones())) == 1 and len(glob.glob(str(tmp_path / "isolation-ddp-*"))) == 1
    assert run_in_process(b, FROZEN, "cpu", 60).crash is None  # another technique: another pool
    assert run_in_process(a, FROZEN, "cpu", 60).crash is None
    assert len(set(a.rank_ones())) == 2
    a.ddp_wrap = "before_setup"  # rebound between runs (and wrapped otherwise): a fresh rank 1
    static = ddp_mode(triggers.FROZEN_LINEAR, static_graph=True)  # freezing after wrapping is sound there
    assert run_in_process(a, static, "cpu", 60).crash is None
    assert run_in_process(a, static, "cpu", 60).crash is None
    pids = a.rank_ones()
    assert len(set(pids)) == 3 and pids[-1] == pids[-2]
    ddp.retire_pool()
    assert not dist.is_initialized() and glob.glob(str(tmp_path / "isolation-ddp-*")) == []
    assert not os.path.exists(f"/proc/{pids[-1]}")  # killed and reaped


def test_another_run_of_the_technique_in_between_means_a_fresh_rank_one(tmp_path):
    """Rank 1's copy of the technique must have run what rank 0's ran: an eager run of the same
    child in between forks rank 1 afresh."""
    technique = Probe(tmp_path)
    with Sandbox(technique) as sandbox:
        for scenario in (FROZEN, FROZEN, in_mode(triggers.FROZEN_LINEAR, "eager"), FROZEN):
            assert sandbox.run(scenario, "cpu").crash is None
    pids = technique.rank_ones()
    assert len(pids) == 3 and pids[0] == pids[1] != pids[2]


@pytest.mark.parametrize("what, message", [("raise", "ValueError: only rank 1 fails (on rank 1)"),
                                           ("exit", "rank 1 exited with code 3"),
                                           ("hang", "rank 1 took longer than the timeout and was killed")])
def test_a_fault_in_a_warm_pool_is_todays_verdict_and_the_next_run_gets_a_fresh_pool(what, message, tmp_path):
    technique = Probe(tmp_path)
    with Sandbox(technique, timeout=3) as sandbox:
        assert judge(technique, FROZEN, sandbox=sandbox).ok
        assert judge(technique, FROZEN, sandbox=sandbox).ok
        warm = sandbox.pid
        (tmp_path / "what").write_text(what)
        verdict = judge(technique, FROZEN, sandbox=sandbox)
        assert verdict.invariants == ("timeout" if what == "hang" else "no-crash",), str(verdict)
        assert message in verdict.first.message and "setup" in verdict.first.message
        (tmp_path / "what").write_text("")
        assert judge(technique, FROZEN, sandbox=sandbox).ok
        assert sandbox.pid != warm  # the child that held the retired group was retired too
    before, faulty, after = technique.rank_ones()[1], technique.rank_ones()[2], technique.rank_ones()[3:]
    assert before == faulty and after and faulty not in after
    assert not os.path.exists(f"/proc/{faulty}")


@pytest.mark.parametrize("what", ["flag", "thread"])
def test_a_global_changed_on_rank_one_retires_the_pool_without_a_verdict(what, tmp_path):
    """Rank 1's globals were never judged (it exited after every run): they still are not, but a rank 1
    whose globals changed serves no further run."""
    technique = Probe(tmp_path)
    with Sandbox(technique) as sandbox:
        assert judge(technique, FROZEN, sandbox=sandbox).ok
        (tmp_path / "what").write_text(what)
        assert judge(technique, FROZEN, sandbox=sandbox).ok
        (tmp_path / "what").write_text("")
        assert judge(technique, FROZEN, sandbox=sandbox).ok
        assert judge(technique, FROZEN, sandbox=sandbox).ok
    pids = technique.rank_ones()
    assert pids[0] == pids[1] != pids[2] == pids[3]


def test_rank_zero_waiting_on_a_finished_rank_one_is_released_at_once(tmp_path):
    """A rank 1 that finished cleanly stays for the next run; rank 0 issuing a collective it will never
    join is still released at once (it was when rank 1 exited after every run), with the same verdict."""
    technique = Probe(tmp_path)
    with Sandbox(technique, timeout=30) as sandbox:
        assert sandbox.run(FROZEN, "cpu").crash is None
        (tmp_path / "what").write_text("extra")
        started = time.monotonic()
        crash = sandbox.run(FROZEN, "cpu").crash
        assert time.monotonic() - started < 10
    assert crash is not None and not crash.timed_out and (crash.step, crash.phase) == (2, "after_step"), crash
    assert "Connection closed by peer" in crash.error


def test_a_sandbox_closed_with_a_warm_pool_leaves_no_store_and_no_rank_one(tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    technique = Probe(tmp_path)
    with Sandbox(technique) as sandbox:
        assert sandbox.run(FROZEN, "cpu").crash is None
        assert sandbox.run(FROZEN, "cpu").crash is None
        assert len(glob.glob(str(tmp_path / "isolation-ddp-*"))) == 1
    assert glob.glob(str(tmp_path / "isolation-ddp-*")) == []
    pid = technique.rank_ones()[-1]
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] == "Z"


def test_a_child_forked_from_a_process_with_a_pool_forgets_it_and_makes_its_own(tmp_path):
    (tmp_path / "here").mkdir()
    (tmp_path / "child").mkdir()
    here, there = Probe(tmp_path / "here"), Probe(tmp_path / "child")
    assert run_in_process(here, FROZEN, "cpu", 60).crash is None  # a pool in this process
    with Sandbox(there) as sandbox:  # forked with this process's group registered
        assert sandbox.run(FROZEN, "cpu").crash is None
        assert sandbox.run(FROZEN, "cpu").crash is None
    assert run_in_process(here, FROZEN, "cpu", 60).crash is None  # this process's rank 1 was left alone
    assert len(set(here.rank_ones())) == 1 and len(set(there.rank_ones())) == 1


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/schedstat"), reason="reads /proc/PID/schedstat")
def test_a_ddp_runs_cpu_time_counts_its_rank_one_live_and_reaped(tmp_path, monkeypatch):
    """What a sandbox child reports as its CPU time (benchmarks add it up) includes its ranks':
    the pool's rank 1 while it lives, and once it is retired and reaped."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    probe = Probe(tmp_path)
    ddp.retire_pool()
    before = ddp.ranks_cpu()
    assert run_in_process(probe, FROZEN, "cpu", 60).crash is None
    (rank_one,) = set(probe.rank_ones())
    with open(f"/proc/{rank_one}/schedstat") as stat:
        its_own = int(stat.read().split()[0]) / 1e9
    assert its_own > 0 and ddp.ranks_cpu() - before >= its_own - 1e-6
    ddp.retire_pool()
    assert ddp.ranks_cpu() - before >= its_own - 0.01  # moved into the reaped children's, not lost
