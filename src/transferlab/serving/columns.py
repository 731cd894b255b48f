"""The columns of a prediction table (the pyfunc's output, `transferlab predict`'s CSV): torch-free, so the
ONNX prediction path (:mod:`transferlab.serving.onnx_predict`) writes the same table without importing torch."""

PATH = "path"
IMAGE = "image"
LABEL = "label"
PROBABILITY = "probability"
ERROR = "error"
PROBA_PREFIX = "p_"


def proba_column(label: str) -> str:
    return f"{PROBA_PREFIX}{label}"
