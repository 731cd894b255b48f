import pandas as pd
import pytest

from transferlab.config import SplitParams
from transferlab.data.split import SplitError, assign_parts, summarize


def manifest(n_per_class: dict[str, int], folder: str = "") -> pd.DataFrame:
    rows = []
    for label, n in n_per_class.items():
        for i in range(n):
            rows.append({"path": f"images/{label}/{i}.jpg", "label": label, "sha256": f"{label}{i:04d}", "folder_split": folder})
    return pd.DataFrame(rows)


def test_stratified_ratios_and_seed() -> None:
    m = manifest({"a": 100, "b": 40})
    split = assign_parts(m, SplitParams(seed=1))
    counts = summarize(split)
    assert counts["train"] == {"a": 70, "b": 28}
    assert counts["val"] == {"a": 15, "b": 6} and counts["test"] == {"a": 15, "b": 6}
    again = assign_parts(m, SplitParams(seed=1))
    other = assign_parts(m, SplitParams(seed=2))
    assert split.equals(again)
    assert not split["part"].equals(other["part"])


def test_duplicates_stay_together() -> None:
    m = manifest({"a": 30, "b": 30})
    m.loc[m.index[:10], "sha256"] = "same-a"  # ten copies of one image
    split = assign_parts(m, SplitParams(seed=3))
    assert split.loc[split["sha256"] == "same-a", "part"].nunique() == 1


def test_respect_folders_keeps_train_val_and_draws_test_from_train() -> None:
    m = pd.concat([manifest({"a": 50, "b": 50}, "train"), manifest({"a": 10, "b": 10}, "val").assign(
        path=lambda d: "v/" + d["path"], sha256=lambda d: "v" + d["sha256"])])
    split = assign_parts(m, SplitParams())
    val_rows = split[split["path"].str.startswith("v/")]
    assert set(val_rows["part"]) == {"val"} and len(val_rows) == 20
    train_rows = split[~split["path"].str.startswith("v/")]
    assert set(train_rows["part"]) == {"train", "test"}
    assert summarize(split)["test"] == {"a": 9, "b": 9}  # 0.15 / (0.7 + 0.15) of 50, stratified


def test_folder_map_holds_dataset_val_out_as_test() -> None:
    m = pd.concat([manifest({"a": 40, "b": 40}, "train"), manifest({"a": 10, "b": 12}, "val").assign(
        path=lambda d: "v/" + d["path"], sha256=lambda d: "v" + d["sha256"])])
    params = SplitParams(ratios={"train": 0.8, "val": 0.2, "test": 0.0}, folders={"val": "test"})
    split = assign_parts(m, params)
    assert set(split.loc[split["path"].str.startswith("v/"), "part"]) == {"test"}
    assert summarize(split)["val"] == {"a": 8, "b": 8}


def test_duplicate_across_folders_goes_to_held_out_part() -> None:
    m = pd.concat([manifest({"a": 20, "b": 20}, "train"), manifest({"a": 5, "b": 5}, "val")])
    m["path"] = [f"p{i}" for i in range(len(m))]  # same sha256 values in both folders
    split = assign_parts(m, SplitParams())
    dup = split[split["sha256"] == "a0000"]
    assert len(dup) == 2 and set(dup["part"]) == {"val"}


def test_ignoring_folders() -> None:
    m = manifest({"a": 20, "b": 20}, "train")
    split = assign_parts(m, SplitParams(respect_folders=False))
    assert set(split["part"]) == {"train", "val", "test"}


def test_empty_manifest_is_an_error() -> None:
    with pytest.raises(SplitError, match="empty"):
        assign_parts(manifest({}), SplitParams())
