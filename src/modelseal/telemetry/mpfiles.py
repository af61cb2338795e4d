"""prometheus_client's multi-process files, made fit for a long-running server (docs/monitoring.md).

Two things prometheus_client 0.26 leaves to its caller:

- **Names.** Each process writes ``counter_<id>.db`` and ``histogram_<id>.db`` in the
  multi-process directory, ``<id>`` being its ``process_identifier`` (the pid by default:
  one more pair of files per worker death, for the rest of the run, each read at every
  scrape). ``identifier`` is the name ``claim`` gave this process (a worker's index:
  ``w0``, ``w1``...) and the pid otherwise (the parent, a helper child), so a replacement
  worker reopens its predecessor's files: its counters go on from their totals, a gauge it
  sets replaces the dead worker's value, and the directory holds a bounded number of
  files. The supervisor starts a replacement only after the old worker was reaped, so two
  live processes never share a name.
- **Space.** prometheus_client makes each file sparse (``truncate`` to 64 KiB, doubled when
  full) and writes it through ``mmap``: a page the filesystem cannot supply at the first
  write (a full disk or tmpfs) is a SIGBUS, which kills the process whatever it guards.
  ``AllocatedDict`` (installed as prometheus_client's ``MmapedDict``) reserves the blocks
  with ``posix_fallocate`` before the file is mapped (``INITIAL`` bytes, and every hole of
  a file it reopens) and before each growth, so no space is then missing under a mapped
  page: a full filesystem is an ``OSError`` (ENOSPC) where a file is opened or grows, which
  the counting paths guard, never a signal.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from prometheus_client import mmap_dict

INITIAL = 1 << 18  # 256 KiB a file: a server's counters fit, so steady state never grows one
KINDS = ("counter", "histogram")  # the files the package's metrics write (no gauge lives in them)
_NAME = re.compile(r"[a-z][a-z0-9]{0,15}")
_claimed: tuple[int, str] | None = None  # (pid, name): a forked child does not inherit it


def claim(name: str) -> None:
    """Name this process's files ``name`` (``w<index>`` for a worker) from now on."""
    global _claimed
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a multi-process file name: {name[:40]!r}")
    _claimed = (os.getpid(), name)


def identifier() -> str:
    """This process's file name: the claimed one, else its pid (prometheus_client's default)."""
    got = _claimed
    return got[1] if got is not None and got[0] == os.getpid() else str(os.getpid())


def allocate(path: str | Path, size: int = INITIAL) -> None:
    """Create ``path`` if needed (0600, never through a symlink) and reserve its blocks up
    to ``size`` or its current size, whichever is larger (holes included)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(size, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def prepare(directory: str | Path, name: str) -> None:
    """Claim ``name`` and allocate its files in ``directory`` now (a worker at start: a full
    filesystem is refused there, with the error, not met at the first count)."""
    claim(name)
    for kind in KINDS:
        allocate(Path(directory) / f"{kind}_{name}.db")


def _entry_size(key: str) -> int:
    encoded = len(key.encode("utf-8"))
    return 4 + encoded + (8 - (encoded + 4) % 8) + 16  # MmapedDict._init_value's layout


class AllocatedDict(mmap_dict.MmapedDict):
    """prometheus_client's ``MmapedDict`` whose file blocks are reserved before they are mapped."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            allocate(filename)
        super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]

    def _init_value(self, key: str) -> None:
        need = self._used + _entry_size(key)
        if need > self._capacity:  # it is about to double the file: reserve the new size first
            size = self._capacity
            while need > size:
                size *= 2
            os.posix_fallocate(self._f.fileno(), 0, size)
        super()._init_value(key)  # type: ignore[no-untyped-call]


__all__ = ["INITIAL", "KINDS", "AllocatedDict", "allocate", "claim", "identifier", "prepare"]
