"""Stage train_head@<backbone>-<head>: one classifier head on cached features.

Outputs in models/heads/<backbone>/<head>/: the model (safetensors + JSON
sidecar), metrics.json, curve.csv (for `dvc plots`) and run.json.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from transferlab import config, tracking
from transferlab.train import fit_head, write_outputs

FEATURES = Path("data/features")
MODELS = Path("models/heads")


def main(backbone: str, kind: str) -> None:
    params = config.section("train_head").head(kind)
    out = MODELS / backbone / kind
    logged = {"backbone": backbone, "head": kind, **dataclasses.asdict(params)}
    with tracking.stage_run(f"train_head@{backbone}-{kind}", logged, out / "run.json") as run:
        head, metrics, curve = fit_head(kind, params, FEATURES / backbone)
        write_outputs(head, metrics, curve, out, out / "metrics.json", out / "curve.csv")
        run.log_history({c: curve[c].tolist() for c in curve.columns if c != "step"})
        run.log_metrics(metrics)
        run.log_artifact(out / "model.safetensors", "model")
        run.log_artifact(out / "model.safetensors.json", "model")
        print(f"train_head@{backbone}-{kind}: val accuracy {metrics['val_accuracy']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
