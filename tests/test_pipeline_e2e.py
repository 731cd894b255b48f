"""The real `dvc repro`, end to end, in a temporary copy of the project."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pandas as pd
import pytest
import torch
import yaml

from helpers import copy_project, kill_tree, project_env, run_queue, stage_processes, output as run
from transferlab import cli, tracking
from transferlab import device as device_module
from transferlab.training import finetune as finetune_training

pytestmark = pytest.mark.slow
E2E_EPOCHS = 3
QUEUE_WAIT_S = 900



def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


PREFLIGHT = "preflight"  # runs on every repro (always_changed), logs no MLflow run, makes nothing stale


def work_stages(root: Path, env: dict[str, str]) -> set[str]:
    return set(run(["dvc", "stage", "list", "--name-only"], root, env).split()) - {PREFLIGHT}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    dest = tmp_path_factory.mktemp("e2e") / "project"
    env = project_env()
    # the demo default trains longer; CI has 2 cores
    copy_project(dest, env, edit=lambda p: p["finetune"].update(max_epochs=E2E_EPOCHS))
    run(["transferlab", "data", "get"], dest, env)
    return dest, env


def pipeline_runs(root: Path) -> list:
    c = tracking.client(root)
    exp = tracking.experiment_id(root)
    return c.search_runs([exp], filter_string=f"tags.`{tracking.TAG_KIND}` = 'pipeline'", order_by=["start_time ASC"])


def child_names(root: Path, parent_id: str) -> list[str]:
    c = tracking.client(root)
    exp = tracking.experiment_id(root)
    kids = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return sorted(r.info.run_name for r in kids)


def test_repro_runs_every_stage_and_logs_one_parent(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    out = run(["dvc", "repro"], root, env)
    stages = work_stages(root, env)
    assert ran_stages(out) == stages | {PREFLIGHT}
    parents = pipeline_runs(root)
    assert len(parents) == 1
    assert child_names(root, parents[0].info.run_id) == sorted(stages)
    record = json.loads((root / "data/split.run.json").read_text())
    assert record["parent_run_id"] == parents[0].info.run_id
    child = tracking.client(root).get_run(record["run_id"])
    assert child.data.tags[tracking.TAG_COMMIT] == run(["git", "rev-parse", "HEAD"], root, env).strip()
    assert tracking.TAG_PARAMS_HASH in child.data.tags
    report = json.loads((root / "data/prepared/report.json").read_text())
    assert report["counts"] == {"faces": 100, "non_faces": 100}


def test_each_image_forwarded_once_per_backbone(project: tuple[Path, dict[str, str]]) -> None:
    root, _ = project
    split = pd.read_csv(root / "data/split.csv")
    backbones = yaml.safe_load((root / "params.yaml").read_text())["extract"]["backbones"]
    for name in backbones:
        manifest = json.loads((root / "data/features" / name / "manifest.json").read_text())
        assert manifest["images_forwarded"] == len(split)
        ids = []
        for part in manifest["parts"]:
            ids += pd.read_csv(root / "data/features" / name / f"{part}.index.csv")["path"].tolist()
        assert sorted(ids) == sorted(split["path"])


def test_second_repro_skips_everything(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    out = run(["dvc", "repro"], root, env)
    assert ran_stages(out) == {PREFLIGHT}
    assert "didn't change" in out
    assert len(pipeline_runs(root)) == 1


def test_changing_split_seed_reruns_split_and_downstream_only(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["split"]["seed"] += 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], root, env)
    ran = ran_stages(out)
    assert "split" in ran and "ingest" not in ran
    downstream = work_stages(root, env) - {"ingest"}
    assert ran == downstream | {PREFLIGHT}
    parents = pipeline_runs(root)
    assert len(parents) == 2
    assert child_names(root, parents[1].info.run_id) == sorted(downstream)


def test_changing_svm_C_outdates_only_the_svm_heads(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    run(["dvc", "repro"], root, env)  # whatever an earlier test left changed, settle it
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train_head"]["svm"]["C"] *= 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = ran_stages(run(["dvc", "repro", "--dry"], root, env))
    svm_stages = {s for s in work_stages(root, env) if s.endswith("-svm")}
    assert svm_stages and dry == svm_stages | {PREFLIGHT}
    status = json.loads(run(["dvc", "status", "--json"], root, env))
    assert set(status) == svm_stages | {PREFLIGHT}
    assert "always changed" in status[PREFLIGHT]


def test_evaluate_reports_every_model_on_test_and_dvc_reads_them(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    run(["dvc", "repro"], root, env)
    metrics = json.loads((root / "reports/metrics.json").read_text())
    n_test = int((pd.read_csv(root / "data/split.csv")["part"] == "test").sum())
    assert set(metrics) == {"efficientnet_lite0-linear", "efficientnet_lite0-gap", "efficientnet_lite0-svm",
                            "efficientnet_lite0-knn", "efficientnet_lite0-finetune"}
    for figures in metrics.values():
        assert figures["n"] == n_test
        assert figures["accuracy_ci_low"] <= figures["accuracy"] <= figures["accuracy_ci_high"]
    table = (root / "reports/comparison.md").read_text()
    assert table.count("efficientnet_lite0-") == 5
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root, env))
    assert "reports/metrics.json" in json.dumps(shown)
    # stdout only: dvc warns on stderr that HEAD has no metrics yet
    diff = json.loads(subprocess.run(["dvc", "metrics", "diff", "--json"], cwd=root, env=env,
                                     capture_output=True, text=True, check=True).stdout)
    gap = diff["reports/metrics.json"]["efficientnet_lite0-gap.accuracy"]
    assert gap["old"] is None and gap["new"] == metrics["efficientnet_lite0-gap"]["accuracy"]
    for model in metrics:  # two classes: one ROC curve, of the positive class
        assert [p.name for p in (root / "reports/roc" / model).iterdir()] == ["class-non_faces.csv"]
    run(["dvc", "plots", "show", "-o", str(root / "plots_out")], root, env)
    assert (root / "plots_out" / "index.html").exists()


def test_predict_with_the_registered_champion(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    images = [str(root / "data/raw/faces/face_000.png"), str(root / "data/raw/non_faces/non_face_000.png")]
    out = run(["transferlab", "predict", *images, "--out", str(root / "pred.csv")], root, env)
    predictions = pd.read_csv(root / "pred.csv")
    assert len(predictions) == 2, out
    assert set(predictions.columns) >= {"path", "label"}
    assert list(predictions["label"]) == ["faces", "non_faces"]


def test_experiment_then_compare_shows_both_executions(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    run(["dvc", "repro"], root, env)
    run(["dvc", "exp", "run", "-S", "finetune.strategy=full"], root, env)
    out = run(["transferlab", "compare"], root, env)
    assert "finetune.strategy" in out and "last_blocks" in out and "full" in out
    assert out.count("efficientnet_lite0-finetune") == 1  # one row, both executions side by side
    assert "Params that differ" in out


def test_killed_finetune_resumes_on_next_repro(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["finetune"]["lr"] /= 2  # a new setting: the stage trains from scratch
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.Popen(["dvc", "repro"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if re.search(r"finetune@\S+ epoch 1/", line):
                break  # epoch 1 finished and checkpointed; epoch 2 is starting
        else:
            pytest.fail("finetune never finished its first epoch")
        stage = stage_processes(proc, "pipeline/finetune.py")
        assert stage, "the finetune stage process was not found"
        for p in stage:
            p.kill()  # SIGKILL: no cleanup, as when a machine dies
        proc.communicate()
    finally:
        kill_tree(proc)
    assert proc.returncode != 0
    out = run(["dvc", "repro"], root, env)
    assert re.search(r"resuming finetune@\S+ from checkpoint: epoch 1 of \d+ finished", out), out
    assert (root / "models/finetune/efficientnet_lite0/model.safetensors").exists()


def test_queued_experiments_run_in_parallel_and_land_in_the_one_store(project: tuple[Path, dict[str, str]]) -> None:
    """As a user would after `make demo`: two queued experiments, two workers, no extra setup."""
    root, env = project
    run(["dvc", "repro"], root, env)
    c, exp = tracking.client(root), tracking.experiment_id(root)
    before = {r.info.run_id for r in c.search_runs([exp])}
    for lr in ("0.002", "0.0005"):
        run(["dvc", "exp", "run", "--queue", "-S", f"finetune.lr={lr}"], root, env)
    status = run_queue(root, env, jobs=2, wait_s=QUEUE_WAIT_S)
    assert status.count("Success") >= 2 and "Failed" not in status, status

    shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env))
    exps = [e for commit in shown for e in (commit.get("experiments") or [])]
    lrs = set()
    for entry in exps:
        for revision in entry["revs"]:
            data = revision["data"]
            lrs.add(str(data["params"]["params.yaml"]["data"]["finetune"]["lr"]))
            assert data["metrics"]["reports/metrics.json"]["data"]["efficientnet_lite0-finetune"]["accuracy"] >= 0
    assert {"0.002", "0.0005"} <= lrs

    out = run(["transferlab", "compare", "--all"], root, env)
    assert "finetune.lr" in out and "0.002" in out and "0.0005" in out
    new = [r for r in c.search_runs([exp]) if r.info.run_id not in before]
    names = sorted(r.info.run_name for r in new if r.data.tags.get(tracking.TAG_KIND) == "stage")
    assert names.count("evaluate") == 2 and names.count("finetune@efficientnet_lite0") == 2, names
    assert {r.info.status for r in new} == {"FINISHED"}
    assert len([r for r in new if r.data.tags.get(tracking.TAG_KIND) == "pipeline"]) == 2


class ReachedModel(Exception):
    """Raised by the spy when a module gets its first input on the meta device."""


@pytest.fixture
def meta_spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, torch.device, torch.device]]]:
    """Every stage's device resolves to ``meta``; the first module fed a meta tensor stops the stage.

    A meta tensor has a shape and no data, so nothing is computed or written:
    the record (module, input device, parameter device) shows where the stage
    sent its tensors and its model. Stage runs are not logged.
    """
    meta = torch.device("meta")
    for module in (device_module, finetune_training):
        monkeypatch.setattr(module, "resolve_device", lambda *a, **k: meta)

    @contextlib.contextmanager
    def no_run(*_: Any, **__: Any) -> Iterator[Any]:
        yield SimpleNamespace()

    class Untracked(tracking.Tracker):
        def stage_run(self, *_: Any, **__: Any) -> Any:
            return no_run()

    monkeypatch.setattr(tracking, "open_store", lambda *a, **k: None)  # evaluate tracks in-process
    monkeypatch.setattr(tracking, "stage_run", no_run)
    monkeypatch.setattr(tracking, "start", lambda *a, **k: Untracked())
    seen: list[tuple[str, torch.device, torch.device]] = []

    def spy(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if tensors and tensors[0].device == meta:
            param = next(module.parameters(), tensors[0])
            seen.append((type(module).__name__, tensors[0].device, param.device))
            raise ReachedModel

    handle = torch.nn.modules.module.register_module_forward_pre_hook(spy)
    yield seen
    handle.remove()


def load_stage(root: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", root / "pipeline" / f"{name}.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    if hasattr(stage, "resolve_device"):  # `from transferlab.device import resolve_device` in the stage
        monkeypatch.setattr(stage, "resolve_device", lambda *a, **k: torch.device("meta"))
    return stage


def test_every_stage_and_predict_send_tensors_and_model_to_the_resolved_device(
    project: tuple[Path, dict[str, str]], meta_spy: list, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root, _ = project
    monkeypatch.chdir(root)
    backbone = "efficientnet_lite0"
    images = [str(root / "data/raw/faces/face_000.png")]
    # not the probe: it forwards no image, it reads the block vectors extract kept (tests/test_features.py)
    calls = {
        "extract": lambda: load_stage(root, "extract", monkeypatch).main([backbone, "--out", str(tmp_path / "f")]),
        "train_head": lambda: load_stage(root, "train_head", monkeypatch).main(
            [backbone, "gap", "--out", str(tmp_path / "h")]),
        "finetune": lambda: load_stage(root, "finetune", monkeypatch).main([backbone, "--out", str(tmp_path / "t")]),
        "evaluate": lambda: load_stage(root, "evaluate", monkeypatch).main(["--reports", str(tmp_path / "r")]),
        "predict (predictor directory)": lambda: cli.main(["predict", *images, "--model", "models/champion"]),
        "predict (registered champion)": lambda: cli.main(["predict", *images]),
    }
    for what, call in calls.items():
        meta_spy.clear()
        with pytest.raises(ReachedModel):
            call()
        assert len(meta_spy) == 1, what
        module, inputs, weights = meta_spy[0]
        assert (inputs.type, weights.type) == ("meta", "meta"), f"{what}: {module} got {inputs}, weights on {weights}"


CENTROID_MODULE = '''"""A nearest-centroid head: the registry's example, added by a test as a user would add a head."""

import numpy as np
import scipy.special
from pydantic import Field
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from transferlab.config import Section
from transferlab.models.heads import persistence
from transferlab.models.heads.registry import register_head


class CentroidParams(Section):
    shrink: float = Field(0.0, ge=0, le=1)


@register_head("centroid", params=CentroidParams, reads="pooled")
class CentroidHead(ClassifierMixin, BaseEstimator):
    def __init__(self, shrink: float = CentroidParams().shrink):
        self.shrink = shrink

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        self.classes_, index = np.unique(y, return_inverse=True)
        centroids = np.stack([X[index == k].mean(axis=0) for k in range(len(self.classes_))])
        self.centroids_ = (1 - self.shrink) * centroids + self.shrink * X.mean(axis=0)
        self.n_params_ = int(self.centroids_.size)
        return self

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return scipy.special.softmax(-((X[:, None] - self.centroids_[None]) ** 2).sum(axis=2), axis=1)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def save(self, path):
        meta = persistence.head_meta(self, n_features_in=int(self.n_features_in_))
        persistence.save_arrays(path, {"centroids": self.centroids_}, meta)

    def _restore(self, meta, path):
        self.classes_ = np.asarray(meta["classes"])
        self.n_features_in_ = int(meta["n_features_in"])
        self.centroids_ = persistence.load_arrays(path)["centroids"]
'''


def test_a_head_added_as_a_module_and_a_params_section_trains_through_dvc_repro(
    project: tuple[Path, dict[str, str]]
) -> None:
    """The two edits of README's "Adding a head", then `dvc repro`: train_head@<backbone>-centroid, evaluated."""
    root, env = project
    (root / "src/transferlab/models/heads/centroid.py").write_text(CENTROID_MODULE)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train_head"]["kinds"].append("centroid")
    params["train_head"]["centroid"] = {"shrink": 0.1}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "a centroid head"], root, env)
    # the copy's own src, as a clone installed with `pip install -e .` would import it
    out = run(["dvc", "repro"], root, env | {"PYTHONPATH": str(root / "src")})
    backbones = params["extract"]["backbones"]
    assert {f"train_head@{b}-centroid" for b in backbones} <= ran_stages(out)
    for b in backbones:
        metrics = json.loads((root / f"models/heads/{b}/centroid/metrics.json").read_text())
        assert metrics["val_accuracy"] > 0.5 and metrics["params_trainable"] > 0
    table = pd.read_csv(root / "reports/comparison.csv")
    assert {f"{b}-centroid" for b in backbones} <= set(table["model"])
    assert "train_head@" + backbones[0] + "-centroid" in child_names(root, pipeline_runs(root)[-1].info.run_id)
