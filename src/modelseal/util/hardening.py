"""Process hardening: no keys or plaintext in core dumps.

Owns: switching core dumps off for the whole process (``RLIMIT_CORE`` 0 and, on Linux,
``prctl(PR_SET_DUMPABLE, 0)``, which also covers a core piped to a crash handler that
ignores the limit), the loaders' opt-out (``MODELSEAL_ALLOW_CORE_DUMPS=1``), and
keeping buffers that hold keys or decrypted bytes out of any dump that still happens
(``madvise(MADV_DONTDUMP)``): ``secret_buffer`` allocates such a buffer, ``dont_dump``
marks memory someone else allocated. And a helper process that must not outlive its
parent (``dies_with_parent``: ``PR_SET_PDEATHSIG``).

Everything here is best effort and never raises: a platform without these calls loses
the defence in depth, not the ability to load a model. Knows nothing of the format,
keys or loaders.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import resource
import sys
import threading
from typing import Any

ALLOW_CORE_DUMPS_ENV = "MODELSEAL_ALLOW_CORE_DUMPS"

_PR_GET_DUMPABLE, _PR_SET_DUMPABLE = 3, 4  # <linux/prctl.h>
_PAGE = mmap.PAGESIZE
_LINUX = sys.platform.startswith("linux")
_MADV_DONTDUMP: int | None = getattr(mmap, "MADV_DONTDUMP", None)

_log = logging.getLogger("modelseal")
_lock = threading.Lock()
_loader_done = False


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.prctl.restype = ctypes.c_int
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def disable_core_dumps(*, permanent: bool) -> bool:
    """Make a crash of this process write no core file. True if every step took.

    ``permanent`` also lowers the hard limit, which the process cannot raise again
    (the CLI); without it only the soft limit is lowered, so an application that embeds
    the loaders can still turn dumps back on itself.
    """
    ok = True
    try:
        _soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0 if permanent else hard))
    except (OSError, ValueError):
        ok = False
    if _LINUX:
        # A core_pattern that pipes to a handler (systemd-coredump, apport) is not bound by
        # RLIMIT_CORE; a non-dumpable process is not dumped at all (fs.suid_dumpable=0).
        try:
            ok = _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0 and ok
        except (OSError, AttributeError):
            ok = False
    return ok


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def dies_with_parent() -> Any:
    """A ``subprocess.Popen`` ``preexec_fn``: the child is sent SIGKILL when the thread that
    started it dies, even by SIGKILL (Linux ``prctl(PR_SET_PDEATHSIG)``), and kills itself at
    once if that thread died before the call. None where there is no such call. Best effort."""
    if not _LINUX:
        return None
    try:
        prctl = _libc().prctl  # looked up before the fork: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)  # SIGKILL
        if os.getppid() != parent:
            os.kill(os.getpid(), 9)

    return preexec


def is_dumpable() -> bool | None:
    """The process's ``PR_GET_DUMPABLE`` flag (None where it cannot be asked)."""
    if not _LINUX:
        return None
    try:
        return bool(_libc().prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))
    except (OSError, AttributeError):
        return None


def harden_cli() -> None:
    """For ``modelseal``'s ``main``: core dumps off for good, no opt-out."""
    disable_core_dumps(permanent=True)


def harden_loader() -> None:
    """For the loaders, once per process: core dumps off unless ``MODELSEAL_ALLOW_CORE_DUMPS=1``.

    The opt-out loosens a protection, so it is logged (once) rather than silent.
    """
    global _loader_done
    with _lock:  # held while switching: no other thread decrypts before it is done
        if _loader_done:
            return
        _loader_done = True
        if os.environ.get(ALLOW_CORE_DUMPS_ENV) == "1":
            _log.warning(
                "%s=1: core dumps stay enabled; a crash may write decrypted weights to disk", ALLOW_CORE_DUMPS_ENV
            )
            return
        disable_core_dumps(permanent=False)


def _advise(start: int, end: int, advice: int | None) -> bool:
    """``madvise(start, end - start, advice)`` on page-aligned bounds; False if it did not take."""
    if advice is None or end <= start:
        return False
    try:
        return int(_libc().madvise(start, end - start, advice)) == 0
    except (OSError, AttributeError):
        return False


def _writable_address(buf: Any) -> tuple[int, int] | None:
    """(address, length) of a writable, contiguous, non-empty buffer, else None."""
    view = memoryview(buf)
    if view.nbytes == 0 or view.readonly or not view.c_contiguous:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view.cast("B"))), view.nbytes


def _madvise(address: int, length: int) -> bool:
    if length <= 0:
        return False
    # madvise works on whole pages: round outwards. The neighbours of the buffer on those
    # pages are left out of a dump too, which hides more, never less.
    start = address - address % _PAGE
    end = -(-(address + length) // _PAGE) * _PAGE
    return _advise(start, end, _MADV_DONTDUMP)


_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
HUGE_PAGE = 2 << 20


def prefer_huge_pages(buf: Any) -> bool:
    """Ask for transparent huge pages on the 2 MiB-aligned interior of ``buf``: fresh memory
    about to be filled in full (a tensor being loaded). A speed hint that shares this module's
    madvise plumbing: measured here, first-touch faults on 4 KiB pages cost more than the
    AES-GCM decryption that fills them (a 16 MiB torch tensor: 24 ms against 9 ms with huge
    pages). It changes where memory lives, never what it holds. Best effort; rounds inwards,
    so no neighbouring memory is touched."""
    if not _LINUX:
        return False
    try:
        found = _writable_address(buf)
    except (TypeError, ValueError, BufferError):
        return False
    if found is None or found[1] < HUGE_PAGE:
        return False
    address, length = found
    return _advise(-(-address // HUGE_PAGE) * HUGE_PAGE, (address + length) // HUGE_PAGE * HUGE_PAGE, _MADV_HUGEPAGE)


def dont_dump(buf: Any) -> bool:
    """Leave the memory of ``buf`` (a bytearray, a writable memoryview, a numpy array,
    ``bytes``) out of core dumps. Best effort: False if the platform cannot do it.

    Pages stay marked after ``buf`` is freed and the allocator reuses them: harmless,
    since it only hides more.
    """
    try:
        if isinstance(buf, mmap.mmap):
            if _MADV_DONTDUMP is None or len(buf) == 0:
                return False
            buf.madvise(_MADV_DONTDUMP)
            return True
        if isinstance(buf, bytes):
            if not buf:
                return False
            address = ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value
            return address is not None and _madvise(address, len(buf))
        found = _writable_address(buf)
        return found is not None and _madvise(*found)
    except (TypeError, ValueError, BufferError, OSError):
        return False


def secret_buffer(size: int) -> memoryview:
    """A zeroed, writable buffer of ``size`` bytes for keys or plaintext, left out of
    core dumps: its own private anonymous mapping (never shared with a forked child,
    returned to the kernel when the last view of it is released)."""
    if size <= 0:
        return memoryview(bytearray(0))
    try:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    except (OSError, ValueError):
        buf = bytearray(size)
        dont_dump(buf)
        return memoryview(buf)
    dont_dump(mm)
    return memoryview(mm)


__all__ = [
    "ALLOW_CORE_DUMPS_ENV",
    "disable_core_dumps",
    "dont_dump",
    "harden_cli",
    "harden_loader",
    "is_dumpable",
    "prefer_huge_pages",
    "secret_buffer",
]
