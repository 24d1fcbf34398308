"""``check``'s float64 confirmation of float32 mismatches: rounding noise is not a verdict."""
import dataclasses
from pathlib import Path

import isolation_suite as iso
from isolation_suite.check import reference_trace
from isolation_suite.invariants import Context, confirmed_matches_reference, matches_reference
from isolation_suite.runner import TechniqueDriver, run
from isolation_suite.scenario import Architecture, Data, Intent, Layer, Op, OptimizerRecipe, Scenario

# found by a fuzz run: parametrize on an LSTM weight takes another RNN kernel path; RMSprop's
# g / (sqrt(v) + eps) turns the ~1e-12 rounding noise of a near-zero gradient into a 1e-5 step
ROUNDING_ONLY = Scenario.from_json((Path(__file__).parent / "data" / "rounding_only_lstm_rmsprop.json").read_text())


def _raw_matches_reference(technique, scenario):
    ctx = Context(scenario, run(scenario, TechniqueDriver(technique)), reference_trace(scenario))
    return matches_reference(ctx)


def test_float32_rounding_noise_is_not_a_violation():
    technique = iso.catalog()["parametrize_dropconnect"]
    raw = _raw_matches_reference(technique, ROUNDING_ONLY)
    assert raw is not None and "|diff| 1.2" in raw.message  # the float32 traces do differ...
    twin = dataclasses.replace(ROUNDING_ONLY, dtype="float64")
    assert _raw_matches_reference(technique, twin) is None  # ...but not in float64
    assert iso.check(technique, ROUNDING_ONLY).ok


# found by a fuzz run: an attention key bias has a mathematically zero gradient (softmax ignores a
# shift shared by every key), so its whole trajectory under RMSprop with momentum and weight decay
# is rounding noise made lr-sized. It drifts in float64 too, only steps later than in float32.
NOISE_DRIVEN = Scenario.from_json(
    (Path(__file__).parent / "data" / "rounding_only_mha_key_bias_rmsprop.json").read_text())


def _contexts(technique, scenario):
    twin = dataclasses.replace(scenario, dtype="float64")
    return (Context(scenario, run(scenario, TechniqueDriver(technique)), reference_trace(scenario)),
            Context(twin, run(twin, TechniqueDriver(technique)), reference_trace(twin)))


def test_noise_driven_parameter_is_not_a_violation_even_though_it_drifts_in_float64_too():
    technique = iso.catalog()["parametrize_dropconnect"]
    ctx32, ctx64 = _contexts(technique, NOISE_DRIVEN)
    raw32, raw64 = matches_reference(ctx32), matches_reference(ctx64)
    assert "fc10.in_proj_bias[3]" in raw32.message and "after step 2" in raw32.message
    # a whole-trace float64 comparison would cry wolf: the drift arrives there at step 3
    assert "fc10.in_proj_bias" in raw64.message and "after step 3" in raw64.message
    assert confirmed_matches_reference(ctx32, ctx64) is None
    assert iso.check(technique, NOISE_DRIVEN).ok


def test_a_real_difference_after_a_noise_driven_parameter_is_still_reported():
    technique = iso.catalog()["parametrize_dropconnect"]
    ctx32, ctx64 = _contexts(technique, NOISE_DRIVEN)
    for ctx in (ctx32, ctx64):  # a semantic change: the same shift in both precisions, at step 3
        ctx.technique.steps[2].params["enc.bias_hh_l0"][0] += 1e-2
    v = confirmed_matches_reference(_fresh(ctx32), _fresh(ctx64))
    assert v is not None and "enc.bias_hh_l0[0]" in v.message and "after step 3" in v.message


def _fresh(ctx):
    return Context(ctx.scenario, ctx.technique, ctx.reference)  # drop cached comparisons


def test_a_semantic_mismatch_survives_the_float64_twin():
    arch = Architecture((3,), (Layer("fc", "linear", (("in_features", 3), ("out_features", 3))),),
                        (Op("call", "fc"),))
    scenario = Scenario(arch, Intent(frozen_elements=(("fc.weight", ((0, 0), (1, 1))),)),
                        OptimizerRecipe("SGD", (("lr", 0.1),), clip="norm", clip_value=0.01),
                        Data(2, 3, True, "mse"), steps=2, dtype="float32")
    verdict = iso.check(iso.catalog()["restore_after_step"], scenario)
    assert verdict.invariants == ("matches-reference",)
    assert "clip-norm=0.01" in verdict.first.message


def test_float64_inputs_are_the_float32_draws_upcast():
    from isolation_suite.build import make_inputs
    x32 = make_inputs(ROUNDING_ONLY)[0][0]
    x64 = make_inputs(dataclasses.replace(ROUNDING_ONLY, dtype="float64"))[0][0]
    assert x64.dtype.is_floating_point and (x64 == x32.double()).all()
