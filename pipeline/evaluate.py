"""Stage evaluate: every trained model on the test split, side by side; the champion into the registry.

Outputs: reports/{metrics.json, comparison.csv, comparison.md, confusion/,
confusion_png/, roc/, index.html, run.json} and the champion predictor models/champion/ (with its ONNX
export, model.onnx, when its model exports). With evaluate.tta, every model with probabilities also gets
a "<model>+tta" row (test-time augmentation), beside its plain row; the champion is chosen among plain rows.
With the audit's reports/audit.json, every model's test accuracy is also given
without the test images it flagged as likely leaks (accuracy_without_leaks).
The champion is registered last, once every figure and file is written, so a
failed evaluate never leaves a registered version behind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferlab import collector, config, paths, tracking
from transferlab.errors import exit_on_user_error

# MLflow stays in this process (the champion is registered through its fluent API), so no tracking
# helper: the heavy imports are here, with no collection meanwhile (transferlab.collector)
with collector.importing():
    import pandas as pd

    from transferlab.audit.show import read_audit
    from transferlab.config import IngestParams
    from transferlab.device import decode_workers, resolve_device
    from transferlab.evaluation import html
    from transferlab.evaluation.evaluate import (
        ModelRef, backbone_gflops, champion, figures, find_models, missing_outputs, score, without_leaks,
    )
    from transferlab.evaluation.reports import comparison_table, metric_summary, write_reports
    from transferlab.evaluation.tta import load_backbones, tta_scored
    from transferlab.io import sha256_file
    from transferlab.models.backbones import load_backbone
    from transferlab.models.features import read_manifest
    from transferlab.serving import registry
    from transferlab.serving.onnx_export import ONNX_FILE, ExportError, export_onnx
    from transferlab.serving.predictor import save_finetune_predictor, save_head_predictor


def build_predictor(ref: ModelRef, weights: str | None, weights_path: str | None, out: Path,
                    ingest: IngestParams) -> None:
    """Bundle model ``ref`` as a self-contained predictor at ``out``; new images get ``ingest``'s decoding.

    Here, not in transferlab.evaluation: the library's evaluation never imports serving.
    """
    if ref.kind == "finetune":
        save_finetune_predictor(ref.path, out, ingest_params=ingest)
        return
    backbone = load_backbone(ref.backbone, weights, weights_path)
    save_head_predictor(backbone, ref.path / paths.MODEL_FILE, out, weights=weights, ingest_params=ingest)


def run_identity(run: tracking.StageRun, all_params: config.Params, split: Path) -> dict[str, str]:
    """What the report page names the run by: code, params, MLflow runs and data."""
    commit, dirty = tracking.git_state(".")
    return {"git commit": commit + (" (uncommitted changes)" if dirty else ""),
            "params hash (params.yaml, validated)": tracking.stable_hash(config.as_dict(all_params)),
            "MLflow parent run (pipeline execution)": run.parent_run_id, "MLflow evaluate run": run.run_id,
            f"data hash (sha256 of {split}: every image's sha256, label and part)": sha256_file(split)}


def export_champion(champion_dir: Path) -> None:
    """``model.onnx`` inside the champion predictor, so the registered model carries it (when its head exports)."""
    try:
        export_onnx(champion_dir, champion_dir / ONNX_FILE)
    except ExportError as err:
        print(f"evaluate: no ONNX export of the champion: {err}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, default=paths.SPLIT, help=f"default: {paths.SPLIT}")
    parser.add_argument("--images", type=Path, default=paths.PREPARED, help=f"default: {paths.PREPARED}")
    parser.add_argument("--features", type=Path, default=paths.FEATURES, help=f"default: {paths.FEATURES}")
    parser.add_argument("--models", type=Path, default=paths.MODELS, help=f"default: {paths.MODELS}")
    parser.add_argument("--reports", type=Path, default=paths.REPORTS, help=f"default: {paths.REPORTS}")
    parser.add_argument("--audit", type=Path, default=paths.AUDIT_REPORT,
                        help=f"the audit's findings: test accuracy without its leaked images (default: {paths.AUDIT_REPORT})")
    args = parser.parse_args(argv)
    all_params = config.load(paths.PARAMS)
    params, extract, finetune = all_params.evaluate, all_params.extract, all_params.finetune
    compute = all_params.compute
    device = resolve_device(compute.device)
    workers = decode_workers(compute.num_workers, device)
    heads_dir, champion_dir = args.models / paths.HEADS.name, args.models / paths.CHAMPION.name
    with collector.importing():  # MLflow
        store = tracking.open_store()
    logged = config.as_dict(params) | {"device": str(device), "num_workers": workers}
    with tracking.stage_run("evaluate", logged, args.reports / paths.RUN_RECORD, store=store) as run:
        kinds = list(all_params.train_head.kinds)  # the heads train_head trained
        refs = find_models(heads_dir, args.models / paths.FINETUNE.name, extract.backbones, kinds, finetune.backbones)
        split = pd.read_csv(args.split, dtype={"label": str}, keep_default_na=False)
        scored = [score(ref, args.features, split, args.images, extract.batch_size, device, workers)
                  for ref in refs]
        backbones = load_backbones(extract.backbones, extract.weights, extract.weights_path)  # TTA, gallery
        plain = len(scored)  # the TTA rows follow the plain ones; only plain rows are linked or chosen
        augmented = (tta_scored(s, params.tta, args.images, extract.batch_size, device, workers, backbones)
                     for s in scored)
        scored += [s for s in augmented if s is not None]
        gflops = {b: backbone_gflops(b, read_manifest(args.features / b)["transform"]["crop_size"])
                  for b in extract.backbones}
        leaked = set(read_audit(args.audit)["leaked_test_images"])
        views = [1] * plain + [1 + len(params.tta)] * (len(scored) - plain)  # a TTA row runs the network per view
        results = [figures(s, params, gflops[s.ref.backbone] * n) | without_leaks(s, leaked)
                   for s, n in zip(scored, views)]
        write_reports(scored, results, args.reports)
        for s, result in zip(scored[:plain], results[:plain]):
            tracking.link_test_figures(run, s.ref.path / paths.RUN_RECORD, s.ref.name, metric_summary(result))
        best = champion(results[:plain], params)
        ref = next(r for r in refs if r.name == best["model"])
        build_predictor(ref, extract.weights.get(ref.backbone), extract.weights_path.get(ref.backbone), champion_dir,
                        all_params.ingest)
        export_champion(champion_dir)
        html.build(scored, results, comparison_table(results), args.reports, args.images, args.features, backbones,
                   params.gallery, params.ece_bins, run_identity(run, all_params, args.split))
        missing = missing_outputs(args.reports, champion_dir)
        if missing:
            raise RuntimeError(f"evaluate did not write {', '.join(map(str, missing))}; no champion registered")
        run.log_artifact(args.reports / paths.REPORT_COMPARISON_MD)
        run.log_artifact(args.reports / paths.REPORT_METRICS)
        run.log_artifact(args.reports / paths.REPORT_CONFUSION_PNG, "confusion")
        run.log_artifact(args.reports / paths.REPORT_HTML)
        example = args.images / split.loc[split["part"] == "test", "path"].iloc[0]
        version = registry.log_champion(run, champion_dir, params.registered_model, example)
        print((args.reports / paths.REPORT_COMPARISON_MD).read_text())
        if leaked:
            print(f"without the {len(leaked)} test image(s) the audit flagged as likely leaks: " + ", ".join(
                f"{r['model']} {r['accuracy_without_leaks']:.3f}" for r in results if r["accuracy_without_leaks"] is not None))
        print(f"champion (by {params.select_by}): {best['model']} -> models:/{params.registered_model}@champion"
              f" (version {version})")


if __name__ == "__main__":
    exit_on_user_error("evaluate", main)
