"""Feature extraction: cached once, and heads on the cache equal heads on the images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from transferlab.models.backbones import NO_WEIGHTS, load_backbone
from transferlab.models.features import extract, load_blocks, load_part, read_manifest
from transferlab.models.heads import GapHead

FP16_TOL = 2e-2  # maps are cached as float16: about 3 significant digits


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("feat")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(18):
        label = "red" if i % 2 else "blue"
        colour = np.array([200, 30, 30] if label == "red" else [30, 30, 200])
        pixels = np.clip(colour + rng.normal(0, 40, (48, 40, 3)), 0, 255).astype(np.uint8)
        rel = f"images/{label}/{i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / rel)
        rows.append({"path": rel, "label": label, "part": ("train", "val", "test")[i % 3], "sha256": str(i)})
    pd.DataFrame(rows).to_csv(root / "split.csv", index=False)
    return root


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("resnet18", weights=NO_WEIGHTS)


@pytest.fixture(scope="module")
def store(dataset: Path, backbone) -> Path:
    extract(backbone, dataset / "split.csv", dataset, dataset / "features", batch_size=4)
    return dataset / "features"


def test_manifest_counts_each_image_once(store: Path, dataset: Path) -> None:
    manifest = read_manifest(store)
    assert manifest["images_forwarded"] == 18
    assert {p: v["n"] for p, v in manifest["parts"].items()} == {"train": 6, "val": 6, "test": 6}
    assert manifest["dtypes"] == {"maps": "float16", "pooled": "float32"}
    assert manifest["transform"]["mean"] and manifest["split_sha256"]
    ids = sum((load_part(store, p, False).ids for p in ("train", "val", "test")), [])
    assert sorted(ids) == sorted(pd.read_csv(dataset / "split.csv")["path"])


def test_pooled_vectors_are_the_mean_of_the_maps(store: Path) -> None:
    part = load_part(store, "train", need_maps=True)
    assert part.maps is not None and part.maps.dtype == np.float16
    assert part.maps.shape[:2] == part.pooled.shape
    np.testing.assert_allclose(part.maps.astype(np.float32).mean(axis=(2, 3)), part.pooled, atol=FP16_TOL)


def test_gap_head_on_cache_equals_backbone_plus_head_on_images(store: Path, dataset: Path, backbone) -> None:
    train = load_part(store, "train", need_maps=True)
    head = GapHead(max_epochs=3, random_state=0).fit(train.maps, train.labels)
    test = load_part(store, "test", need_maps=True)
    cached = head.predict_proba(test.maps)
    module = head.torch_module()
    images = torch.stack([backbone.eval_transform(Image.open(dataset / p).convert("RGB")) for p in test.ids])
    backbone.module.eval()
    with torch.inference_mode():
        direct = torch.softmax(module(backbone.forward_features(images)), dim=1).numpy()
    np.testing.assert_allclose(cached, direct, atol=FP16_TOL)
    logits_cached = module(torch.from_numpy(test.maps.astype(np.float32)))
    with torch.inference_mode():
        logits_direct = module(backbone.forward_features(images))
    torch.testing.assert_close(logits_cached.detach(), logits_direct, atol=FP16_TOL, rtol=FP16_TOL)


def test_train_and_val_keep_every_block_for_the_probe_and_test_does_not(store: Path, dataset: Path,
                                                                        backbone) -> None:
    names = [name for name, _ in backbone.blocks()]
    val, part = load_blocks(store, "val"), load_part(store, "val", need_maps=False)
    assert val.blocks == names and [v.shape for v in val.vectors][-1] == part.pooled.shape
    # the last block's pooled output is the store's pooled vector, and the top-1 is the ImageNet classifier's
    np.testing.assert_allclose(val.vectors[-1], part.pooled, rtol=1e-5, atol=1e-6)
    images = torch.stack([backbone.eval_transform(Image.open(dataset / p).convert("RGB")) for p in part.ids])
    direct = torch.softmax(backbone.imagenet_logits(images), dim=1).amax(dim=1).numpy()
    np.testing.assert_allclose(val.top1, direct, rtol=1e-4, atol=1e-6)
    with torch.inference_mode():  # and each block's vector is that block's output, pooled
        x = images
        for (name, block), stored in zip(backbone.blocks(), val.vectors):
            x = block(x)
            np.testing.assert_allclose(stored, backbone.pool(x).numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    assert not (store / "test.blocks.safetensors").exists()  # the probe chooses a strategy: test stays unseen
    with pytest.raises(ValueError, match="test"):
        load_blocks(store, "test")


def test_batchnorm_statistics_unchanged_by_extract(dataset: Path, tmp_path: Path) -> None:
    bb = load_backbone("resnet18", weights=NO_WEIGHTS)
    bb.module.train()  # even a caller's train mode must not let extraction update statistics
    before = {k: v.clone() for k, v in bb.module.state_dict().items() if "running" in k}
    extract(bb, dataset / "split.csv", dataset, tmp_path / "f", batch_size=4)
    after = {k: v for k, v in bb.module.state_dict().items() if "running" in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_without_maps_heads_that_need_them_say_so(dataset: Path, backbone, tmp_path: Path) -> None:
    extract(backbone, dataset / "split.csv", dataset, tmp_path / "f", batch_size=4, keep_maps=False)
    assert not list((tmp_path / "f").glob("*.maps.npy"))
    assert load_part(tmp_path / "f", "train", need_maps=False).pooled.shape[0] == 6
    with pytest.raises(FileNotFoundError, match="keep_maps"):
        load_part(tmp_path / "f", "train", need_maps=True)
