"""The model registry: the champion pyfunc, registered and loaded by its alias."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.errors import UserError
from transferlab.tracking.runs import RUNNING, StageRun
from transferlab.tracking.store import STORE_DIR, open_store, project_root, store_missing

if TYPE_CHECKING:
    import torch

CHAMPION_ALIAS = "champion"
LOGGED_MODEL_NAME = "model"  # the pyfunc's name inside the evaluate run
TAG_CHAMPION = "transferlab.champion"
# What the pyfunc imports when it loads (transferlab.serving.pyfunc and its imports),
# pinned to the versions it was logged with. Listing them saves MLflow's
# requirement inference, which loads the model again in a subprocess.
SERVING_DISTRIBUTIONS = (
    "mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "pillow", "scipy", "scikit-learn",
    "safetensors", "pyyaml", "pydantic", "tqdm",
)
MODEL_METADATA_KEYS = ("kind", "backbone", "weights", "classes")


class ChampionNotFoundError(UserError, LookupError):
    """No model carries the champion alias in the registry."""


def _pinned(distribution: str) -> str:
    from importlib.metadata import version

    # local labels (torch's "+cpu") name a build from another index; pip on PyPI cannot resolve them
    return f"{distribution}=={version(distribution).split('+')[0]}"


def serving_requirements() -> list[str]:
    return [_pinned(name) for name in SERVING_DISTRIBUTIONS]


def serving_signature(classes: list[str]) -> Any:
    """Optional ``path`` (string) and ``image`` (binary) in; label, probability, p_<class>..., error out.

    transferlab.serving.pyfunc explains why arrays travel as encoded bytes, not as a
    column or tensor of their own.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from transferlab.serving import pyfunc as serving

    inputs = Schema([ColSpec("string", serving.PATH, required=False), ColSpec("binary", serving.IMAGE, required=False)])
    outputs = Schema([
        ColSpec("string", serving.LABEL, required=False),
        ColSpec("double", serving.PROBABILITY, required=False),
        *[ColSpec("double", serving.proba_column(c), required=False) for c in classes],
        ColSpec("string", serving.ERROR, required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_champion(run: StageRun, predictor_dir: Path, registered_name: str, input_example_image: Path) -> str:
    """Log predictor directory ``predictor_dir`` as a pyfunc in ``run``, register it, alias it champion.

    ``input_example_image``: an image file whose bytes become the input
    example (MLflow checks at log time that the model serves it). Returns the
    new model version.
    """
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import Model

    import transferlab
    from transferlab.serving import pyfunc as serving
    from transferlab.serving.predictor import read_spec

    from mlflow.exceptions import MlflowException

    try:
        stage = run._client.get_run(run.run_id).info
    except MlflowException as err:
        raise RuntimeError(f"log_champion needs a running stage run; {run.run_id}: {err.message}") from err
    if stage.status != RUNNING:
        raise RuntimeError(f"log_champion needs a running stage run; {run.run_id} is {stage.status}")
    spec = read_spec(predictor_dir)
    # What mlflow.pyfunc.log_model does, told the run and its experiment instead of reading MLflow's
    # fluent active run: the logged model is created in the stage run's experiment, then filled.
    logged = run._client.create_logged_model(stage.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run.run_id)
    info = Model.log(
        None,  # artifact_path: deprecated, but still a required positional of Model.log
        name=LOGGED_MODEL_NAME,
        flavor=mlflow.pyfunc,
        run_id=run.run_id,
        model_id=logged.model_id,
        python_model=serving.ImageClassifier(),
        artifacts={serving.PREDICTOR_ARTIFACT: str(predictor_dir)},
        # the package travels with the model: it loads with the code it was logged with
        code_paths=[str(Path(transferlab.__file__).parent)],  # the whole library: the pyfunc imports models/, data/
        signature=serving_signature(list(spec["classes"])),
        input_example=pd.DataFrame({serving.IMAGE: [Path(input_example_image).read_bytes()]}),
        pip_requirements=serving_requirements(),
        metadata={key: spec.get(key) for key in MODEL_METADATA_KEYS},
        # declared at log time so that load_model(..., model_config={"device": ...}) may override it
        model_config={serving.DEVICE_CONFIG: "cpu"},
        registered_model_name=registered_name,
    )
    version = str(info.registered_model_version)
    run._client.set_registered_model_alias(registered_name, CHAMPION_ALIAS, version)
    run.set_tags({TAG_CHAMPION: f"models:/{registered_name}/{version}"})
    return version


def load_champion(registered_name: str, root: str | Path = ".", device: torch.device | str = "cpu") -> Any:
    """The pyfunc registered as ``models:/<registered_name>@champion`` in the project's store, run on ``device``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    hint = "run `dvc repro` (its evaluate stage registers the champion) or use a predictor directory"
    if store_missing(root):
        raise ChampionNotFoundError(f"no MLflow store at {project_root(root) / STORE_DIR}: {hint}")
    store = open_store(root)
    try:
        store.client.get_model_version_by_alias(registered_name, CHAMPION_ALIAS)
    except MlflowException as err:
        raise ChampionNotFoundError(
            f"no model registered as {registered_name}@{CHAMPION_ALIAS} in {store.registry_uri}: {hint}"
        ) from err
    from transferlab.serving.pyfunc import DEVICE_CONFIG

    return mlflow.pyfunc.load_model(f"models:/{registered_name}@{CHAMPION_ALIAS}",
                                    model_config={DEVICE_CONFIG: str(device)})
