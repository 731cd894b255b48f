from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For modules of tiny tensors, where thread hand-offs dominate.

    On a shared 2-core machine spin-waiting makes 2 threads up to ~10x slower than 1.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def tracked_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder whose MLflow store is its own mlruns/ (no server, no DVC experiment), one execution id."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("TRANSFERLAB_EXECUTION", "exec-1")
    (tmp_path / "params.yaml").write_text("split: {seed: 1}\n")
    return tmp_path
