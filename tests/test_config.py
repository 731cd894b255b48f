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
    with pytest.raises(ParamsError, match=r"ingest\.max_side: got 'big'; allowed: int"):
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
