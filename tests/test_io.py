"""Atomic outputs: never half-written, and a killed writer's leftovers removed by the next run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from transferlab import io


def _killed_writer(target: Path, kind: str) -> None:
    """Run an atomic writer in a child process and SIGKILL it mid-write."""
    code = (
        "import os, signal, sys; from transferlab import io\n"
        f"with io.{kind}(sys.argv[1]) as tmp:\n"
        "    (tmp / 'part.npy' if tmp.is_dir() else tmp).write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True)
    assert done.returncode == -9


@pytest.mark.parametrize("kind", ["atomic_dir", "atomic_path"])
def test_next_writer_removes_a_killed_writers_debris(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "features" / "efficientnet_lite0"
    target.parent.mkdir()
    _killed_writer(target, kind)
    debris = [p.name for p in target.parent.iterdir()]
    assert len(debris) == 1 and debris[0].startswith(".efficientnet_lite0.")
    assert not target.exists()

    with getattr(io, kind)(target) as tmp:
        if tmp.is_dir():
            (tmp / "ok").write_text("done")
        else:
            tmp.write_text("done")
    assert [p.name for p in target.parent.iterdir()] == ["efficientnet_lite0"]


def test_live_writers_and_other_targets_are_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "raw"
    live = tmp_path / f".raw.{os.getpid()}.abc"  # this process is alive
    other = tmp_path / ".raw.get.xyz"  # another target's temporary (raw.get), not ours
    dead_other = tmp_path / ".rawer.999999999.q"  # a different target altogether
    for path in (live, other, dead_other):
        path.mkdir()
    assert io.remove_stale_temps(target) == []
    assert live.exists() and other.exists() and dead_other.exists()


def test_failed_write_leaves_old_output_untouched(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
