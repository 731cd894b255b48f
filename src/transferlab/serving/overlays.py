"""``transferlab predict --cam DIR``: a class activation map over each classified image, as a PNG in DIR.

The map is the predicted class's (CAM for the ``gap`` head, Grad-CAM for the ``linear`` head and
fine-tuned networks; :mod:`transferlab.models.cam`), drawn over the crop the network saw. A model
without maps (``svm``, ``knn`` heads) fails with a message saying so before any file is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from transferlab.errors import UserError
from transferlab.io import atomic_path
from transferlab.models import cam
from transferlab.serving.predictor import Predictor

SUFFIX = ".cam.png"


class NoCamError(UserError, ValueError):
    """The model gives no class activation maps."""


def check_cam(predictor: Predictor) -> None:
    if predictor.cam_of is None:
        raise NoCamError(f"--cam: the {predictor.spec.get('kind')} model's head has no class activation maps "
                         "(they come from the gap and linear heads and fine-tuned networks)")


def overlay_names(paths: Sequence[str]) -> list[str]:
    """``<stem>.cam.png`` per image; a stem seen before gets its position in front (``3-<stem>.cam.png``)."""
    names, seen = [], set()
    for i, path in enumerate(paths):
        name = Path(path).stem + SUFFIX
        names.append(name if name not in seen else f"{i}-{name}")
        seen.add(names[-1])
    return names


def write_overlays(predictor: Predictor, paths: Sequence[str], labels: Sequence[str | None], out: Path) -> list[Path]:
    """One overlay per classified image (``labels[i]`` None: not classified, skipped); returns the files."""
    check_cam(predictor)
    assert predictor.cam_of is not None
    written = []
    for path, label, name in zip(paths, labels, overlay_names(paths)):
        if not isinstance(label, str):
            continue
        image = predictor.open_image(path)
        maps = predictor.cam_of(predictor.transform(image), predictor.classes.index(label))
        with atomic_path(out / name, suffix=".png") as tmp:
            cam.overlay(cam.network_view(predictor.transform, image), maps).save(tmp, format="PNG")
        written.append(out / name)
    return written
