"""``modelseal incident cert-compromise``: dry run, revocation by serial (with its renewals)
and by identity (every live serial), the activity window from the audit log, ``--rotate-ca``
once across a crash, the report. The identity's events here are written to the real audit
log the way the server's decider writes them (actor = the identity); test_incident_key_remote
has the case with a real ``modelseal serve`` answering the identity's requests."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog
from modelseal.errors import IncidentError
from modelseal.keys.service import KeyService
from modelseal.pki import ca as pki_ca
from modelseal.pki import denylist, issue
from modelseal.pki.identity import Identity
from modelseal.recovery import certcompromise
from tests.conftest import Env
from tests.incident_helpers import audit_ops, cli

TD = "example.org"
TRAINER = f"spiffe://{TD}/prod/service/trainer"


@pytest.fixture
def pki(env: Env, tmp_path: Path) -> dict[str, object]:
    svc = KeyService(sink=MerkleAuditLog(env.home / "audit.db"))
    ca = pki_ca.init_ca(svc, TD)
    trainer = Identity.of(TD, "prod", "service", "trainer")
    first = issue.issue(svc, trainer, ca=ca)
    issue.write_dir(first, tmp_path / "trainer-tls")
    renewed = issue.renew(svc, tmp_path / "trainer-tls", ca=ca)
    other = issue.issue(svc, Identity.of(TD, "prod", "service", "other"), ca=ca)
    log = MerkleAuditLog(env.home / "audit.db")
    log.emit(AuditEvent("authorize", "pull Repository:models/a", "allow:role-reader", actor=TRAINER, source="10.0.0.7"))
    log.emit(AuditEvent("authorize", "pull Repository:models/b", "allow:role-reader", actor=other.identity.uri))
    return {"svc": svc, "first": first.serial, "renewed": renewed.serial, "other": other.serial, "ca": ca}


def _revoked(env: Env) -> set[str]:
    return {denylist.serial_hex(s) for s in denylist.load(env.home / "ca").entries}


def test_dry_run_by_identity_lists_serials_and_activity_and_changes_nothing(env: Env, pki: dict[str, object]) -> None:
    rc, out, err = cli("incident", "cert-compromise", TRAINER, "--json")
    assert rc == 0, out + err
    plan = json.loads(out)
    assert {s["serial"] for s in plan["serials"]} == {pki["first"], pki["renewed"]}
    assert [e["key"] for e in plan["activity"] if e["operation"] == "authorize"] == ["pull Repository:models/a"]
    assert any(e["operation"] == "cert-renew" for e in plan["activity"])  # the CA's event about its serial
    assert all(e["actor"] != f"spiffe://{TD}/prod/service/other" for e in plan["activity"])
    assert _revoked(env) == set()
    assert not (env.home / "incidents").exists()


def test_execute_by_serial_revokes_it_and_its_renewals(env: Env, pki: dict[str, object], tmp_path: Path) -> None:
    report = tmp_path / "cert-report.json"
    rc, out, err = cli("incident", "cert-compromise", str(pki["first"]), "--execute", "--report", str(report))
    assert rc == 0, out + err
    assert _revoked(env) == {pki["first"], pki["renewed"]}  # a thief of the key could have renewed it
    doc = json.loads(report.read_text())
    assert doc["closed"] and doc["identity"] == TRAINER and doc["steps"]["revoke"]["status"] == "done"
    assert any(e["key"] == "pull Repository:models/a" and e["source"] == "10.0.0.7" for e in doc["activity"])
    assert "activity since" in report.with_suffix(".txt").read_text()
    ops = [e["operation"] for e in audit_ops(env.home)]
    assert ops.count("incident-cert-revoke") == 1 and ops.count("cert-revoke") == 2 and ops[-1] == "incident-close"
    rc, _, err = cli("incident", "cert-compromise", str(pki["first"]), "--execute")
    assert rc == IncidentError.exit_code and "closed" in err


def test_the_window_starts_at_since(env: Env, pki: dict[str, object]) -> None:
    later = time.time() + 1
    plan = certcompromise.plan(certcompromise.CertIncident(TRAINER, since=later), pki["svc"])  # type: ignore[arg-type]
    assert plan.activity == []
    rc, out, _ = cli("incident", "cert-compromise", TRAINER, "--since", "1h")
    assert rc == 0 and "pull Repository:models/a" in out


def test_rotate_ca_once_across_a_crash(env: Env, pki: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    before = pki_ca.load_ca(env.home / "ca").generation
    real = certcompromise.activity
    calls = []

    def crash_on_the_second(*a: object) -> object:
        calls.append(a)
        if len(calls) == 2:  # the plan's listing, then the one after the roll-over
            raise KeyboardInterrupt
        return real(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(certcompromise, "activity", crash_on_the_second)
    inc = certcompromise.CertIncident(TRAINER, rotate_ca=True)
    svc = KeyService(sink=MerkleAuditLog(env.home / "audit.db"))
    with pytest.raises(KeyboardInterrupt):  # stopped after the roll-over (while listing)
        certcompromise.execute(inc, svc)
    assert pki_ca.load_ca(env.home / "ca").generation == before + 1
    monkeypatch.setattr(certcompromise, "activity", real)
    report = certcompromise.execute(inc, svc)
    assert pki_ca.load_ca(env.home / "ca").generation == before + 1  # not rolled over twice
    assert report["closed"] and "rolled over" in report["ca"]
    assert _revoked(env) == {pki["first"], pki["renewed"]}
    assert [e["operation"] for e in audit_ops(env.home)].count("ca-rotate-intermediate") == 1


def test_an_unknown_serial_needs_since(env: Env, pki: dict[str, object]) -> None:
    rc, _, err = cli("incident", "cert-compromise", "0a0b0c", "--execute")
    assert rc == IncidentError.exit_code and "--since" in err
    rc, out, err = cli("incident", "cert-compromise", "0a0b0c", "--since", "1d", "--execute")
    assert rc == 0, out + err
    assert "0A0B0C" in _revoked(env)


def test_the_serial_of_a_renewal_revokes_its_live_parent_and_warns_of_the_others(
    env: Env, pki: dict[str, object]
) -> None:
    """Review finding 7: the host that held the renewal's key held the parent's too."""
    svc = pki["svc"]
    extra = issue.issue(svc, Identity.of(TD, "prod", "service", "trainer"), ca=pki["ca"])  # type: ignore[arg-type]
    rc, out, err = cli("incident", "cert-compromise", str(pki["renewed"]), "--json")
    assert rc == 0, out + err
    plan = json.loads(out)
    assert {s["serial"] for s in plan["serials"]} == {pki["first"], pki["renewed"]}
    assert any(n.startswith("warning:") and extra.serial in n for n in plan["notes"])
    rc, out, err = cli("incident", "cert-compromise", str(pki["renewed"]), "--execute")
    assert rc == 0, out + err
    assert _revoked(env) == {pki["first"], pki["renewed"]}  # the other certificate is the operator's call
