"""The model under test: a generated architecture, or the user's own model from a factory.

A *factory* is a zero-argument callable that returns ``(model, example_inputs)`` or
``(model, example_inputs, loss)``: an ``nn.Module``, a tuple of tensors for one batch (called as
``model(*example_inputs)``), and optionally ``loss(output, target) -> scalar`` (default: the
scenario's MSE or smooth-L1 against fixed random targets shaped like each floating-point tensor in
the output; tuple, list and dict outputs are walked). Scenarios name it as ``"pkg.module:factory"``;
a callable handed to the Python API that cannot be imported by name is registered under a
``local:`` name for this process.

The harness seeds torch's generator from the scenario's ``init_seed`` before every call, so the
technique's model, the reference's and the float64 twin start bit-identical; the factory must
build a new model each time. Every step and micro-batch trains on the example batch.

A factory gets ``limit`` seconds to return (the run's timeout where the caller knows it, else
``FACTORY_TIMEOUT``): a ``SIGALRM`` in the main thread, like the sandbox's in-process timeout,
which cannot stop a factory that blocks signals or hangs inside a C call (and, off the main
thread, no limit at all).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from isolation_suite.model import hf
from isolation_suite.model.build import build_model, loss_fn, make_inputs, target_like
from isolation_suite.spec import hf as hf_spec
from isolation_suite.spec.objects import import_object
from isolation_suite.spec.scenario import Scenario, ScenarioError
from isolation_suite.model.tree import ModelTree, architecture_tree, module_tree

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: seconds a factory may take to return where the caller knows no timeout
FACTORY_TIMEOUT = 60.0


class ModelFactoryError(ScenarioError):
    """A model factory that cannot be imported, fails, or returns something else."""


_LOCAL: dict[str, Callable] = {}


def factory_name(factory: str | Callable) -> str:
    """The scenario's name for ``factory``: ``"pkg.mod:name"`` where that imports back to it, else a
    ``local:`` name registered for this process (and forked children)."""
    if isinstance(factory, str):
        return factory
    if not callable(factory):
        raise ModelFactoryError(f"model factory {factory!r} is not callable")
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if module and qualname and "<" not in qualname:
        try:
            if resolve(f"{module}:{qualname}") is factory:
                return f"{module}:{qualname}"
        except ModelFactoryError:
            pass
    name = f"local:{qualname or 'factory'}#{id(factory):x}"
    _LOCAL[name] = factory
    return name


def resolve(spec: str) -> Callable:
    """The factory ``spec`` names; one clear ModelFactoryError when it cannot be found."""
    if spec in _LOCAL:
        return _LOCAL[spec]
    if hf_spec.is_hf(spec):
        return hf.factory(hf_config(spec))
    if spec.startswith("local:"):
        raise ModelFactoryError(f"model factory {spec!r} was registered in another process")
    obj = import_object(spec, "model", ModelFactoryError)
    if not callable(obj):
        raise ModelFactoryError(f"model {spec!r} is {type(obj).__name__}, not a callable factory")
    return obj


@dataclass(frozen=True)
class Made:
    """What a factory call gave: validated."""

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    loss: Callable | None
    #: each input's batch dimension (the factory's ``batch_dims``; default 0 for every input)
    batch_dims: tuple[int | None, ...] = ()


_RETURNED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def make(spec: str, init_seed: int, limit: float | None = None) -> Made:
    """Call the factory with torch's generator seeded from ``init_seed``; check what it returns.
    ``limit``: seconds it may take (default ``FACTORY_TIMEOUT``)."""
    factory = resolve(spec)
    limit = FACTORY_TIMEOUT if limit is None else limit
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            with _deadline(limit):
                out = factory()
        except _FactoryTimeout:
            raise ModelFactoryError(f"model factory {spec!r} did not return within {limit:g} s") from None
        except Exception as exc:  # noqa: BLE001 - the user's factory failing is one line, not a traceback
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ModelFactoryError(f"model factory {spec!r} raised {type(exc).__name__}: {first}") from None
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise ModelFactoryError(f"model factory {spec!r} returned {type(out).__name__}; "
                                "expected (model, example_inputs) or (model, example_inputs, loss)")
    model, inputs, loss = out[0], out[1], (out[2] if len(out) == 3 else None)
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(f"model factory {spec!r} returned {type(model).__name__} as the model; "
                                "expected an nn.Module")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ModelFactoryError(f"model factory {spec!r}: example_inputs must be a tensor or a tuple of tensors")
    if loss is not None and not callable(loss):
        raise ModelFactoryError(f"model factory {spec!r}: the loss must be callable, got {type(loss).__name__}")
    # a meta tensor has no values to train on or compare: one line here, not a traceback in the first run
    for what, tensors in (("inputs", inputs), ("parameters", list(model.parameters())),
                          ("buffers", list(model.buffers()))):
        if any(t.is_meta for t in tensors):
            raise ModelFactoryError(f"model factory {spec!r} returned {what} on the meta device; give real tensors")
    if model in _RETURNED:
        raise ModelFactoryError(f"model factory {spec!r} returned a model it had returned before; "
                                "it must build a new one on every call (training changes the weights)")
    _RETURNED.add(model)
    return Made(model, tuple(x.detach() for x in inputs), loss, batch_dims(spec, factory, inputs))


def batch_dims(spec: str, factory: Callable, inputs: tuple[torch.Tensor, ...]) -> tuple[int | None, ...]:
    """Each input's batch dimension, along which the ranks of a distributed mode split it: the
    factory's ``batch_dims`` attribute (an int or None per input: None gives every rank the input
    whole), else 0 for every input. The first int is also the outputs' batch dimension."""
    dims = getattr(factory, "batch_dims", None)
    if dims is None:
        return (0,) * len(inputs)
    if not isinstance(dims, (tuple, list)) or len(dims) != len(inputs) or not all(
            d is None or (type(d) is int and -x.dim() <= d < x.dim()) for d, x in zip(dims, inputs)) \
            or all(d is None for d in dims):
        raise ModelFactoryError(f"model factory {spec!r}: batch_dims={dims!r} must give each of its {len(inputs)} "
                                "input(s) a dimension of it or None, at least one a dimension")
    return tuple(None if d is None else d % x.dim() for d, x in zip(dims, inputs))


class _FactoryTimeout(BaseException):
    """Raised by the factory's alarm; a BaseException so that the factory's own ``except Exception``
    does not swallow it."""


def _on_alarm(signum, frame):
    raise _FactoryTimeout()


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise ``_FactoryTimeout`` in the main thread after ``seconds``. An alarm already set (an
    in-process run's timeout) that comes sooner is left to fire as it would; one that comes later
    is set again, less the time spent here."""
    outer, _ = signal.getitimer(signal.ITIMER_REAL) if hasattr(signal, "setitimer") else (0.0, 0.0)
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread() \
            or 0 < outer <= seconds:
        yield
        return
    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-3))


def hf_config(spec: str) -> hf_spec.HFConfig:
    """The ``transformers`` configuration an ``hf:`` name spells; one clear ModelFactoryError if none."""
    try:
        return hf_spec.parse(spec)
    except hf_spec.HFSpecError as exc:
        raise ModelFactoryError(f"model {spec!r}: {exc}") from None


def is_family(spec: str | None) -> bool:
    """``spec`` names many models, one drawn per example (``hf:random``), not one."""
    return spec == hf_spec.RANDOM


def members(spec: str) -> tuple[str, ...]:
    """The models a search over ``spec`` asks where an intent can point and moves its trigger examples
    onto: ``spec`` itself, or a family's representatives (``spec.hf.representatives``)."""
    return tuple(hf_spec.name(c) for c in hf_spec.representatives()) if is_family(spec) else (spec,)


def model_trees(spec: str, limit: float | None = None) -> tuple[ModelTree, ...]:
    """The trees of :func:`members` (a factory that fails or hangs says so here, in one line)."""
    return tuple(factory_tree(member, limit) for member in members(spec))


def describe_model(spec: str, limit: float | None = None) -> str:
    """``model M: 14 modules, 1208 parameters``, or what a family draws."""
    if is_family(spec):
        return (f"model {spec}: a random configuration of {', '.join(hf_spec.CLASSES)} per example "
                f"({len(hf_spec.SPACE)} configurations)")
    tree = factory_tree(spec, limit)
    return (f"model {spec}: {sum(1 for n in tree.nodes if n.path)} modules, "
            f"{sum(math.prod(s) for s in tree.parameters.values())} parameters")


#: spec -> its tree (the probe runs once per process and spec); at most _TREES_KEPT of them
_TREES: dict[str, ModelTree] = {}
_TREES_KEPT = 64
#: an ``hf:`` configuration -> its tree: every configuration a search draws is kept (a few KB each;
#: ``spec.hf.SPACE`` bounds them), so a long search probes each at most once per process
_HF_TREES: dict[hf_spec.HFConfig, ModelTree] = {}


def factory_tree(spec: str, limit: float | None = None) -> ModelTree:
    """The user's model's tree, from one probe forward of a throwaway build. ``limit``: seconds the
    factory may take (pass the run's timeout where known; default ``FACTORY_TIMEOUT``); only the
    first call for a spec probes, later ones return its tree."""
    if hf_spec.is_hf(spec):
        config = hf_config(spec)
        if config not in _HF_TREES:
            _HF_TREES[config] = _probe(hf_spec.name(config), limit)
        return _HF_TREES[config]
    if spec not in _TREES:
        if len(_TREES) >= _TREES_KEPT:
            del _TREES[next(iter(_TREES))]
        _TREES[spec] = _probe(spec, limit)
    return _TREES[spec]


def _probe(spec: str, limit: float | None) -> ModelTree:
    made = make(spec, 0, limit)
    rows = tuple(None if d is None else x.shape[d] for x, d in zip(made.inputs, made.batch_dims))
    try:
        tree = dataclasses.replace(module_tree(made.model, made.inputs), batch_rows=rows)
        loss = _example_loss(made)
    except Exception as exc:  # noqa: BLE001 - the model not running on its own inputs is the user's error
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ModelFactoryError(f"model {spec!r} does not run on its example inputs: "
                                f"{type(exc).__name__}: {first}") from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        what = f"a {loss.dtype} tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) \
            else type(loss).__name__
        raise ModelFactoryError(f"model {spec!r}: the loss of its example inputs is {what}; "
                                "expected a floating-point tensor with one element")
    if not torch.isfinite(loss).all():
        # every run's values would be NaN or infinite, and NaN matches NaN: no verdict would mean anything
        raise ModelFactoryError(f"model {spec!r}: the loss of its example inputs is {loss.item()} "
                                "before any training; give a model whose output and loss are finite")
    return tree


def _example_loss(made: Made) -> Any:
    """The loss of the model's output on its example inputs, as a run's first micro-batch computes it
    (the factory's loss, else MSE over the output's floating-point tensors), on the throwaway build."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return scenario_loss("mse", made.model(*made.inputs), 0, made.loss)


def tree_of(scenario: Scenario) -> ModelTree:
    return factory_tree(scenario.model) if scenario.model else architecture_tree(scenario.architecture)


# --- what a run needs -------------------------------------------------------------------------

def _leaves(out: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(dict(out) if isinstance(out, dict) else out)
            if isinstance(x, torch.Tensor) and x.is_floating_point()]


def scenario_loss(kind: str, out: Any, seed: int, user: Callable | None = None,
                  share: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The loss of one micro-batch: the factory's ``loss(output, target)``, else ``kind`` summed over
    every floating-point tensor of the output, each against its own fixed target (with ``share``: a
    rank's rows of the whole batch's, see ``target_like``)."""
    if user is not None:
        if isinstance(out, torch.Tensor):
            target: Any = target_like(out, seed, share)
        else:
            target = [target_like(x, seed + i, share) for i, x in enumerate(_leaves(out))]
        return user(out, target)
    leaves = _leaves(out)
    if not leaves:
        raise ValueError(f"the model's output has no floating-point tensor to train on ({type(out).__name__})")
    fn = {"mse": torch.nn.functional.mse_loss, "smooth_l1": torch.nn.functional.smooth_l1_loss}[kind]
    return sum((fn(x, target_like(x, seed + i, share)) for i, x in enumerate(leaves)), torch.zeros((), device=leaves[0].device,
                                                                                           dtype=leaves[0].dtype))


@dataclass
class Built:
    """A fresh model for one run, its CPU inputs per step and micro-batch, the loss, and its tree."""

    model: nn.Module
    inputs: list[list[tuple[torch.Tensor, ...]]]
    #: (output, target seed[, share]) -> loss; ``share``: (rank, world, batch dimension) of a rank's
    #: rows, whose targets are the whole batch's rows
    loss: Callable[..., torch.Tensor]
    tree: ModelTree
    #: each input's batch dimension, along which ranks split it (None: every rank gets it whole)
    batch_dims: tuple[int | None, ...] = ()


def build(scenario: Scenario, device: str = "cpu") -> Built:
    """Everything a run of ``scenario`` needs, built fresh."""
    dtype = DTYPES[scenario.dtype]
    if not scenario.model:
        return Built(build_model(scenario, device), [[(x,) for x in step] for step in make_inputs(scenario)],
                     lambda out, seed, share=None: loss_fn(scenario.data.loss, out, seed, share),
                     architecture_tree(scenario.architecture), (0,))
    tree = factory_tree(scenario.model)
    made = make(scenario.model, scenario.init_seed)
    model = made.model.to(device=device, dtype=dtype) if dtype != torch.float32 or device != "cpu" \
        else made.model.to(device=device)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in made.inputs)
    batches = [[inputs] * scenario.micro_batches for _ in range(scenario.steps)]
    return Built(model, batches, lambda out, seed, share=None: scenario_loss(scenario.data.loss, out, seed, made.loss,
                                                                             share), tree, made.batch_dims)
