"""Whole scenarios: an architecture, an intent the capabilities can express, an optimizer, data."""
from __future__ import annotations

from typing import Iterable

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import dataclasses

from isolation_suite.model.factory import factory_tree
from isolation_suite.spec import kinds as layer_kinds
from isolation_suite.spec.mode_kinds import BY_KIND as MODE_KIND
from isolation_suite.spec.mode_kinds import DEFAULT as DEFAULT_MODE
from isolation_suite.spec import hf
from isolation_suite.spec.scenario import (COMPILE_BACKENDS, DTYPES, LAYER_KINDS, LOSSES, MODE_KINDS, Architecture, Change,
                                          Data, Intent, Mode, Scenario)
from isolation_suite.technique import Capability
from isolation_suite.model.tree import (ModelTree, architecture_tree, element_owners, freeze_targets, leaves_parameters_unused,
                   mode_targets, pass_through_targets, reparam_targets, region_needs_gradient, split_obstacle)

from isolation_suite.strategies._validate import check_choice, check_int
from isolation_suite.strategies.architectures import architectures
from isolation_suite.strategies.elements import element_indices
from isolation_suite.strategies.hf import family_fits, hf_models
from isolation_suite.strategies.optimizers import optimizer_recipes

DEVICES = ("cpu", "cuda")


def as_capabilities(capabilities: Iterable | None) -> frozenset[Capability]:
    """Validate ``capabilities`` (members or their names); ``None`` means all of them."""
    if capabilities is None:
        return frozenset(Capability)
    if isinstance(capabilities, (str, Capability)):
        capabilities = (capabilities,)
    out = set()
    for c in capabilities:
        try:
            out.add(Capability(c.value if isinstance(c, Capability) else str(c).upper()))
        except ValueError:
            raise InvalidArgument(
                f"capabilities contains {c!r}, which is not one of {[x.value for x in Capability]}") from None
    if not out:
        raise InvalidArgument("capabilities must not be empty")
    return frozenset(out)


@st.composite
def intents(draw, tree: ModelTree | Architecture, capabilities: frozenset[Capability]) -> Intent:
    """Draw an :class:`Intent` over a model's tree (a generated architecture's or a user model's),
    using each of ``capabilities`` at least once where the tree allows.

    Modules at any level can be frozen (a leaf or a container) or passed through (any module called
    more than once); isolated sets never overlap, tied parameters are never split between a frozen
    and a trainable module, and at least one module with parameters keeps training
    (``isolation_suite.model.tree`` says where each kind of intent can point).
    """
    if isinstance(tree, Architecture):
        tree = architecture_tree(tree)
    claimed: list[str] = []
    kw: dict = {}

    if Capability.PASS_THROUGH in capabilities:
        reused = pass_through_targets(tree)
        if reused:
            path = draw(st.sampled_from(reused))
            calls = tree.node(path).calls
            chosen = draw(st.lists(st.integers(0, calls - 1), min_size=1, max_size=calls, unique=True))
            kw["pass_through"] = tuple((path, u) for u in sorted(chosen))
            claimed.append(path)

    if Capability.REPARAMETERIZE in capabilities:
        targets = reparam_targets(tree, claimed)
        if targets:
            chosen = draw(st.lists(st.sampled_from(targets), min_size=1, max_size=2, unique=True))
            kw["reparameterized"] = tuple(chosen)
            claimed.extend(chosen)

    if Capability.FREEZE_ELEMENTS in capabilities:
        targets = element_owners(tree, claimed)
        if targets:
            path = draw(st.sampled_from(targets))
            name, shape = draw(st.sampled_from(tree.node(path).params))
            kw["frozen_elements"] = ((f"{path}.{name}", draw(element_indices(shape))),)
            claimed.append(path)

    if Capability.FREEZE_MODULE in capabilities or Capability.FREEZE_SCHEDULE in capabilities:
        candidates = freeze_targets(tree, claimed)
        if candidates:
            first = draw(st.sampled_from(candidates))
            frozen = [first]
            rest = freeze_targets(tree, claimed + [first])
            if rest and draw(st.integers(0, 3)) == 3:
                frozen.append(draw(st.sampled_from(rest)))
            kw["frozen_modules"] = tuple(frozen)
    return Intent(**kw)


@st.composite
def _model_scenarios(draw, model: str, chosen: frozenset[Capability], dtypes, devices, max_steps: int) -> Scenario:
    tree = factory_tree(model)
    return Scenario(
        architecture=None,
        intent=draw(intents(tree, chosen)),
        optimizer=draw(optimizer_recipes(devices=devices)),
        data=Data(batch=1, seed=draw(st.integers(0, 2**16)),
                  input_requires_grad=tree.float_inputs and draw(st.sampled_from((True, False))),
                  loss=draw(st.sampled_from(LOSSES))),
        steps=draw(st.integers(1, max_steps)),
        micro_batches=draw(st.integers(1, 2)),
        dtype=draw(st.sampled_from(dtypes)),
        init_seed=draw(st.integers(0, 2**16)),
        model=model,
    )


#: the modes whose ``Mode`` carries a compile backend
BACKEND_MODES = ("compile",)


@st.composite
def execution_modes(draw, tree: ModelTree | Architecture, kinds: Iterable[str] = MODE_KINDS, *,
                    input_requires_grad: bool = True, intent: Intent = Intent(),
                    backends: Iterable[str] = ("aot_eager",)) -> Mode:
    """Draw a :class:`isolation_suite.spec.scenario.Mode` of one of ``kinds`` for a model with this tree.

    Shrinks toward the first kind, the whole model and ``use_reentrant=False``. A reentrant
    checkpoint is drawn only where its region's input needs gradient when nothing is frozen:
    otherwise the region trains in no training loop at all, isolated or not. A ``ddp`` mode draws
    ``find_unused_parameters`` and ``static_graph``; where ``intent`` itself leaves a parameter
    without gradient (a module passed through at every call) one of them is True, as DDP requires
    of any user whose model does that. An ``fsdp`` mode draws whether the containers are sharded on
    their own and ``reshard_after_forward``. A ``compile`` mode's backend is one of ``backends``
    (shrinking toward the first).
    """
    kinds = check_choice("modes", kinds, MODE_KINDS)
    backends = check_choice("backends", backends, COMPILE_BACKENDS)
    tree = architecture_tree(tree) if isinstance(tree, Architecture) else tree
    kind = draw(st.sampled_from(kinds))
    mode = MODE_DRAWS[kind](draw, kind, tree, input_requires_grad, intent)
    if kind in BACKEND_MODES:
        mode = dataclasses.replace(mode, backend=draw(st.sampled_from(backends)))
    return mode


# --- how each mode's options are drawn: kind -> (draw, kind, tree, input_requires_grad, intent) -> Mode ---

def _no_options(draw, kind: str, tree: ModelTree, input_requires_grad: bool, intent: Intent) -> Mode:
    return Mode(kind)


def _target(draw, kind: str, tree: ModelTree, input_requires_grad: bool, intent: Intent) -> Mode:
    """A region: the whole model or a called module with modules below it."""
    return Mode(kind, draw(st.sampled_from(mode_targets(tree))))


def _checkpoint(draw, kind: str, tree: ModelTree, input_requires_grad: bool, intent: Intent) -> Mode:
    target = draw(st.sampled_from(mode_targets(tree)))
    reentrant = draw(st.booleans()) and region_needs_gradient(tree, target, Intent(), input_requires_grad)
    return Mode(kind, target, reentrant)


def _ddp(draw, kind: str, tree: ModelTree, input_requires_grad: bool, intent: Intent) -> Mode:
    find_unused = draw(st.booleans())
    needed = not find_unused and leaves_parameters_unused(tree, intent)
    return Mode(kind, find_unused=find_unused, static_graph=needed or draw(st.booleans()))


def _fsdp(draw, kind: str, tree: ModelTree, input_requires_grad: bool, intent: Intent) -> Mode:
    """Shrinks toward the root alone, resharded after forward (FSDP2's default)."""
    return Mode(kind, nested=draw(st.booleans()), keep_gathered=draw(st.booleans()))


MODE_DRAWS = {"eager": _no_options, "checkpoint": _checkpoint, "compile": _target, "autocast": _no_options,
              "ddp": _ddp, "fsdp": _fsdp}
assert tuple(MODE_DRAWS) == MODE_KINDS, "every execution mode says how its options are drawn"


def _requirements(capabilities: frozenset[Capability]) -> frozenset[str]:
    need = set()
    if Capability.PASS_THROUGH in capabilities:
        need.add("reuse")
    if Capability.REPARAMETERIZE in capabilities:
        need.add("reparam")
    if capabilities & {Capability.FREEZE_MODULE, Capability.FREEZE_ELEMENTS, Capability.FREEZE_SCHEDULE}:
        need.add("trainable_pair")
    return frozenset(need)


@st.composite
def scenarios(draw, capabilities: Iterable | None = None, dtypes: Iterable[str] = DTYPES,
              devices: Iterable[str] = ("cpu",), *, max_blocks: int = 3, max_steps: int = 4,
              kinds: Iterable[str] = LAYER_KINDS, model: str | None = None,
              modes: Iterable[str] = (DEFAULT_MODE,), backends: Iterable[str] = ("aot_eager",),
              real_models: bool = False) -> Scenario:
    """Draw a :class:`isolation_suite.Scenario` whose intent uses only ``capabilities``.

    ``devices`` restricts optimizer variants to those every listed device runs.
    Shrinks toward one small layer, one step, SGD, float32. With ``model`` (a factory,
    ``"pkg.mod:factory"``, see :mod:`isolation_suite.model.factory`) the model is the user's and only the
    intent over its tree, the optimizer recipe, the loop and the seeds are drawn; ``model="hf:random"``
    draws a tiny ``transformers`` configuration per example (:func:`~isolation_suite.strategies.hf.hf_models`)
    and carries its name. ``real_models``: without ``model``, about one example in
    ``REAL_MODEL_ODDS`` is such a configuration instead of a generated tree (shrinking toward the tree).
    ``backends``: what a ``compile`` mode compiles with.

    >>> from strategies import scenarios
    >>> scenarios(capabilities=["FREEZE_MODULE"])  # doctest: +ELLIPSIS
    scenarios(...)
    """
    caps = as_capabilities(capabilities)
    dtypes = check_choice("dtypes", dtypes, DTYPES)
    devices = check_choice("devices", devices, DEVICES)
    check_int("max_steps", max_steps, 1, 64)
    kinds = check_choice("kinds", kinds, LAYER_KINDS)
    ordered = sorted(caps, key=lambda c: c.value)
    if len(ordered) > 1:
        chosen = frozenset(draw(st.lists(st.sampled_from(ordered), min_size=1, unique=True)))
    else:
        chosen = frozenset(ordered)
    modes = check_choice("modes", modes, MODE_KINDS)
    backends = check_choice("backends", backends, COMPILE_BACKENDS)
    # a mode of several ranks shapes the whole scenario (its batch, layers, dtype): it is drawn first
    split = tuple(m for m in modes if MODE_KIND[m].distributed)
    if split:
        kind = modes[0] if len(modes) == 1 else draw(st.sampled_from(modes))
        if kind in split and model == hf.RANDOM:
            raise InvalidArgument(f"the {kind} mode does not draw {hf.RANDOM}: name one configuration")
        if kind in split:
            return draw(_split_scenarios(kind, model, chosen, dtypes, devices, max_blocks, max_steps, kinds))
        modes = tuple(m for m in modes if m not in split)
    if model == hf.RANDOM or (model is None and real_models and _draws_real_model(draw, chosen)):
        model = draw(hf_models(chosen))
    if model is not None:
        scenario = draw(_model_scenarios(model, chosen, dtypes, devices, max_steps))
        tree = factory_tree(model)
    else:
        scenario = _generated(draw, chosen, dtypes, devices, max_blocks, max_steps, kinds)
        tree = architecture_tree(scenario.architecture)
    if Capability.FREEZE_SCHEDULE in chosen:
        scenario = draw(with_freeze_schedule(tree, scenario))
    if modes == (DEFAULT_MODE,):
        return scenario
    mode = draw(execution_modes(tree, modes, input_requires_grad=scenario.data.input_requires_grad,
                                backends=backends))
    return dataclasses.replace(scenario, mode=mode)


#: beside generated trees, one example in this many is a random ``transformers`` configuration
REAL_MODEL_ODDS = 4


def _draws_real_model(draw, chosen: frozenset[Capability]) -> bool:
    """Whether this example is a random ``transformers`` configuration (where one can host the intent)."""
    return family_fits(chosen) and draw(st.integers(0, REAL_MODEL_ODDS - 1)) == REAL_MODEL_ODDS - 1


#: layers that normalise with the statistics of the batch they see in training mode: a rank sees its
#: share of it, so its output differs from the whole batch's by design (SyncBatchNorm does not run on
#: the CPU)
BATCH_STATISTICS_KINDS = layer_kinds.BATCH_STATISTICS_KINDS


@st.composite
def _split_scenarios(draw, kind: str, model: str | None, chosen, dtypes, devices, max_blocks: int, max_steps: int,
                     kinds) -> Scenario:
    """A scenario in a mode of several ranks (``ddp``, ``fsdp``), in the mode's dtypes
    (``ModeKind.dtypes``: float32) where asked for. A generated model draws no BatchNorm (a BatchNorm
    inside a frozen module is judged by the trigger examples) and the drawn batch times the ranks, so
    each rank trains on what one process would; a user's model (``model``) splits its own example
    batch (``factory.batch_dims``), where it can (``tree.split_obstacle``)."""
    info = MODE_KIND[kind]
    dtypes = tuple(d for d in dtypes if d in info.dtypes) or dtypes
    if model is None:
        scenario = _generated(draw, chosen, dtypes, devices, max_blocks, max_steps,
                              tuple(k for k in kinds if k not in BATCH_STATISTICS_KINDS))
        tree, batch = architecture_tree(scenario.architecture), info.ranks * scenario.data.batch
    else:
        tree = factory_tree(model)
        obstacle = split_obstacle(tree, info.ranks)
        if obstacle:
            raise InvalidArgument(f"the {kind} mode splits the batch of {model} between {info.ranks} processes, "
                                  f"but {obstacle}")
        scenario = draw(_model_scenarios(model, chosen, dtypes, devices, max_steps))
        batch = scenario.data.batch
    if Capability.FREEZE_SCHEDULE in chosen:
        scenario = draw(with_freeze_schedule(tree, scenario))
    mode = draw(execution_modes(tree, (kind,), intent=scenario.intent))
    data = dataclasses.replace(scenario.data, batch=batch)
    return dataclasses.replace(scenario, data=data, mode=mode, optimizer=draw(_mode_recipe(info, scenario, devices)))


def _mode_recipe(info, scenario: Scenario, devices) -> st.SearchStrategy:
    """The scenario's recipe, or, in a mode that shards the parameters, one drawn afresh among those
    that can step them, with the same scheduler (a freeze schedule takes none)."""
    if not info.shards_parameters:
        return st.just(scenario.optimizer)
    return optimizer_recipes(devices=devices, sharded=True, schedulers=(scenario.optimizer.scheduler,))


@st.composite
def freeze_schedules(draw, tree: ModelTree | Architecture, steps: int, claimed: Iterable[str] = ()) -> tuple:
    """Draw a freeze schedule over ``steps`` steps: up to two step boundaries, each with the frozen
    modules from then on (none: everything thaws; the same rules as an intent's frozen modules:
    something with parameters always trains). Shrinks toward one boundary that thaws everything;
    with one step there is no boundary."""
    tree = architecture_tree(tree) if isinstance(tree, Architecture) else tree
    claimed = list(claimed)
    if steps < 2:
        return ()
    boundaries = draw(st.lists(st.integers(2, steps), min_size=1, max_size=2, unique=True))
    changes = []
    for step in sorted(boundaries):
        frozen: list[str] = []
        candidates = freeze_targets(tree, claimed)
        if candidates and draw(st.booleans()):
            frozen.append(draw(st.sampled_from(candidates)))
        changes.append(Change(step, tuple(frozen)))
    return tuple(changes)


@st.composite
def with_freeze_schedule(draw, tree: ModelTree, scenario: Scenario) -> Scenario:
    """``scenario`` with a drawn freeze schedule (and no lr scheduler, which a schedule excludes)."""
    intent = scenario.intent
    claimed = [p for p, _ in intent.pass_through] + list(intent.reparameterized) \
        + [p.rpartition(".")[0] for p, _ in intent.frozen_elements]
    schedule = draw(freeze_schedules(tree, scenario.steps, claimed))
    if not schedule:
        return scenario
    recipe = dataclasses.replace(scenario.optimizer, scheduler="none")
    return dataclasses.replace(scenario, optimizer=recipe, schedule=schedule)


def _generated(draw, chosen, dtypes, devices, max_blocks: int, max_steps: int, kinds) -> Scenario:
    arch = draw(architectures(max_blocks=max_blocks, kinds=tuple(kinds), require=_requirements(chosen)))
    intent = draw(intents(arch, chosen))
    has_batchnorm = any(l.kind in BATCH_STATISTICS_KINDS for l in arch.layers)
    tokens = arch.input_kind == "tokens"
    data = Data(
        # BatchNorm in training mode needs more than one value per channel
        batch=draw(st.integers(2 if has_batchnorm else 1, 4)),
        seed=draw(st.integers(0, 2**16)),
        input_requires_grad=False if tokens else draw(st.sampled_from((True, False))),
        loss=draw(st.sampled_from(LOSSES)),
    )
    return Scenario(
        architecture=arch,
        intent=intent,
        optimizer=draw(optimizer_recipes(devices=devices)),
        data=data,
        steps=draw(st.integers(1, max_steps)),
        micro_batches=draw(st.integers(1, 2)),
        dtype=draw(st.sampled_from(dtypes)),
        init_seed=draw(st.integers(0, 2**16)),
    )
