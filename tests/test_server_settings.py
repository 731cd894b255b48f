"""`transferlab server` before it starts anything: settings, secrets kept off the command line, clear refusals."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from transferlab import cli
from transferlab.tracking import server

SECRET = "s3cr3t-pw"
BACKEND = f"postgresql://mlflow:{SECRET}@127.0.0.1:5432/mlflow"


def settings(**kw: object) -> server.ServerSettings:
    return server.ServerSettings(backend_store_uri=BACKEND, artifacts_destination="s3://bucket/prefix", **kw)


def test_no_secret_reaches_the_command_line_only_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, "admin-pw")
    s = settings(port=5123)
    ini = server.write_auth_config(s, tmp_path / "private")
    cmd = server.command(s, ["--allowed-hosts", "x:1"])
    assert not any(SECRET in part or "admin-pw" in part for part in cmd)
    assert cmd[-2:] == ["--allowed-hosts", "x:1"] and "--serve-artifacts" in cmd
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth" and cmd[cmd.index("--port") + 1] == "5123"
    env = server.environment(s, ini)
    assert env[server.BACKEND_ENV] == BACKEND and env[server.AUTH_CONFIG_ENV] == str(ini)
    assert len(env[server.SECRET_KEY_ENV]) >= 32
    assert ini.stat().st_mode & 0o777 == 0o600 and (tmp_path / "private").stat().st_mode & 0o777 == 0o700
    assert f"database_uri = {BACKEND}" in ini.read_text()  # logins live in the runs' database
    assert "--app-name" not in server.command(settings(auth=False))


def test_logins_need_the_first_admins_password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(server.ADMIN_PASSWORD_ENV, raising=False)
    with pytest.raises(server.ServerError, match="set MLFLOW_AUTH_ADMIN_PASSWORD"):
        server.write_auth_config(settings(), tmp_path)


def test_messages_never_show_the_database_password() -> None:
    assert server.redact(BACKEND) == "postgresql://mlflow:***@127.0.0.1:5432/mlflow"
    assert server.redact("postgresql://db/x") == "postgresql://db/x"


@pytest.mark.parametrize(("args", "message"), [
    ([], "missing --backend-store-uri (or $MLFLOW_BACKEND_STORE_URI) and --artifacts-destination"),
    (["--backend-store-uri", "sqlite:///m.db", "--artifacts-destination", "s3://b"], "allowed: a PostgreSQL URI"),
    (["--backend-store-uri", BACKEND, "--artifacts-destination", "s3://b", "--port", "0"], "--port: got 0"),
    (["--backend-store-uri", BACKEND, "--artifacts-destination", "s3://b", "--default-permission", "ALL"],
     "--default-permission: got 'ALL'"),
])
def test_bad_settings_are_one_line_exit_2(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    for name in (server.BACKEND_ENV, server.ARTIFACTS_ENV):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["server", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and SECRET not in err


def test_an_unreachable_database_is_named_within_seconds_without_its_password() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(server.ServerError) as err:
        server.check_backend(f"postgresql://mlflow:{SECRET}@127.0.0.1:{port}/mlflow")
    assert time.monotonic() - started < server.CHECK_TIMEOUT_S + 5
    assert "cannot reach the backend store postgresql://mlflow:***@127.0.0.1" in str(err.value)
    assert SECRET not in str(err.value)


def test_an_artifacts_destination_must_be_an_s3_bucket() -> None:
    with pytest.raises(server.ServerError, match=r"allowed: s3://BUCKET\[/PREFIX\]"):
        server.check_artifacts("/var/mlflow/artifacts")
