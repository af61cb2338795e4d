"""The connection-level intrusion attempts of ``modelseal controls test`` (docs/controls.md):
a client without a certificate, with another CA's, with an expired one of the deployment's
own CA, a TLS 1.2 client, and our own client with wrong pins.

Each attempt opens one real connection to the server and reports an ``Outcome``: refused
(the handshake failed, or the server closed or refused the request before answering it),
accepted (``GET /v2/`` answered 2xx: the control failed), or not tested (with why). The
server is always verified against the controls identity's ``ca.pem`` and its host name or
address, so a refusal is the deployment's, never a wrong host's. Certificates made here
exist only for the attempt: the throwaway CA and its leaf are made in memory with
``cryptography``; they, and the expired certificate issued by this host's own CA (audited as
any ``cert-issue``, only where the CA is here and its key reachable without a prompt), are
written only to a 0700 temporary folder that is removed afterwards (``ssl`` loads a client
certificate from files only). The pin attempt uses ``registry.transport`` itself: it must
raise ``PinMismatch`` and write its ``pin-mismatch`` event to this host's audit log, which
is what ``modelseal metrics --textfile`` counts as ``modelseal_pin_mismatches_total``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from modelseal.errors import ModelsealError
from modelseal.keys import agent_client, keystore
from modelseal.keys.providers import parse_key_uri
from modelseal.keys.service import KeyService
from modelseal.pki import backend, issue, store
from modelseal.pki import ca as pki_ca
from modelseal.pki.identity import Identity
from modelseal.pki.pins import PinMismatch, pin_of_key
from modelseal.pki.tlsctx import KEX_GROUP
from modelseal.registry.reference import Endpoint
from modelseal.registry.transport import Transport
from modelseal.util.files import write_new

_REQUEST = "GET /v2/ HTTP/1.1\r\nHost: {host}\r\nUser-Agent: modelseal-controls\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True)
class Target:
    """The deployment under test: one endpoint, the controls identity's certificate folder
    (``cert.pem``, ``key.pem``, ``ca.pem``) and the pins of its issuing CA."""

    endpoint: Endpoint
    tls_dir: Path
    pins: tuple[str, ...]
    timeout: float = 10.0

    def transport(self, pins: tuple[str, ...] | None = None, **kw: Any) -> Transport:
        return Transport([self.endpoint], self.tls_dir, list(pins or self.pins), timeout=self.timeout, **kw)


@dataclass(frozen=True)
class Outcome:
    """``refused``: True (refused, as the control should), False (it went through: the
    control failed), None (no answer either way: an error, ``detail`` says which).
    ``tested`` False: the attempt could not be made here (``detail`` says why). ``alerted``:
    set by an attempt that checks its own alert (the client-side pin-mismatch event).
    ``refusal_expected`` False: what was tried is allowed to this identity (a reader's burst
    of unwraps), so only its alert is judged."""

    refused: bool | None
    detail: str
    tested: bool = True
    alerted: bool | None = None
    refusal_expected: bool = True
    data: dict[str, object] = field(default_factory=dict)


def not_tested(why: str) -> Outcome:
    return Outcome(None, why, tested=False)


class EventLog(Protocol):
    """This host's audit log, read back (``audit.log.MerkleAuditLog``)."""

    def emit(self, event: Any) -> None: ...

    def verified_events(
        self, key: str | None = None, since: float | None = None
    ) -> tuple[list[dict[str, Any]], Any]: ...


def _context(ca_file: Path, version: ssl.TLSVersion, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = version
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.load_verify_locations(cafile=ca_file)
    if version == ssl.TLSVersion.TLSv1_3:
        ctx.set_ecdh_curve(KEX_GROUP)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def _probe(t: Target, version: ssl.TLSVersion, cert: tuple[Path, Path] | None) -> Outcome:
    """One connection and one ``GET /v2/``: refused, or the status the server answered."""
    try:
        ctx = _context(t.tls_dir / "ca.pem", version, cert)
    except (ssl.SSLError, OSError) as e:
        return Outcome(None, f"cannot build the client context ({type(e).__name__})")
    host = t.endpoint.host
    try:
        raw = socket.create_connection((host, t.endpoint.port), timeout=t.timeout)
    except OSError as e:
        return Outcome(None, f"cannot connect to {t.endpoint} ({type(e).__name__})")
    try:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(_REQUEST.format(host=host).encode())
            head = s.recv(64)
    except ssl.SSLCertVerificationError as e:  # our check of the server, not the server's control
        return Outcome(None, f"the server's certificate does not verify against ca.pem ({e.verify_message})")
    except ssl.SSLError as e:
        return Outcome(True, f"handshake refused ({e.reason or type(e).__name__})")
    except OSError as e:
        return Outcome(True, f"connection closed by the server ({type(e).__name__})")
    finally:
        raw.close()
    if not head:
        return Outcome(True, "the server closed the connection without answering")
    words = head.split(b" ", 2)
    status = words[1].decode("ascii", "replace") if len(words) > 1 else "?"
    if status.startswith("2"):
        return Outcome(False, f"the server answered {status} to GET /v2/", data={"status": status})
    return Outcome(True, f"the server answered {status} to GET /v2/", data={"status": status})


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    """A 0700 temporary folder, removed whatever happens."""
    folder = Path(tempfile.mkdtemp(prefix="modelseal-controls-"))
    try:
        os.chmod(folder, 0o700)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_pair(folder: Path, certs: list[x509.Certificate], key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    write_new(cert_file, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs), 0o600)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_new(key_file, pem, 0o600)
    return cert_file, key_file


def throwaway_chain(
    uri: str, now: dt.datetime | None = None
) -> tuple[list[x509.Certificate], ec.EllipticCurvePrivateKey]:
    """A leaf for identity ``uri`` (clientAuth, 1 h) and the self-made CA that signed it."""
    t = now or dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelseal controls throwaway CA")])
    start, end = t - dt.timedelta(minutes=5), t + dt.timedelta(hours=1)
    root = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "controls")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return [leaf, root], key


# -- the attempts ------------------------------------------------------------------------------


def no_certificate(t: Target) -> Outcome:
    """(a) A TLS 1.3 client that presents no certificate."""
    return _probe(t, ssl.TLSVersion.TLSv1_3, None)


def other_ca(t: Target, identity: Identity) -> Outcome:
    """(b) The controls identity's name in a certificate of a throwaway CA."""
    certs, key = throwaway_chain(identity.uri)
    with _scratch() as folder:
        return _probe(t, ssl.TLSVersion.TLSv1_3, _write_pair(folder, certs, key))


def _anchors(ca_file: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(ca_file.read_bytes())
    except (OSError, ValueError):
        return []


def expired_certificate(t: Target, svc: KeyService, identity: Identity) -> Outcome:
    """(c) A certificate of the deployment's own CA for the controls identity, expired ten
    minutes ago: only where this host holds that CA and reaches its key without a prompt."""
    folder = store.ca_dir()
    if not (folder / pki_ca.CA_FILE).is_file():
        return not_tested("not tested: no CA here ($MODELSEAL_HOME/ca)")
    try:
        issuer = issue.load_issuer(svc, folder)
    except ModelsealError as e:
        return not_tested(f"not tested: the CA here does not load ({type(e).__name__})")
    if not isinstance(issuer, issue.LocalIssuer):
        return not_tested("not tested: the CA here is not a local CA (its backend cannot backdate a certificate)")
    if issuer.root not in _anchors(t.tls_dir / "ca.pem"):
        return not_tested("not tested: the CA here is not this deployment's (its root is not in ca.pem)")
    no_prompt = os.environ.get(keystore.PASSPHRASE_ENV) or os.environ.get(agent_client.SOCK_ENV)
    if parse_key_uri(issuer.ca.kek).scheme == "local" and not no_prompt:
        return not_tested(f"not tested: the CA key needs {keystore.PASSPHRASE_ENV} or {agent_client.SOCK_ENV}")
    then = pki_ca.utcnow() - backend.MIN_TTL - dt.timedelta(minutes=10)
    try:
        issued = issue.issue(svc, identity, ttl=backend.MIN_TTL, now=then, ca=issuer.ca)
    except ModelsealError as e:
        return Outcome(None, f"the CA here could not issue the expired certificate ({type(e).__name__})")
    serial = f"{issued.cert.serial_number:x}"
    with _scratch() as scratch:
        out = _probe(t, ssl.TLSVersion.TLSv1_3, _write_pair(scratch, [issued.cert, *issued.chain], issued.key))
    return Outcome(out.refused, f"{out.detail} (serial {serial[:16]}...)", data={**out.data, "serial": serial})


def tls12(t: Target) -> Outcome:
    """(d) The controls identity's own certificate over TLS 1.2."""
    return _probe(t, ssl.TLSVersion.TLSv1_2, (t.tls_dir / "cert.pem", t.tls_dir / "key.pem"))


def _pin_events(log: EventLog, key: str, since: float) -> int:
    events, _ = log.verified_events(key=key, since=since)
    return sum(1 for e in events if e.get("operation") == "pin-mismatch")


def pin_mismatch(t: Target, log: EventLog) -> Outcome:
    """(e) Our own client with two wrong pins: ``PinMismatch``, and its ``pin-mismatch`` event
    in this host's audit log (``alerted``)."""
    wrong = tuple(pin_of_key(ec.generate_private_key(ec.SECP256R1()).public_key()) for _ in range(2))
    key, since = f"registry:{t.endpoint}", time.time() - 1.0
    try:
        before = _pin_events(log, key, since)
    except ModelsealError as e:
        return not_tested(f"not tested: this host's audit log cannot be read ({type(e).__name__})")
    transport = t.transport(wrong, attempts=1, sink=log)
    try:
        transport.request("GET", "/v2/", retry=False)
        out = Outcome(False, "the connection went through with two wrong pins")
    except PinMismatch:
        out = Outcome(True, "PinMismatch: the server's CA matches none of the pins")
    except ModelsealError as e:
        out = Outcome(None, f"no pin check was reached ({type(e).__name__})")
    finally:
        transport.close()
    try:
        after = _pin_events(log, key, since)
    except ModelsealError:
        after = before
    seen = after > before
    note = (
        "; pin-mismatch event in this host's audit log" if seen else "; no pin-mismatch event in this host's audit log"
    )
    return Outcome(out.refused, out.detail + note, alerted=seen, data={"events": after - before})


__all__ = [
    "EventLog",
    "Outcome",
    "Target",
    "expired_certificate",
    "no_certificate",
    "not_tested",
    "other_ca",
    "pin_mismatch",
    "throwaway_chain",
    "tls12",
]
