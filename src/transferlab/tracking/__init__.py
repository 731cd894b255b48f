"""The MLflow side of the pipeline: the project's store, stage runs in one parent per execution, compare.

- :mod:`~transferlab.tracking.store`: where the store is, one client per stage, failing fast;
- :mod:`~transferlab.tracking.execution`: what one pipeline execution is (the execution key);
- :mod:`~transferlab.tracking.runs`: stage runs, their parent, orphaned runs, executions for ``compare``;
- :mod:`~transferlab.tracking.sidecar`: a stage's tracker, MLflow opened in a helper process
  (:mod:`~transferlab.tracking.helper`) while the stage imports torch;
- :mod:`~transferlab.tracking.compare`: executions side by side.

The model registry (the champion) is :mod:`transferlab.serving.registry`: tracking never imports serving.
"""

from transferlab.tracking.execution import dvc_invoker, execution_key, git_state
from transferlab.tracking.runs import (
    TAG_COMMIT,
    TAG_DIRTY,
    TAG_EXP_NAME,
    TAG_HOST,
    TAG_KEY,
    TAG_KIND,
    TAG_PARAMS_HASH,
    TAG_PROCESS,
    TAG_STAGE,
    Execution,
    StageRun,
    executions,
    link_test_figures,
    mark_orphans,
    stable_hash,
    stage_run,
)
from transferlab.tracking.sidecar import Tracker, start
from transferlab.tracking.store import (
    EXPERIMENT,
    REGISTRY_ENV,
    STORE_DIR,
    TRACKING_ENV,
    Store,
    TrackingError,
    client,
    experiment_id,
    open_store,
    project_root,
    tracking_uri,
)

__all__ = [
    "EXPERIMENT", "REGISTRY_ENV", "STORE_DIR", "TAG_COMMIT", "TAG_DIRTY",
    "TAG_EXP_NAME", "TAG_HOST", "TAG_KEY", "TAG_KIND", "TAG_PARAMS_HASH", "TAG_PROCESS", "TAG_STAGE",
    "TRACKING_ENV", "Execution", "StageRun", "Store", "Tracker", "TrackingError", "client",
    "dvc_invoker", "execution_key", "executions", "experiment_id", "git_state", "link_test_figures",
    "mark_orphans", "open_store", "project_root", "stable_hash", "stage_run", "start",
    "tracking_uri",
]
