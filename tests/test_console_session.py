"""The web console's sign-in and sessions against the real server (``tests.console_world``):
``modelseal console login``'s one-time link (bound to the identity, 60 s, single use), the
session cookie's attributes, the security headers of every page, CSRF and Origin checks,
logout, expiry and idle timeout, revocation of the session's certificate, a browser's own
client certificate, and that without a client certificate nothing but ``/ui`` answers."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from modelseal.pki import issue
from modelseal.server.console import HEADERS
from modelseal.server.console_sessions import ConsoleSessions, digest
from tests.conftest import Env
from tests.console_world import Browser, World, console_world

USER = "spiffe://example.org/prod/user"


@pytest.fixture
def world(env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[World]:
    with console_world(env, monkeypatch, capsys) as w:
        yield w


def _token(url: str) -> str:
    return urlsplit(url).query.split("t=", 1)[1]


def test_a_link_signs_in_once_and_sets_a_strict_cookie(world: World) -> None:
    url = world.login_url("officer1")
    parts = urlsplit(url)
    assert parts.scheme == "https" and parts.netloc == f"127.0.0.1:{world.port}" and parts.path == "/ui/login"
    b = world.browser()
    shown = b.get(f"{parts.path}?{parts.query}")
    assert shown.status == 200 and "spiffe://example.org/prod/user/officer1" in shown.body
    assert b.cookie is None  # showing the link consumes nothing
    done = b.request("POST", "/ui/login", {"t": _token(url)})
    assert done.status == 303 and done.header("Location") == "/ui/"
    cookie = done.header("Set-Cookie")
    for attr in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
        assert attr in cookie, cookie
    assert cookie.startswith("__Host-modelseal-console=") and "Domain" not in cookie
    page = b.get("/ui/")
    assert page.status == 200 and "officer1" in page.body
    again = world.browser().request("POST", "/ui/login", {"t": _token(url)})
    assert again.status == 403 and "unknown, used or expired" in again.body
    # only digests are stored: neither the link's token nor the cookie's secret
    rows = world.gov.store.run(lambda q: q("SELECT id FROM console_sessions").fetchall(), write=False)
    assert b.cookie is not None and [r[0] for r in rows] == [digest(b.cookie)]
    logins = world.audit_events("console-login")
    assert [(e.get("actor"), e.get("result")) for e in logins] == [(f"{USER}/officer1", "ok:link")]
    assert _token(url) not in (world.env.home / "audit.db").read_bytes().decode("latin-1")  # no secret in the log


def test_a_link_expires_after_60_seconds(world: World) -> None:
    url = world.login_url("officer2")
    world.clock.offset += 61
    b = world.browser()
    assert b.get(urlsplit(url).path + "?" + urlsplit(url).query).status == 403
    assert b.request("POST", "/ui/login", {"t": _token(url)}).status == 403 and b.cookie is None


def test_a_service_identity_gets_no_link(world: World) -> None:
    rc, _, err = world.run("trainer", "console", "login", kind="service")
    assert rc != 0 and "console.login" in err and err.count("\n") == 1


def test_every_console_answer_carries_the_security_headers(world: World) -> None:
    b = world.sign_in("officer1")
    for path in ("/ui/", "/ui/login", "/ui/static/console.css", "/ui/no-such-page"):
        r = b.get(path)
        for name, value in HEADERS.items():
            assert r.header(name) == value, (path, name)
    csp = HEADERS["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert b.get("/ui/static/../console.py").status == 404


def test_a_forged_or_missing_csrf_token_and_a_foreign_origin_are_refused(world: World) -> None:
    b = world.sign_in("officer1")
    assert b.post("/ui/logout", {}, csrf="forged").status == 403
    assert b.post("/ui/logout", {}, csrf="").status == 403
    assert b.get("/ui/").status == 200  # still signed in
    foreign = b.post("/ui/logout", {}, headers={"Origin": "https://evil.example"})
    assert foreign.status == 403 and "another origin" in foreign.body
    assert b.get("/ui/").status == 200


def test_logout_ends_the_session_on_the_server(world: World) -> None:
    b = world.sign_in("officer1")
    kept = b.cookie
    out = b.post("/ui/logout", {})
    assert out.status == 303 and out.header("Location") == "/ui/login" and b.cookie is None
    replay = Browser(world.port, world.pki.server_dir / "ca.pem", cookie=kept)
    r = replay.get("/ui/")
    assert r.status == 303 and r.header("Location") == "/ui/login"


def test_sessions_end_at_8_hours_and_after_30_idle_minutes(world: World) -> None:
    b = world.sign_in("officer1")
    for _ in range(16):  # busy all along: 16 x 29 min = 7 h 44 min
        world.clock.offset += 29 * 60
        assert b.get("/ui/").status == 200
    world.clock.offset += 20 * 60  # past 8 h since sign-in
    expired = b.get("/ui/")
    assert expired.status == 303 and expired.header("Location") == "/ui/login"
    idle = world.sign_in("officer2")
    world.clock.offset += 31 * 60
    assert idle.get("/ui/").status == 303
    assert idle.post("/ui/logout", {}).status == 401


def test_revoking_the_certificate_ends_its_sessions(world: World) -> None:
    b = world.sign_in("officer3")
    assert b.get("/ui/").status == 200
    serial = _serial(world.folder("officer3"))
    issue.revoke(world.env.svc, serial, "key compromise", ca=world.pki.ca)
    r = b.get("/ui/")
    assert r.status == 303 and r.header("Location") == "/ui/login"
    rows = ConsoleSessions.open(world.gov.target).live()
    assert all(s.identity != f"{USER}/officer3" for s in rows)
    ended = world.audit_events("console-session-expired")
    assert [(e.get("actor"), e.get("result")) for e in ended] == [(f"{USER}/officer3", "revoked")]


def _serial(folder: object) -> int:
    from pathlib import Path

    from cryptography import x509

    leaf = x509.load_pem_x509_certificate((Path(str(folder)) / "cert.pem").read_bytes())
    return leaf.serial_number


def test_without_a_client_certificate_only_the_console_answers(world: World) -> None:
    b = world.browser()
    r = b.get("/v2/")
    assert r.status == 401 and "client certificate is required" in r.body
    assert b.request("POST", "/modelseal/v1/console/login", {}, origin=False).status == 401
    assert b.request("POST", "/modelseal/v1/console/login", {}).status == 403  # a web page's: refused first
    assert b.get("/ui/login").status == 200


def test_a_browser_certificate_signs_in_directly(world: World) -> None:
    b = world.browser(cert_dir=world.folder("officer4"))
    page = b.get("/ui/login")
    assert page.status == 200 and "officer4" in page.body and "Sign in with this certificate" in page.body
    done = b.request("POST", "/ui/login/certificate", {})
    assert done.status == 303 and b.cookie
    assert b.get("/ui/").status == 200
    stolen = Browser(world.port, world.pki.server_dir / "ca.pem", cookie=b.cookie)  # the cookie without the cert
    assert stolen.get("/ui/").status == 303
    assert b.get("/ui/").status == 303  # and the session ended with it


def test_a_link_is_refused_by_a_browser_presenting_another_identity(world: World) -> None:
    url = world.login_url("officer1")
    b = world.browser(cert_dir=world.folder("officer2"))
    r = b.request("POST", "/ui/login", {"t": _token(url)})
    assert r.status == 403 and "officer1" in r.body and b.cookie is None


def test_tls_below_1_3_is_refused_on_the_console_too(world: World) -> None:
    ctx = ssl.create_default_context(cafile=str(world.pki.server_dir / "ca.pem"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    import http.client

    conn = http.client.HTTPSConnection("127.0.0.1", world.port, context=ctx, timeout=10)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        conn.request("GET", "/ui/login")
        conn.getresponse()
    conn.close()


def test_modelseal_serve_console_in_worker_processes(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``modelseal serve --console`` as a process with two workers: the link one worker made
    signs in on whichever worker takes the browser (the sessions are in the governance
    database); without ``--console`` a connection without a client certificate fails at the
    handshake, with it only ``/ui`` answers."""
    import http.client

    from modelseal import cli as cli_mod
    from tests.console_world import parser
    from tests.push_pull_helpers import make_pki, modelseal_serve

    p = make_pki(env)
    data = env.work / "serve-data"
    monkeypatch.setattr(cli_mod, "build_parser", parser)
    w = World(env, p, 0, None, data, monkeypatch, capsys)  # type: ignore[arg-type]
    rc, _, err = w.run("officer1", "access", "bootstrap", "--data", str(data), f"--officer={USER}/officer1")
    assert rc == 0, err
    ca = p.server_dir / "ca.pem"
    with modelseal_serve(env.work, p.server_dir, p.client_dir, "--data", str(data), "--workers", "2") as port:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(cafile=str(ca)))
        with pytest.raises((ssl.SSLError, ConnectionError)):  # CERT_REQUIRED: no certificate, no handshake
            conn.request("GET", "/ui/login")
            conn.getresponse().read()
        conn.close()
    args = ("--data", str(data), "--workers", "2", "--console")
    with modelseal_serve(env.work, p.server_dir, p.client_dir, *args) as port:
        w.port = port
        monkeypatch.setenv("MODELSEAL_BROKER", f"127.0.0.1:{port}")
        monkeypatch.setenv("MODELSEAL_REGISTRY_PINS", ",".join(p.pins()))
        for _ in range(3):  # three sign-ins: each link made and redeemed on any of the two workers
            url = w.login_url("officer1")
            b = Browser(port, ca)
            done = b.request("POST", "/ui/login", {"t": _token(url)})
            assert done.status == 303 and b.cookie, done.body[:200]
            for _ in range(4):
                page = b.get("/ui/")
                assert page.status == 200 and "officer1" in page.body
        assert Browser(port, ca).get("/v2/").status == 401
        assert Browser(port, ca).get("/ui/login").status == 200


def test_what_a_page_hides_is_audited_as_a_view_not_as_an_attempt(world: World) -> None:
    """A reader on the Overview: each widget it may not see is a denied decision, recorded as
    ``console-view`` (the detectors count ``authorize`` denials: browsing is no attack)."""
    world.enrol("officer1")
    world.bind("rita", "reader")
    b = world.sign_in("rita")
    for _ in range(3):
        assert b.get("/ui/").status == 200
    mine = [e for e in world.audit_events() if e.get("actor") == f"{USER}/rita"]
    views = [e for e in mine if e.get("operation") == "console-view"]
    assert views and any(str(e.get("result", "")).startswith("deny") for e in views)
    assert not [e for e in mine if e.get("operation") == "authorize" and str(e.get("result", "")).startswith("deny")]


def test_the_api_refuses_what_a_web_page_asks_with_a_browser_certificate(world: World) -> None:
    """A browser holding a client certificate presents it to any site's requests: the API
    refuses every request a page made (``Origin``, ``Sec-Fetch-Site``), the CLI's go on."""
    b = world.browser(cert_dir=world.folder("officer1"))
    forged = b.request(
        "POST", "/modelseal/v1/mfa/confirm", {"otp": "000000"}, headers={"Origin": "https://evil.example"}
    )
    assert forged.status == 403 and "made by a web page" in forged.body
    assert b.request("GET", "/v2/", headers={"Sec-Fetch-Site": "cross-site"}).status == 403
    assert b.request("GET", "/v2/", headers={"Sec-Fetch-Site": "same-origin"}).status == 403
    assert b.request("GET", "/v2/", headers={"Sec-Fetch-Site": "none"}).status != 403  # typed in the address bar
    assert world.login_url("officer1").startswith("https://")  # the CLI sends neither header


def test_a_bad_governance_table_is_refused_before_listening(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """``[governance] two_person`` naming an action that cannot wait: ``modelseal serve``
    refuses at start (``check_governance``), one line, before any worker."""
    from modelseal import cli as cli_mod

    cfg = env.home / "config.toml"
    cfg.write_text('[governance]\ntwo_person = ["pull"]\n')
    cfg.chmod(0o600)
    from tests.push_pull_helpers import make_pki

    p = make_pki(env)
    capsys.readouterr()
    rc = cli_mod.main(
        ["serve", "--listen", "127.0.0.1:1", "--tls-dir", str(p.server_dir), "--data", str(env.work / "d")]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "cannot wait for approval" in err and err.count("\n") == 1, err


def test_a_link_whose_certificate_was_revoked_since_signs_no_one_in(world: World) -> None:
    url = world.login_url("officer2")
    issue.revoke(world.env.svc, _serial(world.folder("officer2")), "left", ca=world.pki.ca)
    b = world.browser()
    r = b.request("POST", "/ui/login", {"t": _token(url)})
    assert r.status == 403 and "cannot sign in here any more" in r.body and b.cookie is None
    assert all(s.identity != f"{USER}/officer2" for s in ConsoleSessions.open(world.gov.target).live())
