"""Execution modes: how the user's training loop runs the model.

Declared as one table (``MODE_INFOS``), like ``kinds`` and ``optim_info``: each row extends the mode's
torch-free row (``spec.mode_kinds``) with how it runs, every behaviour its own function (a
do-nothing one included), so the runner and the sandbox read the row instead of naming modes. A
mode is part of the scenario (:class:`~isolation_suite.spec.scenario.Mode`); the runner applies it
around the technique's hooks, and the reference ignores it (plain eager, one process), except for
autocast, whose number format both share (see ``ModeInfo.reference``).

What "the same trace" means per mode, and the tolerance each is judged with:

* ``checkpoint``: recomputation runs the same kernels on the same values, so the trace is compared
  at eager's tolerance. The recomputation sees what the forward saw: the same calls of the
  isolated modules (the technique's ``call`` runs again, with the same ``use``) and the same dropout
  seeds, as in user code, where a technique's hooks and wrappers are live during recomputation.
  What the checkpoint itself does is not held against the technique:

  - the region's output may be any structure (a dict, a list, a ``ModelOutput``): it is checkpointed
    as its flattened tensors and rebuilt after, as libraries that checkpoint arbitrary outputs do,
    so a reentrant checkpoint gives it the real gradient;
  - the recomputation's updates of the region's buffers are undone when it ends: a training
    BatchNorm updates its running statistics once per forward, as in eager, not a second time
    during backward (they would differ from eager's as soon as a schedule freezes it and it
    normalises with them). What the technique's forward does to buffers stays: a frozen BatchNorm
    left in training mode still moves its statistics in the forward, and ``frozen-unchanged`` sees it;
  - a reentrant checkpoint runs one backward per call of the region, each adding to ``.grad`` on its
    own, so a sum of several calls' gradients is grouped otherwise than in eager: a gradient that is
    zero in exact arithmetic (an attention key bias's) carries other rounding noise, and an entry
    whose gradient stays within rounding of zero in both runs is set aside (``ModeInfo.same_rounding``).
* ``compile``: ``aot_eager`` runs the same ATen operations, after decompositions that may reorder a
  reduction; ``inductor`` fuses kernels. Both round differently from eager, so a float32 mismatch
  counts only where the float64 twin shows it too, as for every float32 mismatch, and an entry
  whose gradient stays within rounding of zero in both runs is set aside.

  What is compiled, and what is reused: the harness seeds dropout before every module call outside
  the graph (``torch.compiler.disable``), so every module call is a graph break, and torch's own
  layers run eagerly (Dynamo traces their ``forward`` as a frame of its own only where the layer has
  hooks); what is compiled is the code between module calls: a technique's ``call``, hooks and
  parametrizations, containers' glue (a residual add), the generated dropout, a user model's own
  ``forward`` code. A sandbox child keeps Dynamo's cache across its runs (``CACHE_ACROSS_RUNS``,
  ``own_compile_cache``; an in-process run starts from an empty one): an entry is reused where its
  guards hold, and is then what a fresh compile would give. What would
  make a run's compiled code depend on the runs before it is not kept: Dynamo's per-code decisions
  (a frame given up marks its code object for every later call, whatever the inputs) are undone
  after each run (``run_decisions_forgotten``), and no recompile limit is ever reached
  (``RECOMPILE_LIMITS``). A run also saves tracing frames that compile to nothing
  (``untraced_codes``): the harness's operation-free frames, for which Dynamo compiled empty graphs,
  and ``Block.forward`` where Dynamo gives it up anyway. Same graphs, bitwise the same traces
  (``tests/test_compile_cost.py``, ``benchmarks/compile_cost.py``). Nor does a run compute Dynamo's
  diagnostics that no log reads (``unread_diagnostics``: the guard-latency measurement, the graph-break message's
  stack): about a quarter of a compiled run, with the same guards and code. With ``inductor``, torch's own
  content-addressed caches (AOT autograd, FX graph) serve a graph compiled before, in this process or
  an earlier one: keyed by the graph and its inputs, a hit is what a fresh compile would give.
* ``autocast``: a lower-precision forward is not a technique's doing; technique and reference both
  run under the same autocast, and a mismatch must show on the float64 twin, where autocast casts
  nothing. (A finding that exists only in the low precision is therefore not judged by
  ``matches-reference``; ``frozen-unchanged`` and ``gradient-flows`` are exact and still are.) Both
  round alike: a gradient that is zero in exact arithmetic is held to exactly zero, as in eager.
* ``ddp``: two processes train on the two halves of every batch and DDP averages their gradients;
  with a mean-reduced loss over equal halves that is the whole batch's gradient, so the reference
  stays one eager process over the whole batch. Rank 0 records the trace: the loss as the average of
  the ranks' losses, the input gradient as the ranks' input gradients stacked and halved (a rank's
  is that of its own half's loss, twice the whole loss's). Averaging reorders a sum: float32
  mismatches are confirmed on the float64 twin, and an entry whose gradient stays within rounding of
  zero in both runs is set aside. Dropout is exact (each rank keeps its rows of the
  whole batch's mask); a training BatchNorm is not drawn (see :mod:`isolation_suite.execution.ddp`).
* ``fsdp``: the ``ddp`` mode's ranks and comparison, with FSDP2's ``fully_shard`` as the wrap; the
  runner follows each parameter to the ``DTensor`` that replaced it and records it whole (see
  :mod:`isolation_suite.execution.fsdp`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from isolation_suite.execution import ddp, devices, fsdp
from isolation_suite.model.build import Block
from isolation_suite.model.layers import SeededDropout
from isolation_suite.spec import mode_kinds
from isolation_suite.spec.mode_kinds import ModeKind
from isolation_suite.spec.scenario import MODE_KINDS, Mode, ScenarioError


@dataclass(frozen=True, kw_only=True)
class ModeInfo(ModeKind):
    """One execution mode: its declared row (``mode_kinds.ModeKind``: what it does to a scenario) and
    how it runs: where, whether the reference shares it, and its behaviours.

    The behaviours have no defaults: every row says what it does at each point, a do-nothing
    included, so no mode falls through to another's behaviour by accident."""

    #: device types it runs on
    devices: tuple[str, ...] = ("cpu", "cuda")
    #: True: the reference runs under the same mode (a number format, not a way of running the model)
    reference: bool = False
    #: the technique's run rounds as the reference's does (the same operations in the same order): a
    #: gradient that is zero in exact arithmetic comes out the same in both. False: its rounding
    #: noise is its own, and an entry whose gradient is zero up to rounding in both runs has no
    #: direction to compare (see ``invariants.Context.rounding``)
    same_rounding: bool = True
    #: the share of a search's examples judged in this mode (a compiled check costs about 8 eager ones)
    example_share: float = 1.0
    #: its share of a run's time budget, against an eager item's 1 (a compiled check costs about 8 eager
    #: ones, a pooled ddp run about 2.5: a known-bad row's trigger examples must still run within it)
    budget_weight: float = 1.0
    #: modules a run of this mode loads on first use, imported in the judging process before it forks
    #: a sandbox child, so that no child pays for them (compile: AOT autograd's partitioner, 1.5-2.7 s
    #: per process; the reference, computed in the judging process, loads them there anyway)
    inherited_imports: tuple[str, ...] = ()

    # --- behaviours (no defaults) ---
    #: what the judging process does once, before it forks a sandbox child, so that no child pays for
    #: it (compile: one small compile, ``compile_warm_up``): ``()``
    warm_up: Callable[[], None]
    #: what the user does when building the model, before any isolation (enable checkpointing):
    #: ``(model, mode, ForwardState)``
    before_setup: Callable[[nn.Module, Mode, ForwardState], None]
    #: what the user does once the model is prepared (compile it): ``(model, mode)``
    before_training: Callable[[nn.Module, Mode], None]
    #: the forward's lower-precision dtype on a device type, None: the scenario's own (see ``Precision``)
    autocast: Callable[[str], torch.dtype | None]
    #: how a run's processes are started: ``launch(train, phase, timeout, progress_struct)`` calls
    #: ``train(shard, at)`` once here (``one_process``: no shard) or as each rank (``ddp.run``)
    launch: Callable[..., Any]
    #: seconds the sandbox waits beyond the run's timeout (a ddp rank 0 reports its rank 1's hang itself)
    grace: float
    #: how a rank wraps the model, where the technique's ``ddp_wrap`` says (modes of several ranks only):
    #: ``wrap(model, mode, tree) -> the module the loop calls``; ``tree``: the model's tree, as built
    #: (before the technique changed anything)
    wrap: Callable[[nn.Module, Mode, Any], nn.Module]
    #: the settings a run of this mode is made under: ``settings(mode) -> context manager`` around each
    #: rank's whole run (compile: inductor's, ``INDUCTOR_CONFIG``; fsdp: FSDP2's advice about the
    #: model's shape silenced)
    settings: Callable[[Mode], contextlib.AbstractContextManager]
    #: the sandbox's child is retired after every run of this mode (none is now: a ddp run keeps its
    #: pool, and the child is retired only after one that left a group it cannot free, see ``ddp``)
    retire: bool

    @classmethod
    def of(cls, kind: str, **how: Any) -> "ModeInfo":
        """The declared row of ``kind`` extended with how it runs."""
        declared = mode_kinds.BY_KIND[kind]
        return cls(**{f.name: getattr(declared, f.name) for f in dataclasses.fields(ModeKind)}, **how)

    @property
    def prepares_parent(self) -> bool:
        """A sandbox child must be forked after this mode's preparation of the judging process
        (``inherited_imports``, ``warm_up``) to inherit it."""
        return bool(self.inherited_imports) or self.warm_up is not nothing


#: the fields every row must set itself
BEHAVIOURS = ("warm_up", "before_setup", "before_training", "autocast", "launch", "grace", "wrap", "settings", "retire")


def info(mode: Mode) -> ModeInfo:
    """The row of ``mode``'s kind."""
    return MODE_BY_KIND[mode.kind]


def parse_modes(text: str | None, device_types: tuple[str, ...] = ("cpu",)) -> tuple[str, ...]:
    """``"eager,checkpoint"`` -> ``("eager", "checkpoint")``; None or ``"all"``: every mode that runs
    on all of ``device_types``. Raises ValueError naming an unknown mode."""
    if text is None or text.strip().lower() in ("", "all"):
        return tuple(m.kind for m in MODE_INFOS if all(d in m.devices for d in device_types))
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in MODE_BY_KIND]
    if unknown or not names:
        raise ValueError(f"unknown mode(s) {unknown or [text]}: choose from {', '.join(MODE_KINDS)}")
    return names


def for_reference(mode: Mode) -> Mode:
    """The mode the reference runs under: eager, or the same number format."""
    return mode if MODE_BY_KIND[mode.kind].reference else Mode()


class ForwardState:
    """What a recomputation must see again: the router's call counts and the dropout seeds' uses.

    ``snapshot`` is taken when a checkpointed region starts in the forward; ``resume`` puts it back
    while the region is recomputed during backward (and does nothing in the forward itself)."""

    def __init__(self, router: Callable[[], Any], seeding: Any):
        self.router, self.seeding = router, seeding

    def snapshot(self) -> tuple:
        return self.router().snapshot(), dict(self.seeding.uses)

    @property
    def recomputing(self) -> bool:
        """A checkpointed region runs again during backward: the router is not routing a forward."""
        return not self.router().active

    @contextlib.contextmanager
    def resume(self, snapshot: tuple) -> Iterator[None]:
        router = self.router()
        if router.active:
            yield  # the forward itself
            return
        uses = self.seeding.uses
        self.seeding.uses = dict(snapshot[1])
        with router.replaying(snapshot[0]):
            try:
                yield
            finally:
                self.seeding.uses = uses


def target_module(model: nn.Module, mode: Mode) -> nn.Module:
    try:
        return model.get_submodule(mode.target) if mode.target else model
    except AttributeError:
        raise ScenarioError(f"the {mode.kind} mode names {mode.target!r}, which is not a module of the model") \
            from None


def checkpoint_module(module: nn.Module, reentrant: bool, state: ForwardState) -> None:
    """Run ``module``'s forward under ``torch.utils.checkpoint`` (an instance ``forward``, as
    libraries do it: the module's hooks still run once, outside the checkpoint).

    The checkpointed region returns the forward's output flattened (``torch.utils._pytree``) and the
    wrapper rebuilds it: a reentrant checkpoint only tracks the tensors a region returns directly,
    so a dict, a list or a ``ModelOutput`` would come back without gradient. Keyword arguments reach
    the forward by closure (a reentrant checkpoint takes none)."""
    forward = module.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        snapshot = state.snapshot()
        spec: list[pytree.TreeSpec] = []

        def region(*inner: Any) -> tuple:
            # read before ``resume``, which routes the recomputation as a forward again
            with _buffers_kept(module, state.recomputing), state.resume(snapshot):
                leaves, tree = pytree.tree_flatten(forward(*inner, **kwargs))
            spec.append(tree)  # spec[0] is the forward's: the recomputation comes after it is read
            return tuple(leaves)
        with warnings.catch_warnings():
            # the very symptom a starved reentrant checkpoint shows; the verdict names it
            warnings.filterwarnings("ignore", "None of the inputs have requires_grad", UserWarning)
            leaves = torch.utils.checkpoint.checkpoint(region, *args, use_reentrant=reentrant)
        return pytree.tree_unflatten(list(leaves), spec[0])

    module.forward = checkpointed


@contextlib.contextmanager
def _buffers_kept(module: nn.Module, recomputing: bool) -> Iterator[None]:
    """During a recomputation, put ``module``'s buffers back as they were before it: the forward
    already updated them once (a training BatchNorm's running statistics), as eager does."""
    if not recomputing:
        yield
        return
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        for buffer, value in saved:
            # through ``.data``: the copy must not bump the version autograd saved the buffer at (a
            # training BatchNorm saves its running statistics for backward)
            buffer.data.copy_(value)


def before_setup(model: nn.Module, mode: Mode, state: ForwardState) -> None:
    """What the user does when building the model, before any isolation (the mode's own step)."""
    info(mode).before_setup(model, mode, state)


def before_training(model: nn.Module, mode: Mode) -> None:
    """What the user does once the model is prepared (the mode's own step)."""
    info(mode).before_training(model, mode)


def nothing(*args: Any) -> None:
    """A mode that does nothing at this point."""


def checkpoint_target(model: nn.Module, mode: Mode, state: ForwardState) -> None:
    """Enable checkpointing of the mode's target."""
    checkpoint_module(target_module(model, mode), mode.reentrant, state)


#: The harness's own functions that a compiled forward passes through and that hold no tensor
#: operation: each only hands a call on (to a child, to the technique's ``call``, to the module's own
#: class), and every module call is a graph break (the dropout seeding is not traced), so Dynamo
#: compiled an empty graph for each of them. Their frames run as plain Python instead of being
#: traced as frames of their own (``torch._dynamo.eval_frame.skip_code``: per code object, not
#: recursive), which is what most of a compiled run's time went to; the code they call is
#: intercepted and compiled as before, and inlining them into a traced caller is unchanged.
#: ``module:qualname``, resolved on first use (``runner`` imports this module).
OPERATION_FREE_FRAMES = (
    "isolation_suite.model.build:Block._call_child",
    "isolation_suite.model.tree:_routed_call",
    "isolation_suite.model.tree:_plain_call",
    "isolation_suite.execution.runner:TechniqueDriver.call",
    "isolation_suite.technique:Technique.call",
)
#: False: trace every frame, as before (``benchmarks.compile_cost``'s "before"; a sandbox's child
#: keeps the value it was forked with)
UNTRACED_HARNESS_FRAMES = True
_operation_free_codes: list = []


def operation_free_codes() -> list:
    """The code objects of :data:`OPERATION_FREE_FRAMES`."""
    if not _operation_free_codes:
        import importlib
        for name in OPERATION_FREE_FRAMES:
            module, _, qualname = name.partition(":")
            obj: Any = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            _operation_free_codes.append(obj.__code__)
    return _operation_free_codes


def calls_in_every_loop(model: nn.Module) -> bool:
    """Every generated container (``build.Block``) of ``model`` calls a module in its program.

    ``Block.forward`` runs its program in a loop, and Dynamo gives up a frame whose loop holds a
    graph break (``SkipFrame``), for its code object: the first ``Block.forward`` it traces in a
    run decides for every later one. Where every Block calls a module (a graph break), that frame
    is given up whichever Block comes first, so every ``Block.forward`` of the run runs eagerly,
    and skipping it at once only saves the failed trace. (A Block without a call, which no strategy
    draws, keeps it traced.)"""
    return all(any(op.kind in ("call", "loop") for op in module.program)
               for module in model.modules() if isinstance(module, Block))


def untraced_codes(model: nn.Module) -> list:
    """The code objects whose frames a compiled run of ``model`` need not trace: the operation-free
    frames, and ``Block.forward`` where Dynamo would give it up anyway (``calls_in_every_loop``)."""
    return operation_free_codes() + ([Block.forward.__code__] if calls_in_every_loop(model) else [])


#: False: every compiled run starts from an empty Dynamo cache (``benchmarks.compile_cost``'s "before";
#: a sandbox's child keeps the value it was forked with)
CACHE_ACROSS_RUNS = True
#: the most compiled entries kept across runs; past it, the next run starts from an empty cache
#: (every call of a frame looks through its entries, so a long search would slow down; speed only)
KEPT_ENTRIES = 512
#: Dynamo's recompile limits inside a compiled run: never reached, so that no frame falls back to
#: eager because of the variants other runs (or this run's other calls) compiled
RECOMPILE_LIMITS = {"recompile_limit": 1 << 20, "accumulated_recompile_limit": 1 << 20}
#: the process whose Dynamo activity is the harness's runs alone, and may keep its cache (a sandbox
#: child: ``own_compile_cache``); in any other process (the judging process, which is the user's too,
#: where other code may compile between runs) every compiled run starts from an empty cache
_cache_owner: list[int] = []
#: the process whose kept cache started empty under these rules (a forked child inherits its parent's
#: Dynamo state: it empties it at its first compiled run)
_cache_kept_by: list[int] = []


def own_compile_cache() -> None:
    """This process runs nothing but the harness's runs (a sandbox child): its compiled runs keep
    Dynamo's cache (``CACHE_ACROSS_RUNS``)."""
    _cache_owner[:] = [os.getpid()]


def compile_target(model: nn.Module, mode: Mode) -> None:
    """Compile the mode's target. What earlier runs compiled is kept (``CACHE_ACROSS_RUNS``): an entry
    is reused only where its guards hold, and is then what a fresh compile of the frame would give;
    the decisions that would make a run depend on the runs before it are not kept
    (``run_decisions_forgotten``, ``RECOMPILE_LIMITS``). The harness frames of ``untraced_codes``
    run untraced: what is compiled is the same."""
    target = target_module(model, mode)
    if _fresh_cache_due():
        torch._dynamo.reset()
        _cache_kept_by[:] = [os.getpid()]
    frames = torch._dynamo.eval_frame
    if hasattr(frames, "skip_code") and hasattr(frames, "reset_code"):  # else all traced: slower, the same
        # a run marks them afresh, so one that keeps ``Block.forward`` traced (or
        # ``UNTRACED_HARNESS_FRAMES`` off) inherits no mark
        for code in operation_free_codes() + [Block.forward.__code__]:
            frames.reset_code(code)
        if UNTRACED_HARNESS_FRAMES:
            for code in untraced_codes(model):
                frames.skip_code(code)
    target.compile(backend=mode.backend, dynamic=False)


#: the process that made its warm-up compile (``compile_warm_up``)
_warmed_up_in: list[int] = []


def compile_warm_up() -> None:
    """One small compiled forward and backward (a hooked torch layer, a generated dropout; the forward
    only where an accelerator is visible: ``devices.accelerator_visible``), once per process, before it forks
    a sandbox child: what Dynamo and AOT autograd build on a process's first
    compile (lookup tables, lazily imported modules; about 0.3 s here) is inherited, not built again
    by every child. Its cache is emptied after it, and the random number generator left as it was:
    no run sees it."""
    if _warmed_up_in == [os.getpid()]:
        return
    _warmed_up_in[:] = [os.getpid()]
    layer = nn.Linear(2, 2)
    layer.register_forward_hook(_doubled)
    model = nn.Sequential(layer, SeededDropout(0.5))
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), compiler_settings(Mode("compile")):
            out = torch.compile(model, backend="aot_eager", dynamic=False)(torch.ones(1, 2, requires_grad=True))
            if not devices.accelerator_visible():  # else autograd's device threads, started here, fail every child
                out.sum().backward()
    except Exception:  # noqa: BLE001 - a torch that cannot compile here: each run meets that itself, as its crash
        pass
    finally:
        torch._dynamo.reset()
        _cache_kept_by.clear()


def _doubled(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output * 2


def _fresh_cache_due() -> bool:
    """Start from an empty cache: caching is off, other code may compile in this process (it is not
    ``own_compile_cache``'s), its cache did not start empty yet, the cache is over ``KEPT_ENTRIES``,
    or this torch's decisions cannot be undone."""
    pid = [os.getpid()]
    if not CACHE_ACROSS_RUNS or _cache_owner != pid or _cache_kept_by != pid or _decision_hooks() is None:
        return True
    return _cache_entries() > KEPT_ENTRIES


def _cache_entries() -> int:
    """How many compiled entries Dynamo holds, over every code object it was handed (past any bound
    where this torch cannot count them)."""
    try:
        from torch._dynamo.convert_frame import input_codes
        from torch._dynamo.eval_frame import _get_total_cache_entry_count
    except ImportError:
        return KEPT_ENTRIES + 1
    return sum(_get_total_cache_entry_count(code) for ref in list(input_codes.seen) if (code := ref()) is not None)


@contextlib.contextmanager
def run_decisions_forgotten() -> Iterator[None]:
    """Dynamo's per-code-object decisions made during the run are undone after it.

    Where Dynamo gives a frame up (a graph break in a loop, no operation to compile, a torch layer's
    ``forward`` without hooks, a dispatch mode on the stack), it marks the frame's code object to run
    without tracing from then on, whatever the inputs: the first call of a code in a run decides for
    its later calls. Kept into the next run, that mark would decide there too, before that run's own
    first call. The codes marked during the run (what Dynamo's frame callback returned for them) get
    the default strategy back after it, so each run decides for itself, as from an empty cache; what
    they compiled before the mark stays, reused only where its guards hold. Marks made otherwise
    (``torch.compiler.disable``, the harness's untraced frames) stay."""
    hooks = _decision_hooks()
    if hooks is None:  # another torch: the cache is not kept either (``_fresh_cache_due``)
        yield
        return
    CatchErrorsWrapper, set_code_exec_strategy, FrameAction, FrameExecStrategy = hooks
    real = CatchErrorsWrapper.__call__
    default = (FrameAction.DEFAULT, FrameAction.DEFAULT)
    marked: list = []

    def frame_callback(self, frame, *args, **kwargs):
        result = real(self, frame, *args, **kwargs)
        strategy = getattr(result, "frame_exec_strategy", None)
        if getattr(result, "apply_to_code", False) and strategy is not None \
                and (strategy.cur_action, strategy.recursive_action) != default \
                and not _skipped_by_code_alone(frame.f_code):
            marked.append(frame.f_code)
        return result
    try:
        with _replaced(CatchErrorsWrapper, "__call__", frame_callback):
            yield
    finally:
        for code in marked:
            set_code_exec_strategy(code, FrameExecStrategy(*default))


def _decision_hooks() -> tuple | None:
    """What ``run_decisions_forgotten`` needs of Dynamo (None: this torch lacks it)."""
    try:
        from torch._dynamo.convert_frame import CatchErrorsWrapper
        from torch._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:
        return None
    return CatchErrorsWrapper, set_code_exec_strategy, FrameAction, FrameExecStrategy


def _skipped_by_code_alone(code) -> bool:
    """Dynamo skips every frame of ``code`` whatever its inputs: its file is on Dynamo's skip list
    (``trace_rules.check`` on the code alone), and it is not a ``forward``, which Dynamo traces for a
    torch layer that has hooks. Such a mark is the same in every run and is kept (undoing it would
    only have the next run decide it again, at about 0.4 ms a frame)."""
    from torch._dynamo import trace_rules
    return code.co_name != "forward" and trace_rules.check(code)


def unwrapped(model: nn.Module, mode: Mode, tree: Any = None) -> nn.Module:
    """One process: nothing wraps the model."""
    return model


#: what inductor compiles with in a run: dropout and other random operations drawn by torch's own
#: generator (inductor's own draws would differ from the reference's masks), and kernels compiled in
#: the run's own thread (a compile pool started inside a run, with a cold cache, would be a thread
#: the run leaves behind). Without them 27 of 88 verdicts differed from aot_eager's; with them none
#: (``benchmarks.compile_cost --backends aot_eager,inductor``).
INDUCTOR_CONFIG = {"fallback_random": True, "compile_threads": 1}


def as_it_is(mode: Mode) -> contextlib.AbstractContextManager:
    """A run made under the process's settings."""
    return contextlib.nullcontext()


@contextlib.contextmanager
def compiler_settings(mode: Mode) -> Iterator[None]:
    """Inductor's ``INDUCTOR_CONFIG`` for the run (``torch._inductor.config.patch``: put back after it;
    ``aot_eager`` takes none), without Dynamo's diagnostics that nobody reads (``unread_diagnostics``),
    under ``RECOMPILE_LIMITS``, and with the run's per-code decisions undone after it
    (``run_decisions_forgotten``)."""
    from torch._dynamo import config as dynamo_config
    with contextlib.ExitStack() as stack:
        stack.enter_context(unread_diagnostics())
        stack.enter_context(dynamo_config.patch(RECOMPILE_LIMITS))
        stack.enter_context(run_decisions_forgotten())
        if mode.backend == "inductor":
            from torch._inductor import config as inductor_config
            stack.enter_context(inductor_config.patch(INDUCTOR_CONFIG))
        yield


def _no_guard_latency(*args: Any) -> float:
    return 0.0


def _graph_break_logged_if_read(real: Callable) -> Callable:
    """Dynamo's graph-break log entry, written only where someone reads it: graph-break logging
    (``TORCH_LOGS=graph_breaks``) or structured tracing is on. Otherwise the break is only marked
    logged (what the real function ends with), without extracting and formatting the stack."""
    import logging

    from torch._dynamo.symbolic_convert import graph_break_log
    from torch._logging._internal import trace_log

    def log_graph_break(self, code_options, reason, exc):
        if graph_break_log.isEnabledFor(logging.DEBUG) or trace_log.handlers:
            return real(self, code_options, reason, exc)
        exc.logged = True
    return log_graph_break


#: Dynamo's diagnostics computed on every compile whatever reads them: (module, owner in it or None,
#: attribute, its replacement made from the real one). Each is left alone where torch has no such name.
_UNREAD_DIAGNOSTICS = (
    # a frame's new guards timed once, after flushing the CPU caches, for the compile-metrics log
    ("torch._dynamo.guards", None, "profile_guard_manager", lambda real: _no_guard_latency),
    # the whole Python stack extracted with column positions for a graph-break message
    ("torch._dynamo.symbolic_convert", "InstructionTranslatorBase", "log_graph_break", _graph_break_logged_if_read),
)


@contextlib.contextmanager
def unread_diagnostics() -> Iterator[None]:
    """Without the diagnostics Dynamo computes for logs nobody reads (``_UNREAD_DIAGNOSTICS``): the
    guard-latency measurement (about 15 ms per compiled frame here) and the graph-break message's stack
    (about 8 ms per graph break). The guards, the graph breaks and the compiled code are the same
    (bitwise the same traces: ``tests/test_compile_cost.py``); everything is put back after the run."""
    with contextlib.ExitStack() as stack:
        for module_name, owner_name, name, replace in _UNREAD_DIAGNOSTICS:
            try:
                module = importlib.import_module(module_name)
                owner = module if owner_name is None else getattr(module, owner_name)
                replacement = replace(getattr(owner, name))
            except (ImportError, AttributeError):  # another torch: nothing to skip there
                continue
            stack.enter_context(_replaced(owner, name, replacement))
        yield


@contextlib.contextmanager
def _replaced(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    """``owner.name`` is ``replacement`` for the block, and what it was again after it."""
    real = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, real)


def full_precision(device_type: str) -> None:
    """The forward runs in the scenario's dtype."""
    return None


def low_precision(device_type: str) -> torch.dtype:
    """CUDA's float16 (with a GradScaler), CPU's bfloat16."""
    return torch.float16 if device_type == "cuda" else torch.bfloat16


def one_process(train: Callable[[Any, Any], Any], phase: Callable[[Any], Any], timeout: float | None,
                progress_struct: Any) -> Any:
    """Train here, as the only process: no shard, the caller's own phase."""
    return train(None, None)


class Precision:
    """The forward's number format and the loss scaling that goes with it (autocast only).

    On CUDA, float16 autocast comes with a ``GradScaler``: the loss is scaled before backward, the
    optimizer's gradients are unscaled before clipping and before they are recorded, and the input
    gradient (which no optimizer unscales) is recorded divided by the scale. A step whose loss had no
    gradient (nothing was scaled) steps the optimizer plainly, as a user's loop would skip the
    scaler there."""

    def __init__(self, mode: Mode, device: str):
        self.device_type = torch.device(device).type
        dtype = info(mode).autocast(self.device_type)
        self.enabled = dtype is not None
        self.dtype = dtype
        self.scaler = torch.amp.GradScaler(self.device_type) if self.enabled and dtype is torch.float16 else None
        self.scale: float | None = None  # the scale of this step's backward passes (None: none scaled)

    def start_step(self) -> None:
        self.scale = None

    def forward(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scale = float(self.scaler.get_scale())

    def input_grad(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        """An input's gradient as the unscaled loss gives it."""
        return grad if grad is None or self.scale is None else grad / self.scale

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scale is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scale is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()


MODE_INFOS: tuple[ModeInfo, ...] = (
    ModeInfo.of("eager", warm_up=nothing, before_setup=nothing, before_training=nothing, autocast=full_precision,
                launch=one_process, grace=0.0, wrap=unwrapped, settings=as_it_is, retire=False),
    ModeInfo.of("checkpoint", same_rounding=False, warm_up=nothing, before_setup=checkpoint_target, before_training=nothing,
                autocast=full_precision, launch=one_process, grace=0.0, wrap=unwrapped, settings=as_it_is, retire=False),
    ModeInfo.of("compile", example_share=0.1, budget_weight=4.0, same_rounding=False,
                inherited_imports=("torch._functorch.partitioners", "torch._inductor.pattern_matcher"),
                warm_up=compile_warm_up, before_setup=nothing,
                before_training=compile_target, autocast=full_precision, launch=one_process, grace=0.0,
                wrap=unwrapped, settings=compiler_settings, retire=False),
    ModeInfo.of("autocast", reference=True, warm_up=nothing, before_setup=nothing, before_training=nothing, autocast=low_precision,
                launch=one_process, grace=0.0, wrap=unwrapped, settings=as_it_is, retire=False),
    # the wrapping itself is the technique's order to follow (``runner``): before or after its setup
    ModeInfo.of("ddp", devices=("cpu",), example_share=0.25, budget_weight=2.0, same_rounding=False,
                warm_up=nothing, before_setup=nothing, before_training=nothing, autocast=full_precision, launch=ddp.run,
                grace=ddp.GRACE, wrap=ddp.wrap, settings=as_it_is, retire=False),
    # ddp's ranks and pool, FSDP2's wrap
    ModeInfo.of("fsdp", devices=("cpu",), example_share=0.25, budget_weight=3.0, same_rounding=False,
                warm_up=nothing, before_setup=nothing, before_training=nothing, autocast=full_precision, launch=ddp.run,
                grace=ddp.GRACE, wrap=fsdp.wrap, settings=fsdp.without_model_warnings, retire=False),
)
MODE_BY_KIND = {row.kind: row for row in MODE_INFOS}
assert tuple(MODE_BY_KIND) == MODE_KINDS, "mode_kinds.MODES and MODE_INFOS must list the same modes, in order"
assert all(row.ranks == {one_process: 1, ddp.run: ddp.WORLD}[row.launch] for row in MODE_INFOS), \
    "a row's ranks are the processes its launch starts"
