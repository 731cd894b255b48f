"""The CLI's user errors: one line on stderr, exit code 2; the one image-suffix set."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from transferlab import cli
from transferlab.errors import EXIT_USER_ERROR


def _folder(root: Path, suffixes: dict[str, str]) -> Path:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i, (suffix, mode) in enumerate(suffixes.items()):
            Image.new(mode, (8, 8), 40 * i).save(root / cls / f"{i}{suffix}")
    return root


def test_data_get_takes_what_ingest_reads_and_warns_of_what_it_rejects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _folder(tmp_path / "src", {".pgm": "L", ".ppm": "RGB", ".gif": "P"})
    out = tmp_path / "raw"
    rc = cli.main(["data", "get", str(src), "--out", str(out), "--params", str(tmp_path / "none.yaml"), "--no-dvc"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "4 images in 2 folders" in text  # .pgm and .ppm count, as ingest reads them
    assert "ingest will reject 2 file(s) for their type (2 .gif" in text


def test_data_get_refuses_a_folder_of_only_unreadable_types(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _folder(tmp_path / "src", {".gif": "P"})
    rc = cli.main(["data", "get", str(src), "--out", str(tmp_path / "raw"), "--no-dvc"])
    assert rc == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("transferlab: error: ") and err.count("\n") == 1
    assert not (tmp_path / "raw").exists()


def test_data_get_tracks_the_dataset_with_dvc_inside_a_project(tmp_path: Path) -> None:
    """Queued experiments see only what git and DVC track: `data get` dvc-adds data/raw and stages the .dvc file."""
    project = tmp_path / "project"
    project.mkdir()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("DVC_ROOT", None)
    run = lambda *cmd: subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run(str(bin_dir / "dvc"), "init", "-q")
    run(str(bin_dir / "dvc"), "config", "core.autostage", "true")
    env.update({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t"})
    run("git", "commit", "-qam", "init")
    src = _folder(tmp_path / "src", {".png": "RGB"})
    (project / "notes.txt").write_text("the user's own staged work\n")
    run("git", "add", "notes.txt")
    done = run(str(bin_dir / "transferlab"), "data", "get", str(src))
    assert "tracked with DVC and committed" in done.stdout
    assert (project / "data" / "raw.dvc").exists()
    # committed (a workspace `dvc exp run` would unstage a merely staged file); the user's staged work stays staged
    assert "data/raw.dvc" in run("git", "show", "--name-only", "--format=", "HEAD").stdout.split()
    assert run("git", "diff", "--cached", "--name-only").stdout.split() == ["notes.txt"]


@pytest.mark.parametrize("argv, needle", [
    (["compare", "--last", "0"], "--last must be at least 1, got 0"),
    (["compare", "--last", "-1"], "--last must be at least 1, got -1"),
])
def test_compare_refuses_a_bad_count(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == EXIT_USER_ERROR
    assert needle in capsys.readouterr().err


def test_compare_names_a_missing_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from transferlab import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TRANSFERLAB_EXECUTION", "exec-cli")
    (tmp_path / "params.yaml").write_text("split: {seed: 1}\n")
    with tracking.stage_run("evaluate", {}, tmp_path / "r.json", root=tmp_path):
        pass
    assert cli.main(["compare", "--root", str(tmp_path), "--exp", "nosuch"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "'nosuch'" in err and "reached evaluate" in err


def test_compare_against_unreachable_server_is_one_line_rc_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-m", "transferlab.cli", "compare"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_USER_ERROR
    assert done.stderr.count("\n") == 1 and "http://127.0.0.1:9" in done.stderr
