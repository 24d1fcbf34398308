"""Warm sandboxes: ``iso.check`` called in a loop reuses one child per technique.

A search already keeps one child for all its examples; a user's own ``@given`` test calls
``iso.check`` once per example, and a fresh fork per call cost it 4-6x its runs. Here the child of a
technique outlives the call and serves the next one, on the same terms as within a search: a child
that crashed, hung or leaked global state is retired by the sandbox itself and the next run forks a
fresh one.

What a child cannot see is what changed in the parent after its fork. So a warm child is reused
only while nothing it was forked with has changed: the same technique object with the same
attributes (compared shallowly, by identity: assign a new value and the next call forks afresh; a
mutation inside an attribute's own object is not seen), the same timeout, and the same global state
the sandbox watches: torch's flags (grad mode, default dtype, anomaly mode, deterministic
algorithms, the backends' switches) and the functions of ``torch``, ``torch.nn.functional`` and
``torch.Tensor``; and the code a run executes besides torch: the attributes of the harness's modules,
of the modules that define the technique's classes, and of their classes (a ``monkeypatch`` made
after the fork). Under pytest, warm children also end with each test (``pytest_plugin``), so none
outlives the test that forked it. At most :data:`MAX_WARM` children are kept, the least recently used retired
first, and all of them end with the process.
"""
from __future__ import annotations

import atexit
import collections
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any

from isolation_suite.execution.sandbox import SANDBOX_ENV, Sandbox
from isolation_suite.execution.state import snapshot
from isolation_suite.technique import Technique

#: warm children kept at once (one per technique being checked in a loop)
MAX_WARM = 4


def _code_of(technique: Technique) -> int:
    """A digest of the code a run executes besides torch: every attribute (by identity) of the
    harness's modules and of the modules defining the technique's classes, and of their classes.
    A monkeypatch of any of them after the fork (``monkeypatch.setattr(modes.ForwardState, ...)``)
    changes it. (Each dictionary is hashed in one C-level pass, and the classes of a module whose own
    attributes did not change are not looked for again: the digest is taken on every warm call.)"""
    parts = []
    for module in _code_modules(frozenset(cls.__module__ for cls in type(technique).__mro__)):
        values = vars(module).values()
        digest = hash(tuple(map(id, values)))
        parts.append(digest)
        known = _CLASSES.get(module.__name__)
        if known is None or known[0] != digest:
            known = _CLASSES[module.__name__] = (digest, [v for v in list(values) if isinstance(v, type)
                                                         and v.__module__ == module.__name__])
        parts.extend(hash(tuple(map(id, vars(cls).values()))) for cls in known[1])
    return hash(tuple(parts))


#: module name -> (the digest of its attributes, the classes it defines), as last seen
_CLASSES: dict[str, tuple[int, list]] = {}
#: (the technique's modules, how many modules were loaded) -> the modules ``_code_of`` reads
_MODULES: dict[tuple, list] = {}


def _code_modules(own: frozenset[str]) -> list:
    """The harness's modules and ``own``, found again only when a module was loaded or replaced."""
    key = (own, len(sys.modules))
    found = _MODULES.get(key)
    if found is None or any(sys.modules.get(name) is not module for name, module in found):
        found = [(name, module) for name, module in list(sys.modules.items()) if module is not None and (
            name in own or name == "isolation_suite" or name.startswith("isolation_suite."))]
        _MODULES.clear()
        _MODULES[key] = found
    return [module for _, module in found]


def _forked_with(technique: Technique, timeout: float | None) -> tuple[Any, ...]:
    """What a child was forked with and cannot see change: the technique's attributes (by
    identity), the timeout, the global flags and namespaces, and the code of the harness and the
    technique."""
    attributes = tuple(sorted((name, id(value)) for name, value in vars(technique).items()))
    state = snapshot()
    namespaces = hash(tuple((tuple(ns), tuple(map(id, ns.values()))) for ns in state["namespaces"].values()))
    return (type(technique), attributes, timeout, tuple(sorted(state["flags"].items())), namespaces,
            _code_of(technique))


@dataclass
class _Warm:
    technique: "weakref.ReferenceType[Technique]"
    forked_with: tuple[Any, ...]
    sandbox: Sandbox


_held: "collections.OrderedDict[int, _Warm]" = collections.OrderedDict()


def warm_sandbox(technique: Technique, timeout: float | None) -> Sandbox:
    """The sandbox ``technique``'s checks share, reused while its fork is still current."""
    if os.environ.get(SANDBOX_ENV, "on").strip().lower() in ("off", "0", "no", "false"):
        return Sandbox(technique, timeout)  # in-process: nothing to keep warm
    key, now = id(technique), _forked_with(technique, timeout)
    held = _held.get(key)
    if held is not None and held.technique() is technique and held.forked_with == now:
        _held.move_to_end(key)
        return held.sandbox
    if held is not None:
        _retire(key)
    try:
        ref = weakref.ref(technique, lambda _, key=key: _retire(key))
    except TypeError:  # a technique without weak references: a sandbox for this call only
        return Sandbox(technique, timeout)
    _held[key] = _Warm(ref, now, Sandbox(technique, timeout))
    while len(_held) > MAX_WARM:
        _retire(next(iter(_held)))
    return _held[key].sandbox


def _retire(key: int) -> None:
    held = _held.pop(key, None)
    if held is not None:
        held.sandbox.close()


def children_cpu() -> float:
    """The CPU seconds the warm children now kept have spent on their runs (benchmarks read it)."""
    return sum(held.sandbox.child_cpu for held in _held.values())


@atexit.register
def retire_all() -> None:
    """End every warm child (at exit; tests call it to start clean)."""
    for key in list(_held):
        _retire(key)
