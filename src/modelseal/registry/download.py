"""Pulling blobs into a partial folder: ranged, parallel, resumable, every byte checked.

Blob ``<hex>`` is written to ``FOLDER/<hex>.part`` (sized up front) by parts of ``PART`` bytes
fetched in parallel with ``Range``; the byte ranges that arrived are appended to
``<hex>.got`` as they land. A connection that breaks mid-part is resumed from the last byte
received (on the next endpoint if that one is gone); a pull run again after an interruption
fetches only what ``.got`` does not list. When every range is there the file is hashed whole:
only a blob whose SHA-256 is the descriptor's digest becomes ``FOLDER/<hex>``; any other is
deleted and refused (``DigestMismatch``). ``.got`` saves work, it is never trusted: a wrong
entry costs a refused digest. Memory: one 1 MiB buffer per thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from modelseal.errors import DigestMismatch, StorageError
from modelseal.registry.client import Repository
from modelseal.registry.layout import Descriptor
from modelseal.registry.progress import Progress
from modelseal.registry.transport import RegistryUnavailable

PART = 64 << 20
RECORD = 8 << 20  # a received range is recorded at least every RECORD bytes
BLOCK = 1 << 20
MAX_FAILURES = 6


class _Short(Exception):
    """The blob's body ended before the range asked for."""


_NET = (OSError, http.client.HTTPException, RegistryUnavailable, _Short)


def _ranges(got: Path, size: int) -> list[tuple[int, int]]:
    """The merged ranges ``[a, b)`` that ``got`` lists (nothing if it is unreadable)."""
    try:
        text = got.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return []
    out: list[tuple[int, int]] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2 or not all(p.isdigit() and len(p) < 20 for p in parts):
            continue  # a torn last line
        a, b = int(parts[0]), min(int(parts[1]), size)
        if a < b:
            out.append((a, b))
    out.sort()
    merged: list[tuple[int, int]] = []
    for a, b in out:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def missing(have: list[tuple[int, int]], size: int, part: int) -> list[tuple[int, int]]:
    """The ranges of ``[0, size)`` not in ``have``, cut into pieces of at most ``part`` bytes."""
    gaps, at = [], 0
    for a, b in have:
        if a > at:
            gaps.append((at, a))
        at = max(at, b)
    if at < size:
        gaps.append((at, size))
    return [(s, min(s + part, b)) for a, b in gaps for s in range(a, b, part)]


class _Blob:
    def __init__(self, folder: Path, desc: Descriptor) -> None:
        self.desc = desc
        self.done = folder / desc.hex
        self.part = folder / f"{desc.hex}.part"
        self.got = folder / f"{desc.hex}.got"

    def prepare(self, part: int) -> list[tuple[int, int]]:
        """The ranges still to fetch; the part file exists at the blob's size afterwards."""
        if self.done.exists():
            return []
        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(fd).st_size != self.desc.size:
                os.ftruncate(fd, self.desc.size)
        finally:
            os.close(fd)
        return missing(_ranges(self.got, self.desc.size), self.desc.size, part)

    def record(self, a: int, b: int) -> None:
        fd = os.open(self.got, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, f"{a} {b}\n".encode())
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Hash the whole blob; keep it only if it is the digest named."""
        path = self.done if self.done.exists() else self.part
        h = hashlib.sha256()
        size = 0
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(4 << 20)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
                size += n
        if size != self.desc.size or h.hexdigest() != self.desc.hex:
            for p in (self.done, self.part, self.got):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            raise DigestMismatch(f"a blob of the artifact does not hash to its digest {self.desc.digest}: refused")
        if path == self.part:
            os.rename(self.part, self.done)
            with contextlib.suppress(FileNotFoundError):
                self.got.unlink()


def _fetch_range(repo: Repository, blob: _Blob, a: int, b: int, progress: Progress) -> None:
    pos, failures = a, 0
    fd = os.open(blob.part, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    mark = pos
    try:
        while pos < b:
            try:
                with repo.blob(blob.desc.digest, pos, b - 1) as resp:
                    while pos < b:
                        n = resp.readinto(view[: min(BLOCK, b - pos)])
                        if not n:
                            break
                        _pwrite_all(fd, view[:n], pos)
                        pos += n
                        if pos - mark >= RECORD:
                            blob.record(mark, pos)
                            mark = pos
                        progress.add(n)
                if pos < b:
                    raise _Short
            except _NET:
                failures += 1
                if failures > MAX_FAILURES:
                    raise RegistryUnavailable("the blob download kept breaking off") from None
                time.sleep(min(2.0, 0.1 * 2**failures))
    finally:
        if pos > mark:  # whatever stopped it (an interruption too), what landed is kept
            blob.record(mark, pos)
        os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        try:
            n = os.pwrite(fd, data, offset)
        except OSError as e:
            raise StorageError(f"cannot write the blob being pulled: {e.strerror}") from None
        data, offset = data[n:], offset + n


def fetch_all(
    repo: Repository,
    blobs: list[Descriptor],
    folder: Path,
    progress: Progress,
    *,
    jobs: int = 4,
    part: int = PART,
) -> dict[str, Path]:
    """Fetch and check every blob into ``folder``; returns digest -> its checked file."""
    items = {d.digest: _Blob(folder, d) for d in blobs}
    work: list[Callable[[], None]] = []
    for blob in items.values():
        todo = blob.prepare(part)
        progress.add(blob.desc.size - sum(b - a for a, b in todo))
        work.extend(_job(repo, blob, a, b, progress) for a, b in todo)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        _run(pool, work)
        _run(pool, [blob.finish for blob in items.values()])
    return {digest: blob.done for digest, blob in items.items()}


def _job(repo: Repository, blob: _Blob, a: int, b: int, progress: Progress) -> Callable[[], None]:
    return lambda: _fetch_range(repo, blob, a, b, progress)


def _run(pool: ThreadPoolExecutor, work: list[Callable[[], None]]) -> None:
    """Run ``work`` on ``pool``; on the first failure, cancel what has not started and raise it."""
    futures = [pool.submit(w) for w in work]
    try:
        for f in futures:
            f.result()
    except BaseException:
        for f in futures:
            f.cancel()
        for f in futures:
            with contextlib.suppress(BaseException):
                f.result()
        raise


def partial_folder(path: Path) -> Path:
    """The partial folder of a pull: this user's, mode 0700, never a symlink."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.getuid():
            raise StorageError(f"{path} is in the way of the pull (not this user's folder)") from None
    except OSError as e:
        raise StorageError(f"cannot create {path}: {e.strerror}") from None
    return path


__all__ = ["PART", "fetch_all", "missing", "partial_folder"]
