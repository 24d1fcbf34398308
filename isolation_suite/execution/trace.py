"""What a run records and where it stands: the :class:`Trace`, a :class:`Crash`, the loop's phases,
and the signals a run reacts to. Every part of the execution package reads these; this module
imports none of them."""
from __future__ import annotations

import signal
import struct
import threading
import traceback
from dataclasses import dataclass, field

import torch


class ExampleTimeout(BaseException):
    """Raised in-process by the timeout alarm; a BaseException so technique code is unlikely to swallow it."""


@dataclass
class Crash:
    step: int  # 0 = setup
    phase: str
    error: str  # "TypeName: first line"
    detail: str  # the formatted traceback, for reports
    timed_out: bool = False  # the run was stopped by the per-example timeout


@dataclass
class StepRecord:
    losses: list[torch.Tensor] = field(default_factory=list)
    input_grads: list[torch.Tensor | None] = field(default_factory=list)
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    loss_without_grad: bool = False


@dataclass
class Trace:
    """Everything one run recorded, keyed by the *original* parameter and buffer paths."""

    device: str
    initial_params: dict[str, torch.Tensor] = field(default_factory=dict)
    initial_buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)  # params the technique made unreadable
    crash: Crash | None = None
    state_leaks: list[tuple[int, str]] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # original path -> the technique's own name
    #: how many entries of each floating-point input an input gradient holds (laid end to end)
    input_sizes: tuple[int, ...] = ()

    def to(self, device: str) -> "Trace":
        def move(x):
            if isinstance(x, torch.Tensor):
                return x.detach().to(device)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            if isinstance(x, list):
                return [move(v) for v in x]
            return x
        out = Trace(device, move(self.initial_params), move(self.initial_buffers), [], list(self.unreachable),
                    self.crash, list(self.state_leaks), dict(self.aliases), self.input_sizes)
        for s in self.steps:
            out.steps.append(StepRecord(move(s.losses), move(s.input_grads), move(s.grads), move(s.params),
                                        move(s.buffers), dict(s.requires_grad), s.loss_without_grad))
        return out


#: the parts of the loop where the technique's code runs, in order
PHASES = ("setup", "wrap", "make_optimizer", "compile", "on_intent_change", "train", "zero_grad", "forward",
          "backward", "clip", "optimizer.step", "after_step", "record")
_PHASE_INDEX = {name: i for i, name in enumerate(PHASES)}
#: what a run mirrors into a shared buffer: step, phase index (-1: the harness's own code)
PROGRESS = struct.Struct("ii")


class Phase:
    """Which part of the loop is running. The technique is in charge only while ``name`` is set:
    an exception then is the technique's crash; anywhere else it is the harness's own error.
    With ``progress`` (a buffer shared with the parent process) every change is mirrored there,
    so a run that dies or hangs can still be placed."""

    __slots__ = ("step", "name", "progress")

    def __init__(self, progress=None) -> None:
        self.step, self.name, self.progress = 0, None, progress

    def enter(self, step: int, name: str) -> None:
        self.step, self.name = step, name
        if self.progress is not None:
            PROGRESS.pack_into(self.progress, 0, step, _PHASE_INDEX[name])

    def leave(self) -> None:
        self.name = None
        if self.progress is not None:
            PROGRESS.pack_into(self.progress, 0, self.step, -1)

    def crash(self, exc: BaseException, timeout: float | None = None) -> Crash:
        if isinstance(exc, ExampleTimeout):
            error = f"the run took longer than {timeout:g}s and was stopped"
            return Crash(self.step, self.name, error, error, timed_out=True)
        first = (str(exc).strip().splitlines() or [""])[0]
        return Crash(self.step, self.name, f"{type(exc).__name__}: {first}", "".join(traceback.format_exception(exc)))



_USER_INTERRUPT = threading.Event()


def _on_sigint(signum, frame):
    _USER_INTERRUPT.set()
    raise KeyboardInterrupt


def watch_user_interrupts() -> None:
    """Note a real SIGINT before raising KeyboardInterrupt (main thread, default handler only)."""
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def user_interrupted() -> bool:
    return _USER_INTERRUPT.is_set()
