"""Safe extraction of zip and tar archives from untrusted sources (and plain copies of folders).

Members are written by hand rather than with ``extractall``: each one is
checked first (no ``..``, no absolute path, no NUL byte, no links, device files
or FIFOs, size caps on the declared sizes and on the bytes actually written)
and only regular files and folders are ever created. For tar archives Python's
own ``tarfile.data_filter`` (3.11.4+, PEP 706) judges every member as well; on
older Pythons the hand-made checks alone apply. The hand-made checks stay
either way: they give one clear message per refusal and enforce the size caps.

A refusal raises :class:`SourceError` and writes nothing the caller keeps:
``sources.get_source`` extracts into scratch space and renames into place only
at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Optional

from transferlab.errors import UserError
from transferlab.io import CHUNK

MiB = 1 << 20
GiB = 1 << 30

# Caps: far above any sane image dataset for this tool, far below what would fill a disk.
MAX_DOWNLOAD_BYTES = 4 * GiB
MAX_MEMBER_BYTES = 512 * MiB
MAX_TOTAL_BYTES = 16 * GiB
MAX_MEMBERS = 1_000_000

ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
IGNORED_NAMES = frozenset({"__MACOSX"})

# Python >= 3.11.4 / 3.12: the standard library's "data" extraction filter (PEP 706).
TarFilter = Callable[[tarfile.TarInfo, str], Optional[tarfile.TarInfo]]
TAR_DATA_FILTER: TarFilter | None = getattr(tarfile, "data_filter", None)


class SourceError(UserError):
    """A dataset source could not be fetched, verified, extracted safely or recognised."""


@dataclass(frozen=True)
class Limits:
    """Size caps for downloads and archive extraction (bytes, except ``members``)."""

    member_bytes: int = MAX_MEMBER_BYTES
    total_bytes: int = MAX_TOTAL_BYTES
    members: int = MAX_MEMBERS
    download_bytes: int = MAX_DOWNLOAD_BYTES


DEFAULT_LIMITS = Limits()


def is_ignored(name: str) -> bool:
    """Dotfiles and macOS resource folders are archiver noise, never dataset content."""
    return name.startswith(".") or name in IGNORED_NAMES


def extract_archive(archive: Path, dest: Path, limits: Limits = DEFAULT_LIMITS) -> None:
    """Extract a zip or tar archive into ``dest``, refusing any unsafe or oversized member."""
    kind = _archive_kind(archive)
    try:
        if kind == "zip":
            _extract_zip(archive, dest, limits)
        else:
            _extract_tar(archive, dest, limits)
    except SourceError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise SourceError(f"{archive.name} is not a readable {kind} archive: {exc}") from exc
    except OSError as exc:
        raise SourceError(f"could not extract {archive.name}: {exc}") from exc


def _archive_kind(archive: Path) -> str:
    name = archive.name.lower()
    if name.endswith(ZIP_SUFFIXES):
        return "zip"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    # URLs often hide the type (…/download?id=…): fall back to the content
    if zipfile.is_zipfile(archive):
        return "zip"
    if tarfile.is_tarfile(archive):
        return "tar"
    raise SourceError(
        f"{archive.name} is neither a zip nor a tar archive (accepted: {', '.join(ZIP_SUFFIXES + TAR_SUFFIXES)})"
    )


def copy_tree(src: Path, dest: Path) -> None:
    """Copy the folder ``src`` into the existing folder ``dest``: file contents only, links followed.

    The folder-source counterpart of :func:`extract_archive`. Permissions are not
    copied, so a read-only source (a shared dataset) gives a writable
    ``data/raw`` that can later be replaced.
    """
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop would otherwise recurse forever
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(d))
        target = dest / Path(dirpath).relative_to(src)
        target.mkdir(exist_ok=True)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            # dangling links, sockets and FIFOs are not images
            if not is_ignored(name) and path.is_file():
                shutil.copyfile(path, target / name)


# --- member checks -------------------------------------------------------------------------


def _refuse(archive: Path, member: str, reason: str) -> SourceError:
    return SourceError(f"refusing {archive.name}: member {member!r} {reason}; nothing was written")


def _member_path(archive: Path, name: str) -> PurePosixPath | None:
    """The member's safe relative path, or None for entries to skip (folders' own '.', dotfiles)."""
    if "\x00" in name:
        raise _refuse(archive, name, "has a NUL byte in its name")
    # backslashes are separators to Windows tools: judge the name as they would read it
    posix = name.replace("\\", "/")
    if posix.startswith("/") or WINDOWS_DRIVE.match(posix):
        raise _refuse(archive, name, "has an absolute path")
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(archive, name, "points outside the extraction folder (..)")
    if not parts or any(is_ignored(p) for p in parts):
        return None
    return PurePosixPath(*parts)


def _target(archive: Path, dest: Path, name: str, rel: PurePosixPath) -> Path:
    path = dest.joinpath(*rel.parts)
    # defence in depth: nothing above should let a path escape, but a check is cheap
    if not path.resolve().is_relative_to(dest.resolve()):
        raise _refuse(archive, name, "points outside the extraction folder")
    return path


@dataclass
class _Budget:
    """Bytes still allowed across the whole archive, spent as members are written."""

    left: int


def _copy_capped(archive: Path, name: str, src: IO[bytes], path: Path, limits: Limits, budget: _Budget) -> None:
    # declared sizes can lie (zip bombs): count what is actually written too
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "wb") as fh:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > limits.member_bytes:
                raise _refuse(archive, name, f"is larger than the per-member limit of {limits.member_bytes} bytes")
            if written > budget.left:
                raise _refuse(archive, name, f"takes the archive over the total limit of {limits.total_bytes} bytes")
            fh.write(chunk)
    budget.left -= written


def _check_declared(archive: Path, name: str, size: int, limits: Limits, budget: _Budget) -> None:
    if size > limits.member_bytes:
        raise _refuse(archive, name, f"is {size} bytes, over the per-member limit of {limits.member_bytes} bytes")
    if size > budget.left:
        raise _refuse(archive, name, f"takes the archive over the total limit of {limits.total_bytes} bytes")
    budget.left -= size


# --- zip -----------------------------------------------------------------------------------


def _check_zip_member(archive: Path, info: zipfile.ZipInfo) -> None:
    # the unix file type, when the archiver recorded one; many record permissions only (type 0)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise _refuse(archive, info.filename, "is a symlink")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _refuse(archive, info.filename, "is a device or special file")


def _extract_zip(archive: Path, dest: Path, limits: Limits) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > limits.members:
            raise SourceError(f"refusing {archive.name}: {len(infos)} members, over the limit of {limits.members}")
        # the central directory lists everything up front: refuse before writing a byte
        declared = _Budget(limits.total_bytes)
        planned = []
        for info in infos:
            rel = _member_path(archive, info.filename)
            _check_zip_member(archive, info)
            _check_declared(archive, info.filename, info.file_size, limits, declared)
            if rel is not None:
                planned.append((info, _target(archive, dest, info.filename, rel)))
        written = _Budget(limits.total_bytes)
        for info, path in planned:
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
            else:
                with zf.open(info) as src:
                    _copy_capped(archive, info.filename, src, path, limits, written)


# --- tar -----------------------------------------------------------------------------------


def _check_tar_member(archive: Path, member: tarfile.TarInfo, dest: Path,
                      data_filter: TarFilter | None = TAR_DATA_FILTER) -> None:
    """Our checks first (their messages are clearer), then the standard library's data filter."""
    if member.issym():
        raise _refuse(archive, member.name, f"is a symlink (to {member.linkname!r})")
    if member.islnk():
        raise _refuse(archive, member.name, f"is a hardlink (to {member.linkname!r})")
    if member.isdev():
        raise _refuse(archive, member.name, "is a device file or FIFO")
    if not (member.isfile() or member.isdir()):
        raise _refuse(archive, member.name, "is not a regular file or folder")
    if data_filter is None:  # Python < 3.11.4: the checks above are the whole defence
        return
    try:
        filtered = data_filter(member, str(dest))
    except tarfile.FilterError as exc:
        raise _refuse(archive, member.name, f"is unsafe ({exc})") from exc
    if filtered is None:  # the filter asked to skip it: never write what it would not
        raise _refuse(archive, member.name, "is refused by tarfile's data filter")


def _extract_tar(archive: Path, dest: Path, limits: Limits) -> None:
    declared = _Budget(limits.total_bytes)
    written = _Budget(limits.total_bytes)
    with tarfile.open(archive, "r:*") as tf:
        # iterate rather than getmembers(): a header bomb must not be loaded into memory first
        for count, member in enumerate(tf, start=1):
            if count > limits.members:
                raise SourceError(f"refusing {archive.name}: more than {limits.members} members")
            rel = _member_path(archive, member.name)
            _check_tar_member(archive, member, dest)
            _check_declared(archive, member.name, member.size, limits, declared)
            if rel is None:
                continue
            path = _target(archive, dest, member.name, rel)
            if member.isdir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            # member contents are streamed through our size caps; permissions are never copied
            src = tf.extractfile(member)
            if src is None:
                raise _refuse(archive, member.name, "has no readable content")
            with src:
                _copy_capped(archive, member.name, src, path, limits, written)
