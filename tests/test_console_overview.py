"""The console's Overview page (issue 16, helper B): open alerts from the verified audit log,
protection coverage from the metrics pass's snapshot, the last backup and drill from their
signed records (newest by name, never through a link, signature checked under the audit
log's keys), each widget's denial, and the route at exactly ``/ui/``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog, public_key_hex
from modelseal.format.header import normalize_context
from modelseal.governance import brokerops as ops
from modelseal.recovery import records
from modelseal.recovery.create import RECORD_DIR, RECORD_DOMAIN, RECORD_FORMAT
from modelseal.server import console_overview as co
from modelseal.server.console_audit import AuditView
from modelseal.server.console_page import _ENV, PREFIX
from modelseal.telemetry import collect
from tests.conftest import Env
from tests.console_world import World, console_world
from tests.push_pull_helpers import TD
from tests.test_access_cli import USER

MONITOR = "modelseal-monitor"


@pytest.fixture
def log(tmp_path: Path) -> MerkleAuditLog:
    return MerkleAuditLog(tmp_path / "audit.db")


def anomaly(detector: str, severity: str, t: float, subject: str = "spiffe://example.org/prod/user/eve") -> AuditEvent:
    return AuditEvent("anomaly", f"anomaly:{detector}", f"alert:{severity}", actor=MONITOR, time=t, subject=subject)


def test_open_alerts_of_the_window_newest_first(log: MerkleAuditLog) -> None:
    now = time.time()
    log.emit(anomaly("burst", "high", now - 90_000))  # older than the 24 h window
    for i in range(7):
        log.emit(anomaly("burst" if i % 2 else "novel-source", "high" if i < 3 else "medium", now - 3600 + i))
        log.emit(AuditEvent("unwrap", "local:k", "ok", 1, actor="x", time=now - 3600 + i))
    log.emit(AuditEvent("anomaly", "local:k", "alert:high", actor=MONITOR, time=now))  # not an anomaly key
    got = co.open_alerts(AuditView(log, cache_seconds=0.0), now)
    assert got["count"] == 7 and got["verified"] and got["complete"]
    assert got["severities"] == [("high", 3), ("medium", 4)]
    assert len(got["newest"]) == co.SHOWN and got["newest"][0]["detector"] == "novel-source"
    assert got["newest"][0]["subject"].endswith("/user/eve") and got["newest"][0]["time"]
    bounded = co.open_alerts(AuditView(log, cache_seconds=0.0), now, scan=5)
    assert bounded["count"] == 2 and not bounded["complete"]


def test_coverage_from_the_published_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    assert co.coverage([]) is None
    monkeypatch.setattr(collect.MEMORY, "families", [])
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert co.read_coverage() is None
    t = 1_800_000_000.0
    families = [
        collect.Family("modelseal_artifacts", "h", ("state",), ((("sealed-signed",), 6.0), (("plaintext",), 2.0))),
        collect.Family(
            "modelseal_state_pass_last_success_timestamp_seconds",
            "h",
            ("part",),
            ((("keys",), 1.0), (("artifacts",), t)),
        ),
    ]
    collect.write_snapshot(families, None)
    got = co.read_coverage()
    assert got is not None and got["total"] == 8 and got["signed"] == 6 and got["when"] == "2027-01-15 08:00"
    assert dict(got["counts"])["plaintext"] == 2 and dict(got["counts"])["revoked"] == 0
    assert "75 %" in got["meter"] and got["meter"].startswith("<svg")


def backup_record(home: Path, key: Ed25519PrivateKey, stamp: str, body: dict[str, Any]) -> Path:
    body = {**body, "format": RECORD_FORMAT}
    signed = RECORD_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    doc = {"body": body, "signer": public_key_hex(key.public_key()), "signature": key.sign(signed).hex()}
    folder = home.joinpath(*RECORD_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"backup-{stamp}-0000abcd.json"
    path.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")
    return path


def test_last_backup_and_drill_records(tmp_path: Path, log: MerkleAuditLog) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert co.recovery_records(home, log) == {"backup": None, "drill": None}
    key = log.signing_key
    backup_record(home, key, "20260101T000000Z", {"created": 1, "id": "old", "result": "ok", "parts": []})
    backup_record(
        home,
        key,
        "20260301T000000Z",
        {"created": 1_772_323_200, "id": "b-<2>", "env": "prod", "sequence": 4, "result": "ok", "parts": [{}, {}]},
    )
    body = {
        "started": 1_772_400_000.0,
        "result": "DrillFailed",
        "backup": {"id": "b-2"},
        "rto": {"seconds": 12.5, "target": 60, "ok": True},
        "failures": [{"x": 1}],
    }
    records.write_record(records.DRILL, body, home, log, result="DrillFailed", started=1_772_400_000.0)
    got = co.recovery_records(home, log)
    b, d = got["backup"], got["drill"]
    assert b["count"] == 2 and b["fields"]["id"] == "b-<2>" and b["fields"]["parts"] == "2"
    assert b["fields"]["when"] == "2026-03-01 00:00" and b["signature"].startswith("valid")
    assert d["fields"] == {
        "when": "2026-03-01 21:20",
        "id": "b-2",
        "result": "DrillFailed",
        "rto": "12.5",
        "rto_ok": "yes",
        "failures": "1",
    }
    assert d["signature"].startswith("valid") and d["problem"] == ""
    stranger = backup_record(home, Ed25519PrivateKey.generate(), "20260302T000000Z", {"id": "s", "result": "ok"})
    assert co.recovery_records(home, log)["backup"]["signature"] == "signer not trusted"
    stranger.unlink()
    newest = home.joinpath(*RECORD_DIR) / "backup-20270101T000000Z-0000ffff.json"
    os.symlink(home / "audit-signing.key", newest)
    assert "symbolic link" in co.recovery_records(home, log)["backup"]["problem"]
    newest.unlink()
    newest.write_text('{"not": "a record"}')
    assert co.recovery_records(home, log)["backup"]["problem"].startswith("not a record")
    newest.unlink()
    (home.joinpath(*RECORD_DIR) / "backup-20280101T000000Z-0000ffff.json.tmp").write_text("x")  # not a record name
    assert co.recovery_records(home, log)["backup"]["fields"]["id"] == "b-<2>"


def page(**values: Any) -> str:
    return _ENV.get_template("overview.html").render(
        title="Overview", identity="spiffe://t/user/a", csrf="x", expires=None, nav=[], here="", **values
    )


def test_the_template_hides_denied_widgets_and_escapes(tmp_path: Path, log: MerkleAuditLog) -> None:
    denied = {
        name: co.Widget(action, False)
        for name, action in (
            ("alerts", "audit.read"),
            ("certs", "cert.list"),
            ("keys", "key.list"),
            ("coverage", "evidence.read"),
            ("recovery", "evidence.read"),
        )
    }
    html = page(**denied, window_hours=24, near_days=30)
    assert html.count("Not allowed for you") == 5 and 'data-allowed="yes"' not in html
    assert 'data-testid="keys-denied"' in html and "<code>cert.list</code>" in html
    now = time.time()
    log.emit(anomaly("burst", "high", now - 10, subject="<script>s</script>"))
    alerts = co.Widget("audit.read", True, data=co.open_alerts(AuditView(log, cache_seconds=0.0), now))
    home = tmp_path / "home"
    home.mkdir()
    recovery = co.Widget("evidence.read", True, data=co.recovery_records(home, log))
    coverage = co.Widget("evidence.read", True, data={"coverage": None})
    html = page(
        **{**denied, "alerts": alerts, "recovery": recovery, "coverage": coverage}, window_hours=24, near_days=30
    )
    assert "<script>s" not in html and "&lt;script&gt;s" in html and 'data-testid="alert-row"' in html
    assert 'data-testid="coverage-none"' in html and 'data-testid="last-backup-none"' in html
    assert 'data-testid="last-drill-none"' in html and html.count("Not allowed for you") == 2


def test_the_route_is_exactly_ui_slash() -> None:
    app = web.Application()
    co.add_routes(app)
    assert [r.canonical for r in app.router.resources()] == [f"{PREFIX}/"]


# -- through the real server (tests.console_world) ----------------------------------------------


@pytest.fixture
def world(env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[World]:
    monkeypatch.setattr(collect.MEMORY, "families", [])  # no metrics pass in this process published figures
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with console_world(env, monkeypatch, capsys) as w:
        yield w


def widget(body: str, name: str) -> str:
    start = body.index(f'data-testid="widget-{name}"')
    return body[start : body.index("</section>", start)]


def test_an_officer_sees_certificates_and_no_keys(world: World) -> None:
    b = world.sign_in("officer1")
    home = b.get("/ui/")
    assert home.status == 200 and "no page here yet" not in home.body
    certs = widget(home.body, "certs")
    assert 'data-allowed="yes"' in certs and certs.count('data-testid="soonest-row"') == 3  # and officer1's own
    for name in ("alerts", "keys", "coverage", "recovery"):
        assert 'data-allowed="no"' in widget(home.body, name) and "Not allowed for you" in widget(home.body, name)
    page = b.get("/ui/certificates")
    assert page.status == 200 and page.body.count('data-testid="cert-row"') == 3
    assert f"{TD}/prod/service/trainer" in page.body and 'data-testid="certs-none-revoked"' in page.body
    keys = b.get("/ui/keys")  # key.list is not a security officer's: no environment's keys are listed
    assert keys.status == 200 and 'data-testid="keys-empty"' in keys.body
    ops.create_key(world.gov.svc, world.gov.catalog, "llama", "prod", f"{USER}/officer1")
    assert b.get("/ui/keys/key?name=llama").status == 403


def test_an_auditor_sees_every_widget_and_the_key_pages(world: World, env: Env) -> None:
    world.enrol("officer1")
    world.bind("alice", "auditor")
    world.bind("bob", "reader")
    llama = ops.create_key(world.gov.svc, world.gov.catalog, "llama", "prod", f"{USER}/officer1")
    for _ in range(2):
        ops.wrap_one(world.gov.svc, llama, os.urandom(32), normalize_context({"env": "prod"}), f"{USER}/alice")
    body = {"started": time.time() - 60, "result": "ok", "backup": {"id": "b-1"}, "rto": {"seconds": 3, "ok": True}}
    records.write_record(records.DRILL, body, env.home, env.sink, result="ok", started=time.time() - 60)
    b = world.sign_in("alice")
    home = b.get("/ui/").body
    for name in ("alerts", "certs", "keys", "coverage", "recovery"):
        assert 'data-allowed="yes"' in widget(home, name), name
    assert '<span class="big ok">0</span> alerts' in widget(home, "alerts")
    assert 'data-testid="coverage-none"' in home and 'data-testid="last-backup-none"' in home
    drill = widget(home, "recovery")
    assert 'data-testid="last-drill" data-result="ok"' in drill and "valid (key" in drill
    assert "0</span> of 1 keys" in widget(home, "keys")
    keys = b.get("/ui/keys")
    assert keys.status == 200 and 'data-key="llama" data-status="ok"' in keys.body
    assert 'data-testid="usage-complete"' in keys.body and "<svg" in keys.body and "style=" not in keys.body
    key = b.get("/ui/keys/key?name=llama&days=7")
    assert key.status == 200 and 'data-version="1" data-state="active"' in key.body
    assert '<tr data-op="wrap"><td>wrap</td><td>2</td>' in key.body and '<td data-testid="key-uses">3</td>' in keys.body
    assert world.gov.catalog.get("llama").backing.split(":")[1] not in key.body + keys.body
    assert b.get("/ui/keys/key?name=nope").status == 404
    assert b.get("/ui/keys/key?name=bad%21name").status == 400 and b.get("/ui/keys?days=500").status == 400
    assert b.get("/ui/certificates").status == 200
    reader = world.sign_in("bob")
    refused = reader.get("/ui/certificates")
    assert refused.status == 403 and "Traceback" not in refused.body
    assert 'data-key="llama"' in reader.get("/ui/keys").body
    assert 'data-allowed="no"' in widget(reader.get("/ui/").body, "certs")
