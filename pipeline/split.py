"""Stage split: stratified train/val/test parts, folders and duplicates respected.

Outputs: data/split.csv and its run record data/split.run.json.
"""

from __future__ import annotations

from pathlib import Path

from transferlab import config, tracking
from transferlab.split import summarize, write_split

MANIFEST = Path("data/prepared/manifest.csv")
OUT = Path("data/split.csv")
RECORD = Path("data/split.run.json")


def main() -> None:
    params = config.section("split")
    with tracking.stage_run("split", config.as_dict(params), RECORD) as run:
        split = write_split(MANIFEST, OUT, params)
        counts = summarize(split)
        run.log_metrics({f"n_{part}": sum(c.values()) for part, c in counts.items()})
        run.log_dict(counts, "split_counts.json")
        run.log_artifact(OUT)


if __name__ == "__main__":
    main()
