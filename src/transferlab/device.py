"""One device policy for every stage: which torch device, mixed precision, DataLoader settings.

``compute.device`` in params.yaml is ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or
``mps``. ``auto`` takes CUDA, then MPS, then the CPU; naming a device that is
not there is an error (:class:`DeviceError`), never a silent fall back to the
CPU, so a run never takes ten times longer than its author expected without
saying so.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from transferlab.config import DEVICE_FORMS, DEVICE_PATTERN
from transferlab.errors import UserError

DEFAULT_KEY = "compute.device"


class DeviceError(UserError, ValueError):
    """The requested torch device is not a valid setting, or not available on this machine."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available() -> list[str]:
    """The devices this machine offers, as ``compute.device`` spells them: ``cpu``, ``cuda:0``, ..., ``mps``."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *cuda, *(["mps"] if _mps_available() else [])]


def _cuda_missing() -> str:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    return "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES?)"


def resolve_device(setting: str, key: str = DEFAULT_KEY) -> torch.device:
    """The torch device for ``setting`` (``auto | cpu | cuda | cuda:N | mps``).

    ``auto`` picks CUDA, then MPS, then the CPU. Raises DeviceError, one line
    naming ``key``, the setting and the devices available, for a malformed
    setting or a device this machine does not have.
    """
    if not isinstance(setting, str) or not DEVICE_PATTERN.fullmatch(setting):
        raise DeviceError(f"{key}: got {setting!r}; allowed: {DEVICE_FORMS}")
    where = f"{key} is {setting!r}, but"
    offers = f"available: {', '.join(available())}"
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "mps":
        if not _mps_available():
            raise DeviceError(f"{where} MPS is not available (Apple silicon, macOS 12.3+); {offers}")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(f"{where} {_cuda_missing()}; {offers}")
    if setting == "cuda":
        return torch.device("cuda")
    index = int(setting.split(":", 1)[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"{where} this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; {offers}")
    return torch.device("cuda", index)


def _as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision dtype :func:`autocast` uses on ``device``; None where it is a no-op.

    bfloat16 where the GPU computes it natively (Ampere and later: the range
    of float32, no overflow), float16 on older GPUs.
    """
    device = _as_device(device)
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3 has no including_emulation, and counts only native support
            native = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """Mixed precision for inference on CUDA (``torch.autocast``); a no-op on CPU and MPS.

    Outputs of autocast regions may be half precision: cast to float before
    NumPy, losses or metrics.
    """
    dtype = autocast_dtype(device) if enabled else None
    if dtype is None:
        yield
        return
    with torch.autocast(device_type="cuda", dtype=dtype):
        yield


def loader_kwargs(device: torch.device | str, num_workers: int) -> dict[str, Any]:
    """DataLoader keyword arguments for ``device``: pinned memory only on CUDA, kept workers when any."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return {
        "num_workers": num_workers,
        # page-locked host memory speeds host-to-GPU copies; elsewhere it only costs RAM
        "pin_memory": _as_device(device).type == "cuda",
        # workers (and their imports) outlive an epoch instead of restarting for each one
        "persistent_workers": num_workers > 0,
    }
