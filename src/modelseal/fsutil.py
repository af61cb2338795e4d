"""Crash-safe file output and safe folder walking.

Owns: temp-name-then-rename writes in the destination's own folder (so the
rename is atomic), fsync of files and of their folders, cleanup of temp
names on failure, and the walk of a folder to be sealed (symlinks that leave
it are refused). Knows nothing of the sealed format.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import DestinationExists, PolicyDenied, StorageError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(dst: Path, tag: str = "tmp") -> Path:
    return dst.parent / f".{dst.name}.{tag}-{secrets.token_hex(6)}"


def check_destination(dst: Path, force: bool) -> None:
    if (dst.exists() or dst.is_symlink()) and not force:
        raise DestinationExists(f"{dst} already exists (use --force to replace it)")
    if not dst.parent.is_dir():
        raise StorageError(f"folder {dst.parent} does not exist")


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_output(dst: Path, force: bool, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``dst``; on success it replaces ``dst`` atomically.

    On any exception the temp path is removed and ``dst`` is left as it was.
    """
    check_destination(dst, force)
    tmp = temp_sibling(dst)
    try:
        if is_dir:
            tmp.mkdir(mode=0o700)
        yield tmp
        if is_dir:
            fsync_dir(tmp)
        replace(tmp, dst)
    except BaseException:
        remove_path(tmp)
        raise


def replace(tmp: Path, dst: Path) -> None:
    """Move ``tmp`` over ``dst``. A folder destination is swapped out then removed."""
    try:
        if dst.is_dir() and not dst.is_symlink():
            old = temp_sibling(dst, "old")
            os.rename(dst, old)
            os.rename(tmp, dst)
            fsync_dir(dst.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
            fsync_dir(dst.parent)
    except OSError as e:
        raise StorageError(f"cannot move output into place at {dst}: {e.strerror}") from None


def write_atomic(dst: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a small file atomically (temp, fsync, rename, fsync folder)."""
    tmp = temp_sibling(dst)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise StorageError(f"cannot write {dst}: {e.strerror}") from None


def is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def walk_folder(root: Path) -> list[tuple[str, Path]]:
    """List the regular files under ``root`` as (POSIX relative path, real path), sorted.

    Symlinks are followed only when they stay inside ``root``; one that leaves
    it (or dangles) is refused, as are special files.
    """
    root_real = root.resolve()
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in list(dirnames):
            p = base / name
            if p.is_symlink():
                # A linked folder is refused outright: following it could loop or escape.
                raise PolicyDenied(f"symlinked folder {p.relative_to(root)} is not allowed in a sealed folder")
        for name in filenames:
            p = base / name
            rel = p.relative_to(root).as_posix()
            real = p.resolve()
            if p.is_symlink() and (not real.exists() or not is_within(real, root_real)):
                raise PolicyDenied(f"symlink {rel} points outside the folder being sealed")
            if not stat.S_ISREG(real.stat().st_mode):
                raise PolicyDenied(f"{rel} is not a regular file")
            out.append((rel, real))
    out.sort(key=lambda item: item[0].encode())
    return out
