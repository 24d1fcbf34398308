"""Scenario -> ``nn.Module``: deterministic, every call site routed by role."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .scenario import Architecture, Intent, Scenario
from .technique import Role, module_param_name

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SeededDropout(nn.Dropout):
    """Dropout whose mask is drawn on the CPU, so CPU and CUDA runs drop the same entries.

    The runner reseeds the global generator before every call site, which makes
    the mask a function of (step, micro-batch, call site) only.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # drawn in float32 whatever the dtype, so a float64 re-run drops the same units
        keep = (torch.rand(x.shape) >= self.p).to(x.device)
        return x * keep / (1.0 - self.p)


_RECURRENT = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {
    "linear": nn.Linear,
    "conv1d": nn.Conv1d,
    "conv2d": nn.Conv2d,
    "embedding": nn.Embedding,
    "layernorm": nn.LayerNorm,
    "batchnorm1d": nn.BatchNorm1d,
    "batchnorm2d": nn.BatchNorm2d,
    "groupnorm": nn.GroupNorm,
    "mha": lambda **kw: nn.MultiheadAttention(batch_first=True, **kw),
    "dropout": SeededDropout,
    **{k: (lambda cls: lambda **kw: cls(batch_first=True, **kw))(v) for k, v in _RECURRENT.items()},
}


@dataclass(frozen=True)
class CallSite:
    index: int  # position among call sites
    path: str  # module path
    use: int  # how many times this module was called before
    role: Role
    kind: str  # layer kind

    def __repr__(self) -> str:
        return f"{self.path}#{self.use}({self.role.value})"


def default_router(site: CallSite, module: nn.Module, args: tuple) -> Any:
    return module(*args)


def call_sites(arch: Architecture, intent: Intent) -> tuple[CallSite, ...]:
    passes = set(intent.pass_through)
    sites = []
    for index, (path, use) in enumerate(arch.call_sites):
        if intent.is_frozen_module(path):
            role = Role.FROZEN
        elif (path, use) in passes:
            role = Role.PASS_THROUGH
        else:
            role = Role.NORMAL
        sites.append(CallSite(index, path, use, role, arch.layer(path).kind))
    return tuple(sites)


class IsolationModel(nn.Module):
    """The model a scenario describes. ``router`` decides how each call site runs."""

    def __init__(self, arch: Architecture, sites: tuple[CallSite, ...]):
        super().__init__()
        self.architecture = arch
        self.sites = sites
        self.router: Callable[[CallSite, nn.Module, tuple], Any] = default_router

    def _child(self, path: str) -> nn.Module:
        """``get_submodule`` without its checks: paths come from the validated architecture."""
        module: nn.Module = self
        for name in path.split("."):
            module = module._modules[name]
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saved: list[torch.Tensor] = []
        sites = iter(self.sites)
        for op in self.architecture.program:
            if op.kind == "call":
                site = next(sites)
                # resolved at call time: a technique may have wrapped the module
                module = self._child(op.target)
                args = (x, x, x) if site.kind == "mha" else (x,)
                out = self.router(site, module, args)
                x = out[0] if isinstance(out, tuple) else out
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
            else:  # pragma: no cover - specs are validated by the strategies
                raise ValueError(f"unknown op {op.kind!r}")
        return x


_ACTIVATIONS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": torch.nn.functional.gelu,
}


def _set_by_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parts = path.split(".")
    parent = root
    for name in parts[:-1]:
        if not hasattr(parent, name) or name not in parent._modules:
            parent.add_module(name, nn.Module())
        parent = parent._modules[name]
    parent.add_module(parts[-1], module)


def build_layer(kind: str, kwargs: dict[str, Any]) -> nn.Module:
    return CONSTRUCTORS[kind](**kwargs)


def build_model(scenario: Scenario, device: str | torch.device = "cpu") -> IsolationModel:
    """Build the scenario's model; the same scenario gives bitwise-identical weights every time."""
    arch = scenario.architecture
    model = IsolationModel(arch, call_sites(arch, scenario.intent))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(scenario.init_seed)
        for layer in arch.layers:
            _set_by_path(model, layer.path, build_layer(layer.kind, layer.kwargs))
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


def loss_fn(kind: str, out: torch.Tensor, seed: int) -> torch.Tensor:
    """The scenario's loss; the target is drawn on the CPU from ``seed`` so it is device-independent."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(out.shape, generator=generator).to(device=out.device, dtype=out.dtype)
    if kind == "mse":
        return torch.nn.functional.mse_loss(out, target)
    if kind == "smooth_l1":
        return torch.nn.functional.smooth_l1_loss(out, target)
    raise ValueError(f"unknown loss {kind!r}")


@functools.lru_cache(maxsize=4096)
def param_shapes(kind: str, args: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Names and shapes of a layer's parameters, computed on the meta device (no memory, no RNG)."""
    with torch.device("meta"):
        module = build_layer(kind, dict(args))
    return tuple((name, tuple(p.shape)) for name, p in module.named_parameters())
