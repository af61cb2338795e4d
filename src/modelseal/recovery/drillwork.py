"""Where a restore drill puts its throwaway environment, and what a killed drill left behind
(docs/recovery.md, "Restore drills").

The drill works in ``$MODELSEAL_HOME/.drill-<random>/`` (mode 0700, inside the home that
already holds the live equivalents of what is restored there), not in ``$TMPDIR``: a
drill killed midway leaves the restored environment where only this user can read it, and
where the next drill finds it. The folder is locked (``flock`` on the folder itself) for
the drill's life; every drill starts by sweeping the ``.drill-*`` folders no drill holds:
their temporary OpenBao server, if still running, is killed by the PID it left
(``recovery.baosnap.PIDFILE``, and only if that PID still runs ``bao server`` with that
folder's config), then the folder is removed. The drill removes its own folder on the
way out. The server also dies with the drill (``util.hardening.dies_with_parent``).

``without_audit_key(part)``: the ``config`` part minus the audit signing key. The drill
never puts the live audit key into its folder: the restored log is checked against the
live host's audit keys, and the drill's record is signed in the live home.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from modelseal.errors import BackupError
from modelseal.recovery.baosnap import PIDFILE
from modelseal.recovery.partcodec import HEADER_KEY, decode_files, encode_files
from modelseal.util.files import read_limited, remove_path

PREFIX = ".drill-"
BAO_FOLDER = "openbao"
AUDIT_KEY = "audit/audit-signing.key"


def _lock(path: Path, *, wait: bool) -> int | None:
    """An fd holding ``flock`` on the folder ``path``, or None if another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def stop_stale_bao(folder: Path, timeout: float = 10.0) -> bool:
    """Kill (SIGKILL, by PID) the OpenBao server a killed drill left in ``folder``, if the PID
    in its pid file still runs ``bao server`` with that folder's config. Whether one was."""
    work = folder / BAO_FOLDER
    try:
        pid = int(read_limited(work / PIDFILE, 32, BackupError, "the pid file", regular=True).strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, BackupError):
        return False
    if pid <= 1 or f"-config={work / 'bao.hcl'}".encode() not in argv:
        return False  # gone, or the PID is another process's now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # its own session and group (start_new_session)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes():
                break  # a zombie now, for its parent to reap
        except OSError:
            break
        time.sleep(0.05)
    return True


def sweep(home: Path) -> list[str]:
    """Remove the ``.drill-*`` folders in ``home`` no running drill holds (their OpenBao
    stopped first); the names removed."""
    removed = []
    for path in sorted(home.glob(PREFIX + "*")):
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
            removed.append(path.name)
            continue
        try:
            fd = _lock(path, wait=False)
        except OSError:
            continue
        if fd is None:
            continue  # a drill running now
        try:
            stop_stale_bao(path)
            remove_path(path)
            removed.append(path.name)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def work_folder(home: Path) -> Iterator[Path]:
    """A fresh ``home/.drill-<random>`` (0700), locked while in use, removed on exit; the
    stale ones swept first (module docstring)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    sweep(home)
    while True:
        path = home / f"{PREFIX}{secrets.token_hex(8)}"
        path.mkdir(mode=0o700)
        try:
            fd = _lock(path, wait=True)
        except FileNotFoundError:
            continue  # another drill's sweep took it between the mkdir and the lock
        assert fd is not None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.lstat(path)):
                break
        os.close(fd)
    try:
        yield path
    finally:
        try:
            stop_stale_bao(path)  # normally stopped already; not if its context was skipped
            remove_path(path)
        finally:
            os.close(fd)


def without_audit_key(data: bytes) -> bytes:
    """The ``config`` part ``data`` without the audit signing key (module docstring)."""
    header, files = decode_files(data, "config")
    if AUDIT_KEY not in files:
        return data
    del files[AUDIT_KEY]
    extra = {k: v for k, v in header.items() if k not in (HEADER_KEY, "name", "kind")}
    return encode_files("config", files, **extra)


__all__ = ["PREFIX", "stop_stale_bao", "sweep", "without_audit_key", "work_folder"]
