"""Random-access byte sources that sealed ciphertext is read from.

A ``CipherSource`` is what the reader layers need from storage: a size and a
positioned read that does not disturb other readers. ``FdSource`` uses
``os.preadv`` on a file descriptor (thread-safe, releases the GIL);
``FileObjSource`` adapts any seekable binary file object (an fsspec file on
S3 or in memory, for instance) behind a lock.
"""

from __future__ import annotations

import os
import threading
from typing import BinaryIO, Protocol

from modelseal.errors import StorageError

_HOLDING = threading.local()


def holding_source_lock() -> bool:
    """True while this thread reads through a ``FileObjSource`` (holding its lock). A source
    that itself decrypts (``sealed::`` over a sealed file) then runs on this thread: it must
    not wait on the shared pool, whose threads may all be waiting for this very lock."""
    return bool(getattr(_HOLDING, "depth", 0))


def _storage_error(e: OSError) -> StorageError:
    return StorageError(f"reading the sealed file failed: {e.strerror or type(e).__name__}")


class CipherSource(Protocol):
    @property
    def size(self) -> int: ...

    def readinto_at(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset``; return how many bytes were read (short only at EOF)."""
        ...

    def close(self) -> None: ...


class FdSource:
    """Positioned reads on a file descriptor: ``os.preadv``, thread-safe, GIL released.

    (A read-only mmap was tried for zero-copy ciphertext access: no faster here
    once page faults are counted, and a file truncated under the mapping would
    crash the process with SIGBUS; so plain preads it is.)
    """

    def __init__(self, fd: int, owns: bool = True) -> None:
        self.fd = fd
        self._owns = owns
        self._size = os.fstat(fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def readinto_at(self, buf: memoryview, offset: int) -> int:
        got = 0
        try:
            while got < len(buf):
                n = os.preadv(self.fd, [buf[got:]], offset + got)
                if n <= 0:
                    break
                got += n
        except OSError as e:
            raise _storage_error(e) from None
        return got

    def close(self) -> None:
        if self._owns and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileObjSource:
    """Positioned reads over a seekable file object; one read at a time."""

    def __init__(self, fileobj: BinaryIO, owns: bool = True) -> None:
        self._f = fileobj
        self._owns = owns
        self._lock = threading.Lock()
        # The size comes from the object itself, never from a caller's claim, so the
        # exact-length check of the format still catches trailing data.
        self._size = fileobj.seek(0, os.SEEK_END)

    @property
    def size(self) -> int:
        return self._size

    def readinto_at(self, buf: memoryview, offset: int) -> int:
        with self._lock:
            _HOLDING.depth = getattr(_HOLDING, "depth", 0) + 1
            try:
                self._f.seek(offset)
                got = 0
                while got < len(buf):
                    chunk = self._f.read(len(buf) - got)
                    if not chunk:
                        break
                    buf[got : got + len(chunk)] = chunk
                    got += len(chunk)
                return got
            except OSError as e:
                raise _storage_error(e) from None
            finally:
                _HOLDING.depth -= 1

    def close(self) -> None:
        if self._owns:
            self._f.close()
