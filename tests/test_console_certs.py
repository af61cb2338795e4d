"""The console's Certificates page (issue 16, helper B): the inventory of a real local CA's
records (valid ones expiring soonest first, expired ones, revoked serials with their
identity), its bounds, and the template's escaping of what the records hold."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import pytest

from modelseal.errors import CertificateError
from modelseal.pki import ca as pki_ca
from modelseal.pki import denylist, issue, store
from modelseal.pki.identity import Identity
from modelseal.server import console_certs
from modelseal.server.console_page import _ENV
from tests.conftest import Env

TD = "example.org"


def who(name: str) -> Identity:
    return Identity.of(TD, "prod", "service", name)


@pytest.fixture
def ca(env: Env) -> pki_ca.CA:
    return pki_ca.init_ca(env.svc, TD)


def page(**values: Any) -> str:
    return _ENV.get_template("certs.html").render(
        title="Certificates", identity="spiffe://t/user/a", csrf="x", expires=None, nav=[], here="", **values
    )


def test_valid_soonest_first_expired_and_revoked(env: Env, ca: pki_ca.CA) -> None:
    hours = {"c-long": 100, "a-short": 1, "b-mid": 30}
    made = {n: issue.issue(env.svc, who(n), ttl=dt.timedelta(hours=h), ca=ca) for n, h in hours.items()}
    past = pki_ca.utcnow() - dt.timedelta(hours=3)
    gone = issue.issue(env.svc, who("old"), ttl=dt.timedelta(hours=1), now=past, ca=ca)
    issue.revoke(env.svc, made["b-mid"].cert.serial_number, "key leaked", ca=ca)
    inv = console_certs.inventory(ca.folder, time.time())
    assert [c.identity.rsplit("/", 1)[1] for c in inv.valid] == ["a-short", "c-long"]
    assert [c.soon for c in inv.valid] == [True, False] and inv.valid[0].left in ("59 min", "1 h")
    assert inv.valid[0].serial == denylist.serial_hex(made["a-short"].cert.serial_number)
    assert [c.serial for c in inv.expired] == [denylist.serial_hex(gone.cert.serial_number)]
    [rev] = inv.revoked
    assert rev.serial == denylist.serial_hex(made["b-mid"].cert.serial_number)
    assert rev.identity == who("b-mid").uri and rev.reason == "key leaked" and rev.revoked_at
    assert inv.counts == {"issued": 4, "valid": 2, "expiring": 1, "expired": 1, "revoked": 1}
    short = console_certs.inventory(ca.folder, time.time(), limit=1)
    assert len(short.valid) == 1 and short.counts["valid"] == 2
    soonest, counts = console_certs.expiring_soonest(ca.folder, time.time(), 5)
    assert [c.identity for c in soonest] == [c.identity for c in inv.valid] and counts == inv.counts
    html = page(configured=True, inv=inv, page_rows=100, soon_days=2.0)
    assert html.count('data-testid="cert-row"') == 2 and html.count('data-testid="revoked-row"') == 1
    assert "key leaked" in html and 'data-testid="certs-expired"' in html


def test_no_records_and_a_malformed_index(env: Env, ca: pki_ca.CA) -> None:
    inv = console_certs.inventory(ca.folder, time.time())
    assert inv.valid == inv.revoked == inv.expired == [] and inv.counts["issued"] == 0
    html = page(configured=True, inv=inv, page_rows=100, soon_days=2.0)
    assert 'data-testid="certs-none-valid"' in html and 'data-testid="certs-none-revoked"' in html
    store.write(ca.folder, issue.ISSUED_FILE, b'{"issued": 5}')
    with pytest.raises(CertificateError, match="malformed"):
        console_certs.inventory(ca.folder, time.time())
    assert "not available" in page(configured=False)


def test_record_text_is_cut_and_escaped(env: Env, ca: pki_ca.CA) -> None:
    now = time.time()
    rows = [
        {
            "serial": "0A1B",
            "identity": "<script>x</script>\n\x1b[2J" + "y" * 500,
            "not_after": now + 60,
            "issued_at": now,
        },
        {"serial": "not hex", "identity": "skipped", "not_after": now + 60},
        {"serial": "0C", "identity": "no time"},
    ]
    store.write(ca.folder, issue.ISSUED_FILE, json.dumps({"issued": rows}).encode())
    denylist.add(0x0C, "<b>bad</b>", None, ca.folder)
    inv = console_certs.inventory(ca.folder, now)
    [c] = inv.valid
    assert len(c.identity) == 200 and "\n" not in c.identity and "\\x1b" in c.identity
    assert inv.revoked[0].identity == "no time" and inv.counts["issued"] == 2
    html = page(configured=True, inv=inv, page_rows=100, soon_days=2.0)
    assert "<script>x" not in html and "&lt;script&gt;x" in html and "<b>bad" not in html
