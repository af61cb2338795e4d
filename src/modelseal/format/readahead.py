"""Bounded read-ahead for sequential reads of one sealed file.

While the caller consumes chunk i, chunks i+1 .. i+depth-1 are read and
decrypted on the shared pool, each into a slot of a fixed ring of private
plaintext buffers (out of core dumps, zeroed on close). A chunk's plaintext
reaches the caller only after its tag (and, with a signed chunk table, its
hash) verified: a slot whose decryption failed is zeroed by the cipher and
its error is raised when, and only when, the caller reads that chunk. A
speculative chunk nobody reads never raises.

Memory is bounded: ``depth`` slots of one chunk each, allocated on first
use, ``depth`` a few chunks per core and at most ``MAX_BYTES`` in all (or two
chunks, for chunks over 12 MiB: double buffering is the least that overlaps).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from dataclasses import dataclass, field

from modelseal.format.source import CipherSource
from modelseal.format.stream import ChunkCipher, submit, thread_scratch, workers
from modelseal.util.hardening import secret_buffer

MAX_BYTES = 24 << 20  # the ring's ceiling, whatever the chunk size
PER_CORE = 3  # chunks in flight per core: enough to keep every core busy between the caller's reads


def depth_for(chunk_size: int) -> int:
    return max(2, min(PER_CORE * workers() + 1, MAX_BYTES // max(1, chunk_size)))


@dataclass
class _Slot:
    buf: memoryview
    index: int = -1
    future: Future[None] | None = field(default=None)

    def settle(self) -> None:
        """Wait for this slot's decryption (if any) to finish, ignoring its outcome. An
        interrupt during the wait (KeyboardInterrupt) propagates: the slot is then left as
        it is, never handed to another chunk while its worker may still write into it."""
        f = self.future
        if f is not None and not f.cancel():
            with contextlib.suppress(Exception):  # the job's own error, raised when its chunk is read
                f.result()


class ReadAhead:
    """The decrypted window ahead of a sequential reader. Not thread-safe: the reader
    holds its lock around every call."""

    def __init__(self, cipher: ChunkCipher, src: CipherSource) -> None:
        self._cipher = cipher
        self._src = src
        layout = cipher.layout
        self._count = layout.count
        self._depth = min(depth_for(layout.chunk_size), self._count)
        self._slots = [_Slot(secret_buffer(layout.chunk_size)) for _ in range(self._depth)]

    def _schedule(self, j: int) -> _Slot:
        slot = self._slots[j % self._depth]
        if slot.index == j:
            return slot
        slot.settle()  # the old occupant's worker must be done with this buffer
        slot.index = j
        n = self._cipher.layout.plain_len(j)
        out = slot.buf[:n]
        cipher, src, cs = self._cipher, self._src, self._cipher.layout.chunk_size

        def job() -> None:
            with thread_scratch(cs) as (scratch, _plain):
                cipher.read_chunk(src, j, scratch, out)

        slot.future = submit(job)
        return slot

    def chunk(self, i: int) -> memoryview:
        """Chunk i's verified plaintext (valid until the next call), with the chunks after
        it scheduled. Raises the chunk's DecryptionError/VerificationError."""
        slot = self._schedule(i)
        for j in range(i + 1, min(self._count, i + self._depth)):
            self._schedule(j)
        f = slot.future
        if f is not None:
            try:
                f.result()
            except BaseException:
                slot.index = -1  # a retry decrypts again rather than trusting the zeroed slot
                if f.done():  # interrupted while waiting (KeyboardInterrupt): keep it to settle later
                    slot.future = None
                raise
        return slot.buf[: self._cipher.layout.plain_len(i)]

    def forget(self) -> None:
        """In a forked child: the parent's workers do not exist here and their futures
        never complete. Drop them without waiting; every slot is decrypted again."""
        for slot in self._slots:
            slot.future = None
            slot.index = -1

    def close(self) -> None:
        """Wait for every worker still writing into a slot, then zero the ring."""
        for slot in self._slots:
            slot.settle()
            slot.future = None
            slot.index = -1
            slot.buf[:] = bytes(len(slot.buf))
