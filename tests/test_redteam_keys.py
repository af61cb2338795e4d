"""Regression tests for the red team's "keys" findings (audit state per log, rotate-root,
same-scheme identity, Transit batch poisoning, forged audit rows, str paths)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import modelseal
from modelseal.audit import merkle
from modelseal.audit.events import AuditEvent, MemorySink
from modelseal.audit.hosts import host_line
from modelseal.audit.log import AuditLogError, MerkleAuditLog
from modelseal.cli import main
from modelseal.errors import DecryptionError
from modelseal.format.envelope import open_envelope
from modelseal.format.file import open_keys, read_raw, write_slot_in_place
from modelseal.format.header import Recipient
from modelseal.format.source import FdSource
from modelseal.keys import keystore
from modelseal.keys.providers.awskms import DESCRIBE_CACHE_SIZE, AwsKmsProvider
from modelseal.keys.service import KeyService
from modelseal.recipes import rotation
from modelseal.recipes.recipients import same_key
from modelseal.recipes.rotation import rotate

from .conftest import Env


def _emit(log: MerkleAuditLog, n: int, op: str = "wrap") -> None:
    for i in range(n):
        log.emit(AuditEvent(op, "local:k", "ok", 1, None, "t", 1000.0 + i))


# -- 1. the host's record is kept per log ------------------------------------------------


def test_switching_audit_logs_keeps_one_record_per_log(env: Env) -> None:
    default = MerkleAuditLog(env.home / "audit.db")
    _emit(default, 2)
    other = MerkleAuditLog(env.home / "elsewhere" / "other.db", key_path=env.home / "audit-signing.key")
    (env.home / "elsewhere").mkdir()
    _emit(other, 1)  # refused before: the default log's record was compared with this log
    _emit(default, 1)
    assert default.verify().ok and default.verify().size == 3
    assert other.verify().ok and other.verify().size == 1
    # Each log's rollback is still caught, by its own record.
    shutil.copy(env.home / "audit.db", env.work / "old.db")
    _emit(default, 1)
    shutil.copy(env.work / "old.db", env.home / "audit.db")
    assert "rolled back" in default.verify().reason
    with pytest.raises(AuditLogError, match="shorter than, or differs"):
        _emit(default, 1)
    _emit(other, 1)  # the other log is unaffected
    assert other.verify().ok


def test_the_record_names_no_password_and_an_old_record_is_adopted_by_its_log(env: Env) -> None:
    from modelseal.audit.store import _without_password

    assert _without_password("postgresql://u:s3cret@db:5433/audit?password=x&sslmode=require") == (
        "postgresql://db:5433/audit"
    )
    # One identity per database however the URL is spelled (final red-team pass): a new
    # spelling must not start a fresh record that accepts a rolled-back log.
    spellings = [
        "postgresql://ms@127.0.0.1/audit",
        "postgresql://ms@127.0.0.1:5432/audit?application_name=modelseal",
        "postgres://other:pw@127.0.0.1:5432/audit?sslmode=disable",
    ]
    assert {_without_password(u) for u in spellings} == {"postgresql://127.0.0.1:5432/audit"}
    key = env.home / "audit-signing.key"
    other = MerkleAuditLog(env.home / "other.db", key_path=key)
    _emit(other, 2)
    # A record from before per-log records: one file, no log named, of the other log.
    own = json.loads(other._state_path.read_text())
    other._state_path.unlink()
    legacy = key.with_name("audit-signing.key.state")
    legacy.write_text(json.dumps({"size": own["size"], "head": own["head"]}))
    again = MerkleAuditLog(env.home / "other.db", key_path=key)
    _emit(again, 1)
    assert again.verify().ok and not legacy.exists()  # adopted by the log that holds it
    _emit(MerkleAuditLog(env.home / "audit.db"), 1)  # the default log starts its own record


class _FailingOk(MemorySink):
    """A log that refuses the ``ok`` events: as an unwritable audit log after the change."""

    def emit(self, event: AuditEvent) -> None:
        if event.result == "ok":
            raise AuditLogError("the audit database is gone")
        super().emit(event)


class _NotReady(MemorySink):
    def ready(self) -> None:
        raise AuditLogError("the audit log was rolled back")


def test_a_change_whose_event_cannot_be_written_says_it_was_made(env: Env) -> None:
    svc = KeyService(sink=_FailingOk())
    with pytest.raises(AuditLogError, match="rotate of local:test-kek version 2 WAS carried out"):
        svc.rotate("local:test-kek")
    assert env.svc.info("local:test-kek").latest == 2
    # A log known not to take the event refuses the change before it is made.
    with pytest.raises(AuditLogError, match="rolled back"):
        KeyService(sink=_NotReady()).rotate("local:test-kek")
    assert env.svc.info("local:test-kek").latest == 2


def test_cli_key_rotate_after_switching_to_another_log(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["key", "rotate", "test-kek"]) == 0  # the default log
    os.environ["MODELSEAL_AUDIT_URL"] = str(env.home / "other.db")  # another log, the same audit key
    try:
        assert main(["key", "rotate", "test-kek"]) == 0, capsys.readouterr().err
        assert main(["audit", "verify"]) == 0
    finally:
        del os.environ["MODELSEAL_AUDIT_URL"]
    assert main(["audit", "verify"]) == 0


# -- 2. rotate-root makes new KEK versions -----------------------------------------------


def test_rotate_root_adds_a_kek_version_old_copies_do_not_hold(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.svc.create("retired")
    env.svc.destroy("local:retired", None)
    old_copy = (env.home / "keystore.json").read_bytes()
    assert main(["recovery", "rotate-root"]) == 0
    out = capsys.readouterr().out
    assert "local:test-kek v2" in out and "rewrapped" in out and "local:retired" in out
    keystore.clear_cache()
    assert env.svc.info("local:test-kek").latest == 2
    assert env.svc.info("local:retired").latest == 1  # no active version: not brought back
    src = env.work / "after.bin"
    src.write_bytes(b"sealed after the rotation")
    modelseal.seal(src, env.work / "after.sealed", key="test-kek", keys=env.svc)
    # The old copy of the keystore (openable with the old shares) cannot open it.
    (env.home / "keystore.json").write_bytes(old_copy)
    keystore.clear_cache()
    with pytest.raises(modelseal.ModelsealError):
        modelseal.unseal(env.work / "after.sealed", env.work / "out.bin", keys=KeyService(sink=MemorySink()))
    ops = [e["operation"] for e in MerkleAuditLog(env.home / "audit.db").events()]
    assert ops.count("rotate") == 1 and "rotate-root" in ops


# -- 3. only same-scheme recipients are resolved; the KMS cache is bounded ----------------


class _Exploding:
    scheme = "awskms"

    def canonical_name(self, name: str) -> str:
        raise AssertionError(f"a provider was asked about {name}")

    def wrap(self, *a: Any) -> Recipient:
        raise AssertionError

    def unwrap(self, *a: Any) -> bytes:
        raise AssertionError


def test_same_key_never_resolves_another_schemes_recipient(env: Env) -> None:
    svc = KeyService(sink=MemorySink(), providers={"awskms": _Exploding()})
    arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    assert not same_key(svc, Recipient("awskms", arn, 1, b"x" * 60), "local:test-kek")
    assert same_key(svc, Recipient("local", "test-kek", 1, b"x" * 60), "local:test-kek")


def test_rotating_a_local_key_asks_no_kms_about_stored_recipients(env: Env) -> None:
    src = env.work / "a.bin"
    src.write_bytes(b"weights")
    art = env.work / "rot" / "a.sealed"
    art.parent.mkdir()
    modelseal.seal(src, art, key="test-kek", keys=env.svc)
    arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    _plant(env.svc, art, [Recipient("awskms", arn, 1, b"x" * 60)])
    svc = KeyService(sink=MemorySink(), providers={"awskms": _Exploding()})
    report = rotate("local:test-kek", [art.parent], force=True, keys=svc)
    assert report.not_using_key == 0 and len(report.failed) == 1  # the KMS recipient is not vouched for


def _plant(svc: KeyService, path: Path, extra: Sequence[Recipient]) -> None:
    src = FdSource(os.open(path, os.O_RDWR))
    try:
        raw = read_raw(src)
        dek = open_keys(raw, lambda r: svc.unwrap(r, raw.core.context)).dek
        opened = open_envelope(raw.core, raw.slots, lambda r: dek)
        write_slot_in_place(src.fd, raw, opened, (*opened.slot.recipients, *extra))
    finally:
        src.close()


def test_the_kms_identity_cache_is_bounded() -> None:
    class Client:
        def describe_key(self, KeyId: str) -> dict[str, Any]:
            return {"KeyMetadata": {"Arn": f"arn:aws:kms:eu-west-1:111122223333:key/{KeyId}"}}

    p = AwsKmsProvider(client_factory=Client)
    for i in range(DESCRIBE_CACHE_SIZE + 50):
        p.canonical_name(f"k{i}")
    assert len(p._arns) == DESCRIBE_CACHE_SIZE


# -- 4. one bad artifact does not fail a Transit batch -----------------------------------


class _Batchy:
    """Transit's batch behaviour: a request fails on its first bad item."""

    def __init__(self) -> None:
        self.calls = 0

    def _check(self, rs: Sequence[Recipient]) -> None:
        self.calls += 1
        if any(r.wrapped.startswith(b"bad") for r in rs):
            raise DecryptionError()

    def unwrap_many(self, rs: Sequence[Recipient], context: Any, contexts: Any = None) -> list[bytes]:
        self._check(rs)
        return [bytes(32) for _ in rs]

    def rewrap_many(self, rs: Sequence[Recipient], context: Any, contexts: Any = None) -> list[Recipient]:
        self._check(rs)
        return [Recipient("transit", r.key_id, 2, b"vault:v2:" + r.wrapped) for r in rs]


def test_a_poisoned_item_fails_alone_in_a_transit_batch(env: Env) -> None:
    ours = [Recipient("transit", "transit/tk", 1, b"vault:v1:ok%d" % i) for i in range(5)]
    ours[2] = Recipient("transit", "transit/tk", 1, b"bad")
    ctx = [(("env", "dev"),)] * 5
    got = rotation._transit_keys(env.svc, _Batchy(), "transit:tk", ours, ctx)  # type: ignore[arg-type]
    assert [isinstance(g, DecryptionError) for g in got] == [False, False, True, False, False]
    fine = _Batchy()
    assert len(rotation._transit_keys(env.svc, fine, "transit:tk", ours[:2], ctx[:2])) == 2  # type: ignore[arg-type]
    assert fine.calls == 2  # one batch request each: no fallback when the batch succeeds


# -- 5. forged rows are never shown as genuine -------------------------------------------


def _forge(db: Path, body: str) -> None:
    """A row inserted by someone with write access to the database and no audit key."""
    conn = sqlite3.connect(db, isolation_level=None)
    leaves = [bytes(r[0]) for r in conn.execute("SELECT leaf FROM events ORDER BY seq")]
    frontier = merkle.Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    leaf = merkle.leaf_hash(body.encode())
    head = frontier.append(leaf)
    conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (len(leaves) + 1, body, leaf, head, b"\0" * 64))
    conn.close()


def test_audit_log_shows_only_the_verified_prefix(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    log = MerkleAuditLog(env.home / "audit.db")
    _emit(log, 2)
    forged = AuditEvent("destroy", "local:prod", "ok", 1, None, "root", 1001.0).to_json()
    _forge(env.home / "audit.db", forged)
    assert main(["audit", "log"]) == 9
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and "local:prod" not in out
    assert "entries from 3 on are not shown" in err and err.count("\n") == 1
    with pytest.raises(AuditLogError, match="entry 3"):
        log.events()
    assert main(["audit", "log", "--unverified"]) == 0
    out, err = capsys.readouterr()
    assert "local:prod" in out and "warning" in err


@pytest.mark.parametrize("body", ["[1, 2, 3]", "[" * 5000 + "]" * 5000, '{"a": ' * 50 + "1" + "}" * 50])
def test_odd_row_bodies_are_a_typed_error(env: Env, capsys: pytest.CaptureFixture[str], body: str) -> None:
    log = MerkleAuditLog(env.home / "audit.db")
    _emit(log, 1)
    _forge(env.home / "audit.db", body)
    assert main(["audit", "log"]) == 9
    assert main(["audit", "log", "--unverified"]) == 9
    err = capsys.readouterr().err
    assert "internal error" not in err and "entry 2 is not a readable audit event" in err


def test_a_host_with_configured_peers_never_signs_on_top_of_a_forged_row(env: Env) -> None:
    log = MerkleAuditLog(env.home / "audit.db")
    _emit(log, 2)
    peer = MerkleAuditLog(env.work / "peer.db", key_path=env.work / "audit-signing.key")
    log.hosts_path.write_text(f"[hosts]\n{host_line('peer', peer.signing_key.public_key())}\n")
    log.hosts_path.chmod(0o600)
    _forge(env.home / "audit.db", AuditEvent("enable", "local:k", "ok", 1, None, "x", 5.0).to_json())
    # An ordinary event (an unwrap) is still recorded, so one foreign row cannot stop
    # decryption on every host sharing the log (final red-team pass); verify names it.
    _emit(log, 1)
    assert not log.verify().ok and "entry 3" in log.verify().reason
    with pytest.raises(AuditLogError, match="entry 3"):  # the key change is refused before it is made
        KeyService(sink=log).rotate("local:test-kek")
    assert env.svc.info("local:test-kek").latest == 1


def test_without_peers_unknown_signers_are_left_to_verify(env: Env) -> None:
    """With no host configured, entries another key names may be a peer's not yet listed:
    the append goes on, and ``verify`` names them (as before)."""
    db = env.work / "shared.db"
    a = MerkleAuditLog(db, key_path=env.work / "a" / "audit-signing.key")
    b = MerkleAuditLog(db, key_path=env.work / "b" / "audit-signing.key")
    (env.work / "a").mkdir()
    (env.work / "b").mkdir()
    _emit(a, 1)
    _emit(b, 1)
    assert not b.verify().ok and "entry 2" in a.verify().reason  # each names the unconfigured key


# -- 6. str paths --------------------------------------------------------------------------


def test_rotate_takes_str_paths(env: Env) -> None:
    src = env.work / "a.bin"
    src.write_bytes(b"weights")
    (env.work / "d").mkdir()
    modelseal.seal(src, env.work / "d" / "a.sealed", key="test-kek", keys=env.svc)
    report = rotate("local:test-kek", [str(env.work / "d")], force=True, keys=env.svc)
    assert len(report.rewrapped) == 1 and not report.failed


def test_rotate_root_failure_is_audited_and_changes_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSEAL_PASSPHRASE", "wrong")
    keystore.clear_cache()
    sink = MemorySink()
    with pytest.raises(modelseal.ModelsealError):
        KeyService(sink=sink).rotate_root()
    assert [(e.operation, e.result) for e in sink.events][-1] == ("rotate-root", "KeystoreError")
