"""Export a predictor to ONNX: backbone and head in one graph, images in, class probabilities out.

The graph takes ``image`` (N x 3 x crop x crop float32, the eval transform's output: resized, centre
cropped, normalised) with a dynamic batch axis and returns ``proba`` (N x K softmax). The model's
metadata (``metadata_props``) holds what a runtime needs around it, as JSON strings: ``classes``,
``preprocessing`` (resize_size, crop_size, interpolation, mean, std, antialias: the weights' own, from
the predictor's spec), ``decode`` (how ingest decoded the training images), ``extensions`` and
``kind`` / ``backbone`` / ``head``. :mod:`transferlab.serving.onnx_predict` runs it without torch.

Exported heads: fine-tuned networks and the torch heads (``gap``, ``linear``). The scikit-learn heads
(``svm``, ``knn``) are not torch modules; exporting them fails with a message saying so.

Exporter: torch's TorchScript-based exporter (``dynamo=False``). It needs no extra package (the
dynamo exporter needs onnxscript), traces these plain convolutional graphs exactly, and writes
byte-identical files for identical weights (checked when this was written: two exports of Lite0 equal).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.config import IMAGE_EXTENSIONS
from transferlab.errors import UserError
from transferlab.io import atomic_path
from transferlab.serving.onnx_predict import INPUT, OUTPUT
from transferlab.serving.predictor import HEAD_FILE, _load_head_backbone, read_spec

ONNX_FILE = "model.onnx"  # the champion predictor directory carries its export under this name
OPSET = 17
PREPROCESSING_KEYS = ("resize_size", "crop_size", "interpolation", "mean", "std", "antialias")
EXPORT_BATCH = 2  # the traced example batch; the batch axis is dynamic


class ExportError(UserError, ValueError):
    """The model cannot be exported to ONNX."""


class _Probabilities(nn.Module):
    """images -> softmax(head(features(images))); ``features`` None: ``head`` takes images."""

    def __init__(self, head: nn.Module, backbone: Any | None = None) -> None:
        super().__init__()
        self.head = head
        self.backbone_module = None if backbone is None else backbone.module  # registered: its weights export
        self._backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images if self._backbone is None else self._backbone.forward_features(images)
        return torch.softmax(self.head(x), dim=1)


def network(predictor_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The predictor in ``predictor_dir`` as one torch module (images -> probabilities), and its spec."""
    spec = read_spec(predictor_dir)
    if spec["kind"] == "finetune":
        from transferlab.models.finetuned import load_finetuned

        module, _, _ = load_finetuned(predictor_dir)
        return _Probabilities(module).eval(), spec | {"head": "finetune"}
    from transferlab.models.heads import load_head

    head = load_head(predictor_dir / HEAD_FILE)
    if not hasattr(head, "torch_module"):
        raise ExportError(f"{predictor_dir}: its head is a {type(head).__name__}, not a torch module; ONNX export "
                          "takes fine-tuned models and the gap and linear heads")
    backbone = _load_head_backbone(predictor_dir, spec)
    return _Probabilities(head.torch_module(), backbone).eval(), spec | {"head": type(head).__name__}


def metadata(spec: dict[str, Any]) -> dict[str, str]:
    transform = spec["transform"]
    return {
        "classes": json.dumps([str(c) for c in spec["classes"]]),
        "preprocessing": json.dumps({key: transform[key] for key in PREPROCESSING_KEYS}),
        "decode": json.dumps(spec["decode"]),
        "extensions": json.dumps(list(IMAGE_EXTENSIONS)),
        "kind": spec["kind"], "backbone": spec["backbone"], "head": spec["head"],
    }


def export_onnx(predictor_dir: str | Path, out: str | Path) -> Path:
    """Write the predictor in ``predictor_dir`` as an ONNX model at ``out``, atomically; returns ``out``."""
    import onnx

    module, spec = network(Path(predictor_dir))
    crop = int(spec["transform"]["crop_size"])
    example = torch.zeros(EXPORT_BATCH, 3, crop, crop)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of dynamo's, which needs onnxscript (see above)
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(model, metadata(spec))
    payload = model.SerializeToString()  # once: check_model would serialize a ModelProto again (tens of MB)
    onnx.checker.check_model(payload)
    out = Path(out)
    with atomic_path(out, suffix=".onnx") as tmp:
        Path(tmp).write_bytes(payload)
    return out
