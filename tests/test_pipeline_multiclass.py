"""The real `dvc repro` on 10 classes (a subset of builtin:digits), and what must fail before any work.

Also: a SIGKILLed extract's MLflow run is marked KILLED by its tracking helper,
and it leaves nothing behind once the next `dvc repro` ran; params typos and an unreachable
tracking server fail at preflight, in seconds, with one line.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from helpers import copy_project, kill_tree, project_env, stage_processes
from transferlab import tracking
from transferlab.data.sources import write_digits

pytestmark = pytest.mark.slow
PER_CLASS = 15  # 150 images of 10 classes: every split part holds each class, svm's 5 folds fit
E2E_EPOCHS = 2
CLASSES = [str(d) for d in range(10)]
KILL_WAIT_S = 300


def run(cmd: list[str], cwd: Path, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if ok:
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def work_stages(root: Path, env: dict[str, str]) -> set[str]:
    return set(run(["dvc", "stage", "list", "--name-only"], root, env).stdout.split()) - {"preflight"}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("digits")
    dest, digits = base / "project", base / "digits"
    env = project_env()
    copy_project(dest, env, edit=lambda p: (p["finetune"].update(max_epochs=E2E_EPOCHS),
                                            p["evaluate"].update(n_boot=200)))
    digits.mkdir()
    write_digits(digits)
    for folder in digits.iterdir():
        for extra in sorted(folder.iterdir())[PER_CLASS:]:
            extra.unlink()
    out = run(["transferlab", "data", "get", str(digits)], dest, env).stdout
    assert "tracked with DVC" in out
    return dest, env


def test_killed_extract_leaves_no_debris_and_no_running_run(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    features = root / "data" / "features"
    proc = subprocess.Popen(["dvc", "repro"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + KILL_WAIT_S
        temps: list[Path] = []
        stage: list[psutil.Process] = []
        while time.monotonic() < deadline and proc.poll() is None:
            temps = [p for p in features.glob(".efficientnet_lite0.*") if p.is_dir() and any(p.iterdir())]
            stage = stage_processes(proc, "pipeline/extract.py") if temps else []
            if stage:
                break
            time.sleep(0.2)
        assert temps and stage, "extract never started writing its feature store"
        for p in stage:
            p.kill()  # SIGKILL: no cleanup, as when a machine dies
        proc.wait(timeout=KILL_WAIT_S)
    finally:
        kill_tree(proc)
    assert proc.returncode != 0
    assert any(p.exists() for p in temps)  # the precondition: debris is there
    c, exp = tracking.client(root), tracking.experiment_id(root)
    (killed,) = c.search_runs([exp], filter_string="tags.`transferlab.stage` = 'extract@efficientnet_lite0'")
    # its tracking helper (a process of its own, which outlives the stage) saw the stage's end of the
    # pipe close and marks the run and its parent KILLED at once, before any other stage runs
    deadline = time.monotonic() + KILL_WAIT_S
    while c.get_run(killed.info.run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert c.get_run(killed.info.run_id).info.status == "KILLED"
    assert c.get_run(killed.data.tags["mlflow.parentRunId"]).info.status == "KILLED"

    out = run(["dvc", "repro"], root, env)
    ran = ran_stages(out.stdout)
    assert "extract@efficientnet_lite0" in ran and "evaluate" in ran
    assert "ingest" not in ran  # finished before the kill: restored from the run cache, not redone
    debris = [p for p in (root / "data").rglob(".*") if p.name != ".gitignore"]
    assert debris == []
    assert c.get_run(killed.info.run_id).info.status == "KILLED"
    statuses = {r.info.status for r in c.search_runs([exp], filter_string="tags.`transferlab.kind` = 'stage'")}
    assert "RUNNING" not in statuses


def test_every_class_has_its_figures_and_curves(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    reports = root / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    expected = {f"{b}-{kind}" for b in params["extract"]["backbones"] for kind in params["train_head"]["kinds"]}
    assert set(metrics) == expected | {f"{b}-finetune" for b in params["finetune"]["backbones"]}
    for model, figures in metrics.items():
        assert sorted(figures["per_class"]) == CLASSES, model
        assert 0.0 <= figures["accuracy"] <= 1.0
        roc = reports / "roc" / model
        assert sorted(p.name for p in roc.iterdir()) == sorted(
            [f"class-{c}.csv" for c in CLASSES] + ["average-macro.csv", "average-micro.csv"])
        curve = pd.read_csv(roc / "average-macro.csv")
        assert list(curve.columns) == ["fpr", "tpr"] and curve["tpr"].iloc[-1] == pytest.approx(1.0)
        confusion = pd.read_csv(reports / "confusion" / f"{model}.csv", dtype=str)
        assert len(confusion) == int((pd.read_csv(root / "data/split.csv")["part"] == "test").sum())
        assert (reports / "confusion_png" / f"{model}.png").stat().st_size > 0
    # registered once, by the evaluate run that finished
    versions = tracking.client(root).search_model_versions("name = 'transferlab'")
    assert len(versions) == 1
    run(["dvc", "plots", "show", "-o", str(root / "plots_out")], root, env)
    assert (root / "plots_out" / "index.html").exists()


@pytest.mark.parametrize("edit, key", [
    ({"train_head": {"lineer": {}}}, "train_head.lineer"),
    ({"finetun": {"lr": 0.01}}, "finetun"),
    ({"extract": {"batchsize": 8}}, "extract.batchsize"),
])
def test_params_typo_fails_before_any_stage_names_the_key(
    project: tuple[Path, dict[str, str]], edit: dict, key: str
) -> None:
    root, env = project
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    for section, values in edit.items():
        params.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        done = run(["dvc", "repro"], root, env, ok=False)
    finally:
        (root / "params.yaml").write_text(original)
    assert done.returncode != 0
    assert ran_stages(done.stdout + done.stderr) == {"preflight"}
    errors = [line for line in done.stderr.splitlines() if line.startswith("preflight: error:")]
    assert len(errors) == 1 and f"'{key}'" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_exponent_float_accepted_as_dvc_reads_it(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    original = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(original.replace("lr: 0.001\n", "lr: 1e-3\n", 1))
    try:
        dry = run(["dvc", "repro", "--dry"], root, env)
        done = run(["python", "pipeline/preflight.py"], root, env)
    finally:
        (root / "params.yaml").write_text(original)
    assert "preflight" in done.stdout and dry.returncode == 0


def test_unreachable_tracking_server_fails_within_30s_in_one_line(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    before = sorted(p.relative_to(root).as_posix() for p in (root / "data").rglob("*"))
    start = time.monotonic()
    done = run(["dvc", "repro", "--force"], root, env | {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, ok=False)
    assert time.monotonic() - start < 30
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("preflight: error:")]
    assert len(errors) == 1 and "http://127.0.0.1:9" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert ran_stages(done.stdout + done.stderr) == {"preflight"}
    assert sorted(p.relative_to(root).as_posix() for p in (root / "data").rglob("*")) == before
