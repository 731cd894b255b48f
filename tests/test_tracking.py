import json
import multiprocessing
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import ViewType

from transferlab import tracking


@pytest.fixture()
def store(tracked_project: Path) -> Path:
    return tracked_project


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


def test_execution_key_holds_while_dvc_rewrites_a_committed_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC's own workflow commits dvc.lock; `dvc repro` rewrites it after each stage, so the tree turns dirty
    between two stages of one execution. Both stages must still find one parent run."""
    monkeypatch.delenv("TRANSFERLAB_EXECUTION", raising=False)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull}
    (tmp_path / "params.yaml").write_text("split: {seed: 1}\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "locked"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    fake = tmp_path / "dvc"
    code = "from transferlab import tracking; print(tracking.execution_key('.'), tracking.git_state('.')[1])"
    fake.write_text(f"#!/bin/sh\n'{sys.executable}' -c \"{code}\"\necho 'stages: {{}}' >> dvc.lock\n"
                    f"'{sys.executable}' -c \"{code}\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    lines = subprocess.run([str(fake)], cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    (first, first_dirty), (second, second_dirty) = (line.split() for line in lines.splitlines())
    assert (first_dirty, second_dirty) == ("False", "True")  # the lock's rewrite did make the tree dirty
    assert first == second


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's procfs")
def test_process_identity_ignores_a_stepped_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """NTP may step the clock mid-pipeline; psutil then reports another boot time and create_time.
    A live stage must keep its identity: its parent run stays one and it is never marked KILLED."""
    import psutil

    mine = tracking.execution.this_process()
    host = tracking.execution.host_id()
    started = psutil.Process().create_time()
    stepped = psutil.boot_time() + 1.0
    monkeypatch.setattr(psutil, "boot_time", lambda: stepped)
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: stepped)  # what create_time() adds
    assert psutil.Process().create_time() == pytest.approx(started + 1.0)  # the step psutil would see
    assert tracking.execution.this_process() == mine
    assert tracking.execution.host_id() == host
    assert tracking.execution.is_alive(mine)


def test_a_process_that_ended_is_not_alive_even_before_it_is_reaped() -> None:
    import psutil

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    identity = tracking.execution.process_id(psutil.Process(child.pid))
    assert tracking.execution.is_alive(identity)
    assert child.stdin is not None
    child.stdin.close()
    deadline = time.monotonic() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # ended, not reaped yet
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not tracking.execution.is_alive(identity)
    child.wait()
    assert not tracking.execution.is_alive(identity)


def test_store_is_the_projects_from_dvc_root_or_git_common_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queued and --temp experiments run in a workspace DVC deletes: they must log to the project's store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project, workspace = tmp_path / "project", tmp_path / "exps" / "tmp123"
    workspace.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert tracking.project_root(workspace) == project.resolve()

    monkeypatch.delenv("DVC_ROOT")
    main = tmp_path / "main"
    main.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=main, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=main, check=True)
    subprocess.run([*git, "worktree", "add", "-q", str(tmp_path / "wt")], cwd=main, check=True)
    (main / "sub").mkdir()
    assert tracking.project_root(tmp_path / "wt") == main.resolve()
    assert tracking.project_root(main / "sub") == main.resolve()
    assert tracking.tracking_uri(tmp_path / "wt").endswith(f"{main.resolve().as_posix()}/mlruns/mlflow.db")


def test_unreachable_server_fails_fast_with_one_line_naming_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    uri = "http://127.0.0.1:9"  # discard port: nothing listens
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in tracking.store.HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError) as err:
        tracking.open_store(tmp_path)
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert uri in message and "\n" not in message
    # the caps were applied only because the user set nothing
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.store.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_user_retry_settings_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    tracking.store.cap_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"


def test_killed_stage_run_and_parent_are_marked_killed(store: Path) -> None:
    """A stage SIGKILLed mid-run leaves RUNNING runs; the next stage marks them KILLED."""
    code = (
        "import os, signal, pathlib; from transferlab import tracking\n"
        "with tracking.stage_run('extract', {}, pathlib.Path('r.json'), root='.'):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "TRANSFERLAB_EXECUTION": "exec-killed"}
    done = subprocess.run([sys.executable, "-c", code], cwd=store, env=env, capture_output=True)
    assert done.returncode == -9
    c, exp = tracking.client(store), tracking.experiment_id(store)
    (orphan,) = c.search_runs([exp], filter_string="tags.`transferlab.stage` = 'extract'")
    assert orphan.info.status == "RUNNING"

    with tracking.stage_run("extract", {}, store / "r.json", root=store):
        pass
    assert c.get_run(orphan.info.run_id).info.status == "KILLED"
    assert c.get_run(orphan.data.tags["mlflow.parentRunId"]).info.status == "KILLED"
    assert not (store / "r.json").exists() or json.loads((store / "r.json").read_text())["run_id"] != orphan.info.run_id


def test_live_stage_runs_are_not_marked(store: Path) -> None:
    """A stage still running in another process (a parallel queued experiment) is left alone."""
    code = (
        "import sys, pathlib; from transferlab import tracking\n"
        "with tracking.stage_run('extract', {}, pathlib.Path('r.json'), root='.') as run:\n"
        "    print(run.run_id, flush=True); sys.stdin.readline()\n"
    )
    env = {**os.environ, "TRANSFERLAB_EXECUTION": "exec-live"}
    live = subprocess.Popen([sys.executable, "-c", code], cwd=store, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert live.stdout is not None
        run_id = live.stdout.readline().strip()
        with tracking.stage_run("train_head", {}, store / "b.json", root=store):
            pass
        assert tracking.client(store).get_run(run_id).info.status == "RUNNING"
    finally:
        live.communicate("\n", timeout=60)
    assert tracking.client(store).get_run(run_id).info.status == "FINISHED"


def _stage_at_barrier(root: str, name: str, barrier: Any) -> None:
    os.environ["TRANSFERLAB_EXECUTION"] = "exec-race"
    barrier.wait()
    with tracking.stage_run(name, {}, Path(root) / f"{name}.json", root=root):
        pass


def test_stages_starting_at_the_same_moment_create_one_parent(store: Path) -> None:
    tracking.open_store(store)  # the store and experiment exist, as after preflight
    ctx = multiprocessing.get_context("spawn")
    names = [f"stage{i}" for i in range(4)]
    barrier = ctx.Barrier(len(names))
    procs = [ctx.Process(target=_stage_at_barrier, args=(str(store), n, barrier)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * len(names)
    parents = {json.loads((store / f"{n}.json").read_text())["parent_run_id"] for n in names}
    assert len(parents) == 1
    c = tracking.client(store)
    pipelines = c.search_runs([tracking.experiment_id(store)], filter_string=f"tags.`{tracking.TAG_KIND}` = 'pipeline'",
                              run_view_type=ViewType.ALL)
    assert [r.info.run_id for r in pipelines] == list(parents)  # none created and deleted either


def test_a_stage_run_leaves_mlflow_process_state_alone(store: Path) -> None:
    import mlflow

    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    with tracking.stage_run("split", {}, store / "a.json", root=store) as run:
        assert mlflow.active_run() is None  # logged through the store's client, not the fluent run stack
        assert tracking.client(store).get_run(run.run_id).info.status == "RUNNING"
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")} == before


def test_runs_belong_to_the_servers_login_else_this_machines_user(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import getpass

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    with tracking.stage_run("split", {}, store / "a.json", root=store):
        pass
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    with tracking.stage_run("ingest", {}, store / "b.json", root=store):
        pass
    c = tracking.client(store)
    a, b = (json.loads((store / f).read_text()) for f in ("a.json", "b.json"))
    assert c.get_run(a["run_id"]).info.user_id == "alice"
    assert c.get_run(b["run_id"]).info.user_id == getpass.getuser()
    assert c.get_run(a["parent_run_id"]).info.user_id == "alice"
