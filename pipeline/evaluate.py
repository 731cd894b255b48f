"""Stage evaluate: every trained model on the test split, side by side.

Outputs: reports/{metrics.json, comparison.csv, comparison.md, confusion/,
confusion_png/, roc/, run.json} and the champion predictor models/champion/.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from transferlab import config, tracking
from transferlab.config import HEADS
from transferlab.evaluation import (
    backbone_gflops, build_predictor, champion, figures, find_models, metric_summary, score, write_reports,
)
from transferlab.features import read_manifest

SPLIT, IMAGES, FEATURES = Path("data/split.csv"), Path("data/prepared"), Path("data/features")
HEADS_DIR, FINETUNE_DIR = Path("models/heads"), Path("models/finetune")
REPORTS, CHAMPION = Path("reports"), Path("models/champion")


def main() -> None:
    params, extract = config.section("evaluate"), config.section("extract")
    finetune = config.section("finetune")
    with tracking.stage_run("evaluate", config.as_dict(params), REPORTS / "run.json") as run:
        refs = find_models(HEADS_DIR, FINETUNE_DIR, extract.backbones, list(HEADS), finetune.backbones)
        split = pd.read_csv(SPLIT, dtype={"label": str}, keep_default_na=False)
        scored = [score(ref, FEATURES, split, IMAGES, extract.batch_size) for ref in refs]
        gflops = {b: backbone_gflops(b, read_manifest(FEATURES / b)["transform"]["crop_size"])
                  for b in extract.backbones}
        results = [figures(s, params, gflops[s.ref.backbone]) for s in scored]
        write_reports(scored, results, REPORTS)
        for s, result in zip(scored, results):
            tracking.link_test_figures(run, s.ref.path / "run.json", s.ref.name, metric_summary(result))
        best = champion(results, params)
        ref = next(r for r in refs if r.name == best["model"])
        build_predictor(ref, extract.weights.get(ref.backbone), extract.weights_path.get(ref.backbone), CHAMPION,
                        config.section("ingest"))
        example = IMAGES / split.loc[split["part"] == "test", "path"].iloc[0]
        version = tracking.log_champion(run, CHAMPION, params.registered_model, example)
        run.log_artifact(REPORTS / "comparison.md")
        run.log_artifact(REPORTS / "metrics.json")
        run.log_artifact(REPORTS / "confusion_png", "confusion")
        print((REPORTS / "comparison.md").read_text())
        print(f"champion (by {params.select_by}): {best['model']} -> models:/{params.registered_model}@champion"
              f" (version {version})")


if __name__ == "__main__":
    main()
