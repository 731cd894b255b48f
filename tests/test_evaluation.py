"""The train_head and evaluate stages with a head that has no probabilities (SVM, calibrate: false).

A synthetic feature store stands in for `extract`; MLflow is replaced by a
recording client behind the real StageRun, so None values meet the real logging code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from transferlab import config, tracking
from transferlab.config import EvaluateParams, TrainHeadParams
from transferlab.evaluation.evaluate import backbone_gflops, champion, figures, find_models, score
from transferlab.evaluation.metrics import SelectionError
from transferlab.evaluation.reports import write_reports
from transferlab.models.features import MANIFEST
from transferlab.paths import evaluate_outputs
from transferlab.tracking.runs import StageRun

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "tiny"
CLASSES = ["ant", "bee", "wasp"]


def write_store(store: Path, seed: int = 0) -> None:
    """A pooled-only feature store of three separable classes (what load_part reads)."""
    rng = np.random.default_rng(seed)
    store.mkdir(parents=True)
    for part, n in (("train", 45), ("val", 15), ("test", 15)):
        y = np.arange(n) % len(CLASSES)
        X = (rng.normal(size=(n, 6)) + 3 * np.eye(len(CLASSES), 6)[y]).astype(np.float32)
        save_file({"pooled": torch.from_numpy(X), "labels": torch.from_numpy(y)},
                  str(store / f"{part}.pooled.safetensors"))
        pd.DataFrame({"path": [f"{part}/{i}.jpg" for i in range(n)], "label": [CLASSES[i] for i in y]}).to_csv(
            store / f"{part}.index.csv", index=False)
    (store / MANIFEST).write_text(json.dumps({"classes": CLASSES, "keep_maps": False,
                                              "param_counts": {"total": 100}}))


class RecordingClient:
    """The few MlflowClient calls a stage makes, recorded."""

    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = {}
        self.artifacts: list[str] = []

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = ()) -> None:
        for m in metrics:
            assert isinstance(m.value, float)
            self.metrics.setdefault(m.key, []).append(m.value)

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.artifacts.append(Path(path).name)


def load_stage(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "pipeline" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def uncalibrated_svm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, RecordingClient]:
    """Run pipeline/train_head.py for an SVM with calibrate: false; returns (features root, heads root, client)."""
    features, heads = tmp_path / "features", tmp_path / "models" / "heads"
    write_store(features / BACKBONE)
    params = TrainHeadParams.model_validate({"svm": {"calibrate": False, "C_grid": [0.1, 1.0], "cv": 3}})
    client = RecordingClient()

    @contextlib.contextmanager
    def stage_run(stage: str, logged: Any, record: Path, **_: Any) -> Iterator[StageRun]:
        yield StageRun("run", "parent", stage, client)

    monkeypatch.setattr(config, "load", lambda *a, **k: config.Params().model_copy(update={"train_head": params}))
    class Recording(tracking.Tracker):  # what the stage logs through, in place of the helper process
        def stage_run(self, stage: str, logged: Any, record: Path) -> Any:
            return stage_run(stage, logged, record)

    monkeypatch.setattr(tracking, "start", lambda *a, **k: Recording())
    out = heads / BACKBONE / "svm"
    load_stage("train_head").main([BACKBONE, "svm", "--features", str(features / BACKBONE), "--out", str(out)])
    return features, heads, client


def test_train_head_writes_metrics_without_a_val_loss(uncalibrated_svm):
    _, heads, client = uncalibrated_svm
    metrics = json.loads((heads / BACKBONE / "svm" / "metrics.json").read_text())
    assert metrics["val_loss"] is None  # JSON null, not a crash and not NaN
    assert 0.5 < metrics["val_accuracy"] <= 1.0
    assert "val_loss" not in client.metrics and "val_accuracy" in client.metrics
    assert "model.safetensors" in client.artifacts


def _evaluate(features: Path, heads: Path, reports: Path, select_by: str) -> tuple[list[dict], EvaluateParams]:
    params = EvaluateParams(n_boot=100, select_by=select_by)
    refs = find_models(heads, heads.parent / "finetune", [BACKBONE], ["svm"], [])
    scored = [score(ref, features, pd.DataFrame(), features, batch_size=8) for ref in refs]
    assert scored[0].proba is None
    results = [figures(s, params, None) for s in scored]
    write_reports(scored, results, reports)
    return results, params


def test_evaluate_reports_a_model_without_probabilities(uncalibrated_svm, tmp_path: Path):
    features, heads, _ = uncalibrated_svm
    reports = tmp_path / "reports"
    results, params = _evaluate(features, heads, reports, "val_accuracy")
    (result,) = results
    assert all(key not in result for key in ("log_loss", "ece", "roc", "roc_auc"))
    assert result["val_loss"] is None and result["accuracy"] > 0.5
    assert champion(results, params)["model"] == f"{BACKBONE}-svm"
    assert [p for p in evaluate_outputs(reports) if not p.exists()] == []
    assert list((reports / "roc").iterdir()) == []  # the declared folder exists, with no curve in it
    summary = json.loads((reports / "metrics.json").read_text())[f"{BACKBONE}-svm"]
    assert {"accuracy", "macro_f1", "accuracy_ci_low", "per_class"} <= set(summary)
    assert "log_loss" not in summary and "ece" not in summary
    table = pd.read_csv(reports / "comparison.csv")
    assert table["log_loss"].isna().all() and table["ece"].isna().all()
    cells = (reports / "comparison.md").read_text().splitlines()[2].split("|")
    assert "" in [c.strip() for c in cells[1:-1]]  # missing log loss / ECE: empty cells
    assert (reports / "confusion_png" / f"{BACKBONE}-svm.png").read_bytes()[:4] == b"\x89PNG"


def test_select_by_val_loss_without_any_val_loss_is_a_user_error(uncalibrated_svm, tmp_path: Path):
    features, heads, _ = uncalibrated_svm
    results, params = _evaluate(features, heads, tmp_path / "reports", "val_loss")
    with pytest.raises(SelectionError, match=r"^evaluate\.select_by: got 'val_loss'"):
        champion(results, params)
    # with another model that has a val_loss, that one is chosen, whatever the SVM's accuracy
    other = results[0] | {"model": "other", "val_accuracy": 0.0, "val_loss": 2.0}
    assert champion([*results, other], params)["model"] == "other"


def test_backbone_gflops_on_the_meta_device_equals_a_real_forward_count() -> None:
    """The comparison table's GFLOPs are counted on shapes alone; a forward on real tensors counts the same."""
    from torch.utils.flop_counter import FlopCounterMode

    from transferlab.models.backbones import NO_WEIGHTS, load_backbone

    backbone = load_backbone("mobilenet_v2", weights=NO_WEIGHTS)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        backbone.forward_features(torch.zeros(1, 3, 160, 160))
    assert counter.get_total_flops() > 0
    assert backbone_gflops("mobilenet_v2", 160) == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-12)


def test_report_page_of_a_model_without_probabilities_leaves_out_what_needs_them(uncalibrated_svm, tmp_path: Path):
    from transferlab.evaluation import figures as plots, html
    from transferlab.evaluation.reports import comparison_table

    features, heads, _ = uncalibrated_svm
    reports = tmp_path / "reports"
    results, _ = _evaluate(features, heads, reports, "val_accuracy")
    scored = [score(ref, features, pd.DataFrame(), features, batch_size=8)
              for ref in find_models(heads, heads.parent / "finetune", [BACKBONE], ["svm"], [])]
    drawn = [("ROC", "roc", plots.roc_png(results)), ("Reliability", "reliability", plots.reliability_png(scored, 10))]
    assert [payload for _, _, payload in drawn] == [None, None]  # no probabilities: no curve, no diagram
    page = html.render(comparison_table(results), results, drawn,
                       {f"{BACKBONE}-svm": reports / "confusion_png" / f"{BACKBONE}-svm.png"}, {},
                       {"git commit": "<abc>"})
    assert 'id="roc"' not in page and 'id="reliability"' not in page
    assert f"{BACKBONE}-svm" in page and "&lt;abc&gt;" in page and "<abc>" not in page  # text is escaped
    assert page.count('src="data:image/png;base64,') == 1  # the confusion matrix, embedded
