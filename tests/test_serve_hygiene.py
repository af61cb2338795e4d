"""Workers and connection hygiene of ``modelseal serve`` (docs/serve.md), over real TLS.

The server runs as a subprocess through ``runner.serve`` with this module's small
application (``build``: ``GET /v2/``, ``/pid``, ``/slow`` behind the identity middleware) so
the limits can be set short (``Limits``), and is stopped by PID. Each bound has its test:
a slowloris client, an idle keep-alive, a silent TCP client (handshake timeout), oversized
request lines, headers and header blocks, the per-worker connection cap, SIGTERM with a
request in flight, a worker killed (restarted), a worker failing at start (the server
exits with its status), trust anchors replaced by editing ``ca.pem``, and the spread of
connections over the workers.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from modelseal.errors import RegistryError
from modelseal.pki import ca as pki_ca
from modelseal.pki import issue
from modelseal.pki.identity import Identity
from modelseal.server import identity
from modelseal.server.identity import Authorizer
from tests.conftest import Env
from tests.services import free_port
from tests.test_serve_tls import TD, Server, client, make_dir, request, running, stop

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = """
import json, sys
from pathlib import Path
from modelseal.errors import ModelsealError
from modelseal.server import runner
from modelseal.server.hygiene import Limits
import tests.test_serve_hygiene as t
try:
    runner.serve(runner.parse_listen(sys.argv[1]), Path(sys.argv[2]), getattr(t, sys.argv[3]), "prod",
                 workers=int(sys.argv[4]), limits=Limits(**json.loads(sys.argv[5])))
except ModelsealError as e:
    print(f"modelseal: error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
"""


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})


async def _pid(request: web.Request) -> web.Response:
    return web.Response(text=str(os.getpid()))


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "2")))
    return web.Response(text="done")


def build(auth: Authorizer) -> web.Application:
    app = web.Application(middlewares=[identity.middleware(auth)])
    app.router.add_get("/v2/", _ok)
    app.router.add_get("/pid", _pid)
    app.router.add_get("/slow", _slow)
    return app


def build_failing(auth: Authorizer) -> web.Application:
    raise RegistryError("the registry database is unreachable (test)")


@contextmanager
def serving(env: Env, workers: int = 2, factory: str = "build", **limits: Any) -> Iterator[Server]:
    pki_ca.init_ca(env.svc, TD)
    tls_dir = make_dir(env, env.work / "server-tls", "server", "registry", ips=["127.0.0.1"])
    argv = [sys.executable, "-c", LAUNCH, "127.0.0.1:{port}", str(tls_dir), factory, str(workers), json.dumps(limits)]
    with running(env, tls_dir, argv) as s:
        yield s


def tls_socket(ctx: ssl.SSLContext, port: int, timeout: float = 10) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed ``s`` (reading and discarding), or None if it stayed open."""
    start = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - start < seconds:
        try:
            if not s.recv(4096):
                return time.monotonic() - start
        except TimeoutError:
            continue
        except (ConnectionError, ssl.SSLError):
            return time.monotonic() - start
    return None


def get(ctx: ssl.SSLContext, port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def workers_of(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


def test_slowloris_headers_are_cut_at_the_header_timeout(env: Env) -> None:
    with serving(env, header_timeout=2.0, keepalive_timeout=60.0) as server:
        ctx = client(env, "slow")
        s = tls_socket(ctx, server.port)
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        cut = None
        for i in range(20):  # one header byte every 0.5 s: never completes
            try:
                s.sendall(b"X-a: b\r\n"[i % 8 : i % 8 + 1])
            except (ConnectionError, ssl.SSLError):
                cut = time.monotonic() - start
                break
            got = closed_within(s, 0.5)
            if got is not None:
                cut = time.monotonic() - start
                break
        s.close()
        assert cut is not None and cut < 6, cut
        assert request(ctx, server.port) == 200  # others are served


def test_a_later_request_on_a_kept_alive_connection_has_its_own_header_deadline(env: Env) -> None:
    with serving(env, header_timeout=2.0, keepalive_timeout=30.0) as server:
        s = tls_socket(client(env, "keeper"), server.port)
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(3)  # idle beyond the header timeout, within keep-alive: still open
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")  # a partial second request
        cut = closed_within(s, 8)
        s.close()
        assert cut is not None and 1.5 < cut < 5, cut


def test_idle_keepalive_and_silent_connections_are_closed(env: Env) -> None:
    with serving(env, header_timeout=2.0, keepalive_timeout=2.0, handshake_timeout=2.0) as server:
        ctx = client(env, "idle")
        s = tls_socket(ctx, server.port)
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        assert (closed_within(s, 8) or 99) < 5  # idle after a response
        s.close()
        s = tls_socket(ctx, server.port)  # a handshake, then not a byte
        assert (closed_within(s, 8) or 99) < 5
        s.close()
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # not even a handshake
        assert (closed_within(raw, 8) or 99) < 5
        raw.close()


def test_oversized_request_line_headers_and_header_blocks_are_refused(env: Env) -> None:
    with serving(env, max_header_bytes=32 << 10) as server:
        ctx = client(env, "big")

        def status(raw: bytes) -> bytes:
            s = tls_socket(ctx, server.port)
            try:
                s.sendall(raw)
                return s.recv(4096).split(b"\r\n", 1)[0]
            except (ConnectionError, ssl.SSLError):
                return b"closed"
            finally:
                s.close()

        assert status(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n") == b"HTTP/1.1 200 OK"
        assert status(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n").endswith(b" 400 Bad Request")
        assert status(b"GET /v2/ HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n").endswith(b" 400 Bad Request")
        many = b"".join(b"X-%d: v\r\n" % i for i in range(100))
        assert status(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n").endswith(b" 400 Bad Request")
        s = tls_socket(ctx, server.port)  # header lines each within limits, the block over 32 KiB
        try:
            s.sendall(b"GET /v2/ HTTP/1.1\r\n")
            for i in range(60):
                s.sendall(b"X-%d: %s\r\n" % (i % 50, b"v" * 1000))
                time.sleep(0.01)
            assert closed_within(s, 5) is not None
        except (ConnectionError, ssl.SSLError):
            pass  # closed while still sending: refused as well
        finally:
            s.close()
        assert request(ctx, server.port) == 200


def test_connections_per_worker_are_capped(env: Env) -> None:
    with serving(env, workers=1, max_connections=2, header_timeout=30.0) as server:
        ctx = client(env, "capped")
        held = [tls_socket(ctx, server.port) for _ in range(2)]
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=1.5)  # the kernel queues it
        with pytest.raises((TimeoutError, ssl.SSLError, ConnectionError)):
            ctx.wrap_socket(extra, server_hostname="127.0.0.1")  # not accepted: no handshake
        extra.close()
        held.pop().close()
        deadline = time.monotonic() + 10
        while request(ctx, server.port) != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for s in held:
            s.close()


def test_a_worker_killed_while_the_others_start_is_restarted_not_fatal(env: Env) -> None:
    # A worker killed by a signal before every worker is ready (an operator, the OOM
    # killer) is restarted; only a worker that exits on its own at start stops the server.
    pki_ca.init_ca(env.svc, TD)
    tls_dir = make_dir(env, env.work / "server-tls", "server", "registry", ips=["127.0.0.1"])
    port = free_port()
    argv = [sys.executable, "-c", LAUNCH, f"127.0.0.1:{port}", str(tls_dir), "build", "2", "{}"]
    log_path = env.work / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 20
            while not (children := workers_of(proc.pid)):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.01)
            os.kill(min(children), signal.SIGKILL)  # at once: the workers are still importing
            deadline = time.monotonic() + 30
            while "restarting it" not in log_path.read_text() or len(workers_of(proc.pid)) != 2:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            ctx = client(env, "after")
            deadline = time.monotonic() + 20
            while request(ctx, port) != 200:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        finally:
            stop(proc)


def test_sigterm_lets_a_request_in_flight_finish_then_exits_0(env: Env) -> None:
    with serving(env) as server:
        ctx = client(env, "inflight")
        result: list[tuple[int, str]] = []
        t = threading.Thread(target=lambda: result.append(get(ctx, server.port, "/slow?s=2")))
        t.start()
        time.sleep(0.7)
        os.kill(server.proc.pid, signal.SIGTERM)
        t.join(30)
        assert result == [(200, "done")]
        assert server.proc.wait(timeout=30) == 0
        assert isinstance(request(ctx, server.port), str)  # nothing listens any more


def test_a_killed_worker_is_restarted(env: Env) -> None:
    with serving(env) as server:
        before = workers_of(server.proc.pid)
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            now = workers_of(server.proc.pid)
            if len(now) == 2 and victim not in now:
                break
            assert time.monotonic() < deadline, now
            time.sleep(0.2)
        ctx = client(env, "after")
        assert all(request(ctx, server.port) == 200 for _ in range(10))
        assert "restarting it" in (env.work / "serve.log").read_text()
        assert stop(server.proc) == 0


def test_a_worker_failing_at_start_stops_the_server_with_its_status(env: Env) -> None:
    pki_ca.init_ca(env.svc, TD)
    tls_dir = make_dir(env, env.work / "server-tls", "server", "registry", ips=["127.0.0.1"])
    argv = [sys.executable, "-c", LAUNCH, f"127.0.0.1:{free_port()}", str(tls_dir), "build_failing", "2", "{}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 15, done.stderr
    assert "the registry database is unreachable (test)" in done.stderr
    assert "Traceback" not in done.stderr


def test_editing_ca_pem_replaces_the_trust_anchors_live(env: Env, tmp_path: Path) -> None:
    with serving(env) as server:
        ours = client(env, "ours")
        other = pki_ca.init_ca(env.svc, TD, folder=tmp_path / "other-ca")
        foreign_dir = tmp_path / "foreign"
        issue.write_dir(issue.issue(env.svc, Identity.of(TD, "prod", "service", "x"), ca=other), foreign_dir)
        foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        foreign.minimum_version = ssl.TLSVersion.TLSv1_3
        foreign.load_verify_locations(cafile=server.tls_dir / "ca.pem")  # still trusts the server
        foreign.load_cert_chain(foreign_dir / "cert.pem", foreign_dir / "key.pem")
        assert request(ours, server.port) == 200
        assert isinstance(request(foreign, server.port), str)
        open_conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ours, timeout=10)
        open_conn.request("GET", "/v2/")
        assert open_conn.getresponse().read() == b"{}"
        # The operator replaces the anchors: the other CA's root only (written by rename).
        tmp = server.tls_dir / ".ca.pem.new"
        tmp.write_bytes((foreign_dir / "ca.pem").read_bytes())
        os.replace(tmp, server.tls_dir / "ca.pem")
        deadline = time.monotonic() + 15
        while request(foreign, server.port) != 200:  # no signal: the parent watches the folder
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert isinstance(request(ours, server.port), str)  # removed, not just added to
        open_conn.request("GET", "/v2/")
        assert open_conn.getresponse().status == 200  # an open connection keeps its handshake
        open_conn.close()


def test_connections_spread_over_both_workers(env: Env) -> None:
    with serving(env) as server:
        ctx = client(env, "spread")
        workers = workers_of(server.proc.pid)
        seen: Counter[int] = Counter()
        lock = threading.Lock()

        def worker() -> None:
            for _ in range(25):
                status, pid = get(ctx, server.port, "/pid")
                assert status == 200
                with lock:
                    seen[int(pid)] += 1

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sum(seen.values()) == 200
        assert set(seen) == workers, (seen, workers)  # every worker took connections
        print("connections per worker:", dict(seen))
