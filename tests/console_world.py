"""The web console's test world: the application ``modelseal serve --console`` builds (the
real decider, Cedar's shipped policy, the governance APIs, the key broker, a registry, the
real Merkle audit log at ``$MODELSEAL_HOME/audit.db`` and the console), on 127.0.0.1 with its real TLS 1.3 context (client certificate optional), in a
thread of this process; identities with real certificates of a real CA; ``modelseal``
commands run as them (``World.run``); TOTP codes from secrets enrolled through the API; and
``Browser``, a small HTTP client that holds a console session's cookie the way a browser
does (the Chromium tests drive the real browser instead).

``console_world(env, monkeypatch, capsys)`` is a context manager: officer1..officer4 are
bootstrapped security officers; ``World.sign_in(name)`` runs ``modelseal console login`` as
``name`` and redeems its link. The console's clock and the MFA check read ``World.clock``
(virtual: ``clock.offset += N`` moves both on at once).
"""

from __future__ import annotations

import http.client
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from aiohttp import web

from modelseal.audit.log import MerkleAuditLog
from modelseal.cli import access, console
from modelseal.governance import mfa as mfa_mod
from modelseal.governance.store import open_target
from modelseal.registry.service import open_registry
from modelseal.server import app as app_mod
from modelseal.server import tls
from modelseal.server.console_login import COOKIE
from modelseal.server.console_sessions import ConsoleSettings
from modelseal.server.identity import Authorizer
from tests.conftest import Env
from tests.push_pull_helpers import TD, Pki, app_in_thread, make_pki
from tests.services import free_port
from tests.test_access_cli import USER, Clock, Otp
from tests.test_access_cli import World as CliWorld

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: str

    def header(self, name: str) -> str:
        return self.headers.get(name, "")


@dataclass
class Browser:
    """HTTPS requests to the console as a browser without a client certificate makes them:
    the server verified against the test CA by name, one cookie jar (the session cookie),
    redirects not followed (a test looks at them)."""

    port: int
    ca: Path
    cookie: str | None = None
    csrf: str = ""
    cert_dir: Path | None = None  # a browser that presents this client certificate

    def _ctx(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        if self.cert_dir is not None:
            ctx.load_cert_chain(self.cert_dir / "cert.pem", self.cert_dir / "key.pem")
        return ctx

    def request(
        self,
        method: str,
        path: str,
        fields: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        origin: bool = True,
    ) -> Reply:
        """One request; a form (``fields``) is posted with this server's ``Origin`` as a
        browser posts it (``origin=False``: none, as a program would)."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self._ctx(), timeout=60)
        try:
            h = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
            if self.cookie is not None:
                h["Cookie"] = f"{COOKIE}={self.cookie}"
            body = None
            if fields is not None:
                body = urlencode(fields).encode()
                h["Content-Type"] = "application/x-www-form-urlencoded"
                if origin:
                    h.setdefault("Origin", f"https://127.0.0.1:{self.port}")
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            text = r.read().decode("utf-8", "replace")
            for name, value in r.getheaders():
                if name.lower() == "set-cookie" and value.startswith(COOKIE + "="):
                    secret = value.split(";", 1)[0].split("=", 1)[1].strip('"')
                    self.cookie = secret or None
            found = CSRF.search(text)
            if found:
                self.csrf = found.group(1)
            return Reply(r.status, r.headers, text)
        finally:
            conn.close()

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, fields: dict[str, str], *, csrf: str | None = None, **kw: Any) -> Reply:
        """POST a form with this session's CSRF token (or ``csrf``: a forged one)."""
        return self.request("POST", path, {"csrf": self.csrf if csrf is None else csrf, **fields}, **kw)


@dataclass
class World(CliWorld):
    """``tests.test_access_cli.World`` (CLI runs as identities, OTP codes) plus the console."""

    clock: Clock = field(default_factory=Clock)
    browsers: list[Browser] = field(default_factory=list)

    def browser(self, cert_dir: Path | None = None) -> Browser:
        b = Browser(self.port, self.pki.server_dir / "ca.pem", cert_dir=cert_dir)
        self.browsers.append(b)
        return b

    def login_url(self, who: str, kind: str = "user") -> str:
        """``modelseal console login --json`` as ``who``: the one-time link."""
        import json

        rc, out, err = self.run(who, "console", "login", "--json", kind=kind)
        assert rc == 0, err
        url: str = json.loads(out)["url"]
        return url

    def sign_in(self, who: str) -> Browser:
        """A browser signed in as ``who`` through the link of ``modelseal console login``."""
        b = self.browser()
        parts = urlsplit(self.login_url(who))
        token = parts.query.split("t=", 1)[1]
        page = b.get(f"{parts.path}?{parts.query}")
        assert page.status == 200 and "Sign in" in page.body, page.body[:500]
        done = b.request("POST", "/ui/login", {"t": token})
        assert done.status == 303 and done.header("Location") == "/ui/", done.body[:300]
        assert b.cookie, "no session cookie"
        assert b.get("/ui/").status == 200  # and the CSRF token of the first page
        return b

    def audit_events(self, operation: str | None = None) -> list[dict[str, Any]]:
        """The server's audit log's verified events (``operation``'s only), once the queued
        decisions are written."""
        assert self.gov.audit.flush()
        events = MerkleAuditLog(self.env.home / "audit.db").events()
        return [e for e in events if operation is None or e.get("operation") == operation]

    def bind(self, who: str, role: str, env: str = "prod", by: str = "officer1") -> None:
        """Bind ``USER/who`` to ``role`` (``by`` needs MFA enrolled)."""
        rc, _, err = self.with_otp(
            by, "access", "bind", f"{USER}/{who}", "--role", role, "--env", env, "--expires", "30d"
        )
        assert rc == 0, err


def parser() -> Any:
    import argparse

    p = argparse.ArgumentParser(prog="modelseal")
    sub = p.add_subparsers(dest="cmd", required=True)
    access.add_access(sub)
    access.add_approvals(sub)
    access.add_mfa(sub)
    console.add_console(sub)
    from modelseal.cli import keys

    keys.add_key(sub)
    return p


@contextmanager
def console_server(env: Env, p: Pki, data: Path, clock: Clock) -> Iterator[tuple[int, app_mod.Governance]]:
    """The console-enabled application on 127.0.0.1 in a thread (its own event loop)."""
    port = free_port()

    async def start() -> tuple[web.AppRunner, app_mod.Governance]:
        auth = Authorizer.for_server(TD, "prod")
        audit = MerkleAuditLog(env.home / "audit.db")  # the server's real, signed audit log (the CLI's default)
        gov = app_mod.open_governance(open_target(data, None), auth, audit, env.svc)
        gov.authz.cache_seconds = 0.0  # a binding a test just made counts at once (the server caches 2 s)
        registry = open_registry(data, None, None, "sealed-only")
        settings = ConsoleSettings(clock=clock.time)
        application = app_mod.make_app(auth, registry, governance=gov, console=settings)
        runner = web.AppRunner(application, access_log=None)
        await runner.setup()
        ctx = tls.server_context(p.server_dir, client_cert_optional=True)
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
        return runner, gov

    with app_in_thread(start) as gov:
        try:
            yield port, gov
        finally:
            gov.close()


@contextmanager
def console_world(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], config: str = ""
) -> Iterator[World]:
    """The world (module docstring); ``config``: text of ``$MODELSEAL_HOME/config.toml``
    (e.g. ``[governance] two_person = ["key.rotate"]``), written before the server starts."""
    from modelseal import cli as cli_mod

    if config:
        cfg = env.home / "config.toml"
        cfg.write_text(config)
        cfg.chmod(0o600)
    p = make_pki(env)
    data = env.work / "data"
    clock = Clock(virtual=True)  # the server runs in this process: the MFA check and the console read it
    monkeypatch.setattr(mfa_mod, "time", clock)
    with console_server(env, p, data, clock) as (port, gov):
        monkeypatch.setattr(cli_mod, "build_parser", parser)
        monkeypatch.setenv("MODELSEAL_BROKER", f"127.0.0.1:{port}")
        monkeypatch.setenv("MODELSEAL_REGISTRY_PINS", ",".join(p.pins()))
        w = World(env, p, port, gov, data, monkeypatch, capsys, Otp(clock), clock=clock)
        w.dirs["trainer"] = p.client_dir
        officers = [f"--officer={USER}/officer{i}" for i in (1, 2, 3, 4)]
        rc, out, err = w.run("officer1", "access", "bootstrap", "--data", str(data), *officers)
        assert rc == 0 and out.count("as security-officer") == 4, err
        yield w


__all__ = ["Browser", "Reply", "World", "console_server", "console_world"]
