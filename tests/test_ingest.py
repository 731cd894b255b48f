"""Ingest on small synthetic folders: what is kept, what is rejected and why."""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from projects import tree
from transferlab.config import IngestParams
from transferlab.data.ingest import IngestError, discover, ingest

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
# JPEG at q95 moves flat colours by a few levels at most
TOL = 6


def _noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _by_source(out: Path) -> dict[str, dict[str, str]]:
    return {row["source"]: row for row in _manifest(out)}


def _pixel(out: Path, row: dict[str, str], xy: tuple[int, int]) -> tuple[int, ...]:
    with Image.open(out / row["path"]) as img:
        assert img.mode == "RGB"
        return img.getpixel(xy)  # type: ignore[return-value]


def _close(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return all(abs(x - y) <= TOL for x, y in zip(a, b, strict=True))


def _two_classes(raw: Path, per_class: int = 3) -> None:
    for c, label in enumerate(["cats", "dogs"]):
        for i in range(per_class):
            _save(_noise(48, 40, seed=10 * c + i), raw / label / f"{label}{i}.jpg", quality=90)


# a name with a space and a decomposed (NFD, as macOS writes it) accent
ODD_NAME = unicodedata.normalize("NFD", "my cat é.jpg")


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    _two_classes(raw)
    cats, dogs = raw / "cats", raw / "dogs"
    _save(_noise(48, 40, seed=99), cats / ODD_NAME, quality=90)
    _save(Image.new("CMYK", (40, 32), (0, 255, 255, 0)), cats / "cmyk.jpg", quality=95)
    # 16-bit grey: three flat 16-px bands (black, mid grey, white)
    bands = np.repeat(np.array([0, 32768, 65535], dtype=np.uint16), 16)
    gray16 = Image.fromarray(np.tile(bands, (32, 1)))
    assert gray16.mode == "I;16"
    _save(gray16, cats / "gray16.png")
    # RGBA: left half fully transparent over black, right half opaque red
    rgba = np.zeros((32, 48, 4), dtype=np.uint8)
    rgba[:, 24:] = (*RED, 255)
    _save(Image.fromarray(rgba, "RGBA"), cats / "rgba.png")
    # stored 60x40 landscape with a red marker top-left; EXIF 6 = turn 90 deg clockwise to view
    rotated = Image.new("RGB", (60, 40), BLUE)
    rotated.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(rotated, cats / "rotated.jpg", quality=95, exif=exif)
    (cats / ".DS_Store").write_bytes(b"\x00\x01binary junk")
    (cats / "readme.txt").write_text("not a picture\n", encoding="utf-8")
    _save(_noise(16, 16, seed=5), cats / "nested" / "deep.jpg")

    # palette image whose index 0 is transparent, and a plain grey one
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, *BLUE] + [0] * (256 - 2) * 3)
    pal.paste(1, (16, 0, 32, 32))
    _save(pal, dogs / "palette.png", transparency=0)
    _save(Image.new("L", (32, 32), 77), dogs / "grey.png")
    (dogs / "truncated.jpg").write_bytes(_jpeg_bytes(_noise(64, 64, seed=7))[:1500])
    (dogs / "empty.jpg").write_bytes(b"")
    (dogs / "notes.jpg").write_text("this is text with an image name\n", encoding="utf-8")
    # small files, many pixels: as a decompression bomb is
    _save(Image.new("RGB", (120, 120), BLUE), dogs / "bomb_1x.png")  # over max_pixels: Pillow warns
    _save(Image.new("RGB", (200, 200), BLUE), dogs / "bomb_2x.png")  # over twice max_pixels: Pillow raises
    (dogs / "big.jpg").write_bytes(b"\xff" * 60_000)  # over max_file_mb; never opened
    (raw / "stray.txt").write_text("outside any class folder\n", encoding="utf-8")
    return raw


SEEDED_PARAMS = IngestParams(max_side=512, min_per_class=2, max_pixels=10_000, max_file_mb=0.05)


def test_seeded_folder_keeps_good_and_rejects_each_bad_file(
    seeded: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    out = tmp_path / "out"
    report = ingest(seeded, out, SEEDED_PARAMS)
    # bombs are rejected quietly, not also warned about
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]

    reasons = {r["path"]: r["reason"] for r in report["rejected"]}
    assert reasons == {
        "cats/nested/deep.jpg": "misplaced",
        "cats/readme.txt": "extension",  # not among ingest.extensions
        "dogs/big.jpg": "file_too_large",
        "dogs/bomb_1x.png": "too_many_pixels",
        "dogs/bomb_2x.png": "too_many_pixels",
        "dogs/empty.jpg": "empty_file",
        "dogs/notes.jpg": "not_an_image",
        "dogs/truncated.jpg": "truncated",
        "stray.txt": "misplaced",
    }
    assert all(r["detail"] for r in report["rejected"])
    details = {r["path"]: r["detail"] for r in report["rejected"]}
    assert details["dogs/bomb_2x.png"] == "40000 pixels is over ingest.max_pixels = 10000"
    assert "ingest.max_file_mb" in details["dogs/big.jpg"]
    rows = _by_source(out)
    assert sorted(rows) == sorted(
        [f"cats/cats{i}.jpg" for i in range(3)]
        + [f"dogs/dogs{i}.jpg" for i in range(3)]
        + [f"cats/{ODD_NAME}", "cats/cmyk.jpg", "cats/gray16.png", "cats/rgba.png", "cats/rotated.jpg"]
        + ["dogs/palette.png", "dogs/grey.png"]
    )
    assert report["counts"] == {"cats": 8, "dogs": 5}
    assert report["total"] == {"seen": 22, "kept": 13, "rejected": 9}  # .DS_Store is not seen
    assert report["rejected_by_reason"]["too_many_pixels"] == 2
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == report

    for row in rows.values():
        assert (out / row["path"]).is_file()
        assert row["path"].endswith(".jpg") and row["folder_split"] == ""
        with Image.open(out / row["path"]) as img:
            assert img.format == "JPEG" and img.mode == "RGB"

    odd = rows[f"cats/{ODD_NAME}"]["path"]
    assert odd.startswith("images/cats/my_cat_é-"), odd  # NFC, spaces to '_'
    assert " " not in odd

    cmyk = rows["cats/cmyk.jpg"]
    assert _close(_pixel(out, cmyk, (20, 16)), RED)

    gray = rows["cats/gray16.png"]
    # a clipping conversion would give 0, 255, 255
    assert _close(_pixel(out, gray, (4, 16)), (0, 0, 0))
    assert _close(_pixel(out, gray, (20, 16)), (128, 128, 128))
    assert _close(_pixel(out, gray, (44, 16)), WHITE)

    rgba = rows["cats/rgba.png"]
    assert _close(_pixel(out, rgba, (4, 16)), WHITE)  # transparent -> white, not black
    assert _close(_pixel(out, rgba, (44, 16)), RED)

    palette = rows["dogs/palette.png"]
    assert _close(_pixel(out, palette, (4, 16)), WHITE)
    assert _close(_pixel(out, palette, (28, 16)), BLUE)
    assert _close(_pixel(out, rows["dogs/grey.png"], (16, 16)), (77, 77, 77))

    rot = rows["cats/rotated.jpg"]
    assert (rot["width"], rot["height"]) == ("40", "60")  # upright original size
    with Image.open(out / rot["path"]) as img:
        assert img.size == (40, 60)
        assert _close(img.getpixel((36, 4)), RED)  # stored top-left ends top-right
        assert _close(img.getpixel((4, 4)), BLUE)
        assert _close(img.getpixel((36, 56)), BLUE)


def test_manifest_is_sorted_and_hashes_original_bytes(seeded: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ingest(seeded, out, SEEDED_PARAMS)
    rows = _manifest(out)
    assert list(rows[0]) == ["path", "label", "sha256", "width", "height", "folder_split", "source", "phash", "group"]
    assert [r["source"] for r in rows] == sorted(r["source"] for r in rows)
    import hashlib

    for r in rows:
        original = (seeded / r["source"]).read_bytes()
        assert r["sha256"] == hashlib.sha256(original).hexdigest()
        assert Path(r["path"]).stem.endswith("-" + r["sha256"][:8])
        assert r["label"] == r["source"].split("/")[0]


def test_pillow_globals_enforced_during_call_and_restored(
    seeded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # another library set both: ingest.max_pixels decides, truncation is still
    # rejected, and both are put back afterwards
    process_limit = 1000  # below every good image of the folder
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", process_limit)
    report = ingest(seeded, tmp_path / "out", SEEDED_PARAMS)
    reasons = {r["path"]: r["reason"] for r in report["rejected"]}
    assert reasons["dogs/truncated.jpg"] == "truncated"
    assert reasons["dogs/bomb_1x.png"] == reasons["dogs/bomb_2x.png"] == "too_many_pixels"
    assert report["total"]["kept"] == 13
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    assert Image.MAX_IMAGE_PIXELS == process_limit


def test_shrinks_shorter_side_and_never_upscales(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _save(Image.new("RGB", (200, 100), BLUE), raw / "a" / "wide.png")
    _save(Image.new("RGB", (60, 300), BLUE), raw / "a" / "tall.png")
    _save(Image.new("RGB", (40, 30), BLUE), raw / "b" / "small.png")
    # big enough that JPEG draft decodes at reduced scale before the resize
    _save(_noise(800, 400, seed=1), raw / "b" / "photo.jpg", quality=90)
    out = tmp_path / "out"
    ingest(raw, out, IngestParams(max_side=50, min_per_class=1))
    rows = _by_source(out)
    expected = {
        "a/wide.png": ((200, 100), (100, 50)),
        "a/tall.png": ((60, 300), (50, 250)),
        "b/small.png": ((40, 30), (40, 30)),
        "b/photo.jpg": ((800, 400), (100, 50)),
    }
    for source, (original, shrunk) in expected.items():
        row = rows[source]
        assert (int(row["width"]), int(row["height"])) == original
        with Image.open(out / row["path"]) as img:
            assert img.size == shrunk, source


def test_folder_split_layout_and_duplicates(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    same = _jpeg_bytes(_noise(40, 40, seed=42))
    for s, split in enumerate(("train", "val")):
        for c, label in enumerate(("ants", "bees")):
            for i in range(2):
                _save(_noise(40, 40, seed=100 * s + 10 * c + i), raw / split / label / f"{i}.jpg")
    for where in ("train/ants/dup.jpg", "val/ants/dup.jpg", "train/ants/a b.jpg", "train/ants/a_b.jpg"):
        (raw / where).write_bytes(same)
    (raw / "val" / "bees" / "dup.jpg").write_bytes(same)  # same picture, other label
    _save(_noise(40, 40, seed=8), raw / "extra" / "ants" / "x.jpg")  # not a split folder

    out = tmp_path / "out"
    report = ingest(raw, out, IngestParams(min_per_class=2))
    rows = _by_source(out)
    assert report["layout"] == "folders"
    assert [r["path"] for r in report["rejected"]] == ["extra/ants/x.jpg"]
    assert report["rejected"][0]["reason"] == "misplaced"
    assert {s: r["folder_split"] for s, r in rows.items()} == {s: s.split("/")[0] for s in rows}
    assert report["counts"] == {"ants": 8, "bees": 5}

    group = ["train/ants/a b.jpg", "train/ants/a_b.jpg", "train/ants/dup.jpg", "val/ants/dup.jpg", "val/bees/dup.jpg"]
    assert report["duplicates"] == [group]
    assert report["duplicates_across_classes"] == [group]
    paths = [rows[s]["path"] for s in group]
    assert len(set(paths)) == len(paths)  # kept, each under its own name
    assert paths[3].startswith("images/val/ants/dup-") and paths[2].startswith("images/train/ants/dup-")
    sha8 = rows["train/ants/a b.jpg"]["sha256"][:8]
    assert paths[:2] == [f"images/train/ants/a_b-{sha8}.jpg", f"images/train/ants/a_b-{sha8}-2.jpg"]


def test_discover_sorted_and_skips_hidden(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _two_classes(raw, per_class=2)
    (raw / "dogs" / "._dogs0.jpg").write_bytes(b"resource fork")
    (raw / "__MACOSX").mkdir()
    (raw / ".cache").mkdir()
    found = discover(raw)
    assert [(c.source, c.label, c.folder_split) for c in found] == [
        ("cats/cats0.jpg", "cats", ""),
        ("cats/cats1.jpg", "cats", ""),
        ("dogs/dogs0.jpg", "dogs", ""),
        ("dogs/dogs1.jpg", "dogs", ""),
    ]
    assert all(c.path == raw / c.source for c in found)


def _untouched_after(call: object, out: Path) -> None:
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("previous run\n", encoding="utf-8")
    before = tree(out)
    siblings = sorted(p.name for p in out.parent.iterdir())
    with pytest.raises(IngestError) as info:
        call()  # type: ignore[operator]
    assert tree(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == siblings  # no temp dir left behind
    return info.value  # type: ignore[return-value]


def test_one_class_raises_and_leaves_out_dir_untouched(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for i in range(3):
        _save(_noise(32, 32, seed=i), raw / "only" / f"{i}.jpg")
    (raw / "other").mkdir()
    (raw / "other" / "bad.jpg").write_bytes(b"broken")
    out = tmp_path / "outs" / "out"
    err = _untouched_after(lambda: ingest(raw, out, IngestParams(min_per_class=1)), out)
    assert "at least 2 classes" in str(err) and "only" in str(err)


def test_class_under_min_per_class_raises_naming_it(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _two_classes(raw, per_class=3)
    (raw / "dogs" / "dogs2.jpg").write_bytes(b"")  # dogs: 2 kept, 1 rejected
    out = tmp_path / "outs" / "out"
    err = _untouched_after(lambda: ingest(raw, out, IngestParams(min_per_class=3)), out)
    message = str(err)
    assert "'dogs' has 2 kept" in message and "empty_file: 1" in message
    assert "ingest.min_per_class is 3" in message
    assert "cats" not in message
    # a fresh out_dir is not created either
    fresh = tmp_path / "fresh"
    with pytest.raises(IngestError):
        ingest(raw, fresh, IngestParams(min_per_class=3))
    assert not fresh.exists()


def test_out_dir_inside_raw_dir_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _two_classes(raw)
    with pytest.raises(IngestError, match="must not contain"):
        ingest(raw, raw / "prepared", IngestParams(min_per_class=1))
    with pytest.raises(IngestError, match="must not contain"):
        ingest(raw, tmp_path, IngestParams(min_per_class=1))
    assert sorted(p.name for p in raw.iterdir()) == ["cats", "dogs"]


def test_deterministic_outputs(seeded: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    ingest(seeded, first, SEEDED_PARAMS)
    ingest(seeded, second, SEEDED_PARAMS, progress=True)
    files = tree(first)
    assert files == tree(second)
    assert "manifest.csv" in files and "report.json" in files
    assert sum(name.endswith(".jpg") for name in files) == 13
    # a re-run into an existing out_dir replaces it with the same bytes
    (first / "stale.jpg").write_bytes(b"old")
    ingest(seeded, first, SEEDED_PARAMS)
    assert tree(first) == files


def test_parallel_workers_write_the_same_bytes_as_one(seeded: Path, tmp_path: Path) -> None:
    # every kind of file of the seeded folder (good, rejected, odd names) on 1 and on 3 processes
    one, three = tmp_path / "one", tmp_path / "three"
    ingest(seeded, one, SEEDED_PARAMS.model_copy(update={"workers": 1}))
    report = ingest(seeded, three, SEEDED_PARAMS.model_copy(update={"workers": 3}))
    assert tree(one) == tree(three)
    assert report["total"]["kept"] == 13 and report["total"]["rejected"] > 5
    assert "workers" not in report["params"]  # the report records what decides the outputs only


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2"])
def test_bad_workers_value_is_refused_naming_it(workers: object) -> None:
    with pytest.raises(ValueError, match="workers"):
        IngestParams.model_validate({"workers": workers})


def test_usable_cores_is_this_process_affinity() -> None:
    import os

    from transferlab.data.ingest import usable_cores

    assert usable_cores() == len(os.sched_getaffinity(0))


def test_extensions_filter_reports_other_formats(tmp_path: Path) -> None:

    raw = tmp_path / "raw"
    for label in ("a", "b"):
        (raw / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(raw / label / f"{i}.png")
    Image.new("RGB", (8, 8)).save(raw / "a" / "placeholder.gif")
    params = IngestParams(min_per_class=1, extensions=[".png"])
    report = ingest(raw, tmp_path / "out", params)
    assert report["counts"] == {"a": 2, "b": 2}
    (rejected,) = report["rejected"]
    assert rejected["reason"] == "extension" and rejected["path"] == "a/placeholder.gif"


def test_workers_start_by_fork_only_while_the_process_is_single_threaded() -> None:
    import threading

    from transferlab.data import ingest as module

    assert threading.active_count() > 1 or module._start_method() == "fork"
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert module._start_method() == "spawn"  # a forked copy of another thread's lock could hang
    finally:
        release.set()
        other.join()
