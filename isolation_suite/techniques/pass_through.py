"""Seed 000: use a layer's parameters as constants at one call site only."""
from __future__ import annotations

import torch
from torch.func import functional_call

from isolation_suite.technique import Capability, Role, Technique


class FunctionalDetach(Technique):
    name = "functional_detach"
    seed = "000"
    capabilities = frozenset({Capability.PASS_THROUGH})
    # where the module's own forward is checkpointed, the swap is over when backward recomputes it;
    # where it is sharded on its own (fsdp), FSDP2 registers the gathered parameters over the swap
    mode_violations = {"checkpoint": frozenset({"matches-reference", "no-crash"}),
                       "fsdp": frozenset({"matches-reference"})}
    summary = "the seed's F.linear(x, w.detach(), b.detach()), generalised with functional_call"

    def call(self, module, args, role, kwargs):
        if role is Role.PASS_THROUGH:
            return functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, args, kwargs)
        return module(*args, **kwargs)


class ToggleRequiresGrad(Technique):
    name = "toggle_requires_grad"
    seed = "000"
    capabilities = frozenset({Capability.PASS_THROUGH})
    # not exception-safe: a non-reentrant checkpoint's recomputation that stops early inside the call
    # leaves the module with requires_grad=False (state-restored; the next step's recomputation then
    # differs from its forward: no-crash); and where the module's own forward is checkpointed, the
    # flags are back on when backward recomputes it; where it is sharded on its own and kept gathered
    # (fsdp), the flags land on two different tensors (the sharded parameters, then the gathered ones)
    mode_violations = {"checkpoint": frozenset({"state-restored", "no-crash", "matches-reference"}),
                       "fsdp": frozenset({"state-restored"})}
    summary = "requires_grad_(False) around the call, requires_grad_(True) after it"

    def call(self, module, args, role, kwargs):
        if role is not Role.PASS_THROUGH:
            return module(*args, **kwargs)
        module.requires_grad_(False)
        out = module(*args, **kwargs)
        module.requires_grad_(True)
        return out


class NoGradCall(Technique):
    name = "no_grad_call"
    seed = "000"
    capabilities = frozenset({Capability.PASS_THROUGH})
    expected_violations = frozenset({"gradient-flows"})
    # a reentrant checkpoint whose region ends in the no_grad call: backward raises
    mode_violations = {"checkpoint": frozenset({"no-crash", "matches-reference"})}
    summary = "with torch.no_grad() around the call: cuts the gradient to the input too"

    def call(self, module, args, role, kwargs):
        if role is Role.PASS_THROUGH:
            with torch.no_grad():
                return module(*args, **kwargs)
        return module(*args, **kwargs)
