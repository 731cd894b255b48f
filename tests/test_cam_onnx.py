"""Class activation maps, ONNX export and prediction, TTA params: small models, synthetic images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from transferlab import cli, config, launcher
from transferlab.evaluation.metrics import expected_calibration_error, reliability_bins
from transferlab.models import cam
from transferlab.models.backbones import NO_WEIGHTS, Backbone, load_backbone
from transferlab.models.heads import GapHead, LinearHead, SvmHead
from transferlab.serving.onnx_export import ExportError, export_onnx
from transferlab.serving.onnx_predict import OnnxPredictor
from transferlab.serving.predictor import load_predictor, save_head_predictor

CLASSES = ["a", "b", "c"]
PARITY = 1e-4  # the bound on |p_onnx - p_torch|


def _maps(seed: int, n: int = 12, shape: tuple[int, int, int] = (8, 5, 5)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def test_gap_cam_is_the_class_weighted_sum_of_the_cached_maps(tmp_path: Path) -> None:
    maps = _maps(0)
    head = GapHead(max_epochs=5, random_state=0).fit(maps, CLASSES * 4)
    head.save(tmp_path / "gap.safetensors")
    weights = safetensors.torch.load_file(str(tmp_path / "gap.safetensors"))["fc.weight"].numpy()  # K x C
    for i in range(len(maps)):
        for k in range(len(CLASSES)):
            expected = np.tensordot(weights[k], maps[i], axes=1)  # sum_c w_kc * maps_c
            np.testing.assert_allclose(cam.gap_cam(head, maps[i], k), expected, rtol=1e-5, atol=1e-5)
    # and its mean is the logit without the bias: the map explains the prediction
    bias = safetensors.torch.load_file(str(tmp_path / "gap.safetensors"))["fc.bias"].numpy()
    logits = np.log(head.predict_proba(maps[:1]))[0]
    means = np.array([cam.gap_cam(head, maps[0], k).mean() for k in range(3)]) + bias
    np.testing.assert_allclose(means - means.max(), logits - logits.max(), atol=1e-4)


def test_grad_cam_of_pooling_then_linear_is_relu_of_cam_over_the_area() -> None:
    maps = _maps(1)
    head = GapHead(max_epochs=3, random_state=0).fit(maps, CLASSES * 4)
    net = head.torch_module()
    x = torch.from_numpy(maps[:1])
    for k in range(3):
        expected = np.maximum(cam.gap_cam(head, maps[0], k), 0) / (5 * 5)  # d logit / d maps_c = w_kc / (H W)
        np.testing.assert_allclose(cam.grad_cam(net, x, k), expected, rtol=1e-4, atol=1e-6)


def test_overlay_is_the_image_size_and_differs_where_the_map_is_hot() -> None:
    image = Image.new("RGB", (64, 48), (128, 128, 128))
    hot = np.zeros((4, 4), dtype=np.float32)
    hot[0, 0] = 1.0
    drawn = np.asarray(cam.overlay(image, hot), dtype=int)
    assert drawn.shape == (48, 64, 3)
    assert np.abs(drawn[0, 0] - drawn[-1, -1]).sum() > 50  # hot corner and cold corner are coloured apart


def test_reliability_bins_are_the_ece_bins() -> None:
    rng = np.random.default_rng(0)
    proba = rng.dirichlet([1, 1, 1], size=200)
    y = rng.integers(0, 3, 200)
    bins = reliability_bins(y, proba, 10)
    assert sum(b["n"] for b in bins) == 200
    ece = sum(abs(b["accuracy"] - b["confidence"]) * b["n"] for b in bins) / 200
    assert ece == pytest.approx(expected_calibration_error(y, proba, 10))


def test_tta_param_is_validated() -> None:
    from typing import get_args

    from transferlab.evaluation.tta import VIEWS

    assert config.EvaluateParams().tta == []
    allowed = get_args(get_args(config.EvaluateParams.model_fields["tta"].annotation)[0])
    assert set(allowed) == set(VIEWS)  # every view the params allow is implemented
    assert config.parse(config.EvaluateParams, {"tta": ["hflip"]}).tta == ["hflip"]
    with pytest.raises(config.ParamsError, match="tta.0: got 'vflip'; allowed: one of 'hflip'"):
        config.parse(config.EvaluateParams, {"tta": ["vflip"]})
    with pytest.raises(config.ParamsError, match="tta: got \\['hflip', 'hflip'\\]; allowed: unique view names"):
        config.parse(config.EvaluateParams, {"tta": ["hflip", "hflip"]})


def test_launcher_sends_only_onnx_predictions_to_the_torch_free_path() -> None:
    assert launcher.onnx_model(["predict", "x.png", "--model", "m.onnx"])
    assert launcher.onnx_model(["predict", "--model=M.ONNX", "x.png"])
    assert not launcher.onnx_model(["predict", "x.png", "--model", "models/champion"])
    assert not launcher.onnx_model(["predict", "x.onnx.png"])
    assert not launcher.onnx_model(["export", "--out", "m.onnx"])


# ------------------------------------------------------------------ tiny predictors (resnet18, random weights)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    torch.manual_seed(0)
    return load_backbone("resnet18", weights=NO_WEIGHTS)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Odd sizes, both orientations: the resize and centre crop are exercised."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(40, 57), (61, 33), (48, 48), (300, 251), (37, 90), (90, 37)]):
        paths.append(root / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _predictor(backbone: Backbone, images: list[Path], head: object, out: Path) -> Path:
    batch = torch.stack([backbone.eval_transform(Image.open(p)) for p in images])
    with torch.no_grad():
        maps = backbone.forward_features(batch).numpy()
    head.fit(maps, (CLASSES * 2)[: len(images)])  # type: ignore[attr-defined]
    head.save(out.with_suffix(".safetensors"))  # type: ignore[attr-defined]
    save_head_predictor(backbone, out.with_suffix(".safetensors"), out, weights=NO_WEIGHTS)
    return out


@pytest.mark.parametrize("head", [GapHead(max_epochs=3), LinearHead(hidden=8, max_epochs=3)], ids=["gap", "linear"])
def test_onnx_export_matches_torch_with_preprocessing_and_classes_in_its_metadata(
        backbone: Backbone, images: list[Path], head: object, tmp_path: Path) -> None:
    predictor_dir = _predictor(backbone, images, head, tmp_path / "predictor")
    out = export_onnx(predictor_dir, tmp_path / "model.onnx")
    onnx_model, torch_model = OnnxPredictor(out), load_predictor(predictor_dir)
    assert onnx_model.classes == CLASSES
    transform = json.loads((predictor_dir / "predictor.json").read_text())["transform"]
    assert onnx_model.preprocessing == {k: transform[k] for k in
                                        ("resize_size", "crop_size", "interpolation", "mean", "std", "antialias")}
    expected = torch_model.classify([str(p) for p in images]).proba
    for batch_size in (1, 4):  # the batch axis is dynamic
        proba, errors = onnx_model.classify([str(p) for p in images], batch_size=batch_size)
        assert errors == [None] * len(images)
        assert np.abs(proba - expected).max() <= PARITY
        assert (proba.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert export_onnx(predictor_dir, tmp_path / "again.onnx").read_bytes() == out.read_bytes()  # deterministic


def test_onnx_export_of_a_scikit_learn_head_says_why_not(backbone: Backbone, images: list[Path], tmp_path: Path) -> None:
    predictor_dir = _predictor(backbone, images, SvmHead(C_grid=None, calibrate=False), tmp_path / "svm")
    with pytest.raises(ExportError, match="SvmHead, not a torch module; ONNX export takes fine-tuned models"):
        export_onnx(predictor_dir, tmp_path / "svm.onnx")
    assert not (tmp_path / "svm.onnx").exists()
    # and predict --cam refuses it before predicting: an SVM has no activation maps
    assert cli.main(["predict", str(images[0]), "--model", str(predictor_dir), "--cam", str(tmp_path / "cams")]) == 2
    assert not (tmp_path / "cams").exists()


def test_predict_cam_writes_an_overlay_per_image_and_onnx_predict_writes_the_same_table(
        backbone: Backbone, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    predictor_dir = _predictor(backbone, images, GapHead(max_epochs=3), tmp_path / "gap")
    args = ["predict", *map(str, images), "--model", str(predictor_dir)]
    assert cli.main([*args, "--out", str(tmp_path / "torch.csv"), "--cam", str(tmp_path / "cams")]) == 0
    written = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert written == sorted(f"{p.stem}.cam.png" for p in images)
    assert all(Image.open(tmp_path / "cams" / n).size == (224, 224) for n in written)  # the network's crop
    export_onnx(predictor_dir, tmp_path / "gap.onnx")
    onnx_args = ["predict", *map(str, images), "--model", str(tmp_path / "gap.onnx"), "--out", str(tmp_path / "o.csv")]
    assert launcher.main(onnx_args) == 0
    import pandas as pd

    via_torch, via_onnx = pd.read_csv(tmp_path / "torch.csv"), pd.read_csv(tmp_path / "o.csv")
    assert list(via_onnx.columns) == list(via_torch.columns)
    assert list(via_onnx["label"]) == list(via_torch["label"])
    assert np.abs(via_onnx.filter(like="p_").to_numpy() - via_torch.filter(like="p_").to_numpy()).max() <= PARITY
