"""Execution modes: the scenario's Mode, how the runner applies it, and the catalog per mode."""
import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import isolation_suite as iso
import strategies
from isolation_suite.execution import modes
from isolation_suite.engine.check import failure_message, modes_for, search
from isolation_suite.spec.scenario import Intent, Mode, Scenario, ScenarioError
from isolation_suite.techniques import CATALOG, conditions, explicit_examples, in_mode, triggers
from isolation_suite.model.tree import Router

STARVED = triggers.CHECKPOINT_STARVED


# --- the spec ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="jit"), "mode='jit' is not one of"),
    (dict(kind="autocast", target="blk"), "has no target"),
    (dict(kind="compile", backend="tvm"), "compile backend='tvm'"),
    (dict(kind="checkpoint", reentrant="yes"), "reentrant must be true or false"),
])
def test_a_bad_mode_names_the_bad_value(kwargs, message):
    with pytest.raises(ScenarioError, match=message):
        Mode(**kwargs)


def test_a_mode_must_name_a_container_of_the_architecture():
    with pytest.raises(ScenarioError, match="'fc' which is not a container|'fc', which is not a container"):
        dataclasses.replace(STARVED, mode=Mode("checkpoint", "fc"))
    assert dataclasses.replace(STARVED, mode=Mode("checkpoint", "")).mode.target == ""


def test_the_mode_round_trips_through_json_and_an_old_scenario_is_eager():
    again = Scenario.from_json(STARVED.to_json())
    assert again == STARVED and again.mode == Mode("checkpoint", "blk", reentrant=True)
    old = json.loads(triggers.FROZEN_LINEAR.to_json())
    del old["mode"]  # written before modes existed
    assert Scenario.from_dict(old).mode == Mode()
    assert "mode=checkpoint(blk, use_reentrant=True)" in repr(STARVED)
    assert "mode=" not in repr(triggers.FROZEN_LINEAR)


def test_modes_parse_and_unknown_ones_are_named(monkeypatch):
    monkeypatch.delenv("ISOLATION_MODES", raising=False)
    assert modes_for(None, ["cpu"]) == ("eager", "checkpoint", "compile", "autocast", "ddp", "fsdp")
    assert modes_for("all", ["cpu", "cuda:0"]) == ("eager", "checkpoint", "compile", "autocast")  # ddp: CPU only
    monkeypatch.setenv("ISOLATION_MODES", "autocast,eager")
    assert modes_for(None, ["cpu"]) == ("autocast", "eager") and modes_for("all", ["cpu"])[2] == "compile"
    assert modes_for("eager, checkpoint,eager", ["cpu"]) == ("eager", "checkpoint")
    with pytest.raises(ValueError, match=r"unknown mode\(s\) \['jit'\]"):
        modes_for("eager,jit", ["cpu"])


def test_the_reference_shares_only_autocast():
    assert modes.for_reference(Mode("checkpoint", "blk", True)) == Mode()
    assert modes.for_reference(Mode("compile")) == Mode()
    assert modes.for_reference(Mode("autocast")) == Mode("autocast")


# --- strategies ----------------------------------------------------------------------------

@settings(max_examples=60, database=None, deadline=None)
@given(st.data())
def test_drawn_modes_are_of_the_asked_kinds_and_reentrant_only_where_something_needs_gradient(data):
    kinds = data.draw(st.lists(st.sampled_from(tuple(iso.modes.MODE_BY_KIND)), min_size=1, unique=True))
    scenario = data.draw(strategies.scenarios(capabilities=["FREEZE_MODULE"], modes=kinds))
    assert scenario.mode.kind in kinds
    if scenario.mode.reentrant:
        from isolation_suite.model.tree import architecture_tree, region_needs_gradient
        tree = architecture_tree(scenario.architecture)
        assert region_needs_gradient(tree, scenario.mode.target, Intent(), scenario.data.input_requires_grad)


def test_modes_shrink_toward_the_first_kind_and_the_whole_model():
    from hypothesis import find
    found = find(strategies.scenarios(capabilities=["FREEZE_MODULE"], modes=("checkpoint", "compile")),
                 lambda s: True, settings=settings(database=None))
    assert found.mode == Mode("checkpoint", "", reentrant=False)


# --- the runner ----------------------------------------------------------------------------

class CountingCalls(iso.Technique):
    """A pass-through technique that records every call the router hands it."""

    name = "counting_calls"
    capabilities = frozenset({iso.Capability.PASS_THROUGH})
    summary = "functional detach, counting"

    def __init__(self):
        self.calls = []

    def call(self, module, args, role):
        self.calls.append((role, torch.is_grad_enabled()))
        if role is iso.Role.PASS_THROUGH:
            params = {n: p.detach() for n, p in module.named_parameters()}
            return torch.func.functional_call(module, params, args)
        return module(*args)


def _pass_through_under_checkpoint(reentrant: bool, dropout: bool = False) -> Scenario:
    layers = [triggers.linear("pre"), triggers.linear("blk.shared")] + ([triggers.dropout("blk.drop")] if dropout
                                                                        else [])
    calls = ["pre", "blk.shared"] + (["blk.drop"] if dropout else []) + ["blk.shared"]
    base = triggers.scenario(layers, calls, Intent(pass_through=(("blk.shared", 0),)))
    return dataclasses.replace(base, mode=Mode("checkpoint", "blk", reentrant))


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_recomputed_region_routes_its_calls_again_with_the_same_roles(reentrant):
    technique = CountingCalls()  # run here, not in a sandbox's child, so its record stays readable
    from isolation_suite.judging.judge import reference_trace
    from isolation_suite.judging.invariants import Context, evaluate
    from isolation_suite.execution.runner import TechniqueDriver, run
    scenario = _pass_through_under_checkpoint(reentrant)
    trace = run(scenario, TechniqueDriver(technique))
    roles = [role for role, _ in technique.calls]
    per_forward = [iso.Role.PASS_THROUGH, iso.Role.NORMAL]
    # each step: the forward, then the recomputation during backward, with the same roles again
    assert roles == per_forward * 2 * scenario.steps
    assert not evaluate(Context(scenario, trace, reference_trace(scenario)))


def test_a_recomputed_region_draws_the_dropout_masks_of_its_forward(monkeypatch):
    scenario = _pass_through_under_checkpoint(False, dropout=True)
    technique = iso.catalog()["functional_detach"]
    assert iso.check(technique, scenario).ok
    # without the replay the recomputation draws other masks: the gradients are wrong, and it shows
    monkeypatch.setattr(modes.ForwardState, "resume", lambda self, snapshot: _passthrough())
    verdict = iso.check(technique, scenario)  # the sandbox's child is forked with the patch in place
    assert not verdict.ok and verdict.first.invariant in ("matches-reference", "no-crash"), str(verdict)


def _passthrough():
    import contextlib
    return contextlib.nullcontext()


def test_router_replay_restores_the_forward_counts_afterwards():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    seen = []
    router = Router(model, {"0": lambda use: iso.Role.NORMAL}, lambda site, m, a: seen.append(site.use) or m(*a))
    with router.forward():
        model(torch.ones(1, 2))
        snapshot = router.snapshot()
        model(torch.ones(1, 2))
    with router.replaying(snapshot):
        model(torch.ones(1, 2))
    assert seen == [0, 1, 1] and not router.active and router.snapshot() == (2, (2,))
    router.close()


# --- the catalog per mode ------------------------------------------------------------------

def test_reentrant_starvation_condition():
    assert conditions.reentrant_checkpoint_starved(STARVED)
    for other in (Mode("checkpoint", "blk", False), Mode(), Mode("autocast")):
        assert not conditions.reentrant_checkpoint_starved(dataclasses.replace(STARVED, mode=other))
    needs = dataclasses.replace(STARVED, data=dataclasses.replace(STARVED.data, input_requires_grad=True))
    assert not conditions.reentrant_checkpoint_starved(needs)  # the input feeds the region gradient
    assert not conditions.reentrant_checkpoint_starved(dataclasses.replace(STARVED, intent=Intent(
        frozen_modules=("fc",))))  # nothing frozen feeds the region: a trainable module does


@pytest.mark.parametrize("name", ["requires_grad_false", "freeze_and_eval", "optimizer_filter", "no_grad_region",
                                  "name_substring"])
def test_freezing_with_requires_grad_starves_a_reentrant_checkpoint(name):
    verdict = iso.check(iso.catalog()[name], STARVED)
    assert verdict.first.invariant == "trainable-trains" and "blk.lin.weight got no gradient" in str(verdict)
    # the same freeze under a non-reentrant checkpoint is right
    assert iso.check(iso.catalog()[name], dataclasses.replace(STARVED, mode=Mode("checkpoint", "blk"))).invariants \
        == iso.check(iso.catalog()[name], dataclasses.replace(STARVED, mode=Mode())).invariants


def test_the_input_grads_hook_keeps_a_reentrant_checkpoint_training():
    assert iso.check(iso.catalog()["freeze_enable_input_grads"], STARVED).ok


def test_trigger_examples_move_into_the_mode_and_mode_triggers_stay_in_theirs():
    caps = {iso.Capability.FREEZE_MODULE}
    eager = explicit_examples(caps)
    assert STARVED not in eager and all(s.mode == Mode() for s in eager)
    assert STARVED in explicit_examples(caps, "checkpoint")
    compiled = explicit_examples(caps, "compile")
    assert len(compiled) == len(eager) and all(s.mode.kind == "compile" for s in compiled)
    # a whole-model reentrant checkpoint only where the input needs gradient
    moved = in_mode(triggers.FROZEN_LINEAR, "checkpoint")
    assert moved.mode == Mode("checkpoint", "", reentrant=True) and moved.data.input_requires_grad


MODE_GATE = [m for m in iso.modes.MODE_BY_KIND if m != "eager"]
#: examples per search in each mode: compiling costs about a second per run, a ddp run a fork and a
#: process group (about 0.1 s), the others as eager does
MODE_EXAMPLES = {"checkpoint": 20, "autocast": 20, "compile": 2, "ddp": 3, "fsdp": 3}


@pytest.mark.parametrize("mode", MODE_GATE)
@pytest.mark.parametrize("row", CATALOG, ids=lambda e: e.name)
def test_every_row_gets_its_verdict_in_every_mode(row, mode):
    """The gate per mode: a row sound in this mode holds, a row known-bad in it is caught with a
    declared invariant whose condition holds on the minimal counterexample."""
    technique = row.technique()
    expected = technique.expected_in(mode)
    result = search(technique, device="cpu", mode=mode, max_examples=MODE_EXAMPLES[mode] if not expected else None,
                    shrink=not expected or mode not in ("compile", "ddp", "fsdp"))
    if not expected:
        assert result.failure is None, failure_message(result.failure)
        return
    assert result.failure is not None, f"{row.name} in {mode}: no violation in {result.judged} examples"
    first = result.failure.first.invariant
    assert first in expected, failure_message(result.failure)
    assert result.failure.scenario.mode.kind == mode
    assert row.explains(first, result.failure.scenario), failure_message(result.failure)


# --- surfaces ------------------------------------------------------------------------------

PLUGIN = '''
import isolation_suite as iso
from isolation_suite.techniques.freeze_module import FreezeAndEval


class MyFreeze(FreezeAndEval):
    """A plug-in freeze that says nothing about checkpointing."""
    name = "mine.freeze"
    mode_violations = {}
'''


def test_a_plugin_technique_is_checked_per_mode_from_the_cli(tmp_path, monkeypatch, capsys):
    from isolation_suite.cli import main
    (tmp_path / "minefreeze.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["check", "minefreeze:MyFreeze", "--modes", "eager,checkpoint", "--max-examples", "3",
                 "--report-dir", "rep"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "[FREEZE_MODULE on cpu]" in out and "[FREEZE_MODULE on cpu, checkpoint]" in out
    assert "violates trainable-trains on cpu in checkpoint mode (checkpoint(blk, use_reentrant=True))" in out
    assert "--modes eager,checkpoint" in out  # the replay line keeps the modes
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["modes"] == {"mine.freeze": {"eager": "held", "checkpoint": "violated: trainable-trains"}}
    assert "## Verdicts per mode" in (tmp_path / "rep" / "summary.md").read_text()
    assert "<h2>Verdicts per mode</h2>" in (tmp_path / "rep" / "report.html").read_text()


def test_check_runs_every_mode_by_default(monkeypatch, capsys):
    from isolation_suite.cli import main
    monkeypatch.delenv("ISOLATION_MODES", raising=False)
    assert main(["check", "parametrize_where", "--max-examples", "1"]) == 0
    out = capsys.readouterr().out
    modes = ("checkpoint", "compile", "autocast", "ddp", "fsdp")
    assert "[FREEZE_ELEMENTS on cpu]" in out and [m for m in modes if f"[FREEZE_ELEMENTS on cpu, {m}]" in out] \
        == list(modes)


def test_an_unknown_mode_is_one_line_and_exit_2(capsys):
    from isolation_suite.cli import main
    assert main(["check", "freeze_and_eval", "--modes", "eager,jit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--modes: unknown mode(s) ['jit']" in err[0]


def test_the_mode_matrix_keeps_the_worst_outcome_per_mode():
    from isolation_suite.reporting.report import mode_matrix
    records = [
        {"technique": "t", "outcome": "held", "violations": []},  # written before modes existed: eager
        {"technique": "t", "mode": "checkpoint", "outcome": "caught",
         "violations": [{"invariant": "trainable-trains"}]},
        {"technique": "t", "mode": "checkpoint", "outcome": "held", "violations": []},
        {"technique": "u", "mode": "compile", "outcome": "held", "violations": []},
        {"technique": "u", "mode": "compile", "outcome": "violated", "violations": [{"invariant": "no-crash"}]},
    ]
    assert mode_matrix(records) == {"t": {"eager": "held", "checkpoint": "caught: trainable-trains"},
                                    "u": {"compile": "violated: no-crash"}}


@pytest.fixture
def cuda_style_scaling(monkeypatch):
    """CUDA's autocast path (float16 with a GradScaler), here on the CPU: torch's GradScaler runs there too."""
    original = modes.Precision.__init__

    def init(self, mode, device):
        original(self, mode, device)
        if self.enabled:
            self.dtype, self.scaler = torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    monkeypatch.setattr(modes.Precision, "__init__", init)


def test_loss_scaling_is_undone_before_anything_is_recorded(cuda_style_scaling):
    """A float64 scenario casts nothing under autocast: with the scaler's 65536 undone, the trace is
    eager's up to rounding: parameters, their gradients and the input gradient."""
    from isolation_suite.execution.runner import TechniqueDriver, run
    scenario = dataclasses.replace(triggers.FROZEN_LINEAR, mode=Mode("autocast"))
    technique = iso.catalog()["freeze_and_eval"]
    scaled = run(scenario, TechniqueDriver(technique))
    plain = run(dataclasses.replace(scenario, mode=Mode()), TechniqueDriver(technique))
    for a, b in zip(scaled.steps, plain.steps):
        for g, h in zip(a.input_grads, b.input_grads):
            torch.testing.assert_close(g, h)
        for name in b.params:
            torch.testing.assert_close(a.params[name], b.params[name])
            torch.testing.assert_close(a.grads[name], b.grads[name])


def test_a_step_without_a_scaled_backward_steps_plainly(cuda_style_scaling):
    """no_grad around the model's only path: the loss has no gradient, nothing is scaled; the verdict
    is the technique's (gradient-flows), not a GradScaler assertion."""
    scenario = dataclasses.replace(triggers.PASS_LAST_CALL, mode=Mode("autocast"))
    verdict = iso.check(iso.catalog()["no_grad_call"], scenario)
    assert verdict.first.invariant == "gradient-flows", str(verdict)


def test_a_sweep_in_checkpoint_mode_gives_each_row_its_checkpoint_verdict():
    """One sweep per mode: the trigger examples move into the mode, and each technique is judged
    against what it is known for there (sharing the eager reference, which the mode does not change)."""
    from isolation_suite.engine.sweep import sweep
    rows = [iso.catalog()[n] for n in ("freeze_and_eval", "freeze_enable_input_grads", "lr_zero_group")]
    done = sweep(rows, {iso.Capability.FREEZE_MODULE}, "cpu", max_examples=3, mode="checkpoint", shrink=False)
    by_name = {r.technique: r for r in done.results}
    assert all(r.mode == "checkpoint" for r in done.results)
    assert by_name["freeze_and_eval"].failure.first.invariant == "trainable-trains"
    assert by_name["freeze_and_eval"].failure.scenario.mode == Mode("checkpoint", "blk", reentrant=True)
    assert by_name["freeze_enable_input_grads"].failure is None
    assert by_name["lr_zero_group"].failure.first.invariant in rows[2].expected_in("checkpoint")


def test_pytorch_165068_autocast_no_longer_reuses_a_cast_made_under_no_grad():
    """Reported: autocast's cast cache kept a weight's lower-precision copy made under ``no_grad`` and
    served it to a later call that needs gradient, so the weight got none. On the installed torch
    (CPU bfloat16) the later call's weight gets its gradient, so a pass-through call under
    ``no_grad`` followed by a training call of the same module (the ``no_grad_call`` row's trigger,
    judged in the autocast mode by the gate above) trains as in eager."""
    lin = torch.nn.Linear(4, 4)
    x = torch.ones(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            lin(x)
        out = lin(x)
    out.float().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    technique = iso.catalog()["no_grad_call"]
    # fc's first call passed through under no_grad, its second trains: the second must not get the first's cast
    first_call = dataclasses.replace(triggers.PASS_UPSTREAM, dtype="float32", intent=Intent(pass_through=(("fc", 0),)))
    eager = iso.check(technique, first_call)
    autocast = iso.check(technique, in_mode(first_call, "autocast"))
    assert autocast.invariants == eager.invariants, f"{autocast}\n{eager}"  # nothing more than its eager verdict
