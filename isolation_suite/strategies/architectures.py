"""Random module architectures whose shapes are valid by construction.

An architecture is drawn as a chain of *blocks* (a layer, a residual block, a
container of layers, or one of the reuse patterns in :mod:`strategies.reuse`).
Containers are real modules (``block``, ``nn.Sequential``, a residual block, an
``nn.ModuleList`` looped over by its parent) and can nest. A small mutable
:class:`Draft` tracks the current value's layout and shape and the program each
container is writing while blocks are drawn; what comes out is a frozen
:class:`isolation_suite.Architecture`.

>>> from strategies import architectures
>>> architectures(max_blocks=2)  # doctest: +ELLIPSIS
architectures(...)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from hypothesis import strategies as st

from isolation_suite.spec import kinds
from isolation_suite.spec.scenario import LAYER_KINDS, Architecture, Container, Layer, Op

from isolation_suite.strategies._validate import check_choice, check_int

#: top-level names, with prefix collisions on purpose (``fc1`` ⊂ ``fc10``, ``enc`` ⊂ ``encoder``)
TOP_NAMES = ("fc1", "fc10", "enc", "encoder", "gen", "layer1", "layer10", "head", "generator", "fc2")
#: names of children inside a container
CHILD_NAMES = ("0", "1", "fc1", "fc10", "2", "block")

SIZES = st.integers(1, 4)
SHAPE_PRESERVING = kinds.SHAPE_PRESERVING


KNOB_COUNT = 8


class Knobs:
    """A fixed number of small draws, consumed by ``pick``.

    Every layer (and every optimizer recipe) draws the same number of choices whatever its kind,
    so Hypothesis's shrinker, which prefers fewer choices, compares kinds by value: index 0
    (Linear, SGD) is the simplest, not whichever kind happens to need the fewest draws.
    """

    def __init__(self, draw):
        self.values = draw(st.tuples(*[st.integers(0, 7)] * KNOB_COUNT))
        self.used = 0

    def pick(self, options):
        options = list(options)
        value = options[self.values[self.used % KNOB_COUNT] % len(options)]
        self.used += 1
        return value


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Draft:
    """Mutable scratch state used while one architecture is drawn."""

    layout: str  # "vec" (F,), "seq" (L, F), "chan1" (C, L), "chan2" (C, H, W), "tokens" (L,)
    shape: tuple[int, ...]
    kinds: tuple[str, ...]
    layers: list[Layer] = field(default_factory=list)
    programs: dict[str, list[Op]] = field(default_factory=lambda: {"": []})  # owner path -> its program
    containers: dict[str, str] = field(default_factory=dict)  # path -> container kind
    owner: str = ""  # whose program is being written
    ties: list[tuple[str, str]] = field(default_factory=list)
    used_names: set[str] = field(default_factory=set)

    @property
    def program(self) -> list[Op]:
        return self.programs[self.owner]

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def emit(self, op: Op) -> None:
        self.program.append(op)

    def open(self, path: str) -> str:
        """Start writing the program of a new container at ``path``; returns the previous owner."""
        self.programs[path] = []
        previous, self.owner = self.owner, path
        return previous

    def close(self, draw, path: str, previous: str, kind: str | None = None) -> None:
        """Finish the container at ``path``: choose its kind (one its program allows) and call it."""
        self.owner = previous
        kind = kind or draw(st.sampled_from(self.allowed_kinds(path)))
        if kind == "modulelist":  # an nn.ModuleList names its children 0, 1, ...: via temporary names,
            children = [op.target for op in self.programs[path]]  # so "1" can become "0" while "0" exists
            for i, child in enumerate(children):
                rename(self, child, f"{path}.tmp{i}")
            for i in range(len(children)):
                rename(self, f"{path}.tmp{i}", f"{path}.{i}")
        self.containers[path] = kind
        self.emit(Op("loop" if kind == "modulelist" else "call", path))

    def allowed_kinds(self, path: str) -> tuple[str, ...]:
        ops = self.programs[path]
        targets = [op.target for op in ops]
        kinds = {layer.path: layer.kind for layer in self.layers}
        if all(op.kind == "call" for op in ops) and len(set(targets)) == len(targets) \
                and not any(kinds.get(t) in TUPLE_KINDS or self.containers.get(t) == "modulelist" for t in targets):
            return ("block", "sequential", "modulelist")
        return ("block",)

    def add_layer(self, path: str, kind: str, **kwargs) -> str:
        self.layers.append(Layer(path, kind, tuple(sorted(kwargs.items()))))
        return path


TUPLE_KINDS = kinds.TUPLE_KINDS


def rename(d: Draft, old: str, new: str) -> None:
    """Move the module at ``old`` (and everything below it) to ``new``, everywhere the draft names it."""
    def move(path: str) -> str:
        return new + path[len(old):] if path == old or path.startswith(old + ".") else path
    d.layers = [Layer(move(l.path), l.kind, l.args) for l in d.layers]
    d.programs = {move(k): [Op(op.kind, move(op.target) if op.kind in ("call", "loop") else op.target, op.shape)
                            for op in v] for k, v in d.programs.items()}
    d.containers = {move(k): v for k, v in d.containers.items()}
    d.ties = [(move(a), move(b)) for a, b in d.ties]
    d.used_names = {move(n) for n in d.used_names}


def fresh_name(draw, pool: tuple[str, ...], taken: set[str], prefix: str = "") -> str:
    free = [n for n in pool if prefix + n not in taken]
    name = draw(st.sampled_from(free)) if free else f"m{len(taken)}"
    taken.add(prefix + name)
    return prefix + name


# --- layout adapters -------------------------------------------------------------------

def to_layout(knobs: Knobs, d: Draft, layout: str) -> None:
    """Insert parameter-free ops that bring the current value into ``layout``."""
    if d.layout == layout:
        return
    if layout == "seq" and d.layout == "chan1":
        d.emit(Op("transpose"))
        d.shape = (d.shape[1], d.shape[0])
    elif layout == "chan1" and d.layout == "seq":
        d.emit(Op("transpose"))
        d.shape = (d.shape[1], d.shape[0])
    else:
        n = d.numel()
        if layout == "vec":
            shape: tuple[int, ...] = (n,)
        elif layout in ("seq", "chan1"):
            a = knobs.pick(divisors(n))
            shape = (a, n // a)
        else:  # chan2
            c = knobs.pick(divisors(n))
            h = knobs.pick(divisors(n // c))
            shape = (c, h, n // c // h)
        d.emit(Op("reshape", shape=shape))
        d.shape = shape
    d.layout = layout


# --- one leaf layer ----------------------------------------------------------------------

def _conv_args(k: Knobs, channels: int, length: int, preserve: bool) -> tuple[dict, int, int]:
    groups = k.pick(divisors(channels))
    out = channels if preserve else groups * k.pick((1, 2))
    kernel = k.pick((1, 3) if preserve else (1, 2, 3))
    dilation = k.pick((1, 2))
    if kernel == 1:
        # dilation changes nothing for a 1-wide kernel, and torch's CPU kernel can segfault on it:
        # Conv1d(2, 2, 1, stride=2, padding=1, dilation=2) on x.transpose(1, 2) of shape (2, 2, 1)
        dilation = 1
    if preserve:
        stride, padding = 1, dilation * (kernel - 1) // 2
    else:
        stride = k.pick((1, 2))
        padding = k.pick((0, 1))
        need = dilation * (kernel - 1) + 1
        if length + 2 * padding < need:
            padding = -(-(need - length) // 2)
    args = dict(in_channels=channels, out_channels=out, kernel_size=kernel, stride=stride,
                padding=padding, dilation=dilation, groups=groups)
    return args, out, _conv_len(length, args)


def _conv_len(n: int, a: dict) -> int:
    return (n + 2 * a["padding"] - a["dilation"] * (a["kernel_size"] - 1) - 1) // a["stride"] + 1


def _linear(k: Knobs, d: Draft, path: str, preserve: bool) -> None:
    f = d.shape[-1]
    out = f if preserve else k.pick(range(1, 5))
    d.add_layer(path, "linear", in_features=f, out_features=out, bias=k.pick((True, False)))
    d.shape = d.shape[:-1] + (out,)


def _layernorm(k: Knobs, d: Draft, path: str, preserve: bool) -> None:
    d.add_layer(path, "layernorm", normalized_shape=d.shape[-1])


def _dropout(k: Knobs, d: Draft, path: str, preserve: bool) -> None:
    d.add_layer(path, "dropout", p=k.pick((0.5, 0.25)))


def _conv1d(k: Knobs, d: Draft, path: str, preserve: bool) -> None:
    args, c, length = _conv_args(k, d.shape[0], d.shape[1], preserve)
    d.add_layer(path, "conv1d", **args)
    d.shape = (c, length)


def _conv2d(k: Knobs, d: Draft, path: str, preserve: bool) -> None:
    # padding is drawn against the shorter side, so both spatial axes stay valid
    args, c, _ = _conv_args(k, d.shape[0], min(d.shape[1], d.shape[2]), preserve)
    d.add_layer(path, "conv2d", **args)
    d.shape = (c,) + tuple(_conv_len(n, args) for n in d.shape[1:])


def _batchnorm(kind: str) -> Callable:
    def draw_args(k: Knobs, d: Draft, path: str, preserve: bool) -> None:
        d.add_layer(path, kind, num_features=d.shape[0])
    return draw_args


def _groupnorm(k: Knobs, d: Draft, path: str, preserve: bool) -> None:
    c, spatial = d.shape[0], d.numel() // d.shape[0]
    # training-mode GroupNorm needs more than one value per group (callers checked one exists)
    groups = [g for g in divisors(c) if (c // g) * spatial > 1]
    d.add_layer(path, "groupnorm", num_groups=k.pick(groups), num_channels=c)


def _recurrent(kind: str) -> Callable:
    def draw_args(k: Knobs, d: Draft, path: str, preserve: bool) -> None:
        f = d.shape[1]
        hidden = f if preserve else k.pick(range(1, 5))
        d.add_layer(path, kind, input_size=f, hidden_size=hidden)
        d.shape = (d.shape[0], hidden)
    return draw_args


def _mha(k: Knobs, d: Draft, path: str, preserve: bool) -> None:
    e = d.shape[1]
    d.add_layer(path, "mha", embed_dim=e, num_heads=k.pick(divisors(e)))


#: kind -> how its arguments are drawn and what it does to the current shape (the layout it needs
#: comes from ``kinds.KindInfo``); the embedding is drawn with the token input in ``architectures``
DRAW_ARGS: dict[str, Callable[[Knobs, Draft, str, bool], None]] = {
    "linear": _linear, "layernorm": _layernorm, "dropout": _dropout, "conv1d": _conv1d, "conv2d": _conv2d,
    "batchnorm1d": _batchnorm("batchnorm1d"), "batchnorm2d": _batchnorm("batchnorm2d"), "groupnorm": _groupnorm,
    "lstm": _recurrent("lstm"), "gru": _recurrent("gru"), "rnn": _recurrent("rnn"), "mha": _mha,
}


def leaf(draw, d: Draft, path: str, kind: str, preserve: bool = False, knobs: Knobs | None = None) -> str:
    """Add a layer of ``kind`` at ``path``, emit its call, and update the draft's shape.

    With ``preserve`` the layer maps the current shape onto itself (needed when
    it is called more than once or sits in a residual block).
    """
    k = knobs or Knobs(draw)
    if kind not in DRAW_ARGS:
        raise ValueError(f"unknown layer kind {kind!r}")
    info = kinds.BY_KIND[kind]
    if d.layout not in info.in_place and info.needs:
        to_layout(k, d, info.needs)
    c, spatial = d.shape[0], d.numel() // d.shape[0]
    if kind == "groupnorm" and not [g for g in divisors(c) if (c // g) * spatial > 1]:
        return leaf(draw, d, path, "layernorm", preserve, k)  # no grouping has two values per group
    DRAW_ARGS[kind](k, d, path, preserve)
    d.emit(Op("call", path))
    return path


def maybe_activation(draw, d: Draft) -> None:
    act = draw(st.sampled_from(("none", "relu", "tanh", "gelu", "sigmoid")))
    if act != "none":
        d.emit(Op("act", act))


# --- blocks ------------------------------------------------------------------------------

def _kind(draw, d: Draft, preserve: bool = False) -> str:
    pool = [k for k in d.kinds if k != "embedding" and (not preserve or k in SHAPE_PRESERVING)]
    return draw(st.sampled_from(pool))


def block_layer(draw, d: Draft, prefix: str = "") -> None:
    leaf(draw, d, fresh_name(draw, TOP_NAMES if not prefix else CHILD_NAMES, d.used_names, prefix),
         _kind(draw, d))
    maybe_activation(draw, d)


def block_residual(draw, d: Draft, prefix: str = "") -> None:
    """``x + f(x)``: a ``Residual`` container (or, around a layer that returns a tuple, a block
    that saves and adds) holding one shape-preserving layer."""
    kind = _kind(draw, d, preserve=True)
    _prepare_for(draw, d, kind)
    name = fresh_name(draw, TOP_NAMES if not prefix else CHILD_NAMES, d.used_names, prefix)
    previous = d.open(name)
    tuple_out = kind in TUPLE_KINDS
    if tuple_out:
        d.emit(Op("save"))
    leaf(draw, d, fresh_name(draw, CHILD_NAMES, d.used_names, name + "."), kind, preserve=True)
    if tuple_out:
        d.emit(Op("add"))
    d.close(draw, name, previous, "block" if tuple_out else "residual")
    # every block ends with an optional activation: equal draw counts keep shrinking fair
    maybe_activation(draw, d)


def block_container(draw, d: Draft, depth: int = 0, prefix: str = "", preserve: bool = False) -> str:
    """A named sub-module holding 1-3 children (layers or, once, another container). Its kind is
    drawn first: a ``block`` runs activations and reshapes between its children and may call one
    child twice; an ``nn.Sequential`` or a looped ``nn.ModuleList`` only chains children that work
    on the current layout and return one tensor."""
    name = fresh_name(draw, TOP_NAMES if not prefix else CHILD_NAMES, d.used_names, prefix)
    kind = draw(st.sampled_from(("block", "sequential", "modulelist")))
    chained = kind != "block"
    previous = d.open(name)
    for _ in range(draw(st.integers(1, 3 if depth == 0 else 2))):
        if depth == 0 and not preserve and draw(st.integers(0, 4)) == 4:
            block_container(draw, d, depth + 1, prefix=name + ".")
            continue
        if chained:
            pool = [k for k in _IN_PLACE_KINDS[d.layout] if k in d.kinds and (not preserve or k in SHAPE_PRESERVING)]
            child_kind = draw(st.sampled_from(pool or ["linear"]))
        else:
            child_kind = _kind(draw, d, preserve=preserve)
            if preserve:
                _prepare_for(draw, d, child_kind)
        child = leaf(draw, d, fresh_name(draw, CHILD_NAMES, d.used_names, name + "."), child_kind, preserve=preserve)
        if not chained:
            maybe_activation(draw, d)
            if draw(st.integers(0, 5)) == 5 and child_kind not in ("embedding", "dropout") and _same_shape(d, child):
                d.emit(Op("call", child))  # a child called twice by its container
    d.close(draw, name, previous, kind if kind in d.allowed_kinds(name) else "block")
    return name


#: kinds that work on a layout as it is (no reshape first) and return one tensor
_IN_PLACE_KINDS = {layout: kinds.in_place(layout, chained=True) for layout in kinds.LAYOUTS}


def _same_shape(d: Draft, path: str) -> bool:
    """The layer at ``path`` maps the current value onto its own shape (it can be called again)."""
    layer = next(l for l in d.layers if l.path == path)
    args = layer.kwargs
    if layer.kind in ("linear",):
        return args["in_features"] == args["out_features"]
    if layer.kind in ("lstm", "gru", "rnn"):
        return args["input_size"] == args["hidden_size"]
    if layer.kind in ("conv1d", "conv2d"):
        return False  # lengths shrink with stride and padding
    return layer.kind in ("layernorm", "batchnorm1d", "batchnorm2d", "groupnorm", "mha")


def _prepare_for(draw, d: Draft, kind: str) -> None:
    """Move into the layout ``kind`` needs *before* a residual/reuse starts, so the layer is shape-preserving."""
    info = kinds.BY_KIND[kind]
    if info.needs and d.layout not in info.in_place:
        to_layout(Knobs(draw), d, info.needs)


BlockFn = Callable[..., None]


@st.composite
def architectures(draw, *, max_blocks: int = 3, kinds: tuple[str, ...] = LAYER_KINDS,
                  require: frozenset[str] = frozenset()) -> Architecture:
    """Draw an :class:`Architecture`.

    ``kinds`` restricts the layer kinds; ``require`` asks for structures the
    intent will need: ``"reuse"`` (a module at two or more call sites),
    ``"trainable_pair"`` (at least two parameterised layers), ``"reparam"`` (a
    Linear, convolution or recurrent layer to wrap).
    """
    from isolation_suite.strategies import reuse  # reuse patterns are blocks too; imported late to avoid a cycle

    check_int("max_blocks", max_blocks, 1, 12)
    kinds = check_choice("kinds", kinds, LAYER_KINDS)
    check_choice("require", require or {"reuse"}, ("reuse", "trainable_pair", "reparam"))
    if "embedding" in kinds and draw(st.integers(0, 3)) == 3:
        k = Knobs(draw)
        length, vocab, dim = k.pick(range(1, 5)), k.pick(range(2, 7)), k.pick(range(1, 5))
        d = Draft("seq", (length, dim), kinds)
        name = fresh_name(draw, TOP_NAMES, d.used_names)
        d.add_layer(name, "embedding", num_embeddings=vocab, embedding_dim=dim)
        d.emit(Op("call", name))
        input_shape, input_kind = (length,), "tokens"
    else:
        vocab = 0
        layout = draw(st.sampled_from(("vec", "seq", "chan1", "chan2")))
        shape = {"vec": 1, "seq": 2, "chan1": 2, "chan2": 3}[layout]
        dims = tuple(draw(SIZES) for _ in range(shape))
        d = Draft(layout, dims, kinds)
        input_shape, input_kind = dims, "float"
    blocks: dict[str, BlockFn] = {
        "layer": block_layer,
        "reuse": reuse.block_reused_layer,
        "sandwich": reuse.block_sandwich,
        "tied": reuse.block_tied,
        "residual": block_residual,
        "container": block_container,
    }
    # two blocks up front rather than appending one later: an appended layer makes that path
    # draw fewer choices, and the shrinker would then prefer it over the plain one
    least = 2 if "trainable_pair" in require else 1
    count = draw(st.integers(least, max(least, max_blocks)))
    # a required reuse block takes a drawn position (shrinking to the front) instead of being
    # appended; requirements are met by construction, never by filtering
    reuse_at = draw(st.integers(0, count - 1)) if "reuse" in require else -1
    for position in range(count):
        if position == reuse_at:
            reuse.block_reused_layer(draw, d)
        else:
            blocks[draw(st.sampled_from(tuple(blocks)))](draw, d)
    param_layers = [l for l in d.layers if l.kind != "dropout"]
    if "reparam" in require and not any(l.kind in REPARAM_KINDS and not _tied(d, l.path) for l in param_layers):
        leaf(draw, d, fresh_name(draw, TOP_NAMES, d.used_names), draw(st.sampled_from(
            [k for k in ("linear", "conv1d", "conv2d", "lstm", "gru", "rnn") if k in kinds] or ["linear"])))
    if "trainable_pair" in require:
        # two untied parameterised layers: one to isolate, one that keeps training
        while sum(l.kind != "dropout" and not _tied(d, l.path) for l in d.layers) < 2:
            leaf(draw, d, fresh_name(draw, TOP_NAMES, d.used_names), "linear")
    return Architecture(input_shape=input_shape, layers=tuple(d.layers), program=tuple(d.programs[""]),
                        input_kind=input_kind, vocab=vocab, ties=tuple(d.ties),
                        containers=tuple(Container(p, kind, tuple(d.programs[p])) for p, kind in d.containers.items()))


REPARAM_KINDS = kinds.REPARAM_KINDS


def _tied(d: Draft, path: str) -> bool:
    return any(t.startswith(path + ".") for tie in d.ties for t in tie)
