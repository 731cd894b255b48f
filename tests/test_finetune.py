"""Tests for transferlab.training.finetune and the finetune stage.

The training runs use a random-init MobileNetV3-Small (the fastest supported
backbone on CPU at 224 px) on 32 px synthetic images, red squares vs blue
squares, for a few two-batch epochs; the warm-start tests use the packaged
ImageNet EfficientNet-Lite0 so pooled features are not vanishingly small.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferlab.device import _cpu_computes_bfloat16, conv_net_to, images_to
from transferlab.models.backbones import Backbone, load_backbone
from transferlab.config import AugmentParams, FinetuneParams, ParamsError
from transferlab.training.finetune import (
    CHECKPOINT_FILE,
    CURVE_COLUMNS,
    CURVE_FILE,
    META_FILE,
    METRICS_FILE,
    MODEL_FILE,
    FinetuneError,
    FinetuneJob,
    FinetuneResult,
    SplitData,
    WarmupCosine,
    apply_strategy,
    build_model,
    choose_warm_start,
    class_weights,
    finetune,
    linear_from_svm,
    load_finetuned,
    make_optimizer,
    make_scheduler,
    param_groups,
    read_split,
    train_transform,
)
from transferlab.models.heads import GapHead, SvmHead

REPO = Path(__file__).resolve().parents[1]
NAME = "mobilenet_v3_small"  # random init; 13 blocks (features.0 .. features.12)
N_BLOCKS = 13
LITE = "efficientnet_lite0"  # packaged ImageNet weights, offline
COLORS = {"blue": (30, 40, 220), "red": (220, 30, 40)}
SIDE = 32
PER_CLASS = {"train": 4, "val": 2}
TOL = 1e-4  # float32 linear maps vs float64 scikit-learn
FAST = FinetuneParams(
    backbones=[NAME],
    strategy="last_blocks",
    last_blocks=3,
    lr=0.01,
    max_epochs=3,
    warmup_epochs=1,
    patience=10,
    batch_size=4,
    seed=0,
)


class Crash(RuntimeError):
    """Raised from the epoch hook to simulate a crash after an epoch finished."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- helpers


def write_project(root: Path, per_class: dict[str, int] = PER_CLASS, side: int = SIDE) -> Path:
    """data/split.csv + data/prepared/images under ``root``; the test rows name missing files."""
    rng = np.random.default_rng(0)
    rows = []
    for label, color in COLORS.items():
        for part, count in per_class.items():
            for i in range(count):
                rel = f"images/{label}/{part}-{i}.jpg"
                pixels = np.clip(np.array(color) + rng.integers(-25, 25, (side, side, 3)), 0, 255)
                path = root / "data/prepared" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(path)
                rows.append((rel, label, part, "0" * 64))
        # Never read: fine-tuning must not touch the test split.
        rows.append((f"images/{label}/test-missing.jpg", label, "test", "0" * 64))
    (root / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["path", "label", "part", "sha256"]).to_csv(root / "data/split.csv", index=False)
    return root


def job(root: Path, out: str, params: FinetuneParams = FAST, **kw: Any) -> FinetuneJob:
    return FinetuneJob(NAME, params, root / "data/split.csv", root / "data/prepared", root / out, weights="none", **kw)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def without_seconds(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def small_backbone(strategy: str = "last_blocks", last_blocks: int = 1, n_classes: int = 2) -> Backbone:
    backbone = load_backbone(NAME, weights="none")
    params = FAST.model_copy(update=dict(strategy=strategy, last_blocks=last_blocks))
    build_model(backbone, n_classes, params)
    return backbone


def ids(params: Any) -> set[int]:
    return {id(p) for p in params}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def reference(project: Path) -> FinetuneResult:
    """One uninterrupted 3-epoch run; several tests compare against it."""
    return finetune(job(project, "reference"), echo=lambda _: None)


# --------------------------------------------------------------------------- strategy and modes


@pytest.mark.parametrize(
    ("strategy", "trained_blocks"), [("head_only", 0), ("last_blocks", 1), ("full", N_BLOCKS)]
)
def test_strategy_freezes_what_it_should(strategy: str, trained_blocks: int) -> None:
    backbone = small_backbone(strategy, last_blocks=1)
    blocks = backbone.blocks()
    assert len(blocks) == N_BLOCKS
    expected = ids(backbone.classifier.parameters())
    for _, block in blocks[N_BLOCKS - trained_blocks :]:
        expected |= ids(block.parameters())
    trainable = ids(p for p in backbone.module.parameters() if p.requires_grad)
    assert trainable == expected
    if strategy == "full":
        assert trainable == ids(backbone.module.parameters())


def test_last_blocks_beyond_the_network_is_a_params_error() -> None:
    backbone = load_backbone(NAME, weights="none")
    with pytest.raises(ParamsError, match="finetune.last_blocks"):
        apply_strategy(backbone, "last_blocks", N_BLOCKS + 1)


def test_frozen_batchnorm_stays_in_eval_mode_while_training() -> None:
    backbone = small_backbone("last_blocks", last_blocks=1)
    backbone.train(True)
    frozen_bn = [m for _, b in backbone.blocks()[:-1] for m in b.modules() if isinstance(m, _BatchNorm)]
    trained_bn = [m for m in backbone.blocks()[-1][1].modules() if isinstance(m, _BatchNorm)]
    assert frozen_bn and trained_bn
    assert not any(m.training for m in frozen_bn)
    assert all(m.training for m in trained_bn)
    assert backbone.classifier[0].training  # the head's dropout is on


def test_training_leaves_frozen_blocks_and_their_statistics_untouched(reference: FinetuneResult) -> None:
    torch.manual_seed(FAST.seed)  # what finetune() does before building the random-init backbone
    initial = load_backbone(NAME, weights="none").module.state_dict()
    final = reference.model.state_dict()
    frozen = [f"features.{i}." for i in range(N_BLOCKS - FAST.last_blocks)]
    frozen_keys = [k for k in initial if k.startswith(tuple(frozen))]
    assert any("running_mean" in k for k in frozen_keys)
    assert all(torch.equal(initial[k], final[k]) for k in frozen_keys)
    # ... while the trained blocks' BatchNorm statistics did move.
    trained_stat = f"features.{N_BLOCKS - 1}.1.running_mean"
    assert not torch.equal(initial[trained_stat], final[trained_stat])


# --------------------------------------------------------------------------- optimiser and schedule


def test_param_groups_discriminative_lr_and_no_decay_on_norms_and_biases() -> None:
    backbone = small_backbone("last_blocks", last_blocks=2)
    params = FAST.model_copy(update=dict(lr=0.02, backbone_lr_factor=0.1, weight_decay=0.05))
    groups = param_groups(backbone, params.lr, params.backbone_lr_factor, params.weight_decay)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"head/decay", "head/no_decay", "backbone/decay", "backbone/no_decay"}
    assert by_name["head/decay"]["lr"] == by_name["head/no_decay"]["lr"] == 0.02
    assert by_name["backbone/decay"]["lr"] == by_name["backbone/no_decay"]["lr"] == pytest.approx(0.002)
    assert by_name["head/decay"]["weight_decay"] == by_name["backbone/decay"]["weight_decay"] == 0.05
    assert by_name["head/no_decay"]["weight_decay"] == by_name["backbone/no_decay"]["weight_decay"] == 0.0
    decayed = ids(p for g in groups if g["weight_decay"] > 0 for p in g["params"])
    for name, param in backbone.module.named_parameters():
        if param.requires_grad and (name.endswith(".bias") or param.ndim <= 1):
            assert id(param) not in decayed, name
    assert ids(backbone.classifier.parameters()) == ids(
        p for g in groups if g["name"].startswith("head/") for p in g["params"]
    )

    optimizer = make_optimizer(groups, params)
    in_optimizer = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(in_optimizer) == len(set(in_optimizer))  # each parameter once
    assert set(in_optimizer) == ids(p for p in backbone.module.parameters() if p.requires_grad)
    assert isinstance(optimizer, torch.optim.AdamW)

    sgd = make_optimizer(groups, params.model_copy(update=dict(optimizer="sgd", momentum=0.9)))
    assert isinstance(sgd, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in sgd.param_groups)


def test_warmup_then_cosine_schedule(tmp_path: Path) -> None:
    schedule = WarmupCosine(warmup_steps=4, total_steps=12)
    assert [schedule(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert schedule(8) == pytest.approx(0.5)  # halfway through the cosine part
    assert schedule(6) == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))
    assert schedule(12) == pytest.approx(0.0)
    assert WarmupCosine(0, 10)(0) == 1.0  # no warmup: cosine from the full rate

    # Through the optimiser: stepped per batch, same factor for both learning rates.
    layer = nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": [layer.weight], "lr": 1.0}, {"params": [layer.bias], "lr": 0.1}])
    scheduler = make_scheduler(optimizer, FAST.model_copy(update=dict(warmup_epochs=1, max_epochs=3)), 4)
    seen = []
    for _ in range(12):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert [w for w, _ in seen] == pytest.approx([schedule(s) for s in range(12)])
    assert [b for _, b in seen] == pytest.approx([0.1 * schedule(s) for s in range(12)])

    state = scheduler.state_dict()
    assert state["lr_lambdas"] == [{"warmup_steps": 4, "total_steps": 12}] * 2  # one per group
    torch.save(state, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == state


def test_balanced_class_weights() -> None:
    data = SplitData(["a", "b"], [(Path("x"), 0)] * 3 + [(Path("y"), 1)], [(Path("z"), 0)], "0")
    assert class_weights(data, FAST) is None
    weights = class_weights(data, FAST.model_copy(update=dict(class_weight="balanced")))
    assert torch.allclose(weights, torch.tensor([4 / (2 * 3), 4 / (2 * 1)]))


def test_augmentation_follows_params() -> None:
    backbone = load_backbone(NAME, weights="none")
    off = AugmentParams(random_resized_crop=False, hflip=False)
    assert train_transform(backbone, off) is backbone.eval_transform
    image = Image.new("RGB", (300, 260), (200, 10, 10))
    crop = train_transform(backbone, AugmentParams(scale=[0.5, 1.0]))
    assert crop(image).shape == backbone.eval_transform(image).shape == (3, 224, 224)


# --------------------------------------------------------------------------- runs, outputs, resuming


def test_outputs_hold_train_and_val_figures_only(reference: FinetuneResult, project: Path) -> None:
    out = project / "reference"
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert set(metrics) == {
        "val_accuracy", "val_loss", "train_accuracy", "train_loss", "best_epoch", "epochs_run",
        "fit_seconds", "params_trainable", "params_frozen", "params_total",
    }
    assert metrics["epochs_run"] == FAST.max_epochs
    assert metrics["params_trainable"] + metrics["params_frozen"] == metrics["params_total"]
    assert 0 < metrics["params_trainable"] < metrics["params_total"]
    curve = pd.read_csv(out / CURVE_FILE)
    assert list(curve.columns) == list(CURVE_COLUMNS)
    assert curve["step"].tolist() == [1, 2, 3]
    meta = json.loads((out / META_FILE).read_text())
    assert meta["classes"] == ["blue", "red"]
    assert meta["head"] == {"type": "dropout_linear", "in_features": 576, "out_features": 2, "dropout": FAST.dropout}
    assert meta["strategy"]["trainable_blocks"] == [f"features.{i}" for i in range(10, 13)]
    assert meta["best_epoch"] == metrics["best_epoch"]
    assert meta["weights"] == "none" and meta["transform"]["crop_size"] == 224
    assert meta["trained_in"] == ("bfloat16" if _cpu_computes_bfloat16() else "float32")  # finetune.autocast
    # The test rows of split.csv name files that do not exist: training never opened them.
    assert read_split(project / "data/split.csv", project / "data/prepared").classes == ["blue", "red"]


def test_checkpoint_loads_with_weights_only(reference: FinetuneResult, project: Path) -> None:
    checkpoint = torch.load(project / "reference" / CHECKPOINT_FILE, weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "params", "best_model", "best_metric", "best_epoch",
            "bad_epochs", "history", "rng"} <= set(checkpoint)
    assert checkpoint["epoch"] == FAST.max_epochs
    assert isinstance(checkpoint["best_metric"], float) and isinstance(checkpoint["best_epoch"], int)
    assert checkpoint["params"]["backbone"] == NAME and checkpoint["params"]["weights"] == "none"
    assert checkpoint["params"]["params"]["lr"] == FAST.lr
    # A code change must retrain, not reuse a checkpoint the old code made: the training modules, the
    # shared loop and every module of the backbones package, keyed by their path under src/transferlab.
    code = set(checkpoint["params"]["code"])
    assert {"training/finetune.py", "training/strategy.py", "training/images.py", "training/warm_start.py",
            "training/checkpoint.py", "loop.py"} <= code
    assert any(k.startswith("models/backbones/") for k in code)
    assert all(len(digest) == 64 for digest in checkpoint["params"]["code"].values())
    assert isinstance(checkpoint["rng"]["torch"], torch.Tensor)
    assert_same_state(checkpoint["best_model"], tensors(project / "reference" / MODEL_FILE))


def test_reruns_are_identical(reference: FinetuneResult, project: Path) -> None:
    again = finetune(job(project, "again"), echo=lambda _: None)
    assert_same_state(tensors(project / "again" / MODEL_FILE), tensors(project / "reference" / MODEL_FILE))
    assert without_seconds(again.history) == without_seconds(reference.history)


def test_autocast_off_trains_in_float32(reference: FinetuneResult, project: Path) -> None:
    plain = finetune(job(project, "float32", FAST.model_copy(update={"autocast": False})), echo=lambda _: None)
    assert plain.meta["trained_in"] == "float32"
    if _cpu_computes_bfloat16():  # the reference trained in bfloat16: close, not the same weights
        assert plain.meta["trained_in"] != reference.meta["trained_in"]
        ours, theirs = tensors(project / "float32" / MODEL_FILE), tensors(project / "reference" / MODEL_FILE)
        assert any(not torch.equal(ours[k], theirs[k]) for k in ours)


def test_resume_after_a_crash_matches_an_uninterrupted_run(reference: FinetuneResult, project: Path) -> None:
    def crash_after_first(record: dict[str, Any]) -> None:
        if record["epoch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        finetune(job(project, "crashed"), echo=lambda _: None, on_epoch_end=crash_after_first)
    out = project / "crashed"
    assert torch.load(out / CHECKPOINT_FILE, weights_only=True)["epoch"] == 1
    assert not (out / MODEL_FILE).exists()

    said: list[str] = []
    epochs: list[int] = []
    resumed = finetune(job(project, "crashed"), echo=said.append, on_epoch_end=lambda r: epochs.append(r["epoch"]))
    assert f"resuming finetune@{NAME} from checkpoint: epoch 1 of 3 finished" in said
    assert epochs == [2, 3] and resumed.resumed_from == 1
    assert_same_state(tensors(out / MODEL_FILE), tensors(project / "reference" / MODEL_FILE))
    final = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    expected = torch.load(project / "reference" / CHECKPOINT_FILE, weights_only=True)
    assert_same_state(final["model"], expected["model"])  # the last epoch too, not only the best
    assert without_seconds(final["history"]) == without_seconds(expected["history"])
    assert final["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]


def test_finished_checkpoint_is_not_trained_again(reference: FinetuneResult, project: Path) -> None:
    out = project / "finished"
    shutil.copytree(project / "reference", out)
    (out / MODEL_FILE).unlink()
    said: list[str] = []
    result = finetune(job(project, "finished"), echo=said.append, on_epoch_end=lambda r: pytest.fail("trained"))
    assert any("training finished" in s for s in said)
    assert result.resumed_from == FAST.max_epochs
    assert_same_state(tensors(out / MODEL_FILE), tensors(project / "reference" / MODEL_FILE))


def test_checkpoint_with_other_settings_starts_fresh(reference: FinetuneResult, project: Path) -> None:
    out = project / "changed"
    shutil.copytree(project / "reference", out)
    said: list[str] = []
    epochs: list[int] = []
    params = FAST.model_copy(update=dict(lr=0.005, max_epochs=2))
    finetune(job(project, "changed", params), echo=said.append, on_epoch_end=lambda r: epochs.append(r["epoch"]))
    assert epochs == [1, 2]
    message = next(s for s in said if "different settings" in s)
    assert "params.lr: 0.01 -> 0.005" in message
    # Adding another backbone to finetune.backbones is not a different setting.
    more = params.model_copy(update=dict(backbones=[NAME, LITE]))
    said.clear()
    finetune(job(project, "changed", more), echo=said.append)
    assert any("training finished" in s for s in said)


def test_strategy_auto_records_its_choice_and_a_changed_choice_retrains(reference: FinetuneResult,
                                                                       project: Path) -> None:
    from transferlab.probe.choice import resolve

    def probe_report(last_blocks: int) -> Path:
        path = project / f"probe-{last_blocks}.json"
        path.write_text(json.dumps({"recommendation": {"strategy": "last_blocks", "last_blocks": last_blocks,
                                                       "reason": f"measured: cut below the top {last_blocks}"}}))
        return path

    auto = FAST.model_copy(update=dict(strategy="auto", last_blocks=1))
    out = project / "auto"
    shutil.copytree(project / "reference", out)
    said: list[str] = []
    params, choice = resolve(auto, probe_report(FAST.last_blocks))  # what the reference trained: no training
    result = finetune(job(project, "auto", params, choice=choice), echo=said.append,
                      on_epoch_end=lambda r: pytest.fail("trained"))
    assert any("training finished" in s for s in said)
    strategy = json.loads((out / META_FILE).read_text())["strategy"]
    assert strategy["requested"] == "auto" and (strategy["name"], strategy["last_blocks"]) == ("last_blocks", 3)
    assert strategy["reason"] == "measured: cut below the top 3" and result.meta["strategy"] == strategy
    said.clear()
    params, choice = resolve(auto, probe_report(2))  # the recommendation changed: the identity did too
    finetune(job(project, "auto", params.model_copy(update=dict(max_epochs=2)), choice=choice), echo=said.append)
    assert any("different settings" in s and "params.last_blocks: 3 -> 2" in s for s in said)


def test_load_finetuned_round_trip(reference: FinetuneResult, project: Path) -> None:
    module, meta, backbone = load_finetuned(project / "reference")
    assert not module.training and meta["classes"] == ["blue", "red"]
    images = [Image.open(p).convert("RGB") for p in sorted((project / "data/prepared/images/red").glob("val-*"))]
    x = torch.stack([backbone.eval_transform(img) for img in images])
    trained = reference.model.eval()
    saved = module.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in trained.state_dict().items())  # every weight, bit for bit
    with torch.no_grad():  # trained in channels_last: the same layout gives the same bits
        assert torch.equal(conv_net_to(module, "cpu")(images_to(x, "cpu")), trained(images_to(x, "cpu")))


def test_load_finetuned_refuses_a_mismatched_pair(reference: FinetuneResult, project: Path) -> None:
    out = project / "tampered"
    shutil.copytree(project / "reference", out)
    state = tensors(out / MODEL_FILE)
    state["classifier.1.bias"] += 1
    safetensors.torch.save_file(state, str(out / MODEL_FILE))
    with pytest.raises(ValueError, match="checksum"):
        load_finetuned(out)


# --------------------------------------------------------------------------- warm start


@pytest.fixture(scope="module")
def lite() -> Backbone:
    return load_backbone(LITE)


@pytest.fixture(scope="module")
def lite_images(lite: Backbone) -> torch.Tensor:
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)) for _ in range(3)]
    return torch.stack([lite.eval_transform(img) for img in images])


def write_heads(heads_dir: Path, lite: Backbone, scores: dict[str, float]) -> dict[str, Any]:
    """Fit gap and svm heads on random pooled-feature clusters; write them with their val accuracy."""
    rng = np.random.default_rng(0)
    y = np.array(["blue", "red"] * 20)
    centers = rng.normal(0, 1, (2, lite.num_features))
    pooled = (centers[(y == "red").astype(int)] + rng.normal(0, 1, (40, lite.num_features))).astype(np.float32)
    heads = {
        "gap": GapHead(max_epochs=5, random_state=0).fit(pooled[:, :, None, None], y),
        "svm": SvmHead(C_grid=None, calibrate=False, random_state=0).fit(pooled, y),
    }
    for kind, score in scores.items():
        (heads_dir / kind).mkdir(parents=True, exist_ok=True)
        (heads_dir / kind / "metrics.json").write_text(json.dumps({"val_accuracy": score, "test_accuracy": 1.0}))
        if kind in heads:
            heads[kind].save(heads_dir / kind / "model.safetensors")
    return heads


def warm_model(lite: Backbone, heads_dir: Path) -> tuple[nn.Module, list[str]]:
    said: list[str] = []
    warm = choose_warm_start(heads_dir, ["blue", "red"], lite.num_features, said.append)
    backbone = load_backbone(LITE)
    model = build_model(backbone, 2, FAST.model_copy(update=dict(init="best_head")), warm)
    return model.eval(), said


def test_warm_start_from_the_gap_head_keeps_its_logits(
    lite: Backbone, lite_images: torch.Tensor, tmp_path: Path
) -> None:
    # linear has the best val accuracy but reads flattened maps: skipped with a note.
    heads = write_heads(tmp_path, lite, {"linear": 1.0, "gap": 0.9, "svm": 0.8})
    model, said = warm_model(lite, tmp_path)
    assert any("skipped the linear head" in s for s in said)
    assert any("from the gap head" in s for s in said)
    with torch.no_grad():
        maps = lite.forward_features(lite_images)
        expected = heads["gap"].torch_module()(maps)
        assert torch.allclose(model(lite_images), expected, atol=TOL)
        pooled = lite.pool(maps)
        assert torch.allclose(model.classifier(pooled), expected, atol=TOL)


def test_warm_start_from_the_svm_head_keeps_its_decision_function(
    lite: Backbone, lite_images: torch.Tensor, tmp_path: Path
) -> None:
    heads = write_heads(tmp_path, lite, {"linear": 1.0, "gap": 0.7, "svm": 0.8})
    model, said = warm_model(lite, tmp_path)
    assert any("from the svm head" in s for s in said)
    with torch.no_grad():
        pooled = lite.extract_features(lite_images)
        logits = model(lite_images).double()
    decision = heads["svm"].decision_function(pooled.numpy())
    np.testing.assert_allclose((logits[:, 1] - logits[:, 0]).numpy(), decision, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(logits.sum(dim=1).numpy(), 0.0, atol=TOL)  # symmetric [-s/2, s/2]


def test_svm_fold_multiclass_equals_decision_function() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(3, 2, (60, 5))
    y = np.repeat(["a", "b", "c"], 20)
    X[y == "b"] += 2
    head = SvmHead(C_grid=None, calibrate=False, random_state=0).fit(X, y)
    weight, bias = linear_from_svm(head)
    logits = torch.from_numpy(X.astype(np.float32)) @ weight.T + bias
    np.testing.assert_allclose(logits.numpy(), head.decision_function(X), rtol=TOL, atol=TOL)


def test_warm_start_needs_a_compatible_head(lite: Backbone, tmp_path: Path) -> None:
    write_heads(tmp_path, lite, {"linear": 1.0})
    with pytest.raises(FinetuneError, match="no fitted gap or svm head"):
        choose_warm_start(tmp_path, ["blue", "red"], lite.num_features, lambda _: None)
    write_heads(tmp_path, lite, {"gap": 0.9})
    with pytest.raises(FinetuneError):  # fitted for other classes
        choose_warm_start(tmp_path, ["cat", "dog"], lite.num_features, lambda _: None)


def test_warm_start_uses_only_the_trained_kinds(lite: Backbone, tmp_path: Path) -> None:
    write_heads(tmp_path, lite, {"linear": 1.0, "gap": 0.9, "svm": 0.8})
    said: list[str] = []
    warm = choose_warm_start(tmp_path, ["blue", "red"], lite.num_features, said.append, kinds=["linear", "svm"])
    assert warm.kind == "svm"  # gap is better, but not in train_head.kinds (a stale folder)
    with pytest.raises(FinetuneError, match=r"none of train_head.kinds \['linear'\] can warm-start.*gap, svm"):
        choose_warm_start(tmp_path, ["blue", "red"], lite.num_features, said.append, kinds=["linear"])


# --------------------------------------------------------------------------- the stage, killed and rerun


def stage_params(backbone: str, max_epochs: int) -> dict[str, Any]:
    return {
        "extract": {"backbones": [backbone], "weights": {backbone: "none"}},
        "finetune": {"backbones": [backbone], "strategy": "full", "max_epochs": max_epochs, "warmup_epochs": 1,
                     "batch_size": 4, "patience": 10, "lr": 0.01},
    }


@pytest.mark.slow
def test_stage_killed_mid_epoch_resumes(tmp_path: Path) -> None:
    max_epochs = 4
    write_project(tmp_path, per_class={"train": 20, "val": 4}, side=64)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(stage_params(NAME, max_epochs)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"OMP_NUM_THREADS": "1", "TRANSFERLAB_EXECUTION": "test-finetune-resume"}
    cmd = [sys.executable, str(REPO / "pipeline/finetune.py"), NAME]
    out = tmp_path / "models/finetune" / NAME
    checkpoint = out / CHECKPOINT_FILE

    with open(tmp_path / "first.out", "w") as stdout, open(tmp_path / "first.err", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # during epoch 2: the checkpoint is written after epoch 1
        proc.wait()
    first = (tmp_path / "first.out").read_text()
    assert proc.returncode == -signal.SIGKILL, first + (tmp_path / "first.err").read_text()
    assert f"epoch 1/{max_epochs}" in first
    finished = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= finished < max_epochs
    assert not (out / MODEL_FILE).exists()

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming finetune@{NAME} from checkpoint: epoch {finished} of {max_epochs} finished" in rerun.stdout
    assert f"epoch {finished}/{max_epochs}:" not in rerun.stdout  # finished epochs are not repeated
    for name in (MODEL_FILE, META_FILE, METRICS_FILE, CURVE_FILE, "run.json", CHECKPOINT_FILE):
        assert (out / name).is_file(), name
    assert len(pd.read_csv(out / CURVE_FILE)) == max_epochs
    assert json.loads((out / METRICS_FILE).read_text())["epochs_run"] == max_epochs
    load_finetuned(out)


def test_only_the_batchnorm_that_trains_is_synchronised_across_ranks() -> None:
    from transferlab.training.strategy import sync_trained_batchnorm

    backbone = small_backbone("last_blocks", last_blocks=1)
    optimizer = make_optimizer(param_groups(backbone, 0.01, 0.1, 0.0), FAST)
    before = ids(p for g in optimizer.param_groups for p in g["params"])
    swapped = sync_trained_batchnorm(backbone.module)
    bns = {n: m for n, m in backbone.module.named_modules() if isinstance(m, _BatchNorm)}
    trained = {n for n, m in bns.items() if any(p.requires_grad for p in m.parameters())}
    assert swapped and set(swapped) == trained
    assert all(isinstance(bns[n], nn.SyncBatchNorm) == (n in trained) for n in bns)
    assert ids(p for p in backbone.module.parameters() if p.requires_grad) == before  # the optimiser's own
