"""A client renews its own certificate over mutual TLS (``pki.renewal`` against
``server.certs_api``), with a real server subprocess on 127.0.0.1: the listener of
``modelseal serve`` (``server.runner``) running ``make_app`` plus the renewal route."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelseal.errors import CertificateError
from modelseal.pki import ca as pki_ca
from modelseal.pki import denylist, issue, renewal, verify
from modelseal.pki.backend import make_csr
from modelseal.pki.identity import Identity
from tests.conftest import Env
from tests.services import free_port

TD = "example.org"
SCRIPT = """
import sys
from pathlib import Path

from modelseal.audit.events import JsonLinesSink
from modelseal.governance.store import GovStore
from modelseal.keys.service import KeyService
from modelseal.pki import issue
from modelseal.server import authz, certs_api, runner
from modelseal.server.app import make_app


def build(auth):
    app = make_app(auth)
    sink = JsonLinesSink(Path(sys.argv[3]))
    store = GovStore.open(Path(sys.argv[3]).with_name("governance.db"))
    authz.install(app, authz.Authz(store, None, auth.env, auth.trust_domain, sink))  # cert.renew: self only
    certs_api.add_routes(app, issue.load_issuer(KeyService(sink=sink)))
    return app


runner.serve(runner.parse_listen(sys.argv[1]), Path(sys.argv[2]), build, env="prod")
"""


@dataclass
class Server:
    port: int
    ca: pki_ca.CA
    env: Env
    audit: Path


def folder(env: Env, name: str, kind: str = "service", envname: str = "prod", **kw: object) -> Path:
    out = env.work / f"{kind}-{name}-{envname}"
    issued = issue.issue(env.svc, Identity.of(TD, envname, kind, name), **kw)  # type: ignore[arg-type]
    issue.write_dir(issued, out, force=True)
    return out


def ping(tls_dir: Path, port: int) -> int | str:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=renewal.client_context(tls_dir), timeout=10)
    try:
        conn.request("GET", "/v2/")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (ssl.SSLError, OSError, http.client.HTTPException) as e:
        return type(e).__name__
    finally:
        conn.close()


def post(tls_dir: Path, port: int, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=renewal.client_context(tls_dir), timeout=10)
    try:
        conn.request("POST", renewal.ROUTE, body=body, headers={"Content-Type": renewal.CSR_TYPE})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def server(env: Env) -> Iterator[Server]:
    ca = pki_ca.init_ca(env.svc, TD)
    tls_dir = folder(env, "registry", "server", ips=["127.0.0.1"])
    script = env.work / "renewal_server.py"
    script.write_text(SCRIPT)
    audit = env.work / "audit.jsonl"
    port = free_port()
    log = open(env.work / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, str(script), f"127.0.0.1:{port}", str(tls_dir), str(audit)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ),
    )
    probe = folder(env, "probe")
    deadline = time.monotonic() + 30
    while ping(probe, port) != 200:
        assert proc.poll() is None, (env.work / "serve.log").read_text()
        assert time.monotonic() < deadline, (env.work / "serve.log").read_text()
        time.sleep(0.2)
    try:
        yield Server(port, ca, env, audit)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def events(server: Server) -> list[dict[str, object]]:
    if not server.audit.exists():
        return []
    return [json.loads(line) for line in server.audit.read_text().splitlines()]


def test_due_at_two_thirds(env: Env) -> None:
    pki_ca.init_ca(env.svc, TD)
    chain = issue.read_chain(folder(env, "trainer", ttl=dt.timedelta(hours=24)))
    start = chain[0].not_valid_before_utc
    life = chain[0].not_valid_after_utc - start
    assert not renewal.due(chain, start + life * 0.66)
    assert renewal.due(chain, start + life * 0.67)
    assert renewal.due(chain, chain[0].not_valid_after_utc + dt.timedelta(seconds=1))


def test_client_renews_itself_with_same_identity(server: Server) -> None:
    env = server.env
    tls_dir = folder(env, "trainer", ttl=dt.timedelta(hours=6))
    old = issue.read_chain(tls_dir)[0]
    old_key = (tls_dir / "key.pem").read_bytes()
    assert renewal.renew_if_due("127.0.0.1", server.port, tls_dir) is None  # young: nothing sent
    assert issue.read_chain(tls_dir)[0] == old
    issued = renewal.renew_via("127.0.0.1", server.port, tls_dir)
    chain = issue.read_chain(tls_dir)
    new = chain[0]
    assert new == issued.cert and new.serial_number != old.serial_number
    assert (tls_dir / "key.pem").read_bytes() != old_key
    assert (tls_dir / "key.pem").stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tls_dir)) == ["ca.pem", "cert.pem", "key.pem"]
    key = serialization.load_pem_private_key((tls_dir / "key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == new.public_key()
    want = Identity.of(TD, "prod", "service", "trainer")
    assert verify.identity_of(chain, [server.ca.root], pki_ca.utcnow(), trust_domain=TD) == want
    assert verify.uri_identity(old) == want
    # the presented certificate's own lifetime, not the default 24 h
    assert new.not_valid_after_utc - new.not_valid_before_utc == old.not_valid_after_utc - old.not_valid_before_utc
    renewed = [e for e in events(server) if e["operation"] == "cert-renew"]
    assert [(e["result"], e["actor"], e["artifact"]) for e in renewed] == [("ok", want.uri, issued.serial)]
    # The renewed certificate authenticates the next renewal, and the old one still works until it expires.
    assert ping(tls_dir, server.port) == 200
    again = renewal.renew_via("127.0.0.1", server.port, tls_dir)
    assert again.identity == want and again.cert.serial_number != new.serial_number


def test_server_certificate_renews_with_its_dns_and_ip(server: Server) -> None:
    tls_dir = folder(server.env, "edge", "server", dns=["edge.example.org"], ips=["127.0.0.1"])
    renewal.renew_via("127.0.0.1", server.port, tls_dir)
    san = issue.read_chain(tls_dir)[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_revoked_certificate_cannot_renew(server: Server) -> None:
    tls_dir = folder(server.env, "revokee")
    before = (tls_dir / "cert.pem").read_bytes(), (tls_dir / "key.pem").read_bytes()
    issue.revoke(server.env.svc, issue.read_chain(tls_dir)[0].serial_number, "test")
    with pytest.raises(CertificateError, match=r"\(403\).*revoked"):
        renewal.renew_via("127.0.0.1", server.port, tls_dir)
    assert ((tls_dir / "cert.pem").read_bytes(), (tls_dir / "key.pem").read_bytes()) == before


def test_expired_certificate_cannot_renew(server: Server, env: Env) -> None:
    tls_dir = folder(env, "old", now=pki_ca.utcnow() - dt.timedelta(days=2), ttl=dt.timedelta(hours=1))
    before = (tls_dir / "cert.pem").read_bytes()
    with pytest.raises(CertificateError, match="not valid now"):  # the client knows before it connects
        renewal.renew_via("127.0.0.1", server.port, tls_dir)
    with pytest.raises(CertificateError, match="cannot renew"):  # and the server's handshake refuses it anyway
        renewal.renew_via("127.0.0.1", server.port, tls_dir, now=pki_ca.utcnow() - dt.timedelta(days=2))
    assert (tls_dir / "cert.pem").read_bytes() == before


def test_dev_certificate_cannot_renew_at_prod_server(server: Server) -> None:
    tls_dir = folder(server.env, "trainer", envname="dev")
    with pytest.raises(CertificateError, match=r"\(403\).*environment"):
        renewal.renew_via("127.0.0.1", server.port, tls_dir)


def test_csr_for_another_identity_is_refused(server: Server) -> None:
    tls_dir = folder(server.env, "trainer")
    key = ec.generate_private_key(ec.SECP256R1())
    for other in (
        [x509.UniformResourceIdentifier(f"spiffe://{TD}/prod/server/registry")],
        [x509.UniformResourceIdentifier(f"spiffe://{TD}/prod/service/trainer"), x509.DNSName("evil.example.org")],
    ):
        status, body = post(tls_dir, server.port, make_csr(key, other).public_bytes(serialization.Encoding.PEM))
        assert status == 403 and b"other identities" in body
    # A CSR naming nothing gets the caller's identity, never one of its own choosing.
    status, body = post(tls_dir, server.port, make_csr(key, []).public_bytes(serialization.Encoding.PEM))
    assert status == 200
    certs = x509.load_pem_x509_certificates(body)
    assert certs[0].public_key() == key.public_key()
    got = verify.identity_of(certs, [server.ca.root], pki_ca.utcnow(), trust_domain=TD)
    assert got == Identity.of(TD, "prod", "service", "trainer")
    refused = [e for e in events(server) if e["operation"] == "cert-renew" and e["result"] == "PolicyDenied"]
    assert len(refused) == 2 and {e["actor"] for e in refused} == {got.uri}


def test_bad_csr_bodies(server: Server) -> None:
    tls_dir = folder(server.env, "trainer")
    assert post(tls_dir, server.port, b"not a csr")[0] == 400
    assert post(tls_dir, server.port, b"x" * (renewal.MAX_CSR + 1))[0] == 413
    rsa_less = make_csr(ec.generate_private_key(ec.SECP384R1()), []).public_bytes(serialization.Encoding.PEM)
    status, body = post(tls_dir, server.port, rsa_less)
    assert status == 400 and b"P-256" in body
    pem = make_csr(ec.generate_private_key(ec.SECP256R1()), []).public_bytes(serialization.Encoding.PEM)
    tampered = bytearray(pem)
    tampered[pem.index(b"\n") + 40] ^= 0x01  # a flipped bit inside the signed part
    assert post(tls_dir, server.port, bytes(tampered))[0] == 400
    assert post(tls_dir, server.port, pem + pem)[0] == 400


def test_configured_max_ttl_bounds_the_renewal(server: Server) -> None:
    tls_dir = folder(server.env, "short", ttl=dt.timedelta(hours=3))
    config = server.env.home / "config.toml"  # lowered after the issue: applies at the renewal
    config.write_text('[pki]\nmax_ttl = "2h"\n')
    config.chmod(0o600)
    new = renewal.renew_via("127.0.0.1", server.port, tls_dir).cert
    assert new.not_valid_after_utc - new.not_valid_before_utc == dt.timedelta(hours=2) + pki_ca.BACKDATE
    serial = denylist.serial_hex(new.serial_number)
    assert serial in {str(r["serial"]) for r in issue.list_issued(server.ca)}


def test_a_short_lived_certificate_renews_to_its_own_lifetime(server: Server) -> None:
    tls_dir = folder(server.env, "contractor", ttl=dt.timedelta(minutes=15))
    old = issue.read_chain(tls_dir)[0]
    span = old.not_valid_after_utc - old.not_valid_before_utc
    for _ in range(2):  # and again from the renewed one: it never grows
        new = renewal.renew_via("127.0.0.1", server.port, tls_dir).cert
        assert new.not_valid_after_utc - new.not_valid_before_utc <= span  # not the default 24 h
        assert new.not_valid_after_utc - pki_ca.utcnow() <= dt.timedelta(minutes=15, seconds=5)
    assert issue.read_chain(tls_dir)[0] == new


def test_revoking_a_certificate_denies_every_renewal_of_it(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    from modelseal.cli import main

    tls_dir = folder(server.env, "stolen", ttl=dt.timedelta(minutes=30))
    first = issue.read_chain(tls_dir)[0]
    second = renewal.renew_via("127.0.0.1", server.port, tls_dir).cert  # the thief renews, twice
    third = renewal.renew_via("127.0.0.1", server.port, tls_dir).cert
    rows = {str(r["serial"]): r for r in issue.list_issued(server.ca)}
    hexed = [denylist.serial_hex(c.serial_number) for c in (first, second, third)]
    assert rows[hexed[1]][denylist.PARENT] == hexed[0] and rows[hexed[2]][denylist.PARENT] == hexed[1]
    assert ping(tls_dir, server.port) == 200
    capsys.readouterr()
    assert main(["cert", "revoke", hexed[0], "--reason", "laptop stolen"]) == 0  # the operator revokes the first
    out = capsys.readouterr().out
    assert f"serial {hexed[0]} revoked" in out
    assert f"serial {hexed[1]} revoked (renewed from {hexed[0]})" in out
    assert f"serial {hexed[2]} revoked (renewed from {hexed[0]})" in out
    entries = denylist.load(server.ca.folder).entries
    assert entries[first.serial_number].reason == "laptop stolen"
    for c in (second, third):
        assert entries[c.serial_number].reason == f"renewed from revoked certificate {hexed[0]} (laptop stolen)"
    assert ping(tls_dir, server.port) == 403  # the newest renewal is refused at once
    before = (tls_dir / "cert.pem").read_bytes()
    with pytest.raises(CertificateError, match=r"\(403\).*revoked"):
        renewal.renew_via("127.0.0.1", server.port, tls_dir)
    assert (tls_dir / "cert.pem").read_bytes() == before


def test_renewal_is_refused_while_an_ancestor_is_revoked(server: Server) -> None:
    tls_dir = folder(server.env, "heir", ttl=dt.timedelta(hours=1))
    first = issue.read_chain(tls_dir)[0]
    second = renewal.renew_via("127.0.0.1", server.port, tls_dir).cert
    # Only the ancestor is listed (a denylist from before this fix, or a revocation racing
    # the renewal): the renewed certificate still authenticates, but cannot renew itself.
    denylist.add(first.serial_number, "test", None, server.ca.folder)
    assert ping(tls_dir, server.port) == 200
    with pytest.raises(
        CertificateError, match=rf"\(403\).*renewed from revoked certificate {denylist.serial_hex(first.serial_number)}"
    ):
        renewal.renew_via("127.0.0.1", server.port, tls_dir)
    assert issue.read_chain(tls_dir)[0] == second
    assert [e["result"] for e in events(server) if e["operation"] == "cert-renew"][-1] == "CertificateRevoked"
