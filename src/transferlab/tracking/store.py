"""Where the project's MLflow store is, and one client to it per stage.

Store
    By default a SQLite database ``mlruns/mlflow.db`` with artifacts under
    ``mlruns/artifacts``, both in the *project's* root: ``$DVC_ROOT`` when DVC
    runs the stage (for queued and ``--temp`` experiments DVC points it at the
    project, not at the temporary workspace it deletes afterwards), else the
    main working tree of the git repository (found through the git common
    directory, so every worktree shares one store), else the folder given.
    ``MLFLOW_TRACKING_URI`` points everything at a server instead.

Failing fast
    MLflow retries a failed HTTP request 7 times with a backoff factor of 2 and a
    120 s timeout: over 4 minutes of silence for a server that is down. Unless the
    user set them, the retries are capped (:data:`HTTP_DEFAULTS`), and
    :func:`open_store` first asks the server one cheap question with a short
    timeout, so a wrong address fails within seconds, before any work, with one
    line naming the URI.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from transferlab.errors import UserError

EXPERIMENT = "transferlab"
STORE_DIR = "mlruns"
STORE_DB = "mlflow.db"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
REGISTRY_ENV = "MLFLOW_REGISTRY_URI"
DVC_ROOT_ENV = "DVC_ROOT"
# Applied only where the user set nothing: at most ~20 s of retries for a request that keeps failing.
HTTP_DEFAULTS = MappingProxyType({
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
})
PROBE_TIMEOUT_S = 5
PROBE_RETRIES = 1
PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/get-by-name"
HTTP_OK, HTTP_NOT_FOUND = 200, 404
HTTP_AUTH = (401, 403)


class TrackingError(UserError):
    """The MLflow store cannot be reached or refuses us."""


def project_root(root: str | Path = ".") -> Path:
    """The project whose ``mlruns/`` holds the store: $DVC_ROOT, else git's main worktree, else ``root``."""
    if os.environ.get(DVC_ROOT_ENV):
        return Path(os.environ[DVC_ROOT_ENV]).resolve()
    try:
        common = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError, NotADirectoryError):
        return Path(root).resolve()
    common_dir = Path(common)
    return common_dir.parent if common_dir.name == ".git" else Path(root).resolve()


def tracking_uri(root: str | Path = ".") -> str:
    env = os.environ.get(TRACKING_ENV)
    if env:
        return env
    return f"sqlite:///{(project_root(root) / STORE_DIR / STORE_DB).as_posix()}"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _artifact_root(root: str | Path) -> str | None:
    if os.environ.get(TRACKING_ENV):
        return None  # the server decides
    return (project_root(root) / STORE_DIR / "artifacts").as_uri()


def store_missing(root: str | Path) -> bool:
    """True when no server is named and the local store was never created (opening it would create it)."""
    return not os.environ.get(TRACKING_ENV) and not (project_root(root) / STORE_DIR / STORE_DB).exists()


def cap_http_retries() -> None:
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


# what the many nested requests/urllib3 messages for "nobody answers" boil down to
_REASONS = (("Connection refused", "connection refused"), ("NewConnectionError", "connection refused"),
            ("Name or service not known", "unknown host"), ("Failed to resolve", "unknown host"),
            ("timed out", f"no answer within {PROBE_TIMEOUT_S} s"), ("Timeout", f"no answer within {PROBE_TIMEOUT_S} s"),
            ("SSLError", "TLS handshake failed"))


def unreachable_reason(text: str) -> str:
    return next((short for needle, short in _REASONS if needle in text),
                text.split(" failed with exception ")[-1][:120])


def lost_connection(text: str) -> bool:
    """Whether an error's text says the server did not answer (not that it answered with an error)."""
    return any(needle in text for needle, _ in _REASONS) or "Max retries exceeded" in text


def probe(uri: str) -> None:
    """One quick request to a tracking server; TrackingError naming ``uri`` if it is down or refuses us."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), PROBE_ENDPOINT, "GET", max_retries=PROBE_RETRIES,
                                backoff_factor=1, timeout=PROBE_TIMEOUT_S, raise_on_status=False,
                                params={"experiment_name": EXPERIMENT})
    except Exception as exc:  # noqa: BLE001 - requests/urllib3 raise many kinds for one "unreachable"
        reason = unreachable_reason(str(exc))
        raise TrackingError(f"cannot reach the MLflow tracking server {uri} ({reason}); start it, fix "
                            f"{TRACKING_ENV}, or unset it to use the project's local store") from None
    if response.status_code in HTTP_AUTH:
        raise TrackingError(f"the MLflow tracking server {uri} refused the login (HTTP {response.status_code}); "
                            "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if response.status_code not in (HTTP_OK, HTTP_NOT_FOUND):
        raise TrackingError(f"the MLflow tracking server {uri} answered HTTP {response.status_code} "
                            f"({response.text[:120]!r}); is it an MLflow server?")


def _point_mlflow_at(uri: str) -> str:
    """Make ``uri`` MLflow's tracking store and, unless the user named one, its registry; return the registry.

    MLflow's fluent API (``log_model``, ``load_model``) reads these process-wide
    settings; they are set once, when a store is opened.
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


@dataclass(frozen=True)
class Store:
    """An opened MLflow store: its URIs, one client and the project's experiment."""

    uri: str
    registry_uri: str
    client: Any  # mlflow.tracking.MlflowClient
    experiment_id: str
    root: Path  # the project root whose mlruns/ holds a local store


def open_store(root: str | Path = ".", probe_server: bool = True) -> Store:
    """Open the project's store (creating the local one and the experiment on first use)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    cap_http_retries()
    uri = tracking_uri(root)
    if is_remote(uri) and probe_server:
        probe(uri)
    if uri.startswith("sqlite:"):
        (project_root(root) / STORE_DIR).mkdir(parents=True, exist_ok=True)
    registry = _point_mlflow_at(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=registry)
    try:
        exp = _experiment(client, root)
    except MlflowException as exc:
        raise TrackingError(f"the MLflow store {uri} failed: {str(exc.message).splitlines()[0][:300]}") from None
    return Store(uri, registry, client, exp, project_root(root))


def _experiment(client: Any, root: str | Path) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(EXPERIMENT, artifact_location=_artifact_root(root)))
    except Exception:  # created concurrently by another stage
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            raise
        return str(exp.experiment_id)


def client(root: str | Path = ".") -> Any:
    return open_store(root).client


def experiment_id(root: str | Path = ".") -> str:
    return open_store(root).experiment_id
