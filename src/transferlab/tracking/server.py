"""A team's tracking server: MLflow on PostgreSQL, artifacts proxied to S3, logins on (``transferlab server``).

What it starts is MLflow's own server (``mlflow server``); this module only
checks what a team gets wrong first, in a few seconds each and with one line
naming what to fix, then starts it:

- the backend store (a PostgreSQL URI) must accept a connection;
- the artifact destination (``s3://bucket[/prefix]``, any S3-compatible
  endpoint through ``MLFLOW_S3_ENDPOINT_URL``) must name a bucket that exists;
- with logins on (MLflow's ``basic-auth`` app, the default), the first admin's
  password must come from ``MLFLOW_AUTH_ADMIN_PASSWORD``.

Secrets never go on the command line (``ps`` shows it to every user): the
backend URI, S3 keys and the admin password are read from the environment or
given as flags, and passed to MLflow through its environment. The auth
app's settings file is written into a private folder (mode 0700): its users
table lives in the same PostgreSQL database as the runs.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transferlab.errors import UserError

BACKEND_ENV = "MLFLOW_BACKEND_STORE_URI"  # read by `mlflow server` itself too
ARTIFACTS_ENV = "MLFLOW_ARTIFACTS_DESTINATION"  # likewise
AUTH_CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
ADMIN_USER_ENV = "MLFLOW_AUTH_ADMIN_USERNAME"
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
S3_ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"  # the auth app's CSRF key: one per team, same on every replica
CHECK_TIMEOUT_S = 5  # each check: a wrong host or port fails within seconds, not after TCP's minutes
AUTH_APP = "basic-auth"
BACKEND_SCHEMES = ("postgresql", "postgresql+psycopg2")
PERMISSIONS = Literal["READ", "EDIT", "MANAGE", "NO_PERMISSIONS"]


class ServerError(UserError):
    """The team server cannot start: a store it cannot reach, a missing secret."""


class ServerSettings(BaseModel):
    """What ``transferlab server`` starts; defaults, bounds and messages live here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend_store_uri: str = Field(description="postgresql://USER:PASSWORD@HOST:PORT/DB")
    artifacts_destination: str = Field(description="s3://BUCKET[/PREFIX]")
    host: str = "127.0.0.1"
    port: int = Field(5000, ge=1, le=65535)
    workers: int = Field(2, ge=1, le=64)
    auth: bool = True
    default_permission: PERMISSIONS = "READ"  # what a logged-in user may do in experiments of others


def redact(uri: str) -> str:
    """``uri`` without its password, for messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_backend(uri: str) -> None:
    """The PostgreSQL backend store accepts a connection, within :data:`CHECK_TIMEOUT_S`."""
    if urlsplit(uri).scheme not in BACKEND_SCHEMES:
        raise ServerError(f"backend store: got {redact(uri)!r}; allowed: a PostgreSQL URI "
                          "(postgresql://USER:PASSWORD@HOST:PORT/DATABASE): a team does not share a SQLite file")
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": CHECK_TIMEOUT_S})
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("select 1"))
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0][:200]
        raise ServerError(f"cannot reach the backend store {redact(uri)}: {reason}") from None
    finally:
        engine.dispose()


def check_artifacts(destination: str) -> None:
    """The S3 bucket of ``destination`` exists and answers, within :data:`CHECK_TIMEOUT_S`."""
    parts = urlsplit(destination)
    if parts.scheme != "s3" or not parts.netloc:
        raise ServerError(f"artifacts destination: got {destination!r}; allowed: s3://BUCKET[/PREFIX]")
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    endpoint = os.environ.get(S3_ENDPOINT_ENV) or None
    s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(
        connect_timeout=CHECK_TIMEOUT_S, read_timeout=CHECK_TIMEOUT_S, retries={"max_attempts": 1}))
    where = f"{destination} (endpoint {endpoint or 'AWS'})"
    try:
        s3.head_bucket(Bucket=parts.netloc)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        raise ServerError(f"artifacts destination {where}: the bucket answered {code}; create it or fix the "
                          "credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)") from None
    except BotoCoreError as exc:
        raise ServerError(f"cannot reach the artifacts destination {where}: {exc}") from None


def write_auth_config(settings: ServerSettings, folder: Path) -> Path:
    """MLflow's basic-auth settings: users in the backend database, the first admin from the environment."""
    if not os.environ.get(ADMIN_PASSWORD_ENV):
        raise ServerError(f"logins are on: set {ADMIN_PASSWORD_ENV} (and optionally {ADMIN_USER_ENV}, default "
                          "admin) for the first admin, or start with --no-auth on a trusted network")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / "basic_auth.ini"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it names the database's password
    with os.fdopen(fd, "w") as out:
        out.write("[mlflow]\n"
                  f"default_permission = {settings.default_permission}\n"
                  f"database_uri = {settings.backend_store_uri.replace('%', '%%')}\n"
                  f"admin_username = {os.environ.get(ADMIN_USER_ENV, 'admin')}\n"
                  "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return path


def command(settings: ServerSettings, extra: list[str] | None = None) -> list[str]:
    """The ``mlflow server`` command line: no secrets in it (see :func:`environment`)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", settings.host, "--port", str(settings.port),
           "--workers", str(settings.workers), "--serve-artifacts"]
    if settings.auth:
        cmd += ["--app-name", AUTH_APP]
    return cmd + list(extra or [])


def environment(settings: ServerSettings, auth_config: Path | None) -> dict[str, str]:
    env = dict(os.environ) | {BACKEND_ENV: settings.backend_store_uri, ARTIFACTS_ENV: settings.artifacts_destination}
    if auth_config is not None:
        env[AUTH_CONFIG_ENV] = str(auth_config)
        # One server's workers share this key; replicas behind a load balancer need the team's own (set it).
        env.setdefault(SECRET_KEY_ENV, secrets.token_hex(32))
    return env


def serve(settings: ServerSettings, extra: list[str] | None = None) -> int:
    """Check the stores, then run MLflow's server in the foreground until it stops; its exit code."""
    check_backend(settings.backend_store_uri)
    check_artifacts(settings.artifacts_destination)
    with tempfile.TemporaryDirectory(prefix="transferlab-server-") as private:
        auth = write_auth_config(settings, Path(private)) if settings.auth else None
        print(f"transferlab server: runs in {redact(settings.backend_store_uri)}, artifacts in "
              f"{settings.artifacts_destination}, logins {'on' if auth else 'off'}; "
              f"clients: MLFLOW_TRACKING_URI=http://{settings.host}:{settings.port}", flush=True)
        try:
            return subprocess.call(command(settings, extra), env=environment(settings, auth))
        except KeyboardInterrupt:
            return 0


def add_parser(subparsers: Any) -> None:
    """``transferlab server``'s arguments (the CLI calls this)."""
    defaults = ServerSettings.model_fields
    p = subparsers.add_parser("server", help="start a team's MLflow tracking server (PostgreSQL, S3, logins)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--backend-store-uri", default=os.environ.get(BACKEND_ENV),
                   help=f"postgresql://USER:PASSWORD@HOST:PORT/DB (default: ${BACKEND_ENV}; keep passwords there)")
    p.add_argument("--artifacts-destination", default=os.environ.get(ARTIFACTS_ENV),
                   help=f"s3://BUCKET[/PREFIX] (default: ${ARTIFACTS_ENV}); endpoint: ${S3_ENDPOINT_ENV}")
    p.add_argument("--host", default=defaults["host"].default, help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=defaults["port"].default, help="default: %(default)s")
    p.add_argument("--workers", type=int, default=defaults["workers"].default, help="default: %(default)s")
    p.add_argument("--no-auth", dest="auth", action="store_false", help="no logins (a trusted network only)")
    p.add_argument("--default-permission", default=defaults["default_permission"].default,
                   help="READ | EDIT | MANAGE | NO_PERMISSIONS (default: %(default)s)")
    p.add_argument("mlflow_args", nargs=argparse.REMAINDER,
                   help="after --: more `mlflow server` options (e.g. --allowed-hosts)")
    p.set_defaults(handler=_cmd_server)


def settings_from(args: argparse.Namespace) -> ServerSettings:
    given = {k: getattr(args, k) for k in ServerSettings.model_fields}
    missing = [f"--{k.replace('_', '-')} (or ${env})" for k, env in
               (("backend_store_uri", BACKEND_ENV), ("artifacts_destination", ARTIFACTS_ENV)) if not given[k]]
    if missing:
        raise ServerError(f"missing {' and '.join(missing)}")
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ServerError(f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: got {err.get('input')!r}; "
                          f"{err['msg']}") from None


def _cmd_server(args: argparse.Namespace) -> int:
    extra = [a for a in args.mlflow_args if a != "--"]
    return serve(settings_from(args), extra)
