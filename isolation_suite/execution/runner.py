"""The training loop: the only place that touches training state.

``run`` drives either a technique or the reference through a real loop
(``model.train()``, ``zero_grad``, forward, loss, backward over micro-batches,
clipping, ``step``, scheduler) and records a :class:`Trace`. Global torch state
(grad mode, default dtype, RNG) is saved before and restored after every run.
"""
from __future__ import annotations

import inspect
import itertools
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from isolation_suite.execution import modes
from isolation_suite.execution.fsdp import is_sharded, local, whole, whole_all
from isolation_suite.execution.trace import PROGRESS, Phase, StepRecord, Trace, user_interrupted
from isolation_suite.model.factory import Built, build
from isolation_suite.spec.scenario import Intent, OptimizerRecipe, Scenario
from isolation_suite.technique import Role, Technique, module_param_name
from isolation_suite.model.tree import CallSite, Router, check_intent, roles


class Driver(Protocol):
    """What ``run`` needs: the technique hooks, plus how to read a parameter's effective value."""

    guarded: bool  # exceptions become a recorded crash (technique) or propagate (reference: our bug)
    #: ``call`` takes the intercepted call's keyword arguments (else they go to the module's own call inside it)
    keywords: bool

    def setup(self, model: nn.Module, intent: Intent) -> None: ...
    def forward(self, model: nn.Module, inputs: tuple) -> Any: ...
    def call(self, site: CallSite, module: nn.Module, args: tuple, kwargs: dict) -> Any: ...
    def make_optimizer(self, model: nn.Module, intent: Intent, build: Callable) -> torch.optim.Optimizer: ...
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def on_intent_change(self, model: nn.Module, optimizer: torch.optim.Optimizer, old: Intent,
                         new: Intent) -> torch.optim.Optimizer | None: ...
    def effective(self, path: str, value: torch.Tensor) -> torch.Tensor: ...


class TechniqueDriver:
    """Adapts a user-facing :class:`Technique` (roles, no sites) to the runner."""

    guarded = True

    def __init__(self, technique: Technique):
        self.technique = technique
        self.keywords = takes_keywords(technique)

    def setup(self, model, intent):
        self.technique.setup(model, intent)

    def forward(self, model, inputs):
        return model(*inputs)

    def call(self, site, module, args, kwargs=None):
        if self.keywords:
            return self.technique.call(module, args, site.role, kwargs or {})
        return self.technique.call(module, args, site.role)

    def make_optimizer(self, model, intent, build):
        return self.technique.make_optimizer(model, intent, build)

    def after_step(self, model, optimizer):
        self.technique.after_step(model, optimizer)

    def on_intent_change(self, model, optimizer, old, new):
        return self.technique.on_intent_change(model, optimizer, old, new)

    def effective(self, path, value):
        return value

    @property
    def ddp_wrap(self) -> str:
        return getattr(self.technique, "ddp_wrap", "after_setup")


def takes_keywords(technique: Technique) -> bool:
    """Whether ``technique.call`` takes a fourth argument, the call's keyword arguments. A plug-in
    written against the three-argument ``call(module, args, role)`` still works: the keyword
    arguments of an intercepted call then go to the module's own call inside it."""
    try:
        inspect.signature(technique.call).bind(None, (), Role.NORMAL, {})
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): the base class's is the contract
        return True
    return True


# --- optimizer, scheduler, clipping from the recipe -------------------------------------

def optimizer_builder(recipe: OptimizerRecipe) -> Callable[[Any], torch.optim.Optimizer]:
    cls = getattr(torch.optim, recipe.name)

    def build(params):
        return cls(params, **recipe.kwargs)
    return build


def make_scheduler(recipe: OptimizerRecipe, optimizer: torch.optim.Optimizer, steps: int):
    if recipe.scheduler == "none":
        return None
    sched = torch.optim.lr_scheduler
    if recipe.scheduler == "StepLR":
        return sched.StepLR(optimizer, step_size=1, gamma=0.5)
    if recipe.scheduler == "LambdaLR":
        return sched.LambdaLR(optimizer, lambda epoch: 1.0 / (1.0 + epoch))
    if recipe.scheduler == "OneCycleLR":
        # max_lr is one float, as people write it: it rewrites the lr of *every* group
        return sched.OneCycleLR(optimizer, max_lr=recipe.kwargs["lr"], total_steps=steps + 1,
                                cycle_momentum=False)
    raise ValueError(f"unknown scheduler {recipe.scheduler!r}")


def clip_gradients(recipe: OptimizerRecipe, params: list[torch.Tensor]) -> None:
    params = [p for p in params if p.grad is not None]
    if not params:
        return  # torch's foreach grouping rejects an empty list
    if recipe.clip == "norm":
        torch.nn.utils.clip_grad_norm_(params, recipe.clip_value)
    elif recipe.clip == "value":
        torch.nn.utils.clip_grad_value_(params, recipe.clip_value)


# --- resolving original paths after a technique rewired the model -------------------------

@dataclass
class Handle:
    """How to read one original parameter after setup: its trainable tensor and its effective value."""

    raw: torch.Tensor | None
    read: Callable[[], torch.Tensor] | None
    alias: str


def resolve(model: nn.Module, originals: dict[str, tuple[nn.Module, str, torch.Tensor]],
            optimizer: torch.optim.Optimizer | None, replaced: dict[tuple, tuple[str, torch.Tensor]] | None = None
            ) -> dict[str, Handle]:
    """Find each original parameter again: parametrized in place, moved, or wrapped (same storage),
    or replaced by the mode's wrap (``replaced``: by the storage of the parameter it replaced, see
    ``replacements``)."""
    by_storage: dict[tuple, tuple[str, torch.Tensor]] = dict(replaced or {})
    for name, p in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(_storage_key(p), (name, p))
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                by_storage.setdefault(_storage_key(p), ("<optimizer>", p))
    handles = {}
    for path, (module, name, tensor) in originals.items():
        if parametrize.is_parametrized(module, name):
            raw = module.parametrizations[name].original
            handles[path] = Handle(raw, lambda m=module, n=name: parametrized_value(m, n), f"{path} (parametrized)")
            continue
        found = by_storage.get(_storage_key(tensor))
        if found is None:
            handles[path] = Handle(None, None, path)
        else:
            alias, p = found
            handles[path] = Handle(p, lambda p=p: p, alias)
    return handles


def parametrized_value(module: nn.Module, name: str) -> torch.Tensor:
    """A parametrized tensor's value, as the module computes it in its forward: where a mode sharded
    the original (FSDP2 gathers it for the forward only), the parametrizations applied to the whole
    original, as ``ParametrizationList`` applies them to a single original."""
    chain = module.parametrizations[name]
    original = getattr(chain, "original", None)
    if original is None or not is_sharded(original):
        return getattr(module, name)
    value = whole(original)
    for step in chain:
        value = step(value)
    return value


def replacements(before: dict[str, torch.Tensor], model: nn.Module) -> dict[tuple, tuple[str, torch.Tensor]]:
    """The parameters a mode's wrap replaced (``fully_shard``: a new ``nn.Parameter`` of a sharded
    ``DTensor`` under the same path), keyed by the storage of the parameter each replaced: where the
    technique's setup had moved an original, it is found there first, then followed to its replacement."""
    after = dict(model.named_parameters(remove_duplicate=False))
    return {_storage_key(p): (path, after[path]) for path, p in before.items()
            if path in after and after[path] is not p}


def _storage_key(t: torch.Tensor) -> tuple:
    t = local(t)  # a sharded parameter: its own rank's shard
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def _buffers(model: nn.Module, originals: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    by_storage = {_storage_key(b): b for _, b in model.named_buffers(remove_duplicate=False)}
    return {path: (lambda b=by_storage.get(_storage_key(t), t): b) for path, t in originals.items()}


# --- the loop ----------------------------------------------------------------------------

def site_seed(data_seed: int, step: int, micro: int, site: int) -> int:
    return (data_seed * 1_000_003 + step * 10_007 + micro * 101 + site) % (2**63)


#: the loss target's seed slot (module calls use their path's hash, see ``seed_every_call``)
LOSS_SITE = 999_983


class seed_every_call:
    """Seeds the CPU generator before every call of a module of the original tree, from the step,
    micro-batch, the module's path and how many times it was called in this forward: dropout
    draws the same masks in every run of a scenario, whatever the technique draws in between.
    (A global forward pre-hook, so hooks and wrappers the technique adds cannot skip it.)"""

    def __init__(self, model: nn.Module, data_seed: int):
        self.paths = {id(m): zlib.crc32(p.encode()) for p, m in model.named_modules(remove_duplicate=False)}
        self.data_seed, self.step, self.micro, self.uses = data_seed, 0, 0, {}
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._seed)

    def start(self, step: int, micro: int) -> None:
        self.step, self.micro, self.uses = step, micro, {}

    # the harness's bookkeeping, not the user's model: compiled code calls it as it is (one graph
    # break per module call) instead of guarding on its counters and recompiling
    @torch.compiler.disable
    def _seed(self, module: nn.Module, args: Any) -> None:
        key = self.paths.get(id(module))
        if key is not None:
            use = self.uses.get(key, 0)
            self.uses[key] = use + 1
            torch.default_generator.manual_seed(site_seed(self.data_seed, self.step, self.micro, key * 64 + use))

    def close(self) -> None:
        self.handle.remove()


def _global_state() -> tuple[bool, torch.dtype]:
    return torch.is_grad_enabled(), torch.get_default_dtype()


def _describe_state_change(before, after, flags_before, flags_after, aliases) -> list[str]:
    out = []
    if before[0] != after[0]:
        out.append(f"grad mode was left {'on' if after[0] else 'off'} (it was {'on' if before[0] else 'off'})")
    if before[1] != after[1]:
        out.append(f"default dtype changed {before[1]} -> {after[1]}")
    for path, flag in flags_before.items():
        if flags_after.get(path, flag) != flag:
            out.append(f"{aliases.get(path, path)}.requires_grad changed {flag} -> {flags_after[path]}")
    return out


def run(scenario: Scenario, driver: Driver, device: str = "cpu", *, progress=None,
        timeout: float | None = None) -> Trace:
    """Train the scenario's model under ``driver`` and record what happened.

    ``progress`` mirrors the current step and phase into a shared buffer (see ``sandbox``);
    ``timeout`` only names the limit in the crash an in-process timeout alarm leaves.
    """
    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    grad_mode, default_dtype, threads = *_global_state(), torch.get_num_threads()
    # one CPU thread for every run, wherever it runs: a reduction split over another number of
    # threads rounds differently, and a sandboxed child must run single-threaded (OpenMP after fork)
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=devices):
        try:
            # here, or as the mode's ranks (``ModeInfo.launch``: a shard and a phase each)
            work = Work(scenario, driver, str(device), progress, timeout, next(_SERIALS) if driver.guarded else 0)
            return modes.info(scenario.mode).launch(work, Phase, timeout, PROGRESS)
        finally:
            torch.set_grad_enabled(grad_mode)
            torch.set_default_dtype(default_dtype)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)


#: numbers every technique run of this process in turn (``Work.serial``)
_SERIALS = itertools.count(1)


@dataclass
class Work:
    """One run's training as a mode's ranks call it: ``work(shard, at)``.

    A ``ddp`` pool's rank 1 serves many runs (see ``ddp``): it receives each next run as
    ``request()`` over a pipe and rebuilds it with ``again(request)`` from the driver, and so the
    technique, it inherited when it was forked. ``serial`` numbers the technique runs of this
    process (0: an unguarded driver's, the reference's), so that the pool serves a run only where its
    rank 1 has run every technique run that rank 0 has since the fork."""

    scenario: Scenario
    driver: Driver
    device: str
    progress: Any
    timeout: float | None
    serial: int = 0

    def __call__(self, shard, at: Phase | None) -> Trace:
        return _run(self.scenario, self.driver, self.device, at or Phase(self.progress), self.timeout, shard)

    def request(self) -> tuple:
        return self.scenario, self.device, self.timeout, self.serial

    def again(self, request: tuple) -> "Work":
        scenario, device, timeout, serial = request
        return Work(scenario, self.driver, device, None, timeout, serial)


def _run(scenario: Scenario, driver: Driver, device: str, at: Phase, timeout: float | None,
         shard=None) -> Trace:
    trace = Trace(device)
    with modes.info(scenario.mode).settings(scenario.mode):  # on every rank
        try:
            _train(scenario, driver, device, trace, at, shard)
        except BaseException as exc:  # noqa: BLE001 - whatever the technique raises is a verdict, not our error
            if not driver.guarded or at.name is None:
                raise
            if isinstance(exc, KeyboardInterrupt) and user_interrupted():
                raise  # the user's Ctrl-C, not the technique's
            trace.crash = at.crash(exc, timeout)
    return trace


def _train(scenario: Scenario, driver: Driver, device: str, trace: Trace, at: Phase, shard=None) -> None:
    built = build(scenario, device) if shard is None else _share(build(scenario, device), scenario, shard)
    model, tree = built.model, built.tree
    if scenario.model:
        for intent in scenario.intents:
            check_intent(tree, intent)
    modules = dict(model.named_modules())
    originals = {}
    for path, p in model.named_parameters():
        module_path, name = module_param_name(path)
        originals[path] = (modules[module_path], name, p)
    original_buffers = dict(model.named_buffers())
    trace.initial_params = {k: v[2].detach().clone() for k, v in originals.items()}
    trace.initial_buffers = {k: v.detach().clone() for k, v in original_buffers.items()}
    # before setup: the calls the intent names are intercepted on the modules the user built, whatever
    # the technique wraps, replaces or hooks afterwards
    router = Router(model, roles(tree, scenario.intent), driver.call, driver.keywords)
    seeding = seed_every_call(model, scenario.data.seed)
    modes.before_setup(model, scenario.mode, modes.ForwardState(lambda: router, seeding))
    try:
        _loop(scenario, driver, device, trace, at, built, originals, original_buffers, router, seeding, shard)
    finally:
        router.close()
        seeding.close()


def _share(built: Built, scenario: Scenario, shard) -> Built:
    """A rank's part of a run (a mode of several ranks): its rows of every batch along each input's
    batch dimension, and its rows of the loss targets (along the first split input's)."""
    dims = built.batch_dims
    inputs = [[tuple(shard.rows(x, d) for x, d in zip(batch, dims)) for batch in step] for step in built.inputs]
    share = (shard.rank, shard.world, next(d for d in dims if d is not None))
    return Built(built.model, inputs, lambda out, seed: built.loss(out, seed, share), built.tree, dims)


def _setup_and_wrap(scenario, driver, model, tree, at, shard) -> tuple[nn.Module, dict]:
    """The technique's setup and, in a mode of several ranks, the wrapping (``ModeInfo.wrap``, in the
    technique's order, ``ddp_wrap``); the module the loop calls forward on, and the parameters the
    wrap replaced (``replacements``)."""
    wrapped, replaced = model, {}
    before = shard is not None and getattr(driver, "ddp_wrap", "after_setup") == "before_setup"

    def wrap() -> nn.Module:
        at.enter(0, "wrap")
        params = dict(model.named_parameters(remove_duplicate=False))
        out = modes.info(scenario.mode).wrap(model, scenario.mode, tree)
        replaced.update(replacements(params, model))
        return out
    if before:
        wrapped = wrap()
    at.enter(0, "setup")
    driver.setup(model, scenario.intent)
    if shard is not None and not before:
        wrapped = wrap()
    at.leave()
    return wrapped, replaced


def _loop(scenario, driver, device, trace, at, built, originals, original_buffers, router, seeding,
          shard=None) -> None:
    recipe, data, model = scenario.optimizer, scenario.data, built.model
    state = _global_state()  # setup and make_optimizer must leave global state alone too
    forward_model, replaced = _setup_and_wrap(scenario, driver, model, built.tree, at, shard)
    at.enter(0, "make_optimizer")
    optimizer = driver.make_optimizer(model, scenario.intent, optimizer_builder(recipe))
    scheduler = make_scheduler(recipe, optimizer, scenario.steps)
    at.leave()
    at.enter(0, "compile")
    modes.before_training(model, scenario.mode)
    at.leave()
    precision = modes.Precision(scenario.mode, device)
    handles = resolve(model, originals, optimizer, replaced)
    trace.unreachable = [p for p, h in handles.items() if h.raw is None]
    trace.aliases = {p: h.alias for p, h in handles.items() if h.alias != p}
    buffers = _buffers(model, original_buffers)
    for change in _describe_state_change(state, _global_state(), {}, {}, trace.aliases):
        trace.state_leaks.append((0, change))
    intent = scenario.intent
    for step in range(1, scenario.steps + 1):
        if scenario.intent_at(step) != intent:  # a freeze schedule's step boundary
            at.enter(step, "on_intent_change")
            replacement = driver.on_intent_change(model, optimizer, intent, scenario.intent_at(step))
            at.leave()
            intent = scenario.intent_at(step)
            router.reroute(roles(built.tree, intent))
            if replacement is not None:
                optimizer = replacement
                handles = resolve(model, originals, optimizer, replaced)
        record = StepRecord()
        # requires_grad flags set in setup are the technique's baseline; grad mode and dtype are not
        flags = {p: h.raw.requires_grad for p, h in handles.items() if h.raw is not None}
        state = _global_state()
        record.requires_grad = dict(flags)
        precision.start_step()
        at.enter(step, "train")
        forward_model.train()
        at.enter(step, "zero_grad")
        optimizer.zero_grad(set_to_none=recipe.set_to_none)
        at.leave()
        for micro, batch in enumerate(built.inputs[step - 1]):
            # a copy for every micro-batch: a factory's one example batch serves every step, and an
            # input that needs gradient must not carry the last step's .grad into this one
            inputs = tuple(x.to(device, copy=True) for x in batch)
            floats = [x for x in inputs if x.is_floating_point()]
            if data.input_requires_grad:
                for x in floats:
                    x.requires_grad_(True)
            seeding.start(step, micro)
            at.enter(step, "forward")
            with precision.forward():
                with router.forward():
                    out = driver.forward(forward_model, inputs)
                loss = built.loss(out, site_seed(data.seed, step, micro, LOSS_SITE))
            loss = loss / scenario.micro_batches
            at.leave()
            record.losses.append(loss.detach().clone() if shard is None else shard.whole_loss(loss))
            if loss.requires_grad:
                at.enter(step, "backward")
                precision.backward(loss)
                at.leave()
            else:
                record.loss_without_grad = True
            grads = [x.grad for x in floats] if shard is None else shard.whole_input_grads(
                floats, [d for x, d in zip(inputs, built.batch_dims) if x.is_floating_point()])
            record.input_grads.append(precision.input_grad(_input_grad(floats, grads)))
            trace.input_sizes = tuple((x if g is None else g).numel() for x, g in zip(floats, grads))
        at.enter(step, "clip")
        precision.unscale(optimizer)
        clip_gradients(recipe, list(model.parameters()))
        at.leave()
        grads = whole_all([None if h.raw is None else h.raw.grad for h in handles.values()])
        record.grads = {p: None if g is None else g.detach().clone() for p, g in zip(handles, grads)}
        at.enter(step, "optimizer.step")
        precision.step(optimizer)
        if scheduler is not None:
            scheduler.step()
        at.enter(step, "after_step")
        driver.after_step(model, optimizer)
        at.enter(step, "record")  # reading a parametrized weight runs the technique's code
        with torch.no_grad():
            values = {p: driver.effective(p, h.read()) for p, h in handles.items() if h.read is not None}
            record.params = {p: v.detach().clone() for p, v in zip(values, whole_all(list(values.values())))}
        record.buffers = {p: read().detach().clone() for p, read in buffers.items()}
        at.leave()
        trace.steps.append(record)
        after_flags = {p: h.raw.requires_grad for p, h in handles.items() if h.raw is not None}
        for change in _describe_state_change(state, _global_state(), flags, after_flags, trace.aliases):
            trace.state_leaks.append((step, change))


def _input_grad(inputs: list[torch.Tensor], grads: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The gradient that reached the inputs, flattened into one tensor (None when none did)."""
    if all(g is None for g in grads):
        return None
    if len(inputs) == 1:
        return grads[0].detach().clone()
    return torch.cat([(torch.zeros_like(x) if g is None else g.detach()).flatten() for x, g in zip(inputs, grads)])
