"""Real servers on 127.0.0.1 for the team-server tests: PostgreSQL, moto's S3, `transferlab server`.

Each is a context manager that starts the server in a temporary folder, waits
until it answers, and stops it (and removes what it wrote) on exit. PostgreSQL
refuses to run as root, so under root it runs as the ``postgres`` user, which
Debian's ``postgresql`` package creates (`.ci/run` installs it when missing).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

START_TIMEOUT_S = 90
PG_USER, PG_PASSWORD, PG_DB = "transferlab", "pg-secret", "mlflow"
S3_KEY, S3_SECRET, BUCKET = "testing", "testing", "mlflow-artifacts"
ADMIN, ADMIN_PASSWORD = "admin", "admin-secret-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        pytest.skip(f"PostgreSQL's {name} not found (Debian: apt-get install postgresql)")
    return found


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def wait_until(check, what: str, timeout: float = START_TIMEOUT_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer within {timeout} s")
        time.sleep(0.3)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-1500:]}")


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster with a password login; yields its SQLAlchemy URI.

    Its folder is made under the system's temp folder, not pytest's: pytest's
    is private to root, and the cluster runs as ``postgres`` under root.
    """
    tmp = Path(tempfile.mkdtemp(prefix="transferlab-pg-"))
    data, pwfile = tmp / "pgdata", tmp / "pgpass"
    pwfile.write_text(PG_PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        shutil.chown(pwfile, "postgres")
    port = free_port()
    _run(_as_postgres([pg_bin("initdb"), "-D", str(data), "-U", PG_USER, "--pwfile", str(pwfile),
                       "--auth", "scram-sha-256", "-E", "UTF8"]))
    options = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off"
    try:
        _run(_as_postgres([pg_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(tmp / "pg.log"),
                           "-w", "-t", str(START_TIMEOUT_S), "start"]))
        _run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, PG_DB],
             env=os.environ | {"PGPASSWORD": PG_PASSWORD})
        yield f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{port}/{PG_DB}"
    finally:
        subprocess.run(_as_postgres([pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def s3() -> Iterator[str]:
    """moto's S3 server in this process (a thread) with one bucket; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # its access log would fill every failure report
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    return {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1"}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class TrackingServer:
    """`transferlab server` as a subprocess; start() and stop() may be called again (same port, same stores)."""

    def __init__(self, backend: str, endpoint: str, log: Path, port: int | None = None) -> None:
        self.backend, self.endpoint, self.log = backend, endpoint, log
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return os.environ | s3_env(self.endpoint) | {
            "MLFLOW_BACKEND_STORE_URI": self.backend, "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}

    def start(self) -> "TrackingServer":
        cmd = [str(Path(sys.executable).parent / "transferlab"), "server", "--port", str(self.port),
               "--artifacts-destination", f"s3://{BUCKET}/artifacts", "--workers", "2"]
        with self.log.open("ab") as out:
            # its own process group: stop() ends the server's workers too
            self.proc = subprocess.Popen(cmd, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until(lambda: _answers(self.url) or self.proc.poll() is not None, f"the MLflow server {self.url}")
        except TimeoutError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"transferlab server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # as a machine that goes away: no goodbye
        self.proc.wait(timeout=30)
        self.proc = None
        wait_until(lambda: not _answers(self.url), "the stopped server", timeout=30)
