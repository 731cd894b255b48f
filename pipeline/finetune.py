"""Stage finetune@<backbone>: fine-tune the pretrained backbone end to end on the train split.

Outputs in models/finetune/<backbone>/: model.safetensors + model.json, metrics.json
(train/val only), curve.csv (for `dvc plots`), run.json, and the working checkpoint
checkpoint.pt (persisted between runs, so a killed run resumes after its last epoch).

With distributed.nproc_per_node x nnodes > 1 the script runs itself again
under torchrun and trains with DistributedDataParallel (finetune.batch_size is
the global batch); rank 0 alone writes the outputs, the checkpoint and the one
MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from transferlab import collector, config, paths, tracking
from transferlab.config import ParamsError
from transferlab.distributed.launch import is_rank_zero, relaunch
from transferlab.errors import exit_on_user_error

if TYPE_CHECKING:
    from transferlab.distributed import Ranks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone", help="a name in finetune.backbones")
    parser.add_argument("--split", type=Path, default=paths.SPLIT, help=f"default: {paths.SPLIT}")
    parser.add_argument("--images", type=Path, default=paths.PREPARED, help=f"default: {paths.PREPARED}")
    parser.add_argument("--heads", type=Path, help="cached-feature heads, for init: best_head "
                                                  "(default: models/heads/<backbone>)")
    parser.add_argument("--out", type=Path, help="default: models/finetune/<backbone>")
    parser.add_argument("--probe", type=Path, help="the probe report strategy auto reads "
                                                  "(default: reports/probe/<backbone>.json)")
    parser.add_argument("--node-rank", type=int, help="this node's rank (default: distributed.node_rank); "
                                                      "for the commands run by hand on nodes other than 0")
    args = parser.parse_args(argv)
    name = args.backbone
    all_params = config.load(paths.PARAMS)
    params = all_params.finetune
    if name not in params.backbones:
        raise ParamsError(f"finetune: {name!r} is not in finetune.backbones {params.backbones}")
    out = args.out or paths.finetune_dir(name)
    relaunch(f"finetune@{name}", all_params.distributed, args.node_rank)  # returns in each rank, or alone
    # rank 0 alone logs: MLflow opens in a helper process while _run imports torch and the stage's code
    with tracking.start() if is_rank_zero() else contextlib.nullcontext() as tracker:
        _run(name, args, all_params, out, tracker)


def _run(name: str, args: argparse.Namespace, all_params: config.Params, out: Path,
         tracker: tracking.Tracker | None) -> None:
    with collector.importing():  # the stage's libraries (transferlab.collector: no collection meanwhile)
        from transferlab.device import resolve_device
        from transferlab.distributed import init_ranks

    with init_ranks(all_params.distributed, resolve_device(all_params.compute.device)) as ranks:
        _train(name, args, all_params, out, ranks, tracker)


def _train(name: str, args: argparse.Namespace, all_params: config.Params, out: Path, ranks: Ranks,
           tracker: tracking.Tracker | None) -> None:
    with collector.importing():  # the stage's libraries (transferlab.collector: no collection meanwhile)
        from transferlab.distributed import main_only
        from transferlab.probe.choice import resolve
        from transferlab.training.finetune import CURVE_COLUMNS, META_FILE, MODEL_FILE, FinetuneJob, finetune

    params, extract = all_params.finetune, all_params.extract
    params, choice = resolve(params, args.probe or paths.probe_report(name))
    if choice is not None and ranks.is_main:
        print(f"finetune@{name}: strategy auto chose {choice['chosen']}. {choice['reason']}", flush=True)
    job = FinetuneJob(name, params, args.split, args.images, out, extract.weights.get(name),
                      extract.weights_path.get(name), args.heads or paths.HEADS / name,
                      head_kinds=all_params.train_head.kinds, device=all_params.compute.device, choice=choice)
    logged = {"backbone": name, "weights": job.weights, "weights_path": job.weights_path, **params.model_dump(),
              "strategy_requested": choice["requested"] if choice else params.strategy, "world_size": ranks.world,
              "batch_size_per_rank": params.batch_size // ranks.world}
    with main_only(ranks, lambda: tracker.stage_run(f"finetune@{name}", logged, out / paths.RUN_RECORD)) as run:
        result = finetune(job, ranks=ranks)
        if not ranks.is_main:
            return
        run.set_tags({"weights_id": result.backbone.weights_id, "resumed_from_epoch": result.resumed_from,
                      "strategy_chosen": choice["chosen"] if choice else params.strategy,
                      "strategy_reason": choice["reason"] if choice else ""})
        run.log_history({c: [r[c] for r in result.history] for c in CURVE_COLUMNS if c != "step"}, first_step=1)
        run.log_metrics(result.metrics)
        run.log_dict({"notes": result.notes, "model": result.meta, "strategy": choice}, "finetune_summary.json")
        for file in (MODEL_FILE, META_FILE):
            run.log_artifact(out / file, "model")
        m = result.metrics
        print(f"finetune@{name}: best epoch {m['best_epoch']} of {m['epochs_run']}, "
              f"val accuracy {m['val_accuracy']:.3f}, val loss {m['val_loss']:.4f}")


if __name__ == "__main__":
    exit_on_user_error("finetune", main)
