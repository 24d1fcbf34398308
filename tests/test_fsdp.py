"""The fsdp execution mode: FSDP2 fully_shard over the ddp mode's two gloo ranks, and a user's own model
split between the ranks of ddp and fsdp."""
import dataclasses
import os

import pytest
import torch
from hypothesis import given, settings
import torch.nn.functional as F
from torch import nn

import isolation_suite as iso
import strategies
from isolation_suite.engine.check import search
from isolation_suite.execution.sandbox import Sandbox
from isolation_suite.judging.judge import reference_trace
from isolation_suite.model.factory import ModelFactoryError, factory_name, make
from isolation_suite.model.tree import architecture_tree, shard_units, split_obstacle
from isolation_suite.spec.scenario import Intent, Mode, OptimizerRecipe, Scenario, ScenarioError
from isolation_suite.techniques import conditions as c
from isolation_suite.techniques import explicit_examples, in_mode, triggers

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the fsdp mode forks its second rank")


def fsdp(scenario: Scenario, **options) -> Scenario:
    return dataclasses.replace(in_mode(scenario, "fsdp"), mode=Mode("fsdp", **options))


# --- the spec ------------------------------------------------------------------------------

def test_the_fsdp_mode_round_trips_through_json_and_says_its_options():
    scenario = fsdp(triggers.FROZEN_DROPOUT, nested=True, keep_gathered=True)
    assert Scenario.from_json(scenario.to_json()) == scenario
    assert "mode=fsdp(nested=True, reshard_after_forward=False)" in repr(scenario)
    assert scenario.data.batch == 2 * triggers.FROZEN_DROPOUT.data.batch


@pytest.mark.parametrize("recipe, message", [
    (OptimizerRecipe("Rprop", (("lr", 0.01),)), "Rprop cannot step them: Rprop's step writes its state"),
    (OptimizerRecipe("SGD", (("fused", True), ("lr", 0.1))), "SGD cannot step them: its fused kernel has no DTensor"),
])
def test_an_optimizer_that_cannot_step_sharded_parameters_is_refused_with_why(recipe, message):
    with pytest.raises(ScenarioError, match=message):
        dataclasses.replace(fsdp(triggers.FROZEN_LINEAR), optimizer=recipe)
    # the trigger that needs Rprop is not one of the mode's: the mode cannot run it
    assert all(s.optimizer.name != "Rprop" for s in explicit_examples([iso.Capability.FREEZE_MODULE], "fsdp"))


def test_a_trigger_that_trains_a_batchnorm_is_not_moved_into_a_mode_of_several_ranks():
    """A thawed BatchNorm normalises with a rank's rows in ddp and fsdp, with the whole batch in the
    reference: they differ whatever the technique does, so such a trigger is not the mode's."""
    assert c.trains_batch_statistics(triggers.THAW_BATCHNORM) and not c.trains_batch_statistics(
        triggers.FROZEN_BATCHNORM)
    for mode in ("ddp", "fsdp"):
        moved = explicit_examples([iso.Capability.FREEZE_SCHEDULE, iso.Capability.FREEZE_MODULE], mode)
        assert not any(c.trains_batch_statistics(s) for s in moved)
        assert any(s.architecture == triggers.FROZEN_BATCHNORM.architecture for s in moved)


@settings(max_examples=30, database=None, deadline=None)
@given(strategies.scenarios(modes=("fsdp",)))
def test_drawn_fsdp_scenarios_split_evenly_and_draw_what_steps_sharded_parameters(scenario):
    assert scenario.mode.kind == "fsdp" and scenario.data.batch % 2 == 0 and scenario.dtype == "float32"
    assert not any(layer.kind.startswith("batchnorm") for layer in scenario.architecture.layers)
    assert scenario.optimizer.name != "Rprop"


def test_the_containers_sharded_on_their_own_leave_out_lists_shared_and_outside_read_parameters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
            self.dec = nn.Sequential(nn.Linear(2, 2))
            self.dec[0].weight = self.enc[0].weight
            self.heads = nn.ModuleList([nn.Linear(2, 2)])
            self.deep = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
            self.emb = nn.Sequential(nn.Linear(2, 2))

        def forward(self, x):
            x = self.dec(self.enc(x)) + self.heads[0](x)
            return self.deep(x) + F.linear(self.emb(x), self.emb[0].weight)  # emb.0.weight read outside emb
    from isolation_suite.model.tree import module_tree
    assert shard_units(module_tree(Tied(), (torch.ones(1, 2),))) == ["deep.0", "deep"]


# --- the same trace --------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"nested": True}, {"keep_gathered": True}, {"nested": True,
                                                                                      "keep_gathered": True}])
def test_the_reduce_scattered_gradient_is_the_whole_batch_gradient(options):
    """Two ranks on two halves, dropout, an input that needs gradient, two micro-batches: rank 0's
    trace (gathered from the shards) equals one process's over the whole batch. FSDP2 averages the
    ranks' gradients on gloo too (summed ones would be twice the reference's)."""
    scenario = dataclasses.replace(fsdp(triggers.FROZEN_DROPOUT, **options), micro_batches=2,
                                   intent=Intent(frozen_modules=("enc",)))
    _same_trace(iso.catalog()["freeze_and_eval"], scenario)


def test_a_module_thawed_after_the_wrap_trains_as_in_one_process():
    """A freeze schedule across the wrap: FSDP2 reduce-scatters a parameter thawed after fully_shard."""
    scenario = fsdp(triggers.THAW, nested=True)
    _same_trace(iso.catalog()["unfreeze_add_param_group"], scenario)


def _same_trace(technique, scenario):
    with Sandbox(technique) as sandbox:
        trace = sandbox.run(scenario, "cpu")
    reference = reference_trace(scenario)
    assert trace.crash is None, trace.crash
    tolerance = dict(rtol=1e-12, atol=1e-12)  # float64: only the order of a sum differs
    for mine, theirs in zip(trace.steps, reference.steps, strict=True):
        torch.testing.assert_close(mine.losses, theirs.losses, **tolerance)
        torch.testing.assert_close(mine.input_grads, theirs.input_grads, **tolerance)
        for path, grad in theirs.grads.items():
            torch.testing.assert_close(mine.grads[path], grad, **tolerance)
        for path, value in theirs.params.items():
            torch.testing.assert_close(mine.params[path], value, **tolerance)


def test_the_issues_command_passes():
    from isolation_suite.cli import main
    assert main(["check", "freeze_enable_input_grads", "--modes", "fsdp", "--max-examples", "4",
                 "--database", "none", "--seed", "0"]) == 0


# --- a user's model in a mode of several ranks ------------------------------------------------

class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, tokens, scale):
        return self.head(self.body(self.embed(tokens) * scale).mean(1))


def two_tower():
    tokens = torch.randint(0, 6, (4, 3), generator=torch.Generator().manual_seed(3))
    return TwoTower(), (tokens, torch.rand(4, 3, 1, generator=torch.Generator().manual_seed(4)))


def shared_scale():
    """The scale is one row every process gets whole (``batch_dims``)."""
    model, (tokens, scale) = two_tower()
    return model, (tokens, scale[:1])


shared_scale.batch_dims = (0, None)


def with_dropout():
    model, inputs = two_tower()
    model.body.insert(1, nn.Dropout(0.2))
    return model, inputs


def odd_batch():
    model, (tokens, scale) = two_tower()
    return model, (tokens[:3], scale[:3])


def bad_dims():
    return two_tower()


bad_dims.batch_dims = (0, 7)


@pytest.mark.parametrize("factory", [two_tower, shared_scale], ids=["split", "one_input_whole"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_users_model_trains_on_its_rows_as_one_process_on_the_whole_batch(factory, mode):
    name = factory_name(factory)
    scenario = Scenario(None, Intent(frozen_modules=("body",)), data=iso.scenario.Data(1, 0, True),
                        dtype="float64", steps=2, micro_batches=2, model=name, mode=Mode(mode, nested=True)
                        if mode == "fsdp" else Mode(mode))
    _same_trace(iso.catalog()["freeze_and_eval"], scenario)
    result = search(iso.catalog()["freeze_and_eval"], mode=mode, model=name, max_examples=3, seed=0)
    assert result.not_applicable == "" and result.failure is None and result.judged > 0


@pytest.mark.parametrize("factory, why", [
    (with_dropout, "between 2 processes, but body.1 (dropout: drops units) would see a process's rows in training"),
    (odd_batch, "the example inputs' batch sizes (3, 3) are not one size divisible by 2"),
])
def test_a_users_model_that_cannot_be_split_is_not_applicable_and_says_why(factory, why):
    result = search(iso.catalog()["freeze_and_eval"], mode="fsdp", model=factory_name(factory), max_examples=3)
    assert result.judged == 0 and why in result.not_applicable, result.not_applicable
    assert split_obstacle(iso.model.factory.factory_tree(factory_name(factory)), 2)


def test_bad_batch_dims_are_one_line():
    with pytest.raises(ModelFactoryError, match=r"batch_dims=\(0, 7\) must give each of its 2 input"):
        make(factory_name(bad_dims), 0)


# --- wild rows ---------------------------------------------------------------------------------

THAW_UNDER_MIXED_PRECISION = r'''
import os, sys, tempfile, torch, torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

def rank(r, store):
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=r, world_size=2)
    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 2))
    model[1].requires_grad_(False)  # frozen on the first forward
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model[1], mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.ones(2, 4)
    try:
        for step in range(2):
            optimizer.zero_grad()
            model(x).float().pow(2).mean().backward()
            optimizer.step()
            model[1].requires_grad_(True)  # thawed after it
        print(f"rank {r}: no error")
    except RuntimeError as exc:
        print(f"rank {r}: RuntimeError: {exc}")
    sys.stdout.flush()
    os._exit(0)

store = tempfile.mktemp()
rank(1 if os.fork() == 0 else 0, store)
'''


def test_pytorch_186998_a_module_frozen_on_its_first_forward_cannot_thaw_under_mixed_precision(tmp_path):
    """Reported against FSDP2: a module frozen when first run, thawed later, under a
    MixedPrecisionPolicy. Still reproduces on the installed torch (CPU, gloo): the thawed module's
    bfloat16 gradient cannot be assigned to its float32 parameter. The fsdp mode does not draw a
    mixed-precision policy (docs/semantics.md says why); this test says when the bug is gone."""
    import subprocess
    import sys
    script = tmp_path / "thaw.py"
    script.write_text(THAW_UNDER_MIXED_PRECISION)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120).stdout
    assert "RuntimeError: attempting to assign a gradient with dtype 'c10::BFloat16'" in out, out
