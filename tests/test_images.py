"""The image Dataset and DataLoader of transferlab.data.images, on tiny synthetic PNGs."""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.data import imaging
from transferlab.data.images import ImageDataset, image_loader

SIDE = 8


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A module-level (picklable) transform: C x H x W uint8, without resizing."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def resized(img: Image.Image) -> torch.Tensor:
    return to_tensor(img.resize((SIDE, SIDE)))


@pytest.fixture
def items(tmp_path: Path) -> list[tuple[Path, int]]:
    """Five PNGs of different modes and sizes: grey, RGB, RGBA (transparent), palette, 16-bit."""
    images = [
        Image.new("L", (5, 7), 40),
        Image.new("RGB", (9, 6), (10, 20, 30)),
        Image.new("RGBA", (6, 6), (0, 0, 0, 0)),
        Image.new("P", (4, 4), 3),
        Image.fromarray(np.full((6, 5), 65535, dtype=np.uint16)),
    ]
    out = []
    for i, img in enumerate(images):
        path = tmp_path / f"img_{i}.png"
        img.save(path)
        out.append((path, i % 2))
    return out


def test_items_are_rgb_tensors_and_int_labels(items: list[tuple[Path, int]]) -> None:
    ds = ImageDataset(items, to_tensor)
    assert len(ds) == len(items)
    for i, (path, label) in enumerate(items):
        tensor, got = ds[i]
        assert type(got) is int and got == label
        with Image.open(path) as img:
            assert tensor.shape == (3, img.height, img.width)
    grey, _ = ds[0]
    assert torch.equal(grey, torch.full_like(grey, 40))
    transparent, _ = ds[2]
    assert int(transparent.min()) == 255  # composited on white, as ingest does
    sixteen_bit, _ = ds[4]
    assert int(sixteen_bit.min()) == 255  # scaled 0..65535 -> 0..255, not clipped


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (8, 4), (200, 0, 0)).save(path, exif=exif)
    tensor, _ = ImageDataset([(path, 0)], to_tensor)[0]
    assert tensor.shape == (3, 8, 4)  # upright: width and height traded


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_yields_batches_of_the_right_shape(items: list[tuple[Path, int]], num_workers: int) -> None:
    loader = image_loader(items, resized, batch_size=2, device=torch.device("cpu"), num_workers=num_workers)
    assert loader.num_workers == num_workers
    assert loader.pin_memory is False
    assert loader.persistent_workers is (num_workers > 0)
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(2, 3, SIDE, SIDE), (2, 3, SIDE, SIDE), (1, 3, SIDE, SIDE)]
    assert [y.tolist() for _, y in batches] == [[0, 1], [0, 1], [0]]
    assert all(x.dtype == torch.uint8 and y.dtype == torch.int64 for x, y in batches)


def test_shuffle_follows_the_generator(items: list[tuple[Path, int]]) -> None:
    many = items * 4

    def order(seed: int) -> list[int]:
        loader = image_loader(many, resized, 3, "cpu", 0, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return [int(x[0, 0, 0]) for batch, _ in loader for x in batch]

    assert order(1) == order(1)
    assert sorted(order(1)) == sorted(order(2))
    assert order(1) != order(2)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _resource_warnings(read: Callable[[], object]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        read()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_files_are_closed(items: list[tuple[Path, int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a multi-frame GIF: Pillow keeps such files open after load() unless they are closed
    gif = tmp_path / "animated.gif"
    frames = [Image.new("P", (4, 4), i) for i in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    ds = ImageDataset([*items, (gif, 1)] * 10, to_tensor)

    def read_all() -> None:
        for i in range(len(ds)):
            ds[i]

    assert _resource_warnings(read_all) == []
    if os.path.isdir("/proc/self/fd"):
        before = _open_fds()
        read_all()
        assert _open_fds() == before  # closed on return, not only when collected

    # the check itself works: a decoder that forgets to close is caught
    monkeypatch.setattr("transferlab.data.images.open_rgb", lambda path: imaging.to_rgb(Image.open(path)))
    assert _resource_warnings(read_all) != []
