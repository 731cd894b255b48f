"""Stage preflight: validate all of params.yaml, find the dataset, reach the MLflow store; before anything else.

DVC runs it on every `dvc repro` (always_changed), and ingest depends on its
output, so a typo or an unreachable server stops the pipeline before any work,
even when every other stage is up to date. Its output never changes, so it
never makes another stage stale.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferlab import paths, preflight
from transferlab.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=paths.PARAMS, help=f"default: {paths.PARAMS}")
    parser.add_argument("--raw", type=Path, default=paths.RAW, help=f"the dataset ingest reads (default: {paths.RAW})")
    parser.add_argument("--out", type=Path, default=paths.PREFLIGHT, help=f"default: {paths.PREFLIGHT}")
    args = parser.parse_args(argv)
    preflight.run(args.params, args.raw, args.out)
    print("preflight: params.yaml valid, dataset present, MLflow store reachable")


if __name__ == "__main__":
    exit_on_user_error("preflight", main)
