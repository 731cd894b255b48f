"""The library's folders are its architecture: imports run one way, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "transferlab"
MAX_LINES = 400
# package -> packages of transferlab it must never import
FORBIDDEN = {
    "data": ("models", "training", "evaluation", "serving", "tracking", "cli", "preflight", "audit"),
    "models": ("training", "evaluation", "serving", "tracking", "cli", "preflight", "audit"),
    "audit": ("training", "evaluation", "serving", "tracking", "cli", "preflight"),
    "training": ("evaluation", "serving", "tracking", "cli", "preflight"),
    "evaluation": ("serving", "tracking", "cli", "preflight"),
    "tracking": ("serving", "data", "models", "training", "evaluation", "cli", "preflight"),
    "serving": ("training", "evaluation", "cli", "preflight"),
    "distributed": ("data", "models", "training", "evaluation", "serving", "tracking", "cli", "preflight", "audit"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _library_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_small(path: Path) -> None:
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES


def test_imports_run_one_way() -> None:
    problems = []
    for path in _library_files():
        rel = path.relative_to(PACKAGE)
        imports = _imports(path)
        if any(name == "pipeline" or name.startswith("pipeline.") for name in imports):
            problems.append(f"{rel} imports pipeline/")
        package = rel.parts[0] if len(rel.parts) > 1 else None
        for banned in FORBIDDEN.get(package or "", ()):
            hits = sorted(n for n in imports if n == f"transferlab.{banned}" or n.startswith(f"transferlab.{banned}."))
            if hits:
                problems.append(f"{rel} imports {', '.join(hits)}")
    assert problems == []


def test_benchmarks_import_no_test_code() -> None:
    for path in sorted((ROOT / "bench").glob("*.py")):
        imports = _imports(path)
        assert not imports & {"helpers", "conftest"}, path.name
        assert '/ "tests"' not in path.read_text(encoding="utf-8"), f"{path.name} puts tests/ on sys.path"


# Each stage is a fresh process that pays for its imports (a few seconds each for torchvision and
# timm on 2 cores): the heads' stage reads cached tensors and must not pay for backbone libraries.
LIGHT_STAGES = {"pipeline/train_head.py": ("torchvision", "timm")}


@pytest.mark.parametrize("script", sorted(LIGHT_STAGES))
def test_light_stages_skip_heavy_imports(script: str) -> None:
    import subprocess
    import sys

    # a fresh interpreter: this one may have imported everything already
    probe = (f"import runpy, sys; sys.argv = [{script!r}]; "
             f"runpy.run_path({script!r}, run_name='probe'); "
             f"print(sorted(m for m in {LIGHT_STAGES[script]!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# A stage starts its tracker (tracking.start: MLflow opens in a helper process) before it pays for torch,
# scikit-learn or MLflow, so the two run side by side on two cores. evaluate keeps MLflow in-process
# (it registers the champion through MLflow's fluent API) and preflight never opens the store.
TRACKED_STAGES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "pipeline").glob("*.py")
                        if p.stem not in ("evaluate", "preflight"))


@pytest.mark.parametrize("script", TRACKED_STAGES)
def test_stages_start_their_tracker_before_heavy_imports(script: str) -> None:
    import subprocess
    import sys

    heavy = ("torch", "sklearn", "mlflow", "pandas")
    probe = (f"import runpy, sys; sys.argv = [{script!r}]; "
             f"runpy.run_path({script!r}, run_name='probe'); "
             f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert "tracking.start(" in (ROOT / script).read_text(encoding="utf-8")
