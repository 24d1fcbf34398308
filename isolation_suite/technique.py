"""The plug-in contract: what a technique is and how the harness talks to it."""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
from torch import nn

from isolation_suite.model.layers import kind_of
from isolation_suite.spec.kinds import BY_KIND

if TYPE_CHECKING:
    from isolation_suite.spec.scenario import Intent


class Capability(str, enum.Enum):
    """What kind of intent a technique can realise."""

    FREEZE_MODULE = "FREEZE_MODULE"
    PASS_THROUGH = "PASS_THROUGH"
    FREEZE_ELEMENTS = "FREEZE_ELEMENTS"
    REPARAMETERIZE = "REPARAMETERIZE"
    #: frozen modules that change at step boundaries (``Scenario.schedule``): ``on_intent_change``
    FREEZE_SCHEDULE = "FREEZE_SCHEDULE"

    def __repr__(self) -> str:
        return f"Capability.{self.value}"


class Role(str, enum.Enum):
    """How a call site must behave: trains normally, passes gradient only, or is frozen."""

    NORMAL = "NORMAL"
    PASS_THROUGH = "PASS_THROUGH"
    FROZEN = "FROZEN"


OptimizerBuilder = Callable[[Any], torch.optim.Optimizer]


class Technique:
    """Base class for an isolation technique under test.

    Subclasses set ``name`` and ``capabilities`` and override any of the four
    hooks. The harness builds a fresh model per run, then calls ``setup``,
    routes every call site through ``call``, asks ``make_optimizer`` for the
    optimizer and calls ``after_step`` after each ``optimizer.step()`` (and, where
    the frozen set changes mid-training, ``on_intent_change`` at that step boundary).
    """

    name: str = "unnamed"
    capabilities: frozenset[Capability] = frozenset()
    #: invariant ids this technique is known to violate (empty when sound)
    expected_violations: frozenset[str] = frozenset()
    #: further invariant ids it is known to violate under one execution mode only
    #: (``{"checkpoint": frozenset({"trainable-trains"})}``; see ``isolation_suite.execution.modes``)
    mode_violations: Mapping[str, frozenset[str]] = {}
    #: in the ``ddp`` mode, when the user's code wraps the model in DistributedDataParallel:
    #: ``"after_setup"`` (build, set up the isolation, wrap: the usual order) or ``"before_setup"``
    ddp_wrap: str = "after_setup"
    #: where the technique comes from (a seed document id or "")
    seed: str = ""
    #: one line on how it works
    summary: str = ""

    def setup(self, model: nn.Module, intent: "Intent") -> None:
        """Set flags, hooks, wrappers or parametrizations on a fresh model."""

    def call(self, module: nn.Module, args: tuple, role: Role, kwargs: Mapping[str, Any]) -> Any:
        """Run one call site: ``module(*args, **kwargs)`` is the call the model made (``kwargs``: its
        keyword arguments, ``{}`` when none). ``role`` says what the intent wants from it.

        An override with the older three-argument signature ``call(module, args, role)`` still
        works: the keyword arguments then go to the module's own call inside it, so a technique
        that calls the module later (a checkpoint's recomputation) calls it without them."""
        return module(*args, **kwargs)

    def make_optimizer(self, model: nn.Module, intent: "Intent", build: OptimizerBuilder) -> torch.optim.Optimizer:
        """Return an optimizer; ``build(params_or_groups)`` applies the scenario's recipe."""
        return build(model.parameters())

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Runs after every ``optimizer.step()`` (and scheduler step)."""

    def on_intent_change(self, model: nn.Module, optimizer: torch.optim.Optimizer, old: "Intent",
                         new: "Intent") -> torch.optim.Optimizer | None:
        """At a step boundary of a freeze schedule (``FREEZE_SCHEDULE``), before the step's
        ``zero_grad``: make ``new``'s frozen modules frozen and ``old``'s others trainable. Return a
        replacement optimizer, or None to keep ``optimizer``. The default changes nothing."""
        return None

    @property
    def sound(self) -> bool:
        """Sound in plain eager training (``expected_in`` says it per mode)."""
        return not self.expected_violations

    def expected_in(self, mode: str = "eager") -> frozenset[str]:
        """The invariants it is known to violate when the loop runs in ``mode``."""
        return frozenset(self.expected_violations) | frozenset(self.mode_violations.get(mode, ()))

    def __repr__(self) -> str:
        return f"<technique {self.name}>"


def module_param_name(param_path: str) -> tuple[str, str]:
    """Split ``'enc.0.weight'`` into ``('enc.0', 'weight')``."""
    module_path, _, name = param_path.rpartition(".")
    return module_path, name


def reparam_param_name(module: nn.Module) -> str:
    """The weight a reparameterization wraps: ``weight_hh_l0`` for RNNs (as in WeightDropout), else ``weight``."""
    info = BY_KIND.get(kind_of(module))
    return info.reparam_weight if info is not None and info.reparam_weight else "weight"


def element_mask(param: torch.Tensor, indices: Iterable[tuple[int, ...]]) -> torch.Tensor:
    """A bool mask, True at the frozen entries."""
    mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
    for index in indices:
        mask[tuple(index)] = True
    return mask
