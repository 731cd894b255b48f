import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from transferlab import tracking


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("TRANSFERLAB_EXECUTION", "exec-1")
    (tmp_path / "params.yaml").write_text("split: {seed: 1}\n")
    return tmp_path


def children(root: Path, parent: str) -> list:
    c = tracking.client(root)
    exp = tracking.experiment_id(root)
    return c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def test_default_store_is_sqlite_under_mlruns(store: Path) -> None:
    uri = tracking.tracking_uri(store)
    assert uri == f"sqlite:///{(store / 'mlruns' / 'mlflow.db').resolve().as_posix()}"


def test_env_uri_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5999"


def test_stages_of_one_execution_share_a_parent(store: Path) -> None:
    with tracking.stage_run("ingest", {"max_side": 64}, store / "a.json", root=store) as run:
        run.log_metrics({"kept": 3})
        run.log_history({"loss": [3.0, 2.0, 1.0]})
    with tracking.stage_run("split", {"seed": 1}, store / "b.json", root=store):
        pass
    a = json.loads((store / "a.json").read_text())
    b = json.loads((store / "b.json").read_text())
    assert a["parent_run_id"] == b["parent_run_id"]
    kids = children(store, a["parent_run_id"])
    assert sorted(r.info.run_name for r in kids) == ["ingest", "split"]
    ingest = next(r for r in kids if r.info.run_name == "ingest")
    assert ingest.data.params["max_side"] == "64"
    assert ingest.data.tags[tracking.TAG_PARAMS_HASH] == tracking.stable_hash({"max_side": 64})
    assert {tracking.TAG_COMMIT, tracking.TAG_DIRTY} <= set(ingest.data.tags)
    history = tracking.client(store).get_metric_history(ingest.info.run_id, "loss")
    assert [m.value for m in history] == [3.0, 2.0, 1.0]
    assert "MLFLOW_RUN_ID" not in os.environ


def test_new_execution_gets_new_parent_and_exp_name_tag(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with tracking.stage_run("split", {}, store / "a.json", root=store):
        pass
    monkeypatch.setenv("TRANSFERLAB_EXECUTION", "exec-2")
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-tree")
    with tracking.stage_run("split", {}, store / "b.json", root=store):
        pass
    a = json.loads((store / "a.json").read_text())
    b = json.loads((store / "b.json").read_text())
    assert a["parent_run_id"] != b["parent_run_id"]
    run = tracking.client(store).get_run(b["run_id"])
    assert run.data.tags[tracking.TAG_EXP_NAME] == "bushy-tree"


def test_failed_stage_marks_run_failed_and_writes_no_record(store: Path) -> None:
    with pytest.raises(RuntimeError):
        with tracking.stage_run("ingest", {}, store / "rec.json", root=store):
            raise RuntimeError("boom")
    assert not (store / "rec.json").exists()
    c = tracking.client(store)
    runs = c.search_runs([tracking.experiment_id(store)], filter_string="attributes.run_name = 'ingest'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_execution_key_follows_dvc_invoker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two launches by two `dvc` processes give two keys; one launch, one key."""
    monkeypatch.delenv("TRANSFERLAB_EXECUTION", raising=False)
    fake = tmp_path / "dvc"
    code = "from transferlab import tracking; print(tracking.execution_key('.'))"
    fake.write_text(f"#!/bin/sh\n'{sys.executable}' -c \"{code}\"\n'{sys.executable}' -c \"{code}\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    first = subprocess.run([str(fake)], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    second = subprocess.run([str(fake)], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert first[0] == first[1]
    assert second[0] == second[1]
    assert first[0] != second[0]
