"""Handshake observers with real clients (``server.handshakes``, ``server.hygiene.Listener``):
each way a handshake fails reaches the observers with its reason, a completed one with its
version and cipher, and the metrics observer counts them; an observer that raises costs
nothing but a log line. The listener runs in a thread with a short handshake timeout."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from modelseal.pki import ca as pki_ca
from modelseal.pki import issue
from modelseal.pki.identity import Identity
from modelseal.server import hygiene, metrics_api, tls
from modelseal.server.handshakes import Handshake
from modelseal.telemetry import metrics
from tests.conftest import Env

TD = "example.org"


@dataclass
class Harness:
    port: int
    seen: list[Handshake]
    server_dir: Path
    env: Env


def _dir(env: Env, name: str, kind: str = "service", **kw: object) -> Path:
    folder = env.work / name
    issue.write_dir(issue.issue(env.svc, Identity.of(TD, "prod", kind, name), **kw), folder, force=True)  # type: ignore[arg-type]
    return folder


async def hello(_request: web.Request) -> web.Response:
    return web.Response(text="hi")


@pytest.fixture
def harness(env: Env) -> Iterator[Harness]:
    pki_ca.init_ca(env.svc, TD)
    server_dir = _dir(env, "registry", "server", ips=["127.0.0.1"])
    seen: list[Handshake] = []

    def broken(_h: Handshake) -> None:
        raise RuntimeError("an observer's bug")

    sock = socket.create_server(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        assert runner.server is not None
        observers = [broken, seen.append, metrics_api.count_handshake]
        lim = hygiene.Limits(handshake_timeout=0.5)
        listener = hygiene.Listener(sock, tls.LiveContext(server_dir), runner.server, lim, observers)
        listener.start()
        ready.set()
        await stop.wait()
        await listener.stop()
        await runner.cleanup()

    t = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        yield Harness(port, seen, server_dir, env)
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        t.join(10)


def _ctx(h: Harness, folder: Path | None, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = version
    ctx.load_verify_locations(cafile=h.server_dir / "ca.pem")
    if folder is not None:
        ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return ctx


def _connect(h: Harness, ctx: ssl.SSLContext | None) -> None:
    with socket.create_connection(("127.0.0.1", h.port), timeout=10) as raw:
        if ctx is None:
            time.sleep(1.0)  # connects and never says a word: the handshake times out
            return
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                s.recv(64)
        except (OSError, ssl.SSLError):
            pass


def _next(h: Harness, count: int) -> Handshake:
    deadline = time.monotonic() + 10
    while len(h.seen) < count:
        assert time.monotonic() < deadline, h.seen
        time.sleep(0.02)
    return h.seen[count - 1]


def test_every_refusal_reaches_the_observers_with_its_reason(harness: Harness) -> None:
    h, env = harness, harness.env
    other = pki_ca.init_ca(env.svc, TD, folder=env.work / "other-ca")
    foreign = env.work / "foreign"
    issue.write_dir(issue.issue(env.svc, Identity.of(TD, "prod", "service", "x"), ca=other), foreign, force=True)
    past = pki_ca.utcnow() - dt.timedelta(hours=3)
    cases = [
        ("no-certificate", _ctx(h, None)),
        ("unknown-ca", _ctx(h, foreign)),
        ("expired", _ctx(h, _dir(env, "old", now=past, ttl=dt.timedelta(hours=1)))),
        ("protocol-version", _ctx(h, _dir(env, "legacy"), ssl.TLSVersion.TLSv1_2)),
        ("timeout", None),
    ]
    counted = {
        r: metrics.REGISTRY.get_sample_value("modelseal_tls_handshake_failures_total", {"reason": r}) or 0.0
        for r, _ in cases
    }
    for n, (reason, ctx) in enumerate(cases, start=1):
        _connect(h, ctx)
        got = _next(h, n)
        assert (got.ok, got.reason, got.version, got.actor) == (False, reason, "", None), got
        assert got.source == "127.0.0.1"
    for reason, _ in cases:
        now = metrics.REGISTRY.get_sample_value("modelseal_tls_handshake_failures_total", {"reason": reason})
        assert now == counted[reason] + 1, reason
    ok_before = (
        metrics.REGISTRY.get_sample_value(
            "modelseal_tls_handshakes_total", {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}
        )
        or 0.0
    )
    _connect(h, _ctx(h, _dir(env, "good")))
    good = _next(h, len(cases) + 1)
    assert (good.ok, good.version, good.cipher, good.reason) == (True, "TLSv1.3", "TLS_AES_256_GCM_SHA384", None)
    assert (
        metrics.REGISTRY.get_sample_value(
            "modelseal_tls_handshakes_total", {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}
        )
        == ok_before + 1
    )
