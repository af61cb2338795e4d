"""SQL parts across dialects (recovery.sqldump) against a real PostgreSQL 15: a SQLite host's
registry, governance and audit dumps load into PostgreSQL and back, row for row."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog
from modelseal.audit.store import open_store
from modelseal.errors import BackupError
from modelseal.governance.store import GovStore
from modelseal.recovery import sqldump
from modelseal.recovery.locations import Locations
from modelseal.recovery.restoreparts import restore_part
from modelseal.registry.sqldb import Database
from modelseal.telemetry import scanbackup

from .services import postgres


@pytest.fixture(scope="module")
def pg() -> Iterator[tuple[str, str]]:
    """(URL without its password, password): Locations refuse a password in a URL."""
    try:
        with postgres() as url:
            parts = urlsplit(url)
            netloc = f"{parts.username}@{parts.hostname}:{parts.port}"
            yield urlunsplit(parts._replace(netloc=netloc)), parts.password or ""
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture
def pg_url(pg: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url, password = pg
    monkeypatch.setenv("PGPASSWORD", password)
    yield url
    with psycopg.connect(url, autocommit=True) as conn:  # every test starts from an empty database
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


def _sqlite_host(tmp: Path) -> Path:
    data = tmp / "registry"
    data.mkdir()
    reg = Database("sqlite", str(data / "registry.db"))
    reg.run(lambda q: q("INSERT INTO reg_repositories VALUES (?, ?)", "models/a", 1700000000.25))
    reg.run(lambda q: q("INSERT INTO reg_repositories VALUES (?, ?)", "models/B", 1700000000.5))
    reg.run(
        lambda q: q(
            "INSERT INTO reg_manifests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            "models/a",
            "sha256:" + "b" * 64,
            "application/x",
            b"\x00\xff" * 50,
            100,
            None,
            "t",
            '{"a":"b"}',
            3.5,
        )
    )
    reg.close()
    gov = GovStore.open(data / "governance.db")
    gov.run(
        lambda q: q(
            "INSERT INTO gov_bindings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            "b1",
            "spiffe://d/prod/user/u",
            "reader",
            "prod",
            2e9,
            "binding",
            "r",
            "admin",
            1.0,
            None,
        )
    )
    gov.close()
    log = MerkleAuditLog(tmp / "audit.db")
    for i in range(4):
        log.emit(AuditEvent("op", f"local:k{i}", "ok", 1, None))
    return data


def _rows(data: bytes, schema: str) -> dict[str, list[str]]:
    return {t: sorted(map(repr, rows)) for t, (_, rows) in sqldump.parse(data, schema, schema).items()}


def test_sqlite_to_postgresql_and_back(tmp_path: Path, pg_url: str) -> None:
    data = _sqlite_host(tmp_path)
    dumps = {
        "registry": sqldump.dump("registry", "sqlite", str(data / "registry.db"), name="registry")[0],
        "governance": sqldump.dump("governance", "sqlite", str(data / "governance.db"), name="governance")[0],
        "audit": sqldump.dump("audit", "sqlite", str(tmp_path / "audit.db"), name="audit")[0],
    }
    os.environ["MODELSEAL_AUDIT_URL"] = pg_url
    try:
        loc = Locations.from_args(tmp_path / "home", registry_db=pg_url)
    finally:
        del os.environ["MODELSEAL_AUDIT_URL"]
    assert loc.registry_target() == ("pg", pg_url) and loc.audit_target() == ("pg", pg_url)
    for name, dump in dumps.items():
        out = restore_part(name, "sql", dump, loc, replace=False)
        assert out["rows"] > 0
    # The tables were made by the schemas' own classes: PostgreSQL types, the append-only triggers.
    assert open_store(pg_url).rows() == MerkleAuditLog(tmp_path / "audit.db").store.rows()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        body = conn.execute("SELECT body FROM reg_manifests").fetchone()
        assert body is not None and bytes(body[0]) == b"\x00\xff" * 50
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("DELETE FROM modelseal_audit_events")
    for name, dump in dumps.items():  # back out of PostgreSQL: the same rows
        again, meta = sqldump.dump(name, "pg", pg_url, name=name)
        assert _rows(again, name) == _rows(dump, name), name
        if name == "audit":
            assert meta["size"] == 4 and meta["root"] == open_store(pg_url).rows()[-1][3].hex()
        back = tmp_path / f"back-{name}.db"
        sqldump.load(again, name, "sqlite", str(back), name=name, replace=False)
        assert _rows(sqldump.dump(name, "sqlite", str(back), name=name)[0], name) == _rows(dump, name)
    # A second run changes nothing; other rows already there need replace, which empties first.
    assert restore_part("registry", "sql", dumps["registry"], loc, replace=False)["written"] == 0
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO reg_repositories VALUES ('models/extra', 1.0)")
    with pytest.raises(BackupError, match="not empty"):
        restore_part("registry", "sql", dumps["registry"], loc, replace=False)
    restore_part("registry", "sql", dumps["registry"], loc, replace=True)
    assert _rows(sqldump.dump("registry", "pg", pg_url, name="registry")[0], "registry") == _rows(
        dumps["registry"], "registry"
    )


def test_the_scan_knows_a_real_pg_dump(tmp_path: Path, pg_url: str) -> None:
    data = _sqlite_host(tmp_path)
    sqldump.load(
        sqldump.dump("registry", "sqlite", str(data / "registry.db"), name="registry")[0],
        "registry",
        "pg",
        pg_url,
        name="registry",
        replace=False,
    )
    for fmt in ("custom", "plain"):  # the password comes from PGPASSWORD, never argv
        out = subprocess.run(["pg_dump", f"--format={fmt}", pg_url], capture_output=True, check=True, env=os.environ)
        finding = scanbackup.check(f"/backups/x.{fmt}", out.stdout[:4096], sealed=False)
        assert finding is not None and finding.kind == "unencrypted-backup" and "pg_dump" in finding.detail


def test_postgresql_audit_replace_keeps_the_triggers(tmp_path: Path, pg_url: str) -> None:
    first = MerkleAuditLog(tmp_path / "a" / "audit.db")
    (tmp_path / "a").mkdir()
    first.emit(AuditEvent("op", "local:a", "ok", 1, None))
    other = MerkleAuditLog(tmp_path / "b" / "audit.db")
    (tmp_path / "b").mkdir()
    for i in range(3):
        other.emit(AuditEvent("op", f"local:b{i}", "ok", 1, None))
    a = sqldump.dump("audit", "sqlite", str(tmp_path / "a" / "audit.db"), name="audit")[0]
    b = sqldump.dump("audit", "sqlite", str(tmp_path / "b" / "audit.db"), name="audit")[0]
    sqldump.load(a, "audit", "pg", pg_url, name="audit", replace=False)
    with pytest.raises(BackupError, match="not a prefix"):
        sqldump.load(b, "audit", "pg", pg_url, name="audit", replace=False)
    assert len(open_store(pg_url).rows()) == 1
    sqldump.load(b, "audit", "pg", pg_url, name="audit", replace=True)
    assert open_store(pg_url).rows() == other.store.rows()
    with psycopg.connect(pg_url, autocommit=True) as conn, pytest.raises(psycopg.errors.RaiseException):
        conn.execute("TRUNCATE modelseal_audit_events")
