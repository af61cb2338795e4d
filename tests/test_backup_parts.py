"""Backup parts (recovery.parts, recovery.restoreparts, keys.keystore_export): what goes into
a backup, the environment filter, the allowlist on restore, and crash safety."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog, load_or_create_signing_key
from modelseal.errors import BackupError, BackupTampered
from modelseal.governance.store import GovStore
from modelseal.keys import keystore
from modelseal.recovery import parts, restoreparts, sqldump
from modelseal.recovery.locations import Locations
from modelseal.recovery.partcodec import HEADER_PREFIX, decode_files, encode_files
from modelseal.registry.sqldb import Database

from .conftest import PASSPHRASE, Env

CONFIG = """
host_env = "prod"
trust_policy = "trust/trust.toml"

[environments.prod]
keys = ["local:prod-kek"]

[environments.dev]
keys = ["local:dev-kek"]

[projects.llama]
prod = ["local:llama-prod"]
dev = ["local:llama-dev"]
"""

TRUST = """
version = 1
[signers.release]
keys = ["keys/release.pub.pem"]
[[rules]]
signers = ["release"]
[revocation]
list = "../revocations.json"
signers = ["release"]
"""


def _private(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(0o600)


def _host(env: Env) -> Locations:
    """A home with env-bound keys, config and trust files, a CA folder, an audit log with
    events, and a registry with governance tables (both SQLite)."""
    home = env.home
    _private(home / "config.toml", CONFIG)
    for k in ("prod-kek", "dev-kek", "llama-prod", "llama-dev"):
        env.svc.create(f"local:{k}")
    _private(home / "trust" / "trust.toml", TRUST)
    _private(
        home / "trust" / "keys" / "release.pub.pem", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
    )
    _private(home / "revocations.json", '{"payload": "x"}')
    _private(home / "revocation-state.json", json.dumps({"/x/revocations.json": 7}))
    _private(home / "not-allowlisted.txt", "private notes")
    ca = home / "ca"
    for n in ("ca.json", "root-1.pem", "issuing-1.pem", "root-1.key.json", "issuing-1.key.json", "issued.json"):
        _private(ca / n, f"{n} bytes")
    _private(ca / ".records.lock", "")
    _private(ca / "stray.txt", "not a CA file")
    load_or_create_signing_key(home / "audit-signing.key")
    log = MerkleAuditLog(home / "audit.db")
    for i in range(5):
        log.emit(AuditEvent("test-op", f"local:k{i}", "ok", 1, None))
    data = env.work / "registry"
    data.mkdir(mode=0o700)
    reg = Database("sqlite", str(data / "registry.db"))
    reg.run(lambda q: q("INSERT INTO reg_repositories VALUES (?, ?)", "models/a", 1700000000.25))
    body = bytes(range(256))
    reg.run(
        lambda q: q(
            "INSERT INTO reg_manifests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            "models/a",
            "sha256:" + "a" * 64,
            "application/x",
            body,
            256,
            None,
            None,
            None,
            1700000001.5,
        )
    )
    reg.close()
    gov = GovStore.open(data / "governance.db")
    for i, e in enumerate(("prod", "dev", "prod")):
        gov.run(
            lambda q, i=i, e=e: q(
                "INSERT INTO gov_bindings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                f"b{i}",
                f"spiffe://d/{e}/user/u{i}",
                "reader",
                e,
                2e9,
                "binding",
                "r",
                "admin",
                1.0,
            )
        )
    gov.close()
    return Locations.from_args(home, registry_data=data)


def _fresh(tmp: Path) -> Locations:
    home = tmp / "restored-home"
    return Locations(home, None, tmp / "restored-registry", None, home / "audit.db", None)


def _by_name(ps: list[parts.Part]) -> dict[str, parts.Part]:
    return {p.name: p for p in ps}


def test_collect_everything_and_restore_into_a_fresh_home(env: Env, tmp_path: Path) -> None:
    loc = _host(env)
    got = _by_name(parts.collect(loc, None, env.svc))
    assert list(got) == ["keystore", "config", "ca", "governance", "registry", "audit"]
    assert got["keystore"].meta["skipped"] == ["openbao"]
    for p in got.values():
        assert p.data.startswith(HEADER_PREFIX), p.name  # the scan recognises a plaintext part
    _, ks = decode_files(got["keystore"].data, "keystore")
    assert ks["keystore.json"][0] == (env.home / "keystore.json").read_bytes()
    _, cfg = decode_files(got["config"].data, "config")
    assert set(cfg) == {
        "config.toml",
        "revocation-state.json",
        "trust/trust.toml",
        "trust/keys/release.pub.pem",
        "revocations.json",
    }  # no private signing key: not the audit key (review finding 1), not the backup key
    _, ca = decode_files(got["ca"].data, "ca")
    assert set(ca) == {"ca.json", "root-1.pem", "issuing-1.pem", "root-1.key.json", "issuing-1.key.json", "issued.json"}
    assert got["ca"].meta["left_out"] == 1
    assert got["governance"].meta["tables"]["gov_bindings"] == 3
    assert got["registry"].meta["tables"]["reg_manifests"] == 1
    rows = MerkleAuditLog(env.home / "audit.db").store.rows()
    assert got["audit"].meta["size"] == len(rows) == 5
    assert got["audit"].meta["root"] == rows[-1][3].hex()

    fresh = _fresh(tmp_path)
    for p in got.values():
        restoreparts.restore_part(p.name, p.kind, p.data, fresh, replace=False)
    for name in ("keystore.json", "config.toml", "trust/trust.toml", "trust/keys/release.pub.pem", "revocations.json"):
        assert (fresh.home / name).read_bytes() == (env.home / name).read_bytes(), name
    assert not (fresh.home / "audit-signing.key").exists()  # a full restore starts a new audit key
    assert (fresh.home / "keystore.json").stat().st_mode & 0o777 == 0o600
    assert not (fresh.home / "not-allowlisted.txt").exists()
    assert sorted(p.name for p in (fresh.home / "ca").iterdir()) == sorted(ca)
    assert MerkleAuditLog(fresh.home / "audit.db").store.rows() == rows
    assert MerkleAuditLog(fresh.home / "audit.db").verify().ok
    again = _by_name(parts.collect(fresh, None, env.svc))
    for name in ("governance", "registry", "audit"):  # a dump is deterministic: the same rows, the same bytes
        assert again[name].data == got[name].data, name
    # Re-running every restore changes nothing and needs no replace.
    for p in got.values():
        out = restoreparts.restore_part(p.name, p.kind, p.data, fresh, replace=False)
        if p.kind == "files":
            assert out["written"] == 0, p.name


def test_an_environments_backup_holds_only_its_keys(env: Env, tmp_path: Path) -> None:
    loc = _host(env)
    full = keystore.unlock(env.home / "keystore.json").keys
    got = _by_name(parts.collect(loc, "prod", env.svc))
    assert got["keystore"].meta["keys"] == 2
    _, files = decode_files(got["keystore"].data, "keystore")
    exported = tmp_path / "exported" / "keystore.json"
    _private(exported, files["keystore.json"][0])
    keystore.clear_cache()
    opened = keystore.unlock(exported, lambda: PASSPHRASE.encode())  # the same passphrase opens it
    assert set(opened.keys) == {"prod-kek", "llama-prod"}
    assert opened.keys["prod-kek"] == full["prod-kek"]
    # No other environment's key material anywhere in the backup's plaintext.
    everything = b"".join(p.data for p in got.values()) + json.dumps(opened.keys).encode()
    for name in ("dev-kek", "llama-dev", "test-kek"):
        material = full[name]["versions"]["1"]["material"]
        assert material.encode() not in everything, name
        assert base64.b64decode(material) not in everything
    # The governance rows of other environments are left out too.
    tables = sqldump.parse(got["governance"].data, "governance", "governance")
    assert [r[3] for r in tables["gov_bindings"][1]] == ["prod", "prod"]
    # The same recovery shares that open the host's keystore open the export (same root key).
    shares = keystore.split_root(3, 2, env.home / "keystore.json")
    keystore.recover_root(shares[:2], b"another passphrase", exported, scrypt_log2_n=14)
    keystore.clear_cache()
    assert set(keystore.unlock(exported, lambda: b"another passphrase").keys) == {"prod-kek", "llama-prod"}


def test_an_environments_backup_refuses_a_shared_openbao(env: Env) -> None:
    loc = _host(env)
    shared = Locations.from_args(env.home, registry_data=loc.registry_data, bao_addr="http://127.0.0.1:9")
    with pytest.raises(BackupError, match="not prod's own"):
        parts.collect(shared, "prod", env.svc)


def test_locations_refuse_a_password_in_a_url(env: Env) -> None:
    with pytest.raises(BackupError, match="password"):
        Locations.from_args(env.home, registry_db="postgresql://u:secret@127.0.0.1/db")
    with pytest.raises(BackupError, match="no credentials"):
        Locations.from_args(env.home, bao_addr="http://tok@127.0.0.1:8200")


@pytest.mark.parametrize(
    ("part", "name"),
    [
        ("keystore", "config.toml"),
        ("config", "../outside.toml"),
        ("config", "/etc/cron.d/x"),
        ("config", "not-allowlisted.txt"),
        ("config", "trust/other.pem"),  # not named by the part's config.toml
        ("ca", "evil.sh"),
        ("ca", "../ca.json"),
    ],
)
def test_a_name_off_the_allowlist_refuses_the_whole_part(tmp_path: Path, part: str, name: str) -> None:
    files = {"keystore": {"keystore.json": (b"{}", 0o600)}, "config": {"config.toml": (CONFIG.encode(), 0o600)}}.get(
        part, {"ca.json": (b"{}", 0o600)}
    )
    data = encode_files(part, {**files, name: (b"planted", 0o755)})
    fresh = _fresh(tmp_path)
    with pytest.raises(BackupTampered, match="not a file it may restore"):
        restoreparts.restore_part(part, "files", data, fresh, replace=True)
    assert not fresh.home.exists() or not any(fresh.home.rglob("*"))  # nothing written
    assert not (tmp_path / "outside.toml").exists()


def test_a_part_must_be_what_it_says(tmp_path: Path) -> None:
    data = encode_files("config", {"config.toml": (b"", 0o600)})
    with pytest.raises(BackupTampered, match="holds another part"):
        restoreparts.restore_part("keystore", "files", data, _fresh(tmp_path), replace=True)
    with pytest.raises(BackupTampered, match="unknown backup part"):
        restoreparts.restore_part("secrets", "files", data, _fresh(tmp_path), replace=True)
    with pytest.raises(BackupTampered, match="malformed"):
        restoreparts.restore_part("config", "files", data[:-5], _fresh(tmp_path), replace=True)


def test_restoring_over_different_files_needs_replace_and_records_never_fall(env: Env, tmp_path: Path) -> None:
    loc = _host(env)
    got = _by_name(parts.collect(loc, None, env.svc))
    target = Locations(env.home, None, None, None, env.home / "audit.db", None)
    (env.home / "config.toml").write_text(CONFIG + "\n# edited\n")
    _private(env.home / "revocation-state.json", json.dumps({"/x/revocations.json": 9, "/y": 2}))
    with pytest.raises(BackupError, match="restore with replace"):
        restoreparts.restore_part("config", "files", got["config"].data, target, replace=False)
    assert (env.home / "config.toml").read_text().endswith("# edited\n")
    restoreparts.restore_part("config", "files", got["config"].data, target, replace=True)
    assert (env.home / "config.toml").read_text() == CONFIG
    # A rollback floor never goes down: the higher of the backup's and the host's.
    assert json.loads((env.home / "revocation-state.json").read_text()) == {"/x/revocations.json": 9, "/y": 2}


def test_ca_restore_swaps_the_folder_whole(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loc = _host(env)
    ca_part = _by_name(parts.collect(loc, None, env.svc))["ca"]
    target = Locations(env.home, None, None, None, env.home / "audit.db", None)
    (env.home / "ca" / "ca.json").write_text("a newer CA")
    with pytest.raises(BackupError, match="restore with replace"):
        restoreparts.restore_part("ca", "files", ca_part.data, target, replace=False)

    def crash(*_a: object, **_k: object) -> None:
        raise OSError("killed midway")

    monkeypatch.setattr(restoreparts, "replace_path", crash)
    with pytest.raises(OSError, match="killed midway"):
        restoreparts.restore_part("ca", "files", ca_part.data, target, replace=True)
    assert (env.home / "ca" / "ca.json").read_text() == "a newer CA"  # the old folder, whole
    assert (env.home / "ca" / "stray.txt").exists()
    assert not list(env.home.glob(".ca.restore-*"))
    monkeypatch.undo()
    restoreparts.restore_part("ca", "files", ca_part.data, target, replace=True)
    assert (env.home / "ca" / "ca.json").read_text() == "ca.json bytes"
    assert not (env.home / "ca" / "stray.txt").exists()  # the folder is the backup's, as a whole


def test_config_restore_killed_midway_leaves_each_file_old_or_new(env: Env, tmp_path: Path) -> None:
    """A child process restores the config part and is killed (SIGKILL) after its second file:
    every file is whole (old or new), config.toml (written last) is still the old one, and a
    re-run finishes the job."""
    loc = _host(env)
    config = _by_name(parts.collect(loc, None, env.svc))["config"]
    fresh = _fresh(tmp_path)
    blob = tmp_path / "part.bin"
    blob.write_bytes(config.data)
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from pathlib import Path
        from modelseal.recovery import restoreparts
        from modelseal.recovery.locations import Locations
        from modelseal.util import files
        real, count = files.write_atomic, [0]
        def dying(*a, **k):
            real(*a, **k)
            count[0] += 1
            if count[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        restoreparts.write_atomic = dying
        home = Path({str(fresh.home)!r})
        loc = Locations(home, None, None, None, home / "audit.db", None)
        restoreparts.restore_part("config", "files", Path({str(blob)!r}).read_bytes(), loc, replace=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env={**os.environ})
    assert proc.returncode == -9, proc.stderr.decode()[-500:]
    _, files = decode_files(config.data, "config")
    written = {p.relative_to(fresh.home).as_posix() for p in fresh.home.rglob("*") if p.is_file()}
    assert written == {"revocation-state.json", "revocations.json"}  # the first two, whole
    assert not (fresh.home / "config.toml").exists()  # the commit point is written last
    assert not [p for p in fresh.home.rglob(".*") if p.is_file()]  # no temp file left holding part of one
    restoreparts.restore_part("config", "files", config.data, fresh, replace=False)  # the re-run
    assert (fresh.home / "config.toml").read_bytes() == files["config.toml"][0]
    assert (fresh.home / "trust/trust.toml").read_bytes() == files["trust/trust.toml"][0]


def test_sql_import_is_one_transaction(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loc = _host(env)
    got = _by_name(parts.collect(loc, None, env.svc))
    fresh = _fresh(tmp_path)
    real, seen = sqldump._insert, []

    def failing(c: object, table: str, *a: object) -> None:
        seen.append(table)
        if len(seen) == 2:
            raise BackupError("killed midway")
        real(c, table, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(sqldump, "_insert", failing)
    with pytest.raises(BackupError, match="killed midway"):
        restoreparts.restore_part("registry", "sql", got["registry"].data, fresh, replace=False)
    db = sqlite3.connect(fresh.registry_data / "registry.db", isolation_level=None)  # type: ignore[operator]
    assert db.execute("SELECT COUNT(*) FROM reg_repositories").fetchone()[0] == 0  # rolled back: nothing half-loaded
    assert db.execute("SELECT COUNT(*) FROM reg_manifests").fetchone()[0] == 0
    monkeypatch.undo()
    out = restoreparts.restore_part("registry", "sql", got["registry"].data, fresh, replace=False)
    assert out["tables"]["reg_manifests"] == 1
    assert db.execute("SELECT body FROM reg_manifests").fetchone()[0] == bytes(range(256))
    again = restoreparts.restore_part("registry", "sql", got["registry"].data, fresh, replace=False)
    assert again["written"] == 0  # the same rows already: a finished import run again
    db.execute("INSERT INTO reg_repositories VALUES ('models/extra', 1.0)")
    with pytest.raises(BackupError, match="not empty"):
        restoreparts.restore_part("registry", "sql", got["registry"].data, fresh, replace=False)
    restoreparts.restore_part("registry", "sql", got["registry"].data, fresh, replace=True)
    assert [r[0] for r in db.execute("SELECT name FROM reg_repositories")] == ["models/a"]


def test_audit_import_appends_to_a_prefix_and_replaces_only_when_asked(env: Env, tmp_path: Path) -> None:
    loc = _host(env)
    audit = _by_name(parts.collect(loc, None, env.svc))["audit"]
    fresh = _fresh(tmp_path)
    tables = sqldump.parse(audit.data, "audit", "audit")
    head = sqldump.header_line("audit", "sql", schema="audit")
    cols, rows = tables["events"]
    prefix = head + sqldump._table_line("events", cols, 3)
    prefix += b"".join(json.dumps([sqldump.encode_value(v) for v in r]).encode() + b"\n" for r in rows[:3])
    prefix += sqldump._table_line("meta", tables["meta"][0], len(tables["meta"][1]))
    prefix += b"".join(json.dumps(list(r)).encode() + b"\n" for r in tables["meta"][1])
    restoreparts.restore_part("audit", "sql", prefix, fresh, replace=False)
    out = restoreparts.restore_part("audit", "sql", audit.data, fresh, replace=False)
    assert out["appended"] == len(rows) - 3
    assert MerkleAuditLog(fresh.home / "audit.db").store.rows() == MerkleAuditLog(env.home / "audit.db").store.rows()
    other = MerkleAuditLog(tmp_path / "other" / "audit.db")
    (tmp_path / "other").mkdir(exist_ok=True)
    other.emit(AuditEvent("other-op", "local:x", "ok", 1, None))
    other_part, _ = sqldump.dump("audit", "sqlite", str(tmp_path / "other" / "audit.db"), name="audit")
    with pytest.raises(BackupError, match="not a prefix"):
        restoreparts.restore_part("audit", "sql", other_part, fresh, replace=False)
    restoreparts.restore_part("audit", "sql", other_part, fresh, replace=True)
    assert len(MerkleAuditLog(fresh.home / "audit.db").store.rows()) == 1
    db = sqlite3.connect(fresh.home / "audit.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):  # the triggers are back
        db.execute("DELETE FROM events")


def test_a_dump_names_only_the_schemas_tables(tmp_path: Path) -> None:
    bad = (
        sqldump.header_line("registry", "sql", schema="registry")
        + b'{"columns":["x"],"rows":0,"table":"sqlite_master"}\n'
    )
    with pytest.raises(BackupTampered, match="not the registry schema"):
        restoreparts.restore_part("registry", "sql", bad, _fresh(tmp_path), replace=True)
    bad = sqldump.header_line("registry", "sql", schema="registry")
    bad += b'{"columns":["name\\" TEXT); DROP TABLE x; --"],"rows":0,"table":"reg_tags"}\n'
    with pytest.raises(BackupTampered, match="invalid table or column"):
        restoreparts.restore_part("registry", "sql", bad, _fresh(tmp_path), replace=True)
