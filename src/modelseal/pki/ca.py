"""The internal CA: ``init``, ``load``, the intermediate roll-over, and the CA audit events.

An ECDSA P-256 root (10 years, pathLen 1) signs an online issuing intermediate (1 year,
pathLen 0). They carry no URI name constraints: ``cryptography``'s verifier refuses every
chain with one ("unsupported name constraint"), so the trust domain is enforced after
validation instead (``verify.identity_of(..., trust_domain=)``). Beside the live
intermediate key the CA keeps a standby key, the *next* one: its pin is what clients
hold as their backup pin (``pins``), and ``rotate_intermediate`` promotes it, so clients
that pin old and backup accept the new intermediate without an update.

The CA's files carry generation numbers and ``ca.json`` names the live ones:
a roll-over (and ``init --force``) writes the new generation's files first and replaces
``ca.json`` last, so a crash leaves either the old CA or the new one. The private keys are
sealed under the CA's KEK (``store``); issuing certificates is ``pki.issue``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from modelseal.audit.events import AuditEvent
from modelseal.errors import CertificateError, DestinationExists, ModelsealError
from modelseal.keys.service import KeyService
from modelseal.pki import store
from modelseal.pki.identity import check_trust_domain

ROOT_LIFETIME = dt.timedelta(days=3652)
ISSUING_LIFETIME = dt.timedelta(days=365)
BACKDATE = dt.timedelta(minutes=5)  # clock skew between issuer and verifiers
DEFAULT_TRUST_DOMAIN = "modelseal.internal"
CA_FILE = "ca.json"
CA_FORMAT = "modelseal-ca-v1"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def audit_event(op: str, trust_domain: str, result: str, serial: str | None, actor: str | None) -> AuditEvent:
    """One audit event of a CA operation: key ``ca:DOMAIN``, the certificate serial (hex) in
    the artifact field, and as actor the identity that asked over mTLS, if one did."""
    if actor is None:
        return AuditEvent(op, f"ca:{trust_domain}", result, None, serial)
    return AuditEvent(op, f"ca:{trust_domain}", result, None, serial, actor)


def audit(
    svc: KeyService, op: str, trust_domain: str, result: str, artifact: str | None = None, actor: str | None = None
) -> None:
    """One audit event of a CA operation (``audit_event``), in the KeyService's sink."""
    svc.sink.emit(audit_event(op, trust_domain, result, artifact, actor))


@dataclass(frozen=True)
class CA:
    folder: Path
    trust_domain: str
    kek: str
    generation: int
    root_generation: int
    root: x509.Certificate
    issuing: x509.Certificate
    next_public: ec.EllipticCurvePublicKey  # the standby intermediate key: the backup pin

    @property
    def chain(self) -> list[x509.Certificate]:
        """The chain a leaf is served with: the intermediate (the root is the anchor)."""
        return [self.issuing]

    def issuing_key(self, svc: KeyService) -> ec.EllipticCurvePrivateKey:
        data = store.read(self.folder, f"issuing-{self.generation}.key.json")
        if data is None:
            raise CertificateError("the CA's issuing key is missing")
        return store.unseal_key(svc, data, "issuing", self.trust_domain)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "modelseal"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _ca_cert(
    subject: x509.Name,
    public: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    signer: ec.EllipticCurvePrivateKey,
    trust_domain: str,
    path_length: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    issuer_ski = (
        issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        if issuer is not None
        else x509.SubjectKeyIdentifier.from_public_key(public)
    )
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
    )
    return b.sign(signer, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _new_intermediate(
    svc: KeyService,
    folder: Path,
    kek: str,
    trust_domain: str,
    generation: int,
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    issuing_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
) -> ec.EllipticCurvePrivateKey:
    """Write generation ``generation``'s intermediate (for ``issuing_key``) and a new standby
    key; returns the standby key. ``ca.json`` is not touched: the caller commits."""
    not_after = min(now + ISSUING_LIFETIME, root.not_valid_after_utc)
    cert = _ca_cert(
        _name(f"modelseal issuing CA {generation} ({trust_domain})"),
        issuing_key.public_key(),
        root,
        root_key,
        trust_domain,
        0,
        now - BACKDATE,
        not_after,
    )
    nxt = ec.generate_private_key(ec.SECP256R1())
    store.write(
        folder, f"issuing-{generation}.key.json", store.seal_key(svc, kek, "issuing", trust_domain, issuing_key)
    )
    store.write(folder, f"next-{generation}.key.json", store.seal_key(svc, kek, "issuing", trust_domain, nxt))
    store.write(folder, f"issuing-{generation}.pem", _pem(cert))
    return nxt


def _commit(
    folder: Path, trust_domain: str, kek: str, generation: int, root_gen: int, next_public: ec.EllipticCurvePublicKey
) -> None:
    spki = next_public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    doc = {
        "format": CA_FORMAT,
        "trust_domain": trust_domain,
        "kek": kek,
        "generation": generation,
        "root_generation": root_gen,
        "next_public": spki.decode(),
    }
    store.write(folder, CA_FILE, store.dump_json(doc))
    for p in folder.iterdir():  # earlier generations' intermediate files
        stem = p.name.split(".", 1)[0]
        kind, _, gen = stem.rpartition("-")
        live = root_gen if kind == "root" else generation
        if kind in ("root", "issuing", "next") and gen.isdigit() and int(gen) != live:
            p.unlink(missing_ok=True)


def init_ca(
    svc: KeyService,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    kek: str = store.DEFAULT_KEK,
    *,
    force: bool = False,
    now: dt.datetime | None = None,
    folder: Path | None = None,
) -> CA:
    """Create the CA (refused over an existing one without ``force``)."""
    check_trust_domain(trust_domain)
    folder = store.ensure_dir(folder or store.ca_dir())
    try:
        old = store.read_json(folder, CA_FILE)
        if old is not None and not force:
            raise DestinationExists(
                f"a CA exists at {folder} (use --force to replace it: every certificate it issued stops verifying)"
            )
        t = now or utcnow()
        kek_uri = store.ensure_kek(svc, kek)
        generation = (
            int(old["generation"]) + 1 if isinstance(old, dict) and isinstance(old.get("generation"), int) else 1
        )
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = _ca_cert(
            _name(f"modelseal root CA ({trust_domain})"),
            root_key.public_key(),
            None,
            root_key,
            trust_domain,
            1,
            t - BACKDATE,
            t + ROOT_LIFETIME,
        )
        issuing_key = ec.generate_private_key(ec.SECP256R1())
        store.write(folder, f"root-{generation}.key.json", store.seal_key(svc, kek_uri, "root", trust_domain, root_key))
        store.write(folder, f"root-{generation}.pem", _pem(root))
        nxt = _new_intermediate(svc, folder, kek_uri, trust_domain, generation, root, root_key, issuing_key, t)
        _commit(folder, trust_domain, kek_uri, generation, generation, nxt.public_key())
    except ModelsealError as e:
        audit(svc, "ca-init", trust_domain, type(e).__name__)
        raise
    audit(svc, "ca-init", trust_domain, "ok")
    return load_ca(folder)


def load_ca(folder: Path | None = None) -> CA:
    """The CA's public part (certificates, the standby public key); no private key is read."""
    folder = folder or store.ca_dir()
    doc = store.read_json(folder, CA_FILE)
    if doc is None:
        raise CertificateError(f"no CA at {folder}: run 'modelseal ca init' first")
    try:
        if doc["format"] == "modelseal-ca-transit-pki-v1":
            raise CertificateError(f"the CA at {folder} is OpenBao's (transit-pki): it holds no local CA keys")
        if doc["format"] != CA_FORMAT:
            raise CertificateError(f"{folder / CA_FILE} is not a modelseal CA file")
        trust_domain = check_trust_domain(str(doc["trust_domain"]))
        generation = int(doc["generation"])
        root_gen = int(doc["root_generation"])
        kek = str(doc["kek"])
        nxt = serialization.load_pem_public_key(str(doc["next_public"]).encode())
    except (KeyError, TypeError, ValueError):
        raise CertificateError(f"{folder / CA_FILE} is malformed") from None
    if not isinstance(nxt, ec.EllipticCurvePublicKey):
        raise CertificateError(f"{folder / CA_FILE} is malformed")
    root = _load_cert(folder, f"root-{root_gen}.pem")
    issuing = _load_cert(folder, f"issuing-{generation}.pem")
    return CA(folder, trust_domain, kek, generation, root_gen, root, issuing, nxt)


def _load_cert(folder: Path, name: str) -> x509.Certificate:
    data = store.read(folder, name)
    if data is None:
        raise CertificateError(f"the CA file {name} is missing")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError(f"the CA file {name} is not a certificate") from None


def rotate_intermediate(svc: KeyService, ca: CA | None = None, *, now: dt.datetime | None = None) -> CA:
    """Roll the intermediate over to the standby key (the clients' backup pin) and make a
    new standby key. Needs the root key (unsealed through the KEK). Leaves signed by the
    old intermediate stay valid until they expire: they chain to the same root."""
    ca = ca or load_ca()
    t = now or utcnow()
    try:
        root_data = store.read(ca.folder, f"root-{ca.root_generation}.key.json")
        next_data = store.read(ca.folder, f"next-{ca.generation}.key.json")
        if root_data is None or next_data is None:
            raise CertificateError("the CA's root or standby key is missing")
        root_key = store.unseal_key(svc, root_data, "root", ca.trust_domain)
        promoted = store.unseal_key(svc, next_data, "issuing", ca.trust_domain)
        generation = ca.generation + 1
        nxt = _new_intermediate(svc, ca.folder, ca.kek, ca.trust_domain, generation, ca.root, root_key, promoted, t)
        _commit(ca.folder, ca.trust_domain, ca.kek, generation, ca.root_generation, nxt.public_key())
    except ModelsealError as e:
        audit(svc, "ca-rotate-intermediate", ca.trust_domain, type(e).__name__)
        raise
    audit(svc, "ca-rotate-intermediate", ca.trust_domain, "ok")
    return load_ca(ca.folder)


__all__ = [
    "BACKDATE",
    "CA",
    "CA_FILE",
    "CA_FORMAT",
    "DEFAULT_TRUST_DOMAIN",
    "audit",
    "audit_event",
    "init_ca",
    "load_ca",
    "rotate_intermediate",
    "utcnow",
]
