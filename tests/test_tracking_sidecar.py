"""A stage's tracking in a helper process (tracking.sidecar): the same runs as in-process, errors where they belong."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transferlab import tracking
from transferlab.tracking.execution import this_process
from transferlab.tracking.runs import StageRun
from transferlab.tracking.sidecar import FORWARDED, Sidecar


@pytest.fixture()
def store(tracked_project: Path) -> Path:
    (tracked_project / "report.json").write_text('{"kept": 3}\n')  # an artifact to log
    return tracked_project


def _log_everything(run: object, root: Path) -> None:
    run.log_metrics({"kept": 3, "missing": None})
    run.log_history({"loss": [3.0, 2.0, 1.0]}, first_step=1)
    run.set_tags({"recommendation": "head_only"})
    run.log_dict({"a": 1}, "counts.json")
    run.log_artifact(root / "report.json", "reports")


def _summary(root: Path, record: Path) -> dict:
    info = json.loads(record.read_text())
    client = tracking.client(root)
    run = client.get_run(info["run_id"])
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") and k != tracking.TAG_PROCESS}
    return {
        "record": sorted(info), "parent": info["parent_run_id"], "status": run.info.status, "name": run.info.run_name,
        "params": run.data.params, "metrics": run.data.metrics, "tags": tags,
        "history": [(m.step, m.value) for m in client.get_metric_history(info["run_id"], "loss")],
        "artifacts": sorted(a.path for a in client.list_artifacts(info["run_id"])) +
                     sorted(a.path for a in client.list_artifacts(info["run_id"], "reports")),
    }


def test_the_helper_logs_what_in_process_tracking_logs(store: Path) -> None:
    with tracking.stage_run("ingest", {"max_side": 64}, store / "local.json", root=store) as run:
        _log_everything(run, store)
    with tracking.start(store) as tracker:
        assert isinstance(tracker, Sidecar)
        with tracker.stage_run("ingest", {"max_side": 64}, store / "helper.json") as run:
            _log_everything(run, store)
    local, helper = _summary(store, store / "local.json"), _summary(store, store / "helper.json")
    assert helper == local  # one parent (the same execution), the same params, metrics, tags, curve, artifacts
    assert helper["status"] == "FINISHED" and helper["history"] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    # the run names the stage's process (which orphan marking watches), not the helper's
    run_id = json.loads((store / "helper.json").read_text())["run_id"]
    assert tracking.client(store).get_run(run_id).data.tags[tracking.TAG_PROCESS] == this_process()


def test_a_failing_stage_raises_its_own_error_marks_failed_and_writes_no_record(store: Path) -> None:
    with tracking.start(store) as tracker:
        with pytest.raises(ValueError, match="boom"):
            with tracker.stage_run("split", {}, store / "rec.json"):
                raise ValueError("boom")
    assert not (store / "rec.json").exists()
    runs = tracking.client(store).search_runs([tracking.experiment_id(store)], "attributes.run_name = 'split'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_killed_stage_is_marked_killed_by_its_helper_at_once(store: Path) -> None:
    """SIGKILL leaves no stage code to end the run: the helper sees the pipe close and marks it KILLED."""
    code = (
        "import os, signal; from transferlab import tracking\n"
        "tracker = tracking.start('.')\n"
        "with tracker.stage_run('extract', {}, 'r.json') as run:\n"
        "    print(run.run_id, flush=True); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=store, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9
    run_id = done.stdout.strip()
    client = tracking.client(store)
    deadline = time.monotonic() + 60
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "KILLED"
    assert not (store / "r.json").exists()


def test_an_unreachable_server_fails_the_stage_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = "http://127.0.0.1:9"  # discard port: nothing listens
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with tracking.start(tmp_path) as tracker, pytest.raises(tracking.TrackingError) as err:
        with tracker.stage_run("split", {}, tmp_path / "rec.json"):
            pytest.fail("the stage body ran without a store")
    assert time.monotonic() - started < 60
    assert uri in str(err.value) and "\n" not in str(err.value)


def test_a_helper_that_died_fails_the_stage_clearly(store: Path) -> None:
    tracker = Sidecar(store)
    try:
        tracker._proc.kill()
        with pytest.raises(tracking.TrackingError, match="tracking process exited"):
            with tracker.stage_run("split", {}, store / "rec.json"):
                pass
    finally:
        tracker.close()


def test_the_stages_handle_forwards_exactly_stage_run_methods() -> None:
    assert FORWARDED <= {name for name in vars(StageRun) if not name.startswith("_")}
    from transferlab.tracking.sidecar import RemoteRun

    handle = RemoteRun(None, "r", "p", "split")  # type: ignore[arg-type]
    with pytest.raises(AttributeError, match="forwards"):
        handle._client  # noqa: B018 - the in-process client is not reachable through the helper


def test_the_environment_can_keep_tracking_in_process(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFERLAB_TRACKING_HELPER", "0")
    with tracking.start(store) as tracker:
        assert not isinstance(tracker, Sidecar) and tracker.store.uri == tracking.tracking_uri(store)


def test_without_background_the_store_opens_in_process(store: Path) -> None:
    with tracking.start(store, background=False) as tracker:
        assert tracker.store.uri == tracking.tracking_uri(store)
        with tracker.stage_run("split", {"seed": 1}, store / "rec.json") as run:
            assert isinstance(run, StageRun)
    assert json.loads((store / "rec.json").read_text())["stage"] == "split"
    assert os.environ.get("MLFLOW_RUN_ID") is None
