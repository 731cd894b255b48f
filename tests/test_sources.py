import functools
import http.server
import io
import socket
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

from helpers import find_hymenoptera
from transferlab import cli
from transferlab.data import sources
from transferlab.io import sha256_file
from transferlab.data.sources import Limits, SourceError, check_layout, get_source

SHARED_HYMENOPTERA = find_hymenoptera()


def png_bytes(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4), value).save(buf, format="PNG")
    return buf.getvalue()


def dataset_members(top: str = "pets/") -> dict[str, bytes]:
    """A two-class dataset wrapped in one top folder, plus archiver noise to ignore."""
    members = {f"{top}{cls}/{i}.png": png_bytes(i) for cls in ("cat", "dog") for i in range(3)}
    members[f"{top}.DS_Store"] = b"junk"
    members["__MACOSX/._pets"] = b"junk"
    return members


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def make_tar(path: Path, members: dict[str, bytes], gz: bool = True) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def add_tar_link(path: Path, name: str, kind: bytes, target: str) -> Path:
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("data/cat/a.png")
        data = png_bytes()
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(name)
        link.type = kind
        link.linkname = target
        tf.addfile(link)
    return path


def assert_pets(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["cat", "dog"]
    assert check_layout(out) == {"cat": 3, "dog": 3}
    assert (out / "dog" / "2.png").read_bytes() == png_bytes(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- builtins --------------------------------------------------------------------------------


def test_lfw_faces_builtin(tmp_path: Path) -> None:
    out = get_source("builtin:lfw-faces", tmp_path / "raw")
    assert sorted(p.name for p in out.iterdir()) == ["faces", "non_faces"]
    for cls in ("faces", "non_faces"):
        files = sorted((out / cls).glob("*.png"))
        assert len(files) == 100
        pixels = []
        for f in files:
            with Image.open(f) as im:
                assert im.size == (25, 25) and im.mode == "L"
                pixels.append(np.asarray(im))
        assert np.max(pixels) > 200  # scaled to 0..255, not left at 0..1
    assert (out / "faces" / "face_000.png").exists() and (out / "non_faces" / "non_face_099.png").exists()


def test_lfw_faces_order_matches_docstring(tmp_path: Path) -> None:
    from skimage.data import lfw_subset

    out = get_source("builtin:lfw-faces", tmp_path / "raw")
    first_non_face = lfw_subset()[100]
    with Image.open(out / "non_faces" / "non_face_000.png") as im:
        assert np.abs(np.asarray(im) / 255.0 - first_non_face).max() < 1 / 255


def test_digits_builtin(tmp_path: Path) -> None:
    out = get_source("builtin:digits", tmp_path / "raw")
    counts = check_layout(out)
    assert sorted(counts) == [str(d) for d in range(10)]
    assert sum(counts.values()) == 1797
    with Image.open(next((out / "0").glob("*.png"))) as im:
        pixels = np.asarray(im)
    assert im.size == (8, 8) and pixels.max() == 255 and pixels.min() == 0


def test_unknown_builtin_and_sha256_on_builtin(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="builtin:lfw-faces"):
        get_source("builtin:nope", tmp_path / "raw")
    with pytest.raises(SourceError, match="sha256"):
        get_source("builtin:digits", tmp_path / "raw", sha256="0" * 64)
    assert not (tmp_path / "raw").exists()


# --- local archives --------------------------------------------------------------------------


def test_zip_extracts_and_strips_top_folder(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "pets.zip", dataset_members())
    assert_pets(get_source(str(archive), tmp_path / "raw"))


@pytest.mark.parametrize("name", ["pets.tar.gz", "pets.tgz", "pets.tar"])
def test_tar_extracts_and_strips_top_folder(tmp_path: Path, name: str) -> None:
    archive = make_tar(tmp_path / name, dataset_members("./pets/"), gz=not name.endswith(".tar"))
    assert_pets(get_source(str(archive), tmp_path / "raw"))


def test_split_layout_kept(tmp_path: Path) -> None:
    members = {f"d/{part}/{cls}/0.png": png_bytes() for part in ("train", "val") for cls in ("a", "b")}
    out = get_source(str(make_zip(tmp_path / "d.zip", members)), tmp_path / "raw")
    assert check_layout(out) == {"train/a": 1, "train/b": 1, "val/a": 1, "val/b": 1}


def test_sha256_match_and_mismatch(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "pets.zip", dataset_members())
    digest = sha256_file(archive)
    assert_pets(get_source(str(archive), tmp_path / "ok", sha256=digest.upper()))
    with pytest.raises(SourceError, match="sha256 mismatch") as err:
        get_source(str(archive), tmp_path / "bad", sha256="f" * 64)
    assert digest in str(err.value)
    assert not (tmp_path / "bad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "pets.zip"]  # no scratch left behind


def test_malformed_sha256_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "pets.zip", dataset_members())
    with pytest.raises(SourceError, match="64 hexadecimal"):
        get_source(str(archive), tmp_path / "raw", sha256="abc")


def test_corrupt_archive_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(SourceError, match="not a readable zip"):
        get_source(str(bad), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


# --- malicious archives ----------------------------------------------------------------------


def assert_refused(archive: Path, out: Path, member: str, limits: Limits = Limits()) -> None:
    with pytest.raises(SourceError) as err:
        get_source(str(archive), out, limits=limits)
    assert repr(member) in str(err.value)
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_zip_path_traversal_refused(tmp_path: Path) -> None:
    members = dataset_members("")
    members["../evil.png"] = png_bytes()
    archive = make_zip(tmp_path / "evil.zip", members)
    assert_refused(archive, tmp_path / "raw", "../evil.png")
    assert not (tmp_path / "evil.png").exists()


def test_zip_nested_traversal_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "evil.zip", {"cat/a.png": png_bytes(), "cat/../../evil.png": png_bytes()})
    assert_refused(archive, tmp_path / "raw", "cat/../../evil.png")


def test_zip_absolute_path_refused(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "evil.png"
    archive = make_zip(tmp_path / "evil.zip", {"cat/a.png": png_bytes(), str(target): png_bytes()})
    with zipfile.ZipFile(archive) as zf:
        assert zf.namelist()[1].startswith("/")  # the archive really holds an absolute name
    assert_refused(archive, tmp_path / "raw", str(target))
    assert not target.exists()


def test_zip_symlink_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cat/a.png", png_bytes())
        info = zipfile.ZipInfo("cat/b.png")
        info.external_attr = (0o120777) << 16  # a unix symlink entry
        zf.writestr(info, "/etc/passwd")
    assert_refused(archive, tmp_path / "raw", "cat/b.png")


def test_tar_symlink_refused(tmp_path: Path) -> None:
    archive = add_tar_link(tmp_path / "link.tar", "data/cat/b.png", tarfile.SYMTYPE, "/etc/passwd")
    assert_refused(archive, tmp_path / "raw", "data/cat/b.png")


def test_tar_hardlink_refused(tmp_path: Path) -> None:
    archive = add_tar_link(tmp_path / "link.tar", "data/cat/b.png", tarfile.LNKTYPE, "data/cat/a.png")
    assert_refused(archive, tmp_path / "raw", "data/cat/b.png")


def test_tar_device_refused(tmp_path: Path) -> None:
    archive = add_tar_link(tmp_path / "dev.tar", "data/cat/null", tarfile.CHRTYPE, "")
    assert_refused(archive, tmp_path / "raw", "data/cat/null")


def test_tar_absolute_path_refused(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "abs.tar.gz", {"cat/a.png": png_bytes(), "/tmp/evil.png": png_bytes()})
    assert_refused(archive, tmp_path / "raw", "/tmp/evil.png")


@pytest.mark.parametrize("maker", [make_zip, make_tar])
def test_oversized_member_refused(tmp_path: Path, maker: Callable[[Path, dict[str, bytes]], Path]) -> None:
    members = dataset_members("")
    members["cat/big.png"] = b"\0" * 10_000
    archive = maker(tmp_path / ("big.zip" if maker is make_zip else "big.tar.gz"), members)
    assert_refused(archive, tmp_path / "raw", "cat/big.png", Limits(member_bytes=5_000))
    # the same archive passes with the default limits
    assert check_layout(get_source(str(archive), tmp_path / "ok")) == {"cat": 4, "dog": 3}


def test_total_size_limit_refused(tmp_path: Path) -> None:
    members = {f"cat/{i}.png": b"\0" * 1_000 for i in range(5)}
    archive = make_zip(tmp_path / "many.zip", members)
    assert_refused(archive, tmp_path / "raw", "cat/3.png", Limits(member_bytes=2_000, total_bytes=3_500))


def test_written_bytes_are_counted_not_only_declared(tmp_path: Path) -> None:
    # a member whose header understates its size must still be stopped while copying
    src = io.BytesIO(b"\0" * 10_000)
    with pytest.raises(SourceError, match="per-member limit"):
        sources._copy_capped(
            tmp_path / "a.zip", "x.png", src, tmp_path / "x.png", Limits(member_bytes=5_000), sources._Budget(10**9)
        )


# --- downloads -------------------------------------------------------------------------------


def test_http_url(tmp_path: Path, http_dir: tuple[str, Path]) -> None:
    base, served = http_dir
    archive = make_zip(served / "pets.zip", dataset_members())
    out = get_source(f"{base}/pets.zip", tmp_path / "raw", sha256=sha256_file(archive))
    assert_pets(out)


def test_http_url_without_archive_suffix_is_sniffed(tmp_path: Path, http_dir: tuple[str, Path]) -> None:
    base, served = http_dir
    make_tar(served / "download", dataset_members())
    assert_pets(get_source(f"{base}/download", tmp_path / "raw"))


def test_http_404_and_download_cap(tmp_path: Path, http_dir: tuple[str, Path]) -> None:
    base, served = http_dir
    with pytest.raises(SourceError, match="HTTP 404"):
        get_source(f"{base}/missing.zip", tmp_path / "raw")
    make_zip(served / "pets.zip", dataset_members())
    with pytest.raises(SourceError, match="download limit"):
        get_source(f"{base}/pets.zip", tmp_path / "raw", limits=Limits(download_bytes=100))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]


def test_unreachable_url_explains_local_copy(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/x.zip"
    with pytest.raises(SourceError) as err:
        get_source(url, tmp_path / "raw")
    msg = str(err.value)
    assert f"could not download {url}" in msg
    assert "transferlab data get /path/to/x.zip" in msg
    assert not (tmp_path / "raw").exists()


def test_hymenoptera_offline_explains_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "HYMENOPTERA_URL", f"http://127.0.0.1:{free_port()}/hymenoptera_data.zip")
    with pytest.raises(SourceError) as err:
        get_source("hymenoptera", tmp_path / "raw")
    msg = str(err.value)
    assert "could not download" in msg
    assert "transferlab data get /path/to/hymenoptera_data.zip" in msg
    assert "transferlab data get /path/to/hymenoptera_data`" in msg
    assert not (tmp_path / "raw").exists()


def test_hymenoptera_counts_checked(
    tmp_path: Path, http_dir: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, served = http_dir
    members = {f"hymenoptera_data/{f}/{i}.jpg": b"jpeg" for f in sources.HYMENOPTERA_COUNTS for i in range(2)}
    make_zip(served / "hymenoptera_data.zip", members)
    monkeypatch.setattr(sources, "HYMENOPTERA_URL", f"{base}/hymenoptera_data.zip")
    with pytest.raises(SourceError, match="train/ants: 2 JPEGs, expected 123"):
        get_source("hymenoptera", tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


@pytest.mark.skipif(SHARED_HYMENOPTERA is None, reason="no local copy of hymenoptera")
def test_hymenoptera_counts_match_local_copy() -> None:
    assert SHARED_HYMENOPTERA is not None
    sources.verify_hymenoptera(SHARED_HYMENOPTERA)  # the stray .gif is not counted


# --- local folders, layout, target -----------------------------------------------------------


def make_folder(root: Path) -> Path:
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.png").write_bytes(png_bytes(i))
    (root / ".hidden").write_text("x")
    return root


def test_local_folder_copied(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    (src / "cat").chmod(0o555)  # a read-only shared copy still gives a replaceable target
    try:
        out = get_source(str(src), tmp_path / "raw")
        assert_pets(out)
        assert not (out / ".hidden").exists()
        assert not any(p.is_symlink() for p in out.rglob("*"))
        (src / "dog" / "0.png").write_bytes(b"changed")
        assert (out / "dog" / "0.png").read_bytes() == png_bytes(0)  # a copy, not a link
        get_source("builtin:digits", out, force=True)
    finally:
        (src / "cat").chmod(0o755)


@pytest.mark.parametrize(
    "files, problem",
    [
        (["a.png", "b.png"], "images directly in the top level"),
        (["cat/notes.txt", "dog/a.png"], "class folder cat has no images"),
        (["train/a.png"], "images directly in train"),
        (["train/cat/a.png", "cat/b.png"], "mixed with others"),
    ],
)
def test_bad_layout_refused(tmp_path: Path, files: list[str], problem: str) -> None:
    src = tmp_path / "src"
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(png_bytes())
    with pytest.raises(SourceError) as err:
        get_source(str(src), tmp_path / "raw")
    assert problem in str(err.value)
    assert "root/{train,val,test}/<class>/<images>" in str(err.value)
    assert not (tmp_path / "raw").exists()


def test_existing_target_refused_without_force(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SourceError, match="--force"):
        get_source("builtin:digits", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    get_source("builtin:digits", out, force=True)
    assert not (out / "keep.txt").exists() and len(check_layout(out)) == 10


def test_failed_force_keeps_old_target(tmp_path: Path) -> None:
    out = get_source("builtin:lfw-faces", tmp_path / "raw")
    with pytest.raises(SourceError):
        get_source(f"http://127.0.0.1:{free_port()}/x.zip", out, force=True)
    assert check_layout(out) == {"faces": 100, "non_faces": 100}


def test_empty_target_is_filled(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    assert len(check_layout(get_source("builtin:digits", tmp_path / "raw"))) == 10


def test_output_inside_source_refused(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src")
    with pytest.raises(SourceError, match="inside the source"):
        get_source(str(src), src / "raw")


# --- CLI -------------------------------------------------------------------------------------


def test_cli_data_get(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "raw"
    assert cli.main(["data", "get", "builtin:digits", "--out", str(out)]) == 0
    assert "1797 images" in capsys.readouterr().out
    assert sum(check_layout(out).values()) == 1797


def test_cli_bad_source_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["data", "get", str(tmp_path / "nowhere"), "--out", str(tmp_path / "raw")])
    captured = capsys.readouterr()
    assert code == 2
    assert "unknown source" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_existing_target_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "raw"
    assert cli.main(["data", "get", "builtin:lfw-faces", "--out", str(out)]) == 0
    assert cli.main(["data", "get", "builtin:lfw-faces", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["data", "get", "builtin:digits", "--out", str(out), "--force"]) == 0


def test_cli_source_defaults_from_params(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  source: builtin:digits\n  sha256: null\n")
    out = tmp_path / "raw"
    assert cli.main(["data", "get", "--out", str(out), "--params", str(params)]) == 0
    assert len(check_layout(out)) == 10
