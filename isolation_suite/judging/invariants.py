"""The invariants: named properties checked by comparing a technique's trace with the reference's.

Each invariant returns at most one :class:`Violation` (its first), whose message
names the place, the step and the size. Ids are stable: reports, messages and
tests use these strings.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from isolation_suite.model.build import DTYPES
from isolation_suite.model.factory import tree_of
from isolation_suite.execution.modes import MODE_BY_KIND
from isolation_suite.model.tree import upstream_of_isolation
from isolation_suite.execution.trace import Trace
from isolation_suite.spec.scenario import OptimizerRecipe, Scenario
from isolation_suite.technique import element_mask

FROZEN_UNCHANGED = "frozen-unchanged"
GRADIENT_FLOWS = "gradient-flows"
TRAINABLE_TRAINS = "trainable-trains"
MATCHES_REFERENCE = "matches-reference"
NO_CRASH = "no-crash"
TIMEOUT = "timeout"
STATE_RESTORED = "state-restored"
DEVICE_PARITY = "device-parity"

#: every id, in the order they are evaluated (the first violation is the verdict's headline)
INVARIANTS = (NO_CRASH, TIMEOUT, STATE_RESTORED, GRADIENT_FLOWS, FROZEN_UNCHANGED, TRAINABLE_TRAINS,
              MATCHES_REFERENCE, DEVICE_PARITY)

#: technique vs reference on one device: torch.testing's defaults for the dtype
MATCH_TOLERANCE = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.float64: dict(rtol=1e-7, atol=1e-7)}
#: CPU vs CUDA (TF32 off): different kernels, different summation order
PARITY_TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-10)}


@dataclass(frozen=True)
class Violation:
    invariant: str
    message: str
    step: int | None = None

    def __str__(self) -> str:
        return f"{self.invariant}: {self.message}"


@dataclass
class Context:
    scenario: Scenario
    technique: Trace
    reference: Trace
    other_device: Trace | None = None  # the technique's trace on the CPU, for device-parity

    # derived once per context: every invariant walks every step with them
    @functools.cached_property
    def trainable(self) -> list[str]:
        """Parameters that train during some step (a freeze schedule may thaw or freeze them)."""
        frozen = [self.frozen_at(i) for i in self.scenario.intents]
        return [p for p in self.reference.initial_params if not all(p in f for f in frozen)]

    def trainable_at(self, step: int) -> list[str]:
        """Parameters the intent in force during ``step`` leaves trainable."""
        frozen = self.frozen_at(self.scenario.intent_at(step))
        return [p for p in self.trainable if p not in frozen]

    def frozen_at(self, intent) -> frozenset[str]:
        """The parameters ``intent`` freezes, under any of their names (``ModelTree.frozen_params``)."""
        return tree_of(self.scenario).frozen_params(intent)

    @functools.cached_property
    def rounding(self) -> float:
        """How far from zero the reference's gradient or step must be to count as one: exactly zero
        (0.0) where the mode reproduces eager's rounding (``ModeInfo.same_rounding``: eager, and
        autocast, whose number format the reference shares); in a mode that does not (a checkpoint's
        backward accumulates in another order, compiled kernels are fused or decomposed, ddp averages
        the ranks' gradients), the rounding that another summation order leaves, as between devices
        (``PARITY_TOLERANCE``'s ``atol``: 1e-5 in float32, 1e-10 in float64): a mathematically zero
        gradient, an attention key bias's, is 5e-14 in one order and exactly 0 in another."""
        if MODE_BY_KIND[self.scenario.mode.kind].same_rounding:
            return 0.0
        return PARITY_TOLERANCE[torch.float64 if self.scenario.dtype == "float64" else torch.float32]["atol"]

    def reference_nonzero(self, t: torch.Tensor | None, mask: torch.Tensor | None = None) -> bool:
        """The reference's gradient is not zero (beyond ``rounding``)."""
        if not self.rounding or t is None:
            return _nonzero(t, mask)
        big = t.abs().gt(self.rounding) | t.isnan()
        return bool((big if mask is None else big & mask).any())

    def reference_moved(self, after: torch.Tensor, before: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """The reference's parameter moved (beyond ``rounding``)."""
        if not self.rounding:
            return _differ(after, before, mask) is not None
        return self.reference_nonzero((after.double() - before.double()).abs(), mask)

    @functools.cached_property
    def element_masks(self) -> dict[str, torch.Tensor]:
        """Path -> boolean mask of its frozen entries, for each element-frozen parameter."""
        return {path: element_mask(self.reference.initial_params[path], indices)
                for path, indices in self.scenario.intent.elements.items()}

    @functools.cached_property
    def against_reference(self) -> list:
        """What matches-reference compares: ``_compared`` entries, technique against reference. In a
        mode that does not round as eager does (``rounding``) an entry whose gradient has been zero up to ``rounding`` in both runs at every
        step so far is set aside, as between devices (``against_other_device``): an adaptive
        optimizer turns each summation order's noise into its own lr-sized move."""
        if not self.rounding:
            return list(_compared(self, self.technique, self.reference))
        out = []
        for step, kind, key, a, e in _compared(self, self.technique, self.reference):
            aimless = _aimless(self.technique, self.reference, key, step, self.rounding) if kind == "param" else None
            out.append((step, kind, key, a if aimless is None else torch.where(aimless.to(a.device), e, a), e))
        return out

    @functools.cached_property
    def flat_against_reference(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return _flatten([(a, e) for *_, a, e in self.against_reference])

    @functools.cached_property
    def against_other_device(self) -> list:
        """What device-parity compares: ``_compared`` entries, this device's run against the CPU's."""
        if self.other_device is None:
            return []
        mine, cpu = self.technique.to("cpu"), self.other_device.to("cpu")
        atol = PARITY_TOLERANCE[_dtype(self)]["atol"]
        out = []
        for step, kind, key, a, e in _compared(self, mine, cpu):
            if kind == "param":
                # an entry whose gradient has been zero up to rounding on both devices at every step so
                # far has no direction: Rprop's sign or Adam's g/sqrt(v) turns each device's rounding
                # noise into its own lr-sized move (an attention key bias: its gradient is exactly zero
                # in exact arithmetic). Which way it went is not a difference between the devices.
                aimless = _aimless(mine, cpu, key, step, atol)
                if aimless is not None:
                    a = torch.where(aimless, e, a)
            out.append((step, kind, key, a, e))
        return out

    @functools.cached_property
    def free_masks(self) -> dict[str, torch.Tensor]:
        """Path -> boolean mask of the entries that train, for each element-frozen parameter."""
        return {path: ~mask for path, mask in self.element_masks.items()}


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _moved(before: float, after: float) -> str:
    """``1.541 -> 1.53946``, with enough digits that the two numbers differ on the page."""
    for digits in (6, 9, 12, 17):
        a, b = f"{before:.{digits}g}", f"{after:.{digits}g}"
        if a != b:
            return f"{a} -> {b}"
    return f"{before!r} -> {after!r}"


def _index(idx: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(i) for i in idx) + "]" if idx else ""


def recipe_context(recipe: OptimizerRecipe) -> str:
    """``AdamW, weight_decay=0.01, OneCycleLR``: the parts of the recipe that matter to a reader."""
    parts = [recipe.name]
    if recipe.weight_decay:
        parts.append(f"weight_decay={recipe.weight_decay}")
    if recipe.scheduler != "none":
        parts.append(recipe.scheduler)
    if recipe.clip != "none":
        parts.append(f"clip-{recipe.clip}={recipe.clip_value}")
    if not recipe.set_to_none:
        parts.append("zero_grad(set_to_none=False)")
    return ", ".join(parts)


def _nonzero(t: torch.Tensor | None, mask: torch.Tensor | None = None) -> bool:
    if t is None:
        return False
    if mask is None:
        return bool(t.any())  # NaN counts as non-zero, as in ``t != 0``
    return bool((t.ne(0) & mask).any())


def _differ(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean map of the entries where ``a`` and ``b`` differ (bitwise), or None when none do."""
    if torch.equal(a, b):  # the common case, in one pass
        return None
    # bitwise-equal entries and NaN stuck at NaN have not moved
    differ = ~torch.isclose(a, b, rtol=0, atol=0, equal_nan=True)
    if mask is not None:
        differ = differ & mask
    return differ if bool(differ.any()) else None


def _first_difference(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None):
    """Index and values of the first entry where ``a`` and ``b`` differ (bitwise), else None."""
    differ = _differ(a, b, mask)
    if differ is None:
        return None
    first = differ.reshape(-1).nonzero()[0, 0]  # a 0-d tensor (num_batches_tracked) has index ()
    idx = tuple(int(i) for i in torch.unravel_index(first, differ.shape))
    return idx, float(a[idx]), float(b[idx])


def _strongest(t: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The largest ``|entry|`` of ``t`` over the entries of ``mask`` (all: None); a NaN counts as infinite."""
    size = t.double().abs().nan_to_num(float("inf"))
    size = size if mask is None else size[mask.to(size.device)]
    return float(size.max()) if size.numel() else 0.0


def _dtype(ctx: Context) -> torch.dtype:
    return DTYPES[ctx.scenario.dtype]


def _name(ctx: Context, path: str) -> str:
    alias = ctx.technique.aliases.get(path)
    return f"{path} (as {alias})" if alias else path


# --- the invariants ------------------------------------------------------------------------

def _crash(ctx: Context, invariant: str, timed_out: bool) -> Violation | None:
    crash = ctx.technique.crash
    if crash is None or crash.timed_out != timed_out:
        return None
    where = f"during {crash.phase}" if crash.step == 0 else f"in {crash.phase} at step {crash.step}"
    return Violation(invariant, f"{crash.error} ({where}; {recipe_context(ctx.scenario.optimizer)})", crash.step)


def no_crash(ctx: Context) -> Violation | None:
    """The technique's code raised, exited the process or was killed by a signal."""
    return _crash(ctx, NO_CRASH, timed_out=False)


def timeout(ctx: Context) -> Violation | None:
    """The run took longer than the per-example timeout and was stopped."""
    return _crash(ctx, TIMEOUT, timed_out=True)


def state_restored(ctx: Context) -> Violation | None:
    if not ctx.technique.state_leaks:
        return None
    step, what = ctx.technique.state_leaks[0]
    if step < 0:  # found when the run was over: somewhere in setup or in one of the steps
        return Violation(STATE_RESTORED, f"{what} by the end of the run (global state is compared around the "
                         "whole run)", len(ctx.technique.steps))
    when = "during setup" if step == 0 else f"during step {step}"
    return Violation(STATE_RESTORED, f"{what} {when}", step)


def _upstream_of_isolation(scenario: Scenario, step: int) -> set[str]:
    """Modules called before the last frozen or pass-through call site: their gradient must cross it."""
    return upstream_of_isolation(tree_of(scenario), scenario.intent_at(step))


def gradient_flows(ctx: Context) -> Violation | None:
    for step, (tech, ref) in enumerate(zip(ctx.technique.steps, ctx.reference.steps), start=1):
        upstream = _upstream_of_isolation(ctx.scenario, step)
        trainable = ctx.trainable_at(step)
        switched_off = any(not tech.requires_grad.get(p, True) for p in trainable)
        # a loss cut off because trainable parameters were switched off is trainable-trains' finding
        if tech.loss_without_grad and not ref.loss_without_grad and not switched_off:
            return Violation(GRADIENT_FLOWS, f"the loss has no gradient at step {step}: the technique cut "
                             "every path from the input and the trainable parameters to the loss", step)
        for micro, (tg, rg) in enumerate(zip(tech.input_grads, ref.input_grads)):
            # each input on its own: a model with two inputs (a siamese pair) can starve one of them
            for which, (t, r) in enumerate(zip(_per_input(tg, ctx.reference.input_sizes),
                                               _per_input(rg, ctx.reference.input_sizes))):
                if not _nonzero(t) and ctx.reference_nonzero(r):  # the technique's side first: usually it settles it
                    got = "no gradient" if t is None else "an all-zero gradient"
                    name = "input" if len(ctx.reference.input_sizes) < 2 else f"input {which}"
                    return Violation(GRADIENT_FLOWS, f"{name} got {got} at step {step}, micro-batch {micro}; "
                                     f"the reference's max |grad| is {_fmt(r.abs().max())}", step)
        for path in trainable:
            module = path.rpartition(".")[0]
            # nested parameters (mha.out_proj.weight) belong to the call site that owns them
            if not any(module == u or module.startswith(u + ".") for u in upstream) \
                    or not tech.requires_grad.get(path, True):
                continue  # a parameter the technique switched off is trainable-trains' business
            rg, tg = ref.grads.get(path), tech.grads.get(path)
            if not _nonzero(tg) and ctx.reference_nonzero(rg):  # the technique's side first: usually it settles it
                got = "no gradient" if tg is None else "an all-zero gradient"
                return Violation(GRADIENT_FLOWS, f"{_name(ctx, path)} (upstream of an isolated call site) got "
                                 f"{got} at step {step}; the reference's max |grad| is {_fmt(rg.abs().max())}", step)
    return None


def _per_input(grad: torch.Tensor | None, sizes: tuple[int, ...]) -> list[torch.Tensor | None]:
    """An input gradient (the inputs' laid end to end) split back into one per input."""
    if len(sizes) < 2:
        return [grad]
    if grad is None:
        return [None] * len(sizes)
    if grad.numel() != sum(sizes):  # another layout than the reference's: judged as one
        return [grad]
    return list(grad.reshape(-1).split(list(sizes)))


def frozen_unchanged(ctx: Context) -> Violation | None:
    """Every entry frozen during a step keeps the value it had before the step (with a freeze schedule,
    what is frozen changes at step boundaries; without one, before every step is the initial value)."""
    scenario, trace = ctx.scenario, ctx.technique
    context = recipe_context(scenario.optimizer)
    elements = list(ctx.element_masks.items())
    before, buffers_before = dict(trace.initial_params), dict(trace.initial_buffers)
    for step, record in enumerate(trace.steps, start=1):
        intent = scenario.intent_at(step)
        frozen = ctx.frozen_at(intent)
        frozen_params = [(p, None) for p in trace.initial_params if p in frozen] + elements
        for path, mask in frozen_params:
            if path not in record.params:
                continue
            hit = _first_difference(record.params[path], before[path], mask)
            if hit:
                idx, after, was = hit
                return Violation(FROZEN_UNCHANGED, f"{_name(ctx, path)}{_index(idx)} moved "
                                 f"{_moved(was, after)} at step {step} ({context})", step)
        for path in (b for b in trace.initial_buffers if intent.is_frozen_param(b)):
            hit = _first_difference(record.buffers[path], buffers_before[path])
            if hit:
                idx, after, was = hit
                return Violation(FROZEN_UNCHANGED, f"buffer {path}{_index(idx)} changed {_moved(was, after)} "
                                 f"at step {step} (the frozen module ran in training mode, or its forward changes "
                                 "the buffer in eval mode too, which the reference does not let it)", step)
        before.update(record.params)
        buffers_before.update(record.buffers)
    return None


#: trainable-trains names the first parameter failing a step whose reference gradient or move is at
#: least this share of the strongest one's: one a million times weaker is rounding, not the evidence
EVIDENCE_SHARE = 1e-6


def trainable_trains(ctx: Context) -> Violation | None:
    tech, ref = ctx.technique, ctx.reference
    trainable = ctx.trainable
    for path in trainable:
        if path in tech.unreachable:
            return Violation(TRAINABLE_TRAINS, f"{path} is no longer a parameter of the model or the optimizer "
                             "after setup: nothing can train it")
    prev_t, prev_r = dict(tech.initial_params), dict(ref.initial_params)
    for step, (ts, rs) in enumerate(zip(tech.steps, ref.steps), start=1):
        # every parameter that fails this step, in order, then the first named whose reference evidence
        # (its gradient, or its move) is not rounding next to the others' (a bias before a BatchNorm,
        # moved one ulp by the reference); a NaN is as strong as it gets
        failing: list[tuple[float, Violation]] = []
        for path in ctx.trainable_at(step):
            free = ctx.free_masks.get(path)  # only the entries that train count
            rg, tg = rs.grads.get(path), ts.grads.get(path)
            if not _nonzero(tg, free) and ctx.reference_nonzero(rg, free):
                got = "no gradient" if tg is None else "an all-zero gradient"
                flag = "" if ts.requires_grad.get(path, True) else " (requires_grad=False)"
                failing.append((_strongest(rg), Violation(
                    TRAINABLE_TRAINS, f"{_name(ctx, path)} got {got}{flag} at step {step}, but it trains in the "
                    f"reference (max |grad| {_fmt(rg.abs().max())})", step)))
                continue
            if path not in ts.params:
                continue
            if ctx.rounding:
                # an entry whose gradient was zero up to rounding in both runs so far has no step of
                # its own: an adaptive optimizer turns rounding noise into a move (RMSprop: 1e-13 -> 4e-9)
                aimless = _aimless(tech, ref, path, step, ctx.rounding)
                if aimless is not None:
                    free = ~aimless.to(rs.params[path].device) if free is None else free & ~aimless.to(free.device)
            if _differ(ts.params[path], prev_t[path], free) is None \
                    and ctx.reference_moved(rs.params[path], prev_r[path], free):
                idx, after, before = _first_difference(rs.params[path], prev_r[path], free)
                failing.append((_strongest(rs.params[path].double() - prev_r[path].double(), free), Violation(
                    TRAINABLE_TRAINS, f"{_name(ctx, path)} never moved at step {step}; the reference moved "
                    f"{path}{_index(idx)} {_moved(before, after)} ({recipe_context(ctx.scenario.optimizer)})", step)))
        if failing:
            strongest = max(evidence for evidence, _ in failing)
            return next(v for evidence, v in failing if evidence >= strongest * EVIDENCE_SHARE)
        prev_t = {**prev_t, **ts.params}
        prev_r = {**prev_r, **rs.params}
    return None


def first_mismatch(actual: torch.Tensor, expected: torch.Tensor, tolerance: dict) -> str | None:
    """None when ``assert_close`` accepts the pair; otherwise where and by how much it does not:
    the worst *mismatched* entry (largest gap in tolerance units) and how many entries mismatch."""
    try:
        torch.testing.assert_close(actual, expected, **tolerance, equal_nan=True)
        return None
    except AssertionError:
        pass
    if actual.shape != expected.shape:
        return f" has shape {tuple(actual.shape)}, reference {tuple(expected.shape)}"
    a64, e64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~torch.isclose(a64, e64, **tolerance, equal_nan=True)
    if not bool(bad.any()):  # equal values, but another dtype or device than the reference's
        return f" is {actual.dtype} on {actual.device}, reference {expected.dtype} on {expected.device}"
    gap = ((a64 - e64).abs() / (tolerance["atol"] + tolerance["rtol"] * e64.abs())).nan_to_num(float("inf"))
    worst = int(torch.where(bad, gap, torch.full_like(gap, -1.0)).reshape(-1).argmax()) if gap.numel() else 0
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), gap.shape)) if gap.dim() else ()
    a, e = float(a64[idx]), float(e64[idx])
    count = int(bad.sum())
    of = f"; {count} of {bad.numel()} entries differ" if bad.numel() > 1 else ""
    return f"{_index(idx)} is {_fmt(a)}, reference {_fmt(e)} (|diff| {_fmt(abs(a - e))}{of})"


def _aimless(a: Trace, b: Trace, key: str, step: int, atol: float) -> torch.Tensor | None:
    """Entries of parameter ``key`` whose gradient stayed within ``atol`` of zero in both traces
    through ``step``; None when there are none."""
    mask = None
    for ra, rb in zip(a.steps[:step], b.steps[:step]):
        ga, gb = ra.grads.get(key), rb.grads.get(key)
        near = None
        for g in (ga, gb):
            if g is not None:
                small = g.abs() <= atol
                near = small if near is None else near & small
        if near is None:
            continue  # no gradient on either device this step: nothing moved it by a gradient
        mask = near if mask is None else mask & near
    return mask if mask is not None and bool(mask.any()) else None


def _compared(ctx: Context, actual: Trace, expected: Trace) -> Iterator[tuple[int, str, object, torch.Tensor,
                                                                          torch.Tensor]]:
    """(step, kind, key, actual, expected) for everything two traces must agree on, in report order:
    per step the losses, the input gradients, then the trainable parameters."""
    for step, (a, e) in enumerate(zip(actual.steps, expected.steps), start=1):
        for micro, (la, le) in enumerate(zip(a.losses, e.losses)):
            yield step, "loss", micro, la, le
        for micro, (ga, ge) in enumerate(zip(a.input_grads, e.input_grads)):
            # a missing gradient is numerically a zero one; "must be non-zero" is gradient-flows' rule
            if ga is None and ge is not None:
                ga = torch.zeros_like(ge)
            elif ge is None and ga is not None:
                ge = torch.zeros_like(ga)
            if ga is not None:
                yield step, "input", micro, ga, ge
        for path in ctx.trainable:
            if path in a.params and path in e.params:
                frozen = ctx.element_masks.get(path)
                pa, pe = a.params[path], e.params[path]
                if frozen is not None:  # frozen entries are frozen-unchanged's business
                    frozen = frozen.to(pa.device)  # the masks live with the reference (a CUDA one, say)
                    pa, pe = pa.masked_fill(frozen, 0), pe.masked_fill(frozen, 0)
                yield step, "param", path, pa, pe


def _flatten(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every pair laid end to end as two vectors; None when shapes, dtypes or devices differ anywhere."""
    if not pairs:
        return None
    first = pairs[0][0]
    if any(a.shape != e.shape or a.dtype != first.dtype or e.dtype != first.dtype or a.device != first.device
           or e.device != first.device for a, e in pairs):
        return None
    return torch.cat([a.reshape(-1) for a, _ in pairs]), torch.cat([e.reshape(-1) for _, e in pairs])


def mismatch(ctx: Context, step: int, kind: str, key, diff: str, invariant: str, what: str) -> Violation:
    if kind == "loss":
        return Violation(invariant, f"loss at step {step}, micro-batch {key}{diff}; {what}", step)
    if kind == "input":
        return Violation(invariant, f"input gradient at step {step}, micro-batch {key}: grad{diff}; {what}", step)
    context = recipe_context(ctx.scenario.optimizer)
    return Violation(invariant, f"{_name(ctx, key)}{diff} after step {step} ({context}); {what}", step)


def compare_traces(ctx: Context, entries: list, tolerance: dict, invariant: str, what: str,
                   flat: tuple[torch.Tensor, torch.Tensor] | None = None) -> Violation | None:
    """The first entry (see ``_compared``) where two traces disagree beyond ``tolerance``.

    ``assert_close``'s verdict on everything at once first (one ``isclose`` over ``flat``, the
    entries laid end to end); the entry-by-entry walk only runs to name a mismatch.
    """
    if not entries or all_close(flat, tolerance):
        return None
    for step, kind, key, a, e in entries:
        diff = first_mismatch(a, e, tolerance)
        if diff:
            return mismatch(ctx, step, kind, key, diff, invariant, what)
    return None


def all_close(flat: tuple[torch.Tensor, torch.Tensor] | None, tolerance: dict) -> bool:
    """``assert_close``'s verdict on entries laid end to end (``_flatten``), in one ``isclose``;
    False when there is no such layout, so the caller walks the entries one by one."""
    return flat is not None and bool(torch.isclose(*flat, **tolerance, equal_nan=True).all())


def divergence(ctx: Context) -> float:
    """How far the technique's run is from the reference's, in units of the match tolerance,
    over everything ``matches-reference`` compares.

    Not an invariant: the search maximises it with ``hypothesis.target`` so near-misses
    (a clipping factor slightly off, a drift just under tolerance) grow into violations.
    :func:`divergence_by_step` gives it step by step.
    """
    gap, _ = _gaps(ctx)
    return float(gap.max()) if gap is not None and gap.numel() else 0.0


def divergence_by_step(ctx: Context) -> list[float]:
    """:func:`divergence` of each training step alone (its losses, input gradients and trainable
    parameters after it), one value per step both runs recorded; empty for a crashed run.

    Its running maximum at the last step is the whole run's :func:`divergence`: the reports plot
    this, the search steers by that.
    """
    gap, entries = _gaps(ctx)
    if gap is None:
        return []
    sizes = [0] * min(len(ctx.technique.steps), len(ctx.reference.steps))
    for step, _, _, a, _ in entries:  # the entries come step by step: each step is one stretch of ``gap``
        sizes[step - 1] += a.numel()
    zero = gap.new_zeros(())  # a step with nothing compared in it is no distance at all
    return torch.stack([part.max() if part.numel() else zero for part in gap.split(sizes)]).tolist()


def _gaps(ctx: Context) -> tuple[torch.Tensor | None, list]:
    """Every compared entry's gap from the reference in tolerance units (a NaN as 1e6), laid end to
    end, and the entries they come from (``_compared``'s). (None, []) for a crashed run or when
    nothing lines up."""
    if ctx.technique.crash:
        return None, []
    entries = ctx.against_reference
    flat = ctx.flat_against_reference
    if flat is None:  # another layout somewhere (a dtype or shape the technique changed): the pairs that line up
        entries = [(step, kind, key, a.double(), e.double()) for step, kind, key, a, e in entries
                   if a.shape == e.shape]
        flat = _flatten([(a, e) for *_, a, e in entries])
    if flat is None:
        return None, []
    tol = MATCH_TOLERANCE[_dtype(ctx)]
    x, y = flat[0].double(), flat[1].double()
    gap = ((x - y).abs() / (tol["atol"] + tol["rtol"] * y.abs())).nan_to_num(1e6)  # a NaN is as far as it gets
    return gap, entries


NOT_LIKE_REFERENCE = "the technique does not train like the reference"


def matches_reference(ctx: Context) -> Violation | None:
    return compare_traces(ctx, ctx.against_reference, MATCH_TOLERANCE[_dtype(ctx)], MATCHES_REFERENCE,
                          NOT_LIKE_REFERENCE, ctx.flat_against_reference)


PARITY_WHAT = "{device} disagrees with cpu"


def device_parity(ctx: Context) -> Violation | None:
    if ctx.other_device is None or not ctx.technique.steps:
        return None
    entries = ctx.against_other_device
    return compare_traces(ctx, entries, PARITY_TOLERANCE[_dtype(ctx)], DEVICE_PARITY,
                          PARITY_WHAT.format(device=ctx.technique.device), _flatten([(a, e) for *_, a, e in entries]))


CHECKS: dict[str, Callable[[Context], Violation | None]] = {
    NO_CRASH: no_crash,
    TIMEOUT: timeout,
    STATE_RESTORED: state_restored,
    GRADIENT_FLOWS: gradient_flows,
    FROZEN_UNCHANGED: frozen_unchanged,
    TRAINABLE_TRAINS: trainable_trains,
    MATCHES_REFERENCE: matches_reference,
    DEVICE_PARITY: device_parity,
}


def evaluate(ctx: Context) -> list[Violation]:
    """All violations, one per invariant at most, in :data:`INVARIANTS` order.

    A crashed or stopped run is judged on ``no-crash``, ``timeout`` and ``state-restored`` only: its
    trace is cut short.
    """
    ids = (NO_CRASH, TIMEOUT, STATE_RESTORED) if ctx.technique.crash else INVARIANTS
    return [v for v in (CHECKS[i](ctx) for i in ids) if v is not None]
