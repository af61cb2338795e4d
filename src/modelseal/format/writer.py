"""Sealing's write path: one plaintext stream encrypted into a new file at disk speed.

The chunk layout is ``stream``'s (chunk i at ``payload_offset + i * (chunk_size + 16)``,
so chunks do not start on block boundaries). The encrypting threads put the
ciphertext of consecutive chunks straight into page-aligned 4 MiB staging buffers
that tile the block-aligned part of the payload; one writer thread writes each
buffer once full, in order, and starts its writeback early (``WritebackHint``), so
the final fsync has little left to do. The unaligned edges (before the first and
after the last block boundary) are written at the end.

The buffers can also be written with ``O_DIRECT`` (``DIRECT``; on EINVAL at ``fcntl``
or at the first write it falls back to the page cache). That saves the page-cache
copy (1.3-2 s of CPU per GiB here) but it is off: on this project's virtio disk a
direct write runs at queue depth 1 and sealing came out at 0.71x ``dd conv=fsync``
against 1.47x through the page cache (docs/decisions.md, "Writes").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from modelseal.errors import StorageError
from modelseal.format.header import TAG_LEN
from modelseal.format.stream import ChunkCipher, Progress, ReadAt, WritebackHint, chunk_hash, pwrite_all, workers
from modelseal.util.hardening import secret_buffer

ALIGN = 4096  # O_DIRECT offset, length and memory alignment (the page size covers every block size)
STAGE = 4 << 20  # one staging buffer: one 4 MiB request (max_sectors_kb); larger measured no faster
STAGES = 4  # buffers in the ring: one being written, the next ones being filled
DIRECT = False  # O_DIRECT output: measured slower here (see above); benchmarks/throughput.py compares


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _down(n: int) -> int:
    return n // ALIGN * ALIGN


class _Staging:
    """The ciphertext's destination: head edge [P, A), stages tiling [A, B), tail edge [B, E).

    ``P`` is the payload offset, ``E`` the file length, ``A`` and ``B`` the first and
    last block boundaries between them (``A == B`` when the payload spans none).
    Stage ``s`` covers ``[A + s * size, A + (s + 1) * size)`` and lives in ring buffer
    ``s % len(ring)``: the caller must not place bytes of stage ``s`` before stage
    ``s - len(ring)`` has been written.
    """

    def __init__(self, payload_offset: int, file_length: int, chunk_ct: int) -> None:
        self.p, self.e = payload_offset, file_length
        self.a, self.b = _up(payload_offset), _down(file_length)
        if self.a >= self.b:
            self.a = self.b = file_length
        self.size = max(STAGE, _up(chunk_ct))  # a chunk spans at most two stages
        self.count = -(-(self.b - self.a) // self.size)
        n = min(STAGES, self.count)
        self.ring = [memoryview(mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE)) for _ in range(n)]
        self.head = memoryview(bytearray(self.a - self.p))
        self.tail = memoryview(bytearray(self.e - self.b))

    def stage_span(self, start: int) -> int:
        return min(self.b, self.a + (start + 1) * self.size) - (self.a + start * self.size)

    def stage_of(self, offset: int) -> int:
        """The stage holding file byte ``offset`` (-1 before A, ``count`` from B on)."""
        if offset < self.a:
            return -1
        if offset >= self.b:
            return self.count
        return (offset - self.a) // self.size

    def pieces(self, lo: int, hi: int) -> Iterator[memoryview]:
        """Views of the destination buffers covering file bytes [lo, hi), in order."""
        while lo < hi:
            if lo < self.a:
                end = min(hi, self.a)
                yield self.head[lo - self.p : end - self.p]
            elif lo >= self.b:
                end = hi
                yield self.tail[lo - self.b : end - self.b]
            else:
                s = (lo - self.a) // self.size
                base = self.a + s * self.size
                end = min(hi, base + self.size, self.b)
                yield self.ring[s % len(self.ring)][lo - base : end - base]
            lo = end


class _Writer:
    """Writes finished stages, in order, on one thread (``O_DIRECT`` when asked, while it works)."""

    def __init__(self, fd: int, staging: _Staging, direct: bool) -> None:
        self.fd, self.staging = fd, staging
        self.flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self.direct = False
        if direct and staging.count:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, self.flags | os.O_DIRECT)
                self.direct = True
            except OSError:
                pass  # not supported here: the page cache it is
        self.writeback = WritebackHint(fd)
        self.failed = False

    def write(self, s: int) -> None:
        if self.failed:  # stages queued behind a failed one are not written
            raise StorageError("write failed: an earlier write failed")
        try:
            self._write(s)
        except BaseException:
            self.failed = True
            raise

    def _write(self, s: int) -> None:
        st = self.staging
        offset, n = st.a + s * st.size, st.stage_span(s)
        view = st.ring[s % len(st.ring)][:n]
        if self.direct:
            try:
                done = 0
                while done < n:  # a short direct write ends on a block boundary: resume there
                    done += os.pwrite(self.fd, view[done:], offset + done)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise StorageError(f"write failed: {e.strerror}") from None
                self.buffered()  # accepted at fcntl, refused at write (some FUSE and network FS)
        pwrite_all(self.fd, view, offset)
        self.writeback.advance(offset + n)

    def buffered(self) -> None:
        if self.direct:
            self.direct = False
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)


def encrypt_file_range(
    cipher: ChunkCipher,
    read_at: ReadAt,
    dst_fd: int,
    progress: Progress | None = None,
    digest_update: Callable[[memoryview], None] | None = None,
    chunk_hashes: list[bytes] | None = None,
) -> None:
    """Encrypt the whole plaintext given by ``read_at`` into ``dst_fd`` at the layout's offsets.

    A pipeline over fixed rings of buffers (memory is constant whatever the size):
    the calling thread reads chunk i into a plaintext buffer (private, out of core
    dumps, zeroed at the end); ``workers()`` threads encrypt chunks straight into the
    staging buffers (a chunk straddling two goes through a scratch buffer); with
    ``digest_update`` one more thread feeds the plaintext to it strictly in order; one
    writer thread writes each stage once every chunk touching it is encrypted.
    Chunks retire in order, which is what marks a stage complete. With
    ``chunk_hashes`` (``layout.count`` entries) each encrypting thread stores the
    BLAKE3 of the chunk's ciphertext there, for signing. Returns once every byte of
    the payload is written (not yet fsynced); ``dst_fd``'s flags are as they were.
    """
    layout = cipher.layout
    w = workers()
    ring = 2 * w + 2
    staging = _Staging(layout.payload_offset, layout.file_length, layout.chunk_size + TAG_LEN)
    plains = [secret_buffer(layout.chunk_size) for _ in range(ring)]
    local = threading.local()  # each encrypting thread's scratch for a chunk straddling two stages
    writer = _Writer(dst_fd, staging, DIRECT)

    def seal(k: int, i: int) -> int:
        n = layout.plain_len(i)
        lo = layout.offset(i)
        parts = list(staging.pieces(lo, lo + n + TAG_LEN))
        if len(parts) == 1:
            out = parts[0]
        else:
            if not hasattr(local, "buf"):
                local.buf = memoryview(bytearray(layout.chunk_size + TAG_LEN))
            out = local.buf[: n + TAG_LEN]
        cipher.encrypt_chunk(i, plains[k][:n], out)
        if chunk_hashes is not None:
            chunk_hashes[i] = chunk_hash(out)
        if len(parts) > 1:
            at = 0
            for part in parts:
                part[:] = out[at : at + len(part)]
                at += len(part)
        return n

    pending: deque[tuple[int, Future[int], Future[None] | None]] = deque()
    written: dict[int, Future[None]] = {}
    next_stage = 0  # the first stage not yet handed to the writer

    def retire() -> None:
        nonlocal next_stage
        i, enc, hashed = pending.popleft()
        n = enc.result()
        if hashed is not None:
            hashed.result()
        end = layout.offset(i) + n + TAG_LEN
        while next_stage < staging.count and staging.a + (next_stage + 1) * staging.size <= end:
            written[next_stage] = out_pool.submit(writer.write, next_stage)
            next_stage += 1
        if i == layout.count - 1:
            while next_stage < staging.count:  # the last, shorter stage
                written[next_stage] = out_pool.submit(writer.write, next_stage)
                next_stage += 1
        if progress is not None:
            progress(n)

    def make_room(i: int) -> None:
        """Wait until the ring buffers that chunk i's ciphertext lands in are free."""
        last = staging.stage_of(layout.offset(i) + layout.plain_len(i) + TAG_LEN - 1)
        need = min(last, staging.count - 1) - len(staging.ring)
        while need >= 0 and next_stage <= need:
            retire()  # in-order retirement hands stage `need` to the writer
        if need >= 0 and need in written:
            written.pop(need).result()

    with (
        ThreadPoolExecutor(w, thread_name_prefix="modelseal-enc") as pool,
        ThreadPoolExecutor(1, thread_name_prefix="modelseal-hash") as hasher,
        ThreadPoolExecutor(1, thread_name_prefix="modelseal-write") as out_pool,
    ):
        try:
            for i in range(layout.count):
                if len(pending) == ring:
                    retire()
                make_room(i)
                k = i % ring
                view = plains[k][: layout.plain_len(i)]
                read_at(view, i * layout.chunk_size)
                enc = pool.submit(seal, k, i)
                hashed = hasher.submit(digest_update, view) if digest_update is not None else None
                pending.append((i, enc, hashed))
            while pending:
                retire()
            for s in sorted(written):
                written.pop(s).result()
        except BaseException:
            for _, enc, hashed in pending:
                enc.cancel()
                if hashed is not None:
                    hashed.cancel()
            for f in written.values():
                f.cancel()
            raise
        finally:
            out_pool.submit(writer.buffered).result()  # the caller writes the header unaligned
            for p in plains:
                p[:] = bytes(len(p))
    if len(staging.head):
        pwrite_all(dst_fd, staging.head, staging.p)
    if len(staging.tail):
        pwrite_all(dst_fd, staging.tail, staging.b)
