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
    "data": ("models", "training", "evaluation", "serving", "tracking", "cli", "preflight"),
    "models": ("training", "evaluation", "serving", "tracking", "cli", "preflight"),
    "training": ("evaluation", "serving", "tracking", "cli", "preflight"),
    "evaluation": ("serving", "tracking", "cli", "preflight"),
    "tracking": ("serving", "data", "models", "training", "evaluation", "cli", "preflight"),
    "serving": ("training", "evaluation", "cli", "preflight"),
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
