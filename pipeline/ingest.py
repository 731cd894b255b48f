"""Stage ingest: decode every file of data/raw once, upright, RGB and shrunk.

Outputs: data/prepared/{images/, manifest.csv, report.json, run.json}.
"""

from __future__ import annotations

from pathlib import Path

from transferlab import config, tracking
from transferlab.ingest import ingest

RAW = Path("data/raw")
OUT = Path("data/prepared")


def main() -> None:
    params = config.section("ingest")
    with tracking.stage_run("ingest", config.as_dict(params), OUT / "run.json") as run:
        report = ingest(RAW, OUT, params, progress=True)
        run.log_metrics(
            {
                "images_seen": report["total"]["seen"],
                "images_kept": report["total"]["kept"],
                "images_rejected": report["total"]["rejected"],
                "duplicate_groups": len(report["duplicates"]),
                "classes": len(report["counts"]),
            }
        )
        run.log_artifact(OUT / "report.json")
        run.log_artifact(OUT / "manifest.csv")


if __name__ == "__main__":
    main()
