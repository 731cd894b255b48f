"""Near-duplicates at ingest (perceptual hashes) and split keeping each group in one part."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageOps

from helpers import resized_recompressed, smooth_photo
from transferlab.config import IngestParams, SplitParams
from transferlab.data.ingest import ingest
from transferlab.data.near_dups import close_pairs, group_ids, perceptual_hashes
from transferlab.data.split import assign_parts

PARAMS = IngestParams(workers=1, min_per_class=1)
COPIES = 10


def test_close_pairs_counts_bits_and_mirror_hashes() -> None:
    hashes = ["0000000000000000", "0000000000000007", "ffffffffffffffff", "00000000000000ff"]
    assert close_pairs(hashes, 3) == [(0, 1)]
    assert close_pairs(hashes, 8) == [(0, 1), (0, 3), (1, 3)]
    mirrors = ["ffffffffffffffff", "1111111111111111", "0000000000000000", "2222222222222222"]
    assert (0, 2) in close_pairs(hashes, 0, mirrors) and (0, 2) not in close_pairs(hashes, 0)


def test_group_ids_join_exact_copies_and_pairs_whatever_the_order() -> None:
    keys = ["c", "a", "c", "b", "d"]
    assert group_ids(keys, [(1, 2)]) == ["a", "a", "a", "b", "d"]
    reordered = group_ids(["d", "b", "c", "a", "c"], [(3, 4)])
    assert reordered == ["d", "b", "a", "a", "a"]


def test_a_resized_recompressed_or_mirrored_copy_hashes_close() -> None:
    image = smooth_photo(1, (320, 240))
    original, _ = perceptual_hashes(image)
    buffer = BytesIO()
    image.resize((160, 120)).save(buffer, "JPEG", quality=60)
    copy, _ = perceptual_hashes(Image.open(buffer).convert("RGB"))
    _, mirror_of_mirror = perceptual_hashes(ImageOps.mirror(image))
    other, _ = perceptual_hashes(smooth_photo(2, (320, 240)))
    distance = lambda a, b: bin(int(a, 16) ^ int(b, 16)).count("1")  # noqa: E731
    assert distance(original, copy) <= 2
    assert distance(original, mirror_of_mirror) == 0  # the mirror's mirror hash is the original's hash
    assert distance(original, other) > 16


def photo_dataset(raw: Path, per_part: int = 12) -> list[tuple[str, str]]:
    """train/val folders of two classes of distinct photos; then COPIES resized, recompressed copies placed in
    another class folder or another split folder. Returns (original source, copy source) pairs."""
    seed = 0
    originals: list[tuple[str, object]] = []
    for part in ("train", "val"):
        for label in ("ants", "bees"):
            (raw / part / label).mkdir(parents=True)
            for i in range(per_part):
                seed += 1
                image = smooth_photo(seed)
                image.save(raw / part / label / f"{i:02d}.jpg", quality=92)
                originals.append((f"{part}/{label}/{i:02d}.jpg", image))
    pairs = []
    for n, (source, image) in enumerate(originals[::5][:COPIES]):
        part, label, name = source.split("/")
        if n % 2:  # another class, same split folder
            target = f"{part}/{'bees' if label == 'ants' else 'ants'}/copy-{name}"
        else:  # another split folder, same class
            target = f"{'val' if part == 'train' else 'train'}/{label}/copy-{name}"
        resized_recompressed(image, raw / target)
        pairs.append((source, target))
    return pairs


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]], dict]:
    root = tmp_path_factory.mktemp("near")
    pairs = photo_dataset(root / "raw")
    report = ingest(root / "raw", root / "prepared", PARAMS)
    return root, pairs, report


def test_ingest_groups_copies_in_another_class_or_split_folder(ingested) -> None:
    root, pairs, report = ingested
    manifest = pd.read_csv(root / "prepared/manifest.csv", keep_default_na=False)
    group = dict(zip(manifest["source"], manifest["group"]))
    grouped = [a for a, b in pairs if group[a] == group[b]]
    assert len(grouped) == COPIES
    assert len(set(group.values())) == len(manifest) - COPIES  # nothing else grouped
    assert sorted(report["near_duplicates"]) == sorted(sorted(p) for p in pairs)
    across = [sorted(p) for p in pairs if p[0].split("/")[1] != p[1].split("/")[1]]
    assert report["near_duplicates_across_classes"] == sorted(across) and across
    assert report["duplicates"] == []  # none of them is an exact copy
    assert json.loads((root / "prepared/report.json").read_text())["near_duplicates"] == report["near_duplicates"]


@pytest.mark.parametrize("folders", [{}, {"val": "test"}])
def test_split_puts_each_near_duplicate_group_in_one_part(ingested, folders) -> None:
    root, pairs, _ = ingested
    manifest = pd.read_csv(root / "prepared/manifest.csv", keep_default_na=False, dtype={"folder_split": str})
    split = assign_parts(manifest, SplitParams(folders=folders))
    part = dict(zip(manifest["source"], split.set_index("path").loc[manifest["path"], "part"]))
    assert all(part[a] == part[b] for a, b in pairs)
    across_folders = [(a, b) for a, b in pairs if a.split("/")[0] != b.split("/")[0]]
    held_out = "test" if folders else "val"
    assert across_folders and all(part[a] == held_out for a, _ in across_folders)  # the most held-out part


def test_near_dup_distance_null_groups_exact_copies_only(tmp_path: Path) -> None:
    pairs = photo_dataset(tmp_path / "raw", per_part=3)
    (tmp_path / "raw/train/ants/exact.jpg").write_bytes((tmp_path / "raw/train/ants/00.jpg").read_bytes())
    report = ingest(tmp_path / "raw", tmp_path / "out", IngestParams(workers=1, min_per_class=1, near_dup_distance=None))
    assert report["near_duplicates"] == []
    assert report["duplicates"] == [["train/ants/00.jpg", "train/ants/exact.jpg"]]
    assert report["params"]["near_dup_distance"] is None and pairs


def test_a_mirrored_copy_joins_only_with_near_dup_mirror(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / "raw" / label).mkdir(parents=True)
    image = smooth_photo(7)
    image.save(tmp_path / "raw/a/photo.jpg", quality=92)
    ImageOps.mirror(image).save(tmp_path / "raw/b/mirrored.jpg", quality=80)
    smooth_photo(8).save(tmp_path / "raw/b/other.jpg", quality=92)
    with_mirror = ingest(tmp_path / "raw", tmp_path / "out1", PARAMS)
    assert with_mirror["near_duplicates"] == [["a/photo.jpg", "b/mirrored.jpg"]]
    without = ingest(tmp_path / "raw", tmp_path / "out2", IngestParams(workers=1, min_per_class=1,
                                                                       near_dup_mirror=False))
    assert without["near_duplicates"] == []


def test_images_under_32_px_are_grouped_by_bytes_only(tmp_path: Path) -> None:
    # 16 x 16 images of one flat colour hash alike, but they are different images
    for label in ("a", "b"):
        (tmp_path / "raw" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (60 * i, 90, 120 if label == "a" else 30)).save(tmp_path / f"raw/{label}/{i}.png")
    report = ingest(tmp_path / "raw", tmp_path / "out", PARAMS)
    assert report["near_duplicates"] == []
    manifest = pd.read_csv(tmp_path / "out/manifest.csv")
    assert manifest["group"].nunique() == 4


def test_near_dup_distance_is_validated() -> None:
    from transferlab.config import ParamsError, parse_section

    with pytest.raises(ParamsError, match=r"ingest\.near_dup_distance: got 40"):
        parse_section(IngestParams, {"near_dup_distance": 40}, "ingest")
