"""A verification running while another process appends never reports a rollback that
did not happen: this host's record of its last write is read before the rows (the writer
saves it after its commit)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog


def _append(db: str, key: str, n: int) -> None:
    log = MerkleAuditLog(Path(db), key_path=Path(key))
    for i in range(n):
        log.emit(AuditEvent("unwrap", f"local:k{i % 3}", "ok", actor="svc"))


def test_verify_while_another_process_appends(tmp_path: Path) -> None:
    db, key = tmp_path / "audit.db", tmp_path / "audit.key"
    log = MerkleAuditLog(db, key_path=key)
    log.emit(AuditEvent("create", "local:k0", "ok", actor="admin"))
    writer = multiprocessing.get_context("spawn").Process(target=_append, args=(str(db), str(key), 300))
    writer.start()
    checked = bad = 0
    while writer.is_alive() or checked == 0:
        v = log.verify()
        checked += 1
        if not v.ok:
            bad += 1
            print(v.reason)
    writer.join(30)
    assert writer.exitcode == 0
    assert bad == 0, f"{bad} of {checked} verifications failed while the log grew"
    final = log.verify()
    assert final.ok and final.size == 301
