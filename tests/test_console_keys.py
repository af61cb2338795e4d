"""The console's Keys page (issue 16, helper B): broker keys described as the key API
describes them and judged against the rotation policy and the cryptoperiod, their use per
day counted from the verified entries of a real audit log, and the templates."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog
from modelseal.format.header import normalize_context
from modelseal.governance import brokerops as ops
from modelseal.governance.brokerkeys import BrokerConfig, BrokerKey, BrokerKeys
from modelseal.keys.service import KeyService
from modelseal.server import console_keys as ck
from modelseal.server import console_svg
from modelseal.server.console_audit import AuditView
from modelseal.server.console_page import _ENV
from tests.conftest import Env

DAY = 86400.0
CALLER = "spiffe://example.org/prod/service/trainer"
PROD = normalize_context({"env": "prod"})


@pytest.fixture
def world(env: Env, tmp_path: Path) -> tuple[KeyService, BrokerKeys, MerkleAuditLog]:
    log = MerkleAuditLog(tmp_path / "audit.db")
    svc = env.svc.with_sink(log)
    catalog = BrokerKeys.open(tmp_path / "gov.db", BrokerConfig(create={"prod": "local", "dev": "local"}))
    return svc, catalog, log


def version(v: int, age_days: float, state: str, now: float) -> dict[str, Any]:
    return {"version": v, "created": now - age_days * DAY, "state": state}


def doc(*versions: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "k",
        "env": "prod",
        "provider": "local",
        "created": 1.0,
        "static": False,
        "destroyed": None,
        "created_by": CALLER,
        "versions": list(versions),
        "min_decryption_version": 1,
        **extra,
    }


def test_judge_orders_past_near_due_ok() -> None:
    now = 1_800_000_000.0
    p = ck.Periods(365)
    cases = [
        ((version(1, 400, "active", now),), ck.PAST),
        ((version(1, 340, "active", now),), ck.NEAR),
        ((version(1, 100, "active", now),), ck.DUE),
        ((version(1, 400, "active", now), version(2, 10, "active", now)), ck.OK),  # the newest active counts
        ((version(1, 10, "disabled", now),), ck.NONE),
    ]
    for versions, status in cases:
        row = ck.judge(doc(*versions), 90, p, now)
        assert row.status == status, (versions, row)
    row = ck.judge(doc(version(2, 5, "active", now), version(1, 50, "disabled", now)), 90, p, now)
    assert [v["version"] for v in row.versions] == [1, 2] and row.age_days == 5.0
    assert ck.judge(doc(destroyed=2.0), 90, p, now).status == ck.GONE
    failed = ck.judge(doc(error={"code": "UNAVAILABLE", "message": "no\nprovider"}), 90, p, now)
    assert failed.status == ck.UNKNOWN and failed.error == "no\\x0aprovider"
    assert ck.judge(doc(version(1, 200, "active", now)), 90, ck.Periods(150), now).status == ck.PAST


def test_periods_come_from_the_scan_table(env: Env) -> None:
    assert ck.periods(env.home).cryptoperiod_days == 365
    config = env.home / "config.toml"
    config.write_text("[scan]\ncryptoperiod_days = 120\n")
    os.chmod(config, 0o600)
    assert ck.periods(env.home) == ck.Periods(120)
    config.write_text("[scan]\ncryptoperiod_days = 0\n")
    p = ck.periods(env.home)
    assert p.cryptoperiod_days == 365 and "default cryptoperiod" in p.note


def test_real_keys_are_described_without_their_backing_key(
    world: tuple[KeyService, BrokerKeys, MerkleAuditLog],
) -> None:
    svc, catalog, _ = world
    llama = ops.create_key(svc, catalog, "llama", "prod", CALLER)
    ops.change(svc, llama, "rotate", None, CALLER)
    ops.change(svc, llama, "disable", 1, CALLER)
    gone = ops.create_key(svc, catalog, "gone", "prod", CALLER)
    ops.destroy_now(svc, catalog, "gone", None, CALLER)
    rows = ck.describe_rows(svc, catalog.all(), ck.Periods(), time.time())
    by = {r.name: r for r in rows}
    assert [(v["version"], v["state"]) for v in by["llama"].versions] == [(1, "disabled"), (2, "active")]
    assert by["llama"].status == ck.OK and by["llama"].age_days == 0.0 and by["llama"].provider == "local"
    assert by["llama"].rotate_after_days == svc.config.rotation_days("prod")
    assert by["gone"].status == ck.GONE
    for r in rows:  # the backing key's random name appears nowhere in what the page shows
        shown = repr(r)
        assert llama.backing.split(":")[1] not in shown and gone.backing.split(":")[1] not in shown


def test_use_per_day_from_the_verified_log(world: tuple[KeyService, BrokerKeys, MerkleAuditLog]) -> None:
    svc, catalog, log = world
    llama = ops.create_key(svc, catalog, "llama", "prod", CALLER)
    other = ops.create_key(svc, catalog, "other", "prod", CALLER)
    dek = os.urandom(32)
    wrapped = [ops.wrap_one(svc, llama, dek, PROD, CALLER) for _ in range(3)]
    ops.unwrap_items(svc, llama, [(w.key_version, w.wrapped, PROD) for w in wrapped[:2]], CALLER)
    bad = wrapped[2].wrapped[:-1] + bytes([wrapped[2].wrapped[-1] ^ 1])
    ops.unwrap_items(svc, llama, [(wrapped[2].key_version, bad, PROD)], CALLER)  # a failed unwrap
    ops.change(svc, llama, "rotate", None, CALLER)
    ops.wrap_one(svc, other, dek, PROD, CALLER)
    now = time.time()
    log.emit(AuditEvent("unwrap", llama.backing, "ok", 1, actor=CALLER, time=now - 3 * DAY))
    log.emit(AuditEvent("unwrap", llama.backing, "ok", 1, actor=CALLER, time=now - 30 * DAY))  # before the window
    log.emit(AuditEvent("authorize", "key.unwrap Key:llama", "allow", actor=CALLER))  # not a key operation
    view = AuditView(log, cache_seconds=0.0)
    use = ck.usage(view, [llama, other], 7, now)
    assert use.complete and use.available and len(use.days) == 7
    s = use.counts["llama"]
    assert s["wrap"][-1] == 3 and s["unwrap"][-1] == 2 and s["failed"][-1] == 1 and s["rotate"][-1] == 1
    assert s["lifecycle"][-1] == 1  # its create
    assert s["unwrap"][-4] == 1 and sum(s["unwrap"]) == 3
    assert use.total("llama") == 3 + 3 + 1 + 1 + 1 and use.total("other") == 2
    assert dict(use.series(["other"]))["wrap"][-1] == 1 and dict(use.series())["wrap"][-1] == 4
    bounded = ck.usage(view, [llama, other], 7, now, scan=3)
    assert not bounded.complete and bounded.read[1] - bounded.read[0] == 2
    assert ck.usage(None, [llama], 7, now).available is False


def test_spellings_cover_wrap_and_unwrap_events() -> None:
    e = BrokerKey("m", "prod", "transit:broker-prod-abc")
    got = ck.spellings(e)
    assert {"transit:broker-prod-abc", "transit:transit/broker-prod-abc", "broker:m"} <= got


def page(template: str, **values: Any) -> str:
    return _ENV.get_template(template).render(
        title="Keys", identity="spiffe://t/user/a", csrf="x", expires=None, nav=[], here="", **values
    )


def test_templates_render_the_rows_chart_and_notes() -> None:
    now = 1_800_000_000.0
    row = ck.judge(doc(version(1, 400, "active", now), created_by="<i>evil</i>"), 90, ck.Periods(), now)
    use = ck.Usage(["01-01"], now, {"k": {s: [1] for s in ck.SERIES}}, (3, 9), False)
    chart = console_svg.column_chart("Use", use.days, use.series())
    html = page(
        "keys.html",
        configured=True,
        days=7,
        rows=[row],
        more=True,
        max_keys=200,
        periods=ck.Periods(),
        near_days=30,
        usage=use,
        chart=chart,
    )
    assert 'data-status="past cryptoperiod"' in html and 'data-testid="usage-partial"' in html
    assert html.count("<svg") == 1 and 'data-testid="keys-more"' in html
    detail = page(
        "key.html",
        row=row,
        days=7,
        periods=ck.Periods(),
        near_days=30,
        usage=use,
        chart=chart,
        totals=[(s, 1) for s in ck.SERIES],
    )
    assert "<i>evil" not in detail and "&lt;i&gt;evil" in detail and 'data-version="1"' in detail
    assert "not available" in page("keys.html", configured=False, days=30)
