"""Scenario specs: pure, frozen, JSON-round-trippable data, validated at construction.

Hypothesis draws these; nothing here touches torch. ``build`` turns an
:class:`Architecture` into a module, ``runner`` trains it.

Every spec checks itself when it is made (``__post_init__``) and raises :class:`ScenarioError`
naming the bad value: unknown kinds, fields or layer arguments, and sizes outside the bounds
below, which keep one training run small enough to judge in well under a second to a few
seconds (the widest layer allowed, ``Linear(1024, 1024)``, has a million weights).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from isolation_suite.spec import kinds as _kinds
from isolation_suite.spec import mode_kinds as _modes
from isolation_suite.spec.optim_info import OPTIMIZER_BY_NAME, OPTIMIZER_INFOS, SCHEDULER_INFOS, sharded_obstacle


#: layer kinds (``kinds.KINDS`` declares each)
LAYER_KINDS = _kinds.LAYER_KINDS
PARAM_LAYER_KINDS = _kinds.PARAM_KINDS
STATELESS_LAYER_KINDS = _kinds.STATELESS_KINDS
ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid")
OPTIMIZERS = tuple(info.name for info in OPTIMIZER_INFOS)
SCHEDULERS = tuple(info.name for info in SCHEDULER_INFOS)
CLIPPING = ("none", "norm", "value")
DTYPES = ("float32", "float64")
LOSSES = ("mse", "smooth_l1")
OP_KINDS = ("call", "loop", "act", "reshape", "transpose", "save", "add")
#: containers a generated model is made of (see ``build``): a block runs its own program over its
#: children; sequential, residual and modulelist call each child once, in order
CONTAINER_KINDS = ("block", "sequential", "residual", "modulelist")
INPUT_KINDS = ("float", "tokens")
#: how the training loop runs the model (``mode_kinds.MODES`` declares each, ``modes.MODE_INFOS`` how it runs)
MODE_KINDS = _modes.MODE_KINDS
COMPILE_BACKENDS = ("aot_eager", "eager", "inductor")

#: bounds (inclusive) every scenario is held to
MAX_WIDTH = 1024  # features, channels, hidden size, vocabulary, any one dimension
MAX_KERNEL = 16  # kernel size, stride, padding, dilation
MAX_LAYERS = 64
MAX_PROGRAM = 256
MAX_BATCH = 64
MAX_STEPS = 64
MAX_MICRO_BATCHES = 8

_SIZE, _SMALL, _FLAG, _RATE = _kinds.SIZE, _kinds.SMALL, _kinds.FLAG, _kinds.RATE
_TUPLE_LAYERS = _kinds.TUPLE_KINDS
#: layer kind -> argument -> (kind of value, required)
LAYER_ARGS: dict[str, dict[str, tuple[str, bool]]] = {k.kind: k.args for k in _kinds.KINDS}


class ScenarioError(ValueError):
    """A scenario (or one of its parts) that cannot be judged; the message names the bad value."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioError(message)


def _int_in(name: str, value: Any, low: int, high: int) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
             f"{name}={value!r} must be an integer in [{low}, {high}]")


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    _require(value in allowed, f"{name}={value!r} is not one of {allowed}")


def _check_layer_args(path: str, kind: str, args: tuple) -> None:
    spec = LAYER_ARGS[kind]
    given = dict(args)
    for name, value in given.items():
        _require(name in spec, f"layer {path!r} ({kind}) has no argument {name!r}; it takes {sorted(spec)}")
        sort = spec[name][0]
        where = f"layer {path!r} argument {name}"
        if sort == _SIZE:
            _int_in(where, value, 1, MAX_WIDTH)
        elif sort == _SMALL:
            _int_in(where, value, 0 if name == "padding" else 1, MAX_KERNEL)
        elif sort == _FLAG:
            _require(isinstance(value, bool), f"{where}={value!r} must be true or false")
        else:
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1,
                     f"{where}={value!r} must be a number in [0, 1)")
    missing = [name for name, (_, required) in spec.items() if required and name not in given]
    _require(not missing, f"layer {path!r} ({kind}) misses argument(s) {missing}")


def _kv(mapping: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(mapping.items()))


@dataclass(frozen=True)
class Layer:
    """One module of the architecture: where it lives and how to construct it."""

    path: str
    kind: str
    args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _require(isinstance(self.path, str) and all(p.isidentifier() or p.isdigit() for p in self.path.split(".")),
                 f"layer path {self.path!r} must be dot-separated names")
        _one_of(f"layer {self.path!r} kind", self.kind, LAYER_KINDS)
        _check_layer_args(self.path, self.kind, self.args)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)

    def __repr__(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.args)
        return f"{self.path}:{self.kind}({inner})"


@dataclass(frozen=True)
class Op:
    """One program instruction.

    ``call`` runs the module at ``target`` (a direct child of the program's owner) on the current
    value; ``loop`` runs every child of the ``nn.ModuleList`` at ``target`` in turn; ``act``
    applies the activation ``target``; ``reshape`` views the current value as ``(batch, *shape)``;
    ``transpose`` swaps the two trailing axes of a 3-d value; ``save`` pushes the current value
    and ``add`` pops it and adds it back (a residual connection).
    """

    kind: str
    target: str = ""
    shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _one_of("op kind", self.kind, OP_KINDS)
        if self.kind == "act":
            _one_of("activation", self.target, ACTIVATIONS)
        if self.kind == "reshape":
            _require(1 <= len(self.shape) <= 3, f"reshape to {self.shape!r}: 1 to 3 dimensions")
            for size in self.shape:
                _int_in("reshape size", size, 1, MAX_WIDTH)

    def __repr__(self) -> str:
        if self.kind == "call":
            return self.target
        if self.kind == "loop":
            return f"for {self.target}"
        if self.kind == "act":
            return self.target
        if self.kind == "reshape":
            return "view" + str(tuple(self.shape)).replace(" ", "")
        return self.kind


@dataclass(frozen=True)
class Container:
    """A module whose ``forward`` calls its children: ``program`` lists those calls (and, for a
    ``block``, the activations, reshapes and residual adds between them)."""

    path: str
    kind: str
    program: tuple[Op, ...]

    def __post_init__(self) -> None:
        _require(isinstance(self.path, str) and all(p.isidentifier() or p.isdigit() for p in self.path.split(".")),
                 f"container path {self.path!r} must be dot-separated names")
        _one_of(f"container {self.path!r} kind", self.kind, CONTAINER_KINDS)
        _require(1 <= len(self.program) <= MAX_PROGRAM, f"container {self.path!r}: 1 to {MAX_PROGRAM} ops")
        if self.kind != "block":
            targets = [op.target for op in self.program]
            _require(all(op.kind == "call" for op in self.program) and len(set(targets)) == len(targets),
                     f"a {self.kind} ({self.path!r}) calls each child once, in order, and nothing else")

    def __repr__(self) -> str:
        return f"{self.path}:{self.kind}[" + " > ".join(repr(op) for op in self.program) + "]"


@dataclass(frozen=True)
class Architecture:
    """Layers, the containers that hold them, the top-level program, and tied parameters.

    The model is an ordinary module tree: the top-level ``program`` calls direct children of the
    model, each container's program calls its own direct children (see :class:`Container`).
    """

    input_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    program: tuple[Op, ...]
    input_kind: str = "float"  # "float" or "tokens"
    vocab: int = 0  # token range when input_kind == "tokens"
    ties: tuple[tuple[str, str], ...] = ()  # (param path, source param path)
    containers: tuple[Container, ...] = ()

    def __post_init__(self) -> None:
        _require(1 <= len(self.input_shape) <= 3, f"input_shape={self.input_shape!r}: 1 to 3 dimensions")
        for size in self.input_shape:
            _int_in("input_shape size", size, 1, MAX_WIDTH)
        _one_of("input_kind", self.input_kind, INPUT_KINDS)
        if self.input_kind == "tokens":
            _int_in("vocab", self.vocab, 1, MAX_WIDTH)
        _require(1 <= len(self.layers) <= MAX_LAYERS, f"{len(self.layers)} layers: 1 to {MAX_LAYERS} allowed")
        _require(1 <= len(self.program) <= MAX_PROGRAM, f"{len(self.program)} ops: 1 to {MAX_PROGRAM} allowed")
        paths = [layer.path for layer in self.layers]
        kinds = {c.path: c.kind for c in self.containers}
        every = paths + list(kinds)
        _require(len(set(every)) == len(every), f"module paths repeat: {every}")
        called: set[str] = set()
        for owner, program in self.programs:
            for op in program:
                if op.kind not in ("call", "loop"):
                    continue
                _require(op.target in every and op.target.rpartition(".")[0] == owner,
                         f"{owner or 'the model'} calls {op.target!r}, which is not one of its direct children")
                _require((op.kind == "loop") == (kinds.get(op.target) == "modulelist"),
                         f"{op.target!r}: a modulelist is looped over ({op.kind} given)")
                called.add(op.target)
        layer_kinds = {layer.path: layer.kind for layer in self.layers}
        for path in every:
            parent = path.rpartition(".")[0]
            _require(parent == "" or parent in kinds, f"{path!r} lies in {parent!r}, which is not a container")
            _require(path in called, f"{path!r} is never called by {parent or 'the model'}")
            # these containers chain tensor to tensor; attention and recurrent layers return tuples
            _require(kinds.get(parent, "block") == "block" or layer_kinds.get(path) not in _TUPLE_LAYERS,
                     f"{path!r} ({layer_kinds.get(path)}) returns a tuple: it needs a block, not a {kinds.get(parent)}")
        for pair in self.ties:
            for param in pair:
                _require(_in_a_layer(param, paths), f"tie names {param!r}, which is not in a layer")

    def layer(self, path: str) -> Layer:
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(path)

    @property
    def programs(self) -> tuple[tuple[str, tuple[Op, ...]], ...]:
        """``(owner path, program)`` for the model (``""``) and every container."""
        return (("", self.program),) + tuple((c.path, c.program) for c in self.containers)

    def container(self, path: str) -> Container:
        for c in self.containers:
            if c.path == path:
                return c
        raise KeyError(path)

    @property
    def call_sites(self) -> tuple[tuple[str, int], ...]:
        """Every module call in one forward as ``(module path, use index)``, in the order the calls
        start (a container before its children)."""
        programs = dict(self.programs)
        uses: dict[str, int] = {}
        sites: list[tuple[str, int]] = []

        def enter(path: str) -> None:
            sites.append((path, uses.get(path, 0)))
            uses[path] = uses.get(path, 0) + 1
            run(path)

        def run(owner: str) -> None:
            for op in programs.get(owner, ()):
                if op.kind == "call":
                    enter(op.target)
                elif op.kind == "loop":
                    for child in programs[op.target]:
                        enter(child.target)
        run("")
        return tuple(sites)

    def __repr__(self) -> str:
        body = " > ".join(repr(op) for op in self.program)
        inner = f" containers={list(self.containers)}" if self.containers else ""
        tied = f" ties={list(self.ties)}" if self.ties else ""
        return f"[{self.input_kind}{tuple(self.input_shape)}: {body}]{inner} layers={list(self.layers)}{tied}"


def chain(input_shape: tuple[int, ...], layers, calls, **kwargs: Any) -> Architecture:
    """An architecture that calls ``calls`` (leaf paths) in order. Nested paths such as ``enc.lin``
    become calls of their containers (``block`` kind): a run of calls inside one container is one
    call of it, and every run of a container must make the same calls."""
    programs: dict[str, tuple[Op, ...]] = {}

    def child_of(owner: str, path: str) -> str:
        rest = path[len(owner) + 1:] if owner else path
        return (owner + "." if owner else "") + rest.split(".")[0]

    def group(owner: str, paths: list[str]) -> tuple[Op, ...]:
        ops: list[Op] = []
        i = 0
        while i < len(paths):
            child = child_of(owner, paths[i])
            if child == paths[i]:  # a leaf: one call each
                ops.append(Op("call", child))
                i += 1
                continue
            j = i
            while j < len(paths) and child_of(owner, paths[j]) == child:
                j += 1
            body = group(child, paths[i:j])
            _require(programs.setdefault(child, body) == body, f"{child!r} makes different calls on each run")
            ops.append(Op("call", child))
            i = j
        return tuple(ops)

    root = group("", list(calls))
    return Architecture(tuple(input_shape), tuple(layers), root,
                        containers=tuple(Container(p, "block", ops) for p, ops in programs.items()), **kwargs)


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

    def __post_init__(self) -> None:
        _one_of("optimizer", self.name, OPTIMIZERS)
        _one_of("scheduler", self.scheduler, SCHEDULERS)
        _one_of("clip", self.clip, CLIPPING)
        _require(isinstance(self.clip_value, (int, float)) and 0 < self.clip_value < float("inf"),
                 f"clip_value={self.clip_value!r} must be a positive number")
        lr = dict(self.args).get("lr")
        _require(isinstance(lr, (int, float)) and 0 < lr <= 10, f"optimizer lr={lr!r} must be in (0, 10]")

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)

    @property
    def weight_decay(self) -> float:
        wd = self.kwargs.get("weight_decay")
        return OPTIMIZER_BY_NAME[self.name].default_weight_decay if wd is None else float(wd)

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

    def __post_init__(self) -> None:
        _int_in("batch", self.batch, 1, MAX_BATCH)
        _int_in("data seed", self.seed, 0, 2**63 - 1)
        _require(isinstance(self.input_requires_grad, bool), "input_requires_grad must be true or false")
        _one_of("loss", self.loss, LOSSES)

    def __repr__(self) -> str:
        return (f"Data(batch={self.batch}, seed={self.seed}, "
                f"input_requires_grad={self.input_requires_grad}, loss={self.loss})")


@dataclass(frozen=True)
class Change:
    """A freeze schedule's step boundary: from ``step`` on, the frozen modules are ``frozen_modules``
    (``()``: unfreeze everything), the way progressive unfreezing or Lightning's
    ``BackboneFinetuning`` change them."""

    step: int
    frozen_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _int_in("schedule step", self.step, 2, MAX_STEPS)
        _require(isinstance(self.frozen_modules, tuple) and all(isinstance(p, str) and p for p in self.frozen_modules),
                 f"schedule frozen_modules={self.frozen_modules!r} must be a tuple of module paths")

    def __repr__(self) -> str:
        return f"step {self.step}: frozen={list(self.frozen_modules)}"


@dataclass(frozen=True)
class Mode:
    """How the user's training loop runs the model; the reference always runs plain eager.

    * ``checkpoint``: the module at ``target`` (a container; ``""``: the whole model) runs under
      ``torch.utils.checkpoint`` with ``use_reentrant=reentrant``, set up before the technique's
      ``setup``, as a library enables gradient checkpointing when it builds the model;
    * ``compile``: ``target.compile(backend=backend, dynamic=False)`` after the technique's setup;
    * ``autocast``: forward and loss under ``torch.autocast`` (CPU bfloat16; CUDA float16 with a
      ``GradScaler``);
    * ``ddp``: ``DistributedDataParallel(model, find_unused_parameters=find_unused,
      static_graph=static_graph)`` over two CPU processes (gloo), each training on its half of every
      batch (see :mod:`isolation_suite.execution.ddp`);
    * ``fsdp``: FSDP2 ``fully_shard`` over the same two processes, on the containers first where
      ``nested``, then on the root, with ``reshard_after_forward=not keep_gathered`` (see
      :mod:`isolation_suite.execution.fsdp`).
    """

    kind: str = _modes.DEFAULT
    target: str = ""
    reentrant: bool = False
    backend: str = "aot_eager"
    find_unused: bool = False
    static_graph: bool = False
    #: fsdp: every container whose parameters are its own gets a ``fully_shard`` of its own before the root's
    nested: bool = False
    #: fsdp: ``reshard_after_forward=False`` (the parameters stay gathered from forward to backward)
    keep_gathered: bool = False

    def __post_init__(self) -> None:
        _one_of("mode", self.kind, MODE_KINDS)
        info = self.info
        _require(isinstance(self.target, str), f"mode target={self.target!r} must be a module path")
        _one_of("compile backend", self.backend, COMPILE_BACKENDS)
        _require(info.targeted or self.target == "", f"a {self.kind} mode has no target (got {self.target!r})")
        # the boolean options: each belongs to the modes whose row lists it in ``flags``
        for f in dataclasses.fields(self):
            if type(f.default) is bool:
                value = getattr(self, f.name)
                _require(isinstance(value, bool), f"mode {f.name} must be true or false")
                owners = ", ".join(row.kind for row in _modes.MODES if f.name in row.flags)
                _require(f.name in info.flags or not value, f"a {self.kind} mode has no {f.name} (only {owners} has)")

    @property
    def info(self) -> _modes.ModeKind:
        """The mode's row (``mode_kinds.MODES``)."""
        return _modes.BY_KIND[self.kind]

    @property
    def eager(self) -> bool:
        """The plain loop, every Mode's default: a scenario in it names no mode."""
        return self.kind == _modes.DEFAULT

    def __repr__(self) -> str:
        return self.info.show(self)


@dataclass(frozen=True)
class Scenario:
    """Everything one check needs, as plain data.

    The model is either a generated ``architecture`` or, with ``model`` (``"pkg.mod:factory"``),
    the user's own: a zero-argument factory that returns ``(module, example_inputs[, loss])``
    (see :mod:`isolation_suite.model.factory`); then ``architecture`` is None and the intent is checked
    against the module tree when the model is built.
    """

    architecture: Architecture | None
    intent: Intent = field(default_factory=Intent)
    optimizer: OptimizerRecipe = field(default_factory=OptimizerRecipe)
    data: Data = field(default_factory=Data)
    steps: int = 1
    micro_batches: int = 1
    dtype: str = "float32"
    init_seed: int = 0
    model: str = ""
    mode: Mode = field(default_factory=Mode)
    #: the intent's frozen modules change at these step boundaries (see :class:`Change`)
    schedule: tuple[Change, ...] = ()

    def __post_init__(self) -> None:
        _int_in("steps", self.steps, 1, MAX_STEPS)
        _require(isinstance(self.mode, Mode), f"mode={self.mode!r} must be a Mode")
        self._check_schedule()
        _int_in("micro_batches", self.micro_batches, 1, MAX_MICRO_BATCHES)
        _one_of("dtype", self.dtype, DTYPES)
        _int_in("init_seed", self.init_seed, 0, 2**63 - 1)
        _require(isinstance(self.model, str), f"model={self.model!r} must be a 'pkg.module:factory' string")
        mode = self.mode.info
        if mode.shards_parameters:
            obstacle = sharded_obstacle(self.optimizer.name, bool(self.optimizer.kwargs.get("fused")))
            _require(not obstacle, f"the {mode.kind} mode shards the parameters, and {self.optimizer.name} cannot step "
                                   f"them: {obstacle}")
        # a user's model splits its own example batch (checked where it is built, ``split_obstacle``)
        _require(bool(self.model) or self.data.batch % mode.ranks == 0,
                 f"the {mode.kind} mode splits the batch between {mode.ranks} processes: batch={self.data.batch} "
                 "must be " + ("even" if mode.ranks == 2 else f"a multiple of {mode.ranks}"))
        if self.model:
            _require(self.architecture is None, "a scenario has either an architecture or a model factory, not both")
            module, colon, name = self.model.partition(":")
            _require(bool(module) and colon == ":" and bool(name),
                     f"model={self.model!r} must name a factory as 'pkg.module:factory'")
            return
        _require(isinstance(self.architecture, Architecture), "a scenario needs an architecture or a model factory")
        arch, intent = self.architecture, self.intent
        layers = {layer.path for layer in arch.layers}
        modules = layers | {c.path for c in arch.containers}
        for path in intent.frozen_modules + intent.reparameterized:
            _require(path in modules, f"the intent names module {path!r}, which the architecture does not have")
        containers = {c.path for c in arch.containers}
        _require(self.mode.target == "" or self.mode.target in containers,
                 f"the {self.mode.kind} mode names {self.mode.target!r}, which is not a container of the architecture")
        uses: dict[str, int] = {}
        for path, _ in arch.call_sites:
            uses[path] = uses.get(path, 0) + 1
        for path, use in intent.pass_through:
            _require(isinstance(use, int) and 0 <= use < uses.get(path, 0),
                     f"pass_through ({path!r}, {use!r}): {path!r} is called {uses.get(path, 0)} time(s)")
        for param, indices in intent.frozen_elements:
            _require(_in_a_layer(param, layers), f"frozen elements of {param!r}, which is not in a layer")
            for index in indices:
                _require(all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_WIDTH for i in index),
                         f"frozen element index {index!r} of {param!r} must be non-negative integers")

    def _check_schedule(self) -> None:
        _require(isinstance(self.schedule, tuple) and all(isinstance(c, Change) for c in self.schedule),
                 "schedule must be a tuple of Change")
        steps = [c.step for c in self.schedule]
        _require(steps == sorted(set(steps)) and all(s <= self.steps for s in steps),
                 f"schedule steps {steps} must increase and lie within the {self.steps} step(s)")
        # a scheduler built over the first parameter groups does not schedule a group added later
        _require(not self.schedule or self.optimizer.scheduler == "none",
                 f"a freeze schedule needs scheduler none, not {self.optimizer.scheduler}")
        if self.architecture is not None:
            arch = self.architecture
            modules = {layer.path for layer in arch.layers} | {c.path for c in arch.containers}
            for change in self.schedule:
                for path in change.frozen_modules:
                    _require(path in modules, f"the schedule names module {path!r}, which the architecture does "
                                              "not have")

    def intent_at(self, step: int) -> Intent:
        """The intent in force during ``step`` (1-based): the last change at or before it."""
        frozen = None
        for change in self.schedule:
            if change.step <= step:
                frozen = change.frozen_modules
        return self.intent if frozen is None else dataclasses.replace(self.intent, frozen_modules=frozen)

    @property
    def intents(self) -> tuple[Intent, ...]:
        """Every intent the run goes through, the first one first."""
        return (self.intent,) + tuple(self.intent_at(c.step) for c in self.schedule)

    def __repr__(self) -> str:
        what = f"model={self.model!r}" if self.model else f"architecture={self.architecture!r}"
        return (f"Scenario(\n  {what},\n  intent={self.intent!r},\n"
                f"  optimizer={self.optimizer!r},\n  data={self.data!r},\n"
                f"  steps={self.steps}, micro_batches={self.micro_batches}, dtype={self.dtype}, "
                f"init_seed={self.init_seed}" + ("" if self.mode.eager else f", mode={self.mode!r}")
                + (f",\n  schedule={list(self.schedule)!r}" if self.schedule else "") + ")")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Hypothesis's pretty-printer uses this, so failures show the short form
        printer.text(repr(self))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kwargs)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Scenario":
        """The scenario ``to_dict`` wrote; unknown or missing fields and bad values raise ScenarioError."""
        try:
            d = _fields(d, "scenario", Scenario)
            arch = None if d["architecture"] is None else _architecture(d["architecture"])
            i = _fields(d["intent"], "intent", Intent)
            intent = Intent(
                frozen_modules=tuple(i["frozen_modules"]),
                frozen_elements=tuple((p, tuple(tuple(ix) for ix in idx)) for p, idx in i["frozen_elements"]),
                pass_through=tuple((p, u) for p, u in i["pass_through"]),
                reparameterized=tuple(i["reparameterized"]),
            )
            o = _fields(d["optimizer"], "optimizer", OptimizerRecipe)
            opt = OptimizerRecipe(o["name"], _pairs(o["args"]), o["scheduler"], o["clip"],
                                  o["clip_value"], o["set_to_none"])
            data = Data(**_fields(d["data"], "data", Data))
            mode = Mode(**_fields(d["mode"], "mode", Mode))
            schedule = tuple(Change(c["step"], tuple(c["frozen_modules"]))
                             for c in (_fields(c, "change", Change) for c in d["schedule"]))
            return cls(arch, intent, opt, data, d["steps"], d["micro_batches"], d["dtype"], d["init_seed"],
                       d["model"], mode, schedule)
        except ScenarioError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise ScenarioError(f"not a scenario: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "Scenario":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ScenarioError(f"not JSON: {exc}") from None
        return cls.from_dict(data)


def _program(ops: Any) -> tuple[Op, ...]:
    return tuple(Op(o["kind"], o["target"], tuple(o["shape"])) for o in (_fields(o, "op", Op) for o in ops))


def _architecture(a: Any) -> Architecture:
    a = _fields(a, "architecture", Architecture)
    return Architecture(
        input_shape=tuple(a["input_shape"]),
        layers=tuple(Layer(x["path"], x["kind"], _pairs(x["args"]))
                     for x in (_fields(x, "layer", Layer) for x in a["layers"])),
        program=_program(a["program"]),
        input_kind=a["input_kind"],
        vocab=a["vocab"],
        ties=tuple((t[0], t[1]) for t in a["ties"]),
        containers=tuple(Container(c["path"], c["kind"], _program(c["program"]))
                         for c in (_fields(c, "container", Container) for c in a["containers"])),
    )


def _in_a_layer(param: str, layers) -> bool:
    """``fc.weight`` or a nested ``attn.out_proj.weight``: the parameter belongs to one of ``layers``."""
    module = param.rpartition(".")[0]
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


def _fields(d: Any, what: str, spec: type) -> Mapping[str, Any]:
    """``d`` as a mapping with exactly ``spec``'s fields (those with defaults may be left out)."""
    _require(isinstance(d, Mapping), f"{what} must be a JSON object, got {type(d).__name__}")
    known = {f.name: f for f in dataclasses.fields(spec)}
    unknown = sorted(set(d) - set(known))
    _require(not unknown, f"unknown field(s) {unknown} in {what}; it has {sorted(known)}")
    missing = [n for n, f in known.items() if n not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    _require(not missing, f"{what} misses field(s) {missing}")
    return {**{n: _default(f) for n, f in known.items() if n not in d}, **d}


def _default(f: dataclasses.Field) -> Any:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _pairs(items: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in items)
