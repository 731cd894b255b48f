"""``transferlab`` command line: thin wrappers over the library, one small function per command.

A command registers its arguments with an ``add_parser(subparsers)`` in its own module (or an ``_add_<name>``
here) and sets ``handler``; expected failures (UserError) end as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from transferlab import __version__
from transferlab.config import EvaluateParams, Params, load
from transferlab.errors import EXIT_USER_ERROR, UserError
from transferlab.data.sources import SourceError, check_layout, get_source, skipped_files
from transferlab.evaluation import report_command
from transferlab.serving import export_command
from transferlab.tracking import compare_command, server as team_server

if TYPE_CHECKING:
    import pandas as pd


class PredictError(UserError, ValueError):
    """`transferlab predict` cannot start: no images, or no model to load."""


EXIT_OK = 0
DEFAULT_OUT = Path("data/raw")
DEFAULT_PARAMS = Path("params.yaml")
SUMMARY_CLASSES_SHOWN = 12
CHAMPION = "champion"
DEFAULT_TOP_K = 3
DEFAULT_REGISTERED_NAME = EvaluateParams().registered_model
PROBABILITY_DIGITS = 3
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def _params(path: Path) -> Params:
    # a folder without params.yaml (predict elsewhere, a fresh layout) still gets the defaults
    return load(path) if path.exists() else Params()


def _cmd_data_get(args: argparse.Namespace) -> int:
    params = _params(args.params)
    source, sha256 = args.source, args.sha256
    if source is None:
        source = params.data.source
        sha256 = sha256 if sha256 is not None else params.data.sha256
    extensions = params.ingest.suffixes()
    out = get_source(source, args.out, sha256=sha256, force=args.force, extensions=extensions)
    counts = check_layout(out, extensions=extensions)
    shown = ", ".join(f"{name} {n}" for name, n in list(counts.items())[:SUMMARY_CLASSES_SHOWN])
    more = ", ..." if len(counts) > SUMMARY_CLASSES_SHOWN else ""
    print(f"{source} -> {out}: {sum(counts.values())} images in {len(counts)} folders ({shown}{more})")
    skipped = skipped_files(out, extensions)
    if skipped:
        listed = ", ".join(f"{n} {suffix}" for suffix, n in skipped.items())
        print(f"ingest will reject {sum(skipped.values())} file(s) for their type ({listed}; see ingest.extensions)")
    if not args.no_dvc:
        _track_with_dvc(out, commit=not args.no_commit)
    return EXIT_OK


def _dvc_executable() -> str | None:
    import shutil

    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else shutil.which("dvc")


def _track_with_dvc(out: Path, commit: bool) -> None:
    """`dvc add` the dataset when it lies inside a DVC project, and commit its .dvc file.

    A tracked data/raw is what a team versions (dvc push / pull), and what lets
    `dvc exp run --queue` / `--temp` see the data: their temporary workspaces get
    what git and DVC track, nothing else. The .dvc file is committed (only it and
    the .gitignore DVC may write), not just staged: a workspace `dvc exp run`
    restores the workspace with newly staged files unstaged, and queued
    experiments started after it would then miss the data.
    """
    import subprocess

    from transferlab.tracking.store import project_root

    root = project_root(out.parent if out.parent.exists() else Path("."))
    dvc = _dvc_executable()
    if not (root / ".dvc").is_dir() or not out.resolve().is_relative_to(root) or dvc is None:
        return
    rel = out.resolve().relative_to(root)
    done = subprocess.run([dvc, "add", "--quiet", str(rel)], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        print(f"transferlab: warning: `dvc add {out}` failed ({reason[-1] if reason else done.returncode}); "
              "queued DVC experiments will not see the data until it is tracked", file=sys.stderr)
        return
    tracked = rel.with_name(rel.name + ".dvc")
    if not commit:
        print(f"tracked with DVC: {tracked}; commit it before queuing experiments, `dvc push` to share the data")
        return
    paths = [str(tracked)] + [str(p) for p in (rel.parent / ".gitignore",) if (root / p).exists()]
    subprocess.run(["git", "add", "--", *paths], cwd=root, capture_output=True, text=True)
    message = f"Track the dataset {rel} with DVC (transferlab data get)"
    done = subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], cwd=root, capture_output=True,
                          text=True)
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        print(f"tracked with DVC: {tracked} (staged; git commit failed: {reason[-1] if reason else done.returncode}); "
              "commit it before queuing experiments", file=sys.stderr)
        return
    print(f"tracked with DVC and committed: {tracked} (`dvc push` shares the data; "
          "`git reset --soft HEAD~1` undoes the commit)")


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
    get.add_argument("--no-dvc", action="store_true",
                     help="do not `dvc add` OUT (by default it is tracked when it lies inside a DVC project)")
    get.add_argument("--no-commit", action="store_true",
                     help="stage OUT.dvc in git but do not commit it (queued experiments need it committed)")
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


def _cmd_audit(args: argparse.Namespace) -> int:
    from transferlab.audit.show import format_audit, read_audit

    print(format_audit(read_audit(args.report), args.limit))
    return EXIT_OK


def _add_audit(subparsers: Any) -> None:
    audit = subparsers.add_parser("audit", help="print the duplicates, likely leaks and label suspects of the last run")
    audit.add_argument("--report", type=Path, default=Path("reports/audit.json"), help="the audit stage's output")
    audit.add_argument("--limit", type=int, default=20, help="items shown per finding (default: 20)")
    audit.set_defaults(handler=_cmd_audit)


def _image_extensions(params: Path) -> frozenset[str]:
    """ingest.extensions of params.yaml (as ingest and `data get` read them); null: every format Pillow reads."""
    extensions = _params(params).ingest.suffixes()
    if extensions is None:
        from PIL import Image

        return frozenset(Image.registered_extensions())
    return extensions


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
    return _params(args.params).evaluate.registered_model


def _device(args: argparse.Namespace) -> Any:
    """The torch device of ``--device``, else of compute.device in ``--params``; a DeviceError names which."""
    from transferlab.device import DEFAULT_KEY, resolve_device

    if args.device is not None:
        return resolve_device(args.device, key="--device")
    return resolve_device(_params(args.params).compute.device, key=DEFAULT_KEY)


def _model(args: argparse.Namespace) -> tuple[Callable[[pd.DataFrame], pd.DataFrame], Any]:
    """The model as a function from a `path` frame to the serving output frame, and its Predictor."""
    device = _device(args)
    if args.model == CHAMPION:
        from transferlab.serving import registry

        # a progress bar per artifact copy drowns the table on a terminal
        os.environ.setdefault(PROGRESS_BAR_ENV, "false")
        champion = registry.load_champion(_registered_name(args), args.root, device)
        return champion.predict, champion.unwrap_python_model().predictor
    from transferlab.serving import pyfunc as serving
    from transferlab.serving.predictor import PredictorError, load_predictor

    try:
        predictor = load_predictor(args.model, device)
    except PredictorError as exc:
        raise PredictError(f"{exc}; --model takes `{CHAMPION}`, a predictor directory or a .onnx file") from exc
    return (lambda frame: serving.classify(predictor, frame)), predictor


def _top_k(row: Any, columns: list[str], prefix: str, k: int) -> str:
    ranked = sorted(columns, key=lambda c: -row[c])[:k]
    return "  ".join(f"{c.removeprefix(prefix)} {row[c]:.{PROBABILITY_DIGITS}f}" for c in ranked)


def _print_table(paths: list[str], frame: pd.DataFrame, k: int) -> None:
    from transferlab.serving.pyfunc import ERROR, PROBA_PREFIX

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

    from transferlab.serving import overlays, pyfunc as serving

    if args.top_k < 1:
        raise PredictError(f"--top-k must be at least 1, got {args.top_k}")
    extensions = _image_extensions(args.params)
    files = _image_files(args.paths, extensions)
    if not files:
        raise PredictError(f"no image files ({', '.join(sorted(extensions))}) under {', '.join(map(str, args.paths))}")
    paths = [str(f) for f in files]
    model, predictor = _model(args)
    if args.cam is not None:
        overlays.check_cam(predictor)  # before predicting: a model without maps fails at once
    frame = model(pd.DataFrame({serving.PATH: paths}))
    _print_table(paths, frame, args.top_k)
    if args.out is not None:
        _write_csv(args.out, paths, frame)
    if args.cam is not None:  # the predicted class's map over each classified image
        written = overlays.write_overlays(predictor, paths, list(frame[serving.LABEL]), args.cam)
        print(f"{len(written)} class activation map(s) in {args.cam}")
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
    predict.add_argument("--cam", type=Path, metavar="DIR", help="also write a class activation map over each image "
                         "(<stem>.cam.png, the predicted class's) into DIR, e.g. beside the CSV")
    predict.add_argument(
        "--registered-name", metavar="NAME",
        help=f"registered model name (default: evaluate.registered_model in --params, else {DEFAULT_REGISTERED_NAME})",
    )
    predict.add_argument(
        "--device", metavar="DEVICE",
        help="auto | cpu | cuda | cuda:N | mps (default: compute.device in --params, else auto)",
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
    compare_command.add_parser(subparsers)
    _add_predict(subparsers)
    _add_audit(subparsers)
    team_server.add_parser(subparsers)
    report_command.add_parser(subparsers)
    export_command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except UserError as exc:
        print(f"transferlab: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
