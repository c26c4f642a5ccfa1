"""Where tensors live: checking a requested torch device, and refusing tensors that sit on another one.

MSL keeps every tensor of a fit on one device (``fit(..., device=...)`` or :meth:`mixlogit.data.ChoiceData.to`).
A device that does not exist here is refused before any work, naming it and the devices that do exist; data on
one device fitted on another are refused rather than copied behind the user's back.
"""

from __future__ import annotations

import torch


def available_devices() -> list[str]:
    """The devices tensors can be put on here, e.g. ``["cpu"]`` or ``["cpu", "cuda:0", "cuda:1"]``."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_device(device, name: str = "device") -> torch.device:
    """``device`` (a string such as ``"cuda"``, ``"cuda:1"``, ``"cpu"``, or a :class:`torch.device`) as a
    torch.device that exists here; otherwise a ValueError naming the argument, the device and what is available.

    ``"meta"`` (shapes without data) is accepted: it exists everywhere, and moving data there is how a test on a
    CPU-only machine checks that a fit refuses data on another device than its own.
    """
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError:
            dev = None
        if dev is None:
            raise ValueError(f"{name}={device!r} is not a device name; available here: "
                             f"{', '.join(available_devices())}")
    else:
        raise TypeError(f"{name} must be a device name such as 'cpu' or 'cuda', got {type(device).__name__} "
                        f"{device!r}")
    if dev.type in ("cpu", "meta"):
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count and (dev.index is None or dev.index < count):
            return dev
        why = ("torch.cuda.is_available() is False" if not count else
               f"this machine has {count} CUDA device{'s' if count > 1 else ''}")
    elif dev.type == "mps" and "mps" in available_devices():
        return dev
    else:
        why = f"this torch build has no {dev.type!r} device in use"
    raise ValueError(f"{name}={device!r} is not available ({why}); available here: {', '.join(available_devices())}")


def same_device(device: torch.device, a: torch.device) -> bool:
    """Whether tensors on ``a`` are on ``device`` (``cuda`` and ``cuda:0`` are the same device)."""
    if device.type != a.type:
        return False
    if device.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (device.index if device.index is not None else current) == (a.index if a.index is not None else current)


def require_device(device: torch.device, found: torch.device, what: str, fix: str) -> None:
    """Refuse ``what`` on ``found`` for work on ``device``: a ValueError naming both devices and ``fix``."""
    if not same_device(device, found):
        raise ValueError(f"{what} are on device {str(found)!r}, but the fit runs on {str(device)!r}: {fix}")
