"""Every invariant fires on a crafted bad trace and stays silent on a good one.

A good (technique, reference) pair is two runs of the reference on the same
scenario; a bad technique trace is a deep copy of the good one with one thing
broken by hand.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from isolation_suite.judging.invariants import CHECKS, INVARIANTS, MATCH_TOLERANCE, Context, evaluate
from isolation_suite.execution.reference import Reference
from isolation_suite.execution.runner import run
from isolation_suite.execution.trace import Crash, Trace
from isolation_suite.spec.scenario import Architecture, Data, Intent, Layer, Op, OptimizerRecipe, Scenario, chain


def linear(path: str) -> Layer:
    return Layer(path, "linear", (("bias", True), ("in_features", 2), ("out_features", 2)))


def _scenario(layers, program, intent, optimizer=OptimizerRecipe(name="SGD", args=(("lr", 0.1),)),
              dtype="float64", steps=2) -> Scenario:
    arch = chain((2,), layers, program)
    return Scenario(arch, intent, optimizer, Data(batch=3, seed=1, input_requires_grad=True, loss="mse"),
                    steps, 1, dtype)


SCENARIOS = {
    # a trainable layer upstream of a frozen module that contains a BatchNorm
    "module": _scenario(
        [linear("pre"), linear("enc.lin"), Layer("enc.bn", "batchnorm1d", (("num_features", 2),)), linear("fc")],
        ["pre", "enc.lin", "enc.bn", "fc"], Intent(frozen_modules=("enc",))),
    "elements": _scenario(
        [linear("fc")], ["fc"], Intent(frozen_elements=(("fc.weight", ((0, 1), (1, 0))),)),
        OptimizerRecipe(name="AdamW", args=(("lr", 0.1),))),
    "pass": _scenario([linear("fc")], ["fc", "fc"], Intent(pass_through=(("fc", 1),))),
    "module32": _scenario([linear("pre"), linear("enc"), linear("fc")], ["pre", "enc", "fc"],
                          Intent(frozen_modules=("enc",)), dtype="float32"),
}


@functools.lru_cache(maxsize=None)
def _pair(name: str) -> tuple[Trace, Trace]:
    s = SCENARIOS[name]
    return run(s, Reference(), "cpu"), run(s, Reference(), "cpu")


def good(name: str) -> tuple[Scenario, Trace, Trace]:
    """(scenario, technique trace, reference trace); the technique trace is a fresh copy to mutate."""
    technique, reference = _pair(name)
    return SCENARIOS[name], copy.deepcopy(technique), reference


def fire(invariant: str, scenario: Scenario, technique: Trace, reference: Trace, other: Trace | None = None):
    """The invariant's own violation, checking that evaluate() agrees."""
    ctx = Context(scenario, technique, reference, other)
    violation = CHECKS[invariant](ctx)
    assert violation is not None, f"{invariant} stayed silent"
    assert violation.invariant == invariant
    assert invariant in [v.invariant for v in evaluate(ctx)]
    return violation


def silent(invariant: str, scenario: Scenario, technique: Trace, reference: Trace, other: Trace | None = None):
    assert CHECKS[invariant](Context(scenario, technique, reference, other)) is None


# --- the good pair is silent -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_good_pair_is_silent_on_every_invariant(name):
    s, technique, reference = good(name)
    assert technique.crash is None and len(technique.steps) == 2
    for invariant in INVARIANTS:
        silent(invariant, s, technique, reference, other=copy.deepcopy(technique))
    assert evaluate(Context(s, technique, reference, copy.deepcopy(technique))) == []


def test_every_invariant_has_a_check():
    assert set(CHECKS) == set(INVARIANTS)
    assert len(INVARIANTS) == len(set(INVARIANTS)) == 8


# --- frozen-unchanged ------------------------------------------------------------------------

def test_frozen_unchanged_fires_on_a_moved_frozen_element():
    s, technique, reference = good("elements")
    before = technique.initial_params["fc.weight"][0, 1].item()
    technique.steps[0].params["fc.weight"][0, 1] += 1e-3
    after = technique.steps[0].params["fc.weight"][0, 1].item()
    v = fire("frozen-unchanged", s, technique, reference)
    assert "fc.weight[0, 1]" in v.message and "at step 1" in v.message
    assert f"{before:.6g} -> {after:.6g}" in v.message
    assert "AdamW" in v.message and "weight_decay=0.01" in v.message
    assert v.step == 1


def test_frozen_unchanged_ignores_a_moved_free_element():
    s, technique, reference = good("elements")
    technique.steps[0].params["fc.weight"][0, 0] += 1e-3  # a trainable entry: not frozen-unchanged's business
    silent("frozen-unchanged", s, technique, reference)


def test_frozen_unchanged_fires_on_a_moved_frozen_module_parameter_at_a_later_step():
    s, technique, reference = good("module")
    technique.steps[1].params["enc.lin.bias"][1] -= 0.5
    v = fire("frozen-unchanged", s, technique, reference)
    assert "enc.lin.bias[1]" in v.message and "at step 2" in v.message
    before = technique.initial_params["enc.lin.bias"][1].item()
    assert f"{before:.6g} -> {before - 0.5:.6g}" in v.message
    assert v.step == 2


def test_frozen_unchanged_fires_on_a_changed_frozen_batchnorm_buffer():
    s, technique, reference = good("module")
    technique.steps[0].buffers["enc.bn.running_mean"][0] = 0.25
    v = fire("frozen-unchanged", s, technique, reference)
    assert "buffer enc.bn.running_mean[0]" in v.message and "at step 1" in v.message
    assert "0 -> 0.25" in v.message and "training mode" in v.message


def test_frozen_unchanged_fires_on_a_changed_zero_dim_buffer():
    # num_batches_tracked is a 0-d tensor: its index is (), and a change must still count
    s, technique, reference = good("module")
    technique.steps[1].buffers["enc.bn.num_batches_tracked"] += 1
    v = fire("frozen-unchanged", s, technique, reference)
    assert v.message.startswith("buffer enc.bn.num_batches_tracked changed 0 -> 1 at step 2")


def test_frozen_unchanged_names_the_alias():
    s, technique, reference = good("elements")
    technique.aliases = {"fc.weight": "fc.parametrizations.weight.original"}
    technique.steps[1].params["fc.weight"][1, 0] += 1.0
    v = fire("frozen-unchanged", s, technique, reference)
    assert "fc.weight (as fc.parametrizations.weight.original)[1, 0]" in v.message and "at step 2" in v.message


# --- gradient-flows --------------------------------------------------------------------------

def test_gradient_flows_fires_when_the_input_gets_no_gradient():
    s, technique, reference = good("pass")
    technique.steps[0].input_grads[0] = None
    v = fire("gradient-flows", s, technique, reference)
    expected = f"{reference.steps[0].input_grads[0].abs().max().item():.6g}"
    assert "input got no gradient at step 1, micro-batch 0" in v.message and expected in v.message


def test_gradient_flows_fires_on_an_all_zero_input_gradient():
    s, technique, reference = good("module")
    technique.steps[1].input_grads[0] = torch.zeros_like(technique.steps[1].input_grads[0])
    v = fire("gradient-flows", s, technique, reference)
    assert "input got an all-zero gradient at step 2" in v.message


def test_gradient_flows_fires_when_the_loss_has_no_gradient():
    s, technique, reference = good("module")
    technique.steps[0].loss_without_grad = True
    v = fire("gradient-flows", s, technique, reference)
    assert "the loss has no gradient at step 1" in v.message


def test_gradient_flows_fires_when_an_upstream_parameter_gets_no_gradient():
    s, technique, reference = good("module")
    technique.steps[0].grads["pre.weight"] = None
    v = fire("gradient-flows", s, technique, reference)
    assert "pre.weight (upstream of an isolated call site) got no gradient at step 1" in v.message
    assert f"{reference.steps[0].grads['pre.weight'].abs().max().item():.6g}" in v.message


def test_gradient_flows_leaves_downstream_parameters_and_switched_off_ones_to_trainable_trains():
    s, technique, reference = good("module")
    technique.steps[0].grads["fc.weight"] = None  # downstream of the frozen module
    silent("gradient-flows", s, technique, reference)
    s, technique, reference = good("module")
    technique.steps[0].grads["pre.weight"] = None
    technique.steps[0].requires_grad["pre.weight"] = False
    silent("gradient-flows", s, technique, reference)
    assert "trainable-trains" in [v.invariant for v in evaluate(Context(s, technique, reference))]


# --- trainable-trains ------------------------------------------------------------------------

def test_trainable_trains_fires_on_a_parameter_with_no_gradient_that_never_moves():
    s, technique, reference = good("module")
    for record in technique.steps:
        record.grads["fc.weight"] = None
        record.params["fc.weight"] = technique.initial_params["fc.weight"].clone()
    v = fire("trainable-trains", s, technique, reference)
    assert "fc.weight got no gradient at step 1" in v.message
    assert f"{reference.steps[0].grads['fc.weight'].abs().max().item():.6g}" in v.message


def test_trainable_trains_fires_when_a_parameter_never_moves():
    s, technique, reference = good("pass")
    technique.steps[0].params["fc.bias"] = technique.initial_params["fc.bias"].clone()
    v = fire("trainable-trains", s, technique, reference)
    assert "fc.bias never moved at step 1" in v.message and "SGD" in v.message
    b0, b1 = reference.initial_params["fc.bias"][0].item(), reference.steps[0].params["fc.bias"][0].item()
    assert f"fc.bias[0] {b0:.6g} -> {b1:.6g}" in v.message


def test_trainable_trains_names_a_parameter_the_reference_really_trains_not_a_rounding_move():
    """Of the parameters that never moved in a step, the message names the first whose reference move
    is not rounding next to the others': a bias before a BatchNorm moved one ulp is not the evidence."""
    s, technique, reference = good("module")
    reference = copy.deepcopy(reference)
    before = reference.initial_params["pre.bias"]
    reference.steps[0].params["pre.bias"] = torch.nextafter(before, torch.full_like(before, 1.0))  # one ulp
    for path in ("pre.bias", "fc.weight"):  # first in order, then the one that really trains
        technique.steps[0].params[path] = technique.initial_params[path].clone()
    v = fire("trainable-trains", s, technique, reference)
    assert "fc.weight never moved at step 1" in v.message, v.message
    # where the rounding move is all there is, it is named (a real difference from the reference)
    technique.steps[0].params["fc.weight"] = reference.steps[0].params["fc.weight"].clone()
    assert "pre.bias never moved at step 1" in fire("trainable-trains", s, technique, reference).message


def test_trainable_trains_names_the_first_failing_parameter_in_order_whichever_way_it_fails():
    s, technique, reference = good("module")
    technique.steps[0].params["pre.bias"] = technique.initial_params["pre.bias"].clone()  # never moved
    technique.steps[0].grads["fc.weight"] = None  # no gradient, later in order
    technique.steps[0].params["fc.weight"] = technique.initial_params["fc.weight"].clone()
    assert "pre.bias never moved at step 1" in fire("trainable-trains", s, technique, reference).message


def test_trainable_trains_takes_a_nan_reference_gradient_as_evidence_and_names_it():
    s, technique, reference = good("module")
    reference = copy.deepcopy(reference)
    reference.steps[0].grads["pre.weight"] = torch.full_like(reference.steps[0].grads["pre.weight"], float("nan"))
    for path in ("pre.weight", "fc.weight"):
        technique.steps[0].grads[path] = None
        technique.steps[0].params[path] = technique.initial_params[path].clone()
    assert "pre.weight got no gradient at step 1" in fire("trainable-trains", s, technique, reference).message


def test_trainable_trains_reports_requires_grad_false():
    s, technique, reference = good("module")
    technique.steps[1].grads["fc.bias"] = torch.zeros(2, dtype=torch.float64)
    technique.steps[1].requires_grad["fc.bias"] = False
    v = fire("trainable-trains", s, technique, reference)
    assert "fc.bias got an all-zero gradient (requires_grad=False) at step 2" in v.message


def test_trainable_trains_fires_on_an_unreachable_parameter():
    s, technique, reference = good("module")
    technique.unreachable = ["pre.bias"]
    v = fire("trainable-trains", s, technique, reference)
    assert "pre.bias is no longer a parameter" in v.message


def test_trainable_trains_looks_only_at_the_free_entries_of_a_partly_frozen_weight():
    s, technique, reference = good("elements")
    grad = technique.steps[0].grads["fc.weight"]
    assert grad[0, 1] == 0 and grad[1, 0] == 0  # the good trace already has zero gradient there
    silent("trainable-trains", s, technique, reference)
    grad[0, 0] = grad[1, 1] = 0.0  # the free entries lose their gradient too: nothing trains
    v = fire("trainable-trains", s, technique, reference)
    assert "fc.weight got an all-zero gradient at step 1" in v.message


def test_trainable_trains_ignores_frozen_modules():
    s, technique, reference = good("module")
    for record in technique.steps:
        record.grads["enc.lin.weight"] = torch.zeros(2, 2, dtype=torch.float64)
    silent("trainable-trains", s, technique, reference)


# --- matches-reference -----------------------------------------------------------------------

def test_matches_reference_fires_on_a_perturbed_loss():
    s, technique, reference = good("module")
    technique.steps[0].losses[0] = technique.steps[0].losses[0] + 1e-3
    v = fire("matches-reference", s, technique, reference)
    a, e = technique.steps[0].losses[0].item(), reference.steps[0].losses[0].item()
    assert "loss at step 1, micro-batch 0" in v.message
    assert f"is {a:.6g}, reference {e:.6g}" in v.message and "|diff| 0.001" in v.message


def test_matches_reference_fires_on_a_perturbed_trainable_parameter():
    s, technique, reference = good("elements")
    technique.steps[1].params["fc.weight"][1, 1] += 1e-3
    v = fire("matches-reference", s, technique, reference)
    a, e = technique.steps[1].params["fc.weight"][1, 1].item(), reference.steps[1].params["fc.weight"][1, 1].item()
    assert f"fc.weight[1, 1] is {a:.6g}, reference {e:.6g}" in v.message
    assert "after step 2" in v.message and "AdamW" in v.message
    assert v.step == 2


def test_matches_reference_fires_on_a_missing_input_gradient():
    s, technique, reference = good("pass")
    technique.steps[1].input_grads[0] = None
    v = fire("matches-reference", s, technique, reference)
    assert "input gradient at step 2, micro-batch 0" in v.message and "reference" in v.message


def test_a_missing_gradient_matches_an_all_zero_one():
    s, technique, reference = good("pass")
    reference = copy.deepcopy(reference)
    reference.steps[1].input_grads[0] = torch.zeros_like(reference.steps[1].input_grads[0])
    technique.steps[1].input_grads[0] = None
    silent("matches-reference", s, technique, reference)


def test_matches_reference_tolerance_is_float64_aware():
    s, technique, reference = good("module")
    assert technique.steps[0].losses[0].dtype == torch.float64
    technique.steps[0].params["fc.weight"][0, 0] += 1e-12
    technique.steps[0].losses[0] = technique.steps[0].losses[0] + 1e-12
    silent("matches-reference", s, technique, reference)
    # 1e-6 is inside float32's tolerance but well outside float64's
    assert MATCH_TOLERANCE[torch.float64]["atol"] < 1e-6 < MATCH_TOLERANCE[torch.float32]["atol"]
    s, technique, reference = good("module")
    technique.steps[0].params["fc.weight"][0, 0] += 1e-6
    assert "fc.weight[0, 0]" in fire("matches-reference", s, technique, reference).message


def test_matches_reference_tolerance_for_float32():
    s, technique, reference = good("module32")
    assert technique.steps[0].losses[0].dtype == torch.float32
    technique.steps[0].params["fc.weight"][0, 0] += 1e-6
    silent("matches-reference", s, technique, reference)
    technique.steps[0].params["fc.weight"][0, 0] += 1e-3
    assert "fc.weight[0, 0]" in fire("matches-reference", s, technique, reference).message


@pytest.mark.parametrize("units", [0.5, 0.99, 1.01, 3.0])
def test_matches_reference_agrees_with_assert_close_at_the_tolerance_edge(units):
    # the fused comparison over the whole trace must give assert_close's verdict entry by entry
    s, technique, reference = good("module32")
    tol = MATCH_TOLERANCE[torch.float32]
    expected = reference.steps[1].params["fc.bias"][1]
    technique.steps[1].params["fc.bias"][1] = expected + units * (tol["atol"] + tol["rtol"] * expected.abs())
    try:
        torch.testing.assert_close(technique.steps[1].params["fc.bias"], reference.steps[1].params["fc.bias"],
                                   **tol)
        close = True
    except AssertionError:
        close = False
    assert close == (units < 1)
    if close:
        silent("matches-reference", s, technique, reference)
    else:
        assert "fc.bias[1]" in fire("matches-reference", s, technique, reference).message


# --- divergence (steers the search; not an invariant) -------------------------------------------

def test_divergence_is_zero_on_a_good_pair_and_counts_tolerance_units():
    from isolation_suite.judging.invariants import divergence
    s, technique, reference = good("module32")
    assert divergence(Context(s, technique, reference)) == 0.0
    tol = MATCH_TOLERANCE[torch.float32]
    expected = float(reference.steps[0].params["fc.weight"][0, 0])
    technique.steps[0].params["fc.weight"][0, 0] += 0.5 * (tol["atol"] + tol["rtol"] * abs(expected))
    near = divergence(Context(s, technique, reference))
    assert 0.3 < near < 0.7  # a near miss: under tolerance, yet visible to target()
    technique.steps[0].params["fc.weight"][0, 0] += 1e-2
    assert divergence(Context(s, technique, reference)) > 100 * near


def test_divergence_covers_input_gradients_but_not_frozen_entries():
    from isolation_suite.judging.invariants import divergence
    s, technique, reference = good("pass")
    technique.steps[0].input_grads[0] = technique.steps[0].input_grads[0] + 1e-3
    assert divergence(Context(s, technique, reference)) > 1
    s, technique, reference = good("elements")
    technique.steps[0].params["fc.weight"][0, 1] += 1.0  # a frozen entry: frozen-unchanged's business
    assert divergence(Context(s, technique, reference)) == 0.0


def test_divergence_of_a_nan_is_as_far_as_it_gets_and_a_crash_is_zero():
    from isolation_suite.judging.invariants import divergence
    s, technique, reference = good("module")
    technique.steps[1].losses[0] = torch.tensor(float("nan"), dtype=torch.float64)
    assert divergence(Context(s, technique, reference)) >= 1e6
    technique.crash = Crash(1, "forward", "RuntimeError: boom", "")
    assert divergence(Context(s, technique, reference)) == 0.0


def _whole_trace_divergence(ctx: Context) -> float:
    """The search's divergence over the whole trace, written out here from its definition: the largest
    gap over every compared entry, in tolerance units (a NaN counts as 1e6)."""
    tol = MATCH_TOLERANCE[torch.float64 if ctx.scenario.dtype == "float64" else torch.float32]
    gaps = [((a.double() - e.double()).abs() / (tol["atol"] + tol["rtol"] * e.double().abs())).nan_to_num(1e6)
            for *_, a, e in ctx.against_reference if a.shape == e.shape]
    return max((float(g.max()) for g in gaps if g.numel()), default=0.0)


@pytest.mark.parametrize("name", ["module", "module32", "pass", "elements"])
def test_divergence_by_step_places_a_gap_at_its_step_and_peaks_at_the_whole_trace_value(name):
    from isolation_suite.judging.invariants import divergence, divergence_by_step
    s, technique, reference = good(name)
    ctx = Context(s, technique, reference)
    assert divergence_by_step(ctx) == [0.0, 0.0] and divergence(ctx) == 0.0
    path = next(p for p in ctx.trainable if p.endswith("bias"))
    technique.steps[1].params[path][0] += 1e-2  # only the second step drifts
    ctx = Context(s, technique, reference)
    by_step = divergence_by_step(ctx)
    assert by_step[0] == 0.0 and by_step[1] > 1
    running = [max(by_step[:i + 1]) for i in range(len(by_step))]
    assert running[-1] == divergence(ctx) == pytest.approx(_whole_trace_divergence(ctx), rel=1e-12)


def test_divergence_by_step_with_a_changed_layout_and_a_nan_loss():
    from isolation_suite.judging.invariants import divergence, divergence_by_step
    s, technique, reference = good("module")
    technique.steps[0].params["fc.weight"] = technique.steps[0].params["fc.weight"].reshape(-1)  # another shape
    technique.steps[0].losses[0] = torch.tensor(float("nan"), dtype=torch.float64)
    ctx = Context(s, technique, reference)
    assert ctx.flat_against_reference is None  # the pairs that still line up are compared
    by_step = divergence_by_step(ctx)
    assert by_step[0] >= 1e6 and by_step[1] == 0.0
    assert max(by_step) == divergence(ctx) == _whole_trace_divergence(ctx)
    technique.crash = Crash(2, "forward", "RuntimeError: boom", "")
    assert divergence_by_step(Context(s, technique, reference)) == []


# --- no-crash --------------------------------------------------------------------------------

def test_no_crash_fires_on_a_crash():
    s, technique, reference = good("module")
    technique.crash = Crash(1, "backward", "RuntimeError: boom", "")
    v = fire("no-crash", s, technique, reference)
    assert v.message == "RuntimeError: boom (in backward at step 1; SGD)"
    assert v.step == 1


def test_no_crash_names_setup():
    s, technique, reference = good("elements")
    technique.crash = Crash(0, "setup", "KeyError: 'fc.weight'", "")
    v = fire("no-crash", s, technique, reference)
    assert "KeyError: 'fc.weight'" in v.message and "during setup" in v.message and "AdamW" in v.message


def test_a_crashed_trace_is_judged_only_on_no_crash_and_state_restored():
    s, technique, reference = good("module")
    technique.crash = Crash(2, "forward", "RuntimeError: boom", "")
    # everything else is broken too: none of it may be reported
    technique.steps[0].params["enc.lin.weight"][0, 0] += 1.0
    technique.steps[0].input_grads[0] = None
    technique.steps[0].losses[0] = technique.steps[0].losses[0] + 1.0
    technique.steps[0].grads["fc.weight"] = None
    technique.steps = technique.steps[:1]  # cut short by the crash
    other = copy.deepcopy(technique)
    other.steps[0].losses[0] = other.steps[0].losses[0] + 1.0
    assert [v.invariant for v in evaluate(Context(s, technique, reference, other))] == ["no-crash"]
    technique.state_leaks.append((1, "grad mode was left off (it was on)"))
    assert [v.invariant for v in evaluate(Context(s, technique, reference, other))] == ["no-crash",
                                                                                       "state-restored"]
    # without the crash the same trace breaks much more
    technique.crash = None
    assert len(evaluate(Context(s, technique, reference, other))) >= 5


# --- timeout ---------------------------------------------------------------------------------

def test_timeout_fires_on_a_stopped_run_and_no_crash_stays_silent():
    s, technique, reference = good("module")
    technique.crash = Crash(2, "forward", "the run took longer than 5s and was killed", "",
                            timed_out=True)
    technique.steps = technique.steps[:1]
    v = fire("timeout", s, technique, reference)
    assert v.message == "the run took longer than 5s and was killed (in forward at step 2; SGD)"
    silent("no-crash", s, technique, reference)
    assert [x.invariant for x in evaluate(Context(s, technique, reference))] == ["timeout"]


def test_timeout_stays_silent_on_a_crash():
    s, technique, reference = good("module")
    technique.crash = Crash(1, "backward", "RuntimeError: boom", "")
    silent("timeout", s, technique, reference)


# --- state-restored --------------------------------------------------------------------------

def test_state_restored_fires_on_a_leak():
    s, technique, reference = good("pass")
    technique.state_leaks.append((2, "fc.weight.requires_grad changed True -> False"))
    technique.state_leaks.append((2, "grad mode was left off (it was on)"))
    v = fire("state-restored", s, technique, reference)
    assert v.message == "fc.weight.requires_grad changed True -> False during step 2"


def test_a_leak_found_after_the_run_does_not_name_a_step():
    s, technique, reference = good("module")
    technique.state_leaks.append((-1, "torch.compile was replaced"))
    v = fire("state-restored", s, technique, reference)
    assert v.message.startswith("torch.compile was replaced by the end of the run") and "during" not in v.message
    assert v.step == len(technique.steps)
    assert v.step == 2


# --- device-parity ---------------------------------------------------------------------------

def test_device_parity_fires_on_a_perturbed_other_device_trace():
    s, technique, reference = good("module")
    other = copy.deepcopy(technique)
    other.steps[1].params["pre.bias"][0] += 1e-3
    silent("device-parity", s, technique, reference)  # no other device: nothing to compare
    silent("device-parity", s, technique, reference, other=copy.deepcopy(technique))
    v = fire("device-parity", s, technique, reference, other)
    a, e = technique.steps[1].params["pre.bias"][0].item(), other.steps[1].params["pre.bias"][0].item()
    assert f"pre.bias[0] is {a:.6g}, reference {e:.6g}" in v.message
    assert "after step 2" in v.message and "cpu disagrees with cpu" in v.message
    # the technique itself matches the reference: only device-parity fires
    assert [x.invariant for x in evaluate(Context(s, technique, reference, other))] == ["device-parity"]


def test_device_parity_fires_on_a_perturbed_loss():
    s, technique, reference = good("elements")
    other = copy.deepcopy(technique)
    other.steps[0].losses[0] = other.steps[0].losses[0] - 1e-3
    v = fire("device-parity", s, technique, reference, other)
    assert "loss at step 1, micro-batch 0" in v.message and "|diff| 0.001" in v.message


def test_device_parity_sets_aside_an_entry_whose_gradient_was_zero_on_both_devices():
    """Rprop or Adam turn rounding noise on a gradient that is zero in exact arithmetic (an
    attention key bias) into lr-sized moves in any direction; a real gradient is still compared."""
    s, technique, reference = good("module")
    other = copy.deepcopy(technique)
    for trace, noise in ((technique, 3e-11), (other, -2e-11)):
        for record in trace.steps:
            record.grads["pre.bias"] = record.grads["pre.bias"].clone()
            record.grads["pre.bias"][0] = noise
    other.steps[1].params["pre.bias"][0] += 0.02  # the other device's noise pointed the other way
    silent("device-parity", s, technique, reference, other)
    other.steps[1].grads["pre.bias"][0] = 0.5  # ... but with a gradient it is a difference
    v = fire("device-parity", s, technique, reference, other)
    assert "pre.bias[0]" in v.message and "after step 2" in v.message


def test_nan_stuck_at_nan_has_not_moved():
    from isolation_suite.judging.invariants import _first_difference
    a = torch.tensor([float("nan"), 1.0])
    assert _first_difference(a, a.clone()) is None
    assert _first_difference(torch.tensor([float("nan"), 2.0]), a)[0] == (1,)
    assert _first_difference(torch.tensor([0.0, 1.0]), a)[0] == (0,)


def test_gradient_flows_checks_nested_parameters_of_an_upstream_call_site():
    arch = Architecture(input_shape=(2, 4), layers=(Layer("attn", "mha", (("embed_dim", 4), ("num_heads", 1))),
                                                  Layer("enc", "linear", (("in_features", 4), ("out_features", 4)))),
                        program=(Op("call", "attn"), Op("call", "enc")))
    s = Scenario(arch, Intent(frozen_modules=("enc",)), OptimizerRecipe(name="SGD", args=(("lr", 0.1),)),
                 Data(batch=2, seed=1, input_requires_grad=False, loss="mse"), 1, 1, "float64")
    reference = run(s, Reference(), "cpu")
    technique = copy.deepcopy(reference)
    silent("gradient-flows", s, technique, reference)
    technique.steps[0].grads["attn.out_proj.weight"] = None
    v = fire("gradient-flows", s, technique, reference)
    assert "attn.out_proj.weight" in v.message and "step 1" in v.message
