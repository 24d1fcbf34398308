"""Small helpers the catalog techniques share (they never touch the reference)."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from isolation_suite.spec.scenario import Intent
from isolation_suite.technique import module_param_name


def frozen_parameters(model: nn.Module, intent: Intent) -> Iterator[nn.Parameter]:
    for path in intent.frozen_modules:
        yield from model.get_submodule(path).parameters()


def replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def element_targets(model: nn.Module, intent: Intent) -> Iterator[tuple[nn.Module, str, tuple]]:
    """``(module, param name, indices)`` for every frozen-elements entry of the intent."""
    for path, indices in intent.frozen_elements:
        module_path, name = module_param_name(path)
        yield model.get_submodule(module_path), name, indices
