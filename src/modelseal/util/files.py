"""Crash-safe file output, and opening untrusted files without blocking.

Owns: temp-name-then-rename writes in the destination's own folder (so the
rename is atomic), the atomic swap of a folder (``renameat2(RENAME_EXCHANGE)``,
with a roll-back from leftovers where the filesystem cannot), fsync of files and
of their folders, cleanup of temp names on failure, and opening what a walk found
(``util.walk`` owns the walk and the containment checks). Knows nothing of the sealed
format.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from modelseal.errors import DestinationExists, PolicyDenied, StorageError
from modelseal.util.walk import FileId as FileId
from modelseal.util.walk import is_within as is_within  # re-exported: callers import them from here
from modelseal.util.walk import walk_folder as walk_folder


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


Commit = Callable[[Path, Path, bool], None]


@contextlib.contextmanager
def atomic_output(dst: Path, force: bool, is_dir: bool = False, *, commit: Commit | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``dst``; on success it replaces ``dst`` atomically.

    On any exception the temp path is removed and ``dst`` is left as it was.
    ``commit(tmp, dst, force)`` moves the output into place instead of ``replace``
    (to move a side file with it, crash-safely).
    """
    try:
        settle_replaced(dst)
    except OSError as e:
        raise StorageError(f"cannot recover the interrupted replacement of {dst}: {e.strerror}") from None
    check_destination(dst, force)
    tmp = temp_sibling(dst)
    try:
        if is_dir:
            tmp.mkdir(mode=0o700)
        yield tmp
        if is_dir:
            fsync_dir(tmp)
        (commit or replace)(tmp, dst, force)
    except BaseException:
        remove_path(tmp)
        raise


# renameat2(2) flags, from <linux/fs.h>.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+, musl 1.2.2+
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``. False where the platform, libc, kernel or filesystem
    cannot do it (the caller then falls back); any other failure raises ``OSError``."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def replaced_name(dst: Path) -> Path:
    """Where the fallback swap keeps the old ``dst`` between its two renames: a fixed name,
    so that the next access finds it after a crash (``settle_replaced``)."""
    return dst.parent / f".{dst.name}.replaced-by-modelseal"


def settle_replaced(dst: Path) -> None:
    """Finish a folder swap that a crash interrupted on a filesystem without
    RENAME_EXCHANGE. Nothing at ``dst``: the old one goes back (roll back). Something
    there: the new one was moved in, and the old one is removed (roll forward)."""
    old = replaced_name(dst)
    if not os.path.lexists(old):
        return
    if os.path.lexists(dst):
        remove_path(old)
    else:
        os.rename(old, dst)
    fsync_dir(dst.parent)


def _swap(tmp: Path, dst: Path) -> None:
    """Swap ``tmp`` in at ``dst`` (either may be a folder) and remove the old one."""
    if renameat2(tmp, dst, RENAME_EXCHANGE):
        # One step: ``dst`` names the old or the new artifact at every instant.
        fsync_dir(dst.parent)
        remove_path(tmp)  # now the old one
        return
    old = replaced_name(dst)
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except OSError:
        os.rename(old, dst)  # put the original back
        raise
    fsync_dir(dst.parent)
    remove_path(old)


def replace(tmp: Path, dst: Path, force: bool = True) -> None:
    """Move ``tmp`` into place at ``dst`` in one atomic step, whatever the kinds.

    A file over a file is rename(2). A folder on either side is swapped with
    renameat2(RENAME_EXCHANGE), then the old one is removed; where the filesystem
    cannot exchange, the old one is moved aside under ``replaced_name`` first, which
    ``settle_replaced`` rolls back from after a crash. Without ``force`` nothing is
    replaced, not even something that appeared since the destination was checked.
    """
    try:
        settle_replaced(dst)
        exists = os.path.lexists(dst)
        if exists and not force:
            raise FileExistsError
        if tmp.is_dir() or (exists and dst.is_dir() and not dst.is_symlink()):
            if exists:
                _swap(tmp, dst)
            elif not renameat2(tmp, dst, RENAME_NOREPLACE):
                os.rename(tmp, dst)  # fails if dst appeared as a non-empty folder meanwhile
        elif not force:
            # link() never replaces: a destination created since the check is kept.
            os.link(tmp, dst)
            os.unlink(tmp)
        else:
            os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except FileExistsError:
        raise DestinationExists(f"{dst} already exists (use --force to replace it)") from None
    except OSError as e:
        raise StorageError(f"cannot move output into place at {dst}: {e.strerror}") from None


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less). Raises OSError."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` (never an existing one), write ``data`` and fsync it. Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    dst: Path, data: bytes, mode: int = 0o600, exclusive: bool = False, *, staging: Path | None = None
) -> None:
    """Write a small file atomically (temp, fsync, rename, fsync folder).

    With ``exclusive`` the file is linked into place instead, which fails with
    FileExistsError rather than replace a file that exists (or appeared meanwhile).
    The temp name is in ``staging`` if given (a folder whose contents are checked, like
    a sealed folder, must not hold a leftover after a crash), else beside ``dst``, as it
    also is where ``staging`` is on another filesystem or cannot be written.
    """
    if staging is not None:
        try:
            _write_via(staging / temp_sibling(dst).name, dst, data, mode, exclusive)
            return
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EACCES, errno.EPERM, errno.EROFS):
                raise StorageError(f"cannot write {dst}: {e.strerror}") from None
    try:
        _write_via(temp_sibling(dst), dst, data, mode, exclusive)
    except FileExistsError:
        raise
    except OSError as e:
        raise StorageError(f"cannot write {dst}: {e.strerror}") from None


def _write_via(tmp: Path, dst: Path, data: bytes, mode: int, exclusive: bool) -> None:
    try:
        write_new(tmp, data, mode)
        if exclusive:
            os.link(tmp, dst)
            os.unlink(tmp)
        else:
            os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


# O_NONBLOCK: opening a FIFO (or a device) planted where a file belongs must not wait for
# a writer forever; O_NOCTTY: opening a terminal must not make it ours.
_UNTRUSTED_OPEN = os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def _regular_or_none(fd: int) -> os.stat_result | None:
    """fstat ``fd``; for a regular file clear O_NONBLOCK again (ordinary blocking reads),
    otherwise close it and return None."""
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            return st
    except OSError:
        pass
    os.close(fd)
    return None


def open_walked(real: Path, file_id: FileId) -> int:
    """Open a file found by ``walk_folder`` and check it is still that same regular
    file: a symlink swapped in after the walk (to a file outside) is refused, and a
    FIFO swapped in is refused without blocking."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | _UNTRUSTED_OPEN)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        raise PolicyDenied(f"{real} changed while it was being sealed ({e.strerror})") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink swapped in after the walk
            raise PolicyDenied(f"{real} changed while it was being sealed ({e.strerror})") from None
        raise StorageError(f"cannot read {real}: {e.strerror}") from None
    st = _regular_or_none(fd)
    if st is None or (st.st_dev, st.st_ino) != file_id:
        if st is not None:
            os.close(fd)
        raise PolicyDenied(f"{real} changed while it was being sealed")
    return fd


def open_regular(path: Path | str, flags: int = os.O_RDONLY) -> int:
    """Open an existing regular file: never blocks on a FIFO or device, which are
    refused (checked with fstat on the opened descriptor, so no swap in between)."""
    try:
        fd = os.open(path, flags | _UNTRUSTED_OPEN)
    except FileNotFoundError:
        raise StorageError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise StorageError(f"{path} is a folder, not a file") from None
    except OSError as e:
        raise StorageError(f"cannot open {path}: {e.strerror}") from None
    if _regular_or_none(fd) is None:
        raise StorageError(f"{path} is not a regular file")
    return fd


def read_limited(
    path: Path, limit: int, error: Callable[[str], Exception], what: str, *, regular: bool = False
) -> bytes:
    """Read a small file (a key, a policy, a signature file) whole, refusing more than
    ``limit`` bytes. ``FileNotFoundError`` passes through for the caller to decide on;
    any other failure raises ``error(one-line message)``. With ``regular`` (for a file
    an artifact's writer controls) a FIFO or device is refused without blocking; without
    it an operator may hand over a pipe (``<(vault read ...)``)."""
    try:
        fd = os.open(path, os.O_RDONLY | (_UNTRUSTED_OPEN if regular else os.O_CLOEXEC))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"cannot read {what}: {e.strerror}") from None
    if regular and _regular_or_none(fd) is None:
        raise error(f"{what} is not a regular file")
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {what}: {e.strerror}") from None
    if len(data) > limit:
        raise error(f"{what} is larger than {limit} bytes")
    return data
