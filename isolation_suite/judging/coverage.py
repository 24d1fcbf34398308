"""Coverage of a user's model: every place an intent can point is judged, and the search says so.

A random search over a real model's tree reaches some modules many times and others never (a
60-example search judges a dozen distinct frozen sets of a BERT with forty modules). So before
the random search, each *target* of each capability is judged once, deterministically:

* ``FREEZE_MODULE``: every module that can be frozen (``tree.freeze_targets``: leaves, containers,
  a never-called ``nn.ModuleList`` or ``nn.ModuleDict``, the root's children);
* ``FREEZE_SCHEDULE``: each of them frozen, thawed at step 2 and frozen again at step 3;
* ``PASS_THROUGH``: every call (every use) of every module called more than once;
* ``FREEZE_ELEMENTS``: every parameter of a called module, its first and last entry frozen;
* ``REPARAMETERIZE``: every layer a reparameterization can wrap.

In a costly mode (``compile``) a share of the targets is judged this way (see
:func:`coverage_examples`). The coverage examples train in float64 (a training-mode difference in a
freshly initialised transformer, whose logits are about 1e-3, moves the loss by a few 1e-6: under
float32's tolerance, well over float64's), with plain SGD for two steps, the input needing gradient where it can.
:func:`targets_of` says which targets a judged scenario reached, so a search counts its coverage
over every example it judged, trigger, coverage and generated alike.
"""
from __future__ import annotations

from typing import Iterable

from isolation_suite.execution.modes import MODE_BY_KIND
from isolation_suite.spec.scenario import Change, Data, Intent, Mode, OptimizerRecipe, Scenario
from isolation_suite.technique import Capability
from isolation_suite.model.tree import ModelTree, targets_for

#: what a report calls each capability's targets
TARGET_NAMES = {
    Capability.FREEZE_MODULE: "freeze targets",
    Capability.FREEZE_SCHEDULE: "scheduled freeze targets",
    Capability.PASS_THROUGH: "pass-through calls",
    Capability.FREEZE_ELEMENTS: "element-frozen parameters",
    Capability.REPARAMETERIZE: "reparameterized layers",
}
COVERAGE_RECIPE = OptimizerRecipe("SGD", (("lr", 0.1),))


def targets(tree: ModelTree, capability: Capability) -> tuple:
    """Every target of ``capability`` in ``tree``, in tree order: the modules ``tree.targets_for``
    offers, each call of a pass-through module as ``(path, use)``, each parameter of an element owner."""
    modules = targets_for(tree, capability)
    if capability is Capability.PASS_THROUGH:
        return tuple((path, use) for path in modules for use in range(tree.node(path).calls))
    if capability is Capability.FREEZE_ELEMENTS:
        return tuple(f"{owner}.{name}" for owner in modules for name, _ in tree.node(owner).params)
    return tuple(modules)


def targets_of(scenario: Scenario, capability: Capability) -> set:
    """The targets of ``capability`` that ``scenario``'s intents point at."""
    out: set = set()
    for intent in scenario.intents:
        if capability in (Capability.FREEZE_MODULE, Capability.FREEZE_SCHEDULE):
            if capability is Capability.FREEZE_MODULE or scenario.schedule:
                out.update(intent.frozen_modules)
        elif capability is Capability.PASS_THROUGH:
            out.update(intent.pass_through)
        elif capability is Capability.FREEZE_ELEMENTS:
            out.update(path for path, _ in intent.frozen_elements)
        else:
            out.update(intent.reparameterized)
    return out


def _intent(capability: Capability, target, shape: tuple[int, ...] = ()) -> Intent:
    if capability in (Capability.FREEZE_MODULE, Capability.FREEZE_SCHEDULE):
        return Intent(frozen_modules=(target,))
    if capability is Capability.PASS_THROUGH:
        return Intent(pass_through=(target,))
    if capability is Capability.FREEZE_ELEMENTS:
        first, last = tuple(0 for _ in shape), tuple(s - 1 for s in shape)
        return Intent(frozen_elements=((target, tuple(dict.fromkeys((first, last)))),))
    return Intent(reparameterized=(target,))


def coverage_mode(kind: str) -> Mode:
    """Where a coverage example runs the mode: over the whole model (a checkpoint non-reentrant, so
    that what is judged is the target, not a starved reentrant region)."""
    return Mode(kind)  # every option at its default: no target, use_reentrant=False


def coverage_examples(model: str, tree: ModelTree, capabilities: Iterable[Capability],
                      mode: str = "eager") -> tuple[Scenario, ...]:
    """One scenario per target of each capability (in capability order, then tree order). A mode
    whose runs cost many eager ones (``ModeInfo.example_share`` below 1: ``compile``) judges that
    share of the targets, spread over the tree (every tenth for ``compile``); the coverage line
    then says how many were reached."""
    data = Data(1, 0, tree.float_inputs, "mse")
    every = max(1, round(1 / MODE_BY_KIND[mode].example_share))
    out: dict[Scenario, None] = {}
    for capability in sorted(capabilities, key=lambda c: c.value):
        scheduled = capability is Capability.FREEZE_SCHEDULE
        for target in targets(tree, capability)[::every]:
            shape = tree.parameters.get(target, ()) if capability is Capability.FREEZE_ELEMENTS else ()
            intent = _intent(capability, target, shape)
            schedule = (Change(2, ()), Change(3, intent.frozen_modules)) if scheduled else ()
            out[Scenario(None, intent, COVERAGE_RECIPE, data, 3 if scheduled else 2, 1, "float64", 0, model,
                         coverage_mode(mode), schedule)] = None
    return tuple(out)


class Coverage:
    """Which targets of each capability the examples judged so far reached, out of how many."""

    def __init__(self, tree: ModelTree, capabilities: Iterable[Capability]):
        self.all = {c: targets(tree, c) for c in sorted(capabilities, key=lambda c: c.value)}
        self.reached: dict[Capability, set] = {c: set() for c in self.all}

    def note(self, scenario: Scenario) -> None:
        for capability, every in self.all.items():
            self.reached[capability] |= targets_of(scenario, capability) & set(every)

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{"freeze targets": (judged, total), ...}``"""
        return {TARGET_NAMES[c]: (len(self.reached[c]), len(every)) for c, every in self.all.items()}

    def missed(self) -> dict[str, list]:
        return {TARGET_NAMES[c]: [t for t in every if t not in self.reached[c]] for c, every in self.all.items()}


def coverage_line(counts: dict[str, tuple[int, int]]) -> str:
    """``freeze targets judged: 14 of 14``"""
    return "; ".join(f"{name} judged: {done} of {total}" for name, (done, total) in counts.items())
