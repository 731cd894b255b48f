"""The real ants-vs-bees photos through the real `dvc repro`, held to the issues' acceptance figures.

Split as the published figures are measured: train = the `train` folder (val drawn from it),
test = the `val` folder (153 images), so selection never sees the test images.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import VAL_FROM_TRAIN, copy_project, find_hymenoptera, project_env, split_as_published

DATA = find_hymenoptera()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(DATA is None, reason="no local copy of hymenoptera")]
JPEG = {".jpg", ".jpeg"}
TEST_IMAGES = 153  # the dataset's `val` folder
HEAD_FLOOR = 0.93  # every cached-feature head
BEST_FLOOR = 145 / TEST_IMAGES  # the PyTorch tutorial's frozen ResNet-18 is about 0.948


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert DATA is not None
    dest = tmp_path_factory.mktemp("hymenoptera") / "project"
    env = project_env()
    copy_project(dest, env)
    params = split_as_published(yaml.safe_load((dest / "params.yaml").read_text()))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "commit", "-qam", "hymenoptera split"], dest, env)
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
    assert len(heads) == 3
    assert all(m["accuracy"] >= HEAD_FLOOR for m in heads.values()), heads
    assert max(m["accuracy"] for m in heads.values()) >= BEST_FLOOR
    tuned = metrics["efficientnet_lite0-finetune"]
    assert tuned["accuracy"] >= BEST_FLOOR
    assert tuned["errors"] <= min(m["errors"] for m in heads.values()) + 1
