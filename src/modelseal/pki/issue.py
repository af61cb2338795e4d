"""Leaf certificates: issue, renew, revoke, and the certificate folder they are written to.

A leaf is a fresh P-256 key made here and a CSR for it, signed by the issuing backend
(``backend.Issuer``: the local CA, ``LocalIssuer``, or OpenBao's PKI engine,
``transit_pki``; ``load_issuer`` picks the one ``ca.json`` names). The identity is the
leaf's only URI SAN (server certificates add DNS and IP SANs). The local CA writes a
random 159-bit serial, ``notBefore`` five minutes back for clock skew, serverAuth and
clientAuth for servers, clientAuth for the others. The lifetime is refused above the
issuer's maximum: ``[pki] max_ttl`` of config.toml, itself at most ``MAX_TTL`` (7 days).

The folder ``DIR`` holds ``cert.pem`` (leaf, then intermediate), ``key.pem`` (PKCS#8,
0600) and ``ca.pem`` (the root). It is written whole into a temporary sibling folder and
swapped in with one ``renameat2(RENAME_EXCHANGE)`` (``util.files.atomic_output``), so a
reader sees the old three files or the new three, never a mix; a crash is rolled back or
forward by the next access. Every issued certificate is recorded in ``issued.json``, a
renewal with the serial it was renewed from: ``revoke`` denies a serial and every
certificate renewed from it, transitively, and a renewal is refused while the certificate
or any of its ancestors is revoked (``check_lineage``; re-checked once the new one is
recorded, so a revocation running at the same time cannot miss it).
"""

from __future__ import annotations

import datetime as dt
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
from modelseal.pki.backend import (
    DEFAULT_TTL,
    MAX_TTL,
    MIN_TTL,
    Issuer,
    Settings,
    Signed,
    check_signed,
    check_ttl,
    csr_public_key,
    make_csr,
    sans_of,
    settings,
)
from modelseal.pki.backend import sans as make_sans
from modelseal.pki.ca import BACKDATE, CA, CA_FILE, CA_FORMAT, audit, load_ca, utcnow
from modelseal.pki.identity import Identity
from modelseal.pki.verify import identity_of
from modelseal.util.files import atomic_output, read_limited, write_new

ISSUED_FILE = "issued.json"
MAX_ISSUED = 20_000
FILES = ("cert.pem", "key.pem", "ca.pem")


@dataclass(frozen=True)
class Issued(Signed):
    """A signed leaf and its private key, as ``write_dir`` writes them."""

    key: ec.EllipticCurvePrivateKey


class LocalIssuer:
    """The local CA as an ``Issuer``: signs with the issuing key unsealed through ``svc``."""

    def __init__(self, svc: KeyService, ca: CA) -> None:
        self.svc = svc
        self.ca = ca

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    @property
    def folder(self) -> Path:
        return self.ca.folder

    @property
    def root(self) -> x509.Certificate:
        return self.ca.root

    def sign(
        self,
        identity: Identity,
        csr: x509.CertificateSigningRequest,
        sans: list[x509.GeneralName],
        ttl: dt.timedelta,
        now: dt.datetime,
    ) -> Signed:
        cert = _leaf(self.ca, self.ca.issuing_key(self.svc), identity, csr_public_key(csr), sans, now, ttl)
        return Signed(identity, cert, self.ca.chain, self.ca.root)

    def revoke_upstream(self, serial: int) -> None:
        return None  # the denylist is the local CA's revocation

    def audit(self, op: str, result: str, serial: str | None = None, actor: str | None = None) -> None:
        audit(self.svc, op, self.ca.trust_domain, result, serial, actor)


def load_issuer(svc: KeyService, folder: Path | None = None) -> Issuer:
    """The backend the CA at ``folder`` (default ``$MODELSEAL_HOME/ca``) was made with."""
    from modelseal.pki import transit_pki

    folder = folder or store.ca_dir()
    doc = store.read_json(folder, CA_FILE)
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt == transit_pki.CA_FORMAT:
        return transit_pki.load(svc, folder)
    if fmt not in (None, CA_FORMAT):
        raise CertificateError(f"{folder / CA_FILE} is not a modelseal CA file")
    return LocalIssuer(svc, load_ca(folder))


def _issuer(svc: KeyService, ca: CA | Issuer | None) -> Issuer:
    if ca is None:
        return load_issuer(svc)
    return LocalIssuer(svc, ca) if isinstance(ca, CA) else ca


def _leaf(
    ca: CA,
    signer: ec.EllipticCurvePrivateKey,
    identity: Identity,
    public: ec.EllipticCurvePublicKey,
    sans: list[x509.GeneralName],
    t: dt.datetime,
    ttl: dt.timedelta,
) -> x509.Certificate:
    not_after = t + ttl
    if not_after > ca.issuing.not_valid_after_utc:
        raise CertificateError(
            "the issuing CA expires before this certificate would: run 'modelseal ca rotate-intermediate'"
        )
    ekus = (
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if identity.kind == "server"
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    ski = ca.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
        .issuer_name(ca.issuing.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(signer, hashes.SHA256())
    )


def sign_csr(
    issuer: Issuer,
    identity: Identity,
    csr: x509.CertificateSigningRequest,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    ttl: dt.timedelta | None = None,
    now: dt.datetime | None = None,
    config: Settings | None = None,
    op: str = "cert-issue",
    actor: str | None = None,
    renewed_from: int | None = None,
) -> Signed:
    """Have ``issuer`` sign ``csr`` for ``identity`` (the CSR's key only: its names are not
    read), check the answer (``backend.check_signed``), record and audit it. A renewal names
    the serial it renews (``renewed_from``): recorded, and the new certificate is denied and
    refused if that serial or an ancestor was revoked meanwhile."""
    try:
        if identity.trust_domain != issuer.trust_domain:
            raise PolicyDenied(
                f"this CA issues for trust domain {issuer.trust_domain!r}, not {identity.trust_domain!r}"
            )
        cfg = config or settings()
        ttl = cfg.default_ttl if ttl is None else ttl
        check_ttl(ttl, cfg.max_ttl)
        names = make_sans(identity, dns, ips)
        csr_public_key(csr)
        t = now or utcnow()
        signed = issuer.sign(identity, csr, names, ttl, t)
        check_signed(signed, csr, names, ttl, t, validate_path=now is None)
        _record(issuer.folder, signed.cert, identity, time.time() if now is None else now.timestamp(), renewed_from)
        if renewed_from is not None:
            _recheck(issuer.folder, signed.cert, renewed_from)
    except ModelsealError as e:
        issuer.audit(op, type(e).__name__, None, actor)
        raise
    issuer.audit(op, "ok", signed.serial, actor)
    return signed


def issue(
    svc: KeyService,
    identity: Identity,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    ttl: dt.timedelta | None = None,
    now: dt.datetime | None = None,
    ca: CA | Issuer | None = None,
    config: Settings | None = None,
    renewed_from: int | None = None,
) -> Issued:
    """Issue a certificate and a fresh key for ``identity`` (of the CA's trust domain); the
    lifetime defaults to 24 h (or the configured maximum, if lower). Recorded and audited
    (``renewed_from``: see ``sign_csr``)."""
    issuer = _issuer(svc, ca)
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        csr = make_csr(key, make_sans(identity, dns, ips))
    except ModelsealError as e:
        issuer.audit("cert-issue", type(e).__name__)
        raise
    s = sign_csr(issuer, identity, csr, dns=dns, ips=ips, ttl=ttl, now=now, config=config, renewed_from=renewed_from)
    return Issued(s.identity, s.cert, s.chain, s.root, key)


def _record(folder: Path, cert: x509.Certificate, identity: Identity, t: float, parent: int | None) -> None:
    row: dict[str, object] = {
        "serial": denylist.serial_hex(cert.serial_number),
        "identity": identity.uri,
        "not_after": cert.not_valid_after_utc.timestamp(),
        "issued_at": t,
    }
    if parent is not None:
        row[denylist.PARENT] = denylist.serial_hex(parent)
    with denylist.locked(folder):  # several server workers renew at once
        rows = [r for r in issued_rows(folder) if not_after_of(r) + denylist.GRACE > t]
        store.write(folder, ISSUED_FILE, store.dump_json({"issued": [*rows, row][-MAX_ISSUED:]}))


def issued_rows(folder: Path) -> list[dict[str, object]]:
    """The records of the CA folder's ``issued.json`` (``CertificateError``: malformed)."""
    doc = store.read_json(folder, ISSUED_FILE) or {"issued": []}
    rows = doc.get("issued") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise CertificateError(f"the CA file {ISSUED_FILE} is malformed")
    return [r for r in rows if isinstance(r, dict)]


def check_lineage(folder: Path, serial: int) -> None:
    """Refuse (``CertificateRevoked``) a renewal of ``serial`` if it, or any certificate it
    was renewed from (by the records of the CA at ``folder``), is revoked."""
    denylist.check_lineage(issued_rows(folder), serial, folder)


def _recheck(folder: Path, cert: x509.Certificate, parent: int) -> None:
    # Read after the record is written; ``revoke_all`` reads the records after it writes the
    # denylist: one of the two sees the other, so no renewal slips past a revocation.
    try:
        check_lineage(folder, parent)
    except CertificateRevoked as e:
        denylist.add(cert.serial_number, f"{e} when it was renewed", cert.not_valid_after_utc.timestamp(), folder)
        raise


def not_after_of(row: dict[str, object]) -> float:
    value = row.get("not_after")
    return float(value) if isinstance(value, int | float) else 0.0


def list_issued(ca: CA | Issuer | None = None) -> list[dict[str, object]]:
    return issued_rows(store.ca_dir() if ca is None else ca.folder)


def write_dir(
    issued: Issued, out: Path, *, force: bool = False, anchors: Sequence[x509.Certificate] | None = None
) -> None:
    """Write ``out``/cert.pem, key.pem, ca.pem (``anchors``, default the issuer's root) as one
    atomic folder swap (see the module docstring). An existing ``out`` must be this user's
    and hold only those files, and is replaced only with ``force`` (an empty one always)."""
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
    root = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in anchors or [issued.root])
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


def renewal_terms(leaf: x509.Certificate, max_ttl: dt.timedelta) -> tuple[list[str], list[str], dt.timedelta]:
    """The DNS names, IP addresses and lifetime a renewal of ``leaf`` keeps: the old lifetime
    (notAfter - notBefore, less the local CA's back-dating), capped at the issuer's maximum (a
    lowered maximum applies at the next renewal) and never below ``MIN_TTL``. So a renewal
    never outlives, from its issue, the whole validity of the certificate it renews: a leaf
    valid for less than ``MIN_TTL`` in all is refused."""
    names = sans_of(leaf)
    dns = [n.value for n in names if isinstance(n, x509.DNSName)]
    ips = [str(n.value) for n in names if isinstance(n, x509.IPAddress)]
    span = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    if span < MIN_TTL:
        raise PolicyDenied(f"a certificate valid for less than {MIN_TTL} in all cannot renew itself: issue a new one")
    return dns, ips, max(MIN_TTL, min(span - BACKDATE, max_ttl, MAX_TTL))


def renew(
    svc: KeyService,
    folder: Path,
    *,
    now: dt.datetime | None = None,
    ca: CA | Issuer | None = None,
    config: Settings | None = None,
) -> Issued:
    """Renew the certificate in ``folder`` while it is valid: same identity, SANs and kind,
    a fresh key, the same lifetime (capped at the maximum); the folder is replaced whole."""
    issuer = _issuer(svc, ca)
    cfg = config or settings()
    t = now or utcnow()
    try:
        certs = read_chain(folder)
        try:
            identity = identity_of(
                certs, [issuer.root], t, denylist.load(issuer.folder), trust_domain=issuer.trust_domain
            )
        except CertificateRevoked:
            raise
        except CertificateError as e:
            raise CertificateError(
                f"cannot renew {folder}: {e} (expired, or not issued by this CA: issue a new one)"
            ) from None
        check_lineage(issuer.folder, certs[0].serial_number)
        dns, ips, ttl = renewal_terms(certs[0], cfg.max_ttl)
    except ModelsealError as e:
        issuer.audit("cert-renew", type(e).__name__)
        raise
    parent = certs[0].serial_number
    issued = issue(svc, identity, dns=dns, ips=ips, ttl=ttl, now=now, ca=issuer, config=cfg, renewed_from=parent)
    write_dir(issued, folder, force=True)
    issuer.audit("cert-renew", "ok", issued.serial)
    return issued


def revoke(svc: KeyService, serial: int, reason: str = "", *, ca: CA | Issuer | None = None) -> bool:
    """``revoke_all``; True if ``serial`` itself was not listed yet."""
    return revoke_all(svc, serial, reason, ca=ca)[0]


def revoke_all(
    svc: KeyService, serial: int, reason: str = "", *, ca: CA | Issuer | None = None
) -> tuple[bool, list[str]]:
    """Deny ``serial`` and every certificate renewed from it, transitively, at once (the
    entries of the renewals say which serial they follow), then revoke each at the backend
    (OpenBao's ``pki/revoke``; nothing for the local CA). Idempotent. Audited per serial.
    Returns whether ``serial`` was newly listed and the renewals newly listed (hex)."""
    issuer = _issuer(svc, ca)
    hexed = denylist.serial_hex(serial)
    try:
        listed = denylist.deny_lineage(serial, reason, lambda: issued_rows(issuer.folder), issuer.folder)
        for s in listed:
            issuer.revoke_upstream(s)
    except ModelsealError as e:
        issuer.audit("cert-revoke", type(e).__name__, hexed)
        raise
    for s in listed:
        issuer.audit("cert-revoke", "ok", denylist.serial_hex(s))
    if serial not in listed:
        issuer.audit("cert-revoke", "ok", hexed)
    return serial in listed, [denylist.serial_hex(s) for s in listed if s != serial]


__all__ = [
    "DEFAULT_TTL",
    "FILES",
    "MAX_TTL",
    "Issued",
    "LocalIssuer",
    "check_lineage",
    "issue",
    "issued_rows",
    "list_issued",
    "load_issuer",
    "read_chain",
    "renew",
    "renewal_terms",
    "revoke",
    "revoke_all",
    "sign_csr",
    "write_dir",
]
