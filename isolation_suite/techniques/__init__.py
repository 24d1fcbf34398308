"""The catalog: every technique from the seed documents, with its expected verdict.

Declared as one table, like PyTorch's ``ModuleInfo``/``OptimizerInfo``: each
row names the technique class, and the conditions (pure predicates over a
scenario) under which each expected violation shows up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import dataclasses

from isolation_suite.model.factory import factory_tree, tree_of
from isolation_suite.model.tree import (ModelTree, element_owners, freeze_targets, leaves_parameters_unused,
                                        mode_targets, pass_through_targets, reparam_targets, region_needs_gradient,
                                        upstream_of_isolation)
from isolation_suite.spec import mode_kinds
from isolation_suite.spec.scenario import MODE_KINDS, Change, Data, Intent, Mode, Scenario, ScenarioError
from isolation_suite.technique import Capability, Technique
from isolation_suite.techniques import conditions as c
from isolation_suite.techniques import triggers as t
from isolation_suite.techniques.freeze_elements import (BackwardHookZeroGrad, ForwardPreHookOverwrite, ParametrizeWhere, RestoreAfterStep,
                              TensorHookMask)
from isolation_suite.techniques.freeze_module import (FreezeAfterWrap, FreezeAndEval, FreezeEnableInputGrads, LrZeroGroup, LrZeroGroupSeed,
                            NameSubstring, NoGradRegion, OptimizerFilter, RequiresGradFalse)
from isolation_suite.techniques.freeze_schedule import UnfreezeAddParamGroup, UnfreezeFlagOnly
from isolation_suite.techniques.pass_through import FunctionalDetach, NoGradCall, ToggleRequiresGrad
from isolation_suite.techniques.reparameterize import ParametrizeDropConnect, WeightDropoutDataTechnique, WeightDropoutTechnique


@dataclass(frozen=True)
class Condition:
    """When ``invariant`` fires for this row, ``holds(scenario)`` says the known trigger is present;
    ``examples`` are minimal scenarios that have it, judged before any random search."""

    invariant: str
    description: str
    holds: Callable[[Scenario], bool]
    examples: tuple[Scenario, ...] = ()
    #: the execution modes it can hold in (empty: every mode); its examples run in that mode
    modes: tuple[str, ...] = ()

    def in_mode(self, mode: str) -> bool:
        return not self.modes or mode in self.modes


@dataclass(frozen=True)
class CatalogEntry:
    technique: type[Technique]
    conditions: tuple[Condition, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.technique.name

    def condition_for(self, invariant: str, mode: str | None = None) -> Condition | None:
        """The row's condition for ``invariant``; with ``mode``, one that can hold in that mode first."""
        found = [x for x in self.conditions if x.invariant == invariant]
        return next((x for x in found if mode is None or x.in_mode(mode)), found[0] if found else None)

    def explains(self, invariant: str, scenario: Scenario) -> bool:
        """Some condition of ``invariant`` for the scenario's mode holds on it: the known trigger is there."""
        return any(x.invariant == invariant and x.in_mode(scenario.mode.kind) and x.holds(scenario)
                   for x in self.conditions)


TRAIN_MODE = (
    Condition("gradient-flows", "a BatchNorm or Dropout inside the frozen module runs in training mode: "
              "batch statistics or dropped units zero the gradient upstream", c.frozen_has_train_mode_layer,
              (t.FROZEN_BATCHNORM,)),
    Condition("frozen-unchanged", "a BatchNorm inside the frozen module updates its running stats",
              c.frozen_has_batchnorm, (t.FROZEN_BATCHNORM,)),
    Condition("matches-reference", "a BatchNorm or Dropout inside the frozen module runs in training mode",
              c.frozen_has_train_mode_layer, (t.FROZEN_DROPOUT,)),
)

#: rows that switch ``requires_grad`` off: a reentrant checkpoint fed only by frozen modules starves
STARVED = (
    Condition("trainable-trains", "a reentrant checkpoint gets no input that needs gradient once the modules "
              "feeding it are frozen with requires_grad=False: its parameters get none",
              c.reentrant_checkpoint_starved, (t.CHECKPOINT_STARVED,), ("checkpoint",)),
    Condition("no-crash", "as above, and nothing else reaches the loss: backward raises 'element 0 of tensors "
              "does not require grad'", c.reentrant_checkpoint_starved, (), ("checkpoint",)),
)

def ddp_unreduced(examples: tuple[Scenario, Scenario]) -> tuple[Condition, ...]:
    """The conditions of a row that leaves a parameter DDP reduces without gradient (frozen after
    wrapping, cut by no_grad, hidden by ``.data``) under DDP's defaults; ``examples``: a two-step
    and a one-step trigger of the row's capability."""
    return (
        Condition("no-crash", "a parameter DistributedDataParallel reduces gets no gradient and neither "
                  "find_unused_parameters nor static_graph is set: the next forward raises 'Expected to have "
                  "finished reduction in the prior iteration'", c.ddp_unused_raises, examples[:1], ("ddp",)),
        Condition("matches-reference", "as above: the bucket holding that parameter is never reduced, so the "
                  "other gradients in it are one rank's own, not the average", c.ddp_reduces_unused, examples[1:],
                  ("ddp",)),
    )


DDP_UNREDUCED = ddp_unreduced((t.DDP_FROZEN, t.DDP_FROZEN_ONE_STEP))

#: schedule rows under ddp: a module frozen after the wrap still has DDP's reducer waiting for its gradient
DDP_REFROZEN = Condition(
    "no-crash", "a module that trained is frozen after DDP wrapped the model (without find_unused_parameters): "
    "DDP still expects its gradient, and the next forward raises 'Expected to have finished reduction in the "
    "prior iteration'", c.ddp_refreezes_after_wrap, (t.DDP_REFREEZE,), ("ddp",))

#: element rows whose setup hooks the parameter tensors themselves
REPLACED_HOOKED = Condition(
    "frozen-unchanged", "fsdp replaces every parameter after the setup: the gradient hook stays on the original "
    "tensor, and the sharded parameter's frozen entries get their gradient", c.holds_replaced_parameters,
    (t.ELEMENTS_SHARDED,), ("fsdp",))

#: pass-through rows whose detaching is over when backward recomputes a checkpointed module they pass through
PASS_REGION = (
    Condition("matches-reference", "the passed-through module's own forward is checkpointed (reentrant): backward "
              "recomputes it outside the technique's call, with the real parameters, and they get gradient",
              c.checkpointed_inside_pass_through, (t.PASS_REGION_REENTRANT,), ("checkpoint",)),
    Condition("no-crash", "as above, non-reentrant: the recomputed tensors differ in metadata from the forward's "
              "(CheckpointError)", c.checkpointed_inside_pass_through, (t.PASS_REGION,), ("checkpoint",)),
)

CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(FunctionalDetach, PASS_REGION + (
        Condition("matches-reference", "the passed-through container is sharded on its own (fsdp, nested): FSDP2's "
                  "pre-forward hook registers the gathered parameters over the detached ones functional_call put "
                  "there, and the call trains them", c.pass_through_sharded_unit, (t.PASS_SHARDED,), ("fsdp",)),)),
    CatalogEntry(ToggleRequiresGrad, PASS_REGION + (
        Condition("state-restored", "the passed-through container is sharded on its own and kept gathered after "
                  "its forward (fsdp, nested, reshard_after_forward=False): requires_grad_(False) lands on the "
                  "sharded parameters before FSDP2 gathers them, requires_grad_(True) on the gathered ones, and the "
                  "sharded ones are left frozen", c.pass_through_gathered_unit, (t.PASS_SHARDED_GATHERED,),
                  ("fsdp",)),
        Condition("state-restored", "a non-reentrant checkpoint's recomputation stops early inside the call "
                  "(checkpoint's early stop): requires_grad is left False", c.pass_through_recomputed_non_reentrant,
                  (), ("checkpoint",)),
        Condition("no-crash", "as above; the next recomputation then differs from its forward (CheckpointError)",
                  c.pass_through_recomputed_non_reentrant, (t.PASS_CHECKPOINTED,), ("checkpoint",)),
    )),
    CatalogEntry(NoGradCall, PASS_REGION[:1] + (
        Condition("gradient-flows", "something upstream of the pass-through call needs gradient",
                  c.upstream_needs_gradient, (t.PASS_UPSTREAM,)),
        Condition("no-crash", "a reentrant checkpoint's region ends in the no_grad call: its recomputation has no "
                  "output that requires grad, and backward raises", c.pass_through_in_reentrant_checkpoint,
                  (t.PASS_REENTRANT,), ("checkpoint",)),
    )),
    CatalogEntry(RequiresGradFalse, TRAIN_MODE + STARVED),
    CatalogEntry(OptimizerFilter, TRAIN_MODE + STARVED),
    CatalogEntry(FreezeAndEval, STARVED),
    CatalogEntry(FreezeEnableInputGrads),
    CatalogEntry(UnfreezeFlagOnly, (
        Condition("trainable-trains", "a module thawed mid-training was never handed to the optimizer",
                  c.thaws_a_module, (t.THAW, t.THAW_BATCHNORM)),
        Condition("frozen-unchanged", "a module frozen mid-training stays in the optimizer, and zero_grad("
                  "set_to_none=False) leaves it a zero gradient that momentum or weight decay move, or a frozen "
                  "BatchNorm updates", lambda s: c.refreezes_into_a_moving_optimizer(s) or c.frozen_has_batchnorm(s),
                  (t.REFREEZE_MOMENTUM,)),
    ) + TRAIN_MODE[:1] + TRAIN_MODE[2:] + STARVED + (DDP_REFROZEN,)),
    CatalogEntry(UnfreezeAddParamGroup, STARVED + (
        Condition("matches-reference", "a module thawed after DDP wrapped the model: DDP never averages its "
                  "gradient (each rank steps on its own half)", c.ddp_thaws_after_wrap, (t.DDP_THAW,), ("ddp",)),
        DDP_REFROZEN)),
    CatalogEntry(FreezeAfterWrap, STARVED + DDP_UNREDUCED),
    CatalogEntry(LrZeroGroupSeed, (
        Condition("no-crash", "a parameter with more than one element meets `p not in ...`",
                  c.has_multi_element_parameter, (t.FROZEN_LINEAR,)),) + TRAIN_MODE),
    CatalogEntry(LrZeroGroup, TRAIN_MODE[:1] + (
        Condition("frozen-unchanged", "OneCycleLR/Rprop rewrite lr=0, or a BatchNorm updates",
                  lambda s: c.lr_is_rewritten(s) or c.frozen_has_batchnorm(s),
                  (t.FROZEN_RPROP, t.FROZEN_ONE_CYCLE)),
        Condition("matches-reference", "clip-norm counts frozen gradients, or BatchNorm/Dropout train",
                  lambda s: c.counts_frozen_gradients(s) or c.frozen_has_train_mode_layer(s),
                  (t.FROZEN_CLIP_NORM,)),
    )),
    CatalogEntry(NoGradRegion, (
        Condition("gradient-flows", "something upstream of the frozen module needs gradient",
                  c.upstream_needs_gradient, (t.FROZEN_LINEAR,)),
        TRAIN_MODE[1],
        Condition("frozen-unchanged", "a frozen module's parameter is tied to a module outside it (an embedding "
                  "and its head): that module's call, outside the no_grad region, trains it",
                  c.frozen_tie_used_outside, (t.FROZEN_TIED_HEAD,)),
        # where the upstream parameter also reaches the loss another way (tied to a later layer, as
        # an LSTM language model ties its embedding to its decoder), no_grad leaves it a partial,
        # wrong gradient instead of none
        Condition("matches-reference", "a BatchNorm or Dropout inside the frozen module runs in training mode, "
                  "or something upstream needs gradient that no_grad cuts",
                  lambda s: c.frozen_has_train_mode_layer(s) or c.upstream_needs_gradient(s), (t.FROZEN_DROPOUT,)),
    ) + STARVED + DDP_UNREDUCED),
    CatalogEntry(NameSubstring, (
        Condition("trainable-trains", "a frozen name is a substring of a trainable parameter's name",
                  c.names_collide, (t.NAMES_COLLIDE,)),
        Condition("frozen-unchanged", "a frozen module holds a tied parameter listed under another module's name: "
                  "the substring test misses it", c.names_miss_a_tie, (t.FROZEN_TIE,)),) + TRAIN_MODE + STARVED + (
        Condition("no-crash", "under ddp the collision freezes every parameter: DDP refuses a model with nothing "
                  "that requires a gradient", c.ddp_names_freeze_everything, (t.DDP_NAMES_COLLIDE,), ("ddp",)),)),
    CatalogEntry(BackwardHookZeroGrad, (
        Condition("no-crash", "the hook fires before weight.grad exists: the module's input needs no gradient, "
                  "or the module is called more than once (its weight's gradient is summed after the last "
                  "call's hook)", lambda s: c.input_needs_no_gradient(s) or c.elements_module_reused(s),
                  (t.ELEMENTS_NO_INPUT_GRAD, t.ELEMENTS_REUSED)),
        Condition("frozen-unchanged", "weight decay or a stale/accumulated gradient moves the entry",
                  c.weight_decay_or_stale_gradients, (t.ELEMENTS_ADAMW,)),
    )),
    CatalogEntry(TensorHookMask, (
        Condition("frozen-unchanged", "weight decay moves an entry whose gradient is zero", c.weight_decay,
                  (t.ELEMENTS_ADAMW,)), REPLACED_HOOKED)),
    CatalogEntry(ForwardPreHookOverwrite, (
        Condition("frozen-unchanged", "the entry drifts after every step", lambda s: True, (t.ELEMENTS_PLAIN,)),
        Condition("no-crash", "the module is called twice: the reset edits a tensor saved for backward",
                  c.elements_module_reused, (t.ELEMENTS_REUSED,)),
    )),
    CatalogEntry(RestoreAfterStep, (
        Condition("matches-reference", "gradient-norm clipping counts the frozen entries' gradients",
                  c.counts_frozen_gradients, (t.ELEMENTS_CLIP_NORM,)),
        Condition("frozen-unchanged", "fsdp replaces every parameter after the setup: the step hook copies the "
                  "initial entries into the original tensors it saved, which no longer train, and the sharded "
                  "ones move", c.holds_replaced_parameters, (t.ELEMENTS_SHARDED,), ("fsdp",)),)),
    CatalogEntry(ParametrizeWhere),
    CatalogEntry(WeightDropoutDataTechnique, (
        Condition("trainable-trains", "the raw weights never get gradient", c.reparameterized,
                  (t.REPARAM_RNN, t.REPARAM_LINEAR)),) + ddp_unreduced((t.DDP_REPARAM, t.DDP_REPARAM_ONE_STEP))),
    CatalogEntry(WeightDropoutTechnique),
    CatalogEntry(ParametrizeDropConnect),
)


def catalog() -> dict[str, Technique]:
    """Fresh instances of every built-in technique, by name."""
    return {entry.name: entry.technique() for entry in CATALOG}


def explicit_examples(capabilities: Iterable[Capability], mode: str = "eager",
                      first: str | None = None) -> tuple[Scenario, ...]:
    """The trigger scenarios of every catalog row whose capabilities lie within ``capabilities``,
    in catalog order (the row named ``first`` before the others: a known-bad row meets its own
    triggers first, however short its budget), without repeats, run in execution mode ``mode`` (a
    trigger of another mode's condition is left out): what the search judges before it draws anything."""
    caps = frozenset(capabilities)
    seen: dict[Scenario, None] = {}
    for row in sorted(CATALOG, key=lambda r: r.name != first):
        if row.technique.capabilities <= caps:
            for condition in row.conditions:
                if condition.in_mode(mode):
                    seen.update(dict.fromkeys(moved for example in condition.examples
                                              if (moved := movable(example, mode)) is not None))
    return tuple(seen)


def movable(scenario: Scenario, kind: str) -> Scenario | None:
    """``scenario`` in execution mode ``kind`` (``in_mode``), or None where the mode cannot judge it:
    an optimizer that cannot step sharded parameters, or, in a mode of several ranks, a BatchNorm
    that trains (each rank normalises with its own rows' statistics, the reference with the whole
    batch's: they differ by design, whatever the technique). That trigger is not the mode's."""
    if mode_kinds.BY_KIND[kind].distributed and c.trains_batch_statistics(scenario):
        return None
    try:
        return in_mode(scenario, kind)
    except ScenarioError:
        return None


def in_mode(scenario: Scenario, kind: str) -> Scenario:
    """``scenario`` run in execution mode ``kind``: unchanged when it is in that mode already, else
    with the mode's first placement (``PLACEMENTS``: over the whole model, a reentrant checkpoint where
    the input needs gradient) and, for a mode of several ranks, the batch times the ranks, so that each
    rank trains on the trigger's."""
    if scenario.mode.kind == kind:
        return scenario
    mode = PLACEMENTS[kind](tree_of(scenario), kind, scenario.data, scenario.intent)[0]
    data = dataclasses.replace(scenario.data, batch=mode.info.ranks * scenario.data.batch)
    return dataclasses.replace(scenario, mode=mode, data=data)


# --- where a trigger takes each mode: kind -> (tree, kind, data, intent) -> modes, the first preferred ---

def _whole_model(tree: ModelTree, kind: str, data: Data, intent: Intent) -> list[Mode]:
    """The mode over the whole model, its options at their defaults."""
    return [Mode(kind)]


def _checkpointed_regions(tree: ModelTree, kind: str, data: Data, intent: Intent) -> list[Mode]:
    """Every region, the whole model first; reentrant first where the region's input needs gradient
    with nothing frozen (else a reentrant checkpoint trains in no loop at all, isolated or not)."""
    out = []
    for target in mode_targets(tree):
        if region_needs_gradient(tree, target, Intent(), data.input_requires_grad):
            out.append(Mode(kind, target, reentrant=True))
        out.append(Mode(kind, target, reentrant=False))
    return out


def _ddp_defaults(tree: ModelTree, kind: str, data: Data, intent: Intent) -> list[Mode]:
    """DDP's defaults, or ``static_graph=True`` where the intent itself leaves a parameter unused."""
    return [Mode(kind, static_graph=leaves_parameters_unused(tree, intent))]


PLACEMENTS: dict[str, Callable[[ModelTree, str, Data, Intent], list[Mode]]] = {
    "eager": _whole_model, "checkpoint": _checkpointed_regions, "compile": _whole_model,
    "autocast": _whole_model, "ddp": _ddp_defaults, "fsdp": _whole_model,
}
assert tuple(PLACEMENTS) == MODE_KINDS, "every execution mode says where a trigger takes it"


def model_examples(model: str, capabilities: Iterable[Capability], mode: str = "eager") -> tuple[Scenario, ...]:
    """The trigger examples moved onto the user's model ``model`` (a factory name): for each
    trigger, the same recipe, loop and data settings with the first intent over the model's tree
    (in tree order), and in ``mode`` the first placement of the mode, under which the trigger's
    condition holds. A trigger the model has no analog for (no module called twice, no BatchNorm to
    freeze) is left out."""
    tree = factory_tree(model)
    caps = frozenset(capabilities)
    seen: dict[Scenario, None] = {}
    for row in CATALOG:
        if not row.technique.capabilities <= caps:
            continue
        for condition in row.conditions:
            if not condition.in_mode(mode):
                continue
            for trigger in condition.examples:
                found = _first_analog(tree, trigger, condition, model, mode)
                if found is not None:
                    seen[found] = None
    return tuple(seen)


def _first_analog(tree, trigger: Scenario, condition: Condition, model: str, mode: str) -> Scenario | None:
    data = trigger.data
    data = Data(1, data.seed, data.input_requires_grad and tree.float_inputs, data.loss)
    for intent, schedule in _scheduled_analogs(tree, trigger):
        for placed in PLACEMENTS[mode](tree, mode, data, intent):
            try:
                scenario = Scenario(None, intent, trigger.optimizer, data, trigger.steps, trigger.micro_batches,
                                    trigger.dtype, 0, model, placed, schedule)
            except ScenarioError:  # the mode cannot run the trigger's recipe (see ``movable``)
                return None
            if condition.holds(scenario):
                return scenario
    return None


def _scheduled_analogs(tree, trigger: Scenario) -> list[tuple[Intent, tuple[Change, ...]]]:
    """(intent, schedule) pairs over ``tree``: a freeze schedule's trigger (one module frozen at
    the start or from a boundary on) moves as one module of the tree, frozen at the same steps."""
    if not trigger.schedule:
        return [(intent, ()) for intent in _analogs(tree, trigger)]
    out = []
    for module in freeze_targets(tree):
        start = Intent(frozen_modules=(module,)) if trigger.intent.frozen_modules else Intent()
        out.append((start, tuple(Change(c.step, (module,) if c.frozen_modules else ()) for c in trigger.schedule)))
    return out


def _analogs(tree, trigger: Scenario) -> list[Intent]:
    """Intents over ``tree`` of the trigger's kind, in tree order."""
    intent = trigger.intent
    if intent.frozen_modules:
        # the module with the most trainable modules called before it first: "upstream" is read from
        # the call order, and a module late in the forward (an encoder after its embeddings) is the
        # likeliest to have them feed it (a position embedding is called after the word embedding too)
        candidates = freeze_targets(tree)
        reach = {m: len(upstream_of_isolation(tree, Intent(frozen_modules=(m,)))) for m in candidates}
        return [Intent(frozen_modules=(m,)) for m in sorted(candidates, key=lambda m: -reach[m])]
    if intent.pass_through:
        return [Intent(pass_through=((m, tree.node(m).calls - 1),)) for m in pass_through_targets(tree)]
    if intent.frozen_elements:
        # the same share of the parameter's entries (clip-norm needs the frozen ones to weigh)
        param, indices = intent.frozen_elements[0]
        share = len(indices) / math.prod(trigger_shape(trigger, param))
        out = []
        for owner in element_owners(tree):
            name, shape = tree.node(owner).params[0]
            count = max(1, round(share * math.prod(shape)))
            out.append(Intent(frozen_elements=((f"{owner}.{name}", first_indices(shape, count)),)))
        return out
    return [Intent(reparameterized=(r,)) for r in reparam_targets(tree)]


def trigger_shape(trigger: Scenario, param: str) -> tuple[int, ...]:
    return tree_of(trigger).parameters[param]


def first_indices(shape: tuple[int, ...], count: int) -> tuple[tuple[int, ...], ...]:
    """The first ``count`` entries of a tensor of ``shape``, in row-major order."""
    out = []
    for flat in range(count):
        index = []
        for size in reversed(shape):
            index.append(flat % size)
            flat //= size
        out.append(tuple(reversed(index)))
    return tuple(out)


def entry(name: str) -> CatalogEntry:
    for e in CATALOG:
        if e.name == name:
            return e
    raise KeyError(name)
