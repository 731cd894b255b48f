"""Stage finetune@<backbone>: fine-tune the pretrained backbone end to end on the train split.

Outputs in models/finetune/<backbone>/: model.safetensors + model.json, metrics.json
(train/val only), curve.csv (for `dvc plots`), run.json, and the working checkpoint
checkpoint.pt (persisted between runs, so a killed run resumes after its last epoch).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from transferlab import config, tracking
from transferlab.finetune import CURVE_COLUMNS, META_FILE, MODEL_FILE, FinetuneJob, finetune

SPLIT = Path("data/split.csv")
IMAGES = Path("data/prepared")
HEADS = Path("models/heads")
MODELS = Path("models/finetune")


def main(name: str) -> None:
    params = config.section("finetune")
    extract = config.section("extract")
    if name not in params.backbones:
        raise SystemExit(f"finetune: {name!r} is not in finetune.backbones {params.backbones}")
    out = MODELS / name
    job = FinetuneJob(name, params, SPLIT, IMAGES, out, extract.weights.get(name), extract.weights_path.get(name),
                      HEADS / name)
    logged = {"backbone": name, "weights": job.weights, "weights_path": job.weights_path,
              **dataclasses.asdict(params)}
    with tracking.stage_run(f"finetune@{name}", logged, out / "run.json") as run:
        result = finetune(job)
        run.set_tags({"weights_id": result.backbone.weights_id, "resumed_from_epoch": result.resumed_from})
        run.log_history({c: [r[c] for r in result.history] for c in CURVE_COLUMNS if c != "step"}, first_step=1)
        run.log_metrics(result.metrics)
        run.log_dict({"notes": result.notes, "model": result.meta}, "finetune_summary.json")
        for file in (MODEL_FILE, META_FILE):
            run.log_artifact(out / file, "model")
        m = result.metrics
        print(f"finetune@{name}: best epoch {m['best_epoch']} of {m['epochs_run']}, "
              f"val accuracy {m['val_accuracy']:.3f}, val loss {m['val_loss']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
