"""Stage probe@<backbone>: a linear probe per block of the frozen backbone, and the strategy it recommends.

One forward pass of the train and val images keeps every named block's pooled
output; a logistic regression per block (C by cross-validation on train) is
scored on val. With two dataset measures (train images per class; the
backbone's own ImageNet classifier's mean top-1 probability) the 2 x 2 table and
the curve give the recommendation that `finetune.strategy: auto` takes.

Outputs: reports/probe/<backbone>.json (curve, measures, recommendation and its
reason), .csv (for `dvc plots`), .png, and the run record .run.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferlab import config, paths, tracking
from transferlab.config import ParamsError
from transferlab.device import decode_workers, resolve_device
from transferlab.errors import exit_on_user_error
from transferlab.models.backbones import load_backbone
from transferlab.probe.job import probe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone", help="a name in finetune.backbones")
    parser.add_argument("--split", type=Path, default=paths.SPLIT, help=f"default: {paths.SPLIT}")
    parser.add_argument("--images", type=Path, default=paths.PREPARED, help=f"default: {paths.PREPARED}")
    parser.add_argument("--out", type=Path, help="report JSON (default: reports/probe/<backbone>.json)")
    args = parser.parse_args(argv)
    name = args.backbone
    all_params = config.load(paths.PARAMS)
    params, extract, compute = all_params.probe, all_params.extract, all_params.compute
    if name not in all_params.finetune.backbones:
        raise ParamsError(f"probe: {name!r} is not in finetune.backbones {all_params.finetune.backbones}")
    out = args.out or paths.probe_report(name)
    device = resolve_device(compute.device)
    workers = decode_workers(compute.num_workers, device)
    store = tracking.open_store()
    backbone = load_backbone(name, extract.weights.get(name), extract.weights_path.get(name))
    logged = {"backbone": name, "weights": backbone.weights_id, "batch_size": extract.batch_size,
              "device": str(device), "num_workers": workers, **params.model_dump()}
    with tracking.stage_run(f"probe@{name}", logged, out.with_suffix(".run.json"), store=store) as run:
        content, seconds = probe(backbone, args.split, args.images, out, params, extract.batch_size, device, workers)
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
        print(f"probe@{name}: forward {seconds['forward_seconds']:.1f} s, probes {seconds['probe_seconds']:.1f} s")


if __name__ == "__main__":
    exit_on_user_error("probe", main)
