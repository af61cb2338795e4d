"""The backup store interface (docs/recovery.md, "Backups"): ``BackupStore`` and ``BackupWriter``,
S3 Object Lock ``Retention``, and the fixed patterns every name read back from a store is
checked against before it becomes a path or an object key. The backends are ``recovery.stores``
(a folder, and ``open_store``) and ``recovery.s3store``.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Protocol

from modelseal.errors import BackupError
from modelseal.recovery.manifest import ID

REL = re.compile(r"manifest\.json|parts/[a-z][a-z0-9-]{0,31}\.mseal")


@dataclass(frozen=True)
class Retention:
    """S3 Object Lock retention for every object of a backup."""

    mode: str  # "COMPLIANCE" | "GOVERNANCE"
    seconds: float


class BackupWriter(Protocol):
    def put(self, rel: str, data: bytes) -> None: ...

    def commit(self, manifest: bytes) -> None:
        """Write ``manifest.json``, last; the backup lists from then on."""
        ...

    def abort(self) -> None:
        """Remove everything written (nothing may look like a backup afterwards)."""
        ...


class BackupStore(Protocol):
    url: str  # as shown to the operator
    state_key: str  # this destination's identity in the host's backup state

    def list_ids(self) -> list[str]:
        """The ids of the complete backups (with a manifest), oldest first."""
        ...

    def read(self, backup_id: str, rel: str, limit: int) -> bytes:
        """One file of a backup, whole; more than ``limit`` bytes is ``BackupTampered``."""
        ...

    def object_lock(self) -> bool:
        """Whether the destination has S3 Object Lock (retention can be set)."""
        ...

    def begin(self, backup_id: str, retention: Retention | None) -> BackupWriter: ...

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Held for a whole ``create``: one writer per destination on this host."""
        ...

    def close(self) -> None: ...


def check_id(backup_id: str) -> str:
    if not isinstance(backup_id, str) or not ID.fullmatch(backup_id):
        raise BackupError("a backup id looks like 20260101T000000Z-0123abcd")
    return backup_id


def check_rel(rel: str) -> str:
    if not REL.fullmatch(rel):
        raise BackupError(f"not a file of a backup: {rel[:80]!r}")
    return rel


__all__ = ["REL", "BackupStore", "BackupWriter", "Retention", "check_id", "check_rel"]
