"""The probe stage and `finetune.strategy: auto` through the real `dvc repro`, in a temporary project copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import copy_project, project_env, output as run

pytestmark = pytest.mark.slow
BACKBONE = "efficientnet_lite0"



def test_probe_recommends_and_auto_fine_tunes_with_it(tmp_path: Path) -> None:
    root, env = tmp_path / "project", project_env()
    copy_project(root, env)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["finetune"].update(strategy="auto", max_epochs=1, warmup_epochs=0)
    params["train_head"]["kinds"] = ["svm"]  # finetune depends on the heads: the quickest one
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["transferlab", "data", "get"], root, env)  # the demo's 200 small faces

    out = run(["dvc", "repro", f"finetune@{BACKBONE}"], root, env)
    assert f"Running stage 'probe@{BACKBONE}'" in out
    report_path = root / "reports" / "probe" / f"{BACKBONE}.json"
    report = json.loads(report_path.read_text())
    blocks = [b["block"] for b in report["blocks"]]
    assert blocks[0] == "stem" and blocks[-1] == "conv_head" and len(blocks) == 9
    assert all(0 <= b["ci_low"] <= b["val_accuracy"] <= b["ci_high"] <= 1 for b in report["blocks"])
    assert 0 < report["measures"]["imagenet_similarity"]["value"] < 1
    for suffix in (".csv", ".png", ".run.json"):
        assert report_path.with_suffix(suffix).is_file()
    rec = report["recommendation"]
    sim = report["measures"]["imagenet_similarity"]["value"]
    assert f"{sim:.3f}" in rec["reason"]  # the reason cites this dataset's own measures

    meta = json.loads((root / "models" / "finetune" / BACKBONE / "model.json").read_text())
    strategy = meta["strategy"]
    assert strategy["requested"] == "auto" and strategy["name"] == rec["strategy"]
    assert strategy["last_blocks"] == rec["last_blocks"] and strategy["reason"] == rec["reason"]
    assert "strategy auto chose" in out

    # seeds make a rerun write the same report, so finetune (which depends on it) is not made stale
    again = tmp_path / "again.json"
    run(["python", "pipeline/probe.py", BACKBONE, "--out", str(again)], root, env)
    assert again.read_bytes() == report_path.read_bytes()
    assert again.with_suffix(".png").read_bytes() == report_path.with_suffix(".png").read_bytes()
