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


# A fresh interpreter, as DVC starts the stage: a bad last_blocks, then a good one.
FRESH_PREFLIGHT = """
import sys
from pathlib import Path
from transferlab import preflight
from transferlab.config import ParamsError
def run(params):
    Path("params.yaml").write_text(params)
    preflight.run(Path("params.yaml"), Path("data/raw"), Path("data/preflight.ok"), Path("blocks.json"))
try:
    run("extract: {backbones: [efficientnet_lite0, resnet18]}\\nfinetune: {backbones: [resnet18], last_blocks: 6}")
except ParamsError as err:
    print(err)
run("extract: {backbones: [efficientnet_lite0, vgg16]}\\nfinetune: {last_blocks: 9}")
print(sorted(m for m in ("torch", "torchvision", "timm") if m in sys.modules), Path("blocks.json").exists())
"""


def test_fresh_project_checks_blocks_without_torch(project: Path) -> None:
    out = subprocess.run([sys.executable, "-c", FRESH_PREFLIGHT], cwd=project, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    refusal, imported = out.stdout.strip().splitlines()
    assert refusal == ("finetune.last_blocks: got 6; allowed: 1 to 5, the blocks of resnet18 "
                       "(stem, layer1, layer2, layer3, layer4); or strategy: full")
    # no torch, nothing built and so nothing cached; if this fails, see the test above (a stale table)
    assert imported == "[] False"
    assert (project / "data" / "preflight.ok").read_text() == preflight.OK_TEXT


def _ship(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, versions: str, blocks: list[str]) -> None:
    table = tmp_path / "block_layouts.json"
    table.write_text(json.dumps({"versions": versions, "blocks": {"efficientnet_lite0": blocks}}))
    monkeypatch.setattr(block_layouts, "SHIPPED", table)


def test_shipped_layouts_are_read_only_under_the_running_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "blocks.json"
    _ship(tmp_path, monkeypatch, block_layouts.layout_key(), ["a", "b"])
    assert preflight.block_names("efficientnet_lite0", cache) == ["a", "b"]
    assert not cache.exists()
    # other library versions or adapter code: the table may be wrong, so the layout is built and cached
    _ship(tmp_path, monkeypatch, block_layouts.layout_key().replace("torch==", "torch==0.0+"), ["a", "b"])
    names = preflight.block_names("efficientnet_lite0", cache)
    assert names[:2] == ["stem", "blocks.0"] and len(names) > 2
    assert json.loads(cache.read_text()) == {"versions": block_layouts.layout_key(),
                                             "blocks": {"efficientnet_lite0": names}}
