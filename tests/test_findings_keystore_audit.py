"""Regression tests for the outside review's findings 10, 11, 13 and 14 and the design item
"recovery shares cannot be revoked". Each test replays the reviewers' exploit, or the
class of bug behind it, and fails on the code before the fix (commit 9c72615)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import modelseal
from modelseal.audit import merkle
from modelseal.audit.events import AuditEvent, MemorySink
from modelseal.audit.hosts import AuditConfigError, HostKey, host_line, key_id, load_hosts, parse_hosts
from modelseal.audit.log import MerkleAuditLog, _signed_message, public_key_hex
from modelseal.cli.common import escape, print_report
from modelseal.errors import DecryptionError, KeyDisabled, KeystoreError
from modelseal.format.header import Recipient, encode_recipients, parse_core, parse_slot, slots_offset
from modelseal.keys import keystore
from modelseal.keys.providers.local import LocalProvider
from modelseal.keys.service import KeyService

from .conftest import PASSPHRASE, Env

VECTORS = Path(__file__).parent / "vectors"
DAY = 86400.0


def run(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelseal.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env_extra or {})},
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


def _sealed(env: Env, name: str = "m") -> Path:
    src = env.work / f"{name}.bin"
    src.write_bytes(b"model weights")
    dst = env.work / f"{name}.sealed"
    modelseal.seal(src, dst, key="test-kek", keys=env.svc)
    return dst


def _table(env: Env) -> dict[str, object]:
    """The key table as it is on disk now (no cache)."""
    keystore.clear_cache()
    keys = keystore.unlock(keystore.keystore_path(env.home)).keys
    keystore.clear_cache()
    return keys


def _v1(env: Env) -> dict[str, object]:
    entry = _table(env)["test-kek"]
    assert isinstance(entry, dict)
    return entry["versions"]["1"]  # type: ignore[no-any-return]


# -- finding 10: scheduled destruction ------------------------------------------------


UPDATES: dict[str, Callable[[LocalProvider], object]] = {
    "create another key": lambda p: p.create("other-kek"),
    "rotate another key": lambda p: (p.create("other-kek"), p.rotate("other-kek")),
    "disable a version": lambda p: (p.rotate("test-kek"), p.set_version_state("test-kek", 2, "disabled")),
    "min-version": lambda p: p.set_min_decryption_version("test-kek", 1),
    "destroy another key": lambda p: (p.create("other-kek"), p.destroy("other-kek", None)),
}


@pytest.mark.parametrize("update", sorted(UPDATES))
def test_every_keystore_update_erases_an_overdue_version(env: Env, update: str) -> None:
    clock = [1_800_000_000.0]
    p = LocalProvider(now=lambda: clock[0])
    p.destroy("test-kek", 1, after=7 * DAY)
    clock[0] += 7 * DAY + 1
    assert _v1(env)["material"] is not None  # overdue, not yet erased
    UPDATES[update](p)  # any update, not only `key purge`
    v1 = _v1(env)
    assert v1["state"] == "destroyed" and v1["material"] is None and "destroy_after" not in v1


def test_recovery_and_root_rotation_saves_erase_overdue_versions_too(env: Env) -> None:
    LocalProvider(now=lambda: time.time() - 8 * DAY).destroy("test-kek", 1, after=7 * DAY)  # due a day ago
    assert _v1(env)["material"] is not None
    keystore.rotate_root()
    assert _v1(env)["material"] is None
    env.svc.create("k2")
    LocalProvider(now=lambda: time.time() - 8 * DAY).destroy("k2", 1, after=7 * DAY)
    shares = keystore.split_root(3, 2)
    keystore.recover_root(shares[:2], PASSPHRASE.encode(), scrypt_log2_n=14)
    entry = _table(env)["k2"]
    assert isinstance(entry, dict) and entry["versions"]["1"]["material"] is None


def test_cancel_after_the_deadline_is_refused_and_the_key_never_decrypts_again(env: Env) -> None:
    """The exploit: schedule, wait past the deadline with no update, cancel, enable, decrypt."""
    sealed = _sealed(env)
    clock = [1_800_000_000.0]
    p = LocalProvider(now=lambda: clock[0])
    p.destroy("test-kek", 1, after=7 * DAY)
    clock[0] += 7 * DAY + 1
    keystore.clear_cache()
    svc = KeyService(sink=MemorySink(), providers={"local": p})
    with pytest.raises(KeyDisabled):  # overdue, not saved yet: still never unwraps
        modelseal.open(sealed, keys=svc)
    with pytest.raises(KeyDisabled, match="waiting period"):
        p.cancel_destroy("test-kek", 1)
    v1 = _v1(env)
    assert v1["state"] == "destroyed" and v1["material"] is None  # the refusal's save erased it
    with pytest.raises(KeyDisabled):
        p.set_version_state("test-kek", 1, "active")
    with pytest.raises(KeyDisabled):
        modelseal.open(sealed, keys=KeyService(sink=MemorySink(), providers={"local": p}))


def test_cancel_of_every_version_after_the_deadline_is_refused(env: Env) -> None:
    clock = [1_800_000_000.0]
    p = LocalProvider(now=lambda: clock[0])
    p.rotate("test-kek")
    p.destroy("test-kek", None, after=DAY)
    clock[0] += 2 * DAY
    with pytest.raises(KeyDisabled, match="waiting period"):
        p.cancel_destroy("test-kek", None)
    entry = _table(env)["test-kek"]
    assert isinstance(entry, dict)
    assert [d["state"] for d in entry["versions"].values()] == ["destroyed", "destroyed"]


def test_cancel_before_the_deadline_still_works(env: Env) -> None:
    sealed = _sealed(env)
    clock = [1_800_000_000.0]
    p = LocalProvider(now=lambda: clock[0])
    p.destroy("test-kek", 1, after=7 * DAY)
    clock[0] += 7 * DAY - 1
    p.cancel_destroy("test-kek", 1)
    p.set_version_state("test-kek", 1, "active")
    keystore.clear_cache()
    assert modelseal.open(sealed, keys=KeyService(sink=MemorySink())).read() == b"model weights"
    p.destroy("test-kek", 1)
    with pytest.raises(KeyDisabled, match="destroyed"):  # nothing brings a destroyed version back
        p.cancel_destroy("test-kek", 1)


def test_a_second_schedule_never_postpones_the_first(env: Env) -> None:
    clock = [1_800_000_000.0]
    p = LocalProvider(now=lambda: clock[0])
    p.destroy("test-kek", 1, after=DAY)
    p.destroy("test-kek", 1, after=30 * DAY)  # e.g. someone hoping to keep the key
    clock[0] += 2 * DAY
    assert p.purge() == ["test-kek#1"]


def test_cli_cancel_destroy_after_the_deadline(env: Env) -> None:
    LocalProvider(now=lambda: time.time() - 8 * DAY).destroy("test-kek", 1, after=7 * DAY)
    r = run("key", "cancel-destroy", "test-kek", "--version", "1")
    assert r.returncode == 5 and "waiting period" in r.stderr and r.stderr.count("\n") == 1
    assert run("key", "enable", "test-kek", "--version", "1").returncode == 5
    assert _v1(env)["material"] is None


# -- finding 11: every verify mode runs every check -----------------------------------


def _emit(log: MerkleAuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.emit(AuditEvent("wrap", "local:k", "ok", 1, f"{i:064x}"))


def _truncate_sqlite(db: Path, size: int) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS events_no_delete")  # the attacker removes the guard rail
    conn.execute("DELETE FROM events WHERE seq > ?", (size,))
    conn.close()


def test_witness_verify_refuses_a_log_truncated_back_to_the_checkpoint(env: Env, tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    log = MerkleAuditLog(db)
    _emit(log, 10)
    witness = tmp_path / "witness"
    cp = log.checkpoint(witness)
    _emit(log, 2, start=10)  # e.g. the destroy events an attacker wants gone
    _truncate_sqlite(db, cp["size"])
    assert "rolled back" in log.verify().reason
    v = log.verify_against(cp)
    assert not v.ok and "rolled back" in v.reason and "this host wrote 12" in v.reason
    env_extra = {"MODELSEAL_AUDIT_URL": str(db)}
    r = run("audit", "verify", "--witness", str(witness), env_extra=env_extra)
    assert r.returncode == 9 and "rolled back" in r.stderr, r.stderr


def test_checkpoint_never_moves_the_witness_back(env: Env, tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    log = MerkleAuditLog(db)
    _emit(log, 12)
    witness = tmp_path / "witness"
    log.checkpoint(witness)
    _truncate_sqlite(db, 10)
    # An auditor's machine: no audit key and no record of what was written.
    auditor = MerkleAuditLog(db, key_path=tmp_path / "auditor" / "audit-signing.key")
    assert auditor.verify().ok  # nothing here can tell, without the witness
    with pytest.raises(modelseal.ModelsealError, match="rolled back"):
        auditor.checkpoint(witness)
    assert json.loads((witness / "latest.json").read_text())["size"] == 12


def test_verify_checks_the_checkpoint_key_against_the_configured_keys(env: Env, tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    log = MerkleAuditLog(db)
    _emit(log, 3)
    rows = log.store.rows()
    forger = Ed25519PrivateKey.generate()
    forged = {
        "size": 3,
        "head": rows[-1][3].hex(),
        "signature": forger.sign(_signed_message(3, rows[-1][3])).hex(),
        "public_key": public_key_hex(forger.public_key()),
    }
    v = log.verify_against(forged)  # a well-formed checkpoint, by a key this host does not trust
    assert not v.ok and "not configured" in v.reason


def test_postgresql_refuses_truncate_and_verifies_a_log_shared_by_two_hosts(tmp_path: Path) -> None:
    """Findings 11 and 13 against a real PostgreSQL 15."""
    import psycopg

    from .services import postgres

    with postgres() as url:
        a = MerkleAuditLog(url, key_path=tmp_path / "a" / "audit-signing.key")
        b = MerkleAuditLog(url, key_path=tmp_path / "b" / "audit-signing.key")
        for d in ("a", "b"):
            (tmp_path / d).mkdir()
        _emit(a, 3)
        _emit(b, 2, start=3)
        _emit(a, 1, start=5)
        for me, other in ((a, b), (b, a)):
            me.hosts_path.write_text(f"[hosts]\n{host_line('peer', other.signing_key.public_key())}\n")
        assert a.verify().ok and b.verify().ok and a.verify().size == 6
        signers = [e["signer"] for e in a.events()]
        ka, kb = key_id(a.signing_key.public_key()), key_id(b.signing_key.public_key())
        assert signers == [ka, ka, ka, kb, kb, ka]
        cp = b.checkpoint(tmp_path / "witness")  # the head b checkpoints is a's: a's key signs it
        assert cp["public_key"] == public_key_hex(a.signing_key.public_key()) and a.verify_against(cp).ok
        with psycopg.connect(url) as conn:
            for table in ("modelseal_audit_events", "modelseal_audit_meta"):
                with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                    conn.execute(f"TRUNCATE {table}")
                conn.rollback()
            # Past the guard rails, cut the log back to the checkpoint after more entries.
            _emit(a, 2, start=6)
            conn.execute("ALTER TABLE modelseal_audit_events DISABLE TRIGGER USER")
            conn.execute("DELETE FROM modelseal_audit_events WHERE seq > 6")
            conn.commit()
        v = a.verify_against(cp)
        assert not v.ok and "rolled back" in v.reason
        # A host nobody configured cannot add entries that verify.
        c = MerkleAuditLog(url, key_path=tmp_path / "c" / "audit-signing.key")
        (tmp_path / "c").mkdir()
        _emit(c, 1, start=8)
        v = b.verify()
        assert not v.ok and v.first_bad == 7 and "not configured" in v.reason


# -- finding 13: a log shared by several hosts -----------------------------------------


def _host(db: Path, tmp_path: Path, name: str) -> MerkleAuditLog:
    (tmp_path / name).mkdir(exist_ok=True)
    return MerkleAuditLog(db, key_path=tmp_path / name / "audit-signing.key")


def test_a_log_shared_by_two_hosts_verifies_on_each(env: Env, tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    a, b = _host(db, tmp_path, "a"), _host(db, tmp_path, "b")
    _emit(a, 2)
    _emit(b, 2, start=2)
    _emit(a, 1, start=4)
    for me, other, name in ((a, b, "host-b"), (b, a, "host-a")):
        me.hosts_path.write_text(f"[hosts]\n{host_line(name, other.signing_key.public_key())}\n")
        me.hosts_path.chmod(0o644)
    assert a.verify().ok and b.verify().ok
    a.hosts_path.write_text("[hosts]\n")  # b is no longer configured on a: its entries are refused
    v = a.verify()
    assert v.first_bad == 3 and "not configured" in v.reason
    a.hosts_path.write_text(f"[hosts]\n{host_line('host-b', b.signing_key.public_key())}\n")
    # Tampering is still named by entry, whichever host wrote it.
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER events_no_update")
    body = conn.execute("SELECT event FROM events WHERE seq = 3").fetchone()[0]
    conn.execute("UPDATE events SET event = ? WHERE seq = 3", (body.replace('"ok"', '"denied"'),))
    conn.close()
    assert a.verify().first_bad == 3 and b.verify().first_bad == 3


def test_an_entry_cannot_claim_another_signer(env: Env, tmp_path: Path) -> None:
    """A database writer holding only its own key: re-signs every entry with it under another
    host's key id, or under its own id; neither verifies where only a and b are trusted."""
    db = tmp_path / "shared.db"
    a, b = _host(db, tmp_path, "a"), _host(db, tmp_path, "b")
    _emit(a, 3)
    trusted = {key_id(b.signing_key.public_key()): HostKey("b", b.signing_key.public_key())}
    a_view = MerkleAuditLog(db, key_path=a._key_path, hosts=trusted)
    assert a_view.verify().ok
    mallory = Ed25519PrivateKey.generate()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER events_no_delete")
    rows = conn.execute("SELECT seq, event FROM events ORDER BY seq").fetchall()
    conn.execute("DELETE FROM events")
    frontier = merkle.Frontier()
    for seq, body in rows:
        doc = json.loads(body)
        doc["signer"] = key_id(b.signing_key.public_key())
        body = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        leaf = merkle.leaf_hash(body.encode())
        head = frontier.append(leaf)
        conn.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
            (seq, body, leaf, head, mallory.sign(_signed_message(seq, head))),
        )
    conn.close()
    v = a_view.verify()
    assert not v.ok and v.first_bad == 1 and "no valid signature" in v.reason


def _legacy_append(log: MerkleAuditLog, n: int) -> None:
    """Rows exactly as the code before the fix wrote them: no signer in the event."""
    key = log.signing_key
    with log.store.transaction() as tx:
        frontier = merkle.Frontier()
        for leaf in tx.leaves():
            frontier.append(leaf)
        size = tx.size()
        for i in range(n):
            body = AuditEvent("wrap", "local:k", "ok", 1, None, "old", 1.0 + i).to_json()
            leaf = merkle.leaf_hash(body.encode())
            head = frontier.append(leaf)
            seq = size + i + 1
            tx.insert((seq, body, leaf, head, key.sign(_signed_message(seq, head))), public_key_hex(key.public_key()))
    log._state_path.write_text(json.dumps({"size": seq, "head": head.hex()}))


def test_existing_single_host_logs_keep_verifying(env: Env, tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    log = MerkleAuditLog(db)
    _legacy_append(log, 4)
    assert log.verify().ok
    _emit(log, 2)  # new entries after the old ones
    assert log.verify().ok and log.verify().size == 6
    # An entry without a signer after one with a signer is refused (no downgrade).
    _legacy_append(log, 1)
    v = log.verify()
    assert not v.ok and v.first_bad == 7 and "names no signer" in v.reason


def test_hosts_file_is_trust_configuration(env: Env, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    path = tmp_path / "audit-hosts.toml"
    path.write_text(f"[hosts]\n{host_line('build-01', key)}\n")
    path.chmod(0o664)
    with pytest.raises(AuditConfigError, match="writable by group or others"):
        load_hosts(path)
    path.chmod(0o644)
    assert list(load_hosts(path)) == [key_id(key)]
    for bad in (
        '[hosts]\n"a\\nb" = "ed25519:' + "00" * 32 + '"',
        '[hosts]\nx = "ed25519:' + "0" * 63 + '"',
        '[hosts]\nx = "rsa:00"',
        "[other]\n",
        f"[hosts]\n{host_line('a', key)}\n{host_line('b', key)}\n",
    ):
        with pytest.raises(AuditConfigError):
            parse_hosts(bad)


def test_cli_audit_key_prints_a_line_the_other_hosts_accept(env: Env) -> None:
    r = run("audit", "key", "--name", "build 01\n")
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[0]
    hosts = parse_hosts(f"[hosts]\n{line}\n")
    assert len(hosts) == 1 and next(iter(hosts.values())).name == "build-01-"


# -- finding 14: key ids are data, never lines of output --------------------------------


KEYIDS = json.loads((VECTORS / "keyids.json").read_text())


@pytest.fixture
def vector_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "vector-home"
    shutil.copytree(VECTORS / "home", home)
    (home / "keystore.json").chmod(0o600)
    monkeypatch.setenv("MODELSEAL_HOME", str(home))
    monkeypatch.setenv("MODELSEAL_PASSPHRASE", KEYIDS["passphrase"])
    keystore.clear_cache()
    return home


@pytest.mark.parametrize("vec", KEYIDS["vectors"], ids=lambda v: v["file"])
def test_key_id_vectors(vec: dict[str, object], vector_home: Path) -> None:
    blob = (VECTORS / str(vec["file"])).read_bytes()
    core = parse_core(blob)
    start = slots_offset(len(core.raw), core.slot_size)
    sink = MemorySink()
    svc = KeyService(sink=sink)
    if vec["expect"] == "success":
        slot = parse_slot(blob[start : start + core.slot_size])
        want = vec["first_recipient"]
        assert slot is not None and isinstance(want, dict)
        assert slot.recipients[0].key_id.encode().hex() == want["key_id_utf8_hex"]
        with modelseal.open(VECTORS / str(vec["file"]), keys=svc) as r:
            assert r.read() == b"key ids are data, never lines of output\n"
    else:
        assert vec["expect"] == "header failure"
        with pytest.raises(DecryptionError):
            parse_slot(blob[start : start + core.slot_size])
        with pytest.raises(DecryptionError):
            modelseal.open(VECTORS / str(vec["file"]), keys=svc)
        assert sink.events == []  # nothing was unwrapped, so nothing of the key id was logged


def test_every_forbidden_character_is_covered_by_a_vector() -> None:
    bad = "".join(
        bytes.fromhex(v["first_recipient"]["key_id_utf8_hex"]).decode()
        for v in KEYIDS["vectors"]
        if v["expect"] != "success"
    )
    for ch in ("\x00", "\x09", "\x0a", "\x0d", "\x1b", "\x1f", "\x7f", "\x85", "\x9f", "\u061c", "\u200e", "\u200f"):
        assert ch in bad
    for ch in ("\u2028", "\u2029", "\u202a", "\u202e", "\u2066", "\u2069"):
        assert ch in bad


@pytest.mark.parametrize("key_id", ["x\ny", "x\x1b[2K", "x\u202e", "x\x85", "x\u2028", "\x00"])
def test_writers_refuse_forbidden_key_ids(key_id: str) -> None:
    with pytest.raises(ValueError, match="control characters"):
        encode_recipients(1, (Recipient("local", key_id, 1, b"w" * 60),))


def test_a_key_id_cannot_forge_audit_log_lines(vector_home: Path) -> None:
    """The exploit end to end: open an artifact whose first recipient's key id holds a
    newline and a forged entry, then list the audit log."""
    log = MerkleAuditLog(vector_home / "audit.db")
    svc = KeyService(sink=log)
    with pytest.raises(DecryptionError):
        modelseal.open(VECTORS / "keyid-bad-lf.mseal", keys=svc)
    with modelseal.open(VECTORS / "keyid-ok-edges.mseal", keys=svc) as r:
        r.read()
    # Whatever reaches the database (here a line written straight to it) prints as one line.
    log.emit(AuditEvent("unwrap", "local:x\n    99 2026-01-01T00:00:00Z root     destroy local:prod-kek -> ok", "ok"))
    log.emit(AuditEvent("unwrap", "local:y", "ok\x1b[1A\x1b[2K", actor="\u202eevil"))
    r = run("audit", "log")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(log.events()) == 4
    assert "\\x0a" in lines[2] and "\x1b" not in r.stdout and "\u202e" not in r.stdout and "\\u202e" in lines[3]
    assert all(json.loads(line)["entry"] for line in run("audit", "log", "--json").stdout.splitlines())


def test_escape_is_unambiguous_and_leaves_ordinary_text_alone() -> None:
    assert escape("local:prod-kek é 模型 a b") == "local:prod-kek é 模型 a b"
    assert escape("a\nb\tc\x1bd\x7fe\x85f\u202eg\u2028h\U000e0001") == (
        "a\\x0ab\\x09c\\x1bd\\x7fe\\x85f\\u202eg\\u2028h\\U000e0001"
    )
    assert escape("a\\x0a") == "a\\\\x0a" != escape("a\n")
    assert escape(3) == "3" and escape(None) == "None"


def test_reports_escape_untrusted_strings(capsys: pytest.CaptureFixture[str]) -> None:
    print_report({"signatures": "unreadable: bad\nVERIFIED x", "context": {"env": "a\nb"}, "n": 3}, False)
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 3 and "\\x0a" in out


# -- design item: recovery shares can be revoked (root-key rotation) --------------------


def test_rotate_root_revokes_old_shares_and_old_copies_of_the_keystore(env: Env, tmp_path: Path) -> None:
    sealed = _sealed(env)
    path = keystore.keystore_path(env.home)
    old_shares = keystore.split_root(3, 2)
    old_copy = tmp_path / "keystore-backup.json"
    shutil.copy2(path, old_copy)
    old_root = keystore.unlock(path).root_key
    keystore.rotate_root()
    keystore.clear_cache()
    new_root = keystore.unlock(path).root_key
    assert new_root != old_root
    # Old shares combine to the old root, which opens nothing now.
    with pytest.raises(KeystoreError, match="not to this keystore"):
        keystore.recover_root(old_shares[:2], b"attacker's passphrase", scrypt_log2_n=14)
    # The root from an old copy (opened with the old passphrase) does not open the current file.
    keystore.clear_cache()
    copy_root = keystore.unlock(old_copy).root_key
    assert copy_root == old_root
    doc = json.loads(path.read_text())
    with pytest.raises(KeystoreError, match="damaged"):
        keystore._open_body(doc, copy_root)
    # Artifacts keep opening; a new split works.
    keystore.clear_cache()
    assert modelseal.open(sealed, keys=KeyService(sink=MemorySink())).read() == b"model weights"
    new_shares = keystore.split_root(3, 2)
    keystore.recover_root(new_shares[1:], b"after rotation", scrypt_log2_n=14)
    keystore.clear_cache()
    assert keystore.unlock(path, passphrase=lambda: b"after rotation").root_key == new_root


def test_rotate_root_with_a_new_passphrase(env: Env) -> None:
    path = keystore.keystore_path(env.home)
    keystore.rotate_root(new_passphrase=b"second passphrase")
    keystore.clear_cache()
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        keystore.unlock(path)
    keystore.clear_cache()
    assert "test-kek" in keystore.unlock(path, passphrase=lambda: b"second passphrase").keys
    keystore.clear_cache()
    with pytest.raises(KeystoreError, match="wrong passphrase"):  # the current passphrase is required
        keystore.rotate_root(path, passphrase=lambda: b"guess")


def test_a_process_holding_the_old_root_notices_the_rotation(env: Env) -> None:
    sealed = _sealed(env)
    path = keystore.keystore_path(env.home)
    keystore.unlock(path)  # cached with the old root, as a long-running process would be
    script = "from modelseal.keys import keystore; keystore.rotate_root()"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert "test-kek" in keystore.unlock(path).keys  # not "damaged": unlocked again
    assert modelseal.open(sealed, keys=KeyService(sink=MemorySink())).read() == b"model weights"


def test_cli_rotate_root_is_audited_and_a_new_split_follows(env: Env) -> None:
    r = run("recovery", "rotate-root", "--new-passphrase", env_extra={"MODELSEAL_NEW_PASSPHRASE": "rotated"})
    assert r.returncode == 0 and "recovery split" in r.stdout, r.stderr
    r = run("recovery", "split", "--shares", "3", "--threshold", "2", "--out", str(env.work / "s"))
    assert r.returncode == 6  # the old passphrase no longer opens it
    extra = {"MODELSEAL_PASSPHRASE": "rotated"}
    r = run("recovery", "split", "--shares", "3", "--threshold", "2", "--out", str(env.work / "s"), env_extra=extra)
    assert r.returncode == 0, r.stderr
    ops = [(e["operation"], e["result"]) for e in MerkleAuditLog(env.home / "audit.db").events()]
    assert ("rotate-root", "ok") in ops and ("recovery-split", "ok") in ops
    r = run("recovery", "rotate-root", env_extra={"MODELSEAL_PASSPHRASE": "wrong"})
    assert r.returncode == 6 and r.stderr.count("\n") == 1
    ops = [(e["operation"], e["result"]) for e in MerkleAuditLog(env.home / "audit.db").events()]
    assert ("rotate-root", "KeystoreError") in ops


_KILL_AT_RENAME = textwrap.dedent(
    """
    import os, signal, sys
    from modelseal.keys import keystore
    real = os.replace
    when = sys.argv[1]
    def replace(src, dst):
        if str(dst).endswith("keystore.json"):
            if when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
    keystore.rotate_root()
    """
)


@pytest.mark.parametrize("when", ["before", "after"])
def test_rotate_root_survives_kill_9_at_the_rename(env: Env, when: str) -> None:
    sealed = _sealed(env)
    path = keystore.keystore_path(env.home)
    shares = keystore.split_root(3, 2)
    before = path.read_bytes()
    r = subprocess.run([sys.executable, "-c", _KILL_AT_RENAME, when], timeout=60)
    assert r.returncode == -signal.SIGKILL
    keystore.clear_cache()
    assert modelseal.open(sealed, keys=KeyService(sink=MemorySink())).read() == b"model weights"
    if when == "before":
        assert path.read_bytes() == before  # the old keystore, whole; the old shares still work
        keystore.recover_root(shares[:2], PASSPHRASE.encode(), scrypt_log2_n=14)
    else:
        assert path.read_bytes() != before  # the new keystore, whole; the old shares are revoked
        with pytest.raises(KeystoreError, match="not to this keystore"):
            keystore.recover_root(shares[:2], PASSPHRASE.encode(), scrypt_log2_n=14)
