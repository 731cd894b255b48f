"""The three cached-feature heads at 12 classes, side by side: their fit seconds and the linear head's floor.

A synthetic feature store with the shapes of efficientnet_lite0 (1280 x 7 x 7
maps, float16 as extract caches them, and their pooled vectors): 12 classes,
589 train and 131 val images, the sizes of the held-out photo set the speed
issue measured. Every head uses its params.yaml defaults (the params models).

- gap, former way: the net pools every batch of maps, every epoch (the same
  training code, fed the maps); gap, now: pooled once, trained on the vectors.
- linear: its fit, against its arithmetic floor: the matrix products of the
  same number of epochs (first layer forward and weight gradient per train
  batch, forward per val batch) timed alone in the same process.
- svm, former way: ``StandardScaler -> LinearSVC`` at scikit-learn's tol 1e-4,
  the grid by ``cross_val_score`` (5 C x 5 folds), then
  ``CalibratedClassifierCV(ensemble=False)`` (5 more fits and one on all);
  svm, now: ``SvmHead`` (each fold standardized and factored once for the grid,
  solved in the span of its rows, tol 0.01, calibration on the grid's folds).

``--pipeline``: also the heads' own ``fit_seconds`` from a real ``dvc repro``
(ingest, split, extract, train_head) in a temporary copy of the project, on 12
classes of real photo crops (bench/projects.photo_classes, 70 per class: about
588 train / 126 val), so the figures include real efficientnet_lite0 features,
which are low-rank and correlated, as the synthetic store's noise is not.
``--keep DIR`` keeps that project (its feature store serves experiments).

    .venv/bin/python bench/heads.py [--classes 12] [--train 589] [--val 131] [--pipeline] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from projects import copy_project, machine, photo_classes, project_env, write_section
from transferlab.config import GapHeadParams, LinearHeadParams, SvmHeadParams
from transferlab.models.heads import GapHead, LinearHead, SvmHead
from transferlab.models.heads.nets import GapNet, TrainConfig, train_module

SECTION = "heads"
MAP_SHAPE = (1280, 7, 7)  # efficientnet_lite0's last feature maps at 224 px
SEPARATION = 0.6  # class centres' spread against unit noise: separable, as pooled ImageNet features mostly are
FACTORS = 16  # image-level factors shared by all channels: pooled features are low-rank and correlated
FACTOR_SCALE = 0.15  # their weight per channel: strong correlation, classes still learnable by every head


def store(n_classes: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float16 maps ``(n, 1280, 7, 7)`` of non-negative activations around a centre per class, and labels.

    Each image adds a mix of ``FACTORS`` shared directions to its class centre
    (what makes real pooled vectors correlated and ill-conditioned), and every
    map position its own unit noise.
    """
    channels = MAP_SHAPE[0]
    shape_rng = np.random.default_rng(0)
    centres = np.abs(shape_rng.normal(0, SEPARATION, (n_classes, channels)))
    mixing = shape_rng.normal(0, FACTOR_SCALE, (FACTORS, channels))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    image = centres[y] + rng.normal(0, 1, (n, FACTORS)) @ mixing
    maps = np.abs(image[:, :, None, None] + rng.normal(0, 1, (n, *MAP_SHAPE)))
    return maps.astype(np.float16), np.array([f"class{k:02d}" for k in y])


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def gap_former_way(maps: np.ndarray, y: np.ndarray, val: tuple[np.ndarray, np.ndarray]) -> int:
    params = GapHeadParams()
    classes, index = np.unique(y, return_inverse=True)
    cfg = TrainConfig(lr=params.lr, weight_decay=params.weight_decay, max_epochs=params.max_epochs,
                      batch_size=params.batch_size, patience=params.patience, seed=params.random_state)
    torch.manual_seed(params.random_state)
    net = GapNet(maps.shape[1], len(classes), params.dropout)
    result = train_module(net, maps, index, cfg, None, (val[0], np.searchsorted(classes, val[1])))
    return len(result.history)


def svm_former_way(pooled: np.ndarray, y: np.ndarray) -> float:
    """The former SvmHead.fit, step by step: grid by cross_val_score, then CalibratedClassifierCV; its best C."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    params = SvmHeadParams()
    y_idx = np.unique(y, return_inverse=True)[1]
    folds = StratifiedKFold(n_splits=params.cv, shuffle=True, random_state=params.random_state)

    def pipeline(c: float) -> Pipeline:
        svc = LinearSVC(C=c, max_iter=params.max_iter, random_state=params.random_state)  # tol 1e-4
        return Pipeline([("scaler", StandardScaler()), ("svc", svc)])

    scores = [cross_val_score(pipeline(c), pooled, y_idx, cv=folds).mean() for c in params.C_grid]
    best = params.C_grid[int(np.argmax(scores))]
    CalibratedClassifierCV(pipeline(best), method="sigmoid", cv=folds, ensemble=False).fit(pooled, y_idx)
    return best


def linear_floor(n_train: int, n_val: int, epochs: int, n_classes: int) -> float:
    """Seconds of the linear head's first-layer matrix products over ``epochs`` epochs, nothing else."""
    params = LinearHeadParams()
    inputs = int(np.prod(MAP_SHAPE))
    weight = torch.randn(inputs, params.hidden)
    second = torch.randn(params.hidden, n_classes)
    batches = [min(params.batch_size, n_train - s) for s in range(0, n_train, params.batch_size)]
    val_batches = [min(params.batch_size, n_val - s) for s in range(0, n_val, params.batch_size)]
    x = torch.randn(params.batch_size, inputs)
    grad = torch.randn(params.batch_size, params.hidden)
    start = time.perf_counter()
    for _ in range(epochs):
        for b in batches:
            (x[:b] @ weight) @ second  # forward
            x[:b].T @ grad[:b]  # the weight gradient (inputs need none)
        for b in val_batches:
            (x[:b] @ weight) @ second
    return time.perf_counter() - start


PER_CLASS = 70  # photo crops per class in --pipeline: 840 images, ~588 train at the 70/15/15 split


def pipeline_fit_seconds(work: Path) -> dict[str, dict]:
    """Each head's metrics.json after a real ``dvc repro train_head`` on 12 classes of photo crops."""
    env = project_env()
    project, raw = work / "project", work / "photos"
    copy_project(project, env)
    photo_classes(raw, PER_CLASS)
    for cmd in (["transferlab", "data", "get", str(raw)], ["dvc", "repro", "train_head"]):
        done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    heads = project / "models" / "heads" / "efficientnet_lite0"
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(heads.glob("*/metrics.json"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--train", type=int, default=589)
    parser.add_argument("--val", type=int, default=131)
    parser.add_argument("--pipeline", action="store_true", help="also a real dvc repro on 12 classes of photos")
    parser.add_argument("--keep", type=Path, help="with --pipeline: run in this folder and keep it")
    args = parser.parse_args()
    maps, y = store(args.classes, args.train, seed=1)
    val_maps, y_val = store(args.classes, args.val, seed=2)
    pooled, val_pooled = maps.mean(axis=(2, 3), dtype=np.float32), val_maps.mean(axis=(2, 3), dtype=np.float32)

    gap_before, gap_before_epochs = timed(lambda: gap_former_way(maps, y, (val_maps, y_val)))
    gap_after, gap = timed(lambda: GapHead().fit(pooled, y, eval_set=(val_pooled, y_val)))
    linear_s, linear = timed(lambda: LinearHead().fit(maps, y, eval_set=(val_maps, y_val)))
    floor = linear_floor(args.train, args.val, len(linear.history_), args.classes)
    svm_before, svm_before_C = timed(lambda: svm_former_way(pooled, y))
    svm_s, svm = timed(lambda: SvmHead().fit(pooled, y))
    figures = {
        "gap_former_s": round(gap_before, 2), "gap_former_epochs": gap_before_epochs,
        "gap_s": round(gap_after, 2), "gap_epochs": len(gap.history_),
        "gap_speedup": round(gap_before / gap_after, 1),
        "linear_s": round(linear_s, 2), "linear_epochs": len(linear.history_),
        "linear_floor_s": round(floor, 2), "linear_over_floor": round(linear_s / floor, 2),
        "svm_former_s": round(svm_before, 2), "svm_former_best_C": svm_before_C,
        "svm_s": round(svm_s, 2), "svm_best_C": svm.best_C_, "svm_speedup": round(svm_before / svm_s, 1),
        "val_accuracy": {name: round(float(np.mean(h.predict(x) == y_val)), 3)
                         for name, h, x in (("gap", gap, val_pooled), ("linear", linear, val_maps),
                                            ("svm", svm, val_pooled))},
    }
    print(json.dumps(figures))
    total = gap_after + linear_s + svm_s
    real = []
    if args.pipeline:
        work = args.keep or Path(tempfile.mkdtemp(prefix="transferlab-heads-"))
        metrics = pipeline_fit_seconds(work)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps({k: {"fit_seconds": m["fit_seconds"], "val_accuracy": m["val_accuracy"]}
                          for k, m in metrics.items()}))
        real = [
            "",
            f"Real `dvc repro train_head` (`--pipeline`): {len(metrics)} heads on 12 classes of photo crops "
            f"({PER_CLASS} per class, `bench/projects.photo_classes`), efficientnet_lite0 features, "
            "params.yaml defaults; each head's own `fit_seconds`:",
            "",
            "| head | fit_seconds | val accuracy |",
            "|---|---|---|",
            *(f"| {k} | {m['fit_seconds']:.2f} | {m['val_accuracy']:.3f} |" for k, m in metrics.items()),
            f"| the three | {sum(m['fit_seconds'] for m in metrics.values()):.2f} | |",
        ]
    write_section(SECTION, "\n".join([
        "## The cached heads at 12 classes (`bench/heads.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, torch threads {torch.get_num_threads()}. "
        f"Synthetic store with efficientnet_lite0's shapes (maps {' x '.join(map(str, MAP_SHAPE))} float16 "
        f"and pooled vectors, {FACTORS} shared factors), {args.classes} classes, {args.train} train / {args.val} val; params.yaml defaults.",
        "",
        "| head | fit seconds | epochs | note |",
        "|---|---|---|---|",
        f"| gap, pooling every batch of maps (former) | {gap_before:.2f} | {gap_before_epochs} | |",
        f"| gap, on the pooled vectors (now) | {gap_after:.2f} | {len(gap.history_)} | "
        f"{gap_before / gap_after:.1f}x faster, the same function |",
        f"| linear | {linear_s:.2f} | {len(linear.history_)} | {linear_s / floor:.2f}x its floor of {floor:.2f} s "
        "(first-layer matrix products alone) |",
        f"| svm, former way (sklearn tol, cross_val_score + CalibratedClassifierCV) | {svm_before:.2f} | - | "
        f"C = {svm_before_C} |",
        f"| svm (now) | {svm_s:.2f} | - | C = {svm.best_C_}; {svm_before / svm_s:.1f}x faster |",
        f"| the three (now) | {total:.2f} | | |",
        "",
        "Val accuracy: " + ", ".join(f"{k} {v}" for k, v in figures["val_accuracy"].items()) + ".",
        *real,
    ]))


if __name__ == "__main__":
    main()
