"""Tests for transferlab.evaluation.metrics and .reports: small hand-computed cases, no torch, MLflow or DVC."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss, roc_auc_score

from transferlab.evaluation import metrics
from transferlab.errors import UserError
from transferlab.evaluation.metrics import (
    SelectionError,
    bootstrap_ci,
    evaluate_predictions,
    expected_calibration_error,
    select_best,
)
from transferlab.evaluation.reports import comparison_table, confusion_rows, plot_confusion_png, write_comparison

CLASSES = ["cat", "dog", "fox"]
# Hand-computed below: recall cat 2/3, dog 1/2, fox 1; precision cat 1, dog 1/2, fox 1/2.
Y_TRUE = ["cat", "cat", "cat", "dog", "dog", "fox"]
Y_PRED = ["cat", "cat", "dog", "dog", "fox", "fox"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _binary_case(n: int = 40, seed: int = 1) -> tuple[list[str], list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.choice(["neg", "pos"], size=n).tolist()
    # Scores informative but imperfect, with ties (rounded) so thresholds repeat.
    p_pos = np.round(np.clip(np.where(np.array(y_true) == "pos", 0.65, 0.35) + rng.normal(0, 0.2, n), 0, 1), 1)
    proba = np.column_stack([1 - p_pos, p_pos])
    y_pred = np.where(p_pos >= 0.5, "pos", "neg").tolist()
    return y_true, y_pred, proba


# --------------------------------------------------------------------------- point metrics


def test_hand_computed_metrics():
    result = evaluate_predictions(Y_TRUE, Y_PRED, CLASSES, n_boot=200)
    assert result["n"] == 6
    assert result["errors"] == 2
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1: cat 0.8, dog 0.5, fox 2/3
    assert result["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert result["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert result["per_class"]["cat"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert result["per_class"]["fox"]["precision"] == pytest.approx(0.5)
    assert isinstance(result["per_class"]["dog"]["support"], int)
    assert "log_loss" not in result and "roc" not in result


def test_matches_sklearn_and_zero_division():
    classes = ["a", "b", "c", "d"]  # "d" never occurs: its scores are 0, not a warning or nan
    y_true = ["a", "b", "b", "c", "a", "c", "c"]
    y_pred = ["a", "c", "b", "c", "b", "a", "c"]
    result = evaluate_predictions(y_true, y_pred, classes, n_boot=100)
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert result["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=classes, average="macro",
                                                        zero_division=0))
    assert result["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert result["confusion"][3] == [0, 0, 0, 0]


def test_confusion_follows_classes_order_not_sorted():
    result = evaluate_predictions(["b", "b", "a"], ["b", "a", "a"], ["b", "a"], n_boot=10)
    assert result["confusion"] == [[1, 1], [0, 1]]  # row 0 is "b"
    assert list(result["per_class"]) == ["b", "a"]


def test_rejects_unknown_labels_and_bad_shapes():
    with pytest.raises(ValueError, match="not in classes"):
        evaluate_predictions(["cat", "wolf"], ["cat", "cat"], CLASSES)
    with pytest.raises(ValueError, match="length"):
        evaluate_predictions(["cat"], ["cat", "dog"], CLASSES)
    with pytest.raises(ValueError, match="shape"):
        evaluate_predictions(["cat", "dog"], ["cat", "dog"], CLASSES, proba=np.full((2, 2), 0.5))


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_point_estimate():
    correct = np.array([1] * 17 + [0] * 3)
    low, high = bootstrap_ci(correct, n_boot=2000, seed=0, ci=0.95)
    assert 0.0 <= low <= correct.mean() <= high <= 1.0
    assert low < high


def test_bootstrap_ci_narrows_with_more_data():
    small = np.tile([1, 1, 1, 1, 0], 10)  # n=50, accuracy 0.8
    large = np.tile([1, 1, 1, 1, 0], 1000)  # n=5000, same accuracy
    low_s, high_s = bootstrap_ci(small, n_boot=1000, seed=0, ci=0.95)
    low_l, high_l = bootstrap_ci(large, n_boot=1000, seed=0, ci=0.95)
    assert high_l - low_l < (high_s - low_s) / 5  # width ~ 1/sqrt(n): 10x narrower expected
    assert low_l <= 0.8 <= high_l


def test_bootstrap_ci_deterministic_per_seed():
    correct = np.random.default_rng(3).integers(0, 2, size=80)
    assert bootstrap_ci(correct, 500, seed=7) == bootstrap_ci(correct, 500, seed=7)
    assert bootstrap_ci(correct, 500, seed=7) != bootstrap_ci(correct, 500, seed=8)


def test_bootstrap_ci_blocks_bound_memory(monkeypatch):
    correct = np.tile([1, 0, 1], 100)
    monkeypatch.setattr(metrics, "BOOT_MAX_ELEMENTS", 1000)  # forces blocks of 3 resamples
    low, high = bootstrap_ci(correct, n_boot=301, seed=0)
    assert low <= correct.mean() <= high
    assert (low, high) == bootstrap_ci(correct, n_boot=301, seed=0)


def test_bootstrap_ci_wider_at_higher_level():
    correct = np.tile([1, 0, 1, 1], 25)
    low90, high90 = bootstrap_ci(correct, 2000, seed=0, ci=0.90)
    low99, high99 = bootstrap_ci(correct, 2000, seed=0, ci=0.99)
    assert low99 <= low90 and high90 <= high99


@pytest.mark.parametrize("kwargs", [{"n_boot": 0}, {"ci": 1.0}, {"ci": 0.0}])
def test_bootstrap_ci_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        bootstrap_ci(np.ones(5), **{"n_boot": 10, "seed": 0, "ci": 0.95, **kwargs})


def test_evaluate_is_deterministic_for_a_seed():
    y_true, y_pred, proba = _binary_case()
    first = evaluate_predictions(y_true, y_pred, ["neg", "pos"], proba, n_boot=300, seed=5)
    again = evaluate_predictions(y_true, y_pred, ["neg", "pos"], proba, n_boot=300, seed=5)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert first["accuracy_ci"][0] <= first["accuracy"] <= first["accuracy_ci"][1]


# --------------------------------------------------------------------------- calibration


def test_ece_zero_for_one_hot_correct():
    y = np.array([0, 1, 2, 1, 0])
    assert expected_calibration_error(y, np.eye(3)[y], n_bins=15) == 0.0


def test_ece_single_bin_equals_conf_minus_acc():
    # Every confidence is 0.7 (one bin); 6 of 10 top-1 predictions are right -> |0.7 - 0.6|.
    proba = np.tile([0.7, 0.3], (10, 1))
    y = np.array([0] * 6 + [1] * 4)
    assert expected_calibration_error(y, proba, n_bins=15) == pytest.approx(0.1)
    # With one bin overall, ECE is |mean confidence - accuracy| whatever the confidences.
    rng = np.random.default_rng(0)
    proba = rng.dirichlet([1, 1, 1], size=50)
    y = rng.integers(0, 3, size=50)
    expected = abs(proba.max(axis=1).mean() - (proba.argmax(axis=1) == y).mean())
    assert expected_calibration_error(y, proba, n_bins=1) == pytest.approx(expected)


def test_ece_matches_reference_loop():
    rng = np.random.default_rng(1)
    proba = rng.dirichlet([0.5, 0.5, 0.5, 0.5], size=300)
    y = rng.integers(0, 4, size=300)
    conf, hit = proba.max(axis=1), proba.argmax(axis=1) == y
    edges = np.linspace(0, 1, metrics.ECE_BINS + 1)
    reference = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            reference += abs(hit[in_bin].mean() - conf[in_bin].mean()) * in_bin.mean()
    assert expected_calibration_error(y, proba, metrics.ECE_BINS) == pytest.approx(reference)


def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(2)
    y_true = rng.choice(CLASSES, size=30).tolist()
    proba = rng.dirichlet([1, 1, 1], size=30)
    y_pred = [CLASSES[i] for i in proba.argmax(axis=1)]
    result = evaluate_predictions(y_true, y_pred, CLASSES, proba, n_boot=50)
    assert result["log_loss"] == pytest.approx(log_loss(y_true, proba, labels=CLASSES))
    assert result["ece"] >= 0.0


def test_log_loss_follows_classes_order_and_absent_classes():
    rng = np.random.default_rng(4)
    y_true = rng.choice(["cat", "dog"], size=20).tolist()  # "fox" absent from y_true
    proba = rng.dirichlet([1, 1, 1], size=20)
    y_pred = [CLASSES[i] for i in proba.argmax(axis=1)]
    expected = log_loss(y_true, proba, labels=CLASSES)
    # Same data, columns given in a non-sorted class order: the value must not change.
    order = [2, 0, 1]
    shuffled = evaluate_predictions(y_true, y_pred, [CLASSES[i] for i in order], proba[:, order], n_boot=50)
    assert shuffled["log_loss"] == pytest.approx(expected)


# --------------------------------------------------------------------------- ROC


def test_roc_for_two_classes_is_json_safe():
    y_true, y_pred, proba = _binary_case()
    result = evaluate_predictions(y_true, y_pred, ["neg", "pos"], proba, n_boot=100)
    text = json.dumps(result, allow_nan=False)  # raises on inf/nan
    assert "Infinity" not in text and "NaN" not in text
    positive = np.array(y_true) == "pos"
    assert result["roc_auc"] == pytest.approx(roc_auc_score(positive, proba[:, 1]))
    (roc,) = result["roc"]
    assert roc["name"] == "pos" and roc["kind"] == "class"
    assert roc["auc"] == pytest.approx(result["roc_auc"])
    assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["thresholds"]) >= 2
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    assert roc["thresholds"][0] is None  # sklearn's +inf
    assert all(isinstance(t, float) for t in roc["thresholds"][1:])


def test_roc_positive_class_is_second():
    y_true, y_pred, proba = _binary_case()
    swapped = evaluate_predictions(y_true, y_pred, ["pos", "neg"], proba[:, ::-1], n_boot=10)
    assert swapped["roc_auc"] == pytest.approx(roc_auc_score(np.array(y_true) == "neg", proba[:, 0]))


def test_one_vs_rest_roc_and_averages_for_more_than_two_classes():
    rng = np.random.default_rng(0)
    y_idx = np.repeat(np.arange(4), 10)
    logits = rng.normal(size=(40, 4)) + 1.5 * np.eye(4)[y_idx]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    classes = ["a", "b", "c", "d"]
    y_true = [classes[i] for i in y_idx]
    y_pred = [classes[i] for i in proba.argmax(axis=1)]
    result = evaluate_predictions(y_true, y_pred, classes, proba, n_boot=50)
    curves = {c["name"]: c for c in result["roc"]}
    assert set(curves) == {*classes, "micro-average", "macro-average"}
    onehot = np.eye(4)[y_idx]
    for k, label in enumerate(classes):
        assert curves[label]["auc"] == pytest.approx(roc_auc_score(onehot[:, k], proba[:, k]))
        assert result["per_class"][label]["roc_auc"] == pytest.approx(curves[label]["auc"])
    assert curves["micro-average"]["auc"] == pytest.approx(roc_auc_score(onehot, proba, average="micro"))
    macro = roc_auc_score(y_idx, proba, multi_class="ovr", average="macro")
    assert curves["macro-average"]["auc"] == pytest.approx(macro) == result["roc_auc"]
    macro_curve = curves["macro-average"]
    assert macro_curve["fpr"][0] == 0.0 and macro_curve["tpr"][-1] == pytest.approx(1.0)
    json.dumps(result, allow_nan=False)


def test_class_absent_from_test_has_no_curve():
    proba = np.eye(3)[[0, 0, 1, 1, 1, 0]] * 0.8 + 0.2 / 3
    result = evaluate_predictions(["a", "a", "b", "b", "b", "a"], ["a"] * 6, ["a", "b", "c"], proba, n_boot=50)
    names = {c["name"] for c in result["roc"]}
    assert names == {"a", "b", "micro-average", "macro-average"}
    assert result["per_class"]["c"]["roc_auc"] is None


def test_roc_undefined_with_single_true_class():
    proba = np.array([[0.2, 0.8], [0.6, 0.4]])
    result = evaluate_predictions(["pos", "pos"], ["pos", "neg"], ["neg", "pos"], proba, n_boot=10)
    assert result["roc_auc"] is None and result["roc"] == []
    json.dumps(result, allow_nan=False)


# --------------------------------------------------------------------------- confusion outputs


def test_confusion_rows():
    rows = confusion_rows(["cat", "dog"], ["dog", "dog"], "gap")
    assert rows == [{"model": "gap", "actual": "cat", "predicted": "dog"},
                    {"model": "gap", "actual": "dog", "predicted": "dog"}]


def test_plot_confusion_png(tmp_path):
    path = tmp_path / "plots" / "confusion.png"
    plot_confusion_png([[5, 1], [2, 7]], ["cat", "dog"], "linear head", path)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 100
    assert [p.name for p in path.parent.iterdir()] == ["confusion.png"]  # no temp file left
    with pytest.raises(ValueError):
        plot_confusion_png([[1, 2]], ["cat", "dog"], "bad", tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# --------------------------------------------------------------------------- comparison


def _result(model: str, accuracy: float, macro_f1: float, log_loss_: float | None = None, **extra) -> dict:
    result = {"model": model, "kind": "head", "backbone": "resnet18", "accuracy": accuracy,
              "accuracy_ci": [accuracy - 0.05, min(1.0, accuracy + 0.03)], "balanced_accuracy": accuracy,
              "macro_f1": macro_f1, **extra}
    if log_loss_ is not None:
        result["log_loss"] = log_loss_
    return result


def test_comparison_table_ordering():
    results = [
        _result("a", 0.90, 0.80, 0.1),
        _result("d-x", 0.90, 0.85),
        _result("b", 0.90, 0.85, 0.5),
        _result("e", 0.95, 0.70, 0.9),
        _result("c", 0.90, 0.85, 0.3),
        _result("d-a", 0.90, 0.85),
    ]
    table = comparison_table(results)
    assert table["model"].tolist() == ["e", "c", "b", "d-a", "d-x", "a"]
    assert table["rank"].tolist() == [1, 2, 3, 4, 5, 6]
    assert math.isnan(table.loc[table["model"] == "d-a", "log_loss"].item())
    assert table["params_trainable"].isna().all()
    assert table["accuracy_ci_low"].iloc[0] == pytest.approx(0.90)


def test_comparison_table_ci_string():
    result = _result("m", 0.951, 0.9)
    result["accuracy_ci"] = [0.915, 0.98]
    table = comparison_table([result])
    assert table["accuracy_95ci"].item() == "0.951 [0.915, 0.980]"


def test_comparison_carries_the_accuracy_without_the_audits_leaks(tmp_path):
    results = [_result("a", 0.9, 0.9, accuracy_without_leaks=0.8, n_without_leaks=25), _result("b", 0.8, 0.8)]
    write_comparison(comparison_table(results), tmp_path / "c.csv", tmp_path / "c.md")
    table = pd.read_csv(tmp_path / "c.csv")
    assert table.loc[0, "accuracy_without_leaks"] == pytest.approx(0.8) and table.loc[0, "n_without_leaks"] == 25
    assert math.isnan(table.loc[1, "accuracy_without_leaks"])  # no audit: empty, not 0
    header = (tmp_path / "c.md").read_text().splitlines()[0]
    assert "accuracy_without_leaks" in header


def test_comparison_table_rejects_bad_results():
    with pytest.raises(ValueError, match="lacks"):
        comparison_table([{"model": "m", "accuracy": 0.5}])
    with pytest.raises(ValueError, match="kind"):
        comparison_table([_result("m", 0.5, 0.5) | {"kind": "other"}])
    with pytest.raises(ValueError, match="duplicate"):
        comparison_table([_result("m", 0.5, 0.5), _result("m", 0.6, 0.5)])


def test_write_comparison(tmp_path):
    results = [
        _result("svm", 0.9, 0.88, 0.31, params_trainable=1234, train_seconds=2.5),
        _result("ft-resnet18", 0.95, 0.94, None, params_trainable=11_000_000, params_frozen=0, gflops=1.82)
        | {"kind": "finetune"},
    ]
    table = comparison_table(results)
    csv_path, md_path = tmp_path / "out" / "comparison.csv", tmp_path / "out" / "comparison.md"
    write_comparison(table, csv_path, md_path)

    back = pd.read_csv(csv_path)
    assert back["model"].tolist() == ["ft-resnet18", "svm"]
    assert back["log_loss"].isna().tolist() == [True, False]

    lines = md_path.read_text().splitlines()
    assert len(lines) == 2 + len(results)  # header, separator, one line per model
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["rank", "model", "kind"]
    assert set(lines[1]) <= set("|-: ")
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    cell = dict(zip(header, first))
    assert cell["model"] == "ft-resnet18"
    assert cell["rank"] == "1"
    assert cell["accuracy_95ci"].startswith("0.950 [")
    assert "accuracy_ci_low" not in cell  # the CSV has the parts; the Markdown shows one interval
    assert cell["params_trainable"] == "11000000"  # ints without decimals
    assert cell["log_loss"] == ""  # missing is empty
    assert cell["gflops"] == "1.820"
    assert sorted(p.name for p in csv_path.parent.iterdir()) == ["comparison.csv", "comparison.md"]


# --------------------------------------------------------------------------- champion selection


def test_select_best_uses_validation_not_test():
    results = [
        {"model": "a", "accuracy": 0.99, "val_accuracy": 0.80},  # best on test, worse on val
        {"model": "b", "accuracy": 0.85, "val_accuracy": 0.90},
    ]
    assert select_best(results)["model"] == "b"
    with pytest.raises(ValueError, match="validation"):
        select_best(results, key="accuracy")


def test_select_best_tie_breaks():
    results = [
        {"model": "c", "val_accuracy": 0.9},
        {"model": "b", "val_accuracy": 0.9, "val_loss": 0.4},
        {"model": "a", "val_accuracy": 0.9, "val_loss": 0.6},
    ]
    assert select_best(results)["model"] == "b"  # lower val log loss wins the tie
    no_loss = [{"model": "z", "val_accuracy": 0.9}, {"model": "y", "val_accuracy": 0.9}]
    assert select_best(no_loss)["model"] == "y"  # then the name
    assert select_best(results[1:], key="val_loss", maximize=False)["model"] == "b"


def test_select_best_ranks_a_missing_key_last():
    # b has no val_accuracy: it cannot win, however good its test accuracy
    assert select_best([{"model": "b", "accuracy": 0.99}, {"model": "a", "val_accuracy": 0.1}])["model"] == "a"
    with pytest.raises(ValueError):
        select_best([])


def test_select_best_by_val_loss_skips_models_without_it():
    results = [
        {"model": "svm", "val_accuracy": 0.99, "val_loss": None},  # uncalibrated: no probabilities
        {"model": "gap", "val_accuracy": 0.90, "val_loss": 0.40},
        {"model": "linear", "val_accuracy": 0.95, "val_loss": float("nan")},
        {"model": "ft", "val_accuracy": 0.80, "val_loss": 0.30},
    ]
    assert select_best(results, key="val_loss", maximize=False)["model"] == "ft"
    assert select_best(results[:3], key="val_loss", maximize=False)["model"] == "gap"
    assert select_best(results)["model"] == "svm"  # by val_accuracy it competes as usual


def test_select_best_names_the_setting_when_no_model_has_the_key():
    results = [{"model": "svm", "val_accuracy": 0.9, "val_loss": None}, {"model": "svm2", "val_accuracy": 0.8}]
    with pytest.raises(SelectionError, match=r"^evaluate\.select_by: got 'val_loss'.*calibrate: false") as err:
        select_best(results, key="val_loss", maximize=False, setting="evaluate.select_by")
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def test_markdown_keeps_text_as_text(tmp_path):
    results = [_result("1e3", 0.9, 0.8, 0.25), _result("a|b", 0.8, 0.7) | {"kind": "finetune"}]
    write_comparison(comparison_table(results), tmp_path / "c.csv", tmp_path / "c.md")
    lines = (tmp_path / "c.md").read_text().splitlines()
    assert lines[2].split("|")[2].strip() == "1e3"  # not parsed as the number 1000
    assert "a\\|b" in lines[3]  # a pipe in a name does not split the cell
    assert lines[1].startswith("|-") and ":|" in lines[1]  # rank is right-aligned
