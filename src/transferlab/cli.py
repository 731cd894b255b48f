"""``transferlab`` command line: thin wrappers over the library, one small function per command.

A command is added with an ``_add_<name>(subparsers)`` that registers its
arguments and sets ``handler`` to a ``_cmd_<name>(args) -> int``. Expected
failures (bad input, missing data) are raised as one of USER_ERRORS and end as
a one-line message on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from transferlab import __version__
from transferlab.config import DataParams, IngestParams, ParamsError, load_params, parse_section
from transferlab.sources import SourceError, check_layout, get_source
from transferlab.tracking import ChampionNotFoundError

if TYPE_CHECKING:
    import pandas as pd


class PredictError(ValueError):
    """`transferlab predict` cannot start: no images, or no model to load."""


EXIT_OK = 0
EXIT_USER_ERROR = 2  # the same code argparse uses for bad arguments
USER_ERRORS: tuple[type[Exception], ...] = (SourceError, ParamsError, ChampionNotFoundError, PredictError)
DEFAULT_OUT = Path("data/raw")
DEFAULT_PARAMS = Path("params.yaml")
SUMMARY_CLASSES_SHOWN = 12
CHAMPION = "champion"
DEFAULT_TOP_K = 3
DEFAULT_REGISTERED_NAME = "transferlab"
# what torchvision's ImageFolder reads; used when params.yaml names no ingest.extensions
DEFAULT_IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
PROBABILITY_DIGITS = 3
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


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


def _image_extensions(params: Path) -> frozenset[str]:
    """ingest.extensions of params.yaml; null there means every format Pillow reads."""
    raw = load_params(params).get("ingest") if params.exists() else None
    if not isinstance(raw, dict) or "extensions" not in raw:
        return DEFAULT_IMAGE_EXTENSIONS
    extensions = parse_section(IngestParams, raw, "ingest").extensions
    if extensions is None:
        from PIL import Image

        return frozenset(Image.registered_extensions())
    return frozenset(e.lower() for e in extensions)


def _visible(path: Path, top: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(top).parts)


def _image_files(paths: Sequence[Path], extensions: frozenset[str]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.suffix.lower() in extensions and _visible(p, path))
            files.extend(sorted(p for p in found if p.is_file()))
        else:
            files.append(path)  # named explicitly: tried whatever its extension; a missing one is a bad file
    return files


def _registered_name(args: argparse.Namespace) -> str:
    if args.registered_name:
        return str(args.registered_name)
    raw = load_params(args.params).get("evaluate") if args.params.exists() else None
    return str((raw or {}).get("registered_model") or DEFAULT_REGISTERED_NAME)


def _model(args: argparse.Namespace) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The model as a function from a `path` frame to the serving output frame."""
    if args.model == CHAMPION:
        from transferlab import tracking

        # a progress bar per artifact copy drowns the table on a terminal
        os.environ.setdefault(PROGRESS_BAR_ENV, "false")
        return tracking.load_champion(_registered_name(args), args.root).predict  # type: ignore[no-any-return]
    from transferlab import serving
    from transferlab.predictor import PredictorError, load_predictor

    try:
        predictor = load_predictor(args.model)
    except PredictorError as exc:
        raise PredictError(f"{exc}; --model takes `{CHAMPION}` or a predictor directory") from exc
    return lambda frame: serving.classify(predictor, frame)


def _top_k(row: Any, columns: list[str], prefix: str, k: int) -> str:
    ranked = sorted(columns, key=lambda c: -row[c])[:k]
    return "  ".join(f"{c.removeprefix(prefix)} {row[c]:.{PROBABILITY_DIGITS}f}" for c in ranked)


def _print_table(paths: list[str], frame: pd.DataFrame, k: int) -> None:
    from transferlab.serving import ERROR, PROBA_PREFIX

    columns = [c for c in frame.columns if c.startswith(PROBA_PREFIX)]
    width = max(len(p) for p in paths)
    print(f"{'path':<{width}}  top {min(k, len(columns))}")
    for path, (_, row) in zip(paths, frame.iterrows()):
        error = row[ERROR]
        shown = f"error: {error}" if isinstance(error, str) else _top_k(row, columns, PROBA_PREFIX, k)
        print(f"{path:<{width}}  {shown}")


def _write_csv(out: Path, paths: list[str], frame: pd.DataFrame) -> None:
    from transferlab.io import atomic_path

    table = frame.copy()
    table.insert(0, "path", paths)
    with atomic_path(out, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")


def _cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from transferlab import serving

    if args.top_k < 1:
        raise PredictError(f"--top-k must be at least 1, got {args.top_k}")
    extensions = _image_extensions(args.params)
    files = _image_files(args.paths, extensions)
    if not files:
        raise PredictError(f"no image files ({', '.join(sorted(extensions))}) under {', '.join(map(str, args.paths))}")
    paths = [str(f) for f in files]
    frame = _model(args)(pd.DataFrame({serving.PATH: paths}))
    _print_table(paths, frame, args.top_k)
    if args.out is not None:
        _write_csv(args.out, paths, frame)
    bad = [(p, e) for p, e in zip(paths, frame[serving.ERROR]) if isinstance(e, str)]
    for path, error in bad:
        print(f"transferlab: cannot classify {path}: {error}", file=sys.stderr)
    if len(bad) == len(paths):
        print(f"transferlab: error: none of the {len(paths)} files could be classified", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK


def _add_predict(subparsers: Any) -> None:
    predict = subparsers.add_parser(
        "predict",
        help="classify image files with the registered champion or a predictor directory",
        description=(
            "Classify image files. Folders are searched recursively for the extensions in params.yaml "
            "(ingest.extensions); files named explicitly are always tried. Files that cannot be read "
            "are reported on stderr and in the CSV's error column; the exit code is 2 only when no "
            "file could be classified."
        ),
    )
    predict.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    predict.add_argument(
        "--model", default=CHAMPION, metavar=f"{CHAMPION}|DIR",
        help=f"`{CHAMPION}` (default): the model registered with the alias champion in MLflow "
             "(the evaluate stage registers it); or a predictor directory such as models/champion",
    )
    predict.add_argument(
        "--top-k", type=int, default=DEFAULT_TOP_K, help=f"classes shown per image (default: {DEFAULT_TOP_K})"
    )
    predict.add_argument("--out", type=Path, help="also write every probability to this CSV")
    predict.add_argument(
        "--registered-name", metavar="NAME",
        help=f"registered model name (default: evaluate.registered_model in --params, else {DEFAULT_REGISTERED_NAME})",
    )
    predict.add_argument("--root", type=Path, default=Path("."), help="project root holding mlruns/ (default: .)")
    predict.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help=f"default: {DEFAULT_PARAMS}")
    predict.set_defaults(handler=_cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab", description="Reproducible transfer learning on image folders.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data(subparsers)
    _add_summary(subparsers)
    _add_compare(subparsers)
    _add_predict(subparsers)
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
