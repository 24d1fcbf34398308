"""The ddp execution mode: two gloo ranks started by the harness, their trace against the whole batch's."""
import dataclasses
import json
import os

import pytest
import torch
from hypothesis import given, settings

import isolation_suite as iso
import strategies
from isolation_suite.judging.judge import judge, reference_trace
from isolation_suite.execution.sandbox import Sandbox
from isolation_suite.spec.scenario import Intent, Mode, Scenario, ScenarioError
from isolation_suite.techniques import in_mode, triggers
from isolation_suite.model.tree import architecture_tree, leaves_parameters_unused

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the ddp mode forks its second rank")

FROZEN = triggers.DDP_FROZEN  # FROZEN_LINEAR in ddp mode, DDP's defaults, batch 6 (3 per rank)


def ddp(scenario: Scenario, **options) -> Scenario:
    return dataclasses.replace(in_mode(scenario, "ddp"), mode=Mode("ddp", **options))


# --- the spec ------------------------------------------------------------------------------

def test_the_ddp_mode_round_trips_through_json_and_says_its_options():
    scenario = ddp(triggers.FROZEN_DROPOUT, find_unused=True, static_graph=True)
    assert Scenario.from_json(scenario.to_json()) == scenario
    assert "mode=ddp(find_unused_parameters=True, static_graph=True)" in repr(scenario)
    assert Scenario.from_json(FROZEN.to_json()).mode == Mode("ddp")


@pytest.mark.parametrize("make, message", [
    (lambda: Mode("eager", find_unused=True), "a eager mode has no find_unused"),
    (lambda: Mode("ddp", static_graph="yes"), "static_graph must be true or false"),
    (lambda: dataclasses.replace(FROZEN, data=dataclasses.replace(FROZEN.data, batch=3)), "batch=3 must be even"),
])
def test_a_bad_ddp_mode_names_the_bad_value(make, message):
    with pytest.raises(ScenarioError, match=message):
        make()


def test_a_trigger_moves_into_ddp_with_twice_its_batch():
    moved = in_mode(triggers.FROZEN_BATCHNORM, "ddp")
    assert moved.mode == Mode("ddp") and moved.data.batch == 2 * triggers.FROZEN_BATCHNORM.data.batch
    # every use of fc passed through: its parameters get no gradient in any run, so DDP needs static_graph
    every_use = dataclasses.replace(triggers.PASS_UPSTREAM, intent=Intent(pass_through=(("fc", 0), ("fc", 1))))
    assert in_mode(every_use, "ddp").mode == Mode("ddp", static_graph=True)


@settings(max_examples=40, database=None, deadline=None)
@given(strategies.scenarios(modes=("ddp",)))
def test_drawn_ddp_scenarios_split_evenly_train_no_batchnorm_and_configure_ddp_for_unused_parameters(scenario):
    assert scenario.mode.kind == "ddp" and scenario.data.batch % 2 == 0
    assert not any(layer.kind.startswith("batchnorm") for layer in scenario.architecture.layers)
    if leaves_parameters_unused(architecture_tree(scenario.architecture), scenario.intent):
        assert scenario.mode.find_unused or scenario.mode.static_graph


# --- the same trace --------------------------------------------------------------------------

def test_the_averaged_gradient_is_the_whole_batch_gradient():
    """Two ranks on two halves, with dropout and an input that needs gradient, two micro-batches:
    rank 0's trace equals one process's over the whole batch."""
    scenario = dataclasses.replace(ddp(triggers.FROZEN_DROPOUT), micro_batches=2,
                                   intent=Intent(frozen_modules=("fc",)))
    technique = iso.catalog()["freeze_and_eval"]
    with Sandbox(technique) as sandbox:
        trace = sandbox.run(scenario, "cpu")
    reference = reference_trace(scenario)
    assert trace.crash is None
    tolerance = dict(rtol=1e-12, atol=1e-12)  # float64: only the order of a sum differs
    for mine, theirs in zip(trace.steps, reference.steps):
        torch.testing.assert_close(mine.losses, theirs.losses, **tolerance)
        torch.testing.assert_close(mine.input_grads, theirs.input_grads, **tolerance)
        assert mine.input_grads[0].shape[0] == scenario.data.batch  # both halves, not rank 0's alone
        torch.testing.assert_close(mine.grads, theirs.grads, **tolerance)
        torch.testing.assert_close(mine.params, theirs.params, **tolerance)
    assert judge(technique, scenario).ok


def test_a_bucket_left_unreduced_keeps_one_ranks_gradient_and_is_caught():
    """Frozen after wrapping, one step: no error, but the gradients are rank 0's own, not averaged."""
    verdict = iso.check(iso.catalog()["freeze_after_wrap"], triggers.DDP_FROZEN_ONE_STEP)
    assert verdict.invariants == ("matches-reference",), str(verdict)


# --- the new rows, both ways -----------------------------------------------------------------

def test_freezing_after_wrapping_raises_on_the_next_forward():
    verdict = iso.check(iso.catalog()["freeze_after_wrap"], FROZEN)
    assert verdict.first.invariant == "no-crash", str(verdict)
    assert "Expected to have finished reduction in the prior iteration" in verdict.first.message
    assert "step 2" in verdict.first.message and "forward" in verdict.first.message


@pytest.mark.parametrize("options", [dict(find_unused=True), dict(static_graph=True)])
def test_freezing_after_wrapping_holds_where_ddp_looks_for_unused_parameters(options):
    assert iso.check(iso.catalog()["freeze_after_wrap"], ddp(triggers.FROZEN_LINEAR, **options)).ok


def test_freezing_before_wrapping_holds():
    assert iso.check(iso.catalog()["freeze_and_eval"], FROZEN).ok
    assert iso.check(iso.catalog()["freeze_after_wrap"], in_mode(triggers.FROZEN_LINEAR, "eager")).ok


# --- rank 1 failing: a verdict on rank 0, never a hung run -------------------------------------

class OnRankOne(iso.Technique):
    """A sound freeze that misbehaves on rank 1 only, in ``where``."""

    name = "on_rank_one"
    capabilities = frozenset({iso.Capability.FREEZE_MODULE})

    def __init__(self, what: str, where: str = "setup", pid_file: str = ""):
        self.what, self.where, self.pid_file = what, where, pid_file

    def _misbehave(self, here: str) -> None:
        if here != self.where or torch.distributed.get_rank() != 1:
            return
        if self.pid_file:
            with open(self.pid_file, "w") as f:
                f.write(str(os.getpid()))
        if self.what == "raise":
            raise ValueError("only rank 1 fails")
        if self.what == "exit":
            os._exit(3)
        if self.what == "hang":
            while True:
                pass

    def setup(self, model, intent):
        self._misbehave("setup")
        for path in intent.frozen_modules:
            model.get_submodule(path).requires_grad_(False)

    def make_optimizer(self, model, intent, build):
        return build([p for p in model.parameters() if p.requires_grad])

    def after_step(self, model, optimizer):
        self._misbehave("after_step")


def _gone(pid_file) -> bool:
    pid = int(open(pid_file).read())
    return not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("what, message", [("raise", "ValueError: only rank 1 fails (on rank 1)"),
                                           ("exit", "rank 1 exited with code 3")])
def test_a_crash_on_rank_one_is_the_verdict_on_rank_zero(what, message, tmp_path):
    pid_file = str(tmp_path / "rank1")
    verdict = judge(OnRankOne(what, pid_file=pid_file), FROZEN, timeout=60)
    assert verdict.invariants[:1] == ("no-crash",), str(verdict)
    assert message in verdict.first.message and "setup" in verdict.first.message
    assert _gone(pid_file)
    assert judge(OnRankOne("nothing"), FROZEN).ok  # the same technique on both ranks: sound


@pytest.mark.parametrize("where", ["setup", "after_step"])
def test_a_hang_on_rank_one_is_a_timeout_and_rank_one_is_killed(where, tmp_path):
    """In setup rank 0 waits in DDP's first broadcast; in the last step's after_step it has finished
    and waits for rank 1's report. Either way the verdict names rank 1's phase."""
    pid_file = str(tmp_path / "rank1")
    verdict = judge(OnRankOne("hang", where, pid_file), FROZEN, timeout=3)
    assert verdict.invariants == ("timeout",), str(verdict)
    assert "rank 1 took longer than the timeout" in verdict.first.message
    assert where in verdict.first.message
    assert _gone(pid_file)


# --- the search --------------------------------------------------------------------------------

def test_a_model_that_normalises_with_batch_statistics_is_not_applicable_in_ddp():
    from isolation_suite.engine.check import search
    result = search(iso.catalog()["freeze_and_eval"], mode="ddp", model="isolation_suite.zoo:resnet_cnn")
    assert result.not_applicable.startswith("the ddp mode splits the model's batch") and result.judged == 0
    assert "batchnorm" in result.not_applicable and "and the reference the whole batch" in result.not_applicable


def test_a_rounding_gradient_moved_by_an_adaptive_optimizer_is_not_a_missed_step():
    """Found by the main job: a LayerNorm(1) bias has a zero gradient in exact arithmetic; one process
    computes 1e-13 and centered RMSprop makes a 4e-9 step of it, the averaged gradient is 0 and nothing
    moves. Under ddp neither is a step of the entry's own."""
    scenario = iso.Scenario.from_json(json.dumps({
        "architecture": {"containers": [{"kind": "modulelist", "path": "gen.0", "program": [
            {"kind": "call", "shape": [], "target": "gen.0.0"}]}, {"kind": "block", "path": "gen", "program": [
                {"kind": "call", "shape": [], "target": "gen.fc10"},
                {"kind": "loop", "shape": [], "target": "gen.0"}]}],
            "input_kind": "tokens", "input_shape": [2], "layers": [
                {"args": [["embedding_dim", 1], ["num_embeddings", 4]], "kind": "embedding", "path": "layer10"},
                {"args": [["dilation", 1], ["groups", 1], ["in_channels", 2], ["kernel_size", 3], ["out_channels", 2],
                          ["padding", 1], ["stride", 2]], "kind": "conv2d", "path": "fc1"},
                {"args": [["normalized_shape", 1]], "kind": "layernorm", "path": "gen.fc10"},
                {"args": [["num_channels", 2], ["num_groups", 1]], "kind": "groupnorm", "path": "gen.0.0"}],
            "program": [{"kind": "call", "shape": [], "target": "layer10"},
                        {"kind": "reshape", "shape": [2, 1, 1], "target": ""},
                        {"kind": "call", "shape": [], "target": "fc1"}, {"kind": "act", "shape": [], "target": "tanh"},
                        {"kind": "call", "shape": [], "target": "gen"}], "ties": [], "vocab": 4},
        "data": {"batch": 8, "input_requires_grad": False, "loss": "mse", "seed": 3875}, "dtype": "float64",
        "init_seed": 2265, "intent": {"frozen_elements": [["layer10.weight", [[1, 0], [2, 0], [3, 0]]]],
                                      "frozen_modules": [], "pass_through": [], "reparameterized": []},
        "micro_batches": 2, "mode": {"kind": "ddp"}, "model": "",
        "optimizer": {"args": [["centered", True], ["foreach", False], ["lr", 0.01], ["momentum", 0.9],
                               ["weight_decay", 0.0]], "clip": "value", "clip_value": 1.0, "name": "RMSprop",
                      "scheduler": "OneCycleLR", "set_to_none": True}, "schedule": [], "steps": 2}))
    assert iso.check(iso.catalog()["parametrize_where"], scenario).ok
