"""The ``compile`` mode's cost cuts change no trace and no verdict: the harness's operation-free frames
run untraced (``modes.OPERATION_FREE_FRAMES``), and Dynamo's cache is kept across runs without what
would make a run depend on the runs before it (``modes.CACHE_ACROSS_RUNS``): Dynamo's per-code
decisions are undone after each run and no recompile limit is reached."""
import contextlib
import dataclasses
import os

import pytest
import torch

import isolation_suite as iso
from isolation_suite.execution import devices, modes
from isolation_suite.execution.runner import TechniqueDriver, run
from isolation_suite.execution.sandbox import Sandbox
from isolation_suite.execution.trace import Trace
from isolation_suite.judging.judge import clear_reference_cache, judge
from isolation_suite.model.build import Block
from isolation_suite.model.factory import build
from isolation_suite.spec.scenario import Intent, Mode, Op, OptimizerRecipe
from isolation_suite.techniques import in_mode, triggers

convert_frame = pytest.importorskip("torch._dynamo.convert_frame")


class PerRunFactor(iso.Technique):
    """Freezes with ``requires_grad_(False)`` and scales every intercepted call's output by a factor
    set in ``setup`` from the run's model: per-run state that the compiled ``call`` reads (Dynamo
    guards on it). A graph kept from another run would scale by that run's factor."""

    name = "test.per_run_factor"
    capabilities = frozenset({iso.Capability.FREEZE_MODULE})

    def setup(self, model, intent):
        self.factor = 1.0 + 0.25 * sum(1 for _ in model.parameters())
        for path in intent.frozen_modules:
            model.get_submodule(path).requires_grad_(False)

    def call(self, module, args, role, kwargs):
        return module(*args, **kwargs) * self.factor


#: compiled scenarios of every capability; the first four freeze modules (``PerRunFactor``'s)
SCENARIOS = [in_mode(s, "compile") for s in (
    triggers.FROZEN_DROPOUT, triggers.FROZEN_BATCHNORM, triggers.FROZEN_LINEAR, triggers.THAW,
    triggers.PASS_UPSTREAM, triggers.ELEMENTS_PLAIN, triggers.REPARAM_LINEAR)]
#: the technique each scenario is run with
TECHNIQUES = ["freeze_and_eval", "requires_grad_false", PerRunFactor(), "unfreeze_add_param_group",
              "functional_detach", "parametrize_where", "weight_dropout"]


def technique(spec):
    return iso.catalog()[spec] if isinstance(spec, str) else spec


def flat(trace: Trace) -> list:
    """Everything a trace recorded, in order: tensors and the rest."""
    out = [trace.initial_params, trace.initial_buffers, trace.unreachable, trace.crash, trace.state_leaks,
           trace.aliases, trace.input_sizes]
    for step in trace.steps:
        out += [step.losses, step.input_grads, step.grads, step.params, step.buffers, step.requires_grad,
                step.loss_without_grad]
    return out


def assert_same(a, b, where="trace"):
    """Bitwise equal: tensors by ``torch.equal`` (dtype and shape too), everything else by ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(autouse=True)
def cache_owned(monkeypatch):
    """This process keeps Dynamo's cache across compiled runs, as a sandbox child does
    (``modes.own_compile_cache``)."""
    monkeypatch.setattr(modes, "_cache_owner", [os.getpid()])


def compiled_run(scenario, spec, skip: bool = True, fresh: bool = True):
    """One run in this process; ``skip``: ``UNTRACED_HARNESS_FRAMES``; ``fresh``: from an empty Dynamo
    cache, else with what the runs before it compiled. Returns the trace, the graphs Dynamo compiled
    and which of :data:`WATCHED` it was handed a frame of (in this run only where ``fresh``)."""
    saved = modes.UNTRACED_HARNESS_FRAMES
    modes.UNTRACED_HARNESS_FRAMES = skip
    if fresh:
        torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        trace = run(scenario, TechniqueDriver(technique(spec)))
    finally:
        modes.UNTRACED_HARNESS_FRAMES = saved
    return (trace, torch._dynamo.utils.counters["stats"]["unique_graphs"],
            {code for code in WATCHED() if code in convert_frame.input_codes})


def WATCHED() -> list:
    """The harness's frames that may run untraced, and ``PerRunFactor.call``."""
    return modes.operation_free_codes() + [Block.forward.__code__, PerRunFactor.call.__code__]


def test_the_operation_free_frames_are_the_harness_functions_named():
    codes = modes.operation_free_codes()
    assert [c.co_name for c in codes] == [n.rpartition(".")[2].rpartition(":")[2] for n in modes.OPERATION_FREE_FRAMES]
    assert all(c.co_filename.endswith(("build.py", "tree.py", "runner.py", "technique.py")) for c in codes)


@pytest.mark.parametrize("index", range(len(SCENARIOS)), ids=lambda i: str(TECHNIQUES[i]).split(" ")[0])
def test_skipping_the_operation_free_frames_changes_no_trace_and_no_graph(index):
    """The same run with the harness's frames traced (as before) and untraced: bitwise the same
    trace, and the same graphs compiled (the technique's and the layers' code is still compiled)."""
    scenario, spec = SCENARIOS[index], TECHNIQUES[index]
    before, graphs_before, seen_before = compiled_run(scenario, spec, skip=False)
    after, graphs_after, seen_after = compiled_run(scenario, spec, skip=True)
    assert before.crash is None
    assert_same(flat(before), flat(after))
    assert graphs_after == graphs_before
    own = set(modes.untraced_codes(build(scenario).model))
    assert own & seen_before and not own & seen_after  # traced before, run as plain Python now


def test_a_block_that_calls_no_module_keeps_its_forward_traced_whatever_ran_before():
    """``Block.forward`` runs untraced only where every Block calls a module (Dynamo gives that frame
    up anyway); a Block that calls none is compiled, even right after a run that skipped it."""
    callless = Block((Op("act", "tanh"), Op("act", "relu")), frozenset(), frozenset())
    assert modes.calls_in_every_loop(build(SCENARIOS[2]).model)
    assert not modes.calls_in_every_loop(torch.nn.Sequential(build(SCENARIOS[2]).model, callless))
    compiled_run(SCENARIOS[2], "freeze_and_eval")  # marks Block.forward
    torch._dynamo.utils.counters.clear()
    modes.compile_target(callless, Mode("compile"))
    callless(torch.randn(2, 3, requires_grad=True)).sum().backward()
    assert Block.forward.__code__ in convert_frame.input_codes
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_the_technique_code_is_still_compiled():
    """``PerRunFactor.call`` multiplies after the module's call: Dynamo compiles that into a graph."""
    _, graphs, seen = compiled_run(SCENARIOS[0], PerRunFactor())
    assert graphs >= 1 and PerRunFactor.call.__code__ in seen


def test_a_compiled_run_is_the_same_after_other_compiled_runs_in_the_process():
    """Order independence, bitwise: every scenario run from an empty Dynamo cache records the same
    trace as when it runs with the cache the runs before it left, in one order and in the other
    (``PerRunFactor`` with other factors among them: a graph reused from another run would scale by
    that run's factor)."""
    runs = list(zip(SCENARIOS, TECHNIQUES)) + [(SCENARIOS[2], TECHNIQUES[2])]  # PerRunFactor, another factor
    alone = [compiled_run(scenario, spec)[0] for scenario, spec in runs]
    torch._dynamo.reset()
    after_others = [compiled_run(scenario, spec, fresh=False)[0] for scenario, spec in runs]
    in_reverse = [compiled_run(scenario, spec, fresh=False)[0] for scenario, spec in reversed(runs)][::-1]
    assert all(trace.crash is None for trace in alone)
    for i, trace in enumerate(alone):
        assert_same(flat(trace), flat(after_others[i]), f"run {i} after the others")
        assert_same(flat(trace), flat(in_reverse[i]), f"run {i} in reverse")


def scale(x, factor):
    return x * factor


def compiled_scale(*args):
    """One compiled "run" of :func:`scale` under the ``compile`` mode's settings."""
    with modes.compiler_settings(Mode("compile")):
        return torch.compile(scale, backend="aot_eager", dynamic=False)(*args)


def entries(code) -> int:
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code))


@pytest.mark.parametrize("forgotten", [True, False], ids=["decisions undone", "decisions kept"])
def test_a_decision_dynamo_makes_for_a_code_in_one_run_does_not_hold_in_the_next(forgotten, monkeypatch):
    """Dynamo marks a code object to run untraced when a frame of it holds no tensor, whatever later
    frames hold: a run that calls ``scale`` on numbers marks it. The next run, on a tensor, still
    compiles it, as it would from an empty cache; with the marks kept (the check's teeth) it would not."""
    if not forgotten:
        monkeypatch.setattr(modes, "run_decisions_forgotten", contextlib.nullcontext)
    torch._dynamo.reset()
    assert compiled_scale(3, 2) == 6 and entries(scale.__code__) == 0  # marked: nothing compiled
    torch.testing.assert_close(compiled_scale(torch.ones(2), 2), torch.full((2,), 2.0))
    assert entries(scale.__code__) == (1 if forgotten else 0)


@pytest.mark.parametrize("lifted", [True, False], ids=["limits lifted", "torch's limits"])
def test_no_frame_falls_back_to_eager_because_of_the_variants_earlier_runs_compiled(lifted, monkeypatch):
    """Twelve runs with twelve shapes: each compiles its own variant of ``scale``. Under torch's recompile
    limit (8, the check's teeth) the runs after the eighth would run it eagerly, because of the runs
    before them; under ``RECOMPILE_LIMITS`` every run compiles it."""
    if not lifted:
        monkeypatch.setattr(modes, "RECOMPILE_LIMITS", {})
    torch._dynamo.reset()
    for n in range(1, 13):
        compiled_scale(torch.ones(n), 2.0)
    assert entries(scale.__code__) == (12 if lifted else torch._dynamo.config.recompile_limit)


def test_the_cache_is_kept_only_by_a_process_of_harness_runs_from_empty_and_within_its_bound(monkeypatch):
    """A kept cache holds this process's own compiled runs only: not where other code may compile
    between runs (a process that is not a sandbox child's, ``own_compile_cache``), not what a forked
    child inherited (it starts empty), at most ``KEPT_ENTRIES`` (the next run starts empty past it),
    and never with caching off."""
    compiled_run(SCENARIOS[0], "requires_grad_false", fresh=False)  # a generated dropout: one compiled frame
    assert modes._cache_entries() > 0 and not modes._fresh_cache_due()
    for name, value in [("_cache_owner", []), ("_cache_kept_by", [-1]), ("KEPT_ENTRIES", modes._cache_entries() - 1),
                        ("CACHE_ACROSS_RUNS", False)]:
        with monkeypatch.context() as patch:
            patch.setattr(modes, name, value)
            assert modes._fresh_cache_due(), name
    assert not modes._fresh_cache_due()


class CacheProbe(iso.Technique):
    """``requires_grad_(False)`` on the frozen modules; prints, at setup, whether its process keeps
    Dynamo's cache and how many compiled entries it holds."""

    name = "test.cache_probe"
    capabilities = frozenset({iso.Capability.FREEZE_MODULE})

    def setup(self, model, intent):
        print(f"kept={not modes._fresh_cache_due()} entries={modes._cache_entries()}", flush=True)
        for path in intent.frozen_modules:
            model.get_submodule(path).requires_grad_(False)


def test_a_sandbox_child_keeps_its_cache_and_the_judging_process_does_not(capfd, monkeypatch):
    """A sandbox child owns its Dynamo cache: its second compiled run finds the first one's entries.
    A compiled run in the judging process (in-process, where the user's own code may compile between
    runs) starts from an empty cache, every time: it compiles again what a process that owns its
    cache reuses."""
    with Sandbox(CacheProbe()) as box:
        for _ in range(2):
            assert box.run(SCENARIOS[0], "cpu").crash is None  # a generated dropout: one compiled frame
    seen = [line.partition("] ")[2] for line in capfd.readouterr().err.splitlines() if "kept=" in line]
    assert seen[0] == "kept=False entries=0" and seen[1].startswith("kept=True") and seen[1] != "kept=True entries=0"
    owned = [compiled_run(SCENARIOS[0], "requires_grad_false", fresh=False)[1] for _ in range(2)]
    monkeypatch.setattr(modes, "_cache_owner", [])  # this process, as it is outside this module's tests
    not_owned = [compiled_run(SCENARIOS[0], "requires_grad_false", fresh=False)[1] for _ in range(2)]
    assert owned[1] == 0 and not_owned[0] >= 1 and not_owned[1] == not_owned[0]  # compiled again


@pytest.mark.parametrize("spec", ["requires_grad_false", "per_run_factor"])
def test_a_verdict_does_not_depend_on_the_compiled_runs_before_it(spec):
    """Order independence, judged: the same scenario in a fresh sandbox child and in one that judged
    other compiled scenarios first gives the same verdict, every number in it included."""
    tech = PerRunFactor() if spec == "per_run_factor" else iso.catalog()[spec]
    # float32, so that a mismatch goes to the float64 twin too; Adam amplifies any difference
    target = dataclasses.replace(SCENARIOS[1], dtype="float32", steps=3)
    others = [SCENARIOS[0], SCENARIOS[2], dataclasses.replace(SCENARIOS[2], intent=Intent(frozen_modules=("pre",)),
                                                              optimizer=OptimizerRecipe("Adam", (("lr", 0.05),)))]
    clear_reference_cache()
    with Sandbox(tech) as fresh:
        alone = judge(tech, target, sandbox=fresh)
    with Sandbox(tech) as used:
        for other in others:
            judge(tech, other, sandbox=used)
        after = judge(tech, target, sandbox=used)
    assert not alone.ok  # a verdict with numbers in it
    assert after.violations == alone.violations and after.divergence == alone.divergence
    assert after.steps == alone.steps


@pytest.mark.parametrize("index", [2, 4, 6], ids=lambda i: str(TECHNIQUES[i]).split(" ")[0])
def test_unread_diagnostics_change_no_trace_and_no_graph(index):
    """A compiled run skips Dynamo's guard-latency measurement and graph-break stacks
    (``modes.unread_diagnostics``, inside the ``compile`` mode's settings): bitwise the same trace and
    graphs as a run that computes them, and torch's own functions are back in place after the run."""
    guards = pytest.importorskip("torch._dynamo.guards")
    real = guards.profile_guard_manager
    measured = []

    def counted(*args):
        measured.append(1)
        return real(*args)

    scenario, spec = SCENARIOS[index], TECHNIQUES[index]
    guards.profile_guard_manager = counted  # what the run finds without the settings' patch
    try:
        saved, modes.unread_diagnostics = modes.unread_diagnostics, contextlib.nullcontext
        try:
            with_latency, graphs_with, _ = compiled_run(scenario, spec)
        finally:
            modes.unread_diagnostics = saved
        assert measured and graphs_with >= 1  # Dynamo did measure its guards
        measured.clear()
        translator = pytest.importorskip("torch._dynamo.symbolic_convert").InstructionTranslatorBase
        log_graph_break = translator.log_graph_break
        without, graphs_without, _ = compiled_run(scenario, spec)
        assert not measured and guards.profile_guard_manager is counted
        assert translator.log_graph_break is log_graph_break
    finally:
        guards.profile_guard_manager = real
    assert with_latency.crash is None
    assert_same(flat(with_latency), flat(without))
    assert graphs_without == graphs_with


def test_a_warm_up_compile_that_fails_leaves_it_to_the_runs(monkeypatch):
    """Where torch cannot compile, the judging process's warm-up compile (``compile_warm_up``, before it
    forks a child) raises nothing: each compiled run meets the failure itself and reports it as its crash."""
    def unable(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(modes, "_warmed_up_in", [])
    monkeypatch.setattr(torch, "compile", unable)
    modes.compile_warm_up()
    assert modes._warmed_up_in == [os.getpid()]
    trace = run(SCENARIOS[0], TechniqueDriver(iso.catalog()["requires_grad_false"]))
    assert trace.crash is not None and trace.crash.phase == "compile" and "no compiler here" in trace.crash.error


@pytest.mark.parametrize("accelerator", [False, True])
def test_the_warm_up_compile_runs_a_backward_only_where_no_accelerator_is_visible(monkeypatch, accelerator):
    """With a GPU visible, autograd's first backward starts device threads that a child forked after
    it cannot use: the judging process's warm-up, right before a fork, then compiles the forward only."""
    backward = []
    real = torch.autograd.backward
    monkeypatch.setattr(modes, "_warmed_up_in", [])
    monkeypatch.setattr(devices, "accelerator_visible", lambda: accelerator)
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: backward.append(1) or real(*a, **k))
    modes.compile_warm_up()
    assert bool(backward) is not accelerator
