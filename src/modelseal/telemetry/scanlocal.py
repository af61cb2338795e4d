"""``modelseal scan PATH``: every regular file under a local path, by content, headers only.

The walk goes by directory file descriptors and never leaves the root: each folder is opened
relative to its parent's descriptor with ``O_DIRECTORY | O_NOFOLLOW`` and listed through its
own descriptor (``os.scandir(fd)``), each file opened relative to its folder with
``O_NOFOLLOW``, so a folder swapped for a symlink while the walk runs is refused, not
followed, and no path is ever resolved again from the root (a tree deeper than ``PATH_MAX``
is walked as well). A symlink is counted, never read; a folder already visited (a bind-mount
loop) is not entered twice; the walk goes at most ``MAX_DEPTH`` folders deep. The root itself
is the operator's: a symlink given as the root is followed.

The only other files read are a sealed artifact's own signature file, at the place the
format fixes, opened relative to the same folder descriptor without following a link
(``X.msig`` beside a sealed file ``X``, ``signatures.msig`` beside a folder's
``manifest.mseal``): a symlinked signature file is judged as one that does not parse. (The
pending signature file of an interrupted replacement, which ``verify`` also considers, is not
looked at: such an artifact shows as untrusted until the next write completes.) Nothing read
from a file chooses what else is read. Each file is opened without blocking (a FIFO swapped
in is refused) and read with ``pread`` at the offsets ``scanartifacts`` asks for. A folder or
file that cannot be read is an error of the report (the scan is incomplete) and the walk goes
on.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from modelseal.errors import StorageError
from modelseal.signing.commitment import SIGNATURES_NAME
from modelseal.signing.sigfile import MAX_SIGFILE
from modelseal.telemetry.scanartifacts import ScanContext, examine

MAX_DEPTH = 512
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LocalBlob:
    """A regular file opened for bounded reads."""

    def __init__(self, where: str, fd: int, size: int) -> None:
        self._where, self._fd, self._size = where, fd, size

    @property
    def location(self) -> str:
        return self._where

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0 or offset >= self._size:
            return b""
        return os.pread(self._fd, min(length, self._size - offset), offset)


def _signature(dir_fd: int, name: str) -> list[bytes]:
    """The signature file ``name`` in the folder ``dir_fd``: [] if there is none, ``[b""]``
    (judged as a signature file that does not parse) if it is a symlink, not a regular file,
    too large or unreadable."""
    try:
        fd = os.open(name, _FILE, dir_fd=dir_fd)
    except FileNotFoundError:
        return []
    except OSError:
        return [b""]  # ELOOP: a symlink
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SIGFILE:
            return [b""]
        chunks, total = [], 0
        while total <= MAX_SIGFILE:
            piece = os.pread(fd, min(1 << 20, MAX_SIGFILE + 1 - total), total)
            if not piece:
                break
            chunks.append(piece)
            total += len(piece)
        return [b"".join(chunks)] if total <= MAX_SIGFILE else [b""]
    except OSError:
        return [b""]
    finally:
        os.close(fd)


def scan_file(dir_fd: int, name: str, where: str, ctx: ScanContext, *, follow: bool = False) -> None:
    """Scan the file ``name`` of the folder open as ``dir_fd`` (``where``: how it is shown)."""
    try:
        fd = os.open(name, _FILE & ~os.O_NOFOLLOW if follow else _FILE, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a symlink since it was listed: counted, not read
            ctx.report.formats["symlink"] += 1
        else:
            ctx.report.error(where, f"cannot open it: {e.strerror}")
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            ctx.report.formats["special"] += 1
            return
        blob = LocalBlob(where, fd, st.st_size)
        parent = where.rpartition("/")[0] or "."

        def neighbours(kind: int) -> tuple[str, list[bytes]]:
            if kind == 1:
                return where, _signature(dir_fd, name + ".msig")
            return parent, _signature(dir_fd, SIGNATURES_NAME)

        examine(blob, ctx, neighbours)
    except OSError as e:
        ctx.report.error(where, f"cannot read it: {e.strerror}")
    finally:
        os.close(fd)


def scan_path(root: Path, ctx: ScanContext) -> None:
    """Scan ``root`` (a file, or a folder walked by descriptors, see the module doc)."""
    try:
        st = os.stat(root)  # the operator named it: a symlink given as the root is followed
    except OSError as e:
        raise StorageError(f"cannot scan {root}: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        try:
            parent = os.open(root.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise StorageError(f"cannot scan {root}: {e.strerror}") from None
        try:
            scan_file(parent, root.name, str(root), ctx, follow=True)
        finally:
            os.close(parent)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"cannot scan {root}: not a file or a folder")
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise StorageError(f"cannot scan {root}: {e.strerror}") from None
    _walk(top, str(root).rstrip("/") or "/", ctx)


def _walk(top: int, where: str, ctx: ScanContext) -> None:
    """Depth first; the descriptors of the folders on the way down stay open (at most
    ``MAX_DEPTH``), each closed once its subfolders are done."""
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[int, str, list[str]]] = []  # (folder fd, where, its subfolders still to do)
    fd: int | None = top
    name_where = where
    while True:
        if fd is not None:
            subfolders = _folder(fd, name_where, ctx, seen)
            stack.append((fd, name_where, subfolders))
        if not stack:
            return
        parent, parent_where, todo = stack[-1]
        if not todo:
            os.close(parent)
            stack.pop()
            fd = None
            continue
        name = todo.pop()
        name_where = f"{parent_where.rstrip('/')}/{name}"
        if len(stack) >= MAX_DEPTH:
            ctx.report.error(name_where, f"more than {MAX_DEPTH} folders deep: not scanned")
            fd = None
            continue
        try:
            fd = os.open(name, _DIR, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a symlink or a file since it was listed
                ctx.report.formats["symlink" if _is_link(parent, name) else "special"] += 1
            else:
                ctx.report.error(name_where, f"cannot open it: {e.strerror}")
            fd = None


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _folder(fd: int, where: str, ctx: ScanContext, seen: set[tuple[int, int]]) -> list[str]:
    """Scan the files of the folder open as ``fd``; its subfolders' names, last first."""
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in seen:
            ctx.report.error(where, "a folder already scanned (a bind-mount loop?): not scanned again")
            return []
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        ctx.report.error(where, f"cannot list it: {e.strerror}")
        return []
    subfolders = []
    for entry in entries:
        shown = f"{where.rstrip('/')}/{entry.name}"
        try:
            if entry.is_symlink():
                ctx.report.formats["symlink"] += 1
            elif entry.is_dir(follow_symlinks=False):
                subfolders.append(entry.name)
            elif entry.is_file(follow_symlinks=False):
                scan_file(fd, entry.name, shown, ctx)
            else:
                ctx.report.formats["special"] += 1
        except OSError as e:
            ctx.report.error(shown, f"cannot read it: {e.strerror}")
    subfolders.reverse()
    return subfolders


__all__ = ["MAX_DEPTH", "LocalBlob", "scan_file", "scan_path"]
