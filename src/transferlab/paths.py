"""Artifact paths and file names of the pipeline, once.

``dvc.yaml`` passes these paths to the stage scripts on their ``cmd:`` lines;
the scripts' argparse defaults come from here, so a script run by hand writes
where DVC expects it. Everything is relative to the project root.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
RAW = Path("data/raw")
PREFLIGHT = Path("data/preflight.ok")
PREPARED = Path("data/prepared")
PREPARED_IMAGES = PREPARED / "images"
MANIFEST = PREPARED / "manifest.csv"
INGEST_REPORT = PREPARED / "report.json"
INGEST_RECORD = PREPARED / "run.json"
SPLIT = Path("data/split.csv")
SPLIT_RECORD = Path("data/split.run.json")
FEATURES = Path("data/features")
MODELS = Path("models")
HEADS = MODELS / "heads"
FINETUNE = MODELS / "finetune"
CHAMPION = MODELS / "champion"
REPORTS = Path("reports")
AUDIT_REPORT = REPORTS / "audit.json"  # the audit stage: findings (duplicates, leaks, label suspects)
AUDIT_DIR = REPORTS / "audit"  # its thumbnail sheets and run record
PROBE = REPORTS / "probe"  # probe@<backbone>: <backbone>.json, .csv, .png, .run.json

# file names inside a model folder
MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
CURVE_FILE = "curve.csv"
RUN_RECORD = "run.json"

# evaluate's outputs inside REPORTS (dvc.yaml declares each one)
REPORT_METRICS = "metrics.json"
REPORT_COMPARISON_CSV = "comparison.csv"
REPORT_COMPARISON_MD = "comparison.md"
REPORT_CONFUSION = "confusion"
REPORT_CONFUSION_PNG = "confusion_png"
REPORT_ROC = "roc"
REPORT_HTML = "index.html"  # the self-contained report page (transferlab.evaluation.html)


def features(backbone: str) -> Path:
    return FEATURES / backbone


def features_record(backbone: str) -> Path:
    return FEATURES / f"{backbone}.run.json"


def head_dir(backbone: str, head: str) -> Path:
    return HEADS / backbone / head


def probe_report(backbone: str) -> Path:
    return PROBE / f"{backbone}.json"


def finetune_dir(backbone: str) -> Path:
    return FINETUNE / backbone


def evaluate_outputs(reports: Path = REPORTS) -> list[Path]:
    """What evaluate must have written before it may register a champion (besides the champion folder)."""
    names = (REPORT_METRICS, REPORT_COMPARISON_CSV, REPORT_COMPARISON_MD, REPORT_CONFUSION, REPORT_CONFUSION_PNG,
             REPORT_ROC)
    return [reports / name for name in names]
