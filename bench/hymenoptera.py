"""Accuracy on the real ants-vs-bees photos, through the real pipeline.

Runs `dvc repro` in a temporary copy of the project on ../shared/datasets/hymenoptera
with the dataset's own folders mapped as the published figures are measured:
train = the `train` folder (val drawn from it, stratified), test = the `val` folder.
Model selection sees train and val only. Writes its section of BENCHMARKS.md.

    .venv/bin/python bench/hymenoptera.py [--strategy last_blocks] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
from projects import (  # noqa: E402
    VAL_FROM_TRAIN, copy_project, find_hymenoptera, machine, project_env, split_as_published, write_section,
)

SECTION = "hymenoptera"
REFERENCE = {"ResNet-18 frozen + linear (PyTorch tutorial)": 0.948, "ResNet-18 fine-tuned (tutorial)": 0.935}


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def configure(project: Path, strategy: str) -> dict:
    params = split_as_published(yaml.safe_load((project / "params.yaml").read_text()))
    params["finetune"]["strategy"] = strategy
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def section(project: Path, params: dict, seconds: float) -> str:
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    split = json.loads((project / "data" / "prepared" / "report.json").read_text())
    n_test = next(iter(metrics.values()))["n"]
    lines = [
        "## Hymenoptera (ants vs bees): test accuracy through `dvc repro`",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; whole pipeline {seconds / 60:.1f} min.",
        f"Command: `.venv/bin/python bench/hymenoptera.py --strategy {params['finetune']['strategy']}`.",
        f"Data: `../shared/datasets/hymenoptera` ({split['total']['kept']} images kept by ingest). "
        f"Train = `train` folder ({VAL_FROM_TRAIN:.0%} of it drawn as val), test = `val` folder "
        f"({n_test} images, one image = {1 / n_test:.4f}). Selection (early stopping, SVM C, champion) "
        "used train/val only.",
        "",
        "| model | test accuracy [95% CI] | errors | macro-F1 | log loss |",
        "|---|---|---|---|---|",
    ]
    for name, m in sorted(metrics.items(), key=lambda kv: -kv[1]["accuracy"]):
        loss = f"{m['log_loss']:.3f}" if "log_loss" in m else ""
        lines.append(f"| {name} | {m['accuracy']:.3f} [{m['accuracy_ci_low']:.3f}, {m['accuracy_ci_high']:.3f}] "
                     f"| {m['errors']} of {m['n']} | {m['macro_f1']:.3f} | {loss} |")
    lines += ["", "Published references on the same 153 images: "
              + "; ".join(f"{k}: about {v}" for k, v in REFERENCE.items()) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="last_blocks", choices=["head_only", "last_blocks", "full"])
    parser.add_argument("--data", type=Path, default=find_hymenoptera())
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    if args.data is None:
        parser.error("no local copy of hymenoptera found: pass --data DIR or set TRANSFERLAB_HYMENOPTERA")
    env = project_env()
    work = args.keep or Path(tempfile.mkdtemp(prefix="transferlab-bench-"))
    project = work / "project"
    copy_project(project, env)
    sh(["transferlab", "data", "get", str(args.data.resolve())], project, env)
    params = configure(project, args.strategy)
    started = time.perf_counter()
    print(sh(["dvc", "repro"], project, env)[-3000:])
    text = section(project, params, time.perf_counter() - started)
    write_section(SECTION, text)
    print(text)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
