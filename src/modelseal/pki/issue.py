"""Leaf certificates: issue, renew, and the certificate folder they are written to.

A leaf is a fresh P-256 key made here, a certificate signed by the CA's issuing key with
the identity as its only URI SAN (server certificates add DNS and IP SANs), a random
159-bit serial, ``notBefore`` five minutes back for clock skew and a lifetime of at most
``MAX_TTL``. Server certificates carry serverAuth and clientAuth, the others clientAuth.

The folder ``DIR`` holds ``cert.pem`` (leaf, then intermediate), ``key.pem`` (PKCS#8,
0600) and ``ca.pem`` (the root). It is written whole into a temporary sibling folder and
swapped in with one ``renameat2(RENAME_EXCHANGE)`` (``util.files.atomic_output``), so a
reader sees the old three files or the new three, never a mix; a crash is rolled back or
forward by the next access. Every issued certificate is recorded in ``issued.json``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from modelseal.errors import CertificateError, CertificateRevoked, ModelsealError, PolicyDenied, StorageError
from modelseal.keys.service import KeyService
from modelseal.pki import denylist, store
from modelseal.pki.ca import BACKDATE, CA, audit, load_ca, utcnow
from modelseal.pki.identity import Identity
from modelseal.pki.verify import identity_of
from modelseal.util.files import atomic_output, read_limited, write_new

DEFAULT_TTL = dt.timedelta(hours=24)
MAX_TTL = dt.timedelta(days=7)
MIN_TTL = dt.timedelta(minutes=5)
ISSUED_FILE = "issued.json"
MAX_ISSUED = 20_000
MAX_SANS = 32
FILES = ("cert.pem", "key.pem", "ca.pem")


@dataclass(frozen=True)
class Issued:
    identity: Identity
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]  # the intermediate(s)
    root: x509.Certificate

    @property
    def serial(self) -> str:
        return denylist.serial_hex(self.cert.serial_number)


def _shown(d: dt.timedelta) -> str:
    seconds = int(d.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _check_ttl(ttl: dt.timedelta) -> None:
    if ttl > MAX_TTL:
        raise PolicyDenied(f"a certificate lifetime of {_shown(ttl)} is above this CA's maximum of {_shown(MAX_TTL)}")
    if ttl < MIN_TTL:
        raise PolicyDenied(f"a certificate lifetime below {MIN_TTL} is refused")


def _sans(identity: Identity, dns: Sequence[str], ips: Sequence[str]) -> list[x509.GeneralName]:
    if len(dns) + len(ips) > MAX_SANS:
        raise PolicyDenied(f"at most {MAX_SANS} DNS and IP names")
    if (dns or ips) and identity.kind != "server":
        raise PolicyDenied("only server certificates carry DNS and IP names")
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    for h in dns:
        h2 = h.lower().rstrip(".")
        labels = h2.removeprefix("*.").split(".")
        if (
            not h2
            or len(h2) > 253
            or not all(0 < len(x) <= 63 and x.replace("-", "").isalnum() and x.isascii() for x in labels)
        ):
            raise ValueError(f"--dns takes a host name, got {h[:80]!r}")
        names.append(x509.DNSName(h2))
    for a in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(a)))
        except ValueError:
            raise ValueError(f"--ip takes an IPv4 or IPv6 address, got {a[:80]!r}") from None
    return names


def _leaf(
    ca: CA,
    signer: ec.EllipticCurvePrivateKey,
    identity: Identity,
    sans: list[x509.GeneralName],
    t: dt.datetime,
    ttl: dt.timedelta,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    not_after = t + ttl
    if not_after > ca.issuing.not_valid_after_utc:
        raise CertificateError(
            "the issuing CA expires before this certificate would: run 'modelseal ca rotate-intermediate'"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    ekus = (
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if identity.kind == "server"
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    ski = ca.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
        .issuer_name(ca.issuing.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(signer, hashes.SHA256())
    )
    return cert, key


def issue(
    svc: KeyService,
    identity: Identity,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    ttl: dt.timedelta = DEFAULT_TTL,
    now: dt.datetime | None = None,
    ca: CA | None = None,
) -> Issued:
    """Issue a certificate for ``identity`` (of the CA's trust domain), recorded and audited."""
    ca = ca or load_ca()
    try:
        if identity.trust_domain != ca.trust_domain:
            raise PolicyDenied(f"this CA issues for trust domain {ca.trust_domain!r}, not {identity.trust_domain!r}")
        _check_ttl(ttl)
        sans = _sans(identity, dns, ips)
        t = now or utcnow()
        cert, key = _leaf(ca, ca.issuing_key(svc), identity, sans, t, ttl)
        _record(ca, cert, identity, time.time() if now is None else now.timestamp())
    except ModelsealError as e:
        audit(svc, "cert-issue", ca.trust_domain, type(e).__name__)
        raise
    issued = Issued(identity, cert, key, ca.chain, ca.root)
    audit(svc, "cert-issue", ca.trust_domain, "ok", issued.serial)
    return issued


def _record(ca: CA, cert: x509.Certificate, identity: Identity, t: float) -> None:
    doc = store.read_json(ca.folder, ISSUED_FILE) or {"issued": []}
    rows = doc.get("issued") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise CertificateError(f"the CA file {ISSUED_FILE} is malformed")
    rows = [r for r in rows if isinstance(r, dict) and not_after_of(r) + denylist.GRACE > t]
    rows.append(
        {
            "serial": denylist.serial_hex(cert.serial_number),
            "identity": identity.uri,
            "not_after": cert.not_valid_after_utc.timestamp(),
            "issued_at": t,
        }
    )
    store.write(ca.folder, ISSUED_FILE, store.dump_json({"issued": rows[-MAX_ISSUED:]}))


def not_after_of(row: dict[str, object]) -> float:
    value = row.get("not_after")
    return float(value) if isinstance(value, int | float) else 0.0


def list_issued(ca: CA | None = None) -> list[dict[str, object]]:
    ca = ca or load_ca()
    doc = store.read_json(ca.folder, ISSUED_FILE) or {"issued": []}
    rows = doc.get("issued") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise CertificateError(f"the CA file {ISSUED_FILE} is malformed")
    return [r for r in rows if isinstance(r, dict)]


def write_dir(issued: Issued, out: Path, *, force: bool = False) -> None:
    """Write ``out``/cert.pem, key.pem, ca.pem as one atomic folder swap (see the module
    docstring). An existing ``out`` must be this user's and hold only those files, and is
    replaced only with ``force`` (an empty one always)."""
    store.check_out_dir(out)
    if out.is_dir():
        extra = sorted(p.name for p in out.iterdir() if p.name not in FILES)
        if extra:
            raise PolicyDenied(
                f"{out} holds other files than {', '.join(FILES)} ({extra[0]!r}...): choose an own folder"
            )
        force = force or not any(out.iterdir())
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [issued.cert, *issued.chain])
    key = issued.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    root = issued.root.public_bytes(serialization.Encoding.PEM)
    with atomic_output(out, force, is_dir=True) as tmp:
        try:
            write_new(tmp / "key.pem", key, 0o600)
            write_new(tmp / "cert.pem", chain, 0o644)
            write_new(tmp / "ca.pem", root, 0o644)
        except OSError as e:
            raise StorageError(f"cannot write the certificate folder {out}: {e.strerror}") from None
    del key


def read_chain(folder: Path) -> list[x509.Certificate]:
    store.check_out_dir(folder)
    try:
        data = read_limited(folder / "cert.pem", 1 << 20, StorageError, f"{folder / 'cert.pem'}", regular=True)
    except FileNotFoundError:
        raise StorageError(f"{folder} holds no cert.pem") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{folder / 'cert.pem'} holds no certificate") from None
    return certs


def renew(svc: KeyService, folder: Path, *, now: dt.datetime | None = None, ca: CA | None = None) -> Issued:
    """Renew the certificate in ``folder`` while it is valid: same identity, SANs and kind,
    a fresh key, the same lifetime (capped at ``MAX_TTL``); the folder is replaced whole."""
    ca = ca or load_ca()
    t = now or utcnow()
    try:
        certs = read_chain(folder)
        old = certs[0]
        try:
            identity = identity_of(certs, [ca.root], t, denylist.load(ca.folder), trust_domain=ca.trust_domain)
        except CertificateRevoked:
            raise
        except CertificateError as e:
            raise CertificateError(
                f"cannot renew {folder}: {e} (expired, or not issued by this CA: issue a new one)"
            ) from None
        san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
        lifetime = old.not_valid_after_utc - old.not_valid_before_utc - BACKDATE
        ttl = max(MIN_TTL, min(lifetime, MAX_TTL))
    except ModelsealError as e:
        audit(svc, "cert-renew", ca.trust_domain, type(e).__name__)
        raise
    issued = issue(svc, identity, dns=dns, ips=ips, ttl=ttl, now=now, ca=ca)
    write_dir(issued, folder, force=True)
    audit(svc, "cert-renew", ca.trust_domain, "ok", issued.serial)
    return issued


def revoke(svc: KeyService, serial: int, reason: str = "", *, ca: CA | None = None) -> bool:
    """Deny ``serial`` at once (idempotent: False if it was listed). Audited."""
    ca = ca or load_ca()
    hexed = denylist.serial_hex(serial)
    not_after = None
    for r in list_issued(ca):
        if str(r.get("serial")) == hexed:
            not_after = not_after_of(r) or None
    try:
        added = denylist.add(serial, reason, not_after, ca.folder)
    except ModelsealError as e:
        audit(svc, "cert-revoke", ca.trust_domain, type(e).__name__, hexed)
        raise
    audit(svc, "cert-revoke", ca.trust_domain, "ok", hexed)
    return added


__all__ = [
    "DEFAULT_TTL",
    "FILES",
    "MAX_TTL",
    "Issued",
    "issue",
    "list_issued",
    "read_chain",
    "renew",
    "revoke",
    "write_dir",
]
