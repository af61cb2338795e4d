"""Monotonic version records this host keeps under ``$MODELSEAL_HOME`` (rollback protection).

One small JSON file per kind of record (``revocation-state.json`` for revocation lists,
``artifact-state.json`` for accepted artifacts, ``signing-state.json`` for what this
host signed), mapping a key to the highest version recorded. A record only ever rises:
updates are serialised by a lock file and re-read under it, so concurrent processes
never lower one. Best effort where the host keeps no state (no ``$MODELSEAL_HOME``
folder): callers then rely on the floors their policy sets. A damaged file reads as
empty (the next update rewrites it). Knows nothing of what the versions count.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from modelseal.errors import PolicyDenied
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited, write_atomic
from modelseal.util.home import checked_home

MAX_VERSION = (1 << 53) - 1  # exact in every JSON implementation


def record_path(path: str | os.PathLike[str]) -> str:
    """How a record names a file (a trust policy, a revocation list): its folder resolved,
    so every spelling of it (``//etc/x``, ``a/./b``, a symlinked folder) keeps one record,
    and its own name as given, not resolved, so a symlink swapped in at that name does
    not get a fresh, empty record."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(os.path.realpath(folder or os.curdir), name)


def is_version(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= MAX_VERSION


MAX_RECORDS = 64 << 20  # half a million names and environments


class VersionRecord:
    """The highest version seen for each key, in ``$MODELSEAL_HOME/<file_name>``."""

    def __init__(self, file_name: str) -> None:
        self.file_name = file_name

    def _read(self, home: Path) -> dict[str, Any]:
        def damaged(why: str) -> ValueError:
            return ValueError(why)

        try:  # this host's own file, bounded all the same; missing or unreadable reads as no record
            raw = read_limited(home / self.file_name, MAX_RECORDS, damaged, self.file_name, regular=True)
            doc = json_loads(raw, max_depth=2, max_values=1_000_000, error=damaged)
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def seen(self, key: str) -> int:
        # A home that others may write is refused, as config.toml is: they could erase records.
        v = self._read(checked_home(PolicyDenied)).get(key, 0)
        return v if is_version(v) else 0

    def record(self, key: str, version: int) -> None:
        """Raise the record for ``key`` to ``version`` (never lowers it)."""
        home = checked_home(PolicyDenied)
        if not home.is_dir() or not is_version(version, 1) or self.seen(key) >= version:
            return
        with contextlib.suppress(OSError):
            fd = os.open(home / (self.file_name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                doc = self._read(home)
                current = doc.get(key, 0)
                if not is_version(current) or current < version:
                    doc[key] = version
                    write_atomic(home / self.file_name, json.dumps(doc, sort_keys=True).encode(), mode=0o600)
            finally:
                os.close(fd)
