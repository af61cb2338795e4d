"""``SealedReader``: the seekable, thread-safe plaintext view of one sealed file.

Random reads (``pread``/``preadinto``) decrypt only the chunks a range spans;
sequential reads are served from a bounded read-ahead window decrypted on the
shared pool. The header, the envelope and the length check live in ``file``.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from modelseal.format.envelope import FileKeys, decrypt_metadata
from modelseal.format.file import RawArtifact, parse_json_object
from modelseal.format.header import TAG_LEN, Recipient
from modelseal.format.readahead import ReadAhead
from modelseal.format.source import CipherSource, holding_source_lock
from modelseal.format.stream import ChunkCipher, decrypt_into, decrypt_scatter, in_pool_thread, workers
from modelseal.util.hardening import secret_buffer

_LIVE: weakref.WeakSet[SealedReader] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker) has none of the parent's threads: a lock one of
    # them held stays locked, a read it had in flight never ends, a read-ahead future never
    # completes. Every live reader starts the child with fresh locks and an empty window.
    for reader in list(_LIVE):
        reader._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class SealedReader(io.RawIOBase):
    """Read-only, seekable view of a sealed file's plaintext.

    ``pread``/``preadinto`` decrypt only the chunks a range spans, straight
    into the caller's buffer, and are safe to call from several threads.
    Reads through the file position that continue where the last one ended are
    sequential: they are served from a bounded read-ahead window (``readahead``)
    decrypted on the pool while the caller consumes. Small random reads go through
    a one-chunk cache.
    """

    def __init__(
        self,
        src: CipherSource,
        raw: RawArtifact,
        keys: FileKeys,
        name: str | None = None,
        owns_src: bool = True,
        chunk_hashes: bytes | None = None,
    ) -> None:
        super().__init__()
        self._state = threading.Condition()  # guards _busy and _closing
        self._busy = 0  # reads in flight
        self._closing = True  # until constructed: a failed __init__ leaves nothing to close
        self._src = src
        self._owns_src = owns_src
        self.raw_artifact = raw
        self._cipher = ChunkCipher(keys.payload, raw.layout, chunk_hashes)
        self.verified = chunk_hashes is not None  # every chunk read is checked against a signature
        self._keys = keys
        self._pos = 0
        self._lock = threading.Lock()
        self._cache_index = -1
        self._cache = secret_buffer(raw.layout.chunk_size)  # plaintext: out of core dumps
        self._seq_end = 0  # where the last readinto ended: a read from here is sequential
        self._ahead: ReadAhead | None = None  # allocated on the first sequential read
        self._ahead_start = -1  # the plaintext offset of the chunk in _ahead_data
        self._ahead_data = memoryview(b"")
        self._chunked = raw.layout.count > 1  # one chunk: the one-chunk cache is read-ahead enough
        self._direct_min = 2 * workers() * raw.layout.chunk_size  # a read this big keeps every core busy alone
        self.name = name
        self.size = raw.core.plaintext_length
        self.context = dict(raw.core.context)
        self.recipients: tuple[Recipient, ...] = ()
        self.attachment_key = b""  # set by recipes.opening.open: decrypts the signature file's attachments
        self.verdict: Any = None  # the signature verdict, when verified on open
        self._closing = False
        _LIVE.add(self)
        if self.size == 0:
            # An empty plaintext is one empty chunk whose tag must still authenticate
            # (docs/format.md, section 6); no read would ever decrypt it, so check it here.
            self._cipher.read_chunk(src, 0, memoryview(bytearray(TAG_LEN)), memoryview(bytearray(0)))

    def metadata(self) -> dict[str, Any]:
        return parse_json_object(decrypt_metadata(self.raw_artifact.core, self._keys))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError("invalid whence")
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def preadinto(self, offset: int, buf: memoryview | bytearray, *, private: bool = False) -> int:
        """Decrypt plaintext at ``offset`` into ``buf``; returns the byte count.

        ``private=True`` promises that ``buf`` is fresh memory no other thread or
        process can see until this returns (a tensor being loaded): whole chunks
        are then decrypted in place, skipping a copy. Either way a failure zeroes
        the range and raises DecryptionError.
        """
        view = memoryview(buf).cast("B")
        if offset < 0:
            raise ValueError("negative offset")
        n = max(0, min(len(view), self.size - offset))
        if n == 0:
            if self._closing:
                raise ValueError("I/O operation on closed file")
            return 0
        cs = self._cipher.layout.chunk_size
        i = offset // cs
        if (offset + n - 1) // cs == i and n < cs:
            with self._lock:
                if self._closing:
                    raise ValueError("I/O operation on closed file")
                if self._cache_index != i:
                    self._cache_index = -1
                    clen = self._cipher.layout.plain_len(i)
                    decrypt_into(self._cipher, self._src, i * cs, memoryview(self._cache)[:clen], private=True)
                    self._cache_index = i
                lo = offset - i * cs
                view[:n] = self._cache[lo : lo + n]
            return n
        with self._reading():
            decrypt_into(self._cipher, self._src, offset, view[:n], private=private)
        return n

    def preadinto_many(self, offset: int, bufs: list[memoryview], *, private: bool = False) -> None:
        """Fill consecutive buffers from plaintext ``offset`` in one parallel pass
        (e.g. every tensor of a model). The range must lie inside the plaintext."""
        if offset < 0 or offset + sum(len(b) for b in bufs) > self.size:
            raise ValueError("range outside the plaintext")
        with self._reading():
            decrypt_scatter(self._cipher, self._src, offset, [memoryview(b).cast("B") for b in bufs], private=private)

    def pread(self, offset: int, size: int) -> bytes:
        buf = bytearray(max(0, min(size, self.size - offset)))
        self.preadinto(offset, buf, private=True)  # our own fresh buffer: whole chunks decrypted in place
        return bytes(buf)

    def readinto(self, buf: Any) -> int:
        """Read from the current position. A read that continues where the previous one
        ended is served from the read-ahead window; any other read is a ``preadinto``."""
        pos = self._pos
        view = memoryview(buf).cast("B")
        if pos == self._seq_end:
            with self._lock:  # the fast path: the whole read lies in the chunk at hand
                if self._closing:  # close sets it before it takes this lock to zero anything
                    raise ValueError("I/O operation on closed file")
                data = self._ahead_data
                lo = pos - self._ahead_start
                if lo >= 0 and lo + len(view) <= len(data):
                    view[:] = data[lo : lo + len(view)]
                    self._pos = self._seq_end = pos + len(view)
                    return len(view)
            if len(view) >= self._direct_min:
                n = self.preadinto(pos, view)  # big reads: every core decrypts and copies its own part
                self._pos = self._seq_end = pos + n
                return n
            if self._chunked and not in_pool_thread() and not holding_source_lock():  # never wait on the pool
                n = self._read_sequential(pos, view)
                self._pos = self._seq_end = pos + n
                return n
        n = self.preadinto(pos, view)
        self._pos = self._seq_end = pos + n
        return n

    def _read_sequential(self, pos: int, view: memoryview) -> int:
        n = max(0, min(len(view), self.size - pos))
        cs = self._cipher.layout.chunk_size
        got = 0
        with self._lock:  # held for the whole read: close zeroes the ring only after it
            if self._closing:
                raise ValueError("I/O operation on closed file")
            try:
                if self._ahead is None:
                    self._ahead = ReadAhead(self._cipher, self._src)
                while got < n:
                    at = pos + got
                    i = at // cs
                    if i * cs != self._ahead_start:
                        self._ahead_data = memoryview(b"")
                        self._ahead_data = self._ahead.chunk(i)
                        self._ahead_start = i * cs
                    lo = at - self._ahead_start
                    take = min(len(self._ahead_data) - lo, n - got)
                    view[got : got + take] = self._ahead_data[lo : lo + take]
                    got += take
            except BaseException:
                self._ahead_start = -1
                view[:n] = bytes(n)
                raise
        return n

    def readall(self) -> bytes:
        out = bytearray(max(0, self.size - self._pos))
        n = self.preadinto(self._pos, out, private=True)  # our own fresh buffer: decrypted in place
        self._pos = self._seq_end = self._pos + n
        return bytes(out)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a sealed reader has no plaintext file descriptor")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Count a read that runs without ``_lock`` (the parallel paths); refused once
        closing. ``close`` waits for the count to reach zero before it zeroes anything or
        closes the source. Reads under ``_lock`` check ``_closing`` under it instead."""
        with self._state:
            if self._closing:
                raise ValueError("I/O operation on closed file")
            self._busy += 1
        try:
            yield
        finally:
            with self._state:
                self._busy -= 1
                if self._busy == 0:
                    self._state.notify_all()

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._state = threading.Condition()
        self._busy = 0
        if self._ahead is not None:
            self._ahead.forget()
        self._ahead_start = -1
        self._ahead_data = memoryview(b"")

    def close(self) -> None:
        with self._state:
            if self._closing:
                return
            self._closing = True  # new reads are refused from here on
            while self._busy:
                self._state.wait()
        with self._lock:
            self._cache[:] = bytes(len(self._cache))
            self._cache_index = -1
            if self._ahead is not None:
                self._ahead.close()  # waits for its workers before the source closes
                self._ahead = None
            self._ahead_start = -1
            self._ahead_data = memoryview(b"")
        if self._owns_src:
            self._src.close()
        super().close()
