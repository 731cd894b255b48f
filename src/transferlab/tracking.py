"""Every MLflow call of transferlab lives in this module.

Store
    By default a SQLite database ``mlruns/mlflow.db`` (absolute path) with
    artifacts under ``mlruns/artifacts``; MLflow 3.13+ refuses the plain file
    store. ``MLFLOW_TRACKING_URI`` points everything at a server instead.

What counts as one pipeline execution
    All stages that one ``dvc repro`` / ``dvc exp run`` / ``make demo`` runs are
    children of one parent run. Stages run as separate processes, so they agree
    on an *execution key*: a hash of

    - the git commit and dirty flag,
    - ``DVC_EXP_NAME`` (set by ``dvc exp run``),
    - the hash of the whole ``params.yaml``,
    - the identity (pid + start time) of the ``dvc`` process that launched the
      stage, found by walking up the process tree (Linux ``/proc``).

    The first stage to run creates the parent run, tagged with the key; the next
    stages find it by that tag. Without a ``dvc`` ancestor (a stage run by
    hand, or a platform without ``/proc``) the first three parts alone decide.
    ``TRANSFERLAB_EXECUTION`` overrides the whole key when set.
    ``MLFLOW_RUN_ID`` is never exported; links go through ``parent_run_id``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from transferlab.io import atomic_write_text

EXPERIMENT = "transferlab"
STORE_DIR = "mlruns"
TAG_KIND = "transferlab.kind"
TAG_KEY = "transferlab.execution_key"
TAG_STAGE = "transferlab.stage"
TAG_PARAMS_HASH = "transferlab.params_hash"
TAG_COMMIT = "git.commit"
TAG_DIRTY = "git.dirty"
TAG_EXP_NAME = "dvc.exp_name"
BATCH = 1000  # MLflow's documented per-request limit for metrics in log_batch
PARAMS_PER_BATCH = 100  # MLflow's per-request limit for params in log_batch
PARAM_CHARS = 6000  # MLflow's limit on a param value's length
TRACKING_ENV = "MLFLOW_TRACKING_URI"
REGISTRY_ENV = "MLFLOW_REGISTRY_URI"


def tracking_uri(root: str | Path = ".") -> str:
    env = os.environ.get(TRACKING_ENV)
    if env:
        return env
    db = (Path(root).resolve() / STORE_DIR / "mlflow.db").as_posix()
    return f"sqlite:///{db}"


def _artifact_root(root: str | Path) -> str | None:
    if os.environ.get(TRACKING_ENV):
        return None  # the server decides
    return (Path(root).resolve() / STORE_DIR / "artifacts").as_uri()


def _point_mlflow_at(uri: str) -> str:
    """Make ``uri`` MLflow's tracking store and, unless the user named one, its registry.

    Returns the registry URI.
    """
    import mlflow

    users = {name: os.environ.get(name) for name in (TRACKING_ENV, REGISTRY_ENV)}
    registry = users[REGISTRY_ENV] or uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry)
    for name, value in users.items():
        # MLflow exports both URIs to the environment; tracking_uri() reads the
        # variable as the user's choice, so an exported one would pin every later
        # root of this process (tests, the CLI) to the first store it opened.
        if value is None:
            os.environ.pop(name, None)
    return registry


def client(root: str | Path = ".") -> Any:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    if uri.startswith("sqlite:"):
        (Path(root).resolve() / STORE_DIR).mkdir(parents=True, exist_ok=True)
    registry = _point_mlflow_at(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=registry)


def experiment_id(root: str | Path = ".", name: str = EXPERIMENT) -> str:
    c = client(root)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(c.create_experiment(name, artifact_location=_artifact_root(root)))
    except Exception:  # created concurrently by another stage
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def git_state(root: str | Path = ".") -> tuple[str, bool]:
    """(commit, dirty) of the repo at ``root``; ("none", True) outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "none", True
    return commit, dirty


def _proc_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces; fields after the closing paren are fixed
    return stat.rsplit(")", 1)[1].split()[19]


def _is_dvc(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [Path(a.decode(errors="replace")).name for a in argv[:3]]
    return "dvc" in words


def dvc_invoker() -> str | None:
    """pid:start-time of the nearest ``dvc`` ancestor process, if any."""
    pid = os.getppid()
    for _ in range(32):
        if pid <= 1:
            return None
        if _is_dvc(pid):
            start = _proc_start(pid)
            return f"{pid}:{start}" if start else None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return None


def execution_key(root: str | Path = ".", params_file: str | Path = "params.yaml") -> str:
    override = os.environ.get("TRANSFERLAB_EXECUTION")
    if override:
        return override
    commit, dirty = git_state(root)
    path = Path(root) / params_file
    params_digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""
    parts = [commit, str(dirty), os.environ.get("DVC_EXP_NAME", ""), params_digest, dvc_invoker() or ""]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _base_tags(root: str | Path, key: str) -> dict[str, str]:
    commit, dirty = git_state(root)
    tags = {TAG_COMMIT: commit, TAG_DIRTY: str(dirty).lower(), TAG_KEY: key}
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags[TAG_EXP_NAME] = exp_name
    return tags


def parent_run(root: str | Path = ".", key: str | None = None) -> str:
    """Id of the pipeline run for this execution, created on first use."""
    c = client(root)
    exp = experiment_id(root)
    key = key or execution_key(root)
    found = c.search_runs(
        [exp],
        filter_string=f"tags.`{TAG_KEY}` = '{key}' and tags.`{TAG_KIND}` = 'pipeline'",
        max_results=1,
    )
    if found:
        return str(found[0].info.run_id)
    tags = _base_tags(root, key) | {TAG_KIND: "pipeline"}
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    run = c.create_run(exp, run_name=f"pipeline {when}", tags=tags)
    _log_all_params(c, str(run.info.run_id), Path(root) / "params.yaml")
    return str(run.info.run_id)


def _log_all_params(c: Any, run_id: str, params_file: Path) -> None:
    """The whole params.yaml on the parent, so executions compare even when few stages ran."""
    import yaml

    if not params_file.exists():
        return
    _log_params(c, run_id, _flatten(yaml.safe_load(params_file.read_text()) or {}))


def _log_params(c: Any, run_id: str, flat: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:PARAM_CHARS]) for k, v in flat.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        c.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])


@dataclass(frozen=True)
class Execution:
    """One pipeline execution as MLflow recorded it."""

    run_id: str
    name: str
    start_ms: int
    tags: dict[str, str]
    params: dict[str, str]
    test: dict[str, dict[str, float]]  # model -> test figure -> value (from its evaluate run)


def executions(root: str | Path = ".") -> list[Execution]:
    """Pipeline executions that reached the evaluate stage, newest first."""
    c = client(root)
    exp = experiment_id(root)
    parents = c.search_runs([exp], filter_string=f"tags.`{TAG_KIND}` = 'pipeline'", order_by=["start_time DESC"])
    evaluated = c.search_runs([exp], filter_string=f"tags.`{TAG_STAGE}` = 'evaluate'", order_by=["start_time DESC"])
    latest_eval: dict[str, Any] = {}
    for run in evaluated:
        latest_eval.setdefault(run.data.tags.get("mlflow.parentRunId", ""), run)
    out = []
    for parent in parents:
        ev = latest_eval.get(parent.info.run_id)
        if ev is not None:
            out.append(Execution(parent.info.run_id, parent.info.run_name, parent.info.start_time,
                                 dict(parent.data.tags), dict(parent.data.params), _test_figures(ev.data.metrics)))
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

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_history({k: [float(v)] for k, v in metrics.items()}, first_step=step)

    def log_history(self, series: Mapping[str, list[float]], first_step: int = 0) -> None:
        """Log whole metric curves (one value per step) in a few batched calls."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(name, float(v), now, first_step + i)
            for name, values in series.items()
            for i, v in enumerate(values)
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


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    record: str | Path,
    root: str | Path = ".",
) -> Iterator[StageRun]:
    """One MLflow child run for one stage, inside this execution's parent run.

    On success the run record (run ids, store, stage) is written atomically to
    ``record``, a declared output of the stage, so outputs restored from the DVC
    cache still name the run that produced them.
    """
    c = client(root)
    exp = experiment_id(root)
    key = execution_key(root)
    parent = parent_run(root, key)
    tags = _base_tags(root, key) | {
        TAG_KIND: "stage",
        TAG_STAGE: stage,
        TAG_PARAMS_HASH: stable_hash(dict(params)),
    }
    import mlflow

    run = mlflow.start_run(run_name=stage, experiment_id=exp, parent_run_id=parent, tags=tags)
    handle = StageRun(str(run.info.run_id), parent, stage, c)
    try:
        handle.log_params(params)
        yield handle
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")
    c.set_terminated(parent, status="FINISHED")  # moves the parent's end time along
    info = {
        "stage": stage,
        "run_id": handle.run_id,
        "parent_run_id": parent,
        "experiment_id": exp,
        "tracking_uri": tracking_uri(root),
        "execution_key": key,
    }
    atomic_write_text(record, json.dumps(info, indent=2) + "\n")


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
        run._client.log_batch(
            trained,
            metrics=[Metric(f"test_{k}", v, now, 0) for k, v in flat.items()],
            tags=[RunTag("transferlab.evaluated_by", run.run_id)],
        )
    except MlflowException as err:  # a record restored from another store names an unknown run
        print(f"evaluate: could not link {model} to its training run {trained}: {err.message}")
        return
    run.set_tags({f"transferlab.trained_by.{model}": trained})


# ---------------------------------------------------------------- model registry

CHAMPION_ALIAS = "champion"
LOGGED_MODEL_NAME = "model"  # the pyfunc's name inside the evaluate run
TAG_CHAMPION = "transferlab.champion"
# What the pyfunc imports when it loads (transferlab.serving and its imports),
# pinned to the versions it was logged with. Listing them saves MLflow's
# requirement inference, which loads the model again in a subprocess.
SERVING_DISTRIBUTIONS = (
    "mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "pillow", "scipy", "scikit-learn",
    "safetensors", "pyyaml", "tqdm",
)
MODEL_METADATA_KEYS = ("kind", "backbone", "weights", "classes")


class ChampionNotFoundError(LookupError):
    """No model carries the champion alias in the registry."""


def _pinned(distribution: str) -> str:
    from importlib.metadata import version

    # local labels (torch's "+cpu") name a build from another index; pip on PyPI cannot resolve them
    return f"{distribution}=={version(distribution).split('+')[0]}"


def serving_requirements() -> list[str]:
    return [_pinned(name) for name in SERVING_DISTRIBUTIONS]


def serving_signature(classes: list[str]) -> Any:
    """Optional ``path`` (string) and ``image`` (binary) in; label, probability, p_<class>..., error out.

    transferlab.serving explains why arrays travel as encoded bytes, not as a
    column or tensor of their own.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from transferlab import serving

    inputs = Schema([ColSpec("string", serving.PATH, required=False), ColSpec("binary", serving.IMAGE, required=False)])
    outputs = Schema([
        ColSpec("string", serving.LABEL, required=False),
        ColSpec("double", serving.PROBABILITY, required=False),
        *[ColSpec("double", serving.proba_column(c), required=False) for c in classes],
        ColSpec("string", serving.ERROR, required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_champion(run: StageRun, predictor_dir: Path, registered_name: str, input_example_image: Path) -> str:
    """Log predictor directory ``predictor_dir`` as a pyfunc in ``run``, register it, alias it champion.

    ``input_example_image``: an image file whose bytes become the input
    example (MLflow checks at log time that the model serves it). Returns the
    new model version.
    """
    import mlflow
    import pandas as pd

    from transferlab import serving
    from transferlab.predictor import read_spec

    active = mlflow.active_run()
    if active is None or active.info.run_id != run.run_id:
        raise RuntimeError(f"log_champion needs stage run {run.run_id} active (tracking.stage_run starts it)")
    spec = read_spec(predictor_dir)
    # log_model registers through MLflow's globals: point them at this run's store again
    _point_mlflow_at(run._client.tracking_uri)
    info = mlflow.pyfunc.log_model(
        name=LOGGED_MODEL_NAME,
        python_model=serving.ImageClassifier(),
        artifacts={serving.PREDICTOR_ARTIFACT: str(predictor_dir)},
        # the package travels with the model: it loads with the code it was logged with
        code_paths=[str(Path(serving.__file__).parent)],
        signature=serving_signature(list(spec["classes"])),
        input_example=pd.DataFrame({serving.IMAGE: [Path(input_example_image).read_bytes()]}),
        pip_requirements=serving_requirements(),
        metadata={key: spec.get(key) for key in MODEL_METADATA_KEYS},
        registered_model_name=registered_name,
    )
    version = str(info.registered_model_version)
    run._client.set_registered_model_alias(registered_name, CHAMPION_ALIAS, version)
    run.set_tags({TAG_CHAMPION: f"models:/{registered_name}/{version}"})
    return version


def _store_missing(root: str | Path) -> bool:
    # opening a missing SQLite store would create an empty one in whatever folder the user is in
    return not os.environ.get(TRACKING_ENV) and not (Path(root) / STORE_DIR / "mlflow.db").exists()


def load_champion(registered_name: str, root: str | Path = ".") -> Any:
    """The pyfunc registered as ``models:/<registered_name>@champion`` in the store at ``root``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    hint = "run `dvc repro` (its evaluate stage registers the champion) or use a predictor directory"
    if _store_missing(root):
        raise ChampionNotFoundError(f"no MLflow store at {Path(root) / STORE_DIR}: {hint}")
    registry = client(root)
    try:
        registry.get_model_version_by_alias(registered_name, CHAMPION_ALIAS)
    except MlflowException as err:
        raise ChampionNotFoundError(
            f"no model registered as {registered_name}@{CHAMPION_ALIAS} in {mlflow.get_registry_uri()}: {hint}"
        ) from err
    return mlflow.pyfunc.load_model(f"models:/{registered_name}@{CHAMPION_ALIAS}")
