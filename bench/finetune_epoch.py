"""One fine-tuning epoch: ours against the tutorials' loop, side by side in one process.

Same model (efficientnet_lite0 with the finetune head, ``finetune.strategy``
and ``last_blocks`` defaults, so the same blocks are frozen), same images (JPEGs
of 512 x 384, as ingest writes them), same DataLoader (train transform, batch
size, seeded shuffling), same optimizer groups and learning rates:

- tutorial: ``model.train()`` on the whole network, then for each batch
  ``zero_grad; model(x); loss.backward(); step`` (the PyTorch transfer-learning
  tutorial's loop), and a val pass under ``torch.no_grad``;
- ours: the finetune stage's own session and loop (``training.strategy.make_session``,
  ``transferlab.loop.run_epoch``): frozen blocks stay in eval mode, the val pass
  runs under ``inference_mode``, module and batches in channels_last (device.IMAGE_FORMAT);
- ours in NCHW: the same loop with the default layout and float32 (what it did before channels_last);
- ours in float32: channels_last, ``finetune.autocast: false`` (what it did before CPU bfloat16);
- ours: the defaults (channels_last, and bfloat16 autocast where the CPU computes it natively).

Each way gets a fresh model from the same seed and runs ``--epochs`` epochs
(train + val); the figure is seconds per epoch.

    .venv/bin/python bench/finetune_epoch.py [--images 128] [--epochs 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from projects import PREPARED_SIZE, machine, prepared_photos, write_section
from transferlab.config import FinetuneParams
from transferlab.loop import fresh_state, run_epoch
from transferlab.models.backbones import load_backbone
from transferlab.training.finetune import MONITORS, _loop
from transferlab.training.images import SplitData
from transferlab.training.strategy import build_model, make_session

SECTION = "finetune_epoch"
VAL_SHARE = 4  # one image in VAL_SHARE goes to val


def fresh_session(data: SplitData, params: FinetuneParams) -> Any:
    torch.manual_seed(params.seed)  # the same initial head and shuffling for every way
    backbone = load_backbone("efficientnet_lite0")
    model = build_model(backbone, len(data.classes), params)
    return make_session(backbone, model, data, params, "cpu")


def tutorial_epoch(session: Any) -> None:
    """The tutorials' loop: the whole model in train mode (frozen BatchNorm included)."""
    model, optimizer, loss_fn = session.model, session.optimizer, session.loss_fn
    model.train()
    for inputs, labels in session.train_loader:
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        optimizer.step()
        session.scheduler.step()
    model.eval()
    with torch.no_grad():
        for inputs, labels in session.val_loader:
            loss_fn(model(inputs), labels)


def ours_epoch(session: Any, params: FinetuneParams) -> None:
    loop, state = _loop(session, params), fresh_state(MONITORS[params.monitor])
    run_epoch(loop, state)


def nchw(session: Any) -> Any:
    """The session in the default layout, its loop moving batches as they come."""
    session.model.to(memory_format=torch.contiguous_format)
    return session


def ours_nchw_epoch(session: Any, params: FinetuneParams) -> None:
    loop = dataclasses.replace(_loop(session, params), inputs_to=lambda x, device: x.to(device))
    run_epoch(loop, fresh_state(MONITORS[params.monitor]))


def timed_epochs(epoch: Any, epochs: int) -> float:
    started = time.perf_counter()
    for _ in range(epochs):
        epoch()
    return (time.perf_counter() - started) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    params = FinetuneParams()
    work = Path(tempfile.mkdtemp(prefix="transferlab-finetune-"))
    try:
        paths = prepared_photos(work, args.images)
        classes = sorted({p.parent.name for p in paths})
        items = [(p, classes.index(p.parent.name)) for p in paths]
        data = SplitData(classes, [x for i, x in enumerate(items) if i % VAL_SHARE],
                         [x for i, x in enumerate(items) if not i % VAL_SHARE], "bench")
        tutorial = nchw(fresh_session(data, params))  # the tutorials use the default layout
        seconds = {"tutorial": timed_epochs(lambda: tutorial_epoch(tutorial), args.epochs)}
        plain = params.model_copy(update={"autocast": False})
        former = nchw(fresh_session(data, plain))
        seconds["ours_nchw"] = timed_epochs(lambda: ours_nchw_epoch(former, plain), args.epochs)
        fp32 = fresh_session(data, plain)
        seconds["ours_float32"] = timed_epochs(lambda: ours_epoch(fp32, plain), args.epochs)
        ours = fresh_session(data, params)
        seconds["ours"] = timed_epochs(lambda: ours_epoch(ours, params), args.epochs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {k: round(v, 2) for k, v in seconds.items()} | {
        "tutorial_over_ours": round(seconds["tutorial"] / seconds["ours"], 2),
        "nchw_over_ours": round(seconds["ours_nchw"] / seconds["ours"], 2),
        "float32_over_ours": round(seconds["ours_float32"] / seconds["ours"], 2),
        "trained_in": ours.trained_in,
        "train_images": len(data.train), "val_images": len(data.val), "threads": torch.get_num_threads()}
    print(json.dumps(figures))
    write_section(SECTION, "\n".join([
        "## One fine-tuning epoch: ours against the tutorials' loop (`bench/finetune_epoch.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; torch threads {figures['threads']}. "
        f"efficientnet_lite0, strategy `{params.strategy}` (last {params.last_blocks} blocks train), "
        f"batch {params.batch_size}, {len(data.train)} train + {len(data.val)} val JPEGs of "
        f"{PREPARED_SIZE[0]} x {PREPARED_SIZE[1]}; seconds per epoch (train + val), mean of {args.epochs}.",
        "",
        "| loop | seconds per epoch |",
        "|---|---|",
        f"| tutorial (`model.train()` on all, `no_grad` val) | {seconds['tutorial']:.2f} |",
        f"| ours in NCHW and float32 (frozen blocks in eval mode, `inference_mode` val) | "
        f"{seconds['ours_nchw']:.2f} |",
        f"| ours in channels_last, float32 (`finetune.autocast: false`) | {seconds['ours_float32']:.2f} |",
        f"| ours, the defaults (channels_last, autocast: {figures['trained_in']}) | {seconds['ours']:.2f} |",
        "",
        f"Tutorial / ours: {figures['tutorial_over_ours']:.2f}x; ours NCHW / ours: {figures['nchw_over_ours']:.2f}x; "
        f"ours float32 / ours: {figures['float32_over_ours']:.2f}x.",
    ]))


if __name__ == "__main__":
    main()
