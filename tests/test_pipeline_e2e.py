"""The real `dvc repro`, end to end, in a temporary copy of the project."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import copy_project, project_env
from transferlab import tracking

pytestmark = pytest.mark.slow
E2E_EPOCHS = 3


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    dest = tmp_path_factory.mktemp("e2e") / "project"
    env = project_env()
    copy_project(dest, env)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["finetune"]["max_epochs"] = E2E_EPOCHS  # the demo default trains longer; CI has 2 cores
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "e2e params"], dest, env)
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
    stages = set(run(["dvc", "stage", "list", "--name-only"], root, env).split())
    assert ran_stages(out) == stages
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
    assert ran_stages(out) == set()
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
    downstream = set(run(["dvc", "stage", "list", "--name-only"], root, env).split()) - {"ingest"}
    assert ran == downstream
    parents = pipeline_runs(root)
    assert len(parents) == 2
    assert child_names(root, parents[1].info.run_id) == sorted(ran)


def test_changing_svm_C_outdates_only_the_svm_heads(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    run(["dvc", "repro"], root, env)  # whatever an earlier test left changed, settle it
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train_head"]["svm"]["C"] *= 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = ran_stages(run(["dvc", "repro", "--dry"], root, env))
    svm_stages = {s for s in run(["dvc", "stage", "list", "--name-only"], root, env).split() if s.endswith("-svm")}
    assert svm_stages and dry == svm_stages
    status = json.loads(run(["dvc", "status", "--json"], root, env))
    assert set(status) == svm_stages


def test_evaluate_reports_every_model_on_test_and_dvc_reads_them(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    run(["dvc", "repro"], root, env)
    metrics = json.loads((root / "reports/metrics.json").read_text())
    n_test = int((pd.read_csv(root / "data/split.csv")["part"] == "test").sum())
    assert set(metrics) == {"efficientnet_lite0-linear", "efficientnet_lite0-gap", "efficientnet_lite0-svm",
                            "efficientnet_lite0-finetune"}
    for figures in metrics.values():
        assert figures["n"] == n_test
        assert figures["accuracy_ci_low"] <= figures["accuracy"] <= figures["accuracy_ci_high"]
    table = (root / "reports/comparison.md").read_text()
    assert table.count("efficientnet_lite0-") == 4
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root, env))
    assert "reports/metrics.json" in json.dumps(shown)
    # stdout only: dvc warns on stderr that HEAD has no metrics yet
    diff = json.loads(subprocess.run(["dvc", "metrics", "diff", "--json"], cwd=root, env=env,
                                     capture_output=True, text=True, check=True).stdout)
    gap = diff["reports/metrics.json"]["efficientnet_lite0-gap.accuracy"]
    assert gap["old"] is None and gap["new"] == metrics["efficientnet_lite0-gap"]["accuracy"]
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
    import psutil

    root, env = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["finetune"]["lr"] /= 2  # a new setting: the stage trains from scratch
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.Popen(["dvc", "repro"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if re.search(r"finetune@\S+ epoch 1/", line):
            break  # epoch 1 finished and checkpointed; epoch 2 is starting
    else:
        pytest.fail("finetune never finished its first epoch")
    stage = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if any("pipeline/finetune.py" in part for part in p.cmdline())]
    assert stage, "the finetune stage process was not found"
    for p in stage:
        p.kill()  # SIGKILL: no cleanup, as when a machine dies
    proc.communicate()
    assert proc.returncode != 0
    out = run(["dvc", "repro"], root, env)
    assert re.search(r"resuming finetune@\S+ from checkpoint: epoch 1 of \d+ finished", out), out
    assert (root / "models/finetune/efficientnet_lite0/model.safetensors").exists()
