"""`transferlab export [--model champion|DIR] --format onnx --out model.onnx`: the model as one ONNX graph."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from transferlab.paths import PARAMS

EXIT_OK = 0
CHAMPION = "champion"
FORMATS = ("onnx",)
DEFAULT_OUT = Path("model.onnx")


def _predictor_dir(args: argparse.Namespace) -> Path:
    if args.model != CHAMPION:
        return Path(args.model)
    import os

    from transferlab.config import Params, load
    from transferlab.serving import registry

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    name = args.registered_name or (load(args.params) if args.params.exists() else Params()).evaluate.registered_model
    return Path(registry.load_champion(name, args.root, "cpu").unwrap_python_model().predictor_dir)


def _cmd_export(args: argparse.Namespace) -> int:
    from transferlab.serving.onnx_export import export_onnx

    out = export_onnx(_predictor_dir(args), args.out)
    print(f"{out}: ONNX (images N x 3 x H x W, normalised, in; class probabilities out; preprocessing and "
          "classes in its metadata); run it with `transferlab predict --model " f"{out} IMAGES`")
    return EXIT_OK


def add_parser(subparsers: Any) -> None:
    export = subparsers.add_parser(
        "export", help="export the champion or a predictor directory as an ONNX model",
        description="Backbone and head in one graph with a dynamic batch axis; the preprocessing (resize, crop, "
                    "interpolation, mean, std) and class names are stored in the model's metadata. Fine-tuned "
                    "models and the gap and linear heads export; the svm and knn heads do not.")
    export.add_argument("--model", default=CHAMPION, metavar=f"{CHAMPION}|DIR",
                        help=f"`{CHAMPION}` (default: the registered champion) or a predictor directory")
    export.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (the only one)")
    export.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    export.add_argument("--registered-name", metavar="NAME", help="default: evaluate.registered_model in --params")
    export.add_argument("--root", type=Path, default=Path("."), help="project root holding mlruns/ (default: .)")
    export.add_argument("--params", type=Path, default=PARAMS, help=f"default: {PARAMS}")
    export.set_defaults(handler=_cmd_export)
