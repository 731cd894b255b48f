"""Throw-away copies of this project, for the end-to-end tests and the benchmarks.

Both run the real `dvc repro` in a temporary copy, so nothing they do touches the
working tree, its cache or its MLflow store. It lives in bench/ because
benchmarks never import test code; the tests import it from here (pytest's
``pythonpath`` in pyproject.toml puts bench/ on the path).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

# Identity used for commits in temporary repos, so tests work on a fresh CI
# machine without a global git identity.
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "transferlab-tests",
    "GIT_AUTHOR_EMAIL": "tests@transferlab.invalid",
    "GIT_COMMITTER_NAME": "transferlab-tests",
    "GIT_COMMITTER_EMAIL": "tests@transferlab.invalid",
}


PROJECT_ROOT = Path(__file__).resolve().parents[1]  # bench/ is one level down
# The shared real dataset: next to the project, or where this team's machines keep it.
HYMENOPTERA_CANDIDATES = (
    PROJECT_ROOT.parent / "shared" / "datasets" / "hymenoptera",
    Path("/work/shared/datasets/hymenoptera"),
)
VAL_FROM_TRAIN = 0.15  # share of hymenoptera's train folder drawn as the val split


def find_hymenoptera() -> Path | None:
    """``$TRANSFERLAB_HYMENOPTERA`` if set, else the first candidate folder that exists."""
    if os.environ.get("TRANSFERLAB_HYMENOPTERA"):
        return Path(os.environ["TRANSFERLAB_HYMENOPTERA"])
    return next((p for p in HYMENOPTERA_CANDIDATES if p.is_dir()), None)


def project_env() -> dict[str, str]:
    """``os.environ`` without MLflow/DVC/transferlab settings, this venv first on PATH, a git identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "TRANSFERLAB_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env | GIT_IDENTITY


def copy_project(dest: Path, env: dict[str, str]) -> None:
    """The files git sees (tracked, or untracked and not ignored), committed in a new repo at ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    for rel in filter(None, listed):
        if rel in ("dvc.lock", "data/raw.dvc"):  # a local run's records; the copy must start from scratch
            continue
        if (PROJECT_ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / rel, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, env=env, capture_output=True, check=True)


def split_as_published(params: dict) -> dict:
    """Hymenoptera as its published figures are measured: train folder (val drawn from it), test = val folder."""
    params["split"]["folders"] = {"val": "test"}
    params["split"]["ratios"] = {"train": 1 - VAL_FROM_TRAIN, "val": VAL_FROM_TRAIN, "test": 0.0}
    return params


def machine() -> str:
    """The CPU model, core count, Python and OS, for the line that says where figures were measured."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def write_section(section: str, text: str) -> None:
    """Replace (or append) the ``<!-- bench:<section>:start/end -->`` block of BENCHMARKS.md, atomically."""
    sys.path.insert(0, str(PROJECT_ROOT / "src"))
    from transferlab.io import atomic_write_text

    path = PROJECT_ROOT / "BENCHMARKS.md"
    start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{text}\n{end}"
    if start in current:
        head, rest = current.split(start, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, current)
