"""Pure predicates over a scenario: the conditions that make a known-bad technique fail.

The catalog attaches them to each row so a reader (and the gate) can see *why*
a minimal counterexample fails.
"""
from __future__ import annotations

import math

from ..build import call_sites, param_shapes
from ..scenario import Scenario
from ..technique import Role

TRAIN_MODE_KINDS = ("batchnorm1d", "batchnorm2d", "dropout")


def frozen_has_train_mode_layer(s: Scenario) -> bool:
    """A BatchNorm or Dropout inside a frozen module."""
    return any(s.intent.is_frozen_module(l.path) and l.kind in TRAIN_MODE_KINDS for l in s.architecture.layers)


def frozen_has_batchnorm(s: Scenario) -> bool:
    return any(s.intent.is_frozen_module(l.path) and l.kind.startswith("batchnorm") for l in s.architecture.layers)


def lr_is_rewritten(s: Scenario) -> bool:
    """OneCycleLR sets every group's lr; Rprop clamps its step size to at least 1e-6."""
    return s.optimizer.scheduler == "OneCycleLR" or s.optimizer.name == "Rprop"


def counts_frozen_gradients(s: Scenario) -> bool:
    """Gradient-norm clipping sees the gradients of entries the optimizer should ignore."""
    return s.optimizer.clip == "norm"


def names_collide(s: Scenario) -> bool:
    """A frozen module's name is a substring of a trainable parameter's name (``fc1`` in ``fc10.weight``)."""
    params = [f"{l.path}.x" for l in s.architecture.layers]
    return any(f in p and not s.intent.is_frozen_param(p) for f in s.intent.frozen_modules for p in params)


def upstream_needs_gradient(s: Scenario) -> bool:
    """Something before an isolated call site needs gradient: the input or a trainable layer."""
    sites = call_sites(s.architecture, s.intent)
    isolated = [x.index for x in sites if x.role is not Role.NORMAL]
    return s.data.input_requires_grad or any(
        x.role is Role.NORMAL and x.kind != "dropout" for x in sites if isolated and x.index < max(isolated))


def input_needs_no_gradient(s: Scenario) -> bool:
    return not s.data.input_requires_grad


def weight_decay_or_stale_gradients(s: Scenario) -> bool:
    return s.optimizer.weight_decay > 0 or not s.optimizer.set_to_none or s.micro_batches > 1


def weight_decay(s: Scenario) -> bool:
    return s.optimizer.weight_decay > 0


def elements_module_reused(s: Scenario) -> bool:
    owners = {p.rpartition(".")[0] for p, _ in s.intent.frozen_elements}
    return sum(path in owners for path, _ in s.architecture.call_sites) >= 2


def has_multi_element_parameter(s: Scenario) -> bool:
    """``p not in params`` compares tensors with ``==``: more than one element makes that crash."""
    return any(math.prod(shape) > 1 for l in s.architecture.layers for _, shape in param_shapes(l.kind, l.args))


def reparameterized(s: Scenario) -> bool:
    return bool(s.intent.reparameterized)
