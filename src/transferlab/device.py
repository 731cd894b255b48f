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

from transferlab.cores import usable_cores

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


def _cpu_computes_bfloat16() -> bool:
    # torch reports the CPU's native bfloat16 units (AVX512-BF16, AMX) only through these private
    # probes; without them bfloat16 is emulated on the CPU, and slower than float32.
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


def autocast_dtype(device: torch.device | str, cpu: bool = False) -> torch.dtype | None:
    """The mixed-precision dtype :func:`autocast` uses on ``device``; None where it is a no-op.

    bfloat16 where the GPU computes it natively (Ampere and later: the range
    of float32, no overflow), float16 on older GPUs. On the CPU only when
    ``cpu`` is asked for and the CPU computes bfloat16 natively: fine-tuning
    asks (a train step of efficientnet_lite0 ran 1.64x faster on 2 AVX512-BF16
    cores, bench/finetune_epoch.py); the inference stages do not, so cached
    features and predictions on the CPU stay the backbone's float32 forward.
    """
    device = _as_device(device)
    if device.type == "cpu":
        return torch.bfloat16 if cpu and _cpu_computes_bfloat16() else None
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3 has no including_emulation, and counts only native support
            native = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device | str, enabled: bool = True, cpu: bool = False) -> Iterator[None]:
    """Mixed precision (``torch.autocast``) in :func:`autocast_dtype`; a no-op where that is None.

    Outputs of autocast regions may be half precision: cast to float before
    NumPy, losses or metrics.
    """
    dtype = autocast_dtype(device, cpu) if enabled else None
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=_as_device(device).type, dtype=dtype):
        yield


# Images and convolution weights in NHWC ("channels_last") layout: measured on 2 CPU cores
# (bench/extract_throughput.py, bench/finetune_epoch.py) efficientnet_lite0's forward runs 1.76x
# and a fine-tuning epoch 1.37x faster than in the default NCHW; on CUDA it is the layout
# tensor-core convolutions use under autocast. Only 4-D tensors have it; the values never change.
IMAGE_FORMAT = torch.channels_last


def images_to(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A batch on ``device`` for a convolutional network: 4-D image batches in :data:`IMAGE_FORMAT`."""
    if x.dim() == 4:
        return x.to(device, memory_format=IMAGE_FORMAT, non_blocking=True)
    return x.to(device, non_blocking=True)


def conv_net_to(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``module`` on ``device`` with its 4-D weights in :data:`IMAGE_FORMAT` (in place; returned)."""
    return module.to(device, memory_format=IMAGE_FORMAT)


# Decode workers when compute.num_workers is null. On the CPU the forward pass uses every core, and
# one worker decodes a prepared JPEG in a few ms, far ahead of it: a second one only takes cores from
# the forward (2 cores: extract at 0.88 of the backbone's ceiling with 1 worker, 0.76 with 2;
# bench/extract_throughput.py). On a GPU decoding is the bottleneck: all cores but the main one's.
CPU_DECODE_WORKERS = 1
MAX_DECODE_WORKERS = 8  # beyond this the disk and the main process's collation limit, not the decoding


def decode_workers(setting: int | None, device: torch.device | str) -> int:
    """``compute.num_workers`` resolved for ``device``: the setting itself, or the default above when None."""
    if setting is not None:
        return setting
    if _as_device(device).type == "cuda":
        return max(1, min(MAX_DECODE_WORKERS, usable_cores() - 1))
    return CPU_DECODE_WORKERS


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
