"""One self-contained classifier for new images: a backbone plus a head, or a fine-tuned network.

A predictor directory holds everything needed to classify images offline:

- kind ``head``: ``predictor.json``, ``backbone.safetensors`` (the frozen
  backbone's weights) and the head's own files (``head.safetensors`` + JSON);
- kind ``finetune``: the fine-tuned model's files (``model.safetensors`` +
  ``model.json``) as written by the finetune stage.

Loading rebuilds the architecture without downloading anything
(``weights="none"``) and loads the saved tensors, so a predictor works on a
machine that never saw the original weights.

New images are decoded exactly as the ingest stage decoded the training images
(EXIF rotation, transparency over white, 16-bit scaling, the shorter side
shrunk to ``ingest.max_side``, the same pixel-count and file-size limits and
format allow-list): the ``decode`` entry of ``predictor.json`` records those
ingest settings, so a model never sees pixels prepared differently from the
ones it was trained on.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from scipy.special import softmax

from transferlab.data import imaging
from transferlab.device import autocast, conv_net_to, images_to
from transferlab.models.backbones import NO_WEIGHTS, Backbone, load_backbone
from transferlab.config import IngestParams
from transferlab.models.heads import load_head
from transferlab.errors import UserError
from transferlab.io import atomic_dir, atomic_write_json

SPEC = "predictor.json"
BACKBONE_FILE = "backbone.safetensors"
HEAD_FILE = "head.safetensors"
FINETUNE_FILES = ("model.safetensors", "model.json")
DEFAULT_BATCH = 16
DECODE_KEYS = ("max_side", "max_pixels", "max_file_mb")  # the ingest settings that shape pixels
ARRAY_CHANNELS = (3, 4)  # H x W x 3 (RGB) or H x W x 4 (RGBA); H x W is grayscale
UNSUPPORTED = "unsupported_input"  # error code beside ingest's rejection reasons
PNG_STORE_ONLY = 0  # arrays become PNG bytes only to share the file decoder: no time on compression

# What the model can classify: an image file's path or bytes, a uint8 array, or a decoded image.
ImageSource = Union[str, os.PathLike[str], bytes, bytearray, memoryview, np.ndarray, Image.Image]


class PredictorError(UserError, ValueError):
    """A directory is not a usable predictor."""


@dataclass(frozen=True)
class Classified:
    """Class probabilities of a batch of sources, rows in input order.

    A source that could not be decoded has a row of NaN and its reason in ``errors``.
    """

    proba: np.ndarray  # N x K, columns follow Predictor.classes
    errors: list[str | None]

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


@dataclass
class Predictor:
    """Images in, class probabilities out (rows follow ``classes``)."""

    classes: list[str]
    transform: Callable[[Image.Image], torch.Tensor]
    scores: Callable[[torch.Tensor], np.ndarray]  # batch of transformed images -> N x K
    spec: dict[str, Any]
    decoding: IngestParams = field(default_factory=IngestParams)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where ``scores`` runs
    # one transformed image (C x H x W) and a class index -> its class activation map (H' x W'); None: no maps
    cam_of: Callable[[torch.Tensor, int], np.ndarray] | None = None

    def predict_proba(self, images: Sequence[Image.Image], batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        """Probabilities of decoded RGB images (:meth:`open_image`), ``batch_size`` per forward pass."""
        out = []
        with torch.inference_mode(), autocast(self.device):
            for i in range(0, len(images), batch_size):
                batch = torch.stack([self.transform(img) for img in images[i : i + batch_size]])
                out.append(self.scores(images_to(batch, self.device)))
        return np.concatenate(out) if out else np.empty((0, len(self.classes)))

    def open_image(self, source: ImageSource | None) -> Image.Image:
        """Decode one source the way ingest decoded the training images.

        ingest's own decoder (transferlab.data.imaging, shared with ingest) does
        the work, so training and serving cannot drift apart. An already decoded
        PIL image is only converted to RGB.

        Sources are decoded here, one by one in this process, rather than by the
        DataLoader of :mod:`transferlab.data.images`: a served batch mixes paths,
        bytes and arrays, and one bad source must become one error row, not a
        failed batch.
        """
        if source is None:
            raise TypeError("no image given (neither a path nor image bytes)")
        if isinstance(source, Image.Image):
            return source if source.mode == "RGB" else source.convert("RGB")
        if isinstance(source, np.ndarray):
            source = array_to_png(source)
        elif isinstance(source, (str, os.PathLike)):
            source = imaging.read_limited(Path(source), self.decoding.max_file_mb)
        if not isinstance(source, (bytes, bytearray, memoryview)):
            raise TypeError(f"cannot classify {type(source).__name__}: expected a path, bytes or a uint8 array")
        with imaging.strict_pillow(self.decoding.max_pixels):
            image, _ = imaging.decode_image(bytes(source), self.decoding.max_side)
        return image

    def describe_error(self, exc: Exception) -> str:
        """One line naming why a source could not be decoded (ingest's rejection codes)."""
        if isinstance(exc, TypeError):
            return f"{UNSUPPORTED}: {exc}"
        reason, detail = imaging.rejection_reason(exc, self.decoding)
        return f"{reason}: {detail}"

    def classify(self, sources: Sequence[ImageSource | None], batch_size: int = DEFAULT_BATCH) -> Classified:
        """Probabilities for every source; a bad source gets a NaN row and an error, never an exception.

        Sources are decoded one batch at a time, so a long list of files never
        sits in memory as decoded images.
        """
        proba = np.full((len(sources), len(self.classes)), np.nan)
        errors: list[str | None] = [None] * len(sources)
        for start in range(0, len(sources), batch_size):
            rows, images = [], []
            for i in range(start, min(start + batch_size, len(sources))):
                try:
                    images.append(self.open_image(sources[i]))
                    rows.append(i)
                except Exception as exc:  # noqa: BLE001 - decoders of untrusted files raise anything
                    errors[i] = self.describe_error(exc)
            if images:
                proba[rows] = self.predict_proba(images, batch_size)
        return Classified(proba, errors)


def array_to_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 image array (H x W, H x W x 3 RGB or H x W x 4 RGBA)."""
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got dtype {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in ARRAY_CHANNELS)):
        raise ValueError(f"expected an H x W x 3 (or x 4, or H x W) image array, got shape {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_STORE_ONLY)
    return buffer.getvalue()


def _head_scores(backbone: Backbone, head: Any) -> Callable[[torch.Tensor], np.ndarray]:
    def scores(batch: torch.Tensor) -> np.ndarray:
        maps = backbone.forward_features(batch).float().cpu().contiguous().numpy()  # host arrays, NCHW order
        if hasattr(head, "predict_proba"):
            return np.asarray(head.predict_proba(maps))
        return _margin_softmax(np.asarray(head.decision_function(maps)))

    return scores


def _margin_softmax(decision: np.ndarray) -> np.ndarray:
    """Probability-like scores from an uncalibrated SVM's margins, keeping their order for top-k."""
    if decision.ndim == 1:
        # binary: one margin per image, positive for classes_[1]; softmax of (0, d) is sigmoid(d)
        decision = np.column_stack([np.zeros_like(decision), decision])
    return np.asarray(softmax(decision, axis=1))


def _module_scores(module: torch.nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    def scores(batch: torch.Tensor) -> np.ndarray:
        return torch.softmax(module(batch).float(), dim=1).cpu().numpy()

    return scores


def _decode_spec(ingest_params: IngestParams | None) -> dict[str, Any]:
    params = ingest_params or IngestParams()
    return {key: getattr(params, key) for key in DECODE_KEYS}


def save_head_predictor(
    backbone: Backbone,
    head_file: Path,
    out: Path,
    weights: str | None = None,
    ingest_params: IngestParams | None = None,
) -> None:
    """Bundle the frozen backbone and a trained head (saved at ``head_file``) into ``out``.

    ``weights`` is the weights name the backbone was loaded with: reloading
    passes it again so preprocessing follows the same weights' metadata.
    ``ingest_params``: how the training images were decoded (default: IngestParams()).
    """
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in backbone.module.state_dict().items()}, str(tmp / BACKBONE_FILE))
        shutil.copyfile(head_file, tmp / HEAD_FILE)
        shutil.copyfile(f"{head_file}.json", tmp / f"{HEAD_FILE}.json")
        head = load_head(tmp / HEAD_FILE)
        spec = {"kind": "head", "backbone": backbone.name, "weights": backbone.weights_id, "weights_arg": weights,
                "classes": [str(c) for c in head.classes_], "transform": backbone.transform_config(),
                "decode": _decode_spec(ingest_params)}
        atomic_write_json(tmp / SPEC, spec)


def save_finetune_predictor(model_dir: Path, out: Path, ingest_params: IngestParams | None = None) -> None:
    """Bundle a fine-tuned model directory (finetune stage output) into ``out``."""
    with atomic_dir(out) as tmp:
        for name in FINETUNE_FILES:
            shutil.copyfile(Path(model_dir) / name, tmp / name)
        meta = json.loads((tmp / "model.json").read_text())
        atomic_write_json(tmp / SPEC, {"kind": "finetune", "backbone": meta["backbone"],
                                       "weights": meta.get("weights"), "classes": meta["classes"],
                                       "transform": meta.get("transform"), "decode": _decode_spec(ingest_params)})


def read_spec(path: str | Path) -> dict[str, Any]:
    """The ``predictor.json`` of a predictor directory, without loading any weights."""
    spec_file = Path(path) / SPEC
    if not spec_file.is_file():
        raise PredictorError(f"{path}: not a transferlab predictor directory (no {SPEC})")
    spec: dict[str, Any] = json.loads(spec_file.read_text(encoding="utf-8"))
    return spec


def _decoding(spec: Mapping[str, Any]) -> IngestParams:
    # predictors written before the decode entry existed get ingest's defaults
    return IngestParams.model_validate(spec.get("decode", {}))


def _comparable(transform: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in transform.items() if k != "source"}


def _load_head_backbone(path: Path, spec: Mapping[str, Any]) -> Backbone:
    # The saved tensors replace the weights, so "none" (random init at save time)
    # reloads like any other weights name: it only picks the preprocessing.
    weights = spec.get("weights_arg")
    backbone = load_backbone(spec["backbone"], None if weights == NO_WEIGHTS else weights,
                             weights_path=path / BACKBONE_FILE)
    if _comparable(backbone.transform_config()) != _comparable(spec["transform"]):
        raise PredictorError(
            f"{path}: {spec['backbone']} was trained with preprocessing {spec['transform']}, but rebuilding it "
            f"gives {backbone.transform_config()}"
        )
    return backbone


def load_predictor(path: str | Path, device: torch.device | str = "cpu") -> Predictor:
    """The predictor saved in directory ``path``, its network on ``device`` (a resolved torch device).

    The saved tensors load on the host first, so a predictor written on one
    device loads on any other.
    """
    path, device = Path(path), torch.device(device)
    spec = read_spec(path)
    decoding = _decoding(spec)
    if spec["kind"] == "finetune":
        from transferlab.models.finetuned import load_finetuned

        module, _, backbone = load_finetuned(path)
        scores = _module_scores(conv_net_to(module.eval(), device))
        head = None
    else:
        backbone = _load_head_backbone(path, spec)
        conv_net_to(backbone.module.eval(), device)
        head = load_head(path / HEAD_FILE)
        scores = _head_scores(backbone, head)
    return Predictor(list(spec["classes"]), backbone.eval_transform, scores, spec, decoding, device,
                     _cam_function(backbone, head, device))


def _cam_function(backbone: Backbone, head: Any, device: torch.device
                  ) -> Callable[[torch.Tensor, int], np.ndarray] | None:
    """CAM for the gap head, Grad-CAM for the linear head and fine-tuned networks; None for other heads."""
    from transferlab.models import cam

    if head is None:
        return lambda image, k: cam.network_cam(backbone, images_to(image[None], device)[0], k)
    if not hasattr(head, "torch_module"):
        return None

    def maps_of(image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return backbone.forward_features(images_to(image[None], device)).float().cpu()

    if hasattr(head, "cam"):
        return lambda image, k: cam.gap_cam(head, maps_of(image)[0].numpy(), k)
    net = head.torch_module()
    return lambda image, k: cam.grad_cam(net, maps_of(image), k)
