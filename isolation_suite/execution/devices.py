"""Device names, availability, and placement of xdist workers on GPUs.

CUDA is never initialised at import time: only functions here touch it.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch


class DeviceError(ValueError):
    """A device name that is malformed or not present on this machine."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


def accelerator_visible() -> bool:
    """A GPU (or another accelerator) is visible: autograd's first backward in a process then starts
    a thread per device, which a child forked after it cannot use (its own backward raises), so the
    judging process runs none before it forks."""
    accelerator = getattr(torch, "accelerator", None)
    try:
        return bool(accelerator.is_available()) if accelerator is not None else cuda_available()
    except Exception:  # noqa: BLE001 - a broken accelerator runtime: as if one were there
        return True


def normalize(device: str | torch.device) -> str:
    """``'cpu'``, ``'cuda'`` or ``'cuda:N'``; raises :class:`DeviceError` naming the bad value."""
    text = str(device).strip().lower()
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type != "cuda":
        raise DeviceError(f"unsupported device {device!r}: isolation-suite runs on cpu and cuda")
    if not cuda_available():
        raise DeviceError(f"device {device!r} requested but CUDA is not available on this machine")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    return text


def resolve(devices: str | Iterable[str] | None) -> list[str]:
    """``None``/``'auto'``: cpu plus cuda when present. A comma list or iterable: each validated."""
    if devices is None or devices == "auto":
        return ["cpu", "cuda"] if cuda_available() else ["cpu"]
    if isinstance(devices, str):
        devices = [d for d in devices.split(",") if d.strip()]
    out = []
    for d in devices:
        if d == "auto":
            out.extend(x for x in resolve("auto") if x not in out)
        else:
            n = normalize(d)
            if n not in out:
                out.append(n)
    if not out:
        raise DeviceError("no device given: use cpu, cuda, cuda:N or auto")
    return out


def worker_index(worker_id: str | None) -> int:
    """``'gw3'`` -> 3; ``None``/``'master'`` -> 0."""
    if not worker_id or not worker_id.startswith("gw"):
        return 0
    return int(worker_id[2:])


def worker_gpu(worker_id: str | None, visible: Sequence[str] | None = None, count: int | None = None) -> str:
    """The GPU a worker uses: worker *i* takes visible GPU *i mod n*.

    ``visible`` is the outer ``CUDA_VISIBLE_DEVICES`` list (ids as strings); the
    returned value is the physical id to put in the worker's own ``CUDA_VISIBLE_DEVICES``.
    """
    if visible is None:
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        if env is not None:
            visible = [v.strip() for v in env.split(",") if v.strip()]
        else:
            visible = [str(i) for i in range(count if count is not None else torch.cuda.device_count())]
    if not visible:
        raise DeviceError("no GPU is visible (CUDA_VISIBLE_DEVICES is empty)")
    return visible[worker_index(worker_id) % len(visible)]


def configure_worker(worker_id: str | None) -> None:
    """One torch thread per xdist worker and, when GPUs exist, one GPU per worker (before CUDA starts)."""
    if worker_id and worker_id.startswith("gw"):
        torch.set_num_threads(1)
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        # device_count() reads NVML and is not cached before CUDA starts, so narrowing is still possible
        if (env is not None and env.strip()) or (env is None and torch.cuda.device_count() > 0):
            os.environ["CUDA_VISIBLE_DEVICES"] = worker_gpu(worker_id)


def deterministic_cuda() -> None:
    """TF32 off, so CUDA float32 matmuls are comparable with the CPU's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
