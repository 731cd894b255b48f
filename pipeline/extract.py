"""Stage extract@<backbone>: each image through the frozen backbone, once.

Outputs: data/features/<backbone>/ (feature store + manifest) and its run
record data/features/<backbone>.run.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transferlab import config, tracking
from transferlab.backbones import load_backbone
from transferlab.features import extract

SPLIT = Path("data/split.csv")
IMAGES = Path("data/prepared")
FEATURES = Path("data/features")


def main(name: str) -> None:
    params = config.section("extract")
    if name not in params.backbones:
        raise SystemExit(f"extract: {name!r} is not in extract.backbones {params.backbones}")
    backbone = load_backbone(name, params.weights.get(name), params.weights_path.get(name))
    logged = {"backbone": name, "weights": backbone.weights_id, "batch_size": params.batch_size,
              "keep_maps": params.keep_maps}
    with tracking.stage_run(f"extract@{name}", logged, FEATURES / f"{name}.run.json") as run:
        manifest = extract(backbone, SPLIT, IMAGES, FEATURES / name, params.batch_size, params.keep_maps)
        counts = manifest["param_counts"]
        run.log_metrics({"images_forwarded": manifest["images_forwarded"],
                         "params_total": counts["total"], "params_frozen": counts["frozen"]})
        run.log_dict(manifest, "feature_manifest.json")
        print(f"extract@{name}: {manifest['images_forwarded']} images forwarded, once each")


if __name__ == "__main__":
    main(sys.argv[1])
