"""``transferlab`` command line: thin wrappers over the library, one small function per command.

A command is added with an ``_add_<name>(subparsers)`` that registers its
arguments and sets ``handler`` to a ``_cmd_<name>(args) -> int``. Expected
failures (bad input, missing data) are raised as one of USER_ERRORS and end as
a one-line message on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from transferlab import __version__
from transferlab.config import DataParams, ParamsError, load_params, parse_section
from transferlab.sources import SourceError, check_layout, get_source

EXIT_OK = 0
EXIT_USER_ERROR = 2  # the same code argparse uses for bad arguments
USER_ERRORS: tuple[type[Exception], ...] = (SourceError, ParamsError)
DEFAULT_OUT = Path("data/raw")
DEFAULT_PARAMS = Path("params.yaml")
SUMMARY_CLASSES_SHOWN = 12


def _data_params(params: Path) -> DataParams:
    # a fresh clone without params.yaml still has a working default source
    if not params.exists():
        return DataParams()
    return parse_section(DataParams, load_params(params).get("data"), "data")


def _cmd_data_get(args: argparse.Namespace) -> int:
    source, sha256 = args.source, args.sha256
    if source is None:
        data = _data_params(args.params)
        source = data.source
        sha256 = sha256 if sha256 is not None else data.sha256
    out = get_source(source, args.out, sha256=sha256, force=args.force)
    counts = check_layout(out)
    shown = ", ".join(f"{name} {n}" for name, n in list(counts.items())[:SUMMARY_CLASSES_SHOWN])
    more = ", ..." if len(counts) > SUMMARY_CLASSES_SHOWN else ""
    print(f"{source} -> {out}: {sum(counts.values())} images in {len(counts)} folders ({shown}{more})")
    return EXIT_OK


def _add_data(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="get the raw dataset")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    get = commands.add_parser(
        "get",
        help="write an image-folder dataset into data/raw",
        description=(
            "Write an image-folder dataset into OUT, atomically. SOURCE is builtin:lfw-faces (offline), "
            "builtin:digits (offline), hymenoptera (PyTorch tutorial archive; needs internet), an http(s) URL "
            "of a .zip/.tar.gz/.tgz/.tar, a local archive, or a local folder (copied). Without SOURCE, "
            "data.source and data.sha256 from params.yaml are used."
        ),
    )
    get.add_argument("source", nargs="?", metavar="SOURCE", help="default: data.source in --params")
    get.add_argument("--sha256", metavar="HEX", help="expected sha256 of the archive; checked before extraction")
    get.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"target folder (default: {DEFAULT_OUT})")
    get.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    get.add_argument(
        "--params", type=Path, default=DEFAULT_PARAMS, help=f"where SOURCE defaults from (default: {DEFAULT_PARAMS})"
    )
    get.set_defaults(handler=_cmd_data_get)


def _cmd_summary(args: argparse.Namespace) -> int:
    comparison = args.reports / "comparison.md"
    if comparison.exists():
        print(f"Test-split comparison ({comparison}):\n")
        print(comparison.read_text(encoding="utf-8"))
        return EXIT_OK
    rows = sorted(args.models.glob("*/*/*/metrics.json"))
    if not rows:
        raise SourceError(f"no results yet under {args.reports} or {args.models}: run `dvc repro` first")
    print("Validation results so far (the test split is reported by the evaluate stage):\n")
    print("| model | val accuracy |\n|---|---|")
    for path in rows:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        name = "/".join(path.parent.relative_to(args.models).parts)
        print(f"| {name} | {metrics['val_accuracy']:.3f} |")
    return EXIT_OK


def _add_summary(subparsers: Any) -> None:
    summary = subparsers.add_parser("summary", help="print the results table of the last pipeline run")
    summary.add_argument("--reports", type=Path, default=Path("reports"), help="evaluate stage outputs")
    summary.add_argument("--models", type=Path, default=Path("models"), help="training stage outputs")
    summary.set_defaults(handler=_cmd_summary)


def _cmd_compare(args: argparse.Namespace) -> int:
    from transferlab import compare, tracking

    runs = tracking.executions(args.root)
    chosen = compare.choose(runs, last=len(runs) if args.all else args.last, experiments=args.exp or ())
    print(compare.render(chosen))
    return EXIT_OK if chosen else EXIT_USER_ERROR


def _add_compare(subparsers: Any) -> None:
    cmp = subparsers.add_parser(
        "compare",
        help="compare pipeline executions recorded in MLflow: differing params and test figures",
        description=(
            "By default the latest execution that reached evaluate; when that is a DVC experiment, "
            "also the latest plain execution before it, side by side."
        ),
    )
    cmp.add_argument("--last", type=int, metavar="N", help="the N latest executions")
    cmp.add_argument("--exp", action="append", metavar="NAME", help="executions of DVC experiment NAME (repeatable)")
    cmp.add_argument("--all", action="store_true", help="every execution")
    cmp.add_argument("--root", type=Path, default=Path("."), help="project root holding mlruns/ (default: .)")
    cmp.set_defaults(handler=_cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab", description="Reproducible transfer learning on image folders.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data(subparsers)
    _add_summary(subparsers)
    _add_compare(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except USER_ERRORS as exc:
        print(f"transferlab: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
