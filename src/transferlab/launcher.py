"""The ``transferlab`` entry point: ``predict --model MODEL.onnx`` runs without loading the training stack.

Every other command is :func:`transferlab.cli.main`. The ONNX prediction path is chosen here, before
``cli`` is imported (it imports pydantic, and its commands torch, pandas and MLflow), so a deployment
with only ``onnxruntime``, ``numpy`` and ``pillow`` installed can run ``transferlab predict``.
"""

from __future__ import annotations

import sys
from typing import Sequence

ONNX_SUFFIX = ".onnx"  # transferlab.serving.onnx_predict.ONNX_SUFFIX (not imported: this module imports nothing)


def onnx_model(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is ``predict ... --model <file>.onnx``."""
    if not argv or argv[0] != "predict":
        return False
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--model=") else (
            argv[i + 1] if arg == "--model" and i + 1 < len(argv) else None)
        if value is not None:
            return value.lower().endswith(ONNX_SUFFIX)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if onnx_model(argv):
        from transferlab.serving.onnx_predict import main as onnx_main

        return onnx_main(argv[1:])
    from transferlab.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
