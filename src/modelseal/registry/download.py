"""Pulling blobs into a partial folder: ranged, parallel, resumable, every byte checked.

Blob ``<hex>`` is written to ``FOLDER/<hex>.part`` (sized up front) by parts of ``PART`` bytes
fetched in parallel with ``Range``; the byte ranges that arrived are appended to
``<hex>.got`` as they land. A connection that breaks mid-part is resumed from the last byte
received (on the next endpoint if that one is gone); a pull run again after an interruption
fetches only what ``.got`` does not list. Before any part file is sized, the bytes still to
fetch must fit the free space of the folder's filesystem (``check_room``), else
``StorageError``; every local file failure is a ``StorageError`` too, never a raw
``OSError`` (nor taken for a network failure and retried).
When every range is there the file is hashed whole:
only a blob whose SHA-256 is the descriptor's digest becomes ``FOLDER/<hex>``; any other is
deleted and refused (``DigestMismatch``). ``.got`` saves work, it is never trusted: a wrong
entry costs a refused digest. Memory: one 1 MiB buffer per thread.

Signature files (``signature_files``) are fetched one referrer at a time, each at most
``MAX_SIGFILE`` as declared, digest-checked and parsed; junk is skipped, not fatal.
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

from modelseal.errors import DigestMismatch, RegistryError, StorageError, VerificationError
from modelseal.format.file import RawArtifact
from modelseal.format.stream import CHUNK_HASH_LEN
from modelseal.registry import layout
from modelseal.registry.client import Repository
from modelseal.registry.layout import Descriptor
from modelseal.registry.progress import Progress
from modelseal.registry.transport import RegistryUnavailable
from modelseal.signing.commitment import artifact_digest, commit
from modelseal.signing.sigfile import MAX_SIGFILE, SignatureFile

PART = 64 << 20
RECORD = 8 << 20  # a received range is recorded at least every RECORD bytes
BLOCK = 1 << 20
MAX_FAILURES = 6
ROOM_MARGIN = 64 << 20  # beyond the blobs: the ranges noted, the signature files


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

    def todo(self, part: int) -> list[tuple[int, int]]:
        """The ranges still to fetch (``.got`` counts only beside a part file of the blob's size)."""
        if self.done.exists():
            return []
        try:
            sized = os.lstat(self.part).st_size == self.desc.size
        except FileNotFoundError:
            sized = False
        except OSError as e:
            raise StorageError(f"cannot read the blob being pulled: {e.strerror}") from None
        return missing(_ranges(self.got, self.desc.size) if sized else [], self.desc.size, part)

    def allocate(self) -> None:
        """Create the part file at the blob's size (sparse)."""
        if self.done.exists():
            return
        try:
            fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                if os.fstat(fd).st_size != self.desc.size:
                    with contextlib.suppress(FileNotFoundError):
                        self.got.unlink()  # what it listed is not in this file
                    os.ftruncate(fd, self.desc.size)
            finally:
                os.close(fd)
        except OSError as e:
            raise StorageError(f"cannot make room for a blob of {self.desc.size} bytes: {e.strerror}") from None

    def record(self, a: int, b: int) -> None:
        try:
            fd = os.open(self.got, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, f"{a} {b}\n".encode())
            finally:
                os.close(fd)
        except OSError as e:  # never taken for a network failure (and retried)
            raise StorageError(f"cannot note the ranges pulled: {e.strerror}") from None

    def finish(self) -> None:
        """Hash the whole blob; keep it only if it is the digest named."""
        try:
            self._finish()
        except OSError as e:
            raise StorageError(f"cannot read back the blob pulled: {e.strerror}") from None

    def _finish(self) -> None:
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
    try:
        fd = os.open(blob.part, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise StorageError(f"cannot open the blob being pulled: {e.strerror}") from None
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
    todo = {digest: blob.todo(part) for digest, blob in items.items()}
    check_room(folder, sum(b - a for ranges in todo.values() for a, b in ranges))
    work: list[Callable[[], None]] = []
    for digest, blob in items.items():
        blob.allocate()
        progress.add(blob.desc.size - sum(b - a for a, b in todo[digest]))
        work.extend(_job(repo, blob, a, b, progress) for a, b in todo[digest])
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        _run(pool, work)
        _run(pool, [blob.finish for blob in items.values()])
    return {digest: blob.done for digest, blob in items.items()}


def check_room(folder: Path, needed: int) -> None:
    """Refuse (``StorageError``) a pull whose ``needed`` bytes do not fit the free space at ``folder``."""
    try:
        st = os.statvfs(folder)
    except OSError as e:
        raise StorageError(f"cannot tell the free space at {folder.parent}: {e.strerror}") from None
    free = st.f_bavail * st.f_frsize
    if needed + ROOM_MARGIN > free:
        raise StorageError(
            f"not enough free space in {folder.parent} for the pull: {_gib(needed)} to fetch, {_gib(free)} free"
        )


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


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


# ---- signature files ------------------------------------------------------------------


def _signature_file(repo: Repository, ref: Descriptor, digest: str) -> bytes | None:
    """The signature file of the referrer ``ref`` of ``digest``: bounded, digest-checked, parsed
    as a modelseal signature file; None for a referrer that is none of that (junk is skipped)."""
    try:
        got = repo.get_manifest(ref.digest)
        if got is None:
            return None
        layer = layout.parse_signature_manifest(got[0], digest)
        if layer.size > MAX_SIGFILE:
            return None
        with repo.blob(layer.digest) as resp:
            data = resp.read(layer.size + 1)
    except RegistryUnavailable:
        raise
    except (OSError, http.client.HTTPException) as e:  # the connection broke mid-body
        raise RegistryUnavailable(f"the connection to the registry broke: {type(e).__name__}") from None
    except RegistryError:
        return None
    if layout.sha256_digest(data) != layer.digest:
        return None
    try:
        SignatureFile.parse(data)
    except VerificationError:
        return None
    return data


def signature_files(repo: Repository, referrers: list[Descriptor], subject: str) -> list[bytes]:
    """The distinct signature files of ``referrers`` (signature referrers of the artifact
    manifest ``subject``), in their order; a referrer that is not a bounded, digest-checked,
    well-formed modelseal signature file of ``subject`` is skipped."""
    out: list[bytes] = []
    for ref in referrers:
        data = _signature_file(repo, ref, subject)
        if data is not None and data not in out:
            out.append(data)
    return out


def fits(data: bytes, raws: dict[str, RawArtifact]) -> bool:
    """Whether the signature file ``data`` is one of the artifact whose sealed files have the
    headers ``raws``: a chunk table of the right length for exactly those files, and a
    signature whose statement commits to them (the headers as they arrived, the file's own
    tables). Cheap, no hashing; whether a signature verifies is the trust policy's to say."""
    sf = SignatureFile.parse(data)
    if set(sf.chunks) != set(raws):
        return False
    if any(len(sf.chunks[p]) != CHUNK_HASH_LEN * raw.layout.count for p, raw in raws.items()):
        return False
    commits = [commit(p, raw, sf.chunks[p]) for p, raw in sorted(raws.items())]
    digest = artifact_digest(commits)
    return any(e.statement.digest == digest and e.statement.matches(commits) for e in sf.signatures)


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


__all__ = ["PART", "check_room", "fetch_all", "fits", "missing", "partial_folder", "signature_files"]
