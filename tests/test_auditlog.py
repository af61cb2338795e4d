"""The tamper-evident audit log: every key operation lands in it; edits, deletions,
reorderings and insertions made directly in the database are found and the first bad
entry is named; a rollback is caught against a saved checkpoint."""

from __future__ import annotations

import json
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import modelseal
from modelseal.audit import merkle
from modelseal.audit.log import AuditLogError, MerkleAuditLog
from modelseal.keys.service import KeyService

from .conftest import PASSPHRASE, Env


def _fill(env: Env, n_rotations: int = 3) -> MerkleAuditLog:
    svc = KeyService()  # default sink: the audit log under $MODELSEAL_HOME
    svc.create("audited-kek")
    src = env.work / "m.bin"
    src.write_bytes(b"weights")
    modelseal.seal(src, env.work / "m.sealed", key="audited-kek", keys=svc)
    for _ in range(n_rotations):
        svc.rotate("audited-kek")
        modelseal.rewrap(env.work / "m.sealed", keys=svc)
    return MerkleAuditLog(env.home / "audit.db")


def _raw(env: Env) -> sqlite3.Connection:
    db = sqlite3.connect(env.home / "audit.db", isolation_level=None)
    db.execute("DROP TRIGGER IF EXISTS events_no_update")  # the attacker removes the guard rails
    db.execute("DROP TRIGGER IF EXISTS events_no_delete")
    return db


def test_events_cover_key_operations_and_hold_no_secrets(env: Env) -> None:
    log = _fill(env)
    events = log.events()
    ops = [e["operation"] for e in events]
    assert ops[:2] == ["create", "wrap"] and "rotate" in ops and "rewrap" in ops and "unwrap" not in ops[:2]
    assert all({"actor", "operation", "key", "result", "time", "version", "artifact"} <= set(e) for e in events)
    raw = (env.home / "audit.db").read_bytes()
    assert PASSPHRASE.encode() not in raw
    assert stat.S_IMODE((env.home / "audit.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((env.home / "audit-signing.key").stat().st_mode) == 0o600
    assert log.verify().ok
    assert [e["entry"] for e in log.events(key="local:audited-kek")] == [e["entry"] for e in events]
    assert log.events(since=9e12) == []


def test_the_database_refuses_updates(env: Env) -> None:
    _fill(env)
    db = sqlite3.connect(env.home / "audit.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE events SET event = 'x' WHERE seq = 1")


@pytest.mark.parametrize("attack", ["edit", "delete", "reorder", "insert", "truncate-sig"])
def test_direct_tampering_names_the_first_bad_entry(env: Env, attack: str) -> None:
    log = _fill(env)
    size = log.verify().size
    assert size >= 8
    db = _raw(env)
    if attack == "edit":
        body = db.execute("SELECT event FROM events WHERE seq = 4").fetchone()[0]
        db.execute("UPDATE events SET event = ? WHERE seq = 4", (body.replace('"ok"', '"denied"'),))
        expected = 4
    elif attack == "delete":
        db.execute("DELETE FROM events WHERE seq = 3")
        expected = 3
    elif attack == "reorder":
        a = db.execute("SELECT event FROM events WHERE seq = 5").fetchone()[0]
        b = db.execute("SELECT event FROM events WHERE seq = 6").fetchone()[0]
        db.execute("UPDATE events SET event = ? WHERE seq = 5", (b,))
        db.execute("UPDATE events SET event = ? WHERE seq = 6", (a,))
        expected = 5
    elif attack == "insert":
        rows = db.execute("SELECT seq, event, leaf, head, sig FROM events WHERE seq >= 2 ORDER BY seq DESC").fetchall()
        for seq, *rest in rows:
            db.execute("DELETE FROM events WHERE seq = ?", (seq,))
            db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (seq + 1, *rest))
        forged = json.dumps({"actor": "mallory", "operation": "create", "key": "local:x", "result": "ok"})
        db.execute(
            "INSERT INTO events VALUES (2, ?, ?, ?, ?)",
            (forged, merkle.leaf_hash(forged.encode()), b"h" * 32, b"s" * 64),
        )
        expected = 2
    else:
        db.execute("UPDATE events SET sig = ? WHERE seq = 7", (b"\x00" * 64,))
        expected = 7
    db.close()
    v = log.verify()
    assert not v.ok and v.first_bad == expected, v
    r = subprocess.run([sys.executable, "-m", "modelseal.cli", "audit", "verify"], capture_output=True, text=True)
    assert r.returncode == 9 and f"entry {expected}" in r.stderr and r.stderr.count("\n") == 1


def test_rollback_is_detected_against_a_saved_checkpoint(env: Env, tmp_path: Path) -> None:
    log = _fill(env, n_rotations=1)
    early = tmp_path / "early-audit.db"
    shutil.copy(env.home / "audit.db", early)  # the attacker keeps an old copy
    _fill_more = KeyService()
    _fill_more.rotate("audited-kek")
    witness = tmp_path / "witness"
    cp = log.checkpoint(witness)
    assert (witness / "latest.json").exists() and cp["size"] == log.verify().size
    assert log.verify_against(json.loads((witness / "latest.json").read_text())).ok
    # Later events extend the checkpoint consistently.
    KeyService().rotate("audited-kek")
    assert log.verify_against(cp).ok
    # Roll the log back to the old copy: this host notices (it remembers what it wrote),
    # and so does the witness checkpoint, which works on any other machine too.
    shutil.copy(early, env.home / "audit.db")
    assert "rolled back" in log.verify().reason
    v = log.verify_against(cp)
    assert not v.ok and "rolled back" in v.reason
    r = subprocess.run(
        [sys.executable, "-m", "modelseal.cli", "audit", "verify", "--witness", str(witness)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 9 and "rolled back" in r.stderr
    # A checkpoint whose signature does not match is refused.
    forged = dict(cp, head="00" * 32)
    assert "not signed" in log.verify_against(forged).reason


def test_inclusion_proof_verifies(env: Env) -> None:
    log = _fill(env)
    r = subprocess.run([sys.executable, "-m", "modelseal.cli", "audit", "prove", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    proof = json.loads(r.stdout)
    assert merkle.verify_inclusion(
        2,
        proof["tree_size"],
        bytes.fromhex(proof["leaf_hash"]),
        [bytes.fromhex(h) for h in proof["inclusion_proof"]],
        bytes.fromhex(proof["tree_head"]),
    )
    with pytest.raises(AuditLogError):
        log.prove(10_000)
    r = subprocess.run(
        [sys.executable, "-m", "modelseal.cli", "audit", "log", "--json"], capture_output=True, text=True
    )
    assert r.returncode == 0 and len(r.stdout.splitlines()) == log.verify().size


def test_postgresql_backend(env: Env, tmp_path: Path) -> None:
    """The same log in a real PostgreSQL 15 (started with pg_ctlcluster on this machine)."""
    import psycopg

    from modelseal.audit.events import AuditEvent

    from .services import postgres

    with postgres() as url:
        log = MerkleAuditLog(url, key_path=tmp_path / "audit.key")
        for i in range(12):
            log.emit(AuditEvent("wrap", "local:pg-kek", "ok", 1, f"{i:064x}"))
        v = log.verify()
        assert v.ok and v.size == 12
        cp = log.checkpoint(tmp_path / "witness")
        proof = log.prove(5)
        assert merkle.verify_inclusion(
            4,
            12,
            bytes.fromhex(proof["leaf_hash"]),
            [bytes.fromhex(h) for h in proof["inclusion_proof"]],
            bytes.fromhex(proof["tree_head"]),
        )
        with psycopg.connect(url) as conn:
            with pytest.raises(psycopg.errors.RaiseException):
                conn.execute("UPDATE modelseal_audit_events SET event = 'x' WHERE seq = 3")
            conn.rollback()
            conn.execute("ALTER TABLE modelseal_audit_events DISABLE TRIGGER modelseal_audit_no_change")
            conn.execute(
                "UPDATE modelseal_audit_events SET event = replace(event, '\"ok\"', '\"denied\"') WHERE seq = 6"
            )
            conn.commit()
        v = log.verify()
        assert not v.ok and v.first_bad == 6
        assert not log.verify_against(cp).ok


def test_resigned_log_and_truncation_are_caught(env: Env) -> None:
    """Review findings: someone who can write the database but lacks the audit key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from modelseal.audit.log import _signed_message, public_key_hex

    log = _fill(env)
    db = _raw(env)
    rows = db.execute("SELECT seq, event FROM events ORDER BY seq").fetchall()
    # 1. Drop an entry, rebuild every head and re-sign with a key of one's own.
    forger = Ed25519PrivateKey.generate()
    db.execute("DELETE FROM events")
    frontier = merkle.Frontier()
    for new_seq, (_, body) in enumerate([r for r in rows if r[0] != 3], start=1):
        leaf = merkle.leaf_hash(body.encode())
        head = frontier.append(leaf)
        db.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
            (new_seq, body, leaf, head, forger.sign(_signed_message(new_seq, head))),
        )
    db.execute("UPDATE meta SET v = ? WHERE k = 'public_key'", (public_key_hex(forger.public_key()),))
    db.close()
    v = log.verify()
    assert not v.ok and "another audit key" in v.reason
    # 2. Truncate the tail: the next legitimate append refuses to build on it.
    shutil.copy(env.home / "audit.db", env.home / "forged.db")
    log2 = _fill_fresh(env)
    db = _raw(env)
    last = db.execute("SELECT MAX(seq) FROM events").fetchone()[0]
    db.execute("DELETE FROM events WHERE seq = ?", (last,))
    db.close()
    with pytest.raises(AuditLogError, match="truncated or rewritten"):
        KeyService().rotate("audited-kek")
    assert "rolled back" in log2.verify().reason


def _fill_fresh(env: Env) -> MerkleAuditLog:
    """Start a new, honest log (the forged one from the first half is set aside)."""
    (env.home / "audit.db").unlink()
    (env.home / "audit-signing.key.state").unlink()
    svc = KeyService()
    svc.rotate("audited-kek")
    svc.rotate("audited-kek")
    return MerkleAuditLog(env.home / "audit.db")


def test_checkpoints_are_chained(env: Env, tmp_path: Path) -> None:
    import hashlib

    log = _fill(env, n_rotations=1)
    witness = tmp_path / "w"
    first = log.checkpoint(witness)
    first_bytes = (witness / "latest.json").read_bytes()
    KeyService().rotate("audited-kek")
    second = log.checkpoint(witness)
    assert first["previous"] is None and second["previous"] == hashlib.sha256(first_bytes).hexdigest()
