import re
from pathlib import Path

import pytest

from transferlab import config
from transferlab.config import IngestParams, ParamsError, SplitParams, parse_section


def test_project_params_parse() -> None:
    root = Path(__file__).resolve().parents[1]
    for name in config.SECTIONS:
        assert config.section(name, root / "params.yaml") is not None


def test_unknown_key_names_key_and_allowed_keys() -> None:
    with pytest.raises(ParamsError) as err:
        parse_section(IngestParams, {"max_sid": 10}, "ingest")
    msg = str(err.value)
    assert "max_sid" in msg and "max_side" in msg and "min_per_class" in msg


def test_bad_type_names_key_and_allowed() -> None:
    with pytest.raises(ParamsError, match=r"ingest\.max_side: got 'big'; allowed: an integer"):
        parse_section(IngestParams, {"max_side": "big"}, "ingest")


def test_range_checked() -> None:
    with pytest.raises(ParamsError, match=r"ingest\.max_side.*>= 32"):
        parse_section(IngestParams, {"max_side": 8}, "ingest")


def test_bool_is_not_an_int() -> None:
    with pytest.raises(ParamsError, match="min_per_class"):
        parse_section(IngestParams, {"min_per_class": True}, "ingest")


def test_split_ratios_must_sum_to_one_and_name_parts() -> None:
    with pytest.raises(ParamsError, match=r"split\.ratios.*sum"):
        parse_section(SplitParams, {"ratios": {"train": 0.5, "val": 0.1, "test": 0.1}}, "split")
    with pytest.raises(ParamsError, match=r"split\.ratios.*train, val, test"):
        parse_section(SplitParams, {"ratios": {"train": 0.9, "dev": 0.1}}, "split")


def test_split_folders_values_checked() -> None:
    with pytest.raises(ParamsError, match=r"split\.folders\.val.*allowed"):
        parse_section(SplitParams, {"folders": {"val": "holdout"}}, "split")
    ok = parse_section(SplitParams, {"folders": {"val": "test"}, "ratios": {"train": 0.8, "val": 0.2, "test": 0}}, "split")
    assert ok.folders == {"val": "test"}


def test_int_accepted_where_float_expected() -> None:
    assert parse_section(IngestParams, {"max_file_mb": 3}, "ingest").max_file_mb == 3.0


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train_head:\n  lineer: {}\n", r"unknown key 'train_head\.lineer'; did you mean linear\?"),
        ("finetun:\n  lr: 0.01\n", r"unknown section 'finetun'; did you mean finetune\?"),
        ("extract:\n  batchsize: 8\n", r"unknown key 'extract\.batchsize'; did you mean batch_size\?"),
        ("finetune:\n  lrr: 0.01\n", r"unknown key 'finetune\.lrr'; did you mean lr\?"),
        ("split:\n  seed: -1\n", r"split\.seed: got -1; allowed: an integer >= 0"),
        ("train_head:\n  svm:\n    C_grid: []\n", r"train_head\.svm\.C_grid: got \[\]"),
        ("train_head:\n  svm:\n    tol: 0\n", r"train_head\.svm\.tol: got 0"),
        ("ingest:\n  workers: 0\n", r"ingest\.workers: got 0; allowed: null or an integer >= 1"),
    ],
)
def test_whole_file_typos_and_bounds_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ParamsError, match=needle):
        config.load(_write(tmp_path, text))


def test_any_section_loads_validate_the_whole_file(tmp_path: Path) -> None:
    # a stage reading only `split` still refuses a typo elsewhere in the file
    path = _write(tmp_path, "split: {seed: 3}\nfinetun: {lr: 0.01}\n")
    with pytest.raises(ParamsError, match="finetun"):
        config.section("split", path)


def test_exponent_without_dot_is_a_float_as_for_dvc(tmp_path: Path) -> None:
    path = _write(tmp_path, "train_head:\n  gap:\n    lr: 1e-4\nfinetune:\n  lr: 2E-3\n")
    params = config.load(path)
    assert params.train_head.gap.lr == 0.0001
    assert params.finetune.lr == 0.002


def test_finetune_backbones_must_be_extracted(tmp_path: Path) -> None:
    path = _write(tmp_path, "extract: {backbones: [efficientnet_lite0]}\nfinetune: {backbones: [resnet18]}\n")
    with pytest.raises(ParamsError, match=r"finetune\.backbones.*extract\.backbones.*resnet18"):
        config.load(path)


def test_svm_cv_checked_against_smallest_class() -> None:
    svm = config.SvmHeadParams(cv=5)
    svm.check_folds({"ants": 40, "bees": 9}, "train_head.svm")
    with pytest.raises(ParamsError, match=r"train_head\.svm\.cv: got 5; allowed: 2 to 4.*'bees'"):
        svm.check_folds({"ants": 40, "bees": 4}, "train_head.svm")
    # without a grid and calibration no folds are made
    config.SvmHeadParams(cv=5, C_grid=None, calibrate=False).check_folds({"a": 1}, "train_head.svm")


def test_image_extensions_are_torchvision_imagefolder_ones() -> None:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert set(config.IMAGE_EXTENSIONS) == set(IMG_EXTENSIONS)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CUDA", "cpu ", "", "mps:0"])
def test_bad_compute_device_names_key_value_and_forms(tmp_path: Path, device: str) -> None:
    allowed = r"; allowed: auto, cpu, cuda, cuda:N, mps$"
    with pytest.raises(ParamsError, match=rf"^compute\.device: got {re.escape(repr(device))}{allowed}"):
        parse_section(config.ComputeParams, {"device": device}, "compute")
    with pytest.raises(ParamsError, match=rf"^compute\.device: got {re.escape(repr(device))}{allowed}"):
        config.load(_write(tmp_path, f"compute:\n  device: {device!r}\n"))


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_compute_device_forms_accepted(device: str) -> None:
    assert parse_section(config.ComputeParams, {"device": device}, "compute").device == device


def test_compute_defaults_and_workers_bound() -> None:
    assert config.Params().compute == config.ComputeParams(device="auto", num_workers=None)
    with pytest.raises(ParamsError, match=r"compute\.num_workers: got -1; allowed: null or an integer >= 0"):
        parse_section(config.ComputeParams, {"num_workers": -1}, "compute")
    with pytest.raises(ParamsError, match=r"compute\.device: got 0; allowed: a string"):
        parse_section(config.ComputeParams, {"device": 0}, "compute")
