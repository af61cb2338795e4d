"""The red team's findings on the console's sign-in, each as the attack that no longer
works (docs/decisions.md, "Web console: the red team's findings"): malformed bodies from
anyone answer 400, never 500; a post without ``Origin`` cannot sign in (login CSRF); ended
sessions are swept and live ones capped per identity; unused links are capped per
identity; a hostile path cannot forge a log line."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator

import pytest

from modelseal.server.console_sessions import MAX_LINKS, MAX_SESSIONS, ConsoleSessions
from tests.conftest import Env
from tests.console_world import World, console_world

USER = "spiffe://example.org/prod/user"


@pytest.fixture
def world(env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[World]:
    with console_world(env, monkeypatch, capsys) as w:
        yield w


def _raw(world: World, method: str, path: str, headers: str, body: bytes) -> bytes:
    ctx = ssl.create_default_context(cafile=str(world.pki.server_dir / "ca.pem"))
    with (
        socket.create_connection(("127.0.0.1", world.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        origin = f"https://127.0.0.1:{world.port}"
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{world.port}\r\nOrigin: {origin}\r\n"
        s.sendall(head.encode() + headers.encode("latin-1") + f"Content-Length: {len(body)}\r\n".encode())
        s.sendall(b"Connection: close\r\n\r\n" + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_malformed_bodies_answer_400_and_log_nothing(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modelseal.server")
    form = "Content-Type: application/x-www-form-urlencoded"
    cases = [
        ("Content-Type: multipart/form-data\r\n", b"garbage"),
        (
            "Content-Type: multipart/form-data; boundary=x\r\n",
            b"--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--\r\n",
        ),
        (f"{form}; charset=bogus\r\n", b"t=%ff%fe"),
        (f"{form}\r\n", b"t=%ff%fe%00"),
        (f"{form}\r\n", b"t=\xed\xa0\x80"),
        ("Content-Type: text/plain\r\n", b"t=abc"),
    ]
    for path in ("/ui/login", "/ui/login/certificate"):
        for headers, body in cases:
            status = _raw(world, "POST", path, headers, body).split(b"\r\n", 1)[0]
            assert b" 500 " not in status, (path, headers, status)
            assert status.split(b" ")[1] in (b"400", b"401", b"403"), (path, headers, status)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_post_without_origin_cannot_sign_in(world: World) -> None:
    url = world.login_url("officer1")
    token = url.split("t=", 1)[1]
    b = world.browser()
    refused = b.request("POST", "/ui/login", {"t": token}, origin=False)
    assert refused.status == 403 and "another origin" in refused.body and b.cookie is None
    assert b.request("POST", "/ui/login", {"t": token}).status == 303  # the link was not consumed


def test_ended_sessions_are_swept_and_live_ones_capped(world: World) -> None:
    sessions = ConsoleSessions.open(world.gov.target)
    ident, serial = f"{USER}/officer1", "0a"
    for _ in range(MAX_SESSIONS + 9):
        sessions.open_session(ident, serial, world.clock.time() + 86400, now=world.clock.time())
    live = [s for s in sessions.live(world.clock.time()) if s.identity == ident]
    assert len(live) == MAX_SESSIONS  # the oldest ended
    world.clock.offset += 9 * 3600
    sessions.open_session(f"{USER}/officer2", "0b", world.clock.time() + 86400, now=world.clock.time())
    rows = sessions.run(lambda q: q("SELECT identity FROM console_sessions").fetchall(), write=False)
    assert [r[0] for r in rows] == [f"{USER}/officer2"]  # every ended row swept


def test_unused_links_are_capped_per_identity(world: World) -> None:
    for _ in range(MAX_LINKS):
        world.login_url("officer1")
    rc, _, err = world.run("officer1", "console", "login")
    assert rc != 0 and "rate-limited, retry after 60 s" in err and err.count("\n") == 1
    assert world.login_url("officer2")  # another identity is not affected
    world.clock.offset += 61
    assert world.login_url("officer1")  # and they expire


def test_a_hostile_path_cannot_forge_a_log_line(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modelseal.server")
    b = world.sign_in("officer1")
    b.get("/ui/no-such%0aFAKE%20LINE")
    b.get("/ui/audit/proof?entry=%0aFAKE")
    assert not any("\n" in r.getMessage() for r in caplog.records)
