"""``modelseal serve`` over real TLS (docs/serve.md): a subprocess on 127.0.0.1, stopped by PID.

Refused, each a test: no client certificate, another CA, expired, revoked, a dev identity at
a prod server, a TLS 1.2 client. And the server certificate swapped while running.
"""

from __future__ import annotations

import datetime as dt
import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from modelseal.cli import main
from modelseal.pki import ca as pki_ca
from modelseal.pki import denylist, issue
from modelseal.pki.identity import Identity
from modelseal.server import tls
from tests.conftest import Env
from tests.services import free_port

TD = "example.org"
SERVE = [sys.executable, "-m", "modelseal.cli", "serve"]


@dataclass
class Server:
    port: int
    tls_dir: Path
    proc: subprocess.Popen[bytes]
    ca: pki_ca.CA
    env: Env


def make_dir(env: Env, folder: Path, kind: str, name: str, envname: str = "prod", **kw: object) -> Path:
    issued = issue.issue(env.svc, Identity.of(TD, envname, kind, name), **kw)  # type: ignore[arg-type]
    issue.write_dir(issued, folder, force=True)
    return folder


def request(ctx: ssl.SSLContext, port: int) -> int | str:
    """The status of GET /v2/, or the name of the error that stopped it."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/v2/")
        resp = conn.getresponse()
        resp.read()
        if resp.status == 200:
            assert resp.getheader("Docker-Distribution-API-Version") == "registry/2.0"
        return resp.status
    except (ssl.SSLError, ConnectionError, http.client.HTTPException) as e:
        return type(e).__name__
    finally:
        conn.close()


def client(env: Env, name: str, envname: str = "prod", **kw: object) -> ssl.SSLContext:
    return tls.client_context(make_dir(env, env.work / f"client-{name}-{envname}", "service", name, envname, **kw))


def wait_ready(env: Env, proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 30) -> None:
    ctx = client(env, "probe")
    deadline = time.monotonic() + timeout
    while request(ctx, port) != 200:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL after 30 s; the exit status."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


@contextmanager
def running(env: Env, tls_dir: Path, command: list[str] | None = None, log_name: str = "serve.log") -> Iterator[Server]:
    """``modelseal serve`` (or ``command``, given the port) on a free port, ready, stopped by PID."""
    ca = pki_ca.load_ca()
    port = free_port()
    log_path = env.work / log_name
    log = open(log_path, "wb")  # noqa: SIM115
    argv = command or [*SERVE, "--listen", "127.0.0.1:{port}", "--tls-dir", str(tls_dir), "--env", "prod"]
    proc = subprocess.Popen(
        [a.replace("{port}", str(port)) for a in argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ),
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        wait_ready(env, proc, port, log_path)
        yield Server(port, tls_dir, proc, ca, env)
    finally:
        stop(proc)
        log.close()


@pytest.fixture
def server(env: Env) -> Iterator[Server]:
    pki_ca.init_ca(env.svc, TD)
    tls_dir = make_dir(env, env.work / "server-tls", "server", "registry", ips=["127.0.0.1"])
    with running(env, tls_dir) as s:
        yield s


def test_valid_prod_service_gets_200_and_clean_shutdown(server: Server) -> None:
    assert request(client(server.env, "trainer"), server.port) == 200
    os.kill(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0


def test_client_without_certificate_is_refused(server: Server) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=server.tls_dir / "ca.pem")
    assert isinstance(request(ctx, server.port), str)  # no HTTP answer at all: the handshake refused it


def test_client_of_another_ca_is_refused(server: Server, tmp_path: Path) -> None:
    other = pki_ca.init_ca(server.env.svc, TD, folder=tmp_path / "other-ca")
    foreign = issue.issue(server.env.svc, Identity.of(TD, "prod", "service", "intruder"), ca=other)
    issue.write_dir(foreign, tmp_path / "foreign")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=server.tls_dir / "ca.pem")  # trusts the server, presents a foreign cert
    ctx.load_cert_chain(tmp_path / "foreign" / "cert.pem", tmp_path / "foreign" / "key.pem")
    assert isinstance(request(ctx, server.port), str)  # no HTTP answer at all: the handshake refused it


def test_expired_client_is_refused(server: Server) -> None:
    past = pki_ca.utcnow() - dt.timedelta(days=2)
    ctx = client(server.env, "old", now=past, ttl=dt.timedelta(hours=1))
    assert isinstance(request(ctx, server.port), str)  # no HTTP answer at all: the handshake refused it


def test_revoked_client_gets_403(server: Server) -> None:
    folder = make_dir(server.env, server.env.work / "revokee", "service", "revokee")
    ctx = tls.client_context(folder)
    assert request(ctx, server.port) == 200
    serial = issue.read_chain(folder)[0].serial_number
    assert main(["cert", "revoke", denylist.serial_hex(serial), "--reason", "test"]) == 0
    assert request(ctx, server.port) == 403
    assert request(client(server.env, "other"), server.port) == 200  # only that serial


def test_dev_identity_at_prod_server_gets_403(server: Server) -> None:
    ctx = client(server.env, "trainer", "dev")
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=10)
    conn.request("GET", "/v2/")
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    assert resp.status == 403
    assert "environment dev" in body and "\n" not in body


def test_tls12_client_fails_the_handshake(server: Server) -> None:
    folder = make_dir(server.env, server.env.work / "tls12", "service", "legacy")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=folder / "ca.pem")
    ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _served_serial(ctx: ssl.SSLContext, port: int) -> int:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_reloads_the_server_certificate(server: Server) -> None:
    ctx = client(server.env, "watcher")
    before = _served_serial(ctx, server.port)
    assert before == issue.read_chain(server.tls_dir)[0].serial_number
    make_dir(server.env, server.tls_dir, "server", "registry", ips=["127.0.0.1"])  # renewed in place
    after = issue.read_chain(server.tls_dir)[0].serial_number
    assert after != before
    os.kill(server.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while _served_serial(ctx, server.port) != after:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert request(ctx, server.port) == 200


def test_reload_in_process_keeps_old_cert_on_a_broken_folder(env: Env) -> None:
    pki_ca.init_ca(env.svc, TD)
    good = make_dir(env, env.work / "s", "server", "registry", ips=["127.0.0.1"])
    live = tls.LiveContext(good)
    ctx = live.current
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3 and ctx.verify_mode == ssl.CERT_REQUIRED
    broken = env.work / "broken"
    broken.mkdir()
    for name in ("ca.pem", "cert.pem"):
        (broken / name).write_bytes((good / name).read_bytes())
    (broken / "key.pem").write_bytes((make_dir(env, env.work / "k", "server", "x") / "key.pem").read_bytes())
    from modelseal.errors import CertificateError

    live.tls_dir = broken
    with pytest.raises(CertificateError) as e:
        live.reload()
    assert "PRIVATE KEY" not in str(e.value)
    assert live.current is ctx  # the old context keeps serving
    live.tls_dir = good
    live.reload()  # a valid folder loads
    assert live.current is not ctx


def test_serve_refuses_a_server_cert_of_another_env(env: Env) -> None:
    pki_ca.init_ca(env.svc, TD)
    tls_dir = make_dir(env, env.work / "s", "server", "registry", "dev", ips=["127.0.0.1"])
    port = free_port()
    assert main(["serve", "--listen", f"127.0.0.1:{port}", "--tls-dir", str(tls_dir), "--env", "prod"]) == 13
