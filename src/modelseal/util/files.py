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
from collections.abc import Callable, Iterator
from pathlib import Path

from modelseal.errors import DestinationExists, PolicyDenied, StorageError


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
        replace(tmp, dst, force)
    except BaseException:
        remove_path(tmp)
        raise


def replace(tmp: Path, dst: Path, force: bool = True) -> None:
    """Move ``tmp`` over ``dst``. A folder destination is swapped out then removed."""
    try:
        existing_dir = dst.is_dir() and not dst.is_symlink()
        if force and (existing_dir or (tmp.is_dir() and (dst.exists() or dst.is_symlink()))):
            # A folder cannot be replaced in one rename: move the old one aside first.
            old = temp_sibling(dst, "old")
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except OSError:
                os.rename(old, dst)  # put the original back
                raise
            fsync_dir(dst.parent)
            remove_path(old)
        elif tmp.is_dir():
            os.rename(tmp, dst)  # fails if dst appeared as a non-empty folder meanwhile
            fsync_dir(dst.parent)
        elif not force:
            # link() never replaces: a destination created since the check is kept.
            os.link(tmp, dst)
            os.unlink(tmp)
            fsync_dir(dst.parent)
        else:
            os.replace(tmp, dst)
            fsync_dir(dst.parent)
    except FileExistsError:
        raise DestinationExists(f"{dst} already exists (use --force to replace it)") from None
    except OSError as e:
        raise StorageError(f"cannot move output into place at {dst}: {e.strerror}") from None


def write_atomic(dst: Path, data: bytes, mode: int = 0o600, exclusive: bool = False) -> None:
    """Write a small file atomically (temp, fsync, rename, fsync folder).

    With ``exclusive`` the file is linked into place instead, which fails with
    FileExistsError rather than replace a file that exists (or appeared meanwhile).
    """
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
        if exclusive:
            os.link(tmp, dst)
            os.unlink(tmp)
        else:
            os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise StorageError(f"cannot write {dst}: {e.strerror}") from None


def open_walked(real: Path, file_id: FileId) -> int:
    """Open a file found by ``walk_folder`` and check it is still that same regular
    file: a symlink swapped in after the walk (to a file outside) is refused."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise PolicyDenied(f"{real} changed while it was being sealed ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != file_id:
        os.close(fd)
        raise PolicyDenied(f"{real} changed while it was being sealed")
    return fd


def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """Open an existing regular file (never blocks on a FIFO or device)."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise StorageError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise StorageError(f"{path} is a folder, not a file") from None
    except OSError as e:
        raise StorageError(f"cannot open {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StorageError(f"{path} is not a regular file")
    return fd


def is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


FileId = tuple[int, int]  # (st_dev, st_ino)


def walk_folder(root: Path) -> list[tuple[str, Path, FileId]]:
    """List the regular files under ``root`` as (POSIX relative path, real path, file id), sorted.

    Symlinks are followed only when they stay inside ``root``; one that leaves
    it (or dangles) is refused, as are special files.
    """
    root_real = root.resolve()
    out: list[tuple[str, Path, FileId]] = []
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
            st = real.stat()
            if not stat.S_ISREG(st.st_mode):
                raise PolicyDenied(f"{rel} is not a regular file")
            out.append((rel, real, (st.st_dev, st.st_ino)))
    out.sort(key=lambda item: item[0].encode())
    return out


def read_limited(path: Path, limit: int, error: Callable[[str], Exception], what: str) -> bytes:
    """Read a small file (a key, a policy, a signature file) whole, refusing more than
    ``limit`` bytes. ``FileNotFoundError`` passes through for the caller to decide on;
    any other failure raises ``error(one-line message)``."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"cannot read {what}: {e.strerror}") from None
    if len(data) > limit:
        raise error(f"{what} is larger than {limit} bytes")
    return data
