"""The audit-log checks of a restore drill (docs/recovery.md, "Restore drills").

The restored log must verify whole (every head recomputed, every signature checked) under
the audit keys this host trusts *now* (its own and ``audit-hosts.toml``'s, read from the
live home: never a key that came out of the backup), and it must be exactly what the backup
recorded: the tree size and head hex of the audit part's manifest entry. Then, where they
can be reached, it is tied to what is known outside the backup: the live log must extend the
backup's tree head (the root of its first ``size`` leaves equals the recorded head; the
entries after it are the events the backup does not hold, the RPO in events), and a signed
checkpoint from a witness, if given, must be consistent with it (a checkpoint no longer
than the backup against the restored log, a longer one against the live log). A check that
cannot be made (a checkpoint newer than the backup and no live log) is a failure, not a pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from modelseal.audit import merkle
from modelseal.audit.checks import parse_checkpoint
from modelseal.audit.hosts import HostKey, key_id
from modelseal.audit.log import MerkleAuditLog
from modelseal.errors import ModelsealError
from modelseal.recovery.drillcheck import Failure

SUBJECT = "audit log"


@dataclass
class AuditFindings:
    restored_size: int = 0
    recorded_size: int | None = None
    live_size: int | None = None
    events_after: int | None = None  # live entries after the backup's tree head
    checkpoint_size: int | None = None
    failures: list[Failure] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.failures.append(Failure(SUBJECT, what))

    def to_json(self) -> dict[str, Any]:
        return {
            "restored_size": self.restored_size,
            "recorded_size": self.recorded_size,
            "live_size": self.live_size,
            "events_after_backup": self.events_after,
            "checkpoint_size": self.checkpoint_size,
            "ok": not self.failures,
        }


def recorded_head(meta: Mapping[str, Any]) -> tuple[int, bytes] | None:
    """(size, head) the backup's audit part records (None if it records none)."""
    size, root = meta.get("size"), meta.get("root")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(root, str):
        return None
    try:
        head = bytes.fromhex(root)
    except ValueError:
        return None
    return (size, head) if len(head) == 32 else None


def _leaves(log: MerkleAuditLog) -> list[bytes]:
    return log.leaves()


def check_audit(
    restored: Path | str,
    trusted: Mapping[str, Ed25519PublicKey],
    recorded: tuple[int, bytes] | None,
    *,
    scratch: Path,
    live: MerkleAuditLog | None = None,
    checkpoint: Mapping[str, Any] | None = None,
) -> AuditFindings:
    """The checks of the module docstring. ``restored``: the restored log's database;
    ``trusted``: key id -> audit key, from the live host; ``scratch``: a private folder
    (the restored log is opened with no audit key and no record of a last write of its own)."""
    out = AuditFindings(recorded_size=None if recorded is None else recorded[0])
    if not trusted:  # the log would then be checked against the key it names itself
        out.fail("this host trusts no audit key (no audit-signing.key or audit-hosts.toml): nothing to verify with")
        return out
    hosts = {kid: HostKey(f"trusted-{i}", k) for i, (kid, k) in enumerate(sorted(trusted.items()))}
    try:
        log = MerkleAuditLog(restored, key_path=scratch / "no-audit-key" / "audit-signing.key", hosts=hosts)
        v = log.verify()
        leaves = _leaves(log) if v.ok else []
    except ModelsealError as e:
        out.fail(f"the restored audit log cannot be read ({type(e).__name__}: {str(e)[:200]})")
        return out
    out.restored_size = v.size
    if not v.ok:
        where = f" (entry {v.first_bad})" if v.first_bad is not None else ""
        out.fail(f"the restored audit log does not verify{where}: {v.reason}")
        return out
    if recorded is None:
        out.fail("the backup records no tree head of the audit log: nothing to check the restored log against")
        return out
    size, head = recorded
    if v.size != size or merkle.root(leaves) != head:
        out.fail(f"the restored audit log ({v.size} entries) is not the one the backup recorded ({size} entries)")
        return out
    live_leaves: list[bytes] | None = None
    if live is not None:
        try:
            live_leaves = _leaves(live)
        except ModelsealError as e:
            out.fail(f"the live audit log cannot be read ({type(e).__name__})")
        if live_leaves is not None:
            out.live_size = len(live_leaves)
            if len(live_leaves) < size or merkle.root(live_leaves[:size]) != head:
                out.fail("the live audit log does not extend the backup's tree head (rewritten or rolled back)")
                live_leaves = None
            else:
                out.events_after = len(live_leaves) - size
    if checkpoint is not None:
        _check_checkpoint(out, checkpoint, trusted, leaves, live_leaves)
    return out


def _check_checkpoint(
    out: AuditFindings,
    checkpoint: Mapping[str, Any],
    trusted: Mapping[str, Ed25519PublicKey],
    leaves: list[bytes],
    live_leaves: list[bytes] | None,
) -> None:
    parsed = parse_checkpoint(checkpoint)
    if parsed is None:
        out.fail("the checkpoint is invalid or its signature does not verify")
        return
    key, (size, head) = parsed
    out.checkpoint_size = size
    if key_id(key) not in trusted:
        out.fail("the checkpoint is signed by an audit key this host does not trust")
        return
    against = leaves if size <= len(leaves) else live_leaves
    if against is None or size > len(against):
        out.fail(f"the checkpoint ({size} entries) is newer than the backup and the live log cannot tell")
    elif merkle.root(against[:size]) != head:
        which = "restored" if against is leaves else "live"
        out.fail(f"the {which} audit log is not consistent with the checkpoint of {size} entries")


__all__ = ["SUBJECT", "AuditFindings", "check_audit", "recorded_head"]
