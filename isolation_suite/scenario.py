"""Scenario specs: pure, frozen, JSON-round-trippable data.

Hypothesis draws these; nothing here touches torch. ``build`` turns an
:class:`Architecture` into a module, ``runner`` trains it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping


#: layer kinds that ``build`` knows, grouped by what they need
PARAM_LAYER_KINDS = (
    "linear", "conv1d", "conv2d", "embedding", "lstm", "gru", "rnn",
    "layernorm", "batchnorm1d", "batchnorm2d", "groupnorm", "mha",
)
STATELESS_LAYER_KINDS = ("dropout",)
LAYER_KINDS = PARAM_LAYER_KINDS + STATELESS_LAYER_KINDS
ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid")
OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "Adadelta", "Rprop")
SCHEDULERS = ("none", "StepLR", "OneCycleLR", "LambdaLR")
CLIPPING = ("none", "norm", "value")
DTYPES = ("float32", "float64")
LOSSES = ("mse", "smooth_l1")


def _kv(mapping: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(mapping.items()))


@dataclass(frozen=True)
class Layer:
    """One module of the architecture: where it lives and how to construct it."""

    path: str
    kind: str
    args: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)

    def __repr__(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.args)
        return f"{self.path}:{self.kind}({inner})"


@dataclass(frozen=True)
class Op:
    """One program instruction.

    ``call`` runs the module at ``target`` on the current value (a call site);
    ``act`` applies the activation ``target``; ``reshape`` views the current
    value as ``(batch, *shape)``; ``transpose`` swaps the two trailing axes of a
    3-d value; ``save`` pushes the current value and ``add`` pops it and adds it
    back (a residual connection).
    """

    kind: str
    target: str = ""
    shape: tuple[int, ...] = ()

    def __repr__(self) -> str:
        if self.kind == "call":
            return self.target
        if self.kind == "act":
            return self.target
        if self.kind == "reshape":
            return "view" + str(tuple(self.shape)).replace(" ", "")
        return self.kind


@dataclass(frozen=True)
class Architecture:
    """Layers, the ordered program of call sites, and tied parameters."""

    input_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    program: tuple[Op, ...]
    input_kind: str = "float"  # "float" or "tokens"
    vocab: int = 0  # token range when input_kind == "tokens"
    ties: tuple[tuple[str, str], ...] = ()  # (param path, source param path)

    def layer(self, path: str) -> Layer:
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(path)

    @property
    def call_sites(self) -> tuple[tuple[str, int], ...]:
        """Every call site as ``(module path, use index)``, in program order."""
        uses: dict[str, int] = {}
        sites = []
        for op in self.program:
            if op.kind == "call":
                sites.append((op.target, uses.get(op.target, 0)))
                uses[op.target] = uses.get(op.target, 0) + 1
        return tuple(sites)

    def __repr__(self) -> str:
        body = " > ".join(repr(op) for op in self.program)
        tied = f" ties={list(self.ties)}" if self.ties else ""
        return f"[{self.input_kind}{tuple(self.input_shape)}: {body}] layers={list(self.layers)}{tied}"


@dataclass(frozen=True)
class Intent:
    """What must be isolated (design: frozen modules, elements, pass-through, reparameterized)."""

    frozen_modules: tuple[str, ...] = ()
    frozen_elements: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...] = ()
    pass_through: tuple[tuple[str, int], ...] = ()
    reparameterized: tuple[str, ...] = ()

    def is_frozen_module(self, path: str) -> bool:
        """True when ``path`` is, or lies inside, a frozen module."""
        return any(path == f or path.startswith(f + ".") for f in self.frozen_modules)

    def is_frozen_param(self, param_path: str) -> bool:
        module_path = param_path.rpartition(".")[0]
        return self.is_frozen_module(module_path)

    @property
    def elements(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        return dict(self.frozen_elements)

    def __repr__(self) -> str:
        parts = []
        if self.frozen_modules:
            parts.append(f"frozen_modules={list(self.frozen_modules)}")
        if self.frozen_elements:
            parts.append("frozen_elements={" + ", ".join(
                f"{p!r}: {[list(i) for i in idx]}" for p, idx in self.frozen_elements) + "}")
        if self.pass_through:
            parts.append(f"pass_through={list(self.pass_through)}")
        if self.reparameterized:
            parts.append(f"reparameterized={list(self.reparameterized)}")
        return "Intent(" + ", ".join(parts) + ")"


@dataclass(frozen=True)
class OptimizerRecipe:
    """An optimizer class with its hyper-parameters, plus the loop around it."""

    name: str = "SGD"
    args: tuple[tuple[str, Any], ...] = (("lr", 0.1),)
    scheduler: str = "none"
    clip: str = "none"
    clip_value: float = 1.0
    set_to_none: bool = True

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)

    @property
    def weight_decay(self) -> float:
        wd = self.kwargs.get("weight_decay")
        if wd is None and self.name == "AdamW":
            return 0.01  # torch's AdamW default
        return float(wd or 0.0)

    def describe(self) -> str:
        """Short human form, e.g. ``AdamW(lr=0.01, weight_decay=0.01)``."""
        text = f"{self.name}(" + ", ".join(f"{k}={v}" for k, v in self.args) + ")"
        if self.scheduler != "none":
            text += f"+{self.scheduler}"
        if self.clip != "none":
            text += f", clip-{self.clip}={self.clip_value}"
        if not self.set_to_none:
            text += ", zero_grad(set_to_none=False)"
        return text

    def __repr__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class Data:
    batch: int = 2
    seed: int = 0
    input_requires_grad: bool = True
    loss: str = "mse"

    def __repr__(self) -> str:
        return (f"Data(batch={self.batch}, seed={self.seed}, "
                f"input_requires_grad={self.input_requires_grad}, loss={self.loss})")


@dataclass(frozen=True)
class Scenario:
    """Everything one check needs, as plain data."""

    architecture: Architecture
    intent: Intent = field(default_factory=Intent)
    optimizer: OptimizerRecipe = field(default_factory=OptimizerRecipe)
    data: Data = field(default_factory=Data)
    steps: int = 1
    micro_batches: int = 1
    dtype: str = "float32"
    init_seed: int = 0

    def __repr__(self) -> str:
        return (f"Scenario(\n  architecture={self.architecture!r},\n  intent={self.intent!r},\n"
                f"  optimizer={self.optimizer!r},\n  data={self.data!r},\n"
                f"  steps={self.steps}, micro_batches={self.micro_batches}, dtype={self.dtype}, "
                f"init_seed={self.init_seed})")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Hypothesis's pretty-printer uses this, so failures show the short form
        printer.text(repr(self))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kwargs)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Scenario":
        a = d["architecture"]
        arch = Architecture(
            input_shape=tuple(a["input_shape"]),
            layers=tuple(Layer(x["path"], x["kind"], _pairs(x["args"])) for x in a["layers"]),
            program=tuple(Op(o["kind"], o["target"], tuple(o["shape"])) for o in a["program"]),
            input_kind=a["input_kind"],
            vocab=a["vocab"],
            ties=tuple((t[0], t[1]) for t in a["ties"]),
        )
        i = d["intent"]
        intent = Intent(
            frozen_modules=tuple(i["frozen_modules"]),
            frozen_elements=tuple((p, tuple(tuple(ix) for ix in idx)) for p, idx in i["frozen_elements"]),
            pass_through=tuple((p, u) for p, u in i["pass_through"]),
            reparameterized=tuple(i["reparameterized"]),
        )
        o = d["optimizer"]
        opt = OptimizerRecipe(o["name"], _pairs(o["args"]), o["scheduler"], o["clip"],
                              o["clip_value"], o["set_to_none"])
        data = Data(**d["data"])
        return cls(arch, intent, opt, data, d["steps"], d["micro_batches"], d["dtype"], d["init_seed"])

    @classmethod
    def from_json(cls, text: str) -> "Scenario":
        return cls.from_dict(json.loads(text))


def _pairs(items: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in items)
