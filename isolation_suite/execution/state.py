"""Global state a technique must leave as it found it: torch's flags, the functions of torch's
namespaces, the global module hooks, and the threads. The sandbox compares it around every run (and
puts it back in-process); the ddp pool compares it on rank 1; warm children compare it before reuse."""
from __future__ import annotations

import operator
import threading
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.nn.modules.module as torch_module

from isolation_suite.execution.lifetime import is_harness_thread

#: flag -> (read it, set it). The runner itself sets and restores the thread count around each run.
_FLAGS: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "grad mode": (torch.is_grad_enabled, torch.set_grad_enabled),
    "default dtype": (torch.get_default_dtype, torch.set_default_dtype),
    "anomaly mode": (torch.is_anomaly_enabled, torch.autograd.set_detect_anomaly),
    "deterministic algorithms": (torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms),
    **{f"torch.backends.{owner}.{attr}": ((lambda o=obj, a=attr: getattr(o, a)),
                                          (lambda v, o=obj, a=attr: setattr(o, a, v)))
       for owner, obj, attr in (("cudnn", torch.backends.cudnn, "enabled"),
                                ("cudnn", torch.backends.cudnn, "benchmark"),
                                ("cudnn", torch.backends.cudnn, "deterministic"),
                                ("cudnn", torch.backends.cudnn, "allow_tf32"),
                                ("cuda.matmul", torch.backends.cuda.matmul, "allow_tf32"),
                                ("mkldnn", torch.backends.mkldnn, "enabled"))},
}
#: namespaces whose functions a technique may monkeypatch and forget
_NAMESPACES = {"torch": torch, "torch.nn.functional": F, "torch.Tensor": torch.Tensor}
#: where a new attribute is a patch too (``torch.Tensor.add = ...`` shadows the inherited method);
#: modules gain attributes legitimately (lazy submodule imports), so only replacements count there
_CLOSED = ("torch.Tensor",)
#: what Python itself caches on a class, not a patch: ``copyreg`` writes ``__slotnames__`` the first
#: time an object of the class is pickled (a sandbox child sends a sparse gradient as a tensor)
_RUNTIME_CACHES = frozenset({"__slotnames__"})
#: torch's global module hooks (``torch.nn.modules.module.register_module_forward_hook`` and
#: friends): the dict that holds them -> what one is called in a leak's line
_GLOBAL_HOOKS = {
    "_global_forward_hooks": "global module forward hook",
    "_global_forward_pre_hooks": "global module forward pre-hook",
    "_global_backward_hooks": "global module backward hook",
    "_global_backward_pre_hooks": "global module backward pre-hook",
    "_global_module_registration_hooks": "global module registration hook",
    "_global_parameter_registration_hooks": "global parameter registration hook",
    "_global_buffer_registration_hooks": "global buffer registration hook",
}
#: what registering a forward hook also writes: put back with the hooks, never reported on its own
_HOOK_EXTRAS = ("_global_forward_hooks_always_called", "_global_forward_hooks_with_kwargs")
#: threads of these modules' own classes belong to libraries torch uses (torch.compile's progress
#: bars start tqdm's monitor once per process), not to the technique
_LIBRARY_THREADS = ("tqdm.",)
#: how long a thread the technique started may take to end once its run is over
THREAD_GRACE = 0.1


#: the step of a leak found only once the run is over (global flags and namespaces are compared
#: around the whole run, not step by step)
RUN_END = -1


def snapshot() -> dict[str, Any]:
    """Every global a technique could leave changed: flags by value, namespaces, global module hooks
    and live threads by identity."""
    flags = {name: read() for name, (read, _) in _FLAGS.items()}
    hooks = {name: (held, dict(held)) for name in (*_GLOBAL_HOOKS, *_HOOK_EXTRAS)
             if (held := getattr(torch_module, name, None)) is not None}
    return {"flags": flags, "namespaces": {name: dict(vars(ns)) for name, ns in _NAMESPACES.items()},
            "hooks": hooks, "threads": set(threading.enumerate())}


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs, one line each: ``torch.backends.cudnn.benchmark changed False -> True``."""
    out = [f"{name} changed {value} -> {after['flags'][name]}"
           for name, value in before["flags"].items() if after["flags"][name] != value]
    for name, attrs in before["namespaces"].items():
        now = after["namespaces"][name]
        if _unchanged(attrs, now):
            continue
        for attr, value in attrs.items():
            if attr not in now:
                out.append(f"{name}.{attr} was deleted")
            elif now[attr] is not value:
                out.append(f"{name}.{attr} was replaced")
        if name in _CLOSED:
            out.extend(f"{name}.{attr} was replaced" for attr in now
                       if attr not in attrs and attr not in _RUNTIME_CACHES)
    return out + _hook_changes(before["hooks"], after["hooks"]) \
        + _thread_changes(before["threads"], after["threads"])


def _hook_changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    out = []
    for name, kind in _GLOBAL_HOOKS.items():
        if name not in before:
            continue
        (held, hooks), (now_held, now) = before[name], after[name]
        if now_held is not held:
            out.append(f"torch.nn.modules.module.{name} was replaced")
            continue
        out.extend(f"{kind} {_callable_name(hook)} was left registered"
                   for key, hook in now.items() if key not in hooks)
        out.extend(f"{kind} {_callable_name(hook)} was removed" for key, hook in hooks.items() if key not in now)
    return out


def _callable_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def _thread_changes(before: set[threading.Thread], after: set[threading.Thread]) -> list[str]:
    """Threads started since ``before`` and still running (after a short grace to end), but the
    harness's own and its libraries'."""
    started = [t for t in after - before if not _not_the_techniques(t)]
    deadline = time.monotonic() + THREAD_GRACE
    for thread in started:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [f"thread {t.name!r} was left running" + (" (daemon)" if t.daemon else "")
            for t in started if t.is_alive()]


def _not_the_techniques(thread: threading.Thread) -> bool:
    """The harness's threads, its libraries', and threads Python did not start (a C++ thread of
    torch's that ran Python code is listed as a ``_DummyThread``)."""
    return is_harness_thread(thread) or isinstance(thread, threading._DummyThread) \
        or type(thread).__module__.startswith(_LIBRARY_THREADS)


def _unchanged(attrs: dict[str, Any], now: dict[str, Any]) -> bool:
    """The same names in the same order, each bound to the same object (the common case, checked at
    C speed; anything else is compared name by name)."""
    return len(attrs) == len(now) and all(map(operator.is_, attrs.values(), now.values())) and list(attrs) == list(now)


def restore(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Put back every global that differs between ``before`` and ``after`` (in-process runs; a
    child is simply retired)."""
    for name, value in before["flags"].items():
        if after["flags"][name] != value:
            _FLAGS[name][1](value)
    for name, attrs in before["namespaces"].items():
        namespace, now = _NAMESPACES[name], after["namespaces"][name]
        for attr, value in attrs.items():
            if now.get(attr, _MISSING) is not value:
                setattr(namespace, attr, value)
        if name in _CLOSED:
            for attr in [a for a in now if a not in attrs and a not in _RUNTIME_CACHES]:
                delattr(namespace, attr)
    for name, (held, hooks) in before["hooks"].items():
        # the same dict, refilled in place: every hook's handle holds the dict it removes itself from
        setattr(torch_module, name, held)
        if after["hooks"][name] != (held, hooks):
            held.clear()
            held.update(hooks)


_MISSING = object()


