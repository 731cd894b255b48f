"""The MLflow pyfunc face of a predictor: images in, one row of class probabilities per image out.

Input through ``mlflow.pyfunc.load_model(uri).predict(frame)`` (the signature)
    A DataFrame with a column ``path`` (image file paths) and/or a column
    ``image`` (encoded image files: PNG, JPEG, ... bytes; base64 in JSON
    requests to ``mlflow models serve``). Both columns are optional; in a row
    with both, ``image`` wins. Arrays go in as encoded bytes:
    :func:`frame_from_arrays` turns an N x H x W x 3 uint8 batch into such a
    frame, losslessly (PNG).

Why arrays are not a column or a tensor of their own
    MLflow enforces the signature before ``predict`` runs. A column-based
    signature converts an ndarray into a DataFrame first, which a 4-D batch
    cannot become; a tensor-based signature cannot also carry paths or bytes
    (tensor inputs are never optional); an array-typed column
    (``Array(Array(Array(long)))``) passes, but MLflow checks it element by
    element, about 2 s per 224 x 224 image. So the signature covers files,
    and arrays travel as PNG bytes.

Without signature enforcement
    :func:`classify` (and ``model.unwrap_python_model().predict(None, x)``)
    also takes a plain list of paths/bytes/arrays, a Series, or an
    N x H x W x 3 uint8 ndarray.

Output
    ``label`` (top-1 class), ``probability`` (its probability), one
    ``p_<class>`` column per class in the predictor's class order, and
    ``error``. A file that cannot be read or decoded never fails the batch:
    its row has label None, NaN probabilities and the reason in ``error``
    (None for rows that were classified).
"""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

import mlflow.pyfunc
import numpy as np
import pandas as pd

from transferlab.serving.predictor import DEFAULT_BATCH, Classified, ImageSource, Predictor, array_to_png, load_predictor
from transferlab.serving.columns import (  # noqa: F401 - the table's columns, re-exported
    ERROR, IMAGE, LABEL, PATH, PROBA_PREFIX, PROBABILITY, proba_column,
)

PREDICTOR_ARTIFACT = "predictor"  # key of the predictor directory in the pyfunc's artifacts
DEVICE_CONFIG = "device"  # model_config key: the torch device the loaded pyfunc runs on
BATCH_NDIM = 4  # N x H x W x C

ModelInput = Union[pd.DataFrame, pd.Series, np.ndarray, Sequence[ImageSource], str, os.PathLike[str], bytes]


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _row_source(image: Any, path: Any) -> ImageSource | None:
    if not _missing(image):
        return image  # type: ignore[no-any-return]
    # None (an empty row) becomes that row's error in Predictor.classify, not the batch's
    return None if _missing(path) else str(path)


def _explode_lists(frame: pd.DataFrame) -> pd.DataFrame:
    # MLflow turns a dict of lists ({"path": [a, b]}) into ONE row holding the lists
    listed = frame.map(lambda v: isinstance(v, (list, tuple))).to_numpy().any()
    return frame.explode(list(frame.columns), ignore_index=True) if listed else frame


def _frame_sources(frame: pd.DataFrame) -> list[ImageSource | None]:
    if PATH not in frame.columns and IMAGE not in frame.columns:
        raise ValueError(f"expected a DataFrame with a {PATH!r} and/or an {IMAGE!r} column, got {list(frame.columns)}")
    frame = _explode_lists(frame[[c for c in (IMAGE, PATH) if c in frame.columns]])
    images = frame[IMAGE] if IMAGE in frame.columns else [None] * len(frame)
    paths = frame[PATH] if PATH in frame.columns else [None] * len(frame)
    return [_row_source(image, path) for image, path in zip(images, paths)]


def sources(model_input: ModelInput) -> list[ImageSource | None]:
    """The images of any accepted input form, one per output row."""
    if isinstance(model_input, pd.DataFrame):
        return _frame_sources(model_input)
    if isinstance(model_input, np.ndarray) and model_input.ndim == BATCH_NDIM:
        return list(model_input)
    if isinstance(model_input, (str, os.PathLike, bytes, bytearray)):
        return [model_input]
    if isinstance(model_input, (pd.Series, np.ndarray, list, tuple)):
        return list(model_input)
    raise TypeError(
        f"cannot classify {type(model_input).__name__}: expected a DataFrame with {PATH!r}/{IMAGE!r} columns, "
        "a list of paths or bytes, or an N x H x W x 3 uint8 array"
    )


def result_frame(classes: Sequence[str], classified: Classified) -> pd.DataFrame:
    """label, probability, p_<class>..., error: one row per input, in input order."""
    ok = classified.ok
    top = np.argmax(np.where(ok[:, None], classified.proba, -np.inf), axis=1)
    labels = [classes[int(i)] if good else None for i, good in zip(top, ok)]
    best = np.where(ok, classified.proba[np.arange(len(top)), top], np.nan) if len(top) else np.empty(0)
    columns: dict[str, Any] = {
        # object columns keep None as None; pandas' string dtype would turn it into NaN
        LABEL: pd.Series(labels, dtype=object),
        PROBABILITY: pd.Series(best, dtype=float),
    }
    for k, name in enumerate(classes):
        columns[proba_column(name)] = pd.Series(classified.proba[:, k], dtype=float)
    columns[ERROR] = pd.Series(classified.errors, dtype=object)
    return pd.DataFrame(columns)


def classify(predictor: Predictor, model_input: ModelInput, batch_size: int = DEFAULT_BATCH) -> pd.DataFrame:
    """Classify every image of ``model_input`` (any form :func:`sources` takes) into :func:`result_frame`."""
    return result_frame(predictor.classes, predictor.classify(sources(model_input), batch_size))


def frame_from_arrays(batch: np.ndarray | Sequence[np.ndarray]) -> pd.DataFrame:
    """An ``image`` column of lossless PNG bytes: how arrays pass the signature."""
    return pd.DataFrame({IMAGE: pd.Series([array_to_png(np.asarray(a)) for a in batch], dtype=object)})


class ImageClassifier(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """Pyfunc over a predictor directory logged as the artifact ``predictor``."""

    def __init__(self) -> None:
        self._predictor: Predictor | None = None
        self.predictor_dir: str | None = None  # the logged predictor directory (its model.onnx, when exported)

    def load_context(self, context: Any) -> None:
        # `mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})` picks the device at load time
        config = getattr(context, "model_config", None) or {}
        self.predictor_dir = context.artifacts[PREDICTOR_ARTIFACT]
        self._predictor = load_predictor(self.predictor_dir, config.get(DEVICE_CONFIG, "cpu"))

    @property
    def predictor(self) -> Predictor:
        if self._predictor is None:
            raise RuntimeError("ImageClassifier used before load_context: load it with mlflow.pyfunc.load_model")
        return self._predictor

    # The hint stays pd.DataFrame, what the signature lets through: MLflow reads
    # predict's type hints and warns about (or validates against) anything else.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if self._predictor is None:
            raise RuntimeError("ImageClassifier.predict before load_context: load it with mlflow.pyfunc.load_model")
        return classify(self._predictor, model_input)
