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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from transferlab.io import atomic_write_text

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


def copy_project(dest: Path, env: dict[str, str], edit: Callable[[dict], object] | None = None) -> None:
    """The files git sees (tracked, or untracked and not ignored), committed in a new repo at ``dest``.

    With ``edit``, params.yaml is changed first (``edit(params)`` changes the dict in place), so the
    copy's first commit already holds the settings a test or benchmark runs with.
    """
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
    if edit is not None:
        params_file = dest / "params.yaml"
        params = yaml.safe_load(params_file.read_text())
        edit(params)
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, env=env, capture_output=True, check=True)


def split_as_published(params: dict) -> dict:
    """Hymenoptera as its published figures are measured: train folder (val drawn from it), test = val folder."""
    params["split"]["folders"] = {"val": "test"}
    params["split"]["ratios"] = {"train": 1 - VAL_FROM_TRAIN, "val": VAL_FROM_TRAIN, "test": 0.0}
    return params


# Twelve distinct photos bundled with scikit-image (no download): one class each.
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "rocket")
CROP_SIDE = (0.3, 0.8)  # a crop's side as a share of the photo's shorter side
CROP_PIXELS = (160, 320)  # the saved crop's side in pixels, drawn per image
JITTER = 0.25  # brightness factor drawn in 1 +/- JITTER
NOISE_STD = 6.0  # grey levels of Gaussian noise added to every pixel


def photo_classes(dest: Path, per_class: int, classes: int = len(PHOTOS), seed: int = 0,
                  size: tuple[int, int] | None = None) -> dict[str, int]:
    """A real-photo dataset of ``classes`` classes at ``dest/<photo>/<i>.jpg``: random crops of one photo each.

    Crops of different sizes and places, flipped, brightness-jittered and noisy,
    so an ImageNet backbone's features of one class vary as photos do (they are
    low-rank and correlated, unlike synthetic noise). Saved as ``size`` (width,
    height), else a square side drawn in ``CROP_PIXELS``. Deterministic for a seed.
    """
    from skimage import data as photos

    rng = np.random.default_rng(seed)
    for name in PHOTOS[:classes]:
        image = np.asarray(getattr(photos, name)())
        image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
        (dest / name).mkdir(parents=True, exist_ok=True)
        height, width = image.shape[:2]
        for i in range(per_class):
            side = int(min(height, width) * rng.uniform(*CROP_SIDE))
            top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            crop = image[top:top + side, left:left + side].astype(np.float64)
            crop = crop[:, ::-1] if rng.random() < 0.5 else crop
            crop = crop * rng.uniform(1 - JITTER, 1 + JITTER) + rng.normal(0, NOISE_STD, crop.shape)
            pixels = int(rng.integers(CROP_PIXELS[0], CROP_PIXELS[1] + 1))
            out = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize(size or (pixels, pixels))
            out.save(dest / name / f"{i:05d}.jpg", quality=90)
    return {name: per_class for name in PHOTOS[:classes]}


PREPARED_SIZE = (512, 384)  # what ingest leaves of a landscape photo (shorter side ingest.max_side)
PREPARED_CLASSES = 4


def prepared_photos(dest: Path, n: int) -> list[Path]:
    """``n`` photo-crop JPEGs the size ingest writes (``PREPARED_SIZE``) in ``PREPARED_CLASSES`` folders, sorted."""
    photo_classes(dest, -(-n // PREPARED_CLASSES), classes=PREPARED_CLASSES, size=PREPARED_SIZE)
    return sorted(dest.rglob("*.jpg"))[:n]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its posix path relative to it, with its bytes: folders compared whole."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def machine() -> str:
    """The CPU model, core count, Python and OS, for the line that says where figures were measured."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def write_section(section: str, text: str) -> None:
    """Replace (or append) the ``<!-- bench:<section>:start/end -->`` block of BENCHMARKS.md, atomically."""
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
