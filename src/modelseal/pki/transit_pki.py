"""The ``transit-pki`` backend: leaves signed by OpenBao's PKI secrets engine.

``ca init --backend transit-pki`` records, in ``$MODELSEAL_HOME/ca/ca.json``, the PKI
mount and role(s), the trust anchor (the self-signed root at the top of the mount's
default issuer chain, checked to be its issuer) and the backup pin. The connection is
the Transit provider's (``keys.providers.transit_client``): ``BAO_ADDR``/``VAULT_ADDR``,
TLS verified (plain http to loopback only), no proxy; a token from ``BAO_TOKEN`` /
``VAULT_TOKEN``, from the file ``BAO_TOKEN_FILE`` (re-read after a 403, so an agent can
rotate it), or AppRole. Never from argv.

Issue and renew send a CSR to ``MOUNT/sign/ROLE`` (servers may use a ``server_role``):
the leaf key is made on the client and never reaches OpenBao. The request names the
identity (``uri_sans``), DNS and IP SANs and the TTL; the CSR's own names are ignored by
the role (``use_csr_sans=false``, checked at init) and the answer is checked against the
request and the recorded anchor (``backend.check_signed``), so neither a lax role nor a
swapped issuer passes unnoticed. Revocation is ``MOUNT/revoke`` after the local denylist,
which is what the server enforces at once.

The backup pin is a second P-256 key generated inside OpenBao (``MOUNT/keys/generate/
internal``); its public key, hence the pin, is read from a CSR made with it
(``intermediate/generate/existing``). ``ca rotate-intermediate`` has the root mount sign a
new intermediate for exactly that key, imports it and makes it the default issuer, so
clients holding the old backup pin accept it; then a new backup key is made. An operator
whose root is offline gives ``--backup-pin`` instead and rolls over by hand (docs/pki.md).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelseal.errors import CertificateError, DestinationExists, KeyNotFound, ModelsealError
from modelseal.keys.providers.transit_client import TransitClient
from modelseal.keys.service import KeyService
from modelseal.pki import store
from modelseal.pki.backend import Signed, check_mount
from modelseal.pki.ca import audit_event
from modelseal.pki.identity import Identity, check_trust_domain
from modelseal.pki.pins import parse_pin, pin_of, pin_of_key
from modelseal.util.files import read_limited

CA_FORMAT = "modelseal-ca-transit-pki-v1"
CA_FILE = "ca.json"
INTERMEDIATE_TTL = "8760h"
MAX_TOKEN_FILE = 8192


class PkiClient(TransitClient):
    """The Transit connection (settings, retries, re-login), a token file, PKI error wording."""

    @staticmethod
    def _approle_login(client: Any) -> None:
        path = os.environ.get("BAO_TOKEN_FILE") or os.environ.get("VAULT_TOKEN_FILE")
        if not path:
            TransitClient._approle_login(client)
            return
        try:
            token = read_limited(Path(path), MAX_TOKEN_FILE, CertificateError, "the token file", regular=True)
        except FileNotFoundError:
            raise CertificateError("transit-pki: the token file BAO_TOKEN_FILE names does not exist") from None
        client.token = token.decode("utf-8", "replace").strip()
        if not client.token:
            raise CertificateError("transit-pki: the token file BAO_TOKEN_FILE names is empty")

    @staticmethod
    def _classify(message: str, what: str) -> Exception:
        # OpenBao's PKI messages name the refused SAN or TTL, never a secret; kept to one line.
        reason = " ".join(message.split())[:240] or "no reason given"
        return CertificateError(f"transit-pki: OpenBao refused {what}: {reason}")

    def pki(self, what: str, fn: Callable[[Any], Any]) -> dict[str, Any]:
        try:
            answer = self._call(what, fn)
        except KeyNotFound:
            raise CertificateError(f"transit-pki: no such PKI mount, role, issuer or key for {what}") from None
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, dict):
            raise CertificateError(f"transit-pki: OpenBao gave no data for {what}")
        return data

    def write(self, path: str, data: dict[str, Any]) -> dict[str, Any]:
        return self.pki(path, lambda c: c.write_data(path, data=data))

    def read(self, path: str) -> dict[str, Any]:
        return self.pki(path, lambda c: c.read(path))


def _certs(pems: Any, what: str) -> list[x509.Certificate]:
    if isinstance(pems, str):
        pems = [pems]
    if not isinstance(pems, list) or not all(isinstance(p, str) for p in pems):
        raise CertificateError(f"transit-pki: OpenBao's {what} holds no certificates")
    try:
        return [c for p in pems for c in x509.load_pem_x509_certificates(p.encode())]
    except ValueError:
        raise CertificateError(f"transit-pki: OpenBao's {what} is not PEM certificates") from None


def _p256(cert: x509.Certificate, what: str) -> None:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CertificateError(f"transit-pki: the {what} is not an ECDSA P-256 key; modelseal requires P-256")


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def bao_serial(serial: int) -> str:
    """OpenBao's spelling of a serial: lowercase hex bytes joined by colons."""
    h = f"{serial:x}"
    h = h if len(h) % 2 == 0 else "0" + h
    return ":".join(h[i : i + 2] for i in range(0, len(h), 2))


@dataclass
class TransitPKI:
    """The ``Issuer`` of a ``transit-pki`` CA (see the module docstring)."""

    svc: KeyService
    folder: Path
    trust_domain: str
    mount: str
    role: str
    server_role: str
    root_mount: str | None
    root: x509.Certificate
    issuing: x509.Certificate
    backup_pin: str
    backup_key: str | None
    client: PkiClient

    def sign(
        self,
        identity: Identity,
        csr: x509.CertificateSigningRequest,
        sans: list[x509.GeneralName],
        ttl: dt.timedelta,
        now: dt.datetime,
    ) -> Signed:
        role = self.server_role if identity.kind == "server" else self.role
        data = {
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "uri_sans": identity.uri,
            "alt_names": ",".join(str(n.value) for n in sans if isinstance(n, x509.DNSName)),
            "ip_sans": ",".join(str(n.value) for n in sans if isinstance(n, x509.IPAddress)),
            "exclude_cn_from_sans": True,
            "ttl": f"{int(ttl.total_seconds())}s",
            "format": "pem",
        }
        # Retried on a lost connection: a second signature would be for the same CSR, whose
        # key only this caller holds, so a duplicate is never usable by anyone else.
        answer = self.client.write(f"{self.mount}/sign/{role}", data)
        leaf = _certs(answer.get("certificate"), "signed certificate")[0]
        chain = [c for c in _certs(answer.get("ca_chain") or answer.get("issuing_ca"), "CA chain") if c != self.root]
        return Signed(identity, leaf, [c for c in chain if c.subject != c.issuer], self.root)

    def revoke_upstream(self, serial: int) -> None:
        try:
            self.client.write(f"{self.mount}/revoke", {"serial_number": bao_serial(serial)})
        except ModelsealError as e:
            raise type(e)(f"the serial is on the local denylist (the server refuses it now), but {e}") from None

    def audit(self, op: str, result: str, serial: str | None = None, actor: str | None = None) -> None:
        self.svc.sink.emit(audit_event(op, self.trust_domain, result, serial, actor))

    def live_issuing(self) -> x509.Certificate:
        """The mount's default issuer now (it signs new leaves)."""
        return _certs(self.client.read(f"{self.mount}/issuer/default/json").get("certificate"), "issuer")[0]

    def pins(self) -> dict[str, str]:
        return {"live": pin_of(self.live_issuing()), "backup": self.backup_pin, "root": pin_of(self.root)}


def _backup_key(client: PkiClient, mount: str, trust_domain: str) -> tuple[str, str]:
    """A new P-256 key inside OpenBao and its pin (from a CSR made with it): (key id, pin)."""
    made = client.write(
        f"{mount}/keys/generate/internal",
        {"key_type": "ec", "key_bits": 256, "key_name": f"modelseal-backup-{int(time.time())}-{secrets.token_hex(4)}"},
    )
    key_id = str(made.get("key_id", ""))
    csr_pem = client.write(
        f"{mount}/intermediate/generate/existing",
        {"key_ref": key_id, "common_name": f"modelseal issuing CA ({trust_domain})"},
    ).get("csr")
    try:
        csr = x509.load_pem_x509_csr(str(csr_pem).encode())
    except ValueError:
        raise CertificateError("transit-pki: OpenBao's CSR for the backup key is not a CSR") from None
    public = csr.public_key()
    if not key_id or not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise CertificateError("transit-pki: OpenBao made no P-256 backup key")
    return key_id, pin_of_key(public)


def _check_role(client: PkiClient, mount: str, role: str) -> None:
    r = client.read(f"{mount}/roles/{role}")
    if r.get("use_csr_sans") or r.get("use_csr_common_name"):
        raise CertificateError(
            f"transit-pki: role {mount}/{role} takes names from the CSR:"
            " set use_csr_sans=false and use_csr_common_name=false"
        )
    if r.get("no_store"):
        raise CertificateError(
            f"transit-pki: role {mount}/{role} has no_store=true: revocation needs stored certificates"
        )
    if r.get("require_cn", True):
        raise CertificateError(f"transit-pki: role {mount}/{role} needs require_cn=false (the identity is the URI SAN)")


def _anchor(client: PkiClient, mount: str, root_mount: str | None) -> tuple[x509.Certificate, x509.Certificate]:
    """The mount's default issuer and the self-signed root it chains to."""
    info = client.read(f"{mount}/issuer/default/json")
    issuing = _certs(info.get("certificate"), "issuer")[0]
    chain = _certs(info.get("ca_chain"), "CA chain")
    if root_mount is not None:
        chain += _certs(client.read(f"{root_mount}/issuer/default/json").get("certificate"), "root issuer")
    roots = [c for c in chain if c.subject == c.issuer and c != issuing]
    if not roots:
        raise CertificateError(
            f"transit-pki: {mount}'s issuer chain holds no root: import the intermediate with its root"
            " (intermediate/set-signed with the full chain), or give --root-mount"
        )
    root = roots[-1]
    try:
        issuing.verify_directly_issued_by(root)
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(f"transit-pki: {mount}'s issuer is not signed by the root in its chain") from None
    _p256(issuing, "issuing CA")
    _p256(root, "root CA")
    return issuing, root


def _write(ca: TransitPKI) -> None:
    doc = {
        "format": CA_FORMAT,
        "backend": "transit-pki",
        "trust_domain": ca.trust_domain,
        "mount": ca.mount,
        "role": ca.role,
        "server_role": ca.server_role,
        "root_mount": ca.root_mount,
        "root": _pem(ca.root),
        "issuing": _pem(ca.issuing),
        "backup_pin": ca.backup_pin,
        "backup_key": ca.backup_key,
    }
    store.write(ca.folder, CA_FILE, store.dump_json(doc))


def init(
    svc: KeyService,
    trust_domain: str,
    mount: str,
    role: str,
    *,
    server_role: str | None = None,
    root_mount: str | None = None,
    backup_pin: str | None = None,
    force: bool = False,
    folder: Path | None = None,
    client: PkiClient | None = None,
) -> TransitPKI:
    """Record an OpenBao PKI mount as this host's CA (refused over an existing CA without ``force``)."""
    check_trust_domain(trust_domain)
    mount, role = check_mount(mount, "--mount"), check_mount(role, "--role")
    server_role = check_mount(server_role or role, "--server-role")
    root_mount = None if root_mount is None else check_mount(root_mount, "--root-mount")
    folder = store.ensure_dir(folder or store.ca_dir())
    client = client or PkiClient()
    sink = svc.sink
    try:
        if store.read_json(folder, CA_FILE) is not None and not force:
            raise DestinationExists(
                f"a CA exists at {folder} (use --force to replace it: every certificate it issued stops verifying)"
            )
        for r in dict.fromkeys((role, server_role)):
            _check_role(client, mount, r)
        issuing, root = _anchor(client, mount, root_mount)
        key_id: str | None = None
        if backup_pin is not None:
            parse_pin(backup_pin)
            pin = backup_pin.strip().removeprefix("sha256/")
        else:
            key_id, pin = _backup_key(client, mount, trust_domain)
        if pin in (pin_of(issuing), pin_of(root)):
            raise CertificateError("transit-pki: the backup pin must be of a key outside the live chain")
        ca = TransitPKI(
            svc, folder, trust_domain, mount, role, server_role, root_mount, root, issuing, pin, key_id, client
        )
        _write(ca)
    except ModelsealError as e:
        sink.emit(audit_event("ca-init", trust_domain, type(e).__name__, None, None))
        raise
    ca.audit("ca-init", "ok")
    return ca


def load(svc: KeyService, folder: Path | None = None, client: PkiClient | None = None) -> TransitPKI:
    folder = folder or store.ca_dir()
    doc = store.read_json(folder, CA_FILE)
    try:
        if not isinstance(doc, dict) or doc["format"] != CA_FORMAT:
            raise CertificateError(f"{folder / CA_FILE} is not a transit-pki CA file")
        root_mount = doc.get("root_mount")
        ca = TransitPKI(
            svc,
            folder,
            check_trust_domain(str(doc["trust_domain"])),
            check_mount(doc["mount"], "mount"),
            check_mount(doc["role"], "role"),
            check_mount(doc["server_role"], "server_role"),
            None if root_mount is None else check_mount(root_mount, "root_mount"),
            x509.load_pem_x509_certificate(str(doc["root"]).encode()),
            x509.load_pem_x509_certificate(str(doc["issuing"]).encode()),
            str(doc["backup_pin"]),
            None if doc.get("backup_key") is None else str(doc["backup_key"]),
            client or PkiClient(),
        )
        parse_pin(ca.backup_pin)
    except (KeyError, TypeError, ValueError, ModelsealError):
        raise CertificateError(f"{folder / CA_FILE} is malformed") from None
    return ca


def rotate_intermediate(ca: TransitPKI) -> TransitPKI:
    """Roll the mount over to the backup key: the root mount signs an intermediate for it,
    it is imported and made the default issuer; a new backup key is made (module docstring)."""
    try:
        if ca.root_mount is None or ca.backup_key is None:
            raise CertificateError(
                "transit-pki: this CA was set up with an operator-supplied backup pin or without --root-mount;"
                " roll the intermediate over in OpenBao by hand (docs/pki.md), then 'ca init --force'"
            )
        c = ca.client
        name = f"modelseal issuing CA ({ca.trust_domain})"
        csr = c.write(f"{ca.mount}/intermediate/generate/existing", {"key_ref": ca.backup_key, "common_name": name})
        signed = c.write(
            f"{ca.root_mount}/root/sign-intermediate",
            {"csr": csr.get("csr"), "common_name": name, "ttl": INTERMEDIATE_TTL, "format": "pem"},
        )
        new = _certs(signed.get("certificate"), "signed intermediate")[0]
        if pin_of(new) != ca.backup_pin:
            raise CertificateError("transit-pki: the new intermediate is not for the backup key; nothing changed")
        key_id, pin = _backup_key(c, ca.mount, ca.trust_domain)  # before the switch: a failure here changes nothing
        imported = c.write(f"{ca.mount}/intermediate/set-signed", {"certificate": _pem(new) + _pem(ca.root)})
        mapping = imported.get("mapping")
        ids = [i for i, k in mapping.items() if k == ca.backup_key] if isinstance(mapping, dict) else []
        if len(ids) != 1:
            raise CertificateError("transit-pki: OpenBao did not import the new intermediate for the backup key")
        c.write(f"{ca.mount}/config/issuers", {"default": ids[0]})
        issuing, root = _anchor(c, ca.mount, ca.root_mount)
        if issuing != new or root != ca.root:
            raise CertificateError("transit-pki: the mount's default issuer is not the new intermediate")
        rolled = TransitPKI(
            ca.svc, ca.folder, ca.trust_domain, ca.mount, ca.role, ca.server_role, ca.root_mount, root, issuing,
            pin, key_id, c,
        )  # fmt: skip
        _write(rolled)
    except ModelsealError as e:
        ca.audit("ca-rotate-intermediate", type(e).__name__)
        raise
    rolled.audit("ca-rotate-intermediate", "ok")
    return rolled


__all__ = ["CA_FORMAT", "PkiClient", "TransitPKI", "bao_serial", "init", "load", "rotate_intermediate"]
