"""The audit: likely leaks across split parts, likely label errors, the report, its sheets and `transferlab audit`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from transferlab import cli
from transferlab.audit.job import audit, read_audit
from transferlab.audit.labels import label_suspects
from transferlab.audit.leaks import find_leaks, leaked
from transferlab.audit.show import format_audit
from transferlab.config import AuditParams, LabelIssueParams, ParamsError, parse
from transferlab.config import Params
from transferlab.models.features import PartFeatures

CLASSES = ["ants", "bees", "wasps"]
DIM = 32
SWAPPED = 8


def clusters(n: int, seed: int, spread: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """Pooled-vector-like data: positive Gaussian clusters, one per class (pooled ReLU features are positive)."""
    centers = np.abs(np.random.default_rng(0).normal(0.0, spread, (len(CLASSES), DIM))) + 1
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    return (centers[y] + rng.normal(0.0, 1.0, (n, DIM))).astype(np.float32), np.array(CLASSES)[y]


def part(name: str, X: np.ndarray, y: np.ndarray) -> PartFeatures:
    return PartFeatures([f"images/{name}/{y[i]}/{i:03d}.jpg" for i in range(len(y))], y.astype(object), X, None)


# ----------------------------------------------------------------------------- leaks


def test_a_held_out_copy_of_a_trained_image_is_a_leak_and_nothing_else_is() -> None:
    X, y = clusters(90, seed=1)
    train, test = part("train", X[:60], y[:60]), part("test", X[60:].copy(), y[60:])
    test.pooled[3] = train.pooled[7] * 1.5 + 0.01  # the same image at another scale: cosine ~1
    test.pooled[9] = train.pooled[20]
    found = find_leaks({"train": train, "test": test}, threshold=0.99)
    # both round to similarity 1.0: ties are listed by path
    assert [(r["path"], r["match"]) for r in found] == sorted([(test.ids[9], train.ids[20]), (test.ids[3], train.ids[7])])
    assert found[0]["similarity"] == 1.0 and found[0]["part"] == "test" and found[0]["match_part"] == "train"
    assert leaked(found, "test") == sorted([test.ids[3], test.ids[9]]) and leaked(found, "val") == []


def test_each_held_out_image_is_matched_against_every_earlier_part_once() -> None:
    X, y = clusters(30, seed=2)
    parts = {"train": part("train", X[:10], y[:10]), "val": part("val", X[10:20], y[10:20]),
             "test": part("test", X[20:], y[20:])}
    found = find_leaks(parts, threshold=-1.0)  # everything is a "leak": one pair per image and earlier part
    assert len(found) == 10 + 10 + 10  # val->train, test->train, test->val
    assert {(r["part"], r["match_part"]) for r in found} == {("val", "train"), ("test", "train"), ("test", "val")}


# ------------------------------------------------------------------------ label issues


def swapped_labels(n: int = 240, seed: int = 3) -> tuple[np.ndarray, np.ndarray, list[int]]:
    X, y = clusters(n, seed)
    flip = np.random.default_rng(seed).choice(n, SWAPPED, replace=False)
    y = y.copy()
    for i in flip:
        y[i] = CLASSES[(CLASSES.index(y[i]) + 1) % len(CLASSES)]
    return X, y, sorted(flip.tolist())


def test_swapped_labels_rank_among_the_top_suspects() -> None:
    X, y, flipped = swapped_labels()
    ids = [f"images/{i}.jpg" for i in range(len(y))]
    found = label_suspects(X, y, ids, ["train"] * len(y), LabelIssueParams(top=20))
    top = [ids.index(s["path"]) for s in found["suspects"]]
    assert len(set(top) & set(flipped)) >= 6
    assert found["folds"] == 5 and found["flagged"] >= len(found["suspects"]) > 0
    first = found["suspects"][0]
    assert first["rank"] == 1 and first["p_label"] < first["p_suggested"] and first["suggested"] != first["label"]
    assert [s["p_label"] for s in found["suspects"]] == sorted(s["p_label"] for s in found["suspects"])
    again = label_suspects(X, y, ids, ["train"] * len(y), LabelIssueParams(top=20))
    assert again == found  # seeded folds: the same ranking every run


def test_clean_labels_give_few_suspects_and_tiny_classes_are_skipped() -> None:
    X, y = clusters(240, seed=4, spread=6.0)  # well separated, no label touched
    ids = [str(i) for i in range(len(y))]
    assert label_suspects(X, y, ids, ["train"] * len(y), LabelIssueParams())["flagged"] <= 2
    y_tiny = y.copy()
    y_tiny[0] = "hornets"  # one image of a class: no fold can hold it out
    skipped = label_suspects(X, y_tiny, ids, ["train"] * len(y), LabelIssueParams())
    assert skipped["suspects"] == [] and "2 or more" in skipped["skipped"]


# -------------------------------------------------------------------------- the job


def write_project(root: Path, leak: bool = True) -> Path:
    """data/prepared (images, manifest, report) and a feature store of train/val/test, as the stages write them."""
    prepared, store = root / "prepared", root / "features" / "lite"
    store.mkdir(parents=True)
    X, y, _ = swapped_labels(150, seed=5)
    sizes = {"train": 100, "val": 25, "test": 25}
    rows, start = [], 0
    for name, n in sizes.items():
        Xp, yp = X[start:start + n].copy(), y[start:start + n]
        if name == "test" and leak:
            Xp[0] = X[5] * 2  # a copy of a train image
        start += n
        ids = [f"images/{name}/{yp[i]}/{i:03d}.jpg" for i in range(n)]
        for i, path in enumerate(ids):
            (prepared / path).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (i * 2 % 256, 90, 30)).save(prepared / path)
            rows.append({"path": path, "label": yp[i], "source": f"{name}/{yp[i]}/raw-{i:03d}.jpg"})
        index = torch.tensor([CLASSES.index(label) for label in yp], dtype=torch.int64)
        save_file({"pooled": torch.from_numpy(Xp), "labels": index}, str(store / f"{name}.pooled.safetensors"))
        pd.DataFrame({"path": ids, "label": yp}).to_csv(store / f"{name}.index.csv", index=False)
    (store / "manifest.json").write_text(json.dumps({"classes": CLASSES, "keep_maps": False}))
    pd.DataFrame(rows).to_csv(prepared / "manifest.csv", index=False)
    (prepared / "report.json").write_text(json.dumps({"duplicates": [["a/1.jpg", "b/1.jpg"]],
                                                      "near_duplicates": [["a/2.jpg", "a/2-small.jpg"]]}))
    return root


def run_audit(root: Path, out: str = "reports") -> dict:
    return audit(root / "features/lite", root / "prepared", root / "prepared/manifest.csv",
                 root / "prepared/report.json", AuditParams(leak_threshold=0.99),  # clusters: alike, not copies
                 root / out / "audit.json", root / out / "audit")


def test_the_audit_writes_its_findings_and_sheets_the_same_each_run(tmp_path: Path) -> None:
    root = write_project(tmp_path)
    report = run_audit(root)
    assert report == read_audit(root / "reports/audit.json")
    assert report["backbone"] == "lite" and report["duplicates"] and report["near_duplicates"]
    (leak,) = report["leaks"]
    assert leak["path"] == "images/test/" + leak["label"] + "/000.jpg" and leak["match_part"] == "train"
    assert leak["source"] == "test/" + leak["label"] + "/raw-000.jpg" and leak["similarity"] >= 0.99
    assert report["leaked_test_images"] == [leak["path"]]
    assert report["label_suspects"] and all(s["part"] in ("train", "val") for s in report["label_suspects"])
    assert report["counts"]["images"] == {"train": 100, "val": 25, "test": 25}
    sheets = [root / "reports/audit" / name for name in ("leaks.png", "label_suspects.png")]
    assert all(Image.open(p).size[0] > 100 for p in sheets)
    again = run_audit(root, "again")
    assert [p.read_bytes() for p in sheets] == [(root / "again/audit" / p.name).read_bytes() for p in sheets]
    assert json.loads((root / "again/audit.json").read_text())["leaks"] == report["leaks"]


def test_leak_sheet_shows_each_pair_side_by_side_under_its_captions(tmp_path: Path) -> None:
    from transferlab.audit.sheets import PAD, THUMB, leak_sheet

    colours = {"test/a.png": (200, 0, 0), "train/a.png": (0, 200, 0), "val/b.png": (0, 0, 200),
               "train/b.png": (200, 200, 0)}
    for name, colour in colours.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (40, 20), colour).save(tmp_path / name)  # small and wide: scaled up, kept 2:1
    leaks = [{"path": p, "part": p.split("/")[0], "label": "a", "similarity": 0.9, "match": m,
              "match_part": m.split("/")[0], "match_label": "a"}
             for p, m in [("test/a.png", "train/a.png"), ("val/b.png", "train/b.png")]]
    leak_sheet(leaks, tmp_path, tmp_path / "leaks.png", rows=5)
    sheet = Image.open(tmp_path / "leaks.png").convert("RGB")
    width, height = sheet.size[0] // 2, sheet.size[1] // 2  # two pairs: a 2 x 2 grid of cells
    assert sheet.size[1] % 2 == 0 and width >= THUMB
    for i, name in enumerate(colours):
        left, top = (i % 2) * width, (i // 2) * height
        assert sheet.getpixel((left + width // 2, top + height - PAD - THUMB // 2)) == colours[name]
        assert sheet.getpixel((left + width // 2, top + height - PAD - THUMB // 8)) == (255, 255, 255)  # 2:1 kept
        caption = np.asarray(sheet.crop((left, top, left + width, top + height - PAD - THUMB)))
        assert (caption < 100).any()  # its caption is written above it
    leak_sheet(leaks, tmp_path, tmp_path / "one.png", rows=1)
    assert Image.open(tmp_path / "one.png").size == (sheet.size[0], height)


def test_audit_prints_what_it_found_with_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_project(tmp_path)
    report = run_audit(root)
    text = format_audit(report)
    assert "a/1.jpg  ==  b/1.jpg" in text and "a/2.jpg  ==  a/2-small.jpg" in text
    assert f"data/raw/{report['leaks'][0]['source']}" in text
    assert f"#1   {report['label_suspects'][0]['part']}: data/raw/{report['label_suspects'][0]['source']}" in text
    assert cli.main(["audit", "--report", str(root / "reports/audit.json"), "--limit", "3"]) == 0
    assert "Likely leaks across split parts: 1 (1 test image(s))" in capsys.readouterr().out


def test_audit_without_a_report_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["audit", "--report", str(tmp_path / "reports/audit.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("transferlab: error:") and "run `dvc repro`" in err and err.count("\n") == 1


def test_a_missing_feature_store_is_one_clear_error(tmp_path: Path) -> None:
    root = write_project(tmp_path)
    with pytest.raises(ValueError, match="no feature store at .*other.*audit.backbone"):
        audit(root / "features/other", root / "prepared", root / "prepared/manifest.csv", root / "prepared/report.json",
              AuditParams(), root / "a.json", root / "sheets")


# ----------------------------------------------------------------------------- params


def test_audit_params_are_validated_and_the_backbone_must_be_extracted() -> None:
    with pytest.raises(ParamsError, match=r"audit\.leak_threshold: got 1\.5"):
        parse(Params, {"audit": {"leak_threshold": 1.5}})
    with pytest.raises(ParamsError, match=r"unknown key 'audit\.label_issues\.topp'; did you mean top\?"):
        parse(Params, {"audit": {"label_issues": {"topp": 3}}})
    with pytest.raises(ParamsError, match=r"audit\.backbone: got 'resnet18'; allowed: null or a name among"):
        parse(Params, {"audit": {"backbone": "resnet18"}})
    params = parse(Params, {"extract": {"backbones": ["a", "b"]}, "finetune": {"backbones": ["a"]}})
    assert params.audited_backbone() == "a"
