"""The oracle: an independent implementation of each intent's exact semantics.

Built only from torch primitives (``torch.func.functional_call``, ``detach``,
``torch.where``); it imports nothing from the technique catalog. It takes part in the forward
through the same interception as a technique (``tree.Router``): at each call of a module the
intent names (for a frozen ``nn.ModuleList``, never called itself, at each call of its children).

* frozen module (a leaf or a whole container): an eval-mode constant function; gradient still reaches its input;
  its parameters and buffers never change;
* pass-through call (the ``use``-th call of a module, leaf or container): the module's ordinary
  forward with every parameter below it detached for that call only (buffers are the real ones);
* frozen elements: ``W = where(mask, W0, W_raw)``, so the entries are constants
  that get zero gradient and take no part in weight decay or clipping;
* reparameterized module: trains exactly like the unwrapped module.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from .scenario import Intent
from .technique import Role, element_mask
from .tree import CallSite


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run ``module`` (and its children) in eval mode, then put every flag back."""
    modes = [(m, m.training) for m in module.modules()]
    module.train(False)
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


class Reference:
    """Drives the runner the way the intent's semantics say a perfect technique would."""

    guarded = False  # an exception here is a harness bug: let it propagate

    def __init__(self) -> None:
        self.masks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, model: nn.Module, intent: Intent) -> None:
        self.intent = intent
        params = dict(model.named_parameters())
        for path, indices in intent.frozen_elements:
            raw = params[path]
            self.masks[path] = (element_mask(raw, indices), raw.detach().clone())

    def _effective(self, path: str, raw: torch.Tensor) -> torch.Tensor:
        if path in self.masks:
            mask, initial = self.masks[path]
            return torch.where(mask, initial, raw)
        return raw

    def call(self, site: CallSite, module: nn.Module, args: tuple) -> Any:
        constant = site.role in (Role.FROZEN, Role.PASS_THROUGH)
        if not constant and not any(path.startswith(site.path + ".") for path in self.masks):
            return module(*args)  # nothing to isolate at this call: the plain forward
        overrides = {}
        for name, p in module.named_parameters():
            value = self._effective(f"{site.path}.{name}" if site.path else name, p)
            overrides[name] = value.detach() if constant else value
        if site.role is Role.FROZEN:
            # cuDNN's RNN backward refuses eval mode; the native kernel computes the same function
            with eval_mode(module), torch.backends.cudnn.flags(enabled=False):
                return functional_call(module, overrides, args)
        return functional_call(module, overrides, args)

    def make_optimizer(self, model: nn.Module, intent: Intent, build: Callable) -> torch.optim.Optimizer:
        # frozen modules are constants: they are not handed to the optimizer at all
        return build([p for path, p in model.named_parameters() if not intent.is_frozen_param(path)])

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def on_intent_change(self, model: nn.Module, optimizer: torch.optim.Optimizer, old: Intent,
                         new: Intent) -> None:
        """A freeze schedule's step boundary. A parameter that becomes trainable joins the optimizer
        in a new group with the recipe's hyper-parameters and fresh state (no momentum, step 0), as
        ``add_param_group`` does; one that becomes frozen leaves it, state and all; the others keep
        theirs. (Routing follows the new intent: a frozen module is a constant function again.)"""
        self.intent = new
        named = dict(model.named_parameters())
        thawed = [p for path, p in named.items() if old.is_frozen_param(path) and not new.is_frozen_param(path)]
        frozen = {id(p) for path, p in named.items() if new.is_frozen_param(path) and not old.is_frozen_param(path)}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in frozen]
        for p in [p for p in optimizer.state if id(p) in frozen]:
            del optimizer.state[p]
        if thawed:
            optimizer.add_param_group({"params": thawed})

    def effective(self, path: str, value: torch.Tensor) -> torch.Tensor:
        return self._effective(path, value)
