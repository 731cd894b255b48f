"""The preflight stage: the whole params.yaml, the dataset and the store checked before any work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from transferlab import block_layouts, preflight
from transferlab.config import ParamsError


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "data" / "raw" / "a").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "a" / "x.png").write_bytes(b"")
    return tmp_path


def _run(project: Path, text: str) -> Path:
    (project / "params.yaml").write_text(text, encoding="utf-8")
    out = project / "data" / "preflight.ok"
    preflight.run(project / "params.yaml", project / "data" / "raw", out, cache=project / "blocks.json")
    return out


def test_valid_params_write_the_marker(project: Path) -> None:
    out = _run(project, "finetune: {last_blocks: 2}\n")
    assert out.read_text() == preflight.OK_TEXT


def test_last_blocks_beyond_the_backbone_names_its_blocks(project: Path) -> None:
    with pytest.raises(ParamsError, match=r"finetune\.last_blocks: got 50; allowed: 1 to \d+, the blocks of "
                                          r"efficientnet_lite0 \(stem, blocks\.0"):
        _run(project, "finetune: {last_blocks: 50}\n")
    assert not (project / "data" / "preflight.ok").exists()
    # the block layout is cached for the next run, keyed by library versions
    assert "efficientnet_lite0" in (project / "blocks.json").read_text()


def test_unknown_backbone_refused_before_ingest(project: Path) -> None:
    with pytest.raises(Exception, match="nosuchnet"):
        _run(project, "extract: {backbones: [nosuchnet]}\nfinetune: {backbones: [nosuchnet]}\n")


def test_missing_dataset_says_how_to_get_it(project: Path) -> None:
    import shutil

    shutil.rmtree(project / "data" / "raw")
    with pytest.raises(preflight.DataMissingError, match="transferlab data get"):
        _run(project, "{}\n")
    (project / "data" / "raw.dvc").write_text("outs: []\n")
    with pytest.raises(preflight.DataMissingError, match="dvc pull"):
        _run(project, "{}\n")


def test_missing_dataset_in_an_experiment_workspace_explains_tracking(
    project: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    shutil.rmtree(project / "data" / "raw")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path_factory.mktemp("main-project")))
    with pytest.raises(preflight.DataMissingError, match="queued and --temp experiments.*dvc add"):
        _run(project, "{}\n")


def test_strategy_auto_passes_whatever_last_blocks_says(project: Path) -> None:
    # last_blocks bounds apply to an explicit last_blocks only: auto takes the probe's count
    out = _run(project, "finetune: {strategy: auto, last_blocks: 50}\n")
    assert out.read_text() == preflight.OK_TEXT


def test_shipped_layouts_are_what_the_adapter_builds_now() -> None:
    shipped = json.loads(block_layouts.SHIPPED.read_text(encoding="utf-8"))
    built = block_layouts.build()
    stale = f"{block_layouts.SHIPPED.name} is stale: run `{block_layouts.REGENERATE}` and commit it"
    assert shipped["versions"] == built["versions"] == block_layouts.layout_key(), stale
    assert shipped["blocks"] == built["blocks"], stale
    assert {"efficientnet_lite0", "resnet18", "vgg16", "inception_v3", "densenet121"} <= set(shipped["blocks"])
