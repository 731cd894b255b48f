"""Tests for the classifier heads on synthetic cached feature maps."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.special
import torch
import yaml
from pydantic import Field
from safetensors.torch import save_file
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import check_is_fitted, validate_data

from transferlab import config
from transferlab.config import ParamsError
from transferlab.models.features import load_part
from transferlab.models.heads import GapHead, LinearHead, SvmHead, load_head, make_head, persistence, registry
from transferlab.models.heads.knn.estimator import KnnHead
from transferlab.models.heads.registry import register_head
from transferlab.models.heads.persistence import EXECUTION_PARAMS
from transferlab.training.heads import train_head

REPO = Path(__file__).resolve().parents[1]

LABELS = np.array(["cat", "dog", "eel"])
CHANNELS, SIDE = 8, 3
# Small budgets keep every torch fit well under a second.
FAST: dict[str, dict[str, Any]] = {
    "linear": {"hidden": 16, "lr": 1e-2, "max_epochs": 30, "batch_size": 32, "patience": 5},
    "gap": {"lr": 5e-2, "max_epochs": 30, "batch_size": 32, "patience": 5},
    # no grid, no calibration: the head's own C and no CV folds (params.yaml's default grids and calibrates)
    "svm": {"max_iter": 2000, "C_grid": None, "calibrate": False},
    "knn": {"k": 5},
}
TORCH_KINDS = ["linear", "gap"]
ALL_KINDS = ["linear", "gap", "svm", "knn"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_maps(
    n: int, seed: int, n_classes: int = 3, side: int = SIDE, spread: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters in channel space, broadcast over H x W with per-pixel noise."""
    centers = np.random.default_rng(0).normal(0.0, spread, (n_classes, CHANNELS))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    vectors = centers[y] + rng.normal(0.0, 1.0, (n, CHANNELS))
    maps = vectors[:, :, None, None] + rng.normal(0.0, 0.5, (n, CHANNELS, side, side))
    return maps.astype(np.float16), LABELS[y]


@pytest.fixture(scope="module")
def train() -> tuple[np.ndarray, np.ndarray]:
    return make_maps(240, seed=1)


@pytest.fixture(scope="module")
def val() -> tuple[np.ndarray, np.ndarray]:
    return make_maps(120, seed=2)


def fast_head(kind: str, **overrides: Any) -> Any:
    seeded = {"random_state": 0} if "random_state" in registry.spec(kind).params.model_fields else {}
    return make_head(kind, {**FAST[kind], **seeded, **overrides})


def fit(head: Any, data: tuple[np.ndarray, np.ndarray], eval_set: Any = None) -> Any:
    X, y = data
    return head.fit(X, y) if eval_set is None else head.fit(X, y, eval_set=eval_set)


def state(head: Any) -> dict[str, torch.Tensor]:
    return head.torch_module().state_dict()


# ----------------------------------------------------------------------- learning


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_learns_separable_data_with_string_labels(kind, train, val):
    head = fast_head(kind)
    assert fit(head, train) is head
    assert head.classes_.tolist() == LABELS.tolist()
    pred = head.predict(val[0])
    assert pred.dtype.kind == "U"
    assert np.mean(pred == val[1]) >= 0.95
    assert head.n_features_in_ == CHANNELS


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_integer_labels_come_back_as_integers(kind, train, val):
    to_int = {"cat": 3, "dog": 7, "eel": 11}
    y_int = np.array([to_int[v] for v in train[1]])
    head = fast_head(kind).fit(train[0], y_int)
    pred = head.predict(val[0])
    assert head.classes_.tolist() == [3, 7, 11]
    assert pred.dtype.kind == "i"
    assert np.mean(pred == np.array([to_int[v] for v in val[1]])) >= 0.95


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_torch_heads_read_2d_vectors_as_1x1_maps(kind, train):
    pooled = train[0].astype(np.float32).mean(axis=(2, 3))
    head = fast_head(kind).fit(pooled, train[1])
    assert head.input_shape_ == (CHANNELS, 1, 1)
    np.testing.assert_array_equal(head.predict_proba(pooled), head.predict_proba(pooled[:, :, None, None]))


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_float16_and_float32_inputs_give_identical_outputs(kind, train):
    head = fit(fast_head(kind), train)
    as_float32 = train[0].astype(np.float32)
    np.testing.assert_array_equal(head.predict_proba(train[0]), head.predict_proba(as_float32))


def test_balanced_class_weight_fits(train):
    X, y = train
    keep = np.flatnonzero(y != "eel")[:150].tolist() + np.flatnonzero(y == "eel")[:10].tolist()
    for kind in ["linear", "gap", "svm"]:  # knn has no class weights: a vote is a vote
        head = fast_head(kind, class_weight="balanced").fit(X[keep], y[keep])
        assert np.mean(head.predict(X[keep]) == y[keep]) >= 0.95


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_torch_heads_are_bit_identical_per_seed(kind, train, val):
    # Different global torch seeds before each fit: random_state alone must decide.
    torch.manual_seed(123)
    first = fit(fast_head(kind), train, val)
    torch.manual_seed(456)
    second = fit(fast_head(kind), train, val)
    np.testing.assert_array_equal(first.predict_proba(val[0]), second.predict_proba(val[0]))
    assert first.history_ == second.history_
    a, b = state(first), state(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = state(fit(fast_head(kind, random_state=1), train, val))
    assert not all(torch.equal(a[k], other[k]) for k in a)


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_fit_leaves_the_global_torch_rng_alone(kind, train):
    before = torch.random.get_rng_state()
    fit(fast_head(kind), train)
    assert torch.equal(before, torch.random.get_rng_state())


def test_svm_is_deterministic_per_seed(train, val):
    first = fit(fast_head("svm", calibrate=True), train)
    second = fit(fast_head("svm", calibrate=True), train)
    np.testing.assert_array_equal(first.decision_function(val[0]), second.decision_function(val[0]))
    np.testing.assert_array_equal(first.predict_proba(val[0]), second.predict_proba(val[0]))


# --------------------------------------------------------------- early stopping


def noisy_labels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Labels independent of the maps: anything learned is memorization, so
    # validation loss must rise once the net starts fitting the noise.
    X, _ = make_maps(n, seed=seed)
    return X, LABELS[np.random.default_rng(seed + 100).integers(0, 3, n)]


def test_early_stopping_restores_the_best_epoch():
    train_noise, val_noise = noisy_labels(60, seed=3), noisy_labels(60, seed=4)
    patience, max_epochs = 4, 200
    head = make_head(
        "linear",
        {"hidden": 128, "dropout": 0.0, "lr": 1e-2, "weight_decay": 0.0, "batch_size": 16,
         "max_epochs": max_epochs, "patience": patience, "min_delta": 0.0, "random_state": 0},
    )
    fit(head, train_noise, eval_set=val_noise)

    val_losses = [h["val_loss"] for h in head.history_]
    assert head.best_epoch_ < len(head.history_) < max_epochs
    assert len(head.history_) == head.best_epoch_ + patience
    assert [h["epoch"] for h in head.history_] == list(range(1, len(head.history_) + 1))
    assert set(head.history_[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc"}
    best = head.history_[head.best_epoch_ - 1]
    assert best["val_loss"] == min(val_losses)
    assert val_losses[-1] > best["val_loss"]

    # The restored weights reproduce the best epoch's validation metrics.
    proba = head.predict_proba(val_noise[0])
    y_idx = np.searchsorted(head.classes_, val_noise[1])
    recomputed = -np.mean(np.log(proba[np.arange(len(y_idx)), y_idx]))
    assert recomputed == pytest.approx(best["val_loss"], rel=1e-5)
    assert np.mean(head.predict(val_noise[0]) == val_noise[1]) == pytest.approx(best["val_acc"])


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_min_delta_stops_when_the_val_loss_only_creeps_down(kind, train, val):
    # Separable clusters: the val loss keeps falling by tiny amounts long after every val map is right.
    patience, max_epochs = 3, 60
    histories = {}
    for min_delta in (0.0, 0.05):
        head = fit(fast_head(kind, max_epochs=max_epochs, patience=patience, min_delta=min_delta), train,
                   eval_set=val)
        histories[min_delta] = head.history_
        losses = [h["val_loss"] for h in head.history_]
        # an epoch improves only when it beats the best so far by more than min_delta
        best, best_epoch = float("inf"), 0
        for epoch, loss in enumerate(losses, 1):
            if loss < best - min_delta:
                best, best_epoch = loss, epoch
        assert head.best_epoch_ == best_epoch
        assert len(losses) == max_epochs or len(losses) == best_epoch + patience
    assert len(histories[0.05]) < len(histories[0.0])
    assert histories[0.05] == histories[0.0][: len(histories[0.05])]  # same epochs until it stops


def test_min_delta_is_validated():
    with pytest.raises(ParamsError, match="min_delta: got -0.1; allowed: a number >= 0"):
        fit(fast_head("linear", min_delta=-0.1), (make_maps(12, seed=1)))


def test_without_eval_set_early_stopping_monitors_train_loss(train):
    head = fit(fast_head("linear", max_epochs=15), train)
    assert all(h["val_loss"] is None and h["val_acc"] is None for h in head.history_)
    train_losses = [h["train_loss"] for h in head.history_]
    assert head.best_epoch_ == int(np.argmin(train_losses)) + 1


def test_eval_set_with_unseen_labels_is_refused(train, val):
    X_val, y_val = val
    with pytest.raises(ValueError, match="not seen in training"):
        fast_head("gap").fit(*train, eval_set=(X_val, np.where(y_val == "cat", "fox", y_val)))


# ------------------------------------------------------------------- GapHead cam


def test_gap_cam_shape_and_mean_equals_logits_minus_bias(train):
    head = fit(fast_head("gap"), train)
    X = make_maps(10, seed=5, side=5)[0]  # GAP does not care about H, W
    cam = head.cam(X)
    assert cam.shape == (10, len(LABELS), 5, 5)
    module = head.torch_module()
    with torch.no_grad():
        logits = module(torch.from_numpy(X.astype(np.float32))).numpy()
    np.testing.assert_allclose(cam.mean(axis=(2, 3)), logits - module.fc.bias.detach().numpy(), atol=1e-5)


def test_torch_module_is_a_copy_with_params_counted(train, val):
    head = fit(fast_head("linear"), train)
    before = head.predict_proba(val[0])
    module = head.torch_module()
    assert head.n_params_ == sum(p.numel() for p in module.parameters())
    assert head.n_params_ == (CHANNELS * SIDE * SIDE + 1) * 16 + (16 + 1) * len(LABELS)
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    np.testing.assert_array_equal(before, head.predict_proba(val[0]))


def test_shape_mismatches_are_refused(train):
    linear, gap = fit(fast_head("linear"), train), fit(fast_head("gap"), train)
    with pytest.raises(ValueError, match="maps of shape"):
        linear.predict(make_maps(4, seed=6, side=5)[0])
    with pytest.raises(ValueError, match="features"):
        gap.predict(np.zeros((4, CHANNELS + 1, SIDE, SIDE), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        gap.predict(np.zeros((4, CHANNELS, SIDE), dtype=np.float32))


# ------------------------------------------------------------------------- SvmHead


def svm_folds(n_splits: int = 5) -> StratifiedKFold:
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=0)


def svm_reference(C: float) -> Pipeline:
    # the head always solves the dual (coordinate descent), whatever the data's shape
    svc = LinearSVC(C=C, dual=True, max_iter=2000, random_state=0)
    return Pipeline([("scaler", StandardScaler()), ("svc", svc)])


def test_svm_c_grid_picks_the_best_cross_validated_c():
    X, y = make_maps(240, seed=1, spread=1.0)  # overlapping enough for C to matter
    grid = [1e-4, 1e-2, 1.0, 10.0]
    head = fast_head("svm", C_grid=grid).fit(X, y)
    pooled, y_idx = X.astype(np.float64).mean(axis=(2, 3)), np.searchsorted(LABELS, y)
    expected = [cross_val_score(svm_reference(c), pooled, y_idx, cv=svm_folds()).mean() for c in grid]
    np.testing.assert_allclose(head.cv_scores_, expected)
    best = int(np.argmax(expected))
    assert best != 0 and len(set(expected)) > 1, "test data no longer discriminates between the Cs"
    assert head.best_C_ == grid[best]


def test_svm_without_grid_uses_c(train):
    head = fit(fast_head("svm", C=0.5), train)
    assert head.best_C_ == 0.5 and head.cv_scores_ is None


@pytest.mark.parametrize("n_classes", [2, 3])
def test_svm_calibrated_proba_matches_calibrated_classifier_cv(n_classes):
    X, y = make_maps(150, seed=7, n_classes=n_classes, spread=0.6)  # overlapping: non-trivial probabilities
    # scikit-learn's tol, as the reference uses: the same problem solved to the same precision
    params = {"calibrate": True, "C_grid": None, "max_iter": 2000, "tol": 1e-4, "random_state": 0}
    head = make_head("svm", params).fit(X, y)
    proba = head.predict_proba(X)
    assert proba.shape == (len(X), n_classes)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    pooled, y_idx = X.astype(np.float64).mean(axis=(2, 3)), np.searchsorted(head.classes_, y)
    reference = CalibratedClassifierCV(svm_reference(1.0), method="sigmoid", cv=svm_folds(), ensemble=False)
    np.testing.assert_allclose(proba, reference.fit(pooled, y_idx).predict_proba(pooled), rtol=1e-10)


def wide_vectors(n: int, d: int, n_classes: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Fewer images than features, as pooled backbone vectors are: low-rank, overlapping classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    mixing = rng.normal(0, 1, (6, d))
    X = rng.normal(0, 0.5, (n_classes, d))[y] + rng.normal(0, 1, (n, 6)) @ mixing + rng.normal(0, 0.3, (n, d))
    return X.astype(np.float32), LABELS[y]


@pytest.mark.parametrize("n_classes", [2, 3])
def test_svm_solved_in_the_span_of_fewer_rows_is_the_svm(n_classes):
    # 60 images of 300 features: solved on U*S of the thin SVD; the same decisions as LinearSVC itself
    X, y = wide_vectors(60, 300, n_classes)
    head = make_head("svm", {"C": 0.05, "C_grid": None, "calibrate": False, "max_iter": 20000, "tol": 1e-6})
    head.fit(X, y)
    reference = Pipeline([("scaler", StandardScaler()),
                          ("svc", LinearSVC(C=0.05, max_iter=20000, tol=1e-6, random_state=0))])
    y_idx = np.searchsorted(head.classes_, y)
    reference.fit(X, y_idx)
    X_new, _ = wide_vectors(30, 300, n_classes, seed=4)
    np.testing.assert_allclose(head.decision_function(X_new), reference.decision_function(X_new), atol=1e-6)
    np.testing.assert_allclose(head.model_["svc"].coef_, reference["svc"].coef_, atol=1e-6)


def test_svm_grid_and_calibration_on_wide_vectors_match_scikit_learn():
    # the grid's fold decisions also calibrate: the same sigmoids as CalibratedClassifierCV at the chosen C
    X, y = wide_vectors(90, 200, 3)
    grid = [1e-3, 1e-2, 1.0]
    head = make_head("svm", {"C_grid": grid, "calibrate": True, "max_iter": 20000, "tol": 1e-6}).fit(X, y)
    y_idx = np.searchsorted(head.classes_, y)

    def reference(c: float) -> Pipeline:
        return Pipeline([("scaler", StandardScaler()),
                         ("svc", LinearSVC(C=c, max_iter=20000, tol=1e-6, random_state=0))])

    expected = [cross_val_score(reference(c), X, y_idx, cv=svm_folds()).mean() for c in grid]
    np.testing.assert_allclose(head.cv_scores_, expected)
    calibrated = CalibratedClassifierCV(reference(head.best_C_), method="sigmoid", cv=svm_folds(), ensemble=False)
    np.testing.assert_allclose(head.predict_proba(X), calibrated.fit(X, y_idx).predict_proba(X), atol=1e-6)


def test_uncalibrated_svm_has_no_predict_proba(train):
    head = fast_head("svm")
    assert not hasattr(head, "predict_proba")
    assert not hasattr(fit(head, train), "predict_proba")
    assert hasattr(fast_head("svm", calibrate=True), "predict_proba")


def test_svm_accepts_pooled_vectors_and_maps_alike(train, val):
    head = fit(fast_head("svm"), train)
    pooled = val[0].astype(np.float64).mean(axis=(2, 3))
    np.testing.assert_allclose(head.decision_function(pooled), head.decision_function(val[0]))


# ------------------------------------------------------------------------- KnnHead


def test_knn_probabilities_are_smoothed_cosine_votes():
    # three training rows: two "a" along x, one "b" along y; the query sits at 30 degrees from x
    X = np.array([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0]])
    y = np.array(["a", "a", "b"])
    query = np.array([[np.cos(np.pi / 6), np.sin(np.pi / 6)]])
    uniform = make_head("knn", {"k": 2, "weights": "uniform", "smoothing": 0.5}).fit(X, y)
    # the two nearest by cosine are the two "a" rows (scale does not matter): (2 + 0.5) / (2 + 2 * 0.5)
    np.testing.assert_allclose(uniform.predict_proba(query), [[2.5 / 3, 0.5 / 3]])
    weighted = make_head("knn", {"k": 3, "weights": "distance", "smoothing": 0.0}).fit(X, y)
    sims = (X / np.linalg.norm(X, axis=1, keepdims=True)) @ query[0]
    votes = 1 / (1 - sims)
    expected_b = votes[2] / votes.sum()
    np.testing.assert_allclose(weighted.predict_proba(query)[0, 1], expected_b, rtol=1e-5)
    assert weighted.predict(query).tolist() == ["a"]


def test_knn_k_larger_than_the_training_set_uses_every_row(train):
    X, y = train
    head = make_head("knn", {"k": 10_000, "weights": "uniform", "smoothing": 0.0}).fit(X[:30], y[:30])
    counts = np.array([np.sum(y[:30] == c) for c in head.classes_]) / 30
    np.testing.assert_allclose(head.predict_proba(X[:2]), [counts, counts])


def test_knn_learns_from_a_handful_per_class(train, val):
    X, y = train
    few = np.concatenate([np.flatnonzero(y == c)[:3] for c in LABELS])  # three images per class
    head = make_head("knn", {"k": 3}).fit(X[few], y[few])
    assert np.mean(head.predict(val[0]) == val[1]) >= 0.9
    assert head.n_params_ == 0


def test_knn_params_are_validated():
    with pytest.raises(ParamsError, match="k: got 0; allowed: an int >= 1"):
        make_head("knn", {"k": 0})
    with pytest.raises(ParamsError, match="weights: got 'cosine'; allowed: uniform, distance"):
        make_head("knn", {"weights": "cosine"})


# -------------------------------------------------------------------- persistence


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_save_load_round_trip(kind, train, val, tmp_path: Path):
    head = fit(fast_head(kind, **({"calibrate": True} if kind == "svm" else {})), train)
    path = tmp_path / "models" / f"{kind}.safetensors"
    head.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".json"]
    loaded = load_head(path)
    assert type(loaded) is type(head)
    assert loaded.get_params() == head.get_params()
    np.testing.assert_array_equal(loaded.classes_, head.classes_)
    np.testing.assert_array_equal(loaded.predict(val[0]), head.predict(val[0]))
    np.testing.assert_array_equal(loaded.predict_proba(val[0]), head.predict_proba(val[0]))
    if kind in TORCH_KINDS:
        assert loaded.history_ == head.history_ and loaded.best_epoch_ == head.best_epoch_
        assert loaded.n_params_ == head.n_params_


def test_load_refuses_a_mismatched_pair(train, tmp_path: Path):
    linear, gap = tmp_path / "linear.safetensors", tmp_path / "gap.safetensors"
    fit(fast_head("linear"), train).save(linear)
    fit(fast_head("gap"), train).save(gap)
    linear.write_bytes(gap.read_bytes())
    with pytest.raises(ValueError, match="checksum"):
        load_head(linear)


def test_load_refuses_an_unknown_format(train, tmp_path: Path):
    path = tmp_path / "gap.safetensors"
    fit(fast_head("gap"), train).save(path)
    sidecar = path.with_name(path.name + ".json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "format": 999}))
    with pytest.raises(ValueError, match="format"):
        load_head(path)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_saving_an_unfitted_head_fails(kind, tmp_path: Path):
    with pytest.raises(NotFittedError):
        fast_head(kind).save(tmp_path / "x.safetensors")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------ factory


def test_make_head_builds_each_kind():
    assert isinstance(make_head("linear", {}), LinearHead)
    assert isinstance(make_head("gap", {"dropout": 0.2}), GapHead)
    assert make_head("svm", {"C_grid": [0.1, 1.0]}).C_grid == [0.1, 1.0]


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("forest", {}, "unknown head kind 'forest'; allowed: linear, gap, svm, knn"),
        ("gap", {"hidden": 8}, "unknown param\\(s\\) hidden; allowed: batch_size, class_weight, device, dropout, lr"),
        ("linear", {"dropout": 1.5}, "dropout: got 1.5; allowed: a number in \\[0, 1\\)"),
        ("linear", {"max_epochs": 0}, "max_epochs: got 0; allowed: an int >= 1"),
        ("svm", {"class_weight": "auto"}, "class_weight: got 'auto'; allowed: one of None, 'balanced'"),
        ("svm", {"C_grid": []}, "C_grid: got \\[\\]"),
    ],
)
def test_make_head_errors_name_the_allowed_values(kind, params, message):
    with pytest.raises(ParamsError, match=message):
        make_head(kind, params)


# ------------------------------------------------------- scikit-learn's own checks

CHECKED = [
    LinearHead(**FAST["linear"]),
    GapHead(**FAST["gap"]),
    SvmHead(C_grid=None, calibrate=False),
    SvmHead(calibrate=True, C_grid=[0.1, 1.0], cv=3),
    KnnHead(k=3),
    KnnHead(k=5, weights="uniform", smoothing=0.0),
]
# Why each of these is expected to fail; xfail_strict keeps the list honest.
CLASS_WEIGHT_DICT = (
    "class_weight takes only None or 'balanced' (the params.yaml contract, and "
    "JSON-safe for save()); this check passes a {label: weight} dict"
)
CALIBRATED_ARGMAX = (
    "with calibrate=True, predict follows the SVM decision_function while "
    "predict_proba is one-vs-rest Platt-scaled, so argmax(predict_proba) may "
    "differ from predict near the boundary (documented; as SVC(probability=True))"
)


def expected_failed_checks(estimator: Any) -> dict[str, str]:
    if isinstance(estimator, KnnHead):
        return {}  # no class_weight param: sklearn skips that check
    failing = {"check_class_weight_classifiers": CLASS_WEIGHT_DICT}
    if isinstance(estimator, SvmHead) and estimator.calibrate:
        failing["check_classifiers_train"] = CALIBRATED_ARGMAX
    return failing


@parametrize_with_checks(CHECKED, expected_failed_checks=expected_failed_checks, xfail_strict=True)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# ------------------------------------------------------------------------ the registry


def comparable(params: dict[str, Any]) -> dict[str, Any]:
    # scikit-learn wants immutable defaults: a tuple where params.yaml has a list
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


@pytest.mark.parametrize("kind", registry.names())
def test_estimator_defaults_are_the_params_models_defaults(kind: str) -> None:
    spec = registry.spec(kind)
    # device comes from compute.device, not from the head's own section
    learned = {k: v for k, v in spec.estimator_class()().get_params().items() if k not in EXECUTION_PARAMS}
    assert comparable(learned) == spec.params().model_dump()


def test_builtin_specs() -> None:
    assert registry.names() == ("linear", "gap", "svm", "knn")
    assert [s.reads for s in registry.specs()] == ["maps", "pooled", "pooled", "pooled"]
    assert [s.name for s in registry.specs() if s.warm_start is not None] == ["gap", "svm"]
    assert LinearHead().lr == config.LinearHeadParams().lr == 3e-5 and SvmHead().calibrate is True


def test_validating_params_imports_no_torch() -> None:
    # The preflight stage validates params.yaml on every `dvc repro`: the registry must stay torch-free.
    code = ("import sys; from transferlab import config; p = config.load(sys.argv[1]); "
            "assert p.train_head.kinds == ['linear', 'gap', 'svm', 'knn']; "
            "assert 'torch' not in sys.modules and 'sklearn' not in sys.modules, 'heavy import'")
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "params.yaml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def params_file(tmp_path: Path, train_head: dict[str, Any]) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train_head": train_head}), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("train_head", "message"),
    [
        ({"kinds": ["linear", "forest"]},
         r"train_head\.kinds: got \['linear', 'forest'\]; allowed: registered heads \(linear, gap, svm, knn\); "
         r"not registered: forest"),
        ({"kinds": ["svm", "gapp"]}, r"train_head\.kinds: .*did you mean gap\?"),
        ({"kinds": ["svm", "svm"]}, r"train_head\.kinds: got \['svm', 'svm'\]; allowed: each head at most once"),
        ({"kinds": []}, r"train_head\.kinds: got \[\]; allowed: 1 or more items"),
        ({"toy": {}}, r"unknown key 'train_head\.toy'; allowed: kinds, linear, gap, svm, knn"),
        ({"gap": {"lr": 2}}, r"train_head\.gap\.lr: got 2; allowed: a number <= 1"),
    ],
)
def test_train_head_section_is_checked_against_the_registry(tmp_path: Path, train_head: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        config.load(params_file(tmp_path, train_head))


def test_kinds_choose_the_heads_and_sections_default(tmp_path: Path) -> None:
    section = config.load(params_file(tmp_path, {"kinds": ["svm"], "gap": {"lr": 0.01}})).train_head
    assert section.kinds == ["svm"]
    assert section.gap.lr == 0.01 and section.head("svm") == config.SvmHeadParams()
    assert config.as_dict(section)["linear"] == config.LinearHeadParams().model_dump()
    with pytest.raises(ParamsError, match="unknown head kind 'forest'; allowed: linear, gap, svm, knn"):
        section.head("forest")


# -------------------------------------------------- a head added through the registry alone


class ToyParams(config.Section):
    """Nearest centroid on pooled vectors; ``shrink`` pulls every centroid towards the overall mean."""

    shrink: float = Field(0.0, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)


TOY = ToyParams()


class ToyHead(ClassifierMixin, BaseEstimator):
    """A nearest-centroid classifier following the scikit-learn estimator API, with its own persistence."""

    def __init__(self, shrink: float = TOY.shrink, temperature: float = TOY.temperature) -> None:
        self.shrink = shrink
        self.temperature = temperature

    def fit(self, X: Any, y: Any) -> "ToyHead":
        X, y = validate_data(self, X, y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        centroids = np.stack([X[y_idx == k].mean(axis=0) for k in range(len(self.classes_))])
        self.centroids_ = (1 - self.shrink) * centroids + self.shrink * X.mean(axis=0)
        self.n_params_ = int(self.centroids_.size)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        distances = ((X[:, None, :] - self.centroids_[None]) ** 2).sum(axis=2)
        return scipy.special.softmax(-distances / self.temperature, axis=1)

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def save(self, path: Path) -> None:
        check_is_fitted(self)
        meta = persistence.head_meta(self, n_features_in=int(self.n_features_in_))
        persistence.save_arrays(path, {"centroids": self.centroids_}, meta)

    def _restore(self, meta: dict[str, Any], path: Path) -> None:
        self.classes_ = np.asarray(meta["classes"])
        self.n_features_in_ = int(meta["n_features_in"])
        self.centroids_ = persistence.load_arrays(path)["centroids"]
        self.n_params_ = int(self.centroids_.size)


@pytest.fixture
def toy() -> Iterator[str]:
    register_head("toy", params=ToyParams, reads="pooled")(ToyHead)
    yield "toy"
    registry.unregister_head("toy")


def write_store(store: Path, seed: int = 0) -> None:
    """A pooled-only feature store (extract.keep_maps: false) as load_part reads it."""
    store.mkdir(parents=True)
    classes = LABELS.tolist()
    for part, n in (("train", 90), ("val", 45)):
        maps, labels = make_maps(n, seed=seed + n)
        pooled = maps.astype(np.float32).mean(axis=(2, 3))
        index = np.searchsorted(LABELS, labels)
        save_file({"pooled": torch.from_numpy(pooled), "labels": torch.from_numpy(index.astype(np.int64))},
                  str(store / f"{part}.pooled.safetensors"))
        pd.DataFrame({"path": [f"{part}/{i}.jpg" for i in range(n)], "label": labels}).to_csv(
            store / f"{part}.index.csv", index=False)
    (store / "manifest.json").write_text(json.dumps(
        {"classes": classes, "keep_maps": False, "param_counts": {"total": 1234}}))


def test_a_registered_head_validates_and_trains_through_the_train_head_job(toy: str, tmp_path: Path) -> None:
    assert registry.spec(toy).estimator_class() is ToyHead and toy in registry.names()
    assert ToyHead().get_params() == ToyParams().model_dump()  # its defaults are its params model's

    # params.yaml: the name in kinds and its section validate, with the section's own bounds
    path = params_file(tmp_path, {"kinds": ["linear", "gap", "svm", toy], toy: {"shrink": 0.25}})
    section = config.load(path).train_head
    assert section.kinds == ["linear", "gap", "svm", toy] and section.head(toy) == ToyParams(shrink=0.25)
    with pytest.raises(ParamsError, match=r"train_head\.toy\.shrink: got 2\.0; allowed: a number <= 1"):
        config.load(params_file(tmp_path, {toy: {"shrink": 2.0}}))
    with pytest.raises(ParamsError, match=r"unknown key 'train_head\.toy\.shrnk'; did you mean shrink\?"):
        config.load(params_file(tmp_path, {toy: {"shrnk": 0.1}}))

    # the job: pooled vectors from a store without maps (a maps head would be refused)
    store, out = tmp_path / "features", tmp_path / "models" / toy
    write_store(store)
    result = train_head(toy, section.head(toy), store, out)
    assert isinstance(result.head, ToyHead) and result.head.shrink == 0.25
    assert result.metrics["val_accuracy"] >= 0.95 and result.metrics["val_loss"] > 0
    assert result.metrics["params_trainable"] == len(LABELS) * CHANNELS
    assert result.metrics["params_frozen"] == 1234
    assert sorted(p.name for p in out.iterdir()) == ["curve.csv", "metrics.json", "model.safetensors",
                                                      "model.safetensors.json"]
    assert json.loads((out / "metrics.json").read_text()) == result.metrics
    loaded = load_head(out / "model.safetensors")
    assert isinstance(loaded, ToyHead) and loaded.get_params() == result.head.get_params()
    val = load_part(store, "val", need_maps=False)
    np.testing.assert_array_equal(loaded.predict_proba(val.pooled), result.head.predict_proba(val.pooled))
    with pytest.raises(FileNotFoundError, match=r"heads that read maps \(linear\).*pooled vectors \(gap, svm, knn, toy\)"):
        train_head("linear", config.LinearHeadParams(), store, tmp_path / "linear")


def test_an_unregistered_head_is_gone_everywhere(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"train_head\.kinds: .*not registered: toy"):
        config.load(params_file(tmp_path, {"kinds": ["svm", "toy"]}))
    with pytest.raises(ParamsError, match="unknown head kind 'toy'"):
        make_head("toy")


def test_registering_another_estimator_under_a_taken_name_fails() -> None:
    with pytest.raises(ValueError, match="'gap' is already registered"):
        register_head("gap", params=ToyParams, reads="pooled")(ToyHead)
    with pytest.raises(ValueError, match="reads 'vectors'"):
        register_head("toy2", params=ToyParams, reads="vectors")(ToyHead)
    assert registry.spec("gap").estimator_class() is GapHead


def test_gap_trained_on_pooled_vectors_is_gap_trained_on_maps() -> None:
    """Pooling once before training gives the head the per-batch pooling inside the net would have given."""
    from transferlab.models.heads.nets import train_module

    X, y = make_maps(120, seed=3)
    X_val, y_val = make_maps(40, seed=4)
    head = fast_head("gap")
    on_pooled = fit(fast_head("gap"), (X.mean(axis=(2, 3)), y), eval_set=(X_val.mean(axis=(2, 3)), y_val))
    on_maps = fit(head, (X, y), eval_set=(X_val, y_val))
    # the former way: the net pools every batch of maps, every epoch
    classes, index = np.unique(y, return_inverse=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = head._build_module(X.shape[1:], len(classes))
        train_module(net, X.astype(np.float32), index, head._train_config(), None,
                     (X_val.astype(np.float32), np.searchsorted(classes, y_val)))
    net.eval()
    former = scipy.special.softmax(net(torch.from_numpy(X_val.astype(np.float32))).detach().double().numpy(), axis=1)
    for trained in (on_pooled, on_maps):
        # float32 pooling per batch vs once in float64: rounding apart, after 30 epochs of AdamW
        for name, tensor in net.state_dict().items():
            torch.testing.assert_close(trained.torch_module().state_dict()[name], tensor, atol=1e-3, rtol=1e-2)
        np.testing.assert_allclose(trained.predict_proba(X_val), former, atol=1e-3)
        assert (trained.predict(X_val) == classes[former.argmax(axis=1)]).all()
    assert on_maps.cam(X_val).shape == (40, len(classes), SIDE, SIDE)  # cam still works on maps
