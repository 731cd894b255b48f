"""The probe: per-block linear probes, the recommendation rule, strategy auto, the probe section of params."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from transferlab.config import FinetuneParams, ParamsError, ProbeParams, parse_section
from transferlab.probe.choice import ProbeReportMissingError, resolve
from transferlab.probe.linear import ProbeError, probe_curve
from transferlab.probe.recommend import Measures, plateau_start, recommend

BLOCKS = [f"b{i}" for i in range(9)]
SMALL = {"a": 100, "b": 100}
PARAMS = ProbeParams()


def _curve(accuracies: list[float]) -> list[dict]:
    return [{"block": name, "val_accuracy": acc} for name, acc in zip(BLOCKS, accuracies, strict=True)]


def _synthetic_blocks(rng: np.random.Generator, n: int, informative: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Pooled vectors of len(BLOCKS) blocks: block ``informative`` separates the classes, the last is noise."""
    y = np.array(["a", "b"] * (n // 2))
    blocks = []
    for i in range(len(BLOCKS)):
        x = rng.normal(size=(n, 16))
        # signal rises towards the informative block, then fades: the last block carries none
        strength = 0.0 if i == len(BLOCKS) - 1 else max(0.0, 3.0 - 1.2 * abs(i - informative))
        x[:, 0] += strength * (y == "b")
        blocks.append(x.astype(np.float32))
    return blocks, y


def test_last_block_useless_middle_block_informative_recommends_a_middle_cut() -> None:
    rng = np.random.default_rng(0)
    train, train_y = _synthetic_blocks(rng, 200, informative=4)
    val, val_y = _synthetic_blocks(rng, 100, informative=4)
    curve = probe_curve(BLOCKS, train, train_y, val, val_y, PARAMS)
    acc = [p["val_accuracy"] for p in curve]
    assert acc[4] > 0.9 and acc[-1] < 0.7  # the probe sees it
    assert all(p["ci_low"] <= p["val_accuracy"] <= p["ci_high"] for p in curve)
    for similarity in (0.8, 0.1):  # like ImageNet or not: a useless top is cut off either way
        rec = recommend(curve, Measures(SMALL, similarity), PARAMS)
        assert rec.strategy == "last_blocks"
        assert 1 < rec.last_blocks < len(BLOCKS) - 1  # a middle cut: neither head only nor everything
        assert BLOCKS[len(BLOCKS) - 1 - rec.last_blocks] in BLOCKS[2:5]  # frozen up to the plateau's start
        assert f"{acc[-1]:.3f}" in rec.reason and f"{similarity:.3f}" in rec.reason


def test_probe_curve_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    train, train_y = _synthetic_blocks(rng, 60, informative=2)
    val, val_y = _synthetic_blocks(rng, 30, informative=2)
    assert probe_curve(BLOCKS, train, train_y, val, val_y, PARAMS) == probe_curve(
        BLOCKS, train, train_y, val, val_y, PARAMS)


def test_small_like_imagenet_with_a_good_top_trains_the_head_only() -> None:
    rec = recommend(_curve([0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.95]), Measures(SMALL, 0.7), PARAMS)
    assert (rec.strategy, rec.last_blocks, rec.size, rec.imagenet) == ("head_only", None, "small", "similar")
    assert "0.700" in rec.reason and "200 train images" in rec.reason and "head_only" in rec.reason


def test_small_unlike_imagenet_trains_the_blocks_after_the_plateau_starts() -> None:
    rec = recommend(_curve([0.5, 0.6, 0.7, 0.9, 0.91, 0.9, 0.9, 0.91, 0.9]), Measures(SMALL, 0.2), PARAMS)
    assert (rec.strategy, rec.last_blocks, rec.plateau_block) == ("last_blocks", 5, "b3")
    assert "unlike ImageNet" in rec.reason and "0.200" in rec.reason
    # the curve still rising at the top: at least one block trains
    rising = recommend(_curve([0.1 * i for i in range(9)]), Measures(SMALL, 0.2), PARAMS)
    assert (rising.strategy, rising.last_blocks) == ("last_blocks", 1)


def test_large_data_fine_tunes_everything() -> None:
    rec = recommend(_curve([0.5] * 9), Measures({"a": 5000, "b": 1200}, 0.9), PARAMS)
    assert rec.strategy == "full" and rec.size == "large" and "1200" in rec.reason


def test_plateau_start_is_the_first_block_within_tolerance() -> None:
    assert plateau_start([0.5, 0.79, 0.8, 0.7], 0.02) == 1
    assert plateau_start([0.5, 0.79, 0.8, 0.7], 0.0) == 2


def test_probe_needs_val_images_and_enough_per_class_for_the_folds() -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ProbeError, match=r"probe\.cv: got 3; allowed: 2 to 2"):
        probe_curve(["b"], [x], np.array(["a", "a", "b", "b"]), [x], np.array(["a", "b", "a", "b"]), PARAMS)
    with pytest.raises(ProbeError, match="val split is empty"):
        probe_curve(["b"], [x], np.array(["a", "a", "b", "b"]), [x[:0]], np.array([]), PARAMS)


def _report(tmp_path: Path, strategy: str, last_blocks: int | None) -> Path:
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({"recommendation": {"strategy": strategy, "last_blocks": last_blocks,
                                                   "reason": "because measured"}}))
    return path


def test_auto_takes_the_recommendation_and_says_why(tmp_path: Path) -> None:
    params, choice = resolve(FinetuneParams(strategy="auto"), _report(tmp_path, "last_blocks", 4))
    assert (params.strategy, params.last_blocks) == ("last_blocks", 4)
    assert choice["requested"] == "auto" and choice["chosen"] == "last_blocks: 4"
    assert choice["reason"] == "because measured"
    params, choice = resolve(FinetuneParams(strategy="auto"), _report(tmp_path, "head_only", None))
    assert params.strategy == "head_only" and choice["chosen"] == "head_only"


def test_explicit_strategies_ignore_the_probe(tmp_path: Path) -> None:
    explicit = FinetuneParams(strategy="full")
    assert resolve(explicit, tmp_path / "missing.json") == (explicit, None)


def test_auto_without_a_probe_report_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ProbeReportMissingError, match="probe report .* is missing"):
        resolve(FinetuneParams(strategy="auto"), tmp_path / "missing.json")


def test_probe_section_is_validated() -> None:
    assert parse_section(ProbeParams, {"tolerance": 0.05}, "probe").tolerance == 0.05
    with pytest.raises(ParamsError, match=r"probe\.similar_abov.*similar_above"):
        parse_section(ProbeParams, {"similar_abov": 0.3}, "probe")
    with pytest.raises(ParamsError, match=r"probe\.C_grid"):
        parse_section(ProbeParams, {"C_grid": [0.1, -1.0]}, "probe")
    with pytest.raises(ParamsError, match=r"probe\.cv"):
        parse_section(ProbeParams, {"cv": 1}, "probe")
    assert parse_section(FinetuneParams, {"strategy": "auto"}, "finetune").strategy == "auto"
    with pytest.raises(ParamsError, match=r"finetune\.strategy.*auto"):
        parse_section(FinetuneParams, {"strategy": "automatic"}, "finetune")


def test_block_outputs_end_in_the_feature_maps_and_give_the_imagenet_logits() -> None:
    import torch

    from transferlab.models.backbones import load_backbone

    torch.manual_seed(0)
    backbone = load_backbone("efficientnet_lite0", "none")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs = list(backbone.block_outputs(x))
        assert [name for name, _ in outputs] == [name for name, _ in backbone.blocks()]
        torch.testing.assert_close(outputs[-1][1], backbone.forward_features(x))
        torch.testing.assert_close(backbone.imagenet_logits_from_maps(outputs[-1][1]), backbone.imagenet_logits(x))
