"""Stage extract@<backbone>: each image through the frozen backbone, once.

Outputs: data/features/<backbone>/ (feature store + manifest) and its run
record data/features/<backbone>.run.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferlab import config, paths, tracking
from transferlab.models.backbones import load_backbone
from transferlab.config import ParamsError
from transferlab.device import decode_workers, resolve_device
from transferlab.errors import exit_on_user_error
from transferlab.models.features import extract


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone", help="a name in extract.backbones")
    parser.add_argument("--split", type=Path, default=paths.SPLIT, help=f"default: {paths.SPLIT}")
    parser.add_argument("--images", type=Path, default=paths.PREPARED, help=f"default: {paths.PREPARED}")
    parser.add_argument("--out", type=Path, help="feature store (default: data/features/<backbone>)")
    args = parser.parse_args(argv)
    name = args.backbone
    all_params = config.load(paths.PARAMS)
    params, compute = all_params.extract, all_params.compute
    if name not in params.backbones:
        raise ParamsError(f"extract: {name!r} is not in extract.backbones {params.backbones}")
    out = args.out or paths.features(name)
    device = resolve_device(compute.device)
    workers = decode_workers(compute.num_workers, device)
    store = tracking.open_store()
    backbone = load_backbone(name, params.weights.get(name), params.weights_path.get(name))
    logged = {"backbone": name, "weights": backbone.weights_id, "batch_size": params.batch_size,
              "keep_maps": params.keep_maps, "device": str(device), "num_workers": workers}
    with tracking.stage_run(f"extract@{name}", logged, out.with_name(f"{out.name}.run.json"), store=store) as run:
        manifest = extract(backbone, args.split, args.images, out, params.batch_size, params.keep_maps,
                           device=device, num_workers=workers)
        counts = manifest["param_counts"]
        run.log_metrics({"images_forwarded": manifest["images_forwarded"],
                         "params_total": counts["total"], "params_frozen": counts["frozen"]})
        run.log_dict(manifest, "feature_manifest.json")
        print(f"extract@{name}: {manifest['images_forwarded']} images forwarded, once each")


if __name__ == "__main__":
    exit_on_user_error("extract", main)
