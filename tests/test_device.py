"""The device policy on whatever machine runs the tests (CPU-only checks skip themselves on a GPU)."""

from __future__ import annotations

import re

import pytest
import torch

from transferlab import config, device
from transferlab.config import ParamsError
from transferlab.device import DeviceError, autocast, loader_kwargs, resolve_device
from transferlab.errors import UserError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
no_accelerator = pytest.mark.skipif(
    torch.cuda.is_available() or device._mps_available(), reason="checks a CPU-only machine"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@no_accelerator
def test_auto_is_the_cpu_without_an_accelerator() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert device.available() == ["cpu"]


def test_cpu_is_always_the_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("setting", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_user_error_naming_setting_and_choices(setting: str) -> None:
    with pytest.raises(UserError) as err:
        resolve_device(setting)
    assert isinstance(err.value, DeviceError)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"compute.device is {setting!r}, but ")
    assert "CUDA" in message and message.endswith("available: cpu" + (", mps" if device._mps_available() else ""))


@pytest.mark.skipif(device._mps_available(), reason="checks a machine without MPS")
def test_mps_without_mps_is_a_user_error() -> None:
    with pytest.raises(DeviceError, match=r"^compute\.device is 'mps', but MPS is not available.*; available: cpu"):
        resolve_device("mps")


@pytest.mark.parametrize("setting", ["gpu", "cuda:", "cuda:-1", "CPU", " cpu", ""])
def test_bad_strings_refused_by_config_and_by_resolve(setting: str) -> None:
    message = rf"^compute\.device: got {re.escape(repr(setting))}; allowed: auto, cpu, cuda, cuda:N, mps$"
    with pytest.raises(ParamsError, match=message):
        config.parse_section(config.ComputeParams, {"device": setting}, "compute")
    with pytest.raises(DeviceError, match=message):
        resolve_device(setting)


def test_the_key_named_in_messages_can_be_changed() -> None:
    with pytest.raises(DeviceError, match=r"^--device: got 'gpu'"):
        resolve_device("gpu", key="--device")


def test_autocast_is_a_no_op_off_cuda() -> None:
    assert device.autocast_dtype("cpu") is None
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.float32


def test_cpu_autocasts_to_bfloat16_only_when_asked_and_native() -> None:
    native = device._cpu_computes_bfloat16()
    assert device.autocast_dtype("cpu", cpu=True) == (torch.bfloat16 if native else None)
    with autocast("cpu", cpu=True):
        out = torch.ones(4, 4) @ torch.ones(4, 4)
    assert out.dtype == (torch.bfloat16 if native else torch.float32)
    with autocast("cpu", enabled=False, cpu=True):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32


def test_loader_kwargs_pin_only_on_cuda_and_keep_workers() -> None:
    assert loader_kwargs(torch.device("cpu"), 0) == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    assert loader_kwargs("cpu", 2) == {"num_workers": 2, "pin_memory": False, "persistent_workers": True}
    assert loader_kwargs(torch.device("cuda"), 3) == {"num_workers": 3, "pin_memory": True, "persistent_workers": True}
    with pytest.raises(ValueError, match="num_workers"):
        loader_kwargs("cpu", -1)


@needs_cuda
def test_cuda_resolves_and_autocasts_in_half_precision() -> None:
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=rf"has {count} CUDA device\(s\)"):
        resolve_device(f"cuda:{count}")
    dtype = device.autocast_dtype("cuda")
    assert dtype in (torch.bfloat16, torch.float16)
    with autocast(torch.device("cuda")):
        out = torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")
    assert out.dtype == dtype


def test_conv_nets_and_image_batches_move_in_channels_last_with_the_same_values() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 12, 12)
    expected = net(x)
    device.conv_net_to(net, "cpu")
    moved = device.images_to(x, "cpu")
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert moved.is_contiguous(memory_format=torch.channels_last) and not moved.is_contiguous()
    torch.testing.assert_close(net(moved), expected)
    vectors = device.images_to(torch.randn(2, 5), "cpu")  # not an image batch: moved as it is
    assert vectors.is_contiguous()


def test_decode_workers_default_to_one_on_the_cpu_and_the_other_cores_on_cuda(monkeypatch) -> None:
    assert device.decode_workers(None, "cpu") == device.CPU_DECODE_WORKERS == 1
    assert device.decode_workers(3, "cpu") == 3 and device.decode_workers(0, "cuda") == 0  # a setting wins
    for cores, expected in ((1, 1), (2, 1), (6, 5), (64, device.MAX_DECODE_WORKERS)):
        monkeypatch.setattr(device, "usable_cores", lambda cores=cores: cores)
        assert device.decode_workers(None, "cuda:0") == expected
