"""One MLflow child run per stage, inside one parent run per pipeline execution.

Each stage run is tagged with the process that runs it (host, pid and start
time). When a stage starts, runs of this host still marked RUNNING whose process
is gone -- a stage killed with SIGKILL, a machine that lost power -- are marked
KILLED, and so is their parent, so nothing shows as running for ever. A stage
that fails with an exception marks its run and its parent FAILED.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from transferlab.config import read_yaml
from transferlab.io import atomic_write_text
from transferlab.tracking.execution import EXP_NAME_ENV, execution_key, git_state, host_id, is_alive, this_process
from transferlab.tracking.store import (
    Store, TrackingError, is_remote, lost_connection, open_store, unreachable_reason,
)

TAG_KIND = "transferlab.kind"
TAG_KEY = "transferlab.execution_key"
TAG_STAGE = "transferlab.stage"
TAG_PARAMS_HASH = "transferlab.params_hash"
TAG_HOST = "transferlab.host"
TAG_PROCESS = "transferlab.process"
TAG_COMMIT = "git.commit"
TAG_DIRTY = "git.dirty"
TAG_EXP_NAME = "dvc.exp_name"
TAG_PARENT = "mlflow.parentRunId"
TAG_USER = "mlflow.user"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
KIND_PIPELINE, KIND_STAGE = "pipeline", "stage"
RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
BATCH = 1000  # MLflow's documented per-request limit for metrics in log_batch
PARAMS_PER_BATCH = 100  # MLflow's per-request limit for params in log_batch
PARAM_CHARS = 6000  # MLflow's limit on a param value's length
PARENT_LOCK_TIMEOUT_S = 60  # finding or creating a parent takes a few requests; a held lock this long is stuck


def stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _log_params(c: Any, run_id: str, flat: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:PARAM_CHARS]) for k, v in flat.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        c.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])


def who() -> str:
    """The user a run belongs to: the tracking server's login when there is one, else this machine's user."""
    try:
        return os.environ.get(USERNAME_ENV) or getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry and no $USER
        return "unknown"


def _base_tags(root: str | Path, key: str) -> dict[str, str]:
    commit, dirty = git_state(root)
    # mlflow.user is what MLflow makes a run's user_id of (the UI's "User" column)
    tags = {TAG_COMMIT: commit, TAG_DIRTY: str(dirty).lower(), TAG_KEY: key, TAG_USER: who()}
    exp_name = os.environ.get(EXP_NAME_ENV)
    if exp_name:
        tags[TAG_EXP_NAME] = exp_name
    return tags


def _owner_tags(owner: str | None = None) -> dict[str, str]:
    """Where the stage runs: this host, and the process doing the work (``owner``, else this one)."""
    return {TAG_HOST: host_id(), TAG_PROCESS: owner or this_process()}


def _parents(store: Store, key: str) -> list[Any]:
    return list(store.client.search_runs(
        [store.experiment_id], filter_string=f"tags.`{TAG_KEY}` = '{key}' and tags.`{TAG_KIND}` = '{KIND_PIPELINE}'",
    ))


def _first(runs: list[Any]) -> Any:
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def _parent_lock(store: Store, key: str) -> Any:
    """A lock file per (store, execution) in the system's temp folder, shared by every stage on this host.

    The stages of one execution run on one machine (DVC launches them), so a
    host-wide lock is enough to make finding-or-creating the parent atomic, for
    a local store and for a server alike.
    """
    from filelock import FileLock

    name = f"transferlab-parent-{stable_hash([store.uri, store.experiment_id, key])}.lock"
    return FileLock(Path(tempfile.gettempdir()) / name, timeout=PARENT_LOCK_TIMEOUT_S)


def parent_run(store: Store, root: str | Path, key: str, owner: str | None = None) -> str:
    """Id of the pipeline run for this execution, created on first use.

    Finding and creating happen under one lock, so two stages that start at
    the same moment (queued experiments, parallel ``dvc exp run``) find or
    create one parent between them, never two.
    """
    with _parent_lock(store, key):
        found = _parents(store, key)
        if found:
            return str(_first(found).info.run_id)
        tags = _base_tags(root, key) | {TAG_KIND: KIND_PIPELINE} | _owner_tags(owner)
        run = store.client.create_run(store.experiment_id,
                                      run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}", tags=tags)
    mine = str(run.info.run_id)
    params_file = Path(root) / "params.yaml"
    if params_file.exists():  # the whole params.yaml on the parent: executions compare even when few stages ran
        _log_params(store.client, mine, _flatten(read_yaml(params_file) or {}))
    return mine


def mark_orphans(store: Store, keep: frozenset[str] = frozenset()) -> list[str]:
    """Mark KILLED the RUNNING stage runs of this host whose process is gone, and their parents."""
    here = host_id()
    running = store.client.search_runs(
        [store.experiment_id],
        filter_string=f"attributes.status = '{RUNNING}' and tags.`{TAG_KIND}` = '{KIND_STAGE}' "
                      f"and tags.`{TAG_HOST}` = '{here}'",
    )
    killed = []
    for run in running:
        owner = run.data.tags.get(TAG_PROCESS, "")
        if owner and not is_alive(owner):
            store.client.set_terminated(run.info.run_id, status=KILLED)
            killed.append(run.info.run_id)
            parent = run.data.tags.get(TAG_PARENT)
            if parent and parent not in keep:
                store.client.set_terminated(parent, status=KILLED)
    return killed


@dataclass(frozen=True)
class Execution:
    """One pipeline execution as MLflow recorded it."""

    run_id: str
    name: str
    tags: dict[str, str]
    params: dict[str, str]
    test: dict[str, dict[str, float]]  # model -> test figure -> value (from its evaluate run)


def executions(root: str | Path = ".") -> list[Execution]:
    """Pipeline executions that reached the evaluate stage, newest first."""
    store = open_store(root)
    c, exp = store.client, store.experiment_id
    parents = c.search_runs([exp], filter_string=f"tags.`{TAG_KIND}` = '{KIND_PIPELINE}'",
                            order_by=["start_time DESC"])
    evaluated = c.search_runs([exp], filter_string=f"tags.`{TAG_STAGE}` = 'evaluate' and "
                                                   f"attributes.status = '{FINISHED}'", order_by=["start_time DESC"])
    latest_eval: dict[str, Any] = {}
    for run in evaluated:
        latest_eval.setdefault(run.data.tags.get(TAG_PARENT, ""), run)
    out = []
    for parent in parents:
        ev = latest_eval.get(parent.info.run_id)
        if ev is not None:
            out.append(Execution(parent.info.run_id, parent.info.run_name, dict(parent.data.tags),
                                 dict(parent.data.params), _test_figures(ev.data.metrics)))
    return out


def _test_figures(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        prefix, _, rest = key.partition("/")
        model, _, figure = rest.partition("/")
        if prefix == "test" and figure:
            figures.setdefault(model, {})[figure] = value
    return figures


@dataclass
class StageRun:
    """Handle a stage uses to log into its own MLflow run."""

    run_id: str
    parent_run_id: str
    stage: str
    _client: Any

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        _log_params(self._client, self.run_id, _flatten(params, prefix))

    def log_metrics(self, metrics: Mapping[str, float | None], step: int = 0) -> None:
        # None (a figure a model does not have, e.g. an uncalibrated SVM's loss) is not logged
        self.log_history({k: [float(v)] for k, v in metrics.items() if v is not None}, first_step=step)

    def log_history(self, series: Mapping[str, list[float]], first_step: int = 0) -> None:
        """Log whole metric curves (one value per step) in a few batched calls."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(name, float(v), now, first_step + i)
            for name, values in series.items()
            for i, v in enumerate(values)
            if v is not None
        ]
        for i in range(0, len(metrics), BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[i : i + BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self._client.log_artifacts(self.run_id, str(p), artifact_path)
        elif p.exists():
            self._client.log_artifact(self.run_id, str(p), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        self._client.log_dict(self.run_id, obj, name)


def begin_stage_run(store: Store, stage: str, params: Mapping[str, Any], root: str | Path = ".",
                    owner: str | None = None) -> tuple[StageRun, str]:
    """Open a stage's child run under this execution's parent and log its params; (handle, execution key).

    ``owner`` is the identity of the process doing the stage's work (default:
    this one), which :func:`mark_orphans` checks; the tracking helper process
    (:mod:`~transferlab.tracking.sidecar`) passes the stage's.
    """
    key = execution_key(root)
    with server_kept(store, stage):
        parent = parent_run(store, root, key, owner)
        mark_orphans(store, keep=frozenset({parent}))
        tags = _base_tags(root, key) | _owner_tags(owner) | {
            TAG_KIND: KIND_STAGE, TAG_STAGE: stage, TAG_PARAMS_HASH: stable_hash(dict(params)), TAG_PARENT: parent,
        }
        # the store's own client, not MLflow's fluent run stack: nothing process-wide changes per stage
        run = store.client.create_run(store.experiment_id, run_name=stage, tags=tags)
        handle = StageRun(str(run.info.run_id), parent, stage, store.client)
    try:
        with server_kept(store, stage):
            handle.log_params(params)
    except BaseException:
        end_stage_run(store, handle, FAILED)
        raise
    return handle, key


def end_stage_run(store: Store, handle: StageRun, status: str) -> None:
    """Best effort: mark a stage run and its parent ``status`` (FAILED, KILLED); a server that is gone cannot be told."""
    with contextlib.suppress(Exception):
        store.client.set_terminated(handle.run_id, status=status)
        store.client.set_terminated(handle.parent_run_id, status=status)


def finish_stage_run(store: Store, handle: StageRun, key: str, record: str | Path) -> None:
    """Mark the run and its parent FINISHED, then write the run record atomically to ``record``."""
    with server_kept(store, handle.stage):
        store.client.set_terminated(handle.run_id, status=FINISHED)
        store.client.set_terminated(handle.parent_run_id, status=FINISHED)  # moves the parent's end time along
    info = {"stage": handle.stage, "run_id": handle.run_id, "parent_run_id": handle.parent_run_id,
            "experiment_id": store.experiment_id, "tracking_uri": store.uri, "execution_key": key}
    atomic_write_text(record, json.dumps(info, indent=2) + "\n")


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], record: str | Path, root: str | Path = ".",
              store: Store | None = None) -> Iterator[StageRun]:
    """One MLflow child run for one stage, inside this execution's parent run.

    On success the run record (run ids, store, stage) is written atomically to
    ``record``, a declared output of the stage, so outputs restored from the DVC
    cache still name the run that produced them. A stage that raises marks its
    run and the parent FAILED and writes no record.
    """
    store = store or open_store(root)
    handle, key = begin_stage_run(store, stage, params, root)
    try:
        with server_kept(store, stage):
            yield handle
    except BaseException:
        end_stage_run(store, handle, FAILED)
        raise
    finish_stage_run(store, handle, key, record)


@contextlib.contextmanager
def server_kept(store: Store, stage: str) -> Iterator[None]:
    """A tracking server lost mid-stage becomes one TrackingError line; DVC then records no outputs.

    The stage fails rather than finishing unlogged: its outputs would otherwise
    be cached with no run to name them, and `dvc repro` reruns a failed stage
    (a fine-tuning resumes from its checkpoint) once the server is back.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - MLflow and requests raise many kinds for one lost server
        from mlflow.exceptions import MlflowException
        from requests.exceptions import RequestException

        client_error = isinstance(exc, (MlflowException, RequestException))
        if not (client_error and is_remote(store.uri) and lost_connection(str(exc))):
            raise
        raise TrackingError(f"lost the MLflow tracking server {store.uri} during {stage} "
                            f"({unreachable_reason(str(exc))}); the stage failed and DVC records none of its "
                            "outputs: run `dvc repro` again once the server is back") from None


def link_test_figures(run: StageRun, training_record: str | Path, model: str, figures: Mapping[str, Any]) -> None:
    """Log a model's test figures in the evaluate run and in the run that trained it."""
    flat = {k: float(v) for k, v in _flatten(figures).items() if isinstance(v, (int, float))}
    run.log_metrics({f"test/{model}/{k}": v for k, v in flat.items()})
    record = Path(training_record)
    if not record.exists():
        return  # trained before run records existed: the evaluate run still has the figures
    trained = json.loads(record.read_text())["run_id"]
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException

    now = int(time.time() * 1000)
    try:
        run._client.log_batch(trained, metrics=[Metric(f"test_{k}", v, now, 0) for k, v in flat.items()],
                              tags=[RunTag("transferlab.evaluated_by", run.run_id)])
    except MlflowException as err:  # a record restored from another store names an unknown run
        print(f"evaluate: could not link {model} to its training run {trained}: {err.message}")
        return
    run.set_tags({f"transferlab.trained_by.{model}": trained})
