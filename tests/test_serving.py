"""Predictor directories, the MLflow pyfunc, the champion in the registry and `transferlab predict`.

A random-init ResNet-18 (nothing downloaded) and a linear SVM on its features
separate solid red, green and blue images; the same colours with fresh noise
are what the models are asked about.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.special import softmax

from transferlab import cli, tracking
from transferlab.serving import pyfunc as serving
from transferlab.serving import registry
from transferlab.models.backbones import NO_WEIGHTS, Backbone, load_backbone
from transferlab.models.heads import SvmHead, load_head
from transferlab.serving.predictor import (
    SPEC,
    Predictor,
    PredictorError,
    load_predictor,
    read_spec,
    save_head_predictor,
)

COLOURS = {"blue": (20, 40, 230), "green": (30, 220, 40), "red": (230, 30, 20)}
PER_CLASS = 3
SIZE = 32
NOISE = 20
NAME = "transferlab-test"
EXECUTION = "serving-tests"


def _image(rgb: tuple[int, int, int], seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-NOISE, NOISE + 1, (SIZE, SIZE, 3))
    return np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _features(backbone: Backbone, arrays: list[np.ndarray]) -> np.ndarray:
    batch = torch.stack([backbone.eval_transform(Image.fromarray(a)) for a in arrays])
    with torch.inference_mode():
        return backbone.forward_features(batch).numpy()


def _head_predictor(backbone: Backbone, colours: dict[str, tuple[int, int, int]], out: Path) -> np.ndarray:
    """Fit an uncalibrated SVM on training images of ``colours``; bundle it at ``out``; return its inputs' maps."""
    arrays = [_image(rgb, seed) for rgb in colours.values() for seed in range(PER_CLASS)]
    labels = [label for label in colours for _ in range(PER_CLASS)]
    maps = _features(backbone, arrays)
    # uncalibrated: the predictor gives the softmax of its scores
    head = SvmHead(C_grid=None, calibrate=False, random_state=0).fit(maps, labels)
    head.save(out.parent / f"{out.name}-head.safetensors")
    save_head_predictor(backbone, out.parent / f"{out.name}-head.safetensors", out, weights=NO_WEIGHTS)
    return maps


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    torch.manual_seed(0)
    return load_backbone("resnet18", weights=NO_WEIGHTS)


@pytest.fixture(scope="module")
def predictor_dir(backbone: Backbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("predictor") / "champion"
    _head_predictor(backbone, COLOURS, out)
    return out


@pytest.fixture(scope="module")
def predictor(predictor_dir: Path) -> Predictor:
    return load_predictor(predictor_dir)


@pytest.fixture(scope="module")
def fresh() -> dict[str, np.ndarray]:
    """Unseen images of each colour (seeds the training images never used)."""
    return {label: _image(rgb, seed=100 + i) for i, (label, rgb) in enumerate(COLOURS.items())}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, fresh: dict[str, np.ndarray]) -> Path:
    """A nested image folder: one image per colour, plus files a search must skip."""
    root = tmp_path_factory.mktemp("images") / "photos"
    _write(root / "blue.png", fresh["blue"])
    _write(root / "sub" / "green.png", fresh["green"])
    _write(root / "sub" / "deeper" / "red.PNG", fresh["red"])
    (root / "notes.txt").write_text("not an image")
    _write(root / ".hidden" / "red.png", fresh["red"])
    _write(root / "._blue.png", fresh["blue"])
    return root


EXPECTED_IN_FOLDER = {"blue.png": "blue", "sub/green.png": "green", "sub/deeper/red.PNG": "red"}


@pytest.fixture(scope="module")
def store(
    predictor_dir: Path, tmp_path_factory: pytest.TempPathFactory, fresh: dict[str, np.ndarray]
) -> Iterator[Path]:
    """A project root whose SQLite store has the predictor registered as NAME@champion."""
    root = tmp_path_factory.mktemp("project")
    example = _write(root / "example.png", fresh["blue"])
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, root)
        with tracking.stage_run("evaluate", {"select_by": "val_accuracy"}, root / "run.json", root=root) as run:
            version = registry.log_champion(run, predictor_dir, NAME, example)
        assert version == "1"
        yield root


def _isolate(mp: pytest.MonkeyPatch, root: Path) -> None:
    for name in (tracking.TRACKING_ENV, tracking.REGISTRY_ENV, "DVC_EXP_NAME"):
        mp.delenv(name, raising=False)
    mp.setenv("TRANSFERLAB_EXECUTION", EXECUTION)
    mp.chdir(root)


@pytest.fixture()
def in_store(store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _isolate(monkeypatch, store)
    return store


@pytest.fixture(scope="module")
def champion(store: Path) -> object:
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, store)
        return registry.load_champion(NAME, store)


def _labels(frame: pd.DataFrame) -> list[str | None]:
    return list(frame[serving.LABEL])


# ------------------------------------------------------------------ predictor directory


def test_head_predictor_round_trip_gives_the_same_probabilities(backbone: Backbone, tmp_path: Path) -> None:
    maps = _head_predictor(backbone, COLOURS, tmp_path / "pred")
    head = load_head(tmp_path / "pred-head.safetensors")
    arrays = [_image(rgb, seed) for rgb in COLOURS.values() for seed in range(PER_CLASS)]
    expected = softmax(head.decision_function(maps), axis=1)  # an uncalibrated SVM's scores

    loaded = load_predictor(tmp_path / "pred")
    got = loaded.predict_proba([Image.fromarray(a) for a in arrays])

    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert loaded.classes == sorted(COLOURS)
    spec = read_spec(tmp_path / "pred")
    assert spec["kind"] == "head" and spec["weights_arg"] == NO_WEIGHTS
    assert set(spec["decode"]) == {"max_side", "max_pixels", "max_file_mb"}


def test_predictor_runs_its_network_in_the_layout_training_used(predictor: Predictor,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Images and conv weights in device.IMAGE_FORMAT (channels_last), as in extract and finetune: on the CPU
    the NCHW path is about 2x slower, and the probabilities must not depend on the layout (round-trip test)."""
    from transferlab.device import IMAGE_FORMAT

    layouts: list[tuple[bool, bool]] = []
    conv = torch.nn.Conv2d._conv_forward

    def spy(self: torch.nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: Any) -> torch.Tensor:
        layouts.append((x.is_contiguous(memory_format=IMAGE_FORMAT), weight.is_contiguous(memory_format=IMAGE_FORMAT)))
        return conv(self, x, weight, bias)

    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", spy)
    predictor.predict_proba([Image.fromarray(_image((200, 30, 30), 99))])
    assert layouts and layouts[0] == (True, True)


def test_binary_svm_probabilities_do_not_depend_on_the_batch(backbone: Backbone, tmp_path: Path) -> None:
    two = {k: COLOURS[k] for k in ("blue", "red")}
    _head_predictor(backbone, two, tmp_path / "binary")
    loaded = load_predictor(tmp_path / "binary")
    images = [Image.fromarray(_image(rgb, seed=50)) for rgb in two.values()]

    together = loaded.predict_proba(images)
    alone = np.concatenate([loaded.predict_proba([img]) for img in images])

    np.testing.assert_allclose(together, alone, rtol=1e-6)
    np.testing.assert_allclose(together.sum(axis=1), 1.0)
    assert [loaded.classes[i] for i in together.argmax(axis=1)] == ["blue", "red"]


def test_a_folder_without_spec_is_not_a_predictor(tmp_path: Path) -> None:
    with pytest.raises(PredictorError, match=SPEC):
        load_predictor(tmp_path)


def test_new_images_are_decoded_like_ingest_decoded_the_training_images(predictor: Predictor) -> None:
    transparent = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)  # black, fully transparent
    assert np.asarray(predictor.open_image(_png(transparent))).min() == 255  # composited on white, as ingest does

    big = np.zeros((predictor.decoding.max_side * 3, predictor.decoding.max_side * 2, 3), dtype=np.uint8)
    assert min(predictor.open_image(big).size) == predictor.decoding.max_side

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8)).save(buffer, format="JPEG", exif=exif)
    assert predictor.open_image(buffer.getvalue()).size == (20, 40)  # upright: width and height trade places


# ------------------------------------------------------------------ the pyfunc's input and output


def test_paths_bytes_and_arrays_give_the_same_rows(
    predictor: Predictor, folder: Path, fresh: dict[str, np.ndarray]
) -> None:
    arrays = list(fresh.values())
    expected = list(fresh)
    by_path = serving.classify(predictor, pd.DataFrame({serving.PATH: [str(folder / "blue.png"),
                                                                       str(folder / "sub" / "green.png"),
                                                                       str(folder / "sub" / "deeper" / "red.PNG")]}))
    by_bytes = serving.classify(predictor, pd.DataFrame({serving.IMAGE: [_png(a) for a in arrays]}))
    by_batch = serving.classify(predictor, np.stack(arrays))
    by_list = serving.classify(predictor, arrays)
    by_png_frame = serving.classify(predictor, serving.frame_from_arrays(np.stack(arrays)))

    assert _labels(by_path) == expected
    columns = [serving.LABEL, serving.PROBABILITY, *[f"p_{c}" for c in sorted(COLOURS)], serving.ERROR]
    for frame in (by_bytes, by_batch, by_list, by_png_frame):
        assert list(frame.columns) == columns
        pd.testing.assert_frame_equal(frame, by_path)
    assert by_path[serving.ERROR].isna().all()
    np.testing.assert_allclose(by_path[[f"p_{c}" for c in sorted(COLOURS)]].sum(axis=1), 1.0)
    assert (by_path[serving.PROBABILITY] == by_path[[f"p_{c}" for c in COLOURS]].max(axis=1)).all()


def test_bad_inputs_become_error_rows_not_exceptions(predictor: Predictor, fresh: dict[str, np.ndarray],
                                                     tmp_path: Path) -> None:
    good = _png(fresh["red"])
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    frame = pd.DataFrame({
        serving.PATH: [None, str(tmp_path / "missing.png"), str(tmp_path / "corrupt.jpg"),
                       str(tmp_path / "empty.png"), None, None],
        serving.IMAGE: [good, None, None, None, good[: len(good) // 2], None],
    })

    out = serving.classify(predictor, frame)

    assert _labels(out) == ["red", None, None, None, None, None]
    assert out[serving.PROBABILITY][1:].isna().all() and out[[f"p_{c}" for c in COLOURS]][1:].isna().all().all()
    errors = list(out[serving.ERROR])
    assert errors[0] is None
    assert errors[1].startswith("unreadable") and errors[3].startswith("empty_file")
    assert errors[2] and errors[4] and "no image given" in errors[5]


def test_arrays_of_the_wrong_kind_are_error_rows(predictor: Predictor, fresh: dict[str, np.ndarray]) -> None:
    out = serving.classify(predictor, [fresh["green"].astype(np.float32), fresh["green"][:, :, :2], fresh["green"]])
    assert _labels(out) == [None, None, "green"]
    assert "uint8" in out[serving.ERROR][0] and "shape" in out[serving.ERROR][1]


def test_a_frame_needs_a_path_or_image_column(predictor: Predictor) -> None:
    with pytest.raises(ValueError, match="'path'"):
        serving.classify(predictor, pd.DataFrame({"file": ["x.png"]}))


# ------------------------------------------------------------------ the champion in the MLflow registry


def test_champion_is_registered_with_alias_signature_and_example(in_store: Path) -> None:
    c = tracking.client(in_store)
    version = c.get_model_version_by_alias(NAME, registry.CHAMPION_ALIAS)
    assert str(version.version) == "1"
    record = json.loads((in_store / "run.json").read_text())
    assert version.run_id == record["run_id"]
    assert c.get_run(record["run_id"]).data.tags[registry.TAG_CHAMPION] == f"models:/{NAME}/1"

    import mlflow

    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    inputs = {spec.name: (spec.type.name, spec.required) for spec in info.signature.inputs.inputs}
    assert inputs == {serving.PATH: ("string", False), serving.IMAGE: ("binary", False)}
    assert info.metadata["classes"] == sorted(COLOURS)
    assert info.saved_input_example_info is not None
    assert (in_store / tracking.STORE_DIR / "artifacts").is_dir()  # artifacts stay inside the project's store


def test_champion_classifies_paths_bytes_and_encoded_arrays(
    champion: object, folder: Path, fresh: dict[str, np.ndarray]
) -> None:
    paths = [str(folder / rel) for rel in EXPECTED_IN_FOLDER]
    predict = champion.predict  # type: ignore[attr-defined]

    assert _labels(predict(pd.DataFrame({serving.PATH: paths}))) == list(EXPECTED_IN_FOLDER.values())
    assert _labels(predict(pd.DataFrame({serving.IMAGE: [_png(a) for a in fresh.values()]}))) == list(fresh)
    assert _labels(predict(serving.frame_from_arrays(np.stack(list(fresh.values()))))) == list(fresh)
    # MLflow turns a dict of lists into one row of lists; each list item is still one image
    assert _labels(predict({serving.PATH: paths[:2]})) == list(EXPECTED_IN_FOLDER.values())[:2]


def test_champion_reports_bad_files_in_rows(champion: object, folder: Path, tmp_path: Path) -> None:
    out = champion.predict(pd.DataFrame({serving.PATH: [str(tmp_path / "gone.png"),  # type: ignore[attr-defined]
                                                         str(folder / "notes.txt"), str(folder / "blue.png")]}))
    assert _labels(out) == [None, None, "blue"]
    assert out[serving.ERROR][0].startswith("unreadable") and out[serving.ERROR][1].startswith("not_an_image")


def test_signature_keeps_raw_arrays_out_but_the_unwrapped_model_takes_them(
    champion: object, fresh: dict[str, np.ndarray]
) -> None:
    from mlflow.exceptions import MlflowException

    batch = np.stack(list(fresh.values()))
    # the finding behind the signature design: enforcement casts an ndarray to a DataFrame first
    with pytest.raises(MlflowException, match="2-d input"):
        champion.predict(batch)  # type: ignore[attr-defined]
    unwrapped = champion.unwrap_python_model()  # type: ignore[attr-defined]
    assert _labels(unwrapped.predict(None, batch)) == list(fresh)


def test_log_champion_needs_a_running_stage_run(in_store: Path, predictor_dir: Path) -> None:
    run = tracking.StageRun("no-such-run", "parent", "evaluate", tracking.client(in_store))
    with pytest.raises(RuntimeError, match="needs a running stage run; no-such-run"):
        registry.log_champion(run, predictor_dir, NAME, in_store / "example.png")
    with tracking.stage_run("evaluate", {}, in_store / "done.json", root=in_store) as finished:
        pass
    with pytest.raises(RuntimeError, match=f"{finished.run_id} is FINISHED"):
        registry.log_champion(finished, predictor_dir, NAME, in_store / "example.png")


def test_no_champion_is_a_clear_error(in_store: Path, tmp_path: Path) -> None:
    with pytest.raises(registry.ChampionNotFoundError, match="dvc repro"):
        registry.load_champion("never-registered", in_store)
    with pytest.raises(registry.ChampionNotFoundError, match="no MLflow store"):
        registry.load_champion(NAME, tmp_path)
    assert not (tmp_path / tracking.STORE_DIR).exists()  # looking must not create an empty store


def test_opening_one_store_does_not_pin_the_next_root(in_store: Path, tmp_path: Path) -> None:
    tracking.client(tmp_path)
    assert tracking.TRACKING_ENV not in os.environ  # MLflow exports it; only a user's own value may stay
    assert tracking.tracking_uri(in_store) == f"sqlite:///{(in_store / 'mlruns' / 'mlflow.db').resolve().as_posix()}"


# ------------------------------------------------------------------ transferlab predict


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"label": object, "error": object}, keep_default_na=False, na_values=[""])


def test_predict_with_a_predictor_dir_searches_folders_and_writes_csv(
    predictor_dir: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(folder.parent)
    out = tmp_path / "results.csv"

    code = cli.main(["predict", folder.name, "--model", str(predictor_dir), "--out", str(out), "--top-k", "2"])

    assert code == cli.EXIT_OK
    stdout = capsys.readouterr().out
    table = _csv(out)
    expected_paths = [str(Path(folder.name) / rel) for rel in sorted(EXPECTED_IN_FOLDER)]
    assert list(table["path"]) == expected_paths  # notes.txt, .hidden/ and ._blue.png skipped
    assert dict(zip(table["path"], table["label"])) == {
        str(Path(folder.name) / rel): label for rel, label in EXPECTED_IN_FOLDER.items()
    }
    assert list(table.columns) == ["path", "label", "probability", *[f"p_{c}" for c in sorted(COLOURS)], "error"]
    assert table["error"].isna().all()
    for path, label in zip(table["path"], table["label"]):
        line = next(row for row in stdout.splitlines() if row.startswith(path))
        assert line.split()[1] == label and len(line.split()) == 1 + 2 * 2  # path, then 2 x (label, p)


def test_predict_with_the_champion_matches_the_predictor_dir(
    in_store: Path, predictor_dir: Path, folder: Path, tmp_path: Path
) -> None:
    via_dir, via_registry = tmp_path / "dir.csv", tmp_path / "champion.csv"
    assert cli.main(["predict", str(folder), "--model", str(predictor_dir), "--out", str(via_dir)]) == cli.EXIT_OK
    code = cli.main(["predict", str(folder), "--registered-name", NAME, "--root", str(in_store),
                     "--out", str(via_registry)])
    assert code == cli.EXIT_OK
    pd.testing.assert_frame_equal(_csv(via_registry), _csv(via_dir))


def test_predict_reports_bad_files_and_keeps_going(
    predictor_dir: Path, fresh: dict[str, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _write(tmp_path / "in" / "good.png", fresh["green"])
    bad = tmp_path / "in" / "bad.jpg"
    bad.write_bytes(b"garbage")
    missing = tmp_path / "missing.png"
    out = tmp_path / "r.csv"

    code = cli.main(["predict", str(tmp_path / "in"), str(missing), "--model", str(predictor_dir), "--out", str(out)])

    assert code == cli.EXIT_OK
    err = capsys.readouterr().err
    assert f"cannot classify {bad}" in err and f"cannot classify {missing}" in err
    table = _csv(out).set_index("path")
    assert table.loc[str(good), "label"] == "green" and pd.isna(table.loc[str(good), "error"])
    assert table.loc[str(bad), "error"].startswith("not_an_image") and pd.isna(table.loc[str(bad), "label"])
    assert table.loc[str(missing), "error"].startswith("unreadable")


def test_predict_exits_2_when_nothing_could_be_classified(
    predictor_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.png").write_bytes(b"garbage")
    assert cli.main(["predict", str(tmp_path / "bad.png"), "--model", str(predictor_dir)]) == cli.EXIT_USER_ERROR
    assert "none of the 1 files could be classified" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert cli.main(["predict", str(tmp_path / "empty"), "--model", str(predictor_dir)]) == cli.EXIT_USER_ERROR
    assert "no image files" in capsys.readouterr().err


def test_predict_without_a_champion_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], folder: Path
) -> None:
    monkeypatch.delenv(tracking.TRACKING_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["predict", str(folder)]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "dvc repro" in err and "predictor directory" in err and len(err.strip().splitlines()) == 1

    assert cli.main(["predict", str(folder), "--model", str(tmp_path)]) == cli.EXIT_USER_ERROR
    assert "not a transferlab predictor" in capsys.readouterr().err


def test_predict_takes_image_extensions_from_params(
    predictor_dir: Path, fresh: dict[str, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "imgs" / "a.png", fresh["red"])
    _write(tmp_path / "imgs" / "b.bmp", fresh["blue"])
    params = tmp_path / "params.yaml"
    params.write_text("ingest:\n  extensions: [.bmp]\n")

    assert cli.main(["predict", str(tmp_path / "imgs"), "--model", str(predictor_dir),
                     "--params", str(params)]) == cli.EXIT_OK
    stdout = capsys.readouterr().out
    assert "b.bmp" in stdout and "a.png" not in stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_predict_device_flag_is_checked_before_any_work(
    predictor_dir: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["predict", str(folder), "--model", str(predictor_dir), "--device", "cuda"]) == cli.EXIT_USER_ERROR
    assert "error: --device is 'cuda', but " in capsys.readouterr().err
    assert cli.main(["predict", str(folder), "--model", str(predictor_dir), "--device", "gpu"]) == cli.EXIT_USER_ERROR
    assert "error: --device: got 'gpu'; allowed: auto, cpu, cuda, cuda:N, mps" in capsys.readouterr().err
    assert cli.main(["predict", str(folder), "--model", str(predictor_dir), "--device", "cpu"]) == cli.EXIT_OK


def test_predictors_load_onto_the_device_asked_for(in_store: Path, predictor_dir: Path) -> None:
    # meta: a device with shapes and no data, so the check runs on any machine
    for predictor in (load_predictor(predictor_dir, "meta"),
                      registry.load_champion(NAME, in_store, device="meta").unwrap_python_model()._predictor):
        assert predictor.device == torch.device("meta")
        with pytest.raises(NotImplementedError, match="meta"):  # the network ran there: nothing to copy back
            predictor.predict_proba([Image.new("RGB", (32, 32))])
