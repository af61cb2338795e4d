"""The registry client's transport and OCI client: the pin check (after the handshake, before any
request), the intermediate roll-over through the backup pin, failover between endpoints,
``Location`` handling, and OCI errors as one escaped line. Servers are real: Debian's
``docker-registry`` and a bare TLS server from the standard ``ssl`` module, both on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from email.message import Message
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from modelseal.audit.events import MemorySink
from modelseal.errors import CertificateError, RegistryError
from modelseal.pki import ca as pki_ca
from modelseal.pki import pins
from modelseal.pki.pins import PinMismatch
from modelseal.registry.client import Repository, refused
from modelseal.registry.reference import Endpoint, parse_reference
from modelseal.registry.transport import Reply, Transport
from tests.conftest import Env
from tests.push_pull_helpers import DOCKER_REGISTRY, docker_registry, issue_dir, make_pki
from tests.services import free_port

needs_registry = pytest.mark.skipif(not os.path.exists(DOCKER_REGISTRY), reason="docker-registry is not installed")


class BareTlsServer:
    """Accepts one TLS connection (mutual TLS, our CA) and records the application bytes it gets."""

    def __init__(self, tls_dir: Path) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(tls_dir / "ca.pem")
        ctx.load_cert_chain(tls_dir / "cert.pem", tls_dir / "key.pem")
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.received = b""
        self.handshakes = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        raw, _ = self.sock.accept()
        raw.settimeout(5)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                self.handshakes += 1
                while chunk := s.recv(4096):
                    self.received += chunk
        except (OSError, ssl.SSLError):
            pass


def test_pin_mismatch_is_refused_before_any_request_and_audited(env: Env, tmp_path: Path) -> None:
    p = make_pki(env)
    server = BareTlsServer(p.server_dir)
    other = pki_ca.init_ca(env.svc, "example.org", folder=tmp_path / "other-ca")
    wrong = [pins.pin_of(other.issuing), pins.pin_of_key(other.next_public)]
    sink = MemorySink()
    t = Transport([Endpoint("127.0.0.1", server.port)], p.client_dir, wrong, sink=sink)
    with pytest.raises(PinMismatch) as e:
        t.request("GET", "/v2/")
    assert "matches none of the pinned keys" in str(e.value) and "\n" not in str(e.value)
    assert e.value.exit_code == 13
    server.thread.join(10)
    assert server.handshakes == 1 and server.received == b""  # the handshake happened, no request followed
    assert [ev.operation for ev in sink.events] == ["pin-mismatch"]
    assert sink.events[0].result == "PinMismatch" and sink.events[0].key == f"registry:127.0.0.1:{server.port}"


def test_pin_set_needs_a_backup_pin_and_valid_pins(env: Env) -> None:
    p = make_pki(env)
    server = BareTlsServer(p.server_dir)
    live_only = [pins.pin_of(p.ca.issuing)]
    with pytest.raises(CertificateError, match="backup pin"):
        Transport([Endpoint("127.0.0.1", server.port)], p.client_dir, live_only).request("GET", "/v2/")
    with pytest.raises(CertificateError):
        Transport([Endpoint("127.0.0.1", server.port)], p.client_dir, ["not-a-pin"])
    with pytest.raises(CertificateError, match="no registry pins"):
        Transport([Endpoint("127.0.0.1", server.port)], p.client_dir, [])


@needs_registry
def test_intermediate_rollover_through_the_backup_pin(env: Env) -> None:
    p = make_pki(env)
    old_pins = p.pins()
    with docker_registry(env.work, p.server_dir, p.client_dir) as port:
        assert Transport([Endpoint("127.0.0.1", port)], p.client_dir, old_pins).request("GET", "/v2/").status == 200
    new_ca = pki_ca.rotate_intermediate(env.svc)
    issue_dir(env, p.server_dir, "server", "registry", ips=["127.0.0.1"])  # the server's next renewal
    new_pins = [pins.pin_of(new_ca.issuing), pins.pin_of_key(new_ca.next_public)]
    assert new_pins[0] == old_pins[1]  # the new intermediate is the old backup key
    with docker_registry(env.work, p.server_dir, p.client_dir) as port:
        ep = [Endpoint("127.0.0.1", port)]
        # The client still holds its old certificate and the old pin set: accepted via the backup pin,
        # OpenSSL's verified chain naming the new intermediate.
        assert Transport(ep, p.client_dir, old_pins).request("GET", "/v2/").status == 200
        # Where Python gives no verified chain, the issuer must be one the client holds:
        t = Transport(ep, p.client_dir, old_pins)
        t.use_openssl_chain = False
        with pytest.raises(PinMismatch, match="issued by no CA certificate this client holds"):
            t.request("GET", "/v2/")
        issuers = env.work / "issuers.pem"
        issuers.write_bytes(new_ca.issuing.public_bytes(serialization.Encoding.PEM))
        t = Transport(ep, p.client_dir, old_pins, issuers=issuers)
        t.use_openssl_chain = False
        assert t.request("GET", "/v2/").status == 200
        issue_dir(env, p.client_dir, "service", "trainer")  # the client renewed: cert.pem carries the new one
        t = Transport(ep, p.client_dir, old_pins)
        t.use_openssl_chain = False
        assert t.request("GET", "/v2/").status == 200
        # A pin set that names neither the server's intermediate nor its root is refused.
        stale = [old_pins[0], pins.pin_of_key(new_ca.next_public)]
        with pytest.raises(PinMismatch):
            Transport(ep, p.client_dir, stale).request("GET", "/v2/")


@needs_registry
def test_failover_to_the_next_endpoint_and_connection_reuse(env: Env) -> None:
    p = make_pki(env)
    dead = free_port()
    with docker_registry(env.work, p.server_dir, p.client_dir) as port:
        t = Transport([Endpoint("127.0.0.1", dead), Endpoint("127.0.0.1", port)], p.client_dir, p.pins())
        for _ in range(3):
            assert t.request("GET", "/v2/").status == 200
        assert t.endpoint() == Endpoint("127.0.0.1", port)
        assert len(t._pool[Endpoint("127.0.0.1", port)]) == 1  # one connection, reused
        repo = Repository(t, "team/model")
        assert repo.get_manifest("latest") is None
        assert repo.tags() == []
    with pytest.raises(RegistryError, match="cannot reach the registry"):
        Transport([Endpoint("127.0.0.1", dead)], p.client_dir, p.pins(), attempts=2).request("GET", "/v2/")


def test_location_headers_relative_absolute_and_foreign(env: Env) -> None:
    p = make_pki(env)
    t = Transport([Endpoint("127.0.0.1", 5000), Endpoint("reg.example.org", 443)], p.client_dir, p.pins())
    base = "/v2/a/blobs/uploads/"
    assert t.resolve_location("/v2/a/blobs/uploads/u1?x=1", base) == "/v2/a/blobs/uploads/u1?x=1"
    assert t.resolve_location("u2", base) == "/v2/a/blobs/uploads/u2"
    assert t.resolve_location("https://127.0.0.1:5000/v2/a/b?s=1", base) == "/v2/a/b?s=1"
    assert t.resolve_location("https://REG.example.org/v2/a/b", base) == "/v2/a/b"
    for bad in (
        "https://evil.example/v2/a",
        "http://127.0.0.1:5000/v2/a",
        "/etc/passwd",
        "",
        "/v2/a b",
        "../../../../x",
    ):
        with pytest.raises(RegistryError):
            t.resolve_location(bad, base)


def test_oci_errors_become_one_escaped_line() -> None:
    body = b'{"errors":[{"code":"DENIED","message":"no\\n\\u001b[31mway","detail":{}}]}'
    e = refused(Reply(403, Message(), body, Endpoint("h", 1)), "a manifest upload")
    assert e.status == 403 and e.code == "DENIED" and e.exit_code == 15
    assert "\n" not in str(e) and "\x1b" not in str(e) and "a manifest upload" in str(e)
    e = refused(Reply(500, Message(), b"<html>\r\nboom", Endpoint("h", 1)), "x")
    assert e.code == "" and "boom" not in str(e)
    e = refused(Reply(400, Message(), b'{"errors":[{"code":"bad code; rm -rf","message":"m"}]}', Endpoint("h", 1)), "x")
    assert e.code == ""


def test_references() -> None:
    r = parse_reference("oci://127.0.0.1:5000/team/model:v1")
    assert r.endpoint == Endpoint("127.0.0.1", 5000) and r.name == "team/model" and r.tag == "v1"
    r = parse_reference("[::1]:5000/m@sha256:" + "a" * 64)
    assert r.endpoint == Endpoint("::1", 5000) and r.digest is not None and r.reference == "sha256:" + "a" * 64
    assert parse_reference("team/model:v1").endpoint is None
    for bad in ("h:1/Team:v1", "h:1/a/../b:v1", "h:1/a\x00:v1", "h:1/a", "h:1/a:v1?x", "h:99999/a:v1", "h:1/a@md5:00"):
        with pytest.raises(RegistryError):
            parse_reference(bad)
