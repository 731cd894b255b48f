"""The report page, the champion's ONNX export and the torch-free ONNX path, after one real `dvc repro`.

One module-scoped pipeline run in a copy of the project (two quick heads, gap and knn, one fine-tuning
epoch, evaluate.tta [hflip]) serves every test here: the page in headless Chromium, ONNX parity for a
cached-feature head champion and for the fine-tuned model, prediction in a venv without torch.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from helpers import PROJECT_ROOT, copy_project, project_env, output as run
from transferlab import tracking
from transferlab.models import cam
from transferlab.models.features import load_part
from transferlab.models.heads import load_head
from transferlab.serving import registry
from transferlab.serving.onnx_export import ONNX_FILE, export_onnx
from transferlab.serving.onnx_predict import OnnxPredictor
from transferlab.serving.predictor import load_predictor, save_finetune_predictor

pytestmark = pytest.mark.slow
BACKBONE = "efficientnet_lite0"
GALLERY = 3
PARITY = 1e-4  # the bound on |p_onnx - p_torch|
CHROMIUM_S = 90
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking")
# Injected into a copy of the page: records every image's load state and any error event or console.error
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.src))), true);
const shown = console.error.bind(console);
console.error = (...a) => { window.__errors.push(a.join(" ")); shown(...a); };
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, cls: i.className, ok: i.complete && i.naturalWidth > 0}));
  const out = document.createElement("pre"); out.id = "probe";
  out.textContent = JSON.stringify({images, errors: window.__errors,
                                    figures: document.querySelectorAll("figure.loss").length});
  document.body.appendChild(out);
});
</script>"""



def _fast(params: dict) -> None:
    params["train_head"]["kinds"] = ["gap", "knn"]  # a CAM head and one without maps, both quick
    params["finetune"].update(max_epochs=1, warmup_epochs=0)
    params["evaluate"].update(tta=["hflip"], gallery=GALLERY, n_boot=100)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("report") / "project"
    env = project_env()
    copy_project(root, env, edit=_fast)
    run(["transferlab", "data", "get"], root, env)
    run(["dvc", "repro"], root, env, timeout=1500)
    return root, env


@pytest.fixture(scope="module")
def test_images(project: tuple[Path, dict[str, str]]) -> list[str]:
    root, _ = project
    split = pd.read_csv(root / "data/split.csv", dtype={"label": str}, keep_default_na=False)
    return [str(root / "data/prepared" / p) for p in split.loc[split["part"] == "test", "path"]]


def test_report_page_is_an_evaluate_output_and_artifact_with_the_runs_identity(project: tuple[Path, dict]) -> None:
    root, env = project
    page = root / "reports/index.html"
    text = page.read_text()
    evaluate = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["evaluate"]
    assert "reports/index.html" in [o if isinstance(o, str) else next(iter(o)) for o in evaluate["outs"]]
    record = json.loads((root / "reports/run.json").read_text())
    for expected in (record["parent_run_id"], record["run_id"], run(["git", "rev-parse", "HEAD"], root, env).strip()):
        assert expected in text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing fetched from elsewhere
    artifacts = [a.path for a in tracking.client(root).list_artifacts(record["run_id"])]
    assert "index.html" in artifacts
    assert run(["transferlab", "report"], root, env).strip() == str(page.resolve())
    # TTA: a "+tta" row beside each plain model (all three give probabilities), the plain rows kept
    table = pd.read_csv(root / "reports/comparison.csv")
    plain = [m for m in table["model"] if not m.endswith("+tta")]
    assert sorted(plain) == sorted(f"{BACKBONE}-{m}" for m in ("gap", "knn", "finetune"))
    assert sorted(table["model"]) == sorted(plain + [f"{m}+tta" for m in plain])


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    return found


def test_report_renders_in_headless_chromium(project: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = project
    browser, page = _chromium(), root / "reports/index.html"
    shot = tmp_path / "report.png"
    done = subprocess.run([browser, *CHROMIUM_FLAGS, "--hide-scrollbars", "--window-size=1400,4000",
                           f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=CHROMIUM_S)
    assert done.returncode == 0, done.stderr
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (4000, 1400) and pixels.std() > 10  # drawn, not blank
    probed = tmp_path / "probed.html"  # the page plus the probe, beside nothing: still self-contained
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    done = subprocess.run([browser, *CHROMIUM_FLAGS, "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                          capture_output=True, text=True, timeout=CHROMIUM_S)
    assert done.returncode == 0, done.stderr
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stdout[-2000:]
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["errors"] == []
    assert [line for line in done.stderr.splitlines() if "CONSOLE" in line] == []  # the page logs nothing
    assert probe["images"] and all(i["ok"] for i in probe["images"]), [i for i in probe["images"] if not i["ok"]]
    models = len(pd.read_csv(root / "reports/comparison.csv").query("~model.str.endswith('+tta')"))
    assert probe["figures"] == models * GALLERY  # the gallery: GALLERY images per plain model
    cams = [i["alt"] for i in probe["images"] if i["cls"] == "cam"]
    assert any(a.startswith("CAM ") for a in cams) and any(a.startswith("Grad-CAM ") for a in cams)


def test_onnx_champion_and_fine_tuned_model_match_pytorch(project: tuple[Path, dict], test_images: list[str],
                                                          tmp_path: Path) -> None:
    root, _ = project
    champion = root / "models/champion"
    assert json.loads((champion / "predictor.json").read_text())["kind"] == "head"  # gap: the cached-feature head
    finetuned = tmp_path / "finetuned"
    save_finetune_predictor(root / "models/finetune" / BACKBONE, finetuned)
    for predictor_dir, onnx_file in ((champion, champion / ONNX_FILE),
                                     (finetuned, export_onnx(finetuned, tmp_path / "finetune.onnx"))):
        expected = load_predictor(predictor_dir).classify(test_images).proba
        proba, errors = OnnxPredictor(onnx_file).classify(test_images)
        diff = float(np.abs(proba - expected).max())
        print(f"ONNX parity {predictor_dir.name}: max |p_onnx - p_torch| = {diff:.2e} over {len(test_images)} images")
        assert errors == [None] * len(test_images)
        assert diff <= PARITY
        assert (proba.argmax(axis=1) == expected.argmax(axis=1)).all()
    # the registered champion carries the same file
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        logged = registry.load_champion("transferlab", root).unwrap_python_model().predictor_dir
    assert (Path(logged) / ONNX_FILE).read_bytes() == (champion / ONNX_FILE).read_bytes()


def test_gap_cam_of_a_test_image_is_the_class_weighted_sum_of_its_cached_maps(project: tuple[Path, dict]) -> None:
    root, _ = project
    head = load_head(root / "models/heads" / BACKBONE / "gap/model.safetensors")
    part = load_part(root / "data/features" / BACKBONE, "test", need_maps=True)
    weights = head.torch_module().fc.weight.detach().numpy()
    maps = np.asarray(part.maps[0], dtype=np.float32)
    for k in range(len(head.classes_)):
        np.testing.assert_allclose(cam.gap_cam(head, maps, k), np.tensordot(weights[k], maps, axes=1),
                                   rtol=1e-5, atol=1e-4)


def _distributions(*names: str) -> set[str]:
    """``names`` and what they require (extras and markers aside), as installed here."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        todo += [re.split(r"[ ;<>=!~\[(]", r)[0] for r in dist.requires or [] if "extra ==" not in r]
    return seen


def test_onnx_predict_runs_in_a_venv_without_torch(project: tuple[Path, dict], test_images: list[str],
                                                   tmp_path: Path) -> None:
    """A fresh venv given only onnxruntime, numpy and pillow (and what they require) plus this package's source."""
    root, _ = project
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    packages = tmp_path / "packages"  # the installed files of exactly those distributions, linked
    packages.mkdir()
    wanted = _distributions("onnxruntime", "numpy", "pillow")
    assert "torch" not in wanted
    for name in wanted:
        dist = distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "bin"}:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (packages / top).exists():
                (packages / top).symlink_to(source)
    (site / "deps.pth").write_text(f"{packages}\n{PROJECT_ROOT / 'src'}\n")
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    out = tmp_path / "onnx.csv"
    done = subprocess.run([python, "-m", "transferlab", "predict", *test_images, "--model",
                           str(root / "models/champion" / ONNX_FILE), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out)
    expected = load_predictor(root / "models/champion").classify(test_images).proba
    assert np.abs(table.filter(like="p_").to_numpy() - expected).max() <= PARITY
    assert list(table["error"].isna()) == [True] * len(test_images)
