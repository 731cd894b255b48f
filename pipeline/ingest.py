"""Stage ingest: decode every file of data/raw once, upright, RGB and shrunk.

Outputs: data/prepared/{images/, manifest.csv, report.json, run.json}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferlab import collector, config, paths, tracking
from transferlab.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=paths.RAW, help=f"the dataset (default: {paths.RAW})")
    parser.add_argument("--out", type=Path, default=paths.PREPARED, help=f"default: {paths.PREPARED}")
    args = parser.parse_args(argv)
    params = config.section("ingest")
    with tracking.start() as tracker:  # MLflow opens in a helper process while _run imports the stage's code
        _run(args, params, tracker)


def _run(args: argparse.Namespace, params: config.IngestParams, tracker: tracking.Tracker) -> None:
    with collector.importing():  # the stage's libraries (transferlab.collector: no collection meanwhile)
        from transferlab.data.ingest import ingest

    with tracker.stage_run("ingest", config.as_dict(params), args.out / paths.RUN_RECORD) as run:
        report = ingest(args.raw, args.out, params, progress=True)
        run.log_metrics({
            "images_seen": report["total"]["seen"],
            "images_kept": report["total"]["kept"],
            "images_rejected": report["total"]["rejected"],
            "duplicate_groups": len(report["duplicates"]),
            "near_duplicate_groups": len(report["near_duplicates"]),
            "classes": len(report["counts"]),
        })
        run.log_artifact(args.out / "report.json")
        run.log_artifact(args.out / "manifest.csv")


if __name__ == "__main__":
    exit_on_user_error("ingest", main)
