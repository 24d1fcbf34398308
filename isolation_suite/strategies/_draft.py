"""The scratch state an architecture is drawn on, shared by the blocks of ``architectures`` and
the reuse patterns of ``reuse`` (both import it; neither imports the other's drawing).

A small mutable :class:`Draft` tracks the current value's layout and shape and the program each
container is writing; :func:`leaf` adds one layer (its arguments drawn by the kind's ``DRAW_ARGS``
entry, keyed by the kinds of ``spec.kinds``), moving the value into the layout the kind needs first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from hypothesis import strategies as st

from isolation_suite.spec import kinds
from isolation_suite.spec.scenario import Layer, Op

#: top-level names, with prefix collisions on purpose (``fc1`` ⊂ ``fc10``, ``enc`` ⊂ ``encoder``)
TOP_NAMES = ("fc1", "fc10", "enc", "encoder", "gen", "layer1", "layer10", "head", "generator", "fc2")
#: names of children inside a container
CHILD_NAMES = ("0", "1", "fc1", "fc10", "2", "block")
#: the table's first kind (Linear), the simplest: what a pool left empty falls back to
PLAIN_KIND = kinds.LAYER_KINDS[0]


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
    vocab: int = 0  # the token range, once a token layer has drawn it

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
        layer_kinds = {layer.path: layer.kind for layer in self.layers}
        if all(op.kind == "call" for op in ops) and len(set(targets)) == len(targets) \
                and not any(layer_kinds.get(t) in kinds.TUPLE_KINDS or self.containers.get(t) == "modulelist"
                            for t in targets):
            return ("block", "sequential", "modulelist")
        return ("block",)

    def add_layer(self, path: str, kind: str, **kwargs) -> str:
        self.layers.append(Layer(path, kind, tuple(sorted(kwargs.items()))))
        return path


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
    # training-mode GroupNorm needs more than one value per group
    groups = [g for g in divisors(c) if (c // g) * spatial > 1]
    if not groups:  # no grouping has two values per group: a LayerNorm (which works on any layout) instead
        _layernorm(k, d, path, preserve)
        return
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


def _embedding(k: Knobs, d: Draft, path: str, preserve: bool) -> None:
    """Token ids ``(L,)`` -> ``(L, dim)``; the vocabulary it draws is the token input's."""
    d.vocab = k.pick(range(2, 7))
    dim = k.pick(range(1, 5))
    d.add_layer(path, "embedding", num_embeddings=d.vocab, embedding_dim=dim)
    d.layout, d.shape = "seq", d.shape + (dim,)


#: kind -> how its arguments are drawn and what it does to the current shape (the layout it needs
#: comes from ``kinds.KindInfo``, whose table this one follows kind for kind)
DRAW_ARGS: dict[str, Callable[[Knobs, Draft, str, bool], None]] = {
    "linear": _linear, "conv1d": _conv1d, "conv2d": _conv2d, "embedding": _embedding,
    "lstm": _recurrent("lstm"), "gru": _recurrent("gru"), "rnn": _recurrent("rnn"), "layernorm": _layernorm,
    "batchnorm1d": _batchnorm("batchnorm1d"), "batchnorm2d": _batchnorm("batchnorm2d"), "groupnorm": _groupnorm,
    "mha": _mha, "dropout": _dropout,
}
assert tuple(DRAW_ARGS) == kinds.LAYER_KINDS, "every layer kind says how its arguments are drawn, in the table's order"


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
    DRAW_ARGS[kind](k, d, path, preserve)
    d.emit(Op("call", path))
    return path


def maybe_activation(draw, d: Draft) -> None:
    act = draw(st.sampled_from(("none", "relu", "tanh", "gelu", "sigmoid")))
    if act != "none":
        d.emit(Op("act", act))


def prepare_for(draw, d: Draft, kind: str) -> None:
    """Move into the layout ``kind`` needs *before* a residual/reuse starts, so the layer is shape-preserving."""
    info = kinds.BY_KIND[kind]
    if info.needs and d.layout not in info.in_place:
        to_layout(Knobs(draw), d, info.needs)
