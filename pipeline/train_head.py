"""Stage train_head@<backbone>-<head>: one classifier head on cached features.

Outputs in models/heads/<backbone>/<head>/: the model (safetensors + JSON
sidecar), metrics.json, curve.csv (for `dvc plots`) and run.json. The head
kinds are the registered ones (transferlab.models.heads.registry); dvc.yaml
runs one stage per name in train_head.kinds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferlab import collector, config, paths, tracking
from transferlab.errors import exit_on_user_error
from transferlab.models.heads import registry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone", help="a name in extract.backbones")
    parser.add_argument("head", choices=registry.names(), help="the head kind (a registered head)")
    parser.add_argument("--features", type=Path, help="feature store (default: data/features/<backbone>)")
    parser.add_argument("--out", type=Path, help="default: models/heads/<backbone>/<head>")
    args = parser.parse_args(argv)
    all_params = config.load(paths.PARAMS)
    with tracking.start() as tracker:  # MLflow opens in a helper process while _run imports the stage's code
        _run(args, all_params, tracker)


def _run(args: argparse.Namespace, all_params: config.Params, tracker: tracking.Tracker) -> None:
    with collector.importing():  # the stage's libraries (transferlab.collector: no collection meanwhile)
        from transferlab.device import resolve_device
        from transferlab.training.heads import check_data, train_head

    backbone, kind = args.backbone, args.head
    params = all_params.train_head.head(kind)
    device = resolve_device(all_params.compute.device)
    features = args.features or paths.features(backbone)
    out = args.out or paths.head_dir(backbone, kind)
    check_data(kind, params, features)  # before any run is logged
    logged = {"backbone": backbone, "head": kind, **params.model_dump(), "device": str(device)}
    with tracker.stage_run(f"train_head@{backbone}-{kind}", logged, out / paths.RUN_RECORD) as run:
        result = train_head(kind, params, features, out, device)
        curve, metrics = result.curve, result.metrics
        run.log_history({c: curve[c].tolist() for c in curve.columns if c != "step"})
        run.log_metrics(metrics)
        run.log_artifact(out / paths.MODEL_FILE, "model")
        run.log_artifact(out / f"{paths.MODEL_FILE}.json", "model")
        print(f"train_head@{backbone}-{kind}: val accuracy {metrics['val_accuracy']:.3f}")


if __name__ == "__main__":
    exit_on_user_error("train_head", main)
