"""A team's tracking server, for real: PostgreSQL, moto's S3 and `transferlab server` with logins, on 127.0.0.1.

The pipeline runs through `dvc repro` in a temporary project copy whose only
settings are a teammate's: MLFLOW_TRACKING_URI and a username and password in
the environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from helpers import copy_project, kill_tree, project_env, run_queue
from servers import ADMIN, ADMIN_PASSWORD, BUCKET, S3_KEY, S3_SECRET, TrackingServer, postgres, s3, wait_until

pytestmark = pytest.mark.slow
USER, PASSWORD = "alice", "alice-pw-123456"
EPOCHS = 2
LOST_SERVER_WAIT_S = 300  # the stage must fail within this after its server goes away
QUEUE_WAIT_S = 900


def run(cmd: list[str], cwd: Path, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if ok:
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def as_admin(url: str):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    os.environ.update({"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD})
    return MlflowClient(tracking_uri=url, registry_uri=url)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    tmp = tmp_path_factory.mktemp("team")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    with postgres() as backend, s3() as endpoint:
        srv = TrackingServer(backend, endpoint, tmp / "server.log").start()
        try:
            from mlflow.server import get_app_client

            as_admin(srv.url)
            get_app_client("basic-auth", tracking_uri=srv.url).create_user(USER, PASSWORD)
            yield srv
        finally:
            srv.stop()
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def project(server: TrackingServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("team-project") / "project"
    env = project_env()
    copy_project(root, env, edit=lambda p: p["finetune"].update(max_epochs=EPOCHS, warmup_epochs=1))
    run(["transferlab", "data", "get"], root, env)
    # a teammate's clone: the server and a login from the environment, nothing in git
    return root, env | {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_TRACKING_USERNAME": USER,
                        "MLFLOW_TRACKING_PASSWORD": PASSWORD}


def test_a_wrong_password_is_refused_before_any_work_and_logs_nothing(
    server: TrackingServer, project: tuple[Path, dict[str, str]]
) -> None:
    root, env = project
    c = as_admin(server.url)
    before = len(c.search_experiments())
    done = run(["dvc", "repro"], root, env | {"MLFLOW_TRACKING_PASSWORD": "wrong"}, ok=False)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"the MLflow tracking server {server.url} refused the login (HTTP 401)" in out, out
    assert "Traceback" not in out
    assert "Running stage 'ingest'" not in out  # preflight stopped it before any work
    assert len(c.search_experiments()) == before and c.get_experiment_by_name("transferlab") is None


def _stage_names(root: Path, env: dict[str, str]) -> set[str]:
    return set(run(["dvc", "stage", "list", "--name-only"], root, env).stdout.split()) - {"preflight"}


def test_the_pipeline_logs_to_the_team_server_with_artifacts_in_s3(
    server: TrackingServer, project: tuple[Path, dict[str, str]]
) -> None:
    import boto3

    root, env = project
    run(["dvc", "repro"], root, env)
    c = as_admin(server.url)
    exp = c.get_experiment_by_name("transferlab")
    parents = c.search_runs([exp.experiment_id], filter_string="tags.`transferlab.kind` = 'pipeline'")
    assert len(parents) == 1
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(r.info.run_name for r in kids) == sorted(_stage_names(root, env))
    assert {r.info.status for r in kids} == {"FINISHED"} and {r.info.user_id for r in kids} == {USER}

    version = c.get_model_version_by_alias("transferlab", "champion")
    s3 = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                      region_name="us-east-1")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    evaluate = next(r for r in kids if r.info.run_name == "evaluate")
    assert any(f"/{evaluate.info.run_id}/artifacts/" in k for k in keys), keys[:20]  # its reports
    model_id = version.source.rsplit("/", 1)[-1]  # models:/m-<id>: MLflow 3 stores logged models by id
    assert any(f"/models/{model_id}/" in k and k.endswith("/MLmodel") for k in keys), (version.source, keys[:20])
    assert version.run_id == evaluate.info.run_id

    image = next(p for p in sorted((root / "data/prepared/images").rglob("*")) if p.is_file())
    out = run(["transferlab", "predict", str(image), "--top-k", "1"], root, env).stdout
    assert image.name in out


def test_a_server_lost_mid_stage_fails_that_stage_clearly_and_the_next_repro_finishes(
    server: TrackingServer, project: tuple[Path, dict[str, str]]
) -> None:
    root, env = project
    run(["dvc", "repro"], root, env)  # up to date (a no-op after the test above)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["finetune"]["seed"] = 1  # finetune and evaluate are stale now
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.Popen(["dvc", "repro"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    c = as_admin(server.url)
    exp_id = c.get_experiment_by_name("transferlab").experiment_id

    def finetune_run_open() -> bool:
        return bool(c.search_runs([exp_id], filter_string="attributes.run_name LIKE 'finetune@%' and "
                                                          "attributes.status = 'RUNNING'"))

    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Running stage 'finetune@"):
                wait_until(finetune_run_open, "the finetune stage's run", timeout=120)
                server.stop()  # inside the stage: its run is open on the server, training goes on
                stopped = time.monotonic()
                break
        rest, _ = proc.communicate(timeout=LOST_SERVER_WAIT_S)
        waited = time.monotonic() - stopped
    finally:
        kill_tree(proc)
    out = "".join(lines) + rest
    assert proc.returncode != 0, out
    assert re.search(rf"finetune: error: lost the MLflow tracking server {re.escape(server.url)} during "
                     r"finetune@\S+ \(connection refused\)", out), out[-3000:]
    assert "Traceback" not in out and waited < LOST_SERVER_WAIT_S
    status = run(["dvc", "status", "--json"], root, env).stdout
    assert any(k.startswith("finetune@") for k in json.loads(status)), status  # DVC recorded none of its outputs

    server.start()
    out = run(["dvc", "repro"], root, env).stdout
    assert "Running stage 'finetune@" in out and "Running stage 'evaluate'" in out
    c = as_admin(server.url)
    exp = c.get_experiment_by_name("transferlab")
    assert not c.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")
    finetunes = c.search_runs([exp.experiment_id], filter_string="attributes.run_name LIKE 'finetune@%'",
                              order_by=["start_time ASC"])
    assert [r.info.status for r in finetunes][-2:] == ["KILLED", "FINISHED"]  # the lost run, then the rerun


def test_two_queued_experiments_at_once_land_on_the_server_whole(
    server: TrackingServer, project: tuple[Path, dict[str, str]]
) -> None:
    root, env = project
    run(["git", "commit", "-qam", "finetune seed 1"], root, env)
    run(["dvc", "repro"], root, env)  # the workspace up to date: the experiments rerun finetune and evaluate only
    c = as_admin(server.url)
    exp_id = c.get_experiment_by_name("transferlab").experiment_id
    before = {r.info.run_id for r in c.search_runs([exp_id])}
    for lr in ("0.002", "0.0005"):
        run(["dvc", "exp", "run", "--queue", "-S", f"finetune.lr={lr}"], root, env)
    status = run_queue(root, env, jobs=2, wait_s=QUEUE_WAIT_S)
    assert status.count("Success") >= 2 and "Failed" not in status, status
    new = [r for r in c.search_runs([exp_id]) if r.info.run_id not in before]
    parents = [r for r in new if r.data.tags.get("transferlab.kind") == "pipeline"]
    assert len(parents) == 2 and {r.info.status for r in new} == {"FINISHED"}
    for parent in parents:  # none lost, none merged: each experiment's stages under its own parent
        kids = sorted(r.info.run_name for r in new if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
        assert kids == ["evaluate", "finetune@efficientnet_lite0"], kids
    assert {p.data.params["finetune.lr"] for p in parents} == {"0.002", "0.0005"}
