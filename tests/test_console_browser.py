"""The web console in real Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright)
against the real server of ``tests.console_world``: sign in with the link of ``modelseal
console login``, walk every page with no Content-Security-Policy violation and no request
off this server, take screenshots that are checked to be non-blank, approve a pending key
rotation with a TOTP code and check the key's version went up, and the refusals a browser
meets: an auditor has no Approve button and a forged approval is refused, a forged CSRF
token is refused, an expired session goes back to sign-in, and sign-out ends it.

The browser trusts the server's certificate by its public key's pin
(``--ignore-certificate-errors-spki-list``), not by ignoring certificate errors. Set
``MODELSEAL_CONSOLE_SHOTS=DIR`` to keep the screenshots (docs/console.md's come from it).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from modelseal.errors import ApprovalRequired
from modelseal.server.console_page import NAV
from tests.chromium import CHROMIUM, FLAGS
from tests.conftest import Env
from tests.console_world import World, console_world

USER = "spiffe://example.org/prod/user"
TRAINER = "spiffe://example.org/prod/service/trainer"
TWO_PERSON_ROTATE = '[governance]\ntwo_person = ["key.rotate"]\n'

# Skipped only off CI, where chromium may be missing; under CI (scripts/test.sh installs it) a missing browser fails.
pytestmark = pytest.mark.skipif(
    not shutil.which(CHROMIUM) and not os.environ.get("CI"), reason="Debian chromium is not installed"
)


def _spki_pin(cert_pem: Path) -> str:
    leaf = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    der = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Tab:
    """One Chromium page, with what it saw: CSP violations and other console errors, and
    every request that left for another origin."""

    def __init__(self, page: Any, origin: str) -> None:
        self.page, self.origin = page, origin
        self.errors: list[str] = []
        self.foreign: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: None if r.url.startswith(origin) else self.foreign.append(r.url))

    def csp_violations(self) -> list[str]:
        return [e for e in self.errors if "Content Security Policy" in e or "Refused to" in e]


@contextmanager
def chromium(world: World) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    pin = _spki_pin(world.pki.server_dir / "cert.pem")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=[*FLAGS, f"--ignore-certificate-errors-spki-list={pin}"]
        )
        try:
            yield browser
        finally:
            browser.close()


def _tab(browser: Any, world: World) -> Tab:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})  # fresh: no cookies
    return Tab(ctx.new_page(), f"https://127.0.0.1:{world.port}")


def _sign_in(tab: Tab, world: World, who: str) -> None:
    url = world.login_url(who)
    assert urlsplit(url).netloc == f"127.0.0.1:{world.port}"
    tab.page.goto(url)
    assert f"{USER}/{who}" in tab.page.inner_text("main")
    tab.page.click("#sign-in")
    tab.page.wait_for_url(f"{tab.origin}/ui/")
    assert "t=" not in tab.page.url  # the link's token left the address bar
    assert f"{USER}/{who}" in tab.page.inner_text("header")


def _not_blank(png: bytes) -> None:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        grey = img.convert("L")
        dark = sum(grey.histogram()[:200])
        assert dark > 0.005 * img.size[0] * img.size[1], "the screenshot is (nearly) blank"
        assert len(img.convert("RGB").getcolors(1 << 20) or []) > 10  # more than a flat fill


def _shot(tab: Tab, name: str) -> None:
    png = tab.page.screenshot(full_page=True)
    _not_blank(png)
    keep = os.environ.get("MODELSEAL_CONSOLE_SHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / f"{name}.png").write_bytes(png)


@pytest.fixture
def world(env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[World]:
    with console_world(env, monkeypatch, capsys, config=TWO_PERSON_ROTATE) as w:
        yield w


def test_sign_in_and_walk_every_page(world: World) -> None:
    """An auditor (every read of the shipped policy, no change) walks every page."""
    assert len(NAV) == 9, NAV  # Overview, Artifacts, Keys, Certificates, Audit, Approvals, Access, Policies, Evidence
    approval, _ = _pending_rotation(world, "team-weights")  # something on the pages: a key, its use, a request
    _use(world, "team-weights")
    world.bind("audra", "auditor")
    with chromium(world) as browser:
        tab = _tab(browser, world)
        _sign_in(tab, world, "audra")
        for path, _label in NAV:
            tab.page.click(f'header nav a[href="{path}"]')
            tab.page.wait_for_url(f"{tab.origin}{path}")
            assert tab.page.inner_text("h1").strip(), path
            assert tab.page.locator(".refusal").count() == 0, (path, tab.page.inner_text("main")[:300])
            assert tab.page.get_attribute(f'header nav a[href="{path}"]', "aria-current") == "page"
            _shot(tab, path.strip("/").replace("/", "-") or "ui")
        tab.page.click('header nav a[href="/ui/keys"]')
        assert "team-weights" in tab.page.inner_text("main")
        assert "wrap (6)" in tab.page.inner_text("main") and "unwrap (4)" in tab.page.inner_text("main")
        assert tab.page.locator("main svg").count() >= 1  # the usage chart, drawn by the server
        tab.page.click('header nav a[href="/ui/approvals"]')
        assert tab.page.locator(f'[data-approval="{approval}"]').count() == 1
        assert tab.csp_violations() == [], tab.csp_violations()
        assert tab.foreign == [], tab.foreign
        # sign-out ends the session: the overview sends the browser back to sign-in
        tab.page.click("header .logout button")
        tab.page.wait_for_url(f"{tab.origin}/ui/login")
        tab.page.goto(f"{tab.origin}/ui/")
        assert tab.page.url == f"{tab.origin}/ui/login"


def test_a_forged_csrf_token_and_an_expired_session_are_refused(world: World) -> None:
    with chromium(world) as browser:
        tab = _tab(browser, world)
        _sign_in(tab, world, "officer2")
        tab.page.eval_on_selector('header .logout input[name="csrf"]', "e => { e.value = 'forged' }")
        tab.page.click("header .logout button")
        assert "CSRF token" in tab.page.inner_text("main")
        tab.page.goto(f"{tab.origin}/ui/")
        assert tab.page.url == f"{tab.origin}/ui/"  # the forged sign-out did not end the session
        world.clock.offset += 8 * 3600 + 60
        tab.page.goto(f"{tab.origin}/ui/keys")
        assert tab.page.url == f"{tab.origin}/ui/login"
        assert "modelseal console login" in tab.page.inner_text("main")


def _pending_rotation(world: World, key: str) -> tuple[str, int]:
    """A key-admin's rotation of a new broker key ``key``, waiting for approval (the
    server's ``[governance] two_person``): the approval id and the key's version now."""
    world.enrol("officer1")
    world.enrol("kadmin")
    world.bind("kadmin", "key-admin")
    kadmin = f"{USER}/kadmin"
    with world.api("kadmin") as api:
        made = api.call("POST", "keys", {"name": key, "otp": world.otp.code(kadmin)})
        before = max(int(v["version"]) for v in made["versions"])
        with pytest.raises(ApprovalRequired) as waits:  # 202: nothing ran
            api.call("POST", f"keys/{key}/rotate", {"otp": world.otp.code(kadmin)})
    found = re.search(r"as request ([0-9a-f]{16})", str(waits.value))
    assert found, str(waits.value)
    approval = found.group(1)
    with world.api("kadmin") as api:
        assert max(int(v["version"]) for v in api.call("GET", f"keys/{key}")["versions"]) == before  # not yet
    return approval, before


def _use(world: World, key: str) -> None:
    """A trainer's wraps and unwraps of ``key`` through the server's broker service (each an
    audit event of the server's log), so the Keys page has use to chart."""
    from modelseal.format.header import normalize_context
    from modelseal.governance import brokerops as ops

    assert world.gov.svc is not None and world.gov.catalog is not None
    entry, ctx, who = world.gov.catalog.get(key), normalize_context({"env": "prod"}), TRAINER
    wrapped = [ops.wrap_one(world.gov.svc, entry, os.urandom(32), ctx, who) for _ in range(6)]
    ops.unwrap_items(world.gov.svc, entry, [(w.key_version, w.wrapped, ctx) for w in wrapped[:4]], who)


def _approve(tab: Tab, world: World, who: str, approval: str) -> str:
    tab.page.click('header nav a[href="/ui/approvals"]')
    row = tab.page.locator(f'[data-approval="{approval}"]')
    assert row.count() == 1, tab.page.inner_text("main")[:500]
    assert "key.rotate" in row.inner_text()  # what exactly will run
    row.locator('input[name="otp"]').first.fill(world.otp.code(f"{USER}/{who}"))
    with tab.page.expect_navigation():
        row.locator('button:has-text("Approve")').first.click()
    text: str = tab.page.inner_text("main")
    return text


def test_two_officers_approve_a_key_rotation_with_totp_and_it_runs(world: World) -> None:
    approval, before = _pending_rotation(world, "team-weights")
    world.enrol("officer2")
    with chromium(world) as browser:
        first = _tab(browser, world)
        _sign_in(first, world, "officer1")
        said = _approve(first, world, "officer1", approval)
        assert first.page.locator(".refusal").count() == 0, said[:400]
        with world.api("kadmin") as api:
            assert max(int(v["version"]) for v in api.call("GET", "keys/team-weights")["versions"]) == before
        second = _tab(browser, world)
        _sign_in(second, world, "officer2")
        said = _approve(second, world, "officer2", approval)
        assert second.page.locator(".refusal").count() == 0, said[:400]
        assert "key.rotate ran" in said and f"version {before + 1}" in said, said[:400]
        _shot(second, "approvals-done")
        assert first.csp_violations() == [] and second.csp_violations() == []
    with world.api("kadmin") as api:
        after = max(int(v["version"]) for v in api.call("GET", "keys/team-weights")["versions"])
    assert after == before + 1  # the rotation ran, once


def test_an_auditor_sees_approvals_but_cannot_approve(world: World) -> None:
    approval, before = _pending_rotation(world, "auditor-visible")
    world.bind("audra", "auditor")
    world.enrol("audra")
    with chromium(world) as browser:
        tab = _tab(browser, world)
        _sign_in(tab, world, "audra")
        tab.page.click('header nav a[href="/ui/approvals"]')
        row = tab.page.locator(f'[data-approval="{approval}"]')
        assert row.count() == 1 and row.locator('button:has-text("Approve")').count() == 0
        # the form the page does not show, posted anyway with this session's own CSRF token
        csrf = tab.page.get_attribute('header .logout input[name="csrf"]', "value")
        with tab.page.expect_navigation():
            tab.page.evaluate(
                """([action, csrf, otp]) => { const f = document.createElement('form'); f.method = 'post';
                f.action = action; for (const [k, v] of [['csrf', csrf], ['otp', otp], ['verdict', 'approve']]) {
                const i = document.createElement('input'); i.name = k; i.value = v; f.appendChild(i); }
                document.body.appendChild(f); f.submit(); }""",
                [f"/ui/approvals/{approval}", csrf, world.otp.code(USER + "/audra")],
            )
        assert "Not allowed" in tab.page.inner_text("h1")
    with world.api("kadmin") as api:
        assert max(int(v["version"]) for v in api.call("GET", "keys/auditor-visible")["versions"]) == before
