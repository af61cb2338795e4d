"""Random-access byte sources that sealed ciphertext is read from.

A ``CipherSource`` is what the reader layers need from storage: a size and a
positioned read that does not disturb other readers. ``FdSource`` uses
``os.preadv`` on a file descriptor (thread-safe, releases the GIL);
``FileObjSource`` adapts any seekable binary file object (an fsspec file on
S3 or in memory, for instance) behind a lock.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import threading
from typing import BinaryIO, Protocol


class CipherSource(Protocol):
    @property
    def size(self) -> int: ...

    def view(self, offset: int, size: int) -> memoryview | None:
        """Zero-copy access to ``size`` bytes at ``offset``, or None (then use readinto_at)."""
        ...

    def release(self, offset: int, size: int) -> None:
        """Hint that a range obtained by ``view`` is no longer needed."""
        ...

    def readinto_at(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset``; return how many bytes were read (short only at EOF)."""
        ...

    def close(self) -> None: ...


class FdSource:
    """A file descriptor; large regular files are also mapped read-only for zero-copy reads.

    Decrypting straight from the page cache saves one copy of every ciphertext
    byte (measured here: about 1.2x faster loads on this VM, whose memory
    bandwidth is the bottleneck). Pages are dropped from the mapping after use
    (``release``), so the process's RSS does not grow by the ciphertext size.
    As with any mmap reader (safetensors too), a file truncated by someone else
    while it is being read raises SIGBUS; sealed files are replaced by rename,
    never truncated, by modelseal itself.
    """

    MAP_MIN = 4 << 20

    def __init__(self, fd: int, owns: bool = True, map_file: bool = True) -> None:
        self.fd = fd
        self._owns = owns
        st = os.fstat(fd)
        self._size = st.st_size
        self._map: mmap.mmap | None = None
        self._mv: memoryview | None = None
        if map_file and stat.S_ISREG(st.st_mode) and self._size >= self.MAP_MIN:
            try:
                self._map = mmap.mmap(fd, self._size, prot=mmap.PROT_READ)
                self._mv = memoryview(self._map)
            except (OSError, ValueError):
                self._map = None

    @property
    def size(self) -> int:
        return self._size

    def view(self, offset: int, size: int) -> memoryview | None:
        if self._mv is None or offset < 0 or offset + size > self._size:
            return None
        return self._mv[offset : offset + size]

    def release(self, offset: int, size: int) -> None:
        if self._map is None:
            return
        lo = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (offset + size) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            with contextlib.suppress(OSError, ValueError):
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def readinto_at(self, buf: memoryview, offset: int) -> int:
        got = 0
        while got < len(buf):
            n = os.preadv(self.fd, [buf[got:]], offset + got)
            if n <= 0:
                break
            got += n
        return got

    def close(self) -> None:
        if self._mv is not None:
            self._mv.release()
            self._mv = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still exported: GC unmaps it later
                self._map.close()
            self._map = None
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

    def view(self, offset: int, size: int) -> memoryview | None:
        return None

    def release(self, offset: int, size: int) -> None:
        pass

    def readinto_at(self, buf: memoryview, offset: int) -> int:
        with self._lock:
            self._f.seek(offset)
            got = 0
            while got < len(buf):
                chunk = self._f.read(len(buf) - got)
                if not chunk:
                    break
                buf[got : got + len(chunk)] = chunk
                got += len(chunk)
            return got

    def close(self) -> None:
        if self._owns:
            self._f.close()
