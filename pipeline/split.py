"""Stage split: stratified train/val/test parts, folders and duplicates respected.

Outputs: data/split.csv and its run record data/split.run.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferlab import config, paths, tracking
from transferlab.errors import exit_on_user_error
from transferlab.data.split import summarize, write_split


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=paths.MANIFEST, help=f"default: {paths.MANIFEST}")
    parser.add_argument("--out", type=Path, default=paths.SPLIT, help=f"default: {paths.SPLIT}")
    parser.add_argument("--record", type=Path, default=paths.SPLIT_RECORD, help=f"default: {paths.SPLIT_RECORD}")
    args = parser.parse_args(argv)
    params = config.section("split")
    store = tracking.open_store()
    with tracking.stage_run("split", config.as_dict(params), args.record, store=store) as run:
        split = write_split(args.manifest, args.out, params)
        counts = summarize(split)
        run.log_metrics({f"n_{part}": sum(c.values()) for part, c in counts.items()})
        run.log_dict(counts, "split_counts.json")
        run.log_artifact(args.out)


if __name__ == "__main__":
    exit_on_user_error("split", main)
