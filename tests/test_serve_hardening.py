"""Hardening of ``modelseal serve``'s connections (docs/serve.md), each against a real server
subprocess over real sockets (``test_serve_hygiene.serving``: the listener of
``server.runner`` with a small application behind the identity middleware):

- a client certificate that expires while its connection is kept alive: the next request
  on it gets 401 and the connection is closed; an idle one is closed at the expiry;
- idle TCP sockets that never start a handshake (no certificate needed) cannot take the
  connection slots of authenticated clients: handshakes are bounded per source address and
  per worker, the rest are reset at once with one rate-limited log line;
- malformed HTTP gets a one-line 400 and a closed connection, never a logged traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import threading
import time
from pathlib import Path

from modelseal.pki import issue
from modelseal.pki.ca import utcnow
from modelseal.pki.identity import Identity
from modelseal.server import tls
from modelseal.server.hygiene import Limits, source_of
from tests.conftest import Env
from tests.test_serve_hygiene import closed_within, serving, tls_socket
from tests.test_serve_tls import TD, client, request

DROPPED = "new connections closed at once (handshakes at their bound)"


def read_response(s: socket.socket, timeout: float = 20) -> bytes:
    """One HTTP response with a Content-Length (headers and body) from ``s``."""
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"
    )
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk
        body += chunk
    return head + b"\r\n\r\n" + body[:length]


def log_text(env: Env) -> str:
    return (env.work / "serve.log").read_text(errors="replace")


def test_an_expired_certificate_is_refused_on_its_kept_alive_connection(env: Env) -> None:
    with serving(env, workers=1, keepalive_timeout=120.0, header_timeout=60.0) as server:
        ttl = dt.timedelta(minutes=5)
        out = env.work / "short-lived"
        issued = issue.issue(
            env.svc, Identity.of(TD, "prod", "service", "brief"), ttl=ttl, now=utcnow() - ttl + dt.timedelta(seconds=8)
        )
        issue.write_dir(issued, out, force=True)
        expiry = issued.cert.not_valid_after_utc.timestamp()
        ctx = tls.client_context(out)
        busy = tls_socket(ctx, server.port, timeout=30)  # a request in flight across the expiry, one queued
        idle = tls_socket(ctx, server.port, timeout=30)  # one request, then idle across the expiry
        assert time.time() < expiry - 3, "the certificate must still be valid at the handshakes"
        wait = expiry - time.time() + 2
        busy.sendall(f"GET /slow?s={wait:.1f} HTTP/1.1\r\nHost: x\r\n\r\nGET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        idle.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(idle).startswith(b"HTTP/1.1 200")
        closed = closed_within(idle, wait + 20)
        assert closed is not None, "the idle connection stayed open after its certificate expired"
        assert time.time() - expiry < 5  # at the expiry, not at the keep-alive timeout (120 s)
        first = read_response(busy, timeout=wait + 20)
        assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"done")  # the request in flight finishes
        second = read_response(busy)
        head, _, body = second.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401"), second
        assert b"connection: close" in head.lower()
        doc = json.loads(body)
        assert doc["errors"][0]["code"] == "DENIED"
        assert "expired" in doc["errors"][0]["message"] and "\n" not in doc["errors"][0]["message"]
        assert closed_within(busy, 5) is not None  # and the connection is closed
        busy.close()
        idle.close()
        assert isinstance(request(ctx, server.port), str)  # a new connection fails the handshake
        assert "connections closed when their client certificate expired: 1" in log_text(env)


class Flood:
    """Idle TCP sockets from ``sources`` (127.0.0.x) to the server that never send a byte;
    sockets the server closes are re-opened, so each address keeps ``per_source`` open."""

    def __init__(self, port: int, sources: list[str], per_source: int) -> None:
        self.port, self.sources, self.per_source = port, sources, per_source
        self.held: dict[str, list[socket.socket]] = {s: [] for s in sources}
        self.resets = 0
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, source: str) -> socket.socket | None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((source, 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", self.port))
        except OSError:  # reset while still queued
            s.close()
            self.resets += 1
            return None
        s.setblocking(False)
        self.opened += 1
        return s

    def top_up(self) -> None:
        for source, socks in self.held.items():
            alive = []
            for s in socks:
                try:
                    gone = s.recv(1) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    self.resets += 1
                    s.close()
                else:
                    alive.append(s)
            for _ in range(self.per_source - len(alive)):
                if self._stop.is_set():
                    break
                fresh = self._open(source)
                if fresh is not None:
                    alive.append(fresh)
            socks[:] = alive

    def _run(self) -> None:
        while not self._stop.is_set():
            self.top_up()
            self._stop.wait(0.05)

    def __enter__(self) -> Flood:
        self.top_up()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for socks in self.held.values():
            for s in socks:
                s.close()


def timed_request(ctx: ssl.SSLContext, port: int, timeout: float) -> tuple[int | str, float]:
    start = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=("127.0.0.1", 0))
    try:
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status: int | str = int(read_response(s, timeout).split(b" ", 2)[1])
        s.close()
    except (OSError, ssl.SSLError) as e:
        status = type(e).__name__
    finally:
        raw.close()
    return status, time.monotonic() - start


def test_idle_sockets_cannot_take_the_slots_of_authenticated_clients(env: Env) -> None:
    limits = Limits()
    assert limits.max_handshakes < limits.max_connections and limits.max_handshakes_per_source < limits.max_handshakes
    with serving(env, workers=1) as server:
        ctx = client(env, "good")
        kept = tls_socket(ctx, server.port, timeout=10)  # established before the attack
        kept.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(kept).startswith(b"HTTP/1.1 200")

        # One address holds more idle sockets than the whole per-worker connection cap.
        with Flood(server.port, ["127.0.0.2"], limits.max_connections + 88) as flood:
            time.sleep(1.0)
            results = [timed_request(ctx, server.port, 5.0) for _ in range(12)]
            for _ in range(3):
                time.sleep(1.0)
                kept.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(kept, 5).startswith(b"HTTP/1.1 200")
        assert all(status == 200 for status, _ in results), results
        assert max(took for _, took in results) < 5.0, results
        # All but the per-address bound were reset at once (and re-opened by the flood).
        assert flood.resets >= limits.max_connections, (flood.resets, flood.opened)

        # Many addresses: the per-worker handshake bound holds; established connections are kept.
        sources = [f"127.0.0.{i}" for i in range(3, 11)]
        with Flood(server.port, sources, limits.max_handshakes_per_source + 8) as flood:
            time.sleep(1.0)
            for _ in range(3):
                kept.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(kept, 5).startswith(b"HTTP/1.1 200")
                time.sleep(1.0)
        assert flood.resets >= len(sources) * limits.max_handshakes_per_source - limits.max_handshakes
        kept.close()
        time.sleep(limits.handshake_timeout + 1)  # the held handshakes time out; the worker is free again
        assert timed_request(ctx, server.port, 10.0)[0] == 200
        log = log_text(env)
        lines = [line for line in log.splitlines() if DROPPED in line]
        assert 1 <= len(lines) <= 6, lines  # throttled: one line per 10 s, never one per connection
        assert any("at 32 handshakes from one address" in line for line in lines), lines
        assert "Traceback" not in log


def test_source_addresses_are_counted_per_host() -> None:
    assert source_of(("127.0.0.2", 4000)) == "127.0.0.2"
    assert source_of(("::ffff:10.1.2.3", 4000, 0, 0)) == "10.1.2.3"
    assert source_of(("2001:db8::1", 4000, 0, 0)) == source_of(("2001:db8::ffff:1", 5000, 0, 0)) == "2001:db8::/64"
    assert source_of(("2001:db8:0:1::1", 4000, 0, 0)) == "2001:db8:0:1::/64"
    assert source_of(None) == "?"


GARBAGE = [
    b"\xff\xfe\x00 not http at all\r\n\r\n",
    b"GET /v2/\xe9 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PUT /v2/a/manifests/t HTTP/1.1\r\nHost: x\r\nContent-Type: \x7f\r\nContent-Length: 0\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nno colon in this header\r\n\r\n",
    b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
]


def test_malformed_http_gets_a_one_line_400_and_no_traceback(env: Env, tmp_path: Path) -> None:
    with serving(env, workers=1) as server:
        prod = client(env, "fuzzer")
        dev = client(env, "fuzzer", "dev")  # refused by identity, but the parser answers first
        for ctx in (prod, dev):
            for raw in GARBAGE:
                s = tls_socket(ctx, server.port)
                s.sendall(raw)
                answer = read_response(s)
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), (raw[:40], answer)
                assert b"application/json" in head.lower() and b"connection: close" in head.lower()
                assert body.count(b"\n") == 0, body
                doc = json.loads(body)
                assert doc["errors"][0]["code"] == "UNSUPPORTED"
                message = doc["errors"][0]["message"]
                assert message.startswith("bad request: ") and len(message) < 80
                assert "\\x" not in message and "Content-Type" not in message  # the request is not echoed
                assert closed_within(s, 5) is not None
                s.close()
        assert request(prod, server.port) == 200  # the server serves on
        log = log_text(env)
        assert "Traceback" not in log and "Error handling request" not in log
        lines = [line for line in log.splitlines() if "malformed HTTP" in line]
        assert len(lines) == 1, lines  # 12 malformed requests within 10 s: one throttled line
