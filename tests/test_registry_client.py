"""The registry client's transport and OCI client: the pin check (after the handshake, before any
request), the intermediate roll-over through the backup pin, failover between endpoints,
``Location`` handling, and OCI errors as one escaped line; a malicious registry (huge declared
sizes, more than the free space) refused before anything is written, a local file failure a
one-line ``StorageError``, a lost network leaving only the resumable partial folder. Servers
are real: Debian's ``docker-registry`` and TLS servers of the standard ``ssl`` module
(``http.server`` behind it for the malicious registry), all on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import socket
import ssl
import subprocess
import sys
import threading
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.errors import CertificateError, RegistryError, StorageError
from modelseal.pki import ca as pki_ca
from modelseal.pki import pins
from modelseal.pki.pins import PinMismatch
from modelseal.registry import layout, transfer
from modelseal.registry.client import Repository, refused
from modelseal.registry.reference import Endpoint, parse_reference
from modelseal.registry.transport import RegistryUnavailable, Reply, Transport
from tests.conftest import Env
from tests.push_pull_helpers import DOCKER_REGISTRY, Pki, docker_registry, issue_dir, make_pki
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


# ---- a malicious registry (a real TLS server of ours, properly certified and pinned) ----------


class FakeRegistry:
    """A registry that serves one crafted artifact manifest (any reference) and the blobs it is
    given, with ``Range`` support. ``cut``: each blob answer sends that many bytes of the range
    asked for, then drops the connection (the network lost mid-blob)."""

    def __init__(self, tls_dir: Path, manifest: bytes, blobs: dict[str, bytes] | None = None) -> None:
        self.manifest, self.blobs = manifest, dict(blobs or {})
        self.cut: int | None = None
        self.blob_gets: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes = b"", ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if "/manifests/" in self.path:
                    return self._send(200, fake.manifest, layout.IMAGE_MANIFEST)
                if "/referrers/" in self.path:
                    return self._send(200, layout.referrers_index([]), layout.IMAGE_INDEX)
                hexd = self.path.rsplit("sha256:", 1)[-1]
                if "/blobs/" not in self.path or hexd not in fake.blobs:
                    return self._send(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}')
                fake.blob_gets.append(self.headers.get("Range") or "")
                data = fake.blobs[hexd]
                start, end = 0, len(data) - 1
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if m:
                    start, end = int(m[1]), int(m[2]) if m[2] else len(data) - 1
                self.send_response(206 if m else 200)
                if m:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(end + 1 - start))
                self.end_headers()
                body = data[start : end + 1]
                if fake.cut is not None:
                    self.wfile.write(body[: fake.cut])
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        self.srv.socket = _server_context(tls_dir).wrap_socket(self.srv.socket, server_side=True)
        self.port = int(self.srv.server_address[1])
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def ref(self) -> str:
        return f"127.0.0.1:{self.port}/evil/repo:latest"

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def _server_context(tls_dir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(tls_dir / "ca.pem")
    ctx.load_cert_chain(tls_dir / "cert.pem", tls_dir / "key.pem")
    return ctx


def _artifact(*sizes: int, digest: str = "sha256:" + "ab" * 32) -> bytes:
    """An artifact manifest of one sealed file, or of a folder of blobs of these ``sizes``."""
    if len(sizes) == 1:
        layers = [{"mediaType": layout.SEALED_FILE, "digest": digest, "size": sizes[0]}]
    else:
        layers = [
            {
                "mediaType": layout.FOLDER_MANIFEST if i == 0 else layout.FOLDER_BLOB,
                "digest": f"sha256:{i:064x}",
                "size": size,
                "annotations": {layout.PATH_ANNOTATION: "manifest.mseal" if i == 0 else f"blobs/{i:032x}"},
            }
            for i, size in enumerate(sizes)
        ]
    doc = {
        "schemaVersion": 2,
        "mediaType": layout.IMAGE_MANIFEST,
        "artifactType": layout.ARTIFACT_TYPE,
        "config": layout.EMPTY_CONFIG.to_json(),
        "layers": layers,
    }
    return json.dumps(doc).encode()


def _pull_fake(env: Env, fake: FakeRegistry, p: Pki, dst: Path, **kw: object) -> object:
    t = Transport([Endpoint("127.0.0.1", fake.port)], p.client_dir, p.pins())
    return transfer.pull(fake.ref(), dst, transport=t, verify=False, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "sizes",
    [(1 << 62,), ((1 << 63) - 1,), ((1 << 40) + 1,), (1 << 39, 1 << 39, 1)],  # the last: over 1 TiB together
)
def test_a_huge_declared_size_is_refused_before_anything_is_written(env: Env, sizes: tuple[int, ...]) -> None:
    p = make_pki(env)
    fake = FakeRegistry(p.server_dir, _artifact(*sizes))
    out = env.work / "out"
    out.mkdir()
    try:
        with pytest.raises(RegistryError, match="over the 1 TiB limit") as e:
            _pull_fake(env, fake, p, out / "model.sealed")
    finally:
        fake.close()
    assert "\n" not in str(e.value)
    assert list(out.iterdir()) == [] and fake.blob_gets == []


def test_an_artifact_larger_than_the_free_space_is_refused(env: Env) -> None:
    p = make_pki(env)
    st = os.statvfs(env.work)
    size = st.f_bavail * st.f_frsize + (8 << 30)
    if size > layout.MAX_LAYER_SIZE:
        pytest.skip("this filesystem has more free space than the 1 TiB a layer may have")
    fake = FakeRegistry(p.server_dir, _artifact(size))
    out = env.work / "out"
    out.mkdir()
    try:
        with pytest.raises(StorageError, match="not enough free space") as e:
            _pull_fake(env, fake, p, out / "model.sealed")
    finally:
        fake.close()
    assert "\n" not in str(e.value) and e.value.exit_code == 7
    assert list(out.iterdir()) == [] and fake.blob_gets == []  # no sparse file, no partial folder


def test_a_local_file_failure_is_a_one_line_storage_error_and_leaves_nothing(env: Env) -> None:
    """The CLI in a process whose files may not grow past 1 MiB (RLIMIT_FSIZE): sizing the part
    file of a 4 MiB layer fails with EFBIG, which must be a StorageError (exit 7), one line."""
    p = make_pki(env)
    fake = FakeRegistry(p.server_dir, _artifact(4 << 20))
    out = env.work / "out"
    out.mkdir()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    pin_args = [a for pin in p.pins() for a in ("--pin", pin)]
    cmd = [sys.executable, "-m", "modelseal.cli", "pull", fake.ref(), str(out / "m.sealed"), "--no-verify"]
    try:
        proc = subprocess.run(
            [*cmd, "--tls-dir", str(p.client_dir), *pin_args],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=limit,
        )
    finally:
        fake.close()
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.count("\n") == 1 and "File too large" in proc.stderr and "internal error" not in proc.stderr
    assert list(out.iterdir()) == []


def test_network_loss_keeps_only_the_resumable_partial_folder(env: Env) -> None:
    src = env.work / "w.bin"
    src.write_bytes(os.urandom(3 << 20))
    art = env.work / "w.sealed"
    modelseal.seal(src, art, "local:test-kek", keys=env.svc)
    data = art.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    p = make_pki(env)
    fake = FakeRegistry(p.server_dir, _artifact(len(data), digest=digest), {digest[7:]: data})
    fake.cut = 64 << 10  # every blob answer breaks off after 64 KiB
    out = env.work / "out"
    out.mkdir()
    dst = out / "w.sealed"
    try:
        with pytest.raises(RegistryUnavailable):
            _pull_fake(env, fake, p, dst, jobs=1)
        (partial,) = out.iterdir()
        assert partial.name.startswith(".w.sealed.pull-") and partial.is_dir()
        assert sorted(q.name for q in partial.iterdir()) == [f"{digest[7:]}.got", f"{digest[7:]}.part"]
        fake.cut, fake.blob_gets = None, []
        pulled = _pull_fake(env, fake, p, dst, jobs=1)
    finally:
        fake.close()
    assert dst.read_bytes() == data and isinstance(pulled, transfer.Pulled)
    assert fake.blob_gets and not fake.blob_gets[0].startswith("bytes=0-")  # resumed, not refetched
    assert list(out.iterdir()) == [dst]
