"""The oracle: an independent implementation of each intent's exact semantics.

Built only from torch primitives (``torch.func.functional_call``, ``detach``,
``torch.where``); it imports nothing from the technique catalog.

Isolation belongs to the *parameter*, not to a call: every forward of the reference runs under
one ``functional_call`` of the whole model whose overrides make

* a frozen module's parameters (under every name they have: ties included) ``p.detach()`` and its
  buffers copies: constants wherever they are read, in the module's own calls, in a functional
  read elsewhere (``F.linear(h, self.wte.weight)``) and through ties; gradient still reaches the
  module's input; nothing of theirs enters the optimizer or grad-norm clipping;
* a frozen module and every module below it run in eval mode for the whole forward (BatchNorm
  uses its running stats, Dropout is off), wherever they are called from;
* an element-frozen parameter ``where(mask, W0, W_raw)`` at every read, so the entries are
  constants that get exactly zero gradient and take no part in weight decay or clipping;
* a reparameterized module is not touched: it trains exactly like the unwrapped module.

Pass-through is the one semantics that belongs to a call: at the ``use``-th call of a module
(leaf or container) the reference takes part through the same interception as a technique
(``tree.Router``) and runs the module's ordinary forward with every parameter below it detached
for that call only (buffers are the real ones).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from isolation_suite.spec.scenario import Intent
from isolation_suite.technique import Role, element_mask
from isolation_suite.model.tree import CallSite


@contextlib.contextmanager
def eval_mode(modules: list[nn.Module]) -> Iterator[None]:
    """Run ``modules`` (and everything below them) in eval mode, then put every flag back."""
    below = {id(m): m for module in modules for m in module.modules()}.values()
    modes = [(m, m.training) for m in below]
    for m in below:
        m.training = False
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def frozen_tensors(model: nn.Module, intent: Intent) -> tuple[set[int], set[int]]:
    """The ids of the parameters and of the buffers that ``intent``'s frozen modules hold (a tied
    parameter is frozen when any module holding it is)."""
    modules = [model.get_submodule(path) for path in intent.frozen_modules]
    return ({id(p) for m in modules for p in m.parameters()}, {id(b) for m in modules for b in m.buffers()})


class Reference:
    """Drives the runner the way the intent's semantics say a perfect technique would."""

    guarded = False  # an exception here is a harness bug: let it propagate
    keywords = True  # ``call`` receives the intercepted call's keyword arguments

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

    def reads(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What every read of a parameter or buffer sees during one forward (``functional_call``'s
        overrides, by first name: ``tie_weights`` gives a tied parameter's other names the same)."""
        frozen, frozen_buffers = frozen_tensors(model, self.intent)
        out = {path: p.detach() if id(p) in frozen else self._effective(path, p)
               for path, p in model.named_parameters() if id(p) in frozen or path in self.masks}
        out.update((path, b.detach().clone()) for path, b in model.named_buffers() if id(b) in frozen_buffers)
        return out

    def forward(self, model: nn.Module, inputs: tuple) -> Any:
        frozen = [model.get_submodule(path) for path in self.intent.frozen_modules]
        with eval_mode(frozen):
            return functional_call(model, self.reads(model), inputs, tie_weights=True, strict=False)

    def call(self, site: CallSite, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if site.role is Role.PASS_THROUGH:
            # the parameters as this forward reads them (frozen entries included), constant for this call
            return functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, args, kwargs)
        if site.role is Role.FROZEN:
            # cuDNN's RNN backward refuses eval mode; the native kernel computes the same function
            with torch.backends.cudnn.flags(enabled=False):
                return module(*args, **kwargs)
        return module(*args, **kwargs)

    def make_optimizer(self, model: nn.Module, intent: Intent, build: Callable) -> torch.optim.Optimizer:
        # frozen modules are constants: they are not handed to the optimizer at all
        frozen, _ = frozen_tensors(model, intent)
        return build([p for p in model.parameters() if id(p) not in frozen])

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def on_intent_change(self, model: nn.Module, optimizer: torch.optim.Optimizer, old: Intent,
                         new: Intent) -> None:
        """A freeze schedule's step boundary. A parameter that becomes trainable joins the optimizer
        in a new group with the recipe's hyper-parameters and fresh state (no momentum, step 0), as
        ``add_param_group`` does; one that becomes frozen leaves it, state, gradient and all (a
        constant has no gradient: the last step's must not count in the loop's gradient-norm
        clipping, which reads every parameter's); the others keep theirs. (The forward follows the new
        intent: a frozen module is a constant function again.)"""
        self.intent = new
        was, now = frozen_tensors(model, old)[0], frozen_tensors(model, new)[0]
        thawed = [p for p in model.parameters() if id(p) in was - now]
        frozen = now - was
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in frozen]
        for p in [p for p in optimizer.state if id(p) in frozen]:
            del optimizer.state[p]
        for p in model.parameters():
            if id(p) in frozen:
                p.grad = None
        if thawed:
            optimizer.add_param_group({"params": thawed})

    def effective(self, path: str, value: torch.Tensor) -> torch.Tensor:
        return self._effective(path, value)
