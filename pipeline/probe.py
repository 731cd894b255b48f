"""Stage probe@<backbone>: a linear probe per block of the frozen backbone, and the strategy it recommends.

extract keeps every named block's pooled output of the train and val images
(and the ImageNet classifier's confidence) in the feature store; a logistic
regression per block (C by cross-validation on train) is scored on val. With two dataset measures (train images per class; the
backbone's own ImageNet classifier's mean top-1 probability) the 2 x 2 table and
the curve give the recommendation that `finetune.strategy: auto` takes.

Outputs: reports/probe/<backbone>.json (curve, measures, recommendation and its
reason), .csv (for `dvc plots`), .png, and the run record .run.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferlab import collector, config, paths, tracking
from transferlab.config import ParamsError
from transferlab.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone", help="a name in finetune.backbones")
    parser.add_argument("--split", type=Path, default=paths.SPLIT, help=f"default: {paths.SPLIT}")
    parser.add_argument("--features", type=Path, help="feature store (default: data/features/<backbone>)")
    parser.add_argument("--out", type=Path, help="report JSON (default: reports/probe/<backbone>.json)")
    args = parser.parse_args(argv)
    name = args.backbone
    all_params = config.load(paths.PARAMS)
    params = all_params.probe
    if name not in all_params.finetune.backbones:
        raise ParamsError(f"probe: {name!r} is not in finetune.backbones {all_params.finetune.backbones}")
    out = args.out or paths.probe_report(name)
    store = args.features or paths.features(name)
    logged = {"backbone": name, "features": str(store), **params.model_dump()}
    with tracking.start() as tracker:  # MLflow opens in a helper process while _run imports the stage's code
        _run(name, store, args.split, out, params, logged, tracker)


def _run(name: str, store: Path, split: Path, out: Path, params: config.ProbeParams, logged: dict,
         tracker: tracking.Tracker) -> None:
    with collector.importing():  # the stage's libraries (transferlab.collector: no collection meanwhile)
        from transferlab.probe.job import probe

    with tracker.stage_run(f"probe@{name}", logged, out.with_suffix(".run.json")) as run:
        content, seconds = probe(store, split, out, params)
        rec = content["recommendation"]
        run.log_metrics({**seconds, **{f"probe_acc.{b['block']}": b["val_accuracy"] for b in content["blocks"]},
                         "imagenet_similarity": content["measures"]["imagenet_similarity"]["value"]})
        chosen = rec["strategy"] if rec["strategy"] != "last_blocks" else f"last_blocks: {rec['last_blocks']}"
        run.set_tags({"recommendation": chosen})
        run.log_dict(content, "probe_report.json")
        run.log_artifact(out.with_suffix(".png"), "probe")
        curve = ", ".join(f"{b['block']} {b['val_accuracy']:.3f}" for b in content["blocks"])
        print(f"probe@{name}: val accuracy per block: {curve}")
        print(f"probe@{name}: recommends {chosen}. {rec['reason']}")
        print(f"probe@{name}: probes {seconds['probe_seconds']:.1f} s")


if __name__ == "__main__":
    exit_on_user_error("probe", main)
