"""The real ants-vs-bees photos through the real `dvc repro`, held to the issues' acceptance figures.

Split as the published figures are measured: train = the `train` folder (val drawn from it),
test = the `val` folder (153 images), so selection never sees the test images.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from PIL import Image, ImageOps

from helpers import VAL_FROM_TRAIN, copy_project, find_hymenoptera, project_env, resized_recompressed, split_as_published

DATA = find_hymenoptera()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(DATA is None, reason="no local copy of hymenoptera")]
JPEG = {".jpg", ".jpeg"}
TEST_IMAGES = 153  # the dataset's `val` folder
HEAD_FLOOR = 0.93  # every cached-feature head
BEST_FLOOR = 145 / TEST_IMAGES  # the PyTorch tutorial's frozen ResNet-18 is about 0.948
KNN_FLOOR = 0.90  # the knn head (issue 13)
COPIES, SWAPS = 10, 8  # issue 13's acceptance: resized, recompressed copies elsewhere; labels swapped on purpose


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert DATA is not None
    dest = tmp_path_factory.mktemp("hymenoptera") / "project"
    env = project_env()
    copy_project(dest, env, edit=split_as_published)
    sh(["transferlab", "data", "get", str(DATA)], dest, env)
    sh(["dvc", "repro"], dest, env)
    return dest


def test_ingest_keeps_every_jpeg_and_reports_the_rest(project: Path) -> None:
    assert DATA is not None
    jpegs = sorted(p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.suffix.lower() in JPEG)
    manifest = pd.read_csv(project / "data/prepared/manifest.csv", keep_default_na=False)
    assert sorted(manifest["source"]) == jpegs
    report = json.loads((project / "data/prepared/report.json").read_text())
    rejected = [r["path"] for r in report["rejected"]]
    assert all(Path(r).suffix.lower() not in JPEG for r in rejected)
    assert report["total"]["kept"] == len(jpegs)


def test_split_keeps_the_folders_and_draws_val_from_train(project: Path) -> None:
    manifest = pd.read_csv(project / "data/prepared/manifest.csv", keep_default_na=False)
    split = pd.read_csv(project / "data/split.csv", keep_default_na=False)
    parts = manifest.merge(split[["path", "part"]], on="path", validate="one_to_one")
    assert set(parts.loc[parts.folder_split == "val", "part"]) == {"test"}
    assert set(parts.loc[parts.folder_split == "train", "part"]) == {"train", "val"}
    assert (parts.part == "test").sum() == TEST_IMAGES
    from_train = parts[parts.folder_split == "train"]
    for label, group in from_train.groupby("label"):  # stratified: every class gives its share
        assert abs((group.part == "val").mean() - VAL_FROM_TRAIN) < 0.02, label


def test_heads_and_finetune_reach_the_published_figures(project: Path) -> None:
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert {m["n"] for m in metrics.values()} == {TEST_IMAGES}
    heads = {k: m for k, m in metrics.items() if not k.endswith("-finetune")}
    assert len(heads) == 4
    assert heads["efficientnet_lite0-knn"]["accuracy"] >= KNN_FLOOR
    heads = {k: m for k, m in heads.items() if not k.endswith("-knn")}  # the floor below is the trained heads'
    assert all(m["accuracy"] >= HEAD_FLOOR for m in heads.values()), heads
    assert max(m["accuracy"] for m in heads.values()) >= BEST_FLOOR
    tuned = metrics["efficientnet_lite0-finetune"]
    assert tuned["accuracy"] >= BEST_FLOOR
    assert tuned["errors"] <= min(m["errors"] for m in heads.values()) + 1


def test_the_audit_of_the_unmodified_photos_is_written_and_reported(project: Path) -> None:
    report = json.loads((project / "reports/audit.json").read_text())
    images = report["counts"]["images"]
    assert images["test"] == TEST_IMAGES and images["train"] + images["val"] == 244  # the `train` folder
    assert len(report["label_suspects"]) <= 20 and (project / "reports/audit/leaks.png").exists()
    metrics = json.loads((project / "reports/metrics.json").read_text())
    leaked = len(report["leaked_test_images"])
    assert {m["n_without_leaks"] for m in metrics.values()} == {TEST_IMAGES - leaked}
    out = subprocess.run(["transferlab", "audit"], cwd=project, env=project_env(), capture_output=True, text=True)
    assert out.returncode == 0 and "Likely leaks across split parts" in out.stdout


def plant(raw: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Issue 13's test set: COPIES resized, recompressed copies in another class or split folder, SWAPS labels swapped.

    Returns (original, copy) source pairs and (moved source, its true label) of the swapped images.
    """
    other = {"ants": "bees", "bees": "ants"}
    photos = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*.jpg"))
    originals, swaps = photos[3::37][:COPIES], [p for p in photos[20::23] if p.startswith("train/")]
    swaps = [p for p in swaps if p not in originals][:SWAPS]
    pairs = []
    for n, source in enumerate(originals):
        folder, label, name = source.split("/")
        target = f"{folder}/{other[label]}" if n % 2 else f"{'val' if folder == 'train' else 'train'}/{label}"
        with Image.open(raw / source) as image:
            resized_recompressed(ImageOps.exif_transpose(image).convert("RGB"), raw / target / f"copy-{name}")
        pairs.append((source, f"{target}/copy-{name}"))
    moved = []
    for source in swaps:
        folder, label, name = source.split("/")
        shutil.move(raw / source, raw / folder / other[label] / name)
        moved.append((f"{folder}/{other[label]}/{name}", label))
    return pairs, moved


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, list]:
    assert DATA is not None
    work = tmp_path_factory.mktemp("planted")
    shutil.copytree(DATA, work / "raw")
    pairs, moved = plant(work / "raw")
    dest, env = work / "project", project_env()
    copy_project(dest, env, edit=split_as_published)
    sh(["transferlab", "data", "get", str(work / "raw")], dest, env)
    sh(["dvc", "repro", "audit"], dest, env)  # ingest, split, extract, audit: no training needed
    return dest, pairs, moved


def test_resized_copies_in_another_folder_are_grouped_and_split_together(planted) -> None:
    project, pairs, _ = planted
    manifest = pd.read_csv(project / "data/prepared/manifest.csv", keep_default_na=False)
    split = pd.read_csv(project / "data/split.csv", keep_default_na=False)
    group = dict(zip(manifest["source"], manifest["group"]))
    part = dict(zip(manifest["source"], manifest["path"].map(dict(zip(split["path"], split["part"])))))
    grouped = [(a, b) for a, b in pairs if group[a] == group[b]]
    assert len(grouped) >= COPIES - 1, set(pairs) - set(grouped)
    assert all(part[a] == part[b] for a, b in grouped)


def test_swapped_labels_are_among_the_top_20_suspects(planted) -> None:
    project, _, moved = planted
    report = json.loads((project / "reports/audit.json").read_text())
    suspects = {s["source"]: s for s in report["label_suspects"][:20]}
    found = [source for source, _ in moved if source in suspects]
    assert len(found) >= SWAPS - 2, (found, moved)
    assert all(suspects[s]["suggested"] == label for s, label in moved if s in suspects)
