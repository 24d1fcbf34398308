"""Scenario -> ``nn.Module``: a generated architecture becomes an ordinary module tree.

Every container is a real module whose ``forward`` calls its children (``Block``,
``nn.Sequential``, ``Residual``, an ``nn.ModuleList`` looped over by its parent); the harness
takes part only through ``tree.Router``, at the modules an intent names.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from isolation_suite.spec.kinds import BY_KIND as KIND
from isolation_suite.model.layers import SeededDropout, build_layer, train_mode_effect  # noqa: F401 - SeededDropout: part of build's public names
from isolation_suite.spec.scenario import Op, Scenario
from isolation_suite.technique import module_param_name

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Block(nn.Module):
    """A container whose ``forward`` runs its program: calls of its children (through
    ``nn.Module.__call__``, so their hooks run), activations, reshapes and residual adds."""

    def __init__(self, program: tuple[Op, ...], attention: frozenset[str], tuple_out: frozenset[str]):
        super().__init__()
        self.program = program
        self.attention, self.tuple_out = attention, tuple_out  # children called (x, x, x) / returning tuples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saved: list[torch.Tensor] = []
        for op in self.program:
            if op.kind == "call":
                x = self._call_child(op.target, getattr(self, op.target.rpartition(".")[2]), x)
            elif op.kind == "loop":
                for child in getattr(self, op.target.rpartition(".")[2]):
                    x = child(x)
            elif op.kind == "act":
                x = _ACTIVATIONS[op.target](x)
            elif op.kind == "reshape":
                x = x.reshape((x.shape[0],) + tuple(op.shape))
            elif op.kind == "transpose":
                x = x.transpose(1, 2)
            elif op.kind == "save":
                saved.append(x)
            elif op.kind == "add":
                x = x + saved.pop()
            else:  # pragma: no cover - specs are validated
                raise ValueError(f"unknown op {op.kind!r}")
        return x

    def _call_child(self, path: str, child: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # the spec says how each child is called: a technique may have wrapped or replaced it
        out = child(x, x, x) if path in self.attention else child(x)
        return out[0] if path in self.tuple_out else out


class Residual(nn.Sequential):
    """``x + body(x)``: the children run in order on ``x`` and the result is added back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


_ACTIVATIONS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": torch.nn.functional.gelu,
}


def build_model(scenario: Scenario, device: str | torch.device = "cpu") -> nn.Module:
    """Build the scenario's generated model, an ordinary module tree; the same scenario gives
    bitwise-identical weights every time."""
    arch = scenario.architecture
    kinds = {layer.path: layer.kind for layer in arch.layers}
    attention = frozenset(p for p, k in kinds.items() if KIND[k].called_with == "x,x,x")
    tuple_out = frozenset(p for p, k in kinds.items() if KIND[k].returns_tuple)
    built: dict[str, nn.Module] = {}
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(scenario.init_seed)
        for layer in arch.layers:  # in declaration order: the weights draw from the generator in this order
            built[layer.path] = build_layer(layer.kind, layer.kwargs)
    # containers from the innermost out; children are registered in the order the program calls them
    for container in sorted(arch.containers, key=lambda c: -c.path.count(".")):
        children = [(op.target.rpartition(".")[2], built.pop(op.target)) for op in container.program
                    if op.kind in ("call", "loop") and op.target in built]
        if container.kind == "block":
            module: nn.Module = Block(container.program, attention, tuple_out)
            for name, child in children:
                module.add_module(name, child)
        elif container.kind == "sequential":
            module = nn.Sequential(OrderedDict(children))
        elif container.kind == "residual":
            module = Residual(OrderedDict(children))
        else:
            module = nn.ModuleList([child for _, child in children])
        built[container.path] = module
    model = Block(arch.program, attention, tuple_out)
    for op in arch.program:
        if op.kind in ("call", "loop") and op.target in built:
            model.add_module(op.target, built.pop(op.target))
    for dst, src in arch.ties:
        dst_module, dst_name = module_param_name(dst)
        src_module, src_name = module_param_name(src)
        shared = getattr(model.get_submodule(src_module), src_name)
        target = model.get_submodule(dst_module)
        del target._parameters[dst_name]
        setattr(target, dst_name, shared)
    if torch.device(device) != torch.device("cpu") or DTYPES[scenario.dtype] != torch.get_default_dtype():
        model.to(device=device, dtype=DTYPES[scenario.dtype])  # a walk over every tensor: only when needed
    return model


def make_inputs(scenario: Scenario) -> list[list[torch.Tensor]]:
    """CPU inputs for every step and micro-batch, from the scenario's data seed."""
    arch, data = scenario.architecture, scenario.data
    generator = torch.Generator().manual_seed(data.seed)
    shape = (data.batch,) + tuple(arch.input_shape)
    batches = []
    for _ in range(scenario.steps):
        step = []
        for _ in range(scenario.micro_batches):
            if arch.input_kind == "tokens":
                step.append(torch.randint(0, arch.vocab, shape, generator=generator))
            else:
                # drawn in float32 and cast: the float64 twin of a scenario sees the same numbers
                step.append(torch.randn(shape, generator=generator).to(DTYPES[scenario.dtype]))
        batches.append(step)
    return batches


def target_like(out: torch.Tensor, seed: int, share: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The fixed random target for one output tensor, drawn on the CPU from ``seed`` so it is
    device-independent. With ``share`` (rank, world, batch dimension: a rank's rows of the batch) the
    whole batch's target is drawn and the rank's rows kept."""
    generator = torch.Generator().manual_seed(seed)
    if share is None:
        return torch.randn(out.shape, generator=generator).to(device=out.device, dtype=out.dtype)
    rank, world, dim = share
    shape = list(out.shape)
    n = shape[dim]
    shape[dim] = n * world
    whole = torch.randn(shape, generator=generator)
    return whole.narrow(dim, rank * n, n).to(device=out.device, dtype=out.dtype)


def loss_fn(kind: str, out: torch.Tensor, seed: int, share: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The scenario's loss against ``target_like(out, seed, share)``: with ``share`` (a rank's rows of
    the batch) the loss of that share, mean-reduced over its rows."""
    target = target_like(out, seed, share)
    if kind == "mse":
        return torch.nn.functional.mse_loss(out, target)
    if kind == "smooth_l1":
        return torch.nn.functional.smooth_l1_loss(out, target)
    raise ValueError(f"unknown loss {kind!r}")


@functools.lru_cache(maxsize=4096)
def _meta_layer(kind: str, args: tuple[tuple[str, Any], ...]) -> nn.Module:
    """A generated layer built on the meta device (no memory, no RNG), to be read, never run."""
    with torch.device("meta"):
        return build_layer(kind, dict(args))


def param_shapes(kind: str, args: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Names and shapes of a layer's parameters."""
    return tuple((name, tuple(p.shape)) for name, p in _meta_layer(kind, args).named_parameters())


def train_mode(kind: str, args: tuple[tuple[str, Any], ...]) -> str:
    """What training mode changes in a generated layer ("" when nothing: a dropout with p=0), read
    from the layer itself as from a user's (``layers.train_mode_effect``)."""
    return train_mode_effect(_meta_layer(kind, args))
