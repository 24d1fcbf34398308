"""Pure predicates over a scenario: the conditions that make a known-bad technique fail.

The catalog attaches them to each row so a reader (and the gate) can see *why*
a minimal counterexample fails.
"""
from __future__ import annotations

import math

from isolation_suite.model.factory import tree_of
from isolation_suite.spec.kinds import BATCHNORM_EFFECT
from isolation_suite.spec.optim_info import OPTIMIZER_BY_NAME, SCHEDULER_BY_NAME
from isolation_suite.spec.scenario import Scenario
from isolation_suite.spec.scenario import Intent
from isolation_suite.model.tree import region_needs_gradient, region_trains, shard_units, upstream_of_isolation


def _frozen_nodes(s: Scenario):
    tree = tree_of(s)
    return [n for n in tree.nodes if n.path and s.intent.is_frozen_module(n.path)]


def trains_batch_statistics(s: Scenario) -> bool:
    """A called BatchNorm is outside the frozen modules at some step: it normalises with the statistics
    of the batch it sees, which a rank of a distributed mode sees only its share of."""
    tree = tree_of(s)
    norms = [n.path for n in tree.nodes if n.train_mode == BATCHNORM_EFFECT and n.calls]
    return any(not s.intent_at(step).is_frozen_module(path) for path in norms for step in range(1, s.steps + 1))


def frozen_has_train_mode_layer(s: Scenario) -> bool:
    """A BatchNorm or Dropout (that drops) inside a frozen module."""
    return any(n.train_mode for n in _frozen_nodes(s))


def frozen_has_batchnorm(s: Scenario) -> bool:
    return any(n.train_mode == BATCHNORM_EFFECT for n in _frozen_nodes(s))


def lr_is_rewritten(s: Scenario) -> bool:
    """The optimizer or its scheduler moves a group at lr=0 (``optim_info``: OneCycleLR sets every
    group's lr; Rprop clamps its step size to at least 1e-6)."""
    recipe = s.optimizer
    return bool(OPTIMIZER_BY_NAME[recipe.name].lr_zero_moves or SCHEDULER_BY_NAME[recipe.scheduler].lr_zero_moves)


def counts_frozen_gradients(s: Scenario) -> bool:
    """Gradient-norm clipping sees the gradients of entries the optimizer should ignore."""
    return s.optimizer.clip == "norm"


def names_collide(s: Scenario) -> bool:
    """A frozen module's name is a substring of a trainable parameter's name (``fc1`` in ``fc10.weight``)."""
    params = tree_of(s).parameters
    return any(f in p and not s.intent.is_frozen_param(p) for f in s.intent.frozen_modules for p in params)


def names_miss_a_tie(s: Scenario) -> bool:
    """A frozen module holds a tied parameter that ``named_parameters()`` lists under another
    module's name (a decoder tied to its embedding): a test on names never sees it."""
    tree = tree_of(s)
    return any(not any(f in p for f in s.intent.frozen_modules) for p in tree.frozen_params(s.intent))


def frozen_tie_used_outside(s: Scenario) -> bool:
    """A frozen module holds a parameter that a module outside the frozen ones also holds (a tied
    embedding and head): a technique that only cuts the frozen module's own call leaves the other
    module's use to train it."""
    tree = tree_of(s)
    frozen = s.intent.is_frozen_module
    return any(frozen(later.rpartition(".")[0]) != frozen(earlier.rpartition(".")[0]) for later, earlier in tree.ties)


def upstream_needs_gradient(s: Scenario) -> bool:
    """Something before an isolated call needs gradient: the input or a trainable layer."""
    tree = tree_of(s)
    return (s.data.input_requires_grad and tree.float_inputs) or bool(upstream_of_isolation(tree, s.intent))


def input_needs_no_gradient(s: Scenario) -> bool:
    return not (s.data.input_requires_grad and tree_of(s).float_inputs)


def weight_decay_or_stale_gradients(s: Scenario) -> bool:
    return s.optimizer.weight_decay > 0 or not s.optimizer.set_to_none or s.micro_batches > 1


def weight_decay(s: Scenario) -> bool:
    return s.optimizer.weight_decay > 0


def elements_module_reused(s: Scenario) -> bool:
    tree = tree_of(s)
    return any(tree.node(tree.owner(p)).calls >= 2 for p, _ in s.intent.frozen_elements)


def has_multi_element_parameter(s: Scenario) -> bool:
    """``p not in params`` compares tensors with ``==``: more than one element makes that crash."""
    return any(math.prod(shape) > 1 for shape in tree_of(s).parameters.values())


def reparameterized(s: Scenario) -> bool:
    return bool(s.intent.reparameterized)


def reentrant_checkpoint_starved(s: Scenario) -> bool:
    """A reentrant checkpoint whose region holds trainable parameters gets no input that needs
    gradient once the frozen modules have ``requires_grad=False`` (it would get one with nothing
    frozen): ``torch.utils.checkpoint(use_reentrant=True)`` then gives the region no gradient at all
    (and, where nothing else reaches the loss, backward raises)."""
    mode = s.mode
    if not (mode.info.recomputes and mode.reentrant):
        return False
    tree = tree_of(s)
    needs = s.data.input_requires_grad
    return (region_trains(tree, mode.target, s.intent)
            and region_needs_gradient(tree, mode.target, Intent(), needs)
            and not region_needs_gradient(tree, mode.target, s.intent, needs))


def _boundary_changes(s: Scenario) -> tuple[bool, bool]:
    """(some parameter thaws, some parameter freezes) at a step boundary of the freeze schedule."""
    params = tree_of(s).parameters
    pairs = list(zip(s.intents, s.intents[1:]))
    thaws = any(old.is_frozen_param(p) and not new.is_frozen_param(p) for old, new in pairs for p in params)
    freezes = any(new.is_frozen_param(p) and not old.is_frozen_param(p) for old, new in pairs for p in params)
    return thaws, freezes


def thaws_a_module(s: Scenario) -> bool:
    """A freeze schedule thaws a module with parameters at some step boundary."""
    return _boundary_changes(s)[0]


def refreezes_into_a_moving_optimizer(s: Scenario) -> bool:
    """A schedule freezes a module that trained before, and the optimizer moves a parameter whose
    gradient is zero: ``zero_grad(set_to_none=False)`` leaves it zeros, not None, and momentum, an
    adaptive optimizer's running averages or weight decay act on them (pytorch#83769)."""
    refreezes = _boundary_changes(s)[1]
    recipe = s.optimizer
    moves = recipe.name != "SGD" or recipe.kwargs.get("momentum", 0) or recipe.weight_decay
    return refreezes and not recipe.set_to_none and bool(moves)


def ddp_refreezes_after_wrap(s: Scenario) -> bool:
    """A schedule freezes a module that trained before, after DistributedDataParallel wrapped the model,
    without ``find_unused_parameters``: DDP's reducer still expects its gradient, and the next forward
    raises 'Expected to have finished reduction in the prior iteration' (``static_graph=True``
    does not help: the graph changed)."""
    return s.mode.info.wraps_trainable and _boundary_changes(s)[1] and not s.mode.find_unused


def _pass_through_in_checkpoint(s: Scenario, reentrant: bool) -> bool:
    mode = s.mode
    if not mode.info.recomputes or mode.reentrant != reentrant:
        return False
    return any(mode.target == "" or path == mode.target or path.startswith(mode.target + ".")
               for path, _ in s.intent.pass_through)


def pass_through_recomputed_non_reentrant(s: Scenario) -> bool:
    """A non-reentrant checkpoint recomputes a pass-through call; its recomputation stops as soon as
    every tensor backward needs exists (``torch.utils.checkpoint``'s early stop raises inside the
    region), possibly in the middle of the technique's own code."""
    return _pass_through_in_checkpoint(s, reentrant=False)


def pass_through_in_reentrant_checkpoint(s: Scenario) -> bool:
    """A reentrant checkpoint's region holds a pass-through call: where the region's output comes
    from it, a ``no_grad`` call leaves the recomputation no output that requires grad, and backward
    raises ``none of output has requires_grad=True``."""
    return _pass_through_in_checkpoint(s, reentrant=True)


def ddp_reduces_unused(s: Scenario) -> bool:
    """The ``ddp`` mode with neither ``find_unused_parameters`` nor ``static_graph``: DDP expects a
    gradient for every parameter that required one when it was wrapped. One that gets none leaves its
    bucket unreduced (the other gradients in it stay the rank's own: ``matches-reference``)."""
    return s.mode.info.wraps_trainable and not s.mode.find_unused and not s.mode.static_graph


def ddp_unused_raises(s: Scenario) -> bool:
    """As above, with a second forward in the run (a second step or micro-batch): it raises
    'Expected to have finished reduction in the prior iteration'."""
    return ddp_reduces_unused(s) and s.steps * s.micro_batches >= 2


def ddp_thaws_after_wrap(s: Scenario) -> bool:
    """A module thawed after DDP wrapped the model: DDP registered only the parameters that needed
    gradient when it was built, so the thawed module's gradient is never averaged across ranks
    (each rank steps on its own half of the batch)."""
    return s.mode.info.wraps_trainable and thaws_a_module(s)


def checkpointed_inside_pass_through(s: Scenario) -> bool:
    """The checkpointed region is a module passed through at some call, or lies inside one: the
    technique's parameter swap (``functional_call``, toggled flags) is over when backward recomputes
    the region, so the recomputation uses the real parameters. Reentrant: their gradient flows
    (``matches-reference``); non-reentrant: the recomputed tensors' metadata differ (``no-crash``)."""
    mode = s.mode
    if not mode.info.recomputes or mode.target == "":
        return False
    return any(mode.target == path or mode.target.startswith(path + ".") for path, _ in s.intent.pass_through)


def ddp_names_freeze_everything(s: Scenario) -> bool:
    """The ``ddp`` mode where colliding names freeze every parameter: DDP refuses to wrap a model
    with nothing that requires a gradient."""
    if not s.mode.info.wraps_trainable or not names_collide(s):
        return False
    return all(any(f in p for f in s.intent.frozen_modules) for p in tree_of(s).parameters)


def pass_through_sharded_unit(s: Scenario) -> bool:
    """A module passed through at some call is sharded on its own (``fsdp``, ``nested``): when it is
    called, FSDP2's pre-forward hook registers its gathered parameters on it, over whatever the
    technique put there just before the call (``functional_call``'s detached tensors), and flags the
    technique sets before the call land on the sharded parameters, those after it on the gathered ones."""
    if not (s.mode.info.shards_parameters and s.mode.nested):
        return False
    units = shard_units(tree_of(s))
    return any(path in units for path, _ in s.intent.pass_through)


def pass_through_gathered_unit(s: Scenario) -> bool:
    """As ``pass_through_sharded_unit``, with ``reshard_after_forward=False``: after the call the gathered
    parameters stay registered, so a flag set after the call lands on them, not on the sharded ones
    (with resharding, the call returns with the sharded ones registered again)."""
    return pass_through_sharded_unit(s) and s.mode.keep_gathered


def holds_replaced_parameters(s: Scenario) -> bool:
    """The mode replaces every parameter after the technique's setup (``fsdp``: ``fully_shard`` swaps in
    sharded ``DTensor`` parameters): whatever the setup kept of the originals (the tensors themselves,
    hooks registered on them) no longer reaches the parameters that train."""
    return s.mode.info.shards_parameters
