"""What a model under test looks like, and how the harness reaches into it.

:class:`ModelTree` describes any model as plain data: its modules (kind, own parameters, how
often one forward calls each), the order of those calls, tied parameters. A generated
architecture's tree is computed from the spec; a user's model's tree is recorded by one probe
forward. The strategies draw intents over it, the catalog's conditions read it.

:func:`route` is the one mechanism by which the harness takes part in a forward: the modules an
intent names get their *calls* intercepted (``parent.enc(x)`` becomes ``driver.call(site, enc,
(x,))``), for the technique and for the reference alike. Nothing else changes: the module tree,
its paths, ``state_dict`` keys and every hook stay as they are, so hooks, wrappers and
replacements at any level behave as in user code.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from isolation_suite.spec import kinds
from isolation_suite.model.build import param_shapes, train_mode
from isolation_suite.model.layers import SeededDropout, kind_of, train_mode_effect
from isolation_suite.spec.scenario import Architecture, Intent, ScenarioError
from isolation_suite.technique import Capability, Role, reparam_param_name


@dataclass(frozen=True)
class Node:
    path: str  # "" is the model itself
    kind: str  # a layer kind ("linear", "batchnorm1d"), a container kind, or the class name
    params: tuple[tuple[str, tuple[int, ...]], ...] = ()  # its parameters that no listed child owns
    calls: int = 0  # how many times one forward calls it
    train_mode: str = ""  # what training mode changes in it ("" when nothing)
    #: one of its own parameters is read where no module holding it is running (``F.linear(h,
    #: self.wte.weight)`` in the parent's forward): a wrapper that replaces the module breaks that read
    read_outside: bool = False
    #: the weight a reparameterization wraps (``technique.reparam_param_name``) is a parametrization
    #: already (``weight_norm``, ``orthogonal``): a wrapper cannot replace it (``del module.weight`` fails)
    weight_parametrized: bool = False


@dataclass(frozen=True)
class ModelTree:
    nodes: tuple[Node, ...]
    order: tuple[tuple[str, int], ...]  # every module call of one forward as (path, use), in start order
    ties: tuple[tuple[str, str], ...] = ()  # (param path, the earlier path of the same tensor)
    float_inputs: bool = True  # some input is floating point, so it can need gradient
    #: a module draws random numbers on the model's device (a user's active dropout): runs on two
    #: devices differ by design (generated models draw dropout masks on the CPU, see SeededDropout)
    device_random: bool = False
    #: a user's model: each example input's size along its batch dimension (None: not split), see
    #: ``factory.batch_dims``; empty for a generated model, whose batch is drawn
    batch_rows: tuple[int | None, ...] = ()

    @functools.cached_property
    def by_path(self) -> dict[str, Node]:
        return {n.path: n for n in self.nodes}

    def node(self, path: str) -> Node:
        return self.by_path[path]

    @functools.cached_property
    def parameters(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's full path and shape (a tied one under its first path only)."""
        tied = {a for a, _ in self.ties}
        return {_join(n.path, name): shape for n in self.nodes for name, shape in n.params
                if _join(n.path, name) not in tied}

    @functools.cached_property
    def aliases(self) -> dict[str, tuple[str, ...]]:
        """Every parameter's first path -> all the paths it is reachable under (a tied one has several)."""
        out = {path: (path,) for path in self.parameters}
        for later, earlier in self.ties:
            out[earlier] = out.get(earlier, (earlier,)) + (later,)
        return out

    def frozen_params(self, intent: Intent) -> frozenset[str]:
        """The parameters (by first path) that ``intent`` freezes: those a frozen module holds under
        any of their paths. Freezing belongs to the parameter, so a tie frozen in one module is frozen
        wherever it is read."""
        cache = self.__dict__.setdefault("_frozen_params", {})
        if intent not in cache:
            cache[intent] = frozenset(p for p, names in self.aliases.items()
                                      if any(intent.is_frozen_param(n) for n in names))
        return cache[intent]

    def owner(self, param: str) -> str:
        """The path of the node that lists ``param``."""
        for n in self.nodes:
            if any(_join(n.path, name) == param for name, _ in n.params):
                return n.path
        raise KeyError(param)

    def inside(self, path: str) -> list[Node]:
        """``path``'s node and every node below it."""
        return [n for n in self.nodes if _within(n.path, path)]

    def routed(self, path: str) -> list[str]:
        """Where calls of ``path`` are intercepted: ``path`` itself when the forward calls it, else the
        outermost called modules inside it (the children of an ``nn.ModuleList``)."""
        if path == "" or self.node(path).calls:
            return [path]
        below = [n.path for n in self.nodes if n.path.startswith(path + ".") and n.calls]
        return [p for p in below if not any(p.startswith(q + ".") for q in below)]

    def counts(self) -> dict[str, int]:
        return {n.path: n.calls for n in self.nodes}


def _join(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _within(path: str, module: str) -> bool:
    return module == "" or path == module or path.startswith(module + ".")


# --- trees ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def architecture_tree(arch: Architecture) -> ModelTree:
    """The tree of a generated model, from its spec alone (nothing is built but on the meta device)."""
    counts: dict[str, int] = {}
    for path, _ in arch.call_sites:
        counts[path] = counts.get(path, 0) + 1
    nodes = [Node("", "model", (), 1)]
    nodes += [Node(c.path, c.kind, (), counts.get(c.path, 0)) for c in arch.containers]
    nodes += [Node(l.path, l.kind, param_shapes(l.kind, l.args), counts.get(l.path, 0), train_mode(l.kind, l.args))
              for l in arch.layers]
    nodes.sort(key=lambda n: (n.path.split("."), n.path))
    return ModelTree(tuple(nodes), arch.call_sites, tuple(arch.ties), arch.input_kind == "float")


def module_tree(model: nn.Module, inputs: tuple) -> ModelTree:
    """The tree of any model, with call counts from one forward on ``inputs`` (in training mode,
    without gradient; the model is a throwaway: its running statistics may move)."""
    paths = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
    order: list[tuple[str, int]] = []
    uses: dict[str, int] = {}
    reads = _OutsideReads(model)

    def count(module: nn.Module, args: Any) -> None:
        reads.running.append(id(module))
        path = paths.get(id(module))
        if path:  # the model's own call ("") is not one of its calls
            order.append((path, uses.get(path, 0)))
            uses[path] = uses.get(path, 0) + 1

    def done(module: nn.Module, args: Any, output: Any) -> None:
        if reads.running and reads.running[-1] == id(module):
            reads.running.pop()
    handles = [torch.nn.modules.module.register_module_forward_pre_hook(count),
               torch.nn.modules.module.register_module_forward_hook(done)]
    try:
        model.train()
        with torch.no_grad(), reads:
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    seen: dict[int, str] = {}
    ties = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            ties.append((name, seen[id(p)]))
        else:
            seen[id(p)] = name
    nodes = []
    for path, module in model.named_modules():
        own = tuple((n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False))
        kind = "model" if path == "" else kind_of(module)
        # a module that calls a functional dropout in training mode (LLaMA's attention) drops units too
        effect = train_mode_effect(module) or (kinds.DROPOUT_EFFECT if id(module) in reads.drops else "")
        nodes.append(Node(path, kind, own, uses.get(path, 0), effect,
                          bool(path) and id(module) in reads.outside,
                          parametrize.is_parametrized(module, reparam_param_name(module))))
    floats = any(isinstance(x, torch.Tensor) and x.is_floating_point() for x in inputs)
    device_random = (bool(reads.drops) or any(n.kind in kinds.RANDOM_KINDS and n.train_mode and n.calls
                                              for n in nodes)) and not any(
        isinstance(m, SeededDropout) for m in model.modules())
    return ModelTree(tuple(nodes), tuple(order), tuple(ties), floats, device_random)


#: functional dropout: the function -> (its rate's name, position, default), (its training flag's, or None:
#: on whenever the rate is, as ``scaled_dot_product_attention``'s ``dropout_p``)
_FUNCTIONAL_DROPOUT = {
    **dict.fromkeys((F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout),
                    (("p", 1, 0.5), ("training", 2, True))),
    F.scaled_dot_product_attention: (("dropout_p", 4, 0.0), None),
}


def _argument(args: tuple, kwargs: dict, name: str, position: int, default: Any) -> Any:
    return kwargs[name] if name in kwargs else args[position] if len(args) > position else default


def drops(func: Any, args: tuple, kwargs: dict) -> bool:
    """The call is a functional dropout that drops units."""
    spec = _FUNCTIONAL_DROPOUT.get(func)
    if spec is None:
        return False
    rate, flag = spec
    return bool(_argument(args, kwargs, *rate)) and (flag is None or bool(_argument(args, kwargs, *flag)))


class _OutsideReads(TorchFunctionMode):
    """Notes the modules whose own parameter an operation reads while none of the modules holding
    that parameter is running (``running``: the ids of the modules whose forward is under way), and
    the modules that call a functional dropout themselves (``drops``: no ``nn.Dropout`` shows it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.holders: dict[int, set[int]] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                self.holders.setdefault(id(p), set()).add(id(module))
        self.running: list[int] = []
        self.outside: set[int] = set()
        self.drops: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.running and drops(func, args, kwargs or {}):
            self.drops.add(self.running[-1])
        for x in pytree.tree_leaves((args, kwargs or {})):
            holders = self.holders.get(id(x)) if isinstance(x, nn.Parameter) else None
            if holders and holders.isdisjoint(self.running):
                self.outside |= holders
        return func(*args, **(kwargs or {}))


# --- where an intent can point -------------------------------------------------------------
# One definition for the strategies (which draw among these) and the trigger examples for a
# user's model (which pick the first that has a trigger's conditions).

#: kinds whose weight a reparameterization wraps
REPARAM_KINDS = kinds.REPARAM_KINDS


def owners(tree: ModelTree) -> list[str]:
    """Modules with parameters of their own, in tree order."""
    return [n.path for n in tree.nodes if n.path and n.params]


def tied_modules(tree: ModelTree) -> set[str]:
    return {p.rpartition(".")[0] for tie in tree.ties for p in tie}


def _overlaps(path: str, claimed) -> bool:
    return any(_within(path, c) or _within(c, path) for c in claimed)


def pass_through_targets(tree: ModelTree) -> list[str]:
    """Modules called more than once with parameters below them (none tied)."""
    own, tied = owners(tree), tied_modules(tree)
    return [n.path for n in tree.nodes if n.path and n.calls >= 2 and any(_within(o, n.path) for o in own)
            and not any(_within(t, n.path) for t in tied)]


def reparam_targets(tree: ModelTree, claimed=()) -> list[str]:
    """Called layers a reparameterization can wrap: untied, with no parameter read outside their own
    calls (a wrapper replaces the module, so such a read would find the wrapper's attributes), and
    whose wrapped weight is not a parametrization already (a wrapper cannot replace that weight)."""
    tied = tied_modules(tree)
    return [n.path for n in tree.nodes if n.kind in REPARAM_KINDS and n.calls and n.path not in tied
            and not n.read_outside and not n.weight_parametrized and not _overlaps(n.path, claimed)]


def element_owners(tree: ModelTree, claimed=()) -> list[str]:
    """Called modules whose own (untied) parameters can have frozen entries."""
    tied = tied_modules(tree)
    return [o for o in owners(tree) if o not in tied and tree.node(o).calls and not _overlaps(o, claimed)]


def freeze_targets(tree: ModelTree, claimed=()) -> list[str]:
    """Modules (leaves, containers, a never-called ``nn.ModuleList`` or ``nn.ModuleDict``) that can be
    frozen: they hold parameters, leave a parameter that nothing ``claimed`` holds training, and
    overlap nothing ``claimed``. A module holding one name of a tied parameter freezes it under every
    name (freezing belongs to the parameter)."""
    def ok(candidate: str) -> bool:
        frozen = tree.frozen_params(Intent(frozen_modules=(candidate,)))
        if not frozen or _overlaps(candidate, claimed):
            return False
        return any(p not in frozen and not any(_within(n.rpartition(".")[0], c) for n in names for c in claimed)
                   for p, names in tree.aliases.items())
    return [n.path for n in tree.nodes if n.path and ok(n.path)]


def targets_for(tree: ModelTree, capability: Capability) -> list[str]:
    """Where an intent of ``capability`` can point in ``tree`` (empty: the model offers none)."""
    return {Capability.FREEZE_MODULE: freeze_targets, Capability.PASS_THROUGH: pass_through_targets,
            Capability.FREEZE_ELEMENTS: element_owners, Capability.REPARAMETERIZE: reparam_targets,
            Capability.FREEZE_SCHEDULE: freeze_targets}[capability](tree)


def check_intent(tree: ModelTree, intent: Intent) -> None:
    """Raise ScenarioError where ``intent`` names what ``tree`` does not have."""
    for path in intent.frozen_modules + intent.reparameterized:
        if path not in tree.by_path or path == "":
            raise ScenarioError(f"the intent names module {path!r}, which the model does not have")
    for path, use in intent.pass_through:
        calls = tree.by_path[path].calls if path in tree.by_path else 0
        if not 0 <= use < calls:
            raise ScenarioError(f"pass_through ({path!r}, {use!r}): {path!r} is called {calls} time(s)")
    params = {_join(n.path, name): shape for n in tree.nodes for name, shape in n.params}
    for param, indices in intent.frozen_elements:
        if param not in params:
            raise ScenarioError(f"frozen elements of {param!r}, which is not a parameter of the model")
        shape = params[param]
        for index in indices:
            if len(index) != len(shape) or any(not 0 <= i < s for i, s in zip(index, shape)):
                raise ScenarioError(f"frozen element {list(index)} is outside {param!r} of shape {list(shape)}")


# --- routing ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CallSite:
    """One intercepted call: the ``index``-th of this forward, the ``use``-th call of ``path``."""

    index: int
    path: str
    use: int
    role: Role
    kind: str  # the module's kind (see ``layers.kind_of``)

    def __repr__(self) -> str:
        return f"{self.path}#{self.use}({self.role.value})"


def roles(tree: ModelTree, intent: Intent) -> dict[str, Callable[[int], Role]]:
    """Which calls to intercept, and the role of each use: frozen modules (or, where one is never
    called, its outermost called modules) are FROZEN; the named uses of a pass-through module are
    PASS_THROUGH and its other uses NORMAL; owners of frozen elements and reparameterized
    modules are intercepted as NORMAL (a technique may want to act around their calls)."""
    out: dict[str, Callable[[int], Role]] = {}
    for path in intent.reparameterized:
        out[path] = lambda use: Role.NORMAL
    for param, _ in intent.frozen_elements:
        out[tree.owner(param)] = lambda use: Role.NORMAL
    passes: dict[str, set[int]] = {}
    for path, use in intent.pass_through:
        passes.setdefault(path, set()).add(use)
    for path, uses in passes.items():
        out[path] = lambda use, uses=frozenset(uses): Role.PASS_THROUGH if use in uses else Role.NORMAL
    for path in intent.frozen_modules:
        for target in tree.routed(path):
            out[target] = lambda use: Role.FROZEN
    return out


def isolated_calls(tree: ModelTree, intent: Intent) -> list[int]:
    """Positions in ``tree.order`` of the calls that must be frozen or pass-through."""
    table = roles(tree, intent)
    return [i for i, (path, use) in enumerate(tree.order) if path in table and table[path](use) is not Role.NORMAL]


def upstream_of_isolation(tree: ModelTree, intent: Intent) -> set[str]:
    """Modules with parameters called before the last frozen or pass-through call, outside any frozen
    module: their gradient has to cross an isolated call to reach them."""
    isolated = isolated_calls(tree, intent)
    if not isolated:
        return set()
    return {path for path, _ in tree.order[:max(isolated)]
            if tree.node(path).params and not intent.is_frozen_module(path)}


def leaves_parameters_unused(tree: ModelTree, intent: Intent) -> bool:
    """The intent itself leaves a parameter outside frozen modules without gradient: a module
    passed through at every one of its calls (its parameters, and those below it, are constants
    wherever it runs). DistributedDataParallel then needs ``find_unused_parameters=True`` or
    ``static_graph=True`` whatever the technique does. (Over-approximates: a module below it that is
    also called elsewhere does get gradient.)"""
    passed: dict[str, int] = {}
    for path, _ in intent.pass_through:
        passed[path] = passed.get(path, 0) + 1
    return any(count >= tree.node(path).calls and any(_within(o, path) for o in owners(tree))
               for path, count in passed.items())


def feeds_region(tree: ModelTree, target: str) -> list[str]:
    """Modules with parameters called before ``target``'s first call, outside it and its ancestors:
    what can make the input of a region (a checkpointed container) need gradient."""
    if target == "":
        return []
    first = next((i for i, (path, _) in enumerate(tree.order) if path == target), len(tree.order))
    return [path for path, _ in tree.order[:first]
            if tree.node(path).params and not _within(path, target) and not _within(target, path)]


def mode_targets(tree: ModelTree) -> list[str]:
    """Where a checkpoint or compile can be put: the whole model (first), then every called module
    that has modules below it (a container, a block, a user's layer stack)."""
    parents = {n.path.rpartition(".")[0] for n in tree.nodes if n.path}
    return [""] + [n.path for n in tree.nodes if n.path and n.calls and n.path in parents]


def shard_units(tree: ModelTree) -> list[str]:
    """The containers an ``fsdp`` mode with ``nested`` shards on their own, innermost first: called
    modules with modules below them (a ``ModuleList`` is never called: FSDP2 hooks a module's call)
    and parameters inside, none of which a module outside them also holds (FSDP2 refuses a parameter
    shared by two groups) or is read outside the call of a module holding it (``Node.read_outside``:
    a read outside the container's call would meet the sharded parameter, not the gathered one). The
    wrap and the catalog's conditions both read it, so what is sharded is what the conditions see."""
    aliases = tree.aliases
    out = []
    for target in mode_targets(tree)[1:]:
        inside = [p for p in tree.parameters if _under(p, target)]
        if not inside or any(n.read_outside for n in tree.nodes if _under(n.path, target)):
            continue
        if all(_under(alias, target) for p in inside for alias in aliases[p]) and not any(
                _under(earlier, target) != _under(later, target) for later, earlier in tree.ties):
            out.append(target)
    return sorted(out, key=lambda path: -path.count("."))


def _under(param_path: str, module: str) -> bool:
    return param_path.startswith(module + ".")


def region_needs_gradient(tree: ModelTree, target: str, intent: Intent, input_requires_grad: bool) -> bool:
    """Whether the input of region ``target`` needs gradient when every module the intent freezes
    has ``requires_grad=False``: the model's input needs it, or a trainable module feeds the region."""
    if input_requires_grad and tree.float_inputs:
        return True
    return any(not intent.is_frozen_module(path) for path in feeds_region(tree, target))


def region_trains(tree: ModelTree, target: str, intent: Intent) -> bool:
    """Region ``target`` holds a parameter the intent leaves trainable."""
    return any(n.params and not intent.is_frozen_module(n.path) for n in tree.inside(target))


class _Route:
    __slots__ = ("router", "path", "role", "kind", "uses", "busy", "pending")

    def __init__(self, router: "Router", path: str, role: Callable[[int], Role], module: nn.Module):
        self.router, self.path, self.role, self.kind = router, path, role, kind_of(module)
        self.uses, self.busy, self.pending = 0, False, None


#: id(module) -> its route, for every module a router intercepts right now
_ROUTES: dict[int, _Route] = {}
_ROUTED_CLASSES: dict[type, type] = {}


def _routed_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    route = _ROUTES.get(id(self))
    if route is None or not route.router.active or route.busy:
        if route is not None and route.busy and route.pending is not None and not kwargs:
            # a three-argument ``call`` (``call(module, args, role)``) calling the module itself: the
            # keyword arguments of the intercepted call go with the module's first call inside it
            kwargs, route.pending = route.pending, None
        return _plain_call(self, *args, **kwargs)
    router = route.router
    site = CallSite(router.index, route.path, route.uses, route.role(route.uses), route.kind)
    router.index += 1
    route.uses += 1
    route.busy = True
    try:
        if router.keywords:
            return router.call(site, self, args, dict(kwargs))
        route.pending = kwargs or None
        return router.call(site, self, args)
    finally:
        route.busy, route.pending = False, None


def _plain_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The call the module's own class makes (below every routed class in its MRO: a technique's
    parametrization may have subclassed the routed class again)."""
    for klass in type(module).__mro__:
        if klass.__dict__.get("_isolation_routed"):
            return super(klass, module).__call__(*args, **kwargs)
    return type(module).__call__(module, *args, **kwargs)


def _routed_class(cls: type) -> type:
    """A subclass of ``cls`` that differs only in ``__call__`` (Python looks ``__call__`` up on the
    class, so an instance attribute cannot intercept a call); same name, so reprs do not change."""
    routed = _ROUTED_CLASSES.get(cls)
    if routed is None:
        routed = type(cls.__name__, (cls,), {"__call__": _routed_call, "__module__": cls.__module__,
                                              "__qualname__": cls.__qualname__, "_isolation_routed": True})
        _ROUTED_CLASSES[cls] = routed
    return routed


class Router:
    """Intercepts the calls of the modules ``roles`` names while ``active`` (the forward phase:
    a call during backward, as a reentrant checkpoint makes, runs plainly)."""

    def __init__(self, model: nn.Module, roles: dict[str, Callable[[int], Role]],
                 call: Callable[..., Any], keywords: bool = False):
        # ``call(site, module, args, kwargs)`` with ``keywords``, else ``call(site, module, args)``
        self.model, self.call, self.keywords, self.active, self.index = model, call, keywords, False, 0
        self.routes: list[tuple[nn.Module, _Route]] = []
        self._register(roles)

    def _register(self, roles: dict[str, Callable[[int], Role]]) -> None:
        for path, role in roles.items():
            module = self.model.get_submodule(path) if path else self.model
            route = _Route(self, path, role, module)
            if not getattr(type(module), "_isolation_routed", False):
                module.__class__ = _routed_class(type(module))
            _ROUTES[id(module)] = route
            self.routes.append((module, route))

    def reroute(self, roles: dict[str, Callable[[int], Role]]) -> None:
        """The intent changed at a step boundary (a freeze schedule): intercept what ``roles`` names
        from now on (a module no longer named runs plainly; its routed class stays, harmlessly)."""
        self.close()
        self._register(roles)

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """One forward pass: uses count from zero."""
        self.index = 0
        for _, route in self.routes:
            route.uses = 0
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def snapshot(self) -> tuple[int, tuple[int, ...]]:
        """Where the forward is: the next call's index and each route's uses so far."""
        return self.index, tuple(route.uses for _, route in self.routes)

    @contextlib.contextmanager
    def replaying(self, snapshot: tuple[int, tuple[int, ...]]) -> Iterator[None]:
        """A recomputation during backward (a checkpointed region run again) is routed as the
        forward was from ``snapshot`` on: same call indices, same uses, same roles."""
        saved = self.active, self.index, [route.uses for _, route in self.routes]
        self.active, self.index = True, snapshot[0]
        for (_, route), uses in zip(self.routes, snapshot[1]):
            route.uses = uses
        try:
            yield
        finally:
            self.active, self.index = saved[0], saved[1]
            for (_, route), uses in zip(self.routes, saved[2]):
                route.uses = uses

    def close(self) -> None:
        for module, route in self.routes:
            if _ROUTES.get(id(module)) is route:
                del _ROUTES[id(module)]
        self.routes = []


def split_obstacle(tree: ModelTree, ranks: int) -> str:
    """Why a user's model cannot be judged with its batch split between ``ranks`` processes ("" when
    it can), a clause after "..., but": each rank must train on an equal share of every split input, and
    the model's training-mode output must not depend on which rows a process sees, since the
    reference trains on the whole batch. (A generated model's dropout draws the whole batch's mask
    and keeps its rows, ``layers.batch_share``; a user's draws its own per process, and a BatchNorm
    normalises with its own rows' statistics.)"""
    split = [rows for rows in tree.batch_rows if rows is not None]
    if split and (len(set(split)) > 1 or split[0] % ranks):
        return (f"the example inputs' batch sizes {tuple(split)} are not one size divisible by {ranks} "
                "(give the factory a larger batch, or batch_dims)")
    moved = next((n for n in tree.nodes if n.train_mode and n.calls), None)
    if moved is not None:
        return (f"{moved.path or 'the model'} ({moved.kind}: {moved.train_mode}) would see a process's rows in "
                "training mode, and the reference the whole batch")
    return ""
