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
- svm: the fit (C chosen on the grid by 5-fold CV, then Platt calibration).

    .venv/bin/python bench/heads.py [--classes 12] [--train 589] [--val 131]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from projects import machine, write_section
from transferlab.config import GapHeadParams, LinearHeadParams, SvmHeadParams
from transferlab.models.heads import GapHead, LinearHead, SvmHead
from transferlab.models.heads.nets import GapNet, TrainConfig, train_module

SECTION = "heads"
MAP_SHAPE = (1280, 7, 7)  # efficientnet_lite0's last feature maps at 224 px
SEPARATION = 0.6  # class centres' spread against unit noise: separable, as pooled ImageNet features mostly are


def store(n_classes: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float16 maps ``(n, 1280, 7, 7)`` of non-negative activations around a centre per class, and labels."""
    channels = MAP_SHAPE[0]
    centres = np.abs(np.random.default_rng(0).normal(0, SEPARATION, (n_classes, channels)))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    maps = centres[y][:, :, None, None] + np.abs(rng.normal(0, 1, (n, *MAP_SHAPE)))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--train", type=int, default=589)
    parser.add_argument("--val", type=int, default=131)
    args = parser.parse_args()
    maps, y = store(args.classes, args.train, seed=1)
    val_maps, y_val = store(args.classes, args.val, seed=2)
    pooled, val_pooled = maps.mean(axis=(2, 3), dtype=np.float32), val_maps.mean(axis=(2, 3), dtype=np.float32)

    gap_before, gap_before_epochs = timed(lambda: gap_former_way(maps, y, (val_maps, y_val)))
    gap_after, gap = timed(lambda: GapHead().fit(pooled, y, eval_set=(val_pooled, y_val)))
    linear_s, linear = timed(lambda: LinearHead().fit(maps, y, eval_set=(val_maps, y_val)))
    floor = linear_floor(args.train, args.val, len(linear.history_), args.classes)
    svm_s, svm = timed(lambda: SvmHead().fit(pooled, y))
    figures = {
        "gap_former_s": round(gap_before, 2), "gap_former_epochs": gap_before_epochs,
        "gap_s": round(gap_after, 2), "gap_epochs": len(gap.history_),
        "gap_speedup": round(gap_before / gap_after, 1),
        "linear_s": round(linear_s, 2), "linear_epochs": len(linear.history_),
        "linear_floor_s": round(floor, 2), "linear_over_floor": round(linear_s / floor, 2),
        "svm_s": round(svm_s, 2), "svm_best_C": svm.best_C_,
        "val_accuracy": {name: round(float(np.mean(h.predict(x) == y_val)), 3)
                         for name, h, x in (("gap", gap, val_pooled), ("linear", linear, val_maps),
                                            ("svm", svm, val_pooled))},
    }
    print(json.dumps(figures))
    total = gap_after + linear_s + svm_s
    write_section(SECTION, "\n".join([
        "## The cached heads at 12 classes (`bench/heads.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, torch threads {torch.get_num_threads()}. "
        f"Synthetic store with efficientnet_lite0's shapes (maps {' x '.join(map(str, MAP_SHAPE))} float16 "
        f"and pooled vectors), {args.classes} classes, {args.train} train / {args.val} val; params.yaml defaults.",
        "",
        "| head | fit seconds | epochs | note |",
        "|---|---|---|---|",
        f"| gap, pooling every batch of maps (former) | {gap_before:.2f} | {gap_before_epochs} | |",
        f"| gap, on the pooled vectors (now) | {gap_after:.2f} | {len(gap.history_)} | "
        f"{gap_before / gap_after:.1f}x faster, the same function |",
        f"| linear | {linear_s:.2f} | {len(linear.history_)} | {linear_s / floor:.2f}x its floor of {floor:.2f} s "
        "(first-layer matrix products alone) |",
        f"| svm | {svm_s:.2f} | - | C = {svm.best_C_} from the grid |",
        f"| the three (now) | {total:.2f} | | |",
        "",
        "Val accuracy: " + ", ".join(f"{k} {v}" for k, v in figures["val_accuracy"].items()) + ".",
    ]))


if __name__ == "__main__":
    main()
