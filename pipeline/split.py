"""Stage split: stratified train/val/test parts, folders and duplicates respected.

Outputs: data/split.csv and its run record data/split.run.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferlab import collector, config, paths, tracking
from transferlab.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=paths.MANIFEST, help=f"default: {paths.MANIFEST}")
    parser.add_argument("--out", type=Path, default=paths.SPLIT, help=f"default: {paths.SPLIT}")
    parser.add_argument("--record", type=Path, default=paths.SPLIT_RECORD, help=f"default: {paths.SPLIT_RECORD}")
    args = parser.parse_args(argv)
    params = config.section("split")
    with tracking.start() as tracker:  # MLflow opens in a helper process while _run imports the stage's code
        _run(args, params, tracker)


def _run(args: argparse.Namespace, params: config.SplitParams, tracker: tracking.Tracker) -> None:
    with collector.importing():  # the stage's libraries (transferlab.collector: no collection meanwhile)
        from transferlab.data.split import summarize, write_split

    with tracker.stage_run("split", config.as_dict(params), args.record) as run:
        split = write_split(args.manifest, args.out, params)
        counts = summarize(split)
        run.log_metrics({f"n_{part}": sum(c.values()) for part, c in counts.items()})
        run.log_dict(counts, "split_counts.json")
        run.log_artifact(args.out)


if __name__ == "__main__":
    exit_on_user_error("split", main)
