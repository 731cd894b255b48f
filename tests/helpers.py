"""Shared helpers for tests that drive git + DVC in throw-away repositories.

Everything here is a plain function (no fixtures) so that any test module can
``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path`` because the
directory has no ``__init__.py``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from projects import GIT_IDENTITY  # noqa: F401 - re-exported for the tests

DEFAULT_CLASSES = {"cat": 3, "dog": 2}


def dvc_executable() -> str:
    """The ``dvc`` entry point installed next to the running interpreter."""
    candidate = Path(sys.executable).parent / "dvc"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("dvc")
    if found is None:
        pytest.skip("dvc executable not found next to sys.executable or on PATH")
    return found


def isolate_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make git/DVC subprocesses hermetic (they inherit ``os.environ``).

    * drops inherited ``GIT_*`` (e.g. GIT_INDEX_FILE set by a pre-commit hook
      would hijack the temporary repos), ``DVC_*`` and ``AWS_*`` variables;
    * ignores the user's global/system git and DVC configs and ~/.aws files;
    * sets a git identity, disables DVC analytics and keeps DVC's site cache
      (normally /var/tmp/dvc) inside ``tmp_path``.
    """
    for name in list(os.environ):
        if name.startswith(("GIT_", "DVC_", "AWS_")):
            monkeypatch.delenv(name, raising=False)
    for name, value in GIT_IDENTITY.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")

    cfg = tmp_path / "_env"
    for sub in ("dvc-global", "dvc-system", "dvc-site-cache"):
        (cfg / sub).mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(cfg / "dvc-global"))
    monkeypatch.setenv("DVC_SYSTEM_CONFIG_DIR", str(cfg / "dvc-system"))
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(cfg / "dvc-site-cache"))

    # Never read the developer's real AWS profile/credentials files.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(cfg / "aws-config-does-not-exist"))
    monkeypatch.setenv(
        "AWS_SHARED_CREDENTIALS_FILE", str(cfg / "aws-credentials-does-not-exist")
    )


def run(
    args: list[str],
    cwd: Path,
    *,
    check: bool = True,
    timeout: float | None = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; on failure show stdout/stderr."""
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed (rc={proc.returncode}): {' '.join(map(str, args))}\n"
            f"cwd: {cwd}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def output(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 1800) -> str:
    """stdout + stderr of a command that must succeed: the e2e tests' `dvc repro`, `transferlab ...`."""
    done = run(cmd, cwd, env=env, timeout=timeout)
    return done.stdout + done.stderr


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["git", *args], cwd, check=check)


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([dvc_executable(), *args], cwd, check=check)


def init_git_dvc_repo(path: Path) -> Path:
    """``git init`` + ``dvc init`` + initial commit in ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "-c", "init.defaultBranch=main", "init", "-q")
    dvc(path, "init", "-q")
    git(path, "add", ".dvc", ".dvcignore")
    git(path, "commit", "-q", "-m", "Initialize DVC")
    return path


def write_image_tree(
    root: Path,
    classes: dict[str, int] | None = None,
    size: tuple[int, int] = (8, 8),
) -> dict[str, str]:
    """Write tiny, pairwise-distinct RGB PNGs as ``root/<class>/<i>.png``.

    Returns the :func:`tree_digest` of ``root``.
    """
    from PIL import Image

    classes = DEFAULT_CLASSES if classes is None else classes
    for c_idx, (cls, count) in enumerate(sorted(classes.items())):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = Image.new("RGB", size, (40 * c_idx % 256, 25 * i % 256, 7))
            img.putpixel((0, 0), (c_idx, i, 255))  # guarantee distinct bytes
            img.save(root / cls / f"{i:03d}.png")
    return tree_digest(root)


def tree_digest(root: Path) -> dict[str, str]:
    """Map every regular file under ``root`` (posix relative path) to its sha256."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_same_tree(expected: Path, actual: Path) -> None:
    """Same set of relative file paths and byte-identical contents."""
    exp, act = tree_digest(expected), tree_digest(actual)
    assert sorted(act) == sorted(exp), "file sets differ"
    assert act == exp, "file contents differ"
    for rel in exp:  # belt and braces: compare raw bytes too
        assert (actual / rel).read_bytes() == (expected / rel).read_bytes(), rel


def stage_processes(proc: subprocess.Popen, script: str) -> list["psutil.Process"]:
    """The descendants of ``proc`` (a ``dvc repro``) running ``script``, e.g. ``pipeline/extract.py``."""
    import psutil

    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:  # a short-lived child (git, a shell) may exit or be a zombie between listing and reading
            if any(script in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:  # ZombieProcess is one
            continue
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and its descendants: no `dvc repro` outlives a test holding the project's lock."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def run_queue(root: Path, env: dict[str, str], jobs: int, wait_s: float) -> str:
    """`dvc queue start -j jobs`, wait until nothing is queued or running, stop the workers; `dvc queue status`."""
    import re
    import time

    def status() -> str:
        return subprocess.run(["dvc", "queue", "status"], cwd=root, env=env, capture_output=True, text=True,
                              check=True).stdout

    # the workers it starts outlive it and inherit its output: captured pipes would never close
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=root, env=env, check=True, timeout=120,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    try:
        while re.search(r"\b(Running|Queued)\b", status()):
            assert time.monotonic() < deadline, status()
            time.sleep(5)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=root, env=env, timeout=120,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return status()


# project copies: shared with the benchmarks, which never import test code
from projects import (  # noqa: E402,F401 - re-exported for the tests
    HYMENOPTERA_CANDIDATES, PROJECT_ROOT, VAL_FROM_TRAIN, copy_project, find_hymenoptera, project_env,
    split_as_published,
)


def smooth_photo(seed: int, size: tuple[int, int] = (160, 120)) -> "Image.Image":
    """A synthetic photo-like RGB image: smooth random structure (an 8 x 6 random image, bicubic-upscaled).

    Distinct seeds give unrelated images, as far apart to a perceptual hash as two real photos.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC)


def resized_recompressed(image: "Image.Image", path: Path, scale: float = 0.6, quality: int = 60) -> Path:
    """Save a smaller, recompressed JPEG copy of ``image`` at ``path``: what a near-duplicate looks like."""
    from PIL import Image

    w, h = image.size
    image.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS).save(path, "JPEG", quality=quality)
    return path
