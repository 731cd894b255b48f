"""End-to-end checks that ``data/raw`` round-trips through a DVC remote.

Each test plays two teammates: "alice" versions ``data/raw`` with DVC and
pushes it; "bob" ``git clone``s her repository and ``dvc pull``s the data.
Remotes: a local directory, an S3 bucket served by moto on 127.0.0.1, and an
unreachable S3 endpoint (push must fail loudly and leave the cache alone).
"""

from __future__ import annotations

import json
import shutil
import socket
import uuid
from pathlib import Path

import pytest

from helpers import (
    assert_same_tree,
    dvc,
    git,
    init_git_dvc_repo,
    isolate_env,
    tree_digest,
    write_image_tree,
)

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- #
# fixtures / helpers
# --------------------------------------------------------------------------- #
@pytest.fixture
def hermetic_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_env(monkeypatch, tmp_path)


@pytest.fixture
def aws_test_env(monkeypatch: pytest.MonkeyPatch, hermetic_env, tmp_path: Path):
    """Fake credentials + guards so that no real AWS endpoint is contacted."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # Any non-loopback HTTP(S) request is routed to a proxy that does not
    # exist, so an accidental call to *.amazonaws.com fails instead of leaving
    # the machine. Loopback (moto) bypasses the proxy. The socket is bound but
    # never listens: connections are refused and the port can't be reused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.setenv(var, dead)
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.setenv(var, "127.0.0.1,localhost")
        yield


@pytest.fixture
def moto_endpoint(aws_test_env):
    """A moto S3 server on 127.0.0.1 (random free port); yields its URL."""
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def closed_port():
    """A 127.0.0.1 port that refuses connections.

    The socket is bound but never listens, so connects get ECONNREFUSED and no
    other process can grab the port while the test runs.
    """
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def s3_client(endpoint: str):
    boto3 = pytest.importorskip("boto3")
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def make_versioned_dataset(repo: Path, *, project_gitignore: bool = False) -> dict[str, str]:
    """alice: images in data/raw, ``dvc add data/raw``, commit the .dvc file.

    With ``project_gitignore`` the repo's root .gitignore already ignores
    ``/data/raw/`` (as transferlab's does). DVC then writes no
    ``data/.gitignore`` and only ``data/raw.dvc`` is to be committed.
    """
    init_git_dvc_repo(repo)
    if project_gitignore:
        (repo / ".gitignore").write_text("/data/raw/\n")
        git(repo, "add", ".gitignore")
        git(repo, "commit", "-q", "-m", "Ignore data/raw")
    digest = write_image_tree(repo / "data" / "raw")
    assert len(digest) == 5 and {p.split("/")[0] for p in digest} == {"cat", "dog"}

    dvc(repo, "add", "data/raw")
    assert (repo / "data" / "raw.dvc").is_file()
    if project_gitignore:
        assert not (repo / "data" / ".gitignore").exists()
        git(repo, "add", "data/raw.dvc")
    else:
        assert "/raw" in (repo / "data" / ".gitignore").read_text().splitlines()
        git(repo, "add", "data/raw.dvc", "data/.gitignore")
    git(repo, "commit", "-q", "-m", "Track data/raw with DVC")
    # the data itself must stay out of git
    tracked = git(repo, "ls-files").stdout.splitlines()
    assert "data/raw.dvc" in tracked
    assert not [p for p in tracked if p.startswith("data/raw/")]
    return digest


def commit_remote_config(repo: Path) -> None:
    git(repo, "add", ".dvc/config")
    git(repo, "commit", "-q", "-m", "Configure DVC remote")


def assert_in_sync_with_remote(repo: Path, remote: str) -> None:
    out = dvc(repo, "status", "--cloud").stdout
    assert f"Cache and remote '{remote}' are in sync." in out, out
    assert json.loads(dvc(repo, "status", "--cloud", "--json").stdout) == {}


def clone_and_pull(origin: Path, clone: Path, remote: str) -> None:
    """bob: ``git clone`` (no data yet), ``dvc pull``, everything in sync."""
    git(origin.parent, "clone", "-q", str(origin), str(clone))
    assert (clone / "data" / "raw.dvc").is_file()
    assert not (clone / "data" / "raw").exists()
    # the default remote travelled with the git history (.dvc/config)
    assert dvc(clone, "remote", "default").stdout.strip() == remote

    dvc(clone, "pull")
    assert_same_tree(origin / "data" / "raw", clone / "data" / "raw")
    assert_in_sync_with_remote(clone, remote)
    assert "Data and pipelines are up to date." in dvc(clone, "status").stdout


# --------------------------------------------------------------------------- #
# tests
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "project_gitignore", [False, True], ids=["dvc-writes-gitignore", "root-gitignore"]
)
def test_local_remote_push_clone_pull_roundtrip(
    tmp_path: Path, hermetic_env, project_gitignore: bool
):
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    storage = tmp_path / "dvc-storage"
    digest = make_versioned_dataset(alice, project_gitignore=project_gitignore)

    dvc(alice, "remote", "add", "-d", "storage", str(storage))
    commit_remote_config(alice)
    dvc(alice, "push")

    # 5 images + 1 ".dir" manifest, content-addressed
    assert len([p for p in storage.rglob("*") if p.is_file()]) == len(digest) + 1
    assert_in_sync_with_remote(alice, "storage")

    clone_and_pull(alice, bob, "storage")
    assert tree_digest(bob / "data" / "raw") == digest


def test_s3_remote_on_moto_push_clone_pull_roundtrip(tmp_path: Path, moto_endpoint: str):
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    bucket = f"transferlab-{uuid.uuid4().hex[:12]}"
    s3 = s3_client(moto_endpoint)
    s3.create_bucket(Bucket=bucket)
    digest = make_versioned_dataset(alice)

    dvc(alice, "remote", "add", "-d", "s3remote", f"s3://{bucket}/store")
    dvc(alice, "remote", "modify", "s3remote", "endpointurl", moto_endpoint)
    dvc(alice, "remote", "modify", "s3remote", "region", "us-east-1")
    commit_remote_config(alice)  # credentials stay in env, not in git
    dvc(alice, "push")

    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=bucket, Prefix="store/").get("Contents", [])
    ]
    assert len(keys) == len(digest) + 1, keys
    assert_in_sync_with_remote(alice, "s3remote")

    clone_and_pull(alice, bob, "s3remote")
    assert tree_digest(bob / "data" / "raw") == digest


def test_s3_push_to_unreachable_endpoint_fails_and_keeps_cache(
    tmp_path: Path, aws_test_env, closed_port: int, monkeypatch: pytest.MonkeyPatch
):
    pytest.importorskip("dvc_s3")
    # botocore would otherwise retry the refused connection with back-off
    # (~10 s); DVC has no config knob for the retry count.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    alice = tmp_path / "alice"
    endpoint = f"http://127.0.0.1:{closed_port}"
    digest = make_versioned_dataset(alice)
    cache = alice / ".dvc" / "cache"
    cache_before = tree_digest(cache)
    assert len(cache_before) == len(digest) + 1

    dvc(alice, "remote", "add", "-d", "s3remote", "s3://transferlab-offline/store")
    dvc(alice, "remote", "modify", "s3remote", "endpointurl", endpoint)
    dvc(alice, "remote", "modify", "s3remote", "region", "us-east-1")
    dvc(alice, "remote", "modify", "s3remote", "connect_timeout", "1")
    dvc(alice, "remote", "modify", "s3remote", "read_timeout", "1")

    proc = dvc(alice, "push", check=False)
    assert proc.returncode != 0
    # DVC 3.67 / dvc-s3 3.3 prints e.g.
    #   ERROR: unexpected error - Could not connect to the endpoint URL:
    #   "http://127.0.0.1:PORT/transferlab-offline/store/files/md5/..."
    assert "ERROR" in proc.stderr, proc.stderr
    assert "Could not connect to the endpoint URL" in proc.stderr, proc.stderr
    assert endpoint in proc.stderr, proc.stderr

    # local cache untouched, workspace still matches it ...
    assert tree_digest(cache) == cache_before
    assert tree_digest(alice / "data" / "raw") == digest
    assert "Data and pipelines are up to date." in dvc(alice, "status").stdout
    # ... and the cache alone can restore the dataset
    shutil.rmtree(alice / "data" / "raw")
    dvc(alice, "checkout", "data/raw.dvc")
    assert tree_digest(alice / "data" / "raw") == digest
