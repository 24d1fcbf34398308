"""The one judging path: a technique on one scenario, on one device -> a :class:`Verdict`.

``judge`` runs the technique and the reference, on CUDA also the technique on the CPU
(``device-parity``), evaluates every invariant and confirms a float32 ``matches-reference``
mismatch on the scenario's float64 twin. ``iso.check``, the Hypothesis search, the pytest
plug-in, the repro scripts and the benchmarks all call it. Nothing here imports Hypothesis,
so a repro script can embed this module and need nothing but torch.
"""
from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass

import torch

from isolation_suite.execution import devices as devices_mod
from isolation_suite.execution import modes
from isolation_suite.judging.invariants import DEVICE_PARITY, MATCH_TOLERANCE, MATCHES_REFERENCE, NOT_LIKE_REFERENCE, PARITY_TOLERANCE, \
    PARITY_WHAT, Context, Violation, all_close, divergence, divergence_by_step, evaluate, first_mismatch, mismatch
from isolation_suite.model.factory import tree_of
from isolation_suite.execution.reference import Reference
from isolation_suite.execution.runner import run
from isolation_suite.execution.trace import Trace
from isolation_suite.execution.sandbox import DEFAULT_TIMEOUT, Sandbox
from isolation_suite.execution.warm import warm_sandbox
from isolation_suite.spec.scenario import Scenario, ScenarioError
from isolation_suite.technique import Technique


@dataclass(frozen=True)
class StepPoint:
    """One training step of a judged scenario, for the reports' plots."""

    loss: float | None  # the technique's loss (summed over micro-batches); None: its run recorded none
    reference_loss: float | None
    divergence: float | None  # ``divergence_by_step``: this step's distance in tolerance units; None: not judged


@dataclass(frozen=True)
class Verdict:
    """The result of judging one technique on one scenario on one device."""

    technique: str
    scenario: Scenario
    device: str
    violations: tuple[Violation, ...] = ()
    divergence: float = 0.0  # distance from the reference in tolerance units (steers the search)
    #: per step of a verdict with violations: both losses and the divergence (its maximum is ``divergence``);
    #: empty for a verdict without (nothing to show)
    steps: tuple[StepPoint, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def first(self) -> Violation | None:
        return self.violations[0] if self.violations else None

    @property
    def invariants(self) -> tuple[str, ...]:
        return tuple(v.invariant for v in self.violations)

    def __str__(self) -> str:
        if self.ok:
            return f"{self.technique} on {self.device}: ok"
        return f"{self.technique} on {self.device}:\n" + "\n".join(f"  {v}" for v in self.violations)


_REFERENCE_CACHE: "collections.OrderedDict[tuple[Scenario, str], Trace]" = collections.OrderedDict()
_REFERENCE_CACHE_SIZE = 64


def reference_trace(scenario: Scenario, device: str = "cpu") -> Trace:
    """The reference's trace, cached: several techniques are often judged on one scenario (and one
    eager reference serves every mode that the reference does not share)."""
    scenario = dataclasses.replace(scenario, mode=modes.for_reference(scenario.mode))
    key = (scenario, device)
    if key in _REFERENCE_CACHE:
        _REFERENCE_CACHE.move_to_end(key)
        return _REFERENCE_CACHE[key]
    trace = run(scenario, Reference(), device)
    _REFERENCE_CACHE[key] = trace
    if len(_REFERENCE_CACHE) > _REFERENCE_CACHE_SIZE:
        _REFERENCE_CACHE.popitem(last=False)
    return trace


def clear_reference_cache() -> None:
    """Forget every cached reference trace (benchmarks time a check that pays for its reference)."""
    _REFERENCE_CACHE.clear()


def as_technique(technique: Technique | type[Technique]) -> Technique:
    if isinstance(technique, type) and issubclass(technique, Technique):
        return technique()
    if isinstance(technique, Technique):
        return technique
    raise TypeError(f"expected an isolation_suite.Technique instance or subclass, got {technique!r}")


class SharedReference:
    """The reference's traces for one scenario on one device, each computed at most once and
    only in this (the judging) process: a sweep judges every technique of a scenario against
    the same ones. The float64 twin's trace is computed the first time a technique's float32
    mismatch needs confirming, and then serves every other technique too. Technique code never
    receives these traces: it runs on a model of its own, in its sandbox."""

    def __init__(self, scenario: Scenario, device: str = "cpu"):
        self.scenario, self.device = scenario, devices_mod.normalize(device)
        self._trace: Trace | None = None
        self._twin: Trace | None = None

    @property
    def computed(self) -> bool:
        """Whether the reference's trace was computed already."""
        return self._trace is not None

    @property
    def twin_computed(self) -> bool:
        return self._twin is not None

    @property
    def trace(self) -> Trace:
        if self._trace is None:
            self._trace = _reference(self.scenario, self.device)
        return self._trace

    @property
    def twin(self) -> Trace:
        if self._twin is None:
            self._twin = reference_trace(dataclasses.replace(self.scenario, dtype="float64"), self.device)
        return self._twin


def judge(technique: Technique | type[Technique], scenario: Scenario, device: str = "cpu", *,
          sandbox: Sandbox | None = None, timeout: float | None = DEFAULT_TIMEOUT,
          reference: SharedReference | None = None) -> Verdict:
    """Run ``technique`` and the reference on ``scenario`` and judge every invariant.

    The technique's runs happen in ``sandbox`` (a child process that a search keeps for all its
    examples; by default the technique's warm child, which its next call reuses), each stopped after ``timeout`` seconds. On a
    CUDA device the technique also runs on the CPU, for ``device-parity`` (not for a user's model
    with active dropout: the two devices' generators draw different masks). A float32
    ``matches-reference`` mismatch counts only where the float64 twin confirms it. ``reference``
    (for this scenario and device) shares the reference's traces between several techniques.
    """
    technique = as_technique(technique)
    device = devices_mod.normalize(device)
    if device.startswith("cuda"):
        devices_mod.deterministic_cuda()
    if sandbox is None:  # iso.check: the technique's warm child serves it (see execution.warm)
        return judge(technique, scenario, device, sandbox=warm_sandbox(technique, timeout), reference=reference)
    if sandbox.technique is not technique:
        raise ValueError("the sandbox runs another technique than the one being judged")
    if reference is None:
        reference = SharedReference(scenario, device)
    elif (reference.scenario is not scenario and reference.scenario != scenario) or reference.device != device:
        raise ValueError("the shared reference is another scenario's or another device's")
    if not reference.computed:  # the technique's child runs while this process computes the reference
        sandbox.prefetch([scenario], device)
    # a scenario the reference cannot run is no scenario to judge (its technique run, sent ahead, is
    # dropped by the sandbox's next request: ``Sandbox.drop_ahead``)
    expected = reference.trace
    trace = sandbox.run(scenario, device)
    other = sandbox.run(scenario, "cpu") if device.startswith("cuda") and trace.crash is None \
        and not tree_of(scenario).device_random else None
    ctx = Context(scenario, trace, expected, other)
    violations = [_confirmed(v, ctx, sandbox, device, reference) for v in evaluate(ctx)]
    violations = tuple(v for v in violations if v is not None)
    # the step-by-step view is for reports of counterexamples: an example that holds does not pay for it
    steps = step_points(trace, expected, divergence_by_step(ctx)) if violations else ()
    return Verdict(technique.name, scenario, device, violations, divergence(ctx), steps)


def step_losses(trace: Trace) -> list[float | None]:
    """Each recorded step's loss, summed over its micro-batches (each is already divided by their count)."""
    sums = [torch.stack([x.detach().double().sum() for x in s.losses]).sum() if s.losses else None
            for s in trace.steps]
    known = [x for x in sums if x is not None]
    values = iter(torch.stack(known).cpu().tolist() if known else [])  # one device sync, not one per step
    return [None if x is None else next(values) for x in sums]


def step_points(trace: Trace, reference: Trace, by_step: list[float]) -> tuple[StepPoint, ...]:
    """Per step of the reference's run: the technique's loss (None past its crash), the reference's,
    and that step's divergence (``by_step``, None where it was not judged)."""
    mine, theirs = step_losses(trace), step_losses(reference)
    steps = max(len(mine), len(theirs))

    def at(values: list, i: int):
        return values[i] if i < len(values) else None
    return tuple(StepPoint(at(mine, i), at(theirs, i), at(by_step, i)) for i in range(steps))


def _reference(scenario: Scenario, device: str) -> Trace:
    """The reference's trace; a scenario the reference itself cannot run (shapes that do not chain)
    is not one to judge a technique on."""
    try:
        return reference_trace(scenario, device)
    except ScenarioError:
        raise
    except (RuntimeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ScenarioError(f"the scenario's model does not run: {type(exc).__name__}: {first}") from None


def _confirmed(violation: Violation, ctx: Context, sandbox: Sandbox, device: str,
               reference: SharedReference) -> Violation | None:
    """A float32 ``matches-reference`` or ``device-parity`` mismatch, judged again beside the
    scenario's float64 twin.

    Two mathematically equal computations can round differently (another kernel path, another
    device), and adaptive optimizers amplify rounding noise on near-zero gradients
    (``g / (sqrt(v) + eps)``) up to ``lr``-sized steps. The twin has the same weights, data and
    dropout masks, upcast: a semantic difference shows there at the same step and place, rounding
    noise does not. None when nothing is left of the mismatch.
    """
    scenario = ctx.scenario
    if violation.invariant not in (MATCHES_REFERENCE, DEVICE_PARITY) or scenario.dtype != "float32":
        return violation
    twin = dataclasses.replace(scenario, dtype="float64")
    if not reference.twin_computed:  # the technique's twin runs while this process computes the reference's
        sandbox.prefetch([twin], device, keep=True)
    reference.twin
    trace = sandbox.run(twin, device)
    other = sandbox.run(twin, "cpu") if violation.invariant == DEVICE_PARITY else None
    twin_ctx = Context(twin, trace, reference.twin, other)
    if trace.crash is not None or (other is not None and other.crash is not None):
        return violation
    return confirmed_on_twin(ctx, twin_ctx, violation.invariant)


def confirmed_on_twin(ctx: Context, twin: Context, invariant: str = MATCHES_REFERENCE) -> Violation | None:
    """``invariant`` (``matches-reference`` or ``device-parity``) for a float32 run ``ctx``, kept
    only where its float64 ``twin`` agrees.

    A float32 mismatch is a violation only where the twin disagrees too, at the same step and
    in the same place, by a gap of about the same size (``SAME_SIZE``). Rounding noise does not
    pass that test: a mathematically zero gradient
    (an attention key bias) is pure noise in both precisions, and an adaptive optimizer turns
    that noise into ``lr``-sized steps, but the float64 noise needs more steps to get there.
    A parameter caught drifting on noise is set aside for the rest of the run; a real
    difference elsewhere is still reported.
    """
    if invariant == DEVICE_PARITY:
        tables, what = PARITY_TOLERANCE, PARITY_WHAT.format(device=ctx.technique.device)
        mine, theirs, flat = ctx.against_other_device, twin.against_other_device, None
    else:
        tables, what = MATCH_TOLERANCE, NOT_LIKE_REFERENCE
        mine, theirs, flat = ctx.against_reference, twin.against_reference, ctx.flat_against_reference
    tol32, tol64 = tables[torch.float32], tables[torch.float64]
    if flat is not None and all_close(flat, tol32):
        return None
    in_twin = {(step, kind, key): (a, e) for step, kind, key, a, e in theirs}
    noise: set = set()  # parameters whose float32 drift is rounding noise
    for step, kind, key, a, e in mine:
        if (kind == "param" and key in noise) or not (diff := first_mismatch(a, e, tol32)):
            continue
        pair = in_twin.get((step, kind, key))
        if pair is None or pair[0].shape != pair[1].shape or (
                first_mismatch(*pair, tol64) and _gap(*pair) >= SAME_SIZE * _gap(a, e)):
            return mismatch(ctx, step, kind, key, diff, invariant, what)
        if kind == "param":
            noise.add(key)
    return None


#: a float64 gap at least this share of the float32 one is "the same size": a semantic difference.
#: Rounding noise shrinks by orders of magnitude with the precision, even after an adaptive
#: optimizer has amplified it (found on an H100: a one-element LayerNorm's zero gradient is
#: 9e-7 on the CPU in float32 and 3e-14 in float64, exactly 0 on CUDA; Adam's first step turns
#: them into gaps of 0.099 and 3.4e-8).
SAME_SIZE = 0.1


def _gap(a: torch.Tensor, e: torch.Tensor) -> float:
    """The largest absolute difference between two traces' entries (NaN counts as infinite)."""
    return float((a.detach().double().cpu() - e.detach().double().cpu()).abs().nan_to_num(float("inf")).max()) \
        if a.numel() else 0.0


__all__ = ["Verdict", "StepPoint", "step_points", "step_losses", "judge", "SharedReference", "reference_trace",
           "clear_reference_cache", "as_technique", "confirmed_on_twin"]
