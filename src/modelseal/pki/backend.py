"""The issuing backend seam of the CA: the ``Issuer`` protocol, the ``[pki]`` settings of
config.toml, and the checks every backend's answer passes.

A backend signs a certificate signing request for an identity; it never chooses the
identity, the SANs or the lifetime, and it never sees a leaf's private key (the CSR is
made here, beside the key). Two backends: the local CA (``issue.LocalIssuer``, the sealed
keys under ``$MODELSEAL_HOME/ca/``) and OpenBao's PKI secrets engine (``transit_pki``),
chosen by the ``backend`` that ``ca init`` recorded in ``ca.json``. Whatever a backend
returns is checked here before anyone uses it (``check_signed``): the key is the CSR's,
the SANs are exactly the requested ones, the lifetime is within the maximum, and the
chain verifies to the anchors this host recorded at ``ca init``.

``[pki]`` in ``$MODELSEAL_HOME/config.toml`` (all optional)::

    [pki]
    max_ttl = "3d"               # the issuer's maximum leaf lifetime; at most 7d (MAX_TTL)
    backend = "transit-pki"      # what 'ca init' uses without --backend ("local" by default)
    transit_mount = "pki_int"    # the OpenBao PKI mount and role of 'ca init --backend transit-pki'
    transit_role = "modelseal"
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from modelseal.errors import CertificateError, ModelsealError, PolicyDenied
from modelseal.pki.denylist import serial_hex
from modelseal.pki.identity import Identity
from modelseal.pki.verify import identity_of
from modelseal.util.bounded import toml_loads
from modelseal.util.files import read_limited
from modelseal.util.home import check_private, modelseal_home

DEFAULT_TTL = dt.timedelta(hours=24)
MAX_TTL = dt.timedelta(days=7)  # the ceiling: [pki] max_ttl may lower it, never raise it
MIN_TTL = dt.timedelta(minutes=5)
MAX_SANS = 32
BACKENDS = ("local", "transit-pki")
SKEW = dt.timedelta(minutes=5)  # a backend's notBefore may lie this far back


class PkiConfigError(ModelsealError):
    """The ``[pki]`` table of config.toml is invalid."""

    exit_code = 2


@dataclass(frozen=True)
class Signed:
    """A certificate a backend signed: the leaf, the intermediates it is served with, the anchor."""

    identity: Identity
    cert: x509.Certificate
    chain: list[x509.Certificate]
    root: x509.Certificate

    @property
    def serial(self) -> str:
        return serial_hex(self.cert.serial_number)


class Issuer(Protocol):
    """One issuing backend. ``sign`` takes what is already decided (identity, SANs, TTL)."""

    @property
    def trust_domain(self) -> str: ...

    @property
    def folder(self) -> Path: ...  # the CA folder: ca.json, issued.json, revoked.json

    @property
    def root(self) -> x509.Certificate: ...  # the trust anchor recorded at ca init

    def sign(
        self,
        identity: Identity,
        csr: x509.CertificateSigningRequest,
        sans: list[x509.GeneralName],
        ttl: dt.timedelta,
        now: dt.datetime,
    ) -> Signed: ...

    def revoke_upstream(self, serial: int) -> None: ...  # the backend's own revocation; the denylist is the caller's

    def audit(self, op: str, result: str, serial: str | None = None, actor: str | None = None) -> None: ...


@dataclass(frozen=True)
class Settings:
    max_ttl: dt.timedelta = MAX_TTL
    backend: str = "local"
    transit_mount: str | None = None
    transit_role: str | None = None
    transit_server_role: str | None = None
    transit_root_mount: str | None = None

    @property
    def default_ttl(self) -> dt.timedelta:
        return min(DEFAULT_TTL, self.max_ttl)


_DURATION = re.compile(r"([1-9][0-9]{0,6})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MOUNT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(?:/[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}){0,3}")


def parse_duration(text: str, where: str) -> dt.timedelta:
    m = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise PkiConfigError(f"config: {where} takes a duration like 30m, 12h or 3d")
    return dt.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def check_mount(value: Any, where: str) -> str:
    """An OpenBao mount or role name: segments of ``[A-Za-z0-9_.-]``, never ``.``/``..``."""
    if not isinstance(value, str) or not _MOUNT.fullmatch(value) or any(s in (".", "..") for s in value.split("/")):
        raise PkiConfigError(f"config: {where} must be an OpenBao mount or role name of [A-Za-z0-9_.-]")
    return value


def parse_settings(table: Any) -> Settings:
    if table is None:
        return Settings()
    if not isinstance(table, dict):
        raise PkiConfigError("config: [pki] must be a table")
    unknown = sorted(set(table) - set(Settings.__dataclass_fields__))
    if unknown:
        raise PkiConfigError(f"config: [pki] has no setting {unknown[0][:40]!r}")
    max_ttl = MAX_TTL
    if "max_ttl" in table:
        max_ttl = parse_duration(table["max_ttl"], "[pki] max_ttl")
        if max_ttl > MAX_TTL or max_ttl < MIN_TTL:
            raise PkiConfigError(f"config: [pki] max_ttl must lie from {shown(MIN_TTL)} to {shown(MAX_TTL)}")
    backend = table.get("backend", "local")
    if backend not in BACKENDS:
        raise PkiConfigError(f"config: [pki] backend must be one of {', '.join(BACKENDS)}")
    names = {
        k: check_mount(table[k], f"[pki] {k}")
        for k in ("transit_mount", "transit_role", "transit_server_role", "transit_root_mount")
        if k in table
    }
    return Settings(max_ttl, backend, **names)


def settings(home: Path | None = None) -> Settings:
    """The ``[pki]`` table of ``$MODELSEAL_HOME/config.toml`` (defaults without one). The
    file must be its owner's only, as ``keys.config`` requires."""
    path = (home or modelseal_home()) / "config.toml"
    check_private(path, "the configuration", PkiConfigError)
    try:
        raw = read_limited(path, 1 << 20, PkiConfigError, f"the configuration {path}", regular=True)
    except FileNotFoundError:
        return Settings()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PkiConfigError(f"config: {path} is not UTF-8") from None
    doc = toml_loads(
        text,
        max_depth=8,
        max_key_parts=8,
        max_values=100_000,
        error=lambda why: PkiConfigError(f"config: {path} is not valid TOML ({why})"),
    )
    return parse_settings(doc.get("pki"))


def shown(d: dt.timedelta) -> str:
    seconds = int(d.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def check_ttl(ttl: dt.timedelta, max_ttl: dt.timedelta) -> None:
    """Refuse a lifetime above the issuer's maximum (never silently capped) or below MIN_TTL."""
    limit = min(max_ttl, MAX_TTL)
    if ttl > limit:
        raise PolicyDenied(f"a certificate lifetime of {shown(ttl)} is above this CA's maximum of {shown(limit)}")
    if ttl < MIN_TTL:
        raise PolicyDenied(f"a certificate lifetime below {shown(MIN_TTL)} is refused")


def sans(identity: Identity, dns: Sequence[str], ips: Sequence[str]) -> list[x509.GeneralName]:
    """The identity as the one URI SAN, then the DNS and IP names (servers only)."""
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


def sans_of(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def make_csr(key: ec.EllipticCurvePrivateKey, names: list[x509.GeneralName]) -> x509.CertificateSigningRequest:
    """A CSR for ``key`` naming ``names``: proof of possession; the issuer decides what is signed."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )


def csr_public_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    """The CSR's key, once its self-signature proves the requester holds it; P-256 only."""
    try:
        public = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        public = None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise CertificateError("the certificate signing request must be for an ECDSA P-256 key")
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise CertificateError("the certificate signing request's signature does not verify")
    return public


def _key(names: list[x509.GeneralName]) -> list[tuple[str, str]]:
    return sorted((type(n).__name__, str(n.value)) for n in names)


def check_signed(
    signed: Signed,
    csr: x509.CertificateSigningRequest,
    names: list[x509.GeneralName],
    ttl: dt.timedelta,
    now: dt.datetime,
    *,
    validate_path: bool = True,
) -> None:
    """Refuse a backend's certificate unless it is exactly what was asked for. The path is
    validated to the recorded anchor at ``now``; ``validate_path=False`` is for a leaf
    back-dated on purpose (``issue(now=...)``), whose CA may not have been valid then."""
    cert = signed.cert
    if cert.public_key() != csr.public_key():
        raise CertificateError("the issuer returned a certificate for another key")
    if _key(sans_of(cert)) != _key(names):
        raise CertificateError("the issuer returned a certificate with other names than requested (check its role)")
    if cert.not_valid_after_utc - max(cert.not_valid_before_utc, now - SKEW) > ttl + SKEW:
        raise CertificateError("the issuer returned a certificate that outlives the requested lifetime")
    if not isinstance(cert.public_key(), ec.EllipticCurvePublicKey):
        raise CertificateError("the issuer returned a certificate that is not for an ECDSA key")
    if not validate_path:
        return
    got = identity_of([cert, *signed.chain], [signed.root], now, trust_domain=signed.identity.trust_domain)
    if got != signed.identity:
        raise CertificateError(f"the issuer returned a certificate for {got}, not {signed.identity}")


__all__ = [
    "BACKENDS",
    "DEFAULT_TTL",
    "MAX_TTL",
    "MIN_TTL",
    "Issuer",
    "PkiConfigError",
    "Settings",
    "Signed",
    "check_mount",
    "check_signed",
    "check_ttl",
    "csr_public_key",
    "make_csr",
    "parse_settings",
    "sans",
    "sans_of",
    "settings",
    "shown",
]
