"""How the cost grows with the dataset: seconds per image and peak memory per stage, and a no-op `dvc repro`.

For each size (default 1,000, 5,000 and 20,000 images) a synthetic image folder
(bench/projects.photo_classes: 12 classes of photo crops, 160-320 px) goes
through the real stages in a temporary copy of the project, one `dvc repro
<stage>` at a time (each also runs preflight, which always runs): ingest, split, extract (pooled vectors only:
``extract.keep_maps: false``) and train_head with the svm head alone. Then
`dvc repro train_head` again with nothing changed: the no-op cost (preflight
included, which always runs). Peak memory of a stage is the largest resident
set among the processes of its `dvc repro` (``RUSAGE_CHILDREN`` of a fresh
helper process per stage). Writes the table to BENCHMARKS.md and the curve to
bench/figures/scale.png.

    .venv/bin/python bench/scale.py [--sizes 1000 5000 20000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from projects import PHOTOS, PROJECT_ROOT, copy_project, machine, photo_classes, project_env, write_section

SECTION = "scale"
STAGES = ("ingest", "split", "extract", "train_head")
# A small first pass, not reported: the first run after a cold start reads the interpreter's and
# libraries' files from disk, a one-off cost that would otherwise land on the smallest size.
WARMUP_IMAGES = 120
POOLED_BYTES = 1280 * 4  # one image's pooled vector: efficientnet_lite0's 1280 features in float32
FIGURE = PROJECT_ROOT / "bench" / "figures" / "scale.png"
# A fresh interpreter per stage: RUSAGE_CHILDREN then covers that stage's processes only.
MEASURE = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
           "print(json.dumps({'rc': rc.returncode, 'seconds': time.perf_counter() - t, "
           "'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'err': rc.stderr[-3000:]}))")


def measured(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{result['err']}")
    return result


def one_size(n: int, work: Path, env: dict[str, str]) -> dict:
    project, raw = work / "project", work / "photos"
    copy_project(project, env)
    photo_classes(raw, -(-n // len(PHOTOS)))
    subprocess.run(["transferlab", "data", "get", str(raw)], cwd=project, env=env, check=True, capture_output=True)
    shutil.rmtree(raw)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["extract"]["keep_maps"] = False
    params["train_head"]["kinds"] = ["svm"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    images = sum(1 for _ in (project / "data" / "raw").rglob("*.jpg"))
    # one target at a time; each run also reruns preflight (always_changed), a second or two
    stages = {stage: measured(["dvc", "repro", stage], project, env) for stage in STAGES}
    noop = measured(["dvc", "repro", "train_head"], project, env)
    return {"images": images, "stages": {k: {"seconds": round(v["seconds"], 2), "peak_mb": round(v["peak_mb"])}
                                         for k, v in stages.items()},
            "total_seconds": round(sum(v["seconds"] for v in stages.values()), 2),
            "noop_seconds": round(noop["seconds"], 2)}


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["images"] for r in rows]
    for stage in STAGES:
        ax.plot(sizes, [1000 * r["stages"][stage]["seconds"] / r["images"] for r in rows], marker="o", label=stage)
    ax.plot(sizes, [1000 * r["total_seconds"] / r["images"] for r in rows], marker="s", color="black", label="total")
    ax.set(xscale="log", xlabel="images", ylabel="ms per image", title="transferlab: cost per image by dataset size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--warmup", type=int, default=WARMUP_IMAGES, help="images of an unreported first pass")
    args = parser.parse_args()
    env = project_env()
    rows = []
    for n in [args.warmup, *args.sizes] if args.warmup else args.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"transferlab-scale-{n}-"))
        try:
            rows.append(one_size(n, work, env))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(rows[-1]), flush=True)
    rows = rows[1:] if args.warmup else rows
    plot(rows)
    first, last = rows[0], rows[-1]
    ratio = (last["total_seconds"] / last["images"]) / (first["total_seconds"] / first["images"])
    header = "| images | " + " | ".join(f"{s} s (peak MB)" for s in STAGES) + " | ms per image | no-op `dvc repro` s |"
    lines = [
        "## Scale: cost per image by dataset size (`bench/scale.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}. Synthetic folders of 12 classes of photo crops "
        "(160-320 px), one `dvc repro` per stage in a fresh copy of the project; extract keeps pooled vectors "
        "only (`keep_maps: false`), train_head trains the svm alone. Peak MB: the largest process of the stage.",
        "",
        header,
        "|" + "---|" * (len(STAGES) + 3),
    ]
    for r in rows:
        cells = " | ".join(f"{r['stages'][s]['seconds']:.1f} ({r['stages'][s]['peak_mb']})" for s in STAGES)
        lines.append(f"| {r['images']} | {cells} | {1000 * r['total_seconds'] / r['images']:.1f} | "
                     f"{r['noop_seconds']:.2f} |")
    growth = last["stages"]["extract"]["peak_mb"] - first["stages"]["extract"]["peak_mb"]
    pooled = (last["images"] - first["images"]) * POOLED_BYTES / 2**20
    lines += ["", f"Seconds per image at {last['images']} over {first['images']}: {ratio:.2f}x. "
              f"Extract's peak grew by {growth} MB from {first['images']} to {last['images']} images; their "
              f"pooled vectors take {pooled:.0f} MB more. "
              f"Plot: [bench/figures/scale.png](bench/figures/scale.png)."]
    write_section(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
