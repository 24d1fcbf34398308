"""Whole scenarios: an architecture, an intent the capabilities can express, an optimizer, data."""
from __future__ import annotations

from typing import Iterable

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from isolation_suite.build import param_shapes
from isolation_suite.scenario import DTYPES, LAYER_KINDS, LOSSES, Architecture, Data, Intent, Scenario
from isolation_suite.technique import Capability

from ._validate import check_choice, check_int
from .architectures import REPARAM_KINDS, architectures
from .elements import element_indices
from .optimizers import optimizer_recipes

DEVICES = ("cpu", "cuda")


def as_capabilities(capabilities: Iterable | None) -> frozenset[Capability]:
    """Validate ``capabilities`` (members or their names); ``None`` means all of them."""
    if capabilities is None:
        return frozenset(Capability)
    if isinstance(capabilities, (str, Capability)):
        capabilities = (capabilities,)
    out = set()
    for c in capabilities:
        try:
            out.add(Capability(c.value if isinstance(c, Capability) else str(c).upper()))
        except ValueError:
            raise InvalidArgument(
                f"capabilities contains {c!r}, which is not one of {[x.value for x in Capability]}") from None
    if not out:
        raise InvalidArgument("capabilities must not be empty")
    return frozenset(out)


def _containers(arch: Architecture) -> list[str]:
    found: list[str] = []
    for layer in arch.layers:
        parts = layer.path.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if prefix not in found:
                found.append(prefix)
    return found


def _param_layers(arch: Architecture) -> list[str]:
    return [l.path for l in arch.layers if param_shapes(l.kind, l.args)]


def _inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def _tie_paths(arch: Architecture) -> set[str]:
    """Module paths that own one end of a tie."""
    return {p.rpartition(".")[0] for tie in arch.ties for p in tie}


@st.composite
def intents(draw, arch: Architecture, capabilities: frozenset[Capability]) -> Intent:
    """Draw an :class:`Intent` for ``arch`` using each of ``capabilities`` at least once where possible.

    Isolated sets never overlap, tied parameters are never split between a
    frozen and a trainable module, and at least one parameterised layer trains.
    """
    params = _param_layers(arch)
    tied = _tie_paths(arch)
    claimed: set[str] = set()
    kw: dict = {}

    if Capability.PASS_THROUGH in capabilities:
        uses: dict[str, int] = {}
        for path, _ in arch.call_sites:
            uses[path] = uses.get(path, 0) + 1
        reused = [p for p in params if uses.get(p, 0) >= 2]
        if reused:
            path = draw(st.sampled_from(reused))
            chosen = draw(st.lists(st.integers(0, uses[path] - 1), min_size=1, max_size=uses[path], unique=True))
            kw["pass_through"] = tuple((path, u) for u in sorted(chosen))
            claimed.add(path)

    if Capability.REPARAMETERIZE in capabilities:
        targets = [l.path for l in arch.layers
                   if l.kind in REPARAM_KINDS and l.path not in tied and l.path not in claimed]
        if targets:
            chosen = draw(st.lists(st.sampled_from(targets), min_size=1, max_size=2, unique=True))
            kw["reparameterized"] = tuple(chosen)
            claimed.update(chosen)

    if Capability.FREEZE_ELEMENTS in capabilities:
        targets = [p for p in params if p not in tied and p not in claimed]
        if targets:
            path = draw(st.sampled_from(targets))
            layer = arch.layer(path)
            name, shape = draw(st.sampled_from(param_shapes(layer.kind, layer.args)))
            kw["frozen_elements"] = ((f"{path}.{name}", draw(element_indices(shape))),)
            claimed.add(path)

    if Capability.FREEZE_MODULE in capabilities:
        def can_freeze(candidate: str) -> bool:
            if not any(not _inside(p, candidate) and p not in claimed for p in params):
                return False  # something must stay trainable
            if any(_inside(c, candidate) or _inside(candidate, c) for c in claimed):
                return False  # isolated sets never overlap
            # a tie lies wholly inside or wholly outside the frozen module
            return all(_inside(a.rpartition(".")[0], candidate) == _inside(b.rpartition(".")[0], candidate)
                       for a, b in arch.ties)
        candidates = [c for c in _containers(arch) + [l.path for l in arch.layers] if can_freeze(c)]
        if candidates:
            first = draw(st.sampled_from(candidates))
            frozen = [first]
            rest = [c for c in candidates if not _inside(c, first) and not _inside(first, c)]
            if rest and draw(st.integers(0, 3)) == 3:
                second = draw(st.sampled_from(rest))
                if any(not _inside(p, first) and not _inside(p, second) and p not in claimed for p in params):
                    frozen.append(second)
            kw["frozen_modules"] = tuple(frozen)
    return Intent(**kw)


def _requirements(capabilities: frozenset[Capability]) -> frozenset[str]:
    need = set()
    if Capability.PASS_THROUGH in capabilities:
        need.add("reuse")
    if Capability.REPARAMETERIZE in capabilities:
        need.add("reparam")
    if Capability.FREEZE_MODULE in capabilities or Capability.FREEZE_ELEMENTS in capabilities:
        need.add("trainable_pair")
    return frozenset(need)


@st.composite
def scenarios(draw, capabilities: Iterable | None = None, dtypes: Iterable[str] = DTYPES,
              devices: Iterable[str] = ("cpu",), *, max_blocks: int = 3, max_steps: int = 4,
              kinds: Iterable[str] = LAYER_KINDS) -> Scenario:
    """Draw a :class:`isolation_suite.Scenario` whose intent uses only ``capabilities``.

    ``devices`` restricts optimizer variants to those every listed device runs.
    Shrinks toward one small layer, one step, SGD, float32.

    >>> from strategies import scenarios
    >>> scenarios(capabilities=["FREEZE_MODULE"])  # doctest: +ELLIPSIS
    scenarios(...)
    """
    caps = as_capabilities(capabilities)
    dtypes = check_choice("dtypes", dtypes, DTYPES)
    devices = check_choice("devices", devices, DEVICES)
    check_int("max_steps", max_steps, 1, 64)
    kinds = check_choice("kinds", kinds, LAYER_KINDS)
    ordered = sorted(caps, key=lambda c: c.value)
    if len(ordered) > 1:
        chosen = frozenset(draw(st.lists(st.sampled_from(ordered), min_size=1, unique=True)))
    else:
        chosen = frozenset(ordered)
    arch = draw(architectures(max_blocks=max_blocks, kinds=tuple(kinds), require=_requirements(chosen)))
    intent = draw(intents(arch, chosen))
    has_batchnorm = any(l.kind.startswith("batchnorm") for l in arch.layers)
    tokens = arch.input_kind == "tokens"
    data = Data(
        # BatchNorm in training mode needs more than one value per channel
        batch=draw(st.integers(2 if has_batchnorm else 1, 4)),
        seed=draw(st.integers(0, 2**16)),
        input_requires_grad=False if tokens else draw(st.sampled_from((True, False))),
        loss=draw(st.sampled_from(LOSSES)),
    )
    return Scenario(
        architecture=arch,
        intent=intent,
        optimizer=draw(optimizer_recipes(devices=devices)),
        data=data,
        steps=draw(st.integers(1, max_steps)),
        micro_batches=draw(st.integers(1, 2)),
        dtype=draw(st.sampled_from(dtypes)),
        init_seed=draw(st.integers(0, 2**16)),
    )
