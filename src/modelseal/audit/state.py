"""This host's record of what it last wrote to each audit log, for rollback detection.

One small file per log beside the host's audit key, so a host that writes to several
logs (its own SQLite file, a shared PostgreSQL database) keeps one record for each and
never compares one log with another's. The default log (``audit.db`` beside the key)
keeps its record in ``audit-signing.key.state``, as before; any other log in
``audit-signing.key.state-<id>``, where ``<id>`` is a hash of the log's identity
(``AuditStore.identity``: the SQLite file's absolute path, or the PostgreSQL URL
without its password). Each record names its log and holds the size and tree head
after this host's last append, and the Merkle frontier there, so the next append
checks only the entries written since (``audit.log``).

Before, every log shared ``audit-signing.key.state``. A record there that names no log
stays the default log's, unless another log holds exactly the recorded head: then it
was that log's, which adopts it (and removes it once it has its own). Owns only these
files; the checks are ``audit.log``'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelseal.audit import merkle
from modelseal.audit.checks import AuditLogError
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited, write_atomic

MAX_STATE = 16 * 1024


@dataclass(frozen=True)
class HostState:
    size: int
    head: bytes
    frontier: merkle.Frontier | None  # None in a record from before frontiers were kept
    log: str | None  # the log's identity; None in a record from before
    path: Path

    @property
    def legacy(self) -> bool:
        return self.log is None


class StateFiles:
    """The records of one audit key for one log."""

    def __init__(self, key_path: Path, identity: str) -> None:
        self.legacy_path = key_path.with_name(key_path.name + ".state")
        self._default = identity == f"sqlite:{key_path.with_name('audit.db').resolve()}"
        digest = hashlib.sha256(b"modelseal/audit-state/v1\x00" + identity.encode()).hexdigest()[:32]
        self.path = self.legacy_path if self._default else key_path.with_name(f"{key_path.name}.state-{digest}")
        self._identity = identity
        self._adopted: HostState | None = None

    def last_written(self, head_at: Callable[[int], bytes | None]) -> HostState | None:
        """What this host last appended to this log (``head_at`` reads the log's head at an entry)."""
        own = _read(self.path)
        if own is not None and own.log in (None, self._identity):
            return own  # a record naming no log in the default log's file is the default log's
        if own is not None or self._default:
            return None  # another log's record (only in a file edited by hand)
        legacy = _read(self.legacy_path)
        if legacy is not None and legacy.log is None and head_at(legacy.size) == legacy.head:
            self._adopted = legacy  # written for this log before records were kept per log
            return legacy
        return None

    def save(self, frontier: merkle.Frontier) -> None:
        doc = {
            "log": self._identity,
            "size": frontier.size,
            "head": frontier.root().hex(),
            "frontier": [h.hex() for h in frontier.hashes()],
        }
        write_atomic(self.path, json.dumps(doc).encode(), mode=0o600)
        adopted, self._adopted = self._adopted, None
        now = _read(self.legacy_path) if adopted is not None else None
        if (
            adopted is not None
            and now is not None
            and (now.size, now.head, now.log) == (adopted.size, adopted.head, None)
        ):
            with contextlib.suppress(FileNotFoundError):
                self.legacy_path.unlink()  # it was this log's: the default log must not take it


def _read(path: Path) -> HostState | None:
    def damaged(_why: str) -> AuditLogError:
        return AuditLogError(f"the audit state file {path} is damaged")

    try:  # bounded, and a FIFO never blocks
        raw = read_limited(path, MAX_STATE, damaged, str(path), regular=True)
    except FileNotFoundError:
        return None
    doc = json_loads(raw, max_depth=3, max_values=256, error=damaged)
    try:
        size, head, log = doc["size"], bytes.fromhex(doc["head"]), doc.get("log")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1 or len(head) != 32:
            raise ValueError
        if log is not None and not isinstance(log, str):
            raise ValueError
        hashes = doc.get("frontier")
        frontier = None if hashes is None else merkle.Frontier.restore(size, [bytes.fromhex(h) for h in hashes])
        if frontier is not None and frontier.root() != head:
            raise ValueError
    except (KeyError, ValueError, TypeError, AttributeError):
        raise damaged("fields") from None
    return HostState(size, head, frontier, log, path)
