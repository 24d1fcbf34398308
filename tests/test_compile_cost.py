"""The ``compile`` mode's cost cuts change no trace and no verdict: the harness's operation-free frames
run untraced (``modes.OPERATION_FREE_FRAMES``), and every run still starts from a fresh Dynamo cache,
so what a run compiles never depends on the runs before it."""
import contextlib
import dataclasses

import pytest
import torch

import isolation_suite as iso
from isolation_suite.execution import modes
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


def compiled_run(scenario, spec, skip: bool = True):
    """One run in this process; ``skip``: ``UNTRACED_HARNESS_FRAMES``. Returns the trace, the
    graphs Dynamo compiled and which of :data:`WATCHED` it was handed a frame of."""
    saved = modes.UNTRACED_HARNESS_FRAMES
    modes.UNTRACED_HARNESS_FRAMES = skip
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
    """Order independence, bitwise: a scenario run right after ``torch._dynamo.reset()`` and again after
    compiled runs of other scenarios and techniques (``PerRunFactor`` with other factors among them)
    in the same process records the same trace."""
    target, spec = SCENARIOS[2], PerRunFactor()
    torch._dynamo.reset()
    alone, _, _ = compiled_run(target, spec)
    for scenario, other in zip(SCENARIOS, TECHNIQUES):
        compiled_run(scenario, other)
    compiled_run(SCENARIOS[0], spec)  # the same technique object, another factor
    again, _, _ = compiled_run(target, spec)
    assert_same(flat(alone), flat(again))


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
