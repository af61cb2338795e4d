"""The internal CA (docs/pki.md): init, issue, renew, revoke, verify, pins, the CLI."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from modelseal.cli import main
from modelseal.errors import (
    CertificateError,
    CertificateRevoked,
    DecryptionError,
    DestinationExists,
    IdentityError,
    ModelsealError,
    PolicyDenied,
)
from modelseal.pki import backend, denylist, identity, issue, pins, store, verify
from modelseal.pki import ca as pki_ca
from modelseal.pki.identity import Identity
from tests.conftest import Env

TD = "example.org"
OPENSSL = shutil.which("openssl")


def der(certs: list[x509.Certificate]) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def ident(kind: str = "service", name: str = "trainer", env: str = "prod") -> Identity:
    return Identity.of(TD, env, kind, name)


@pytest.fixture
def ca(env: Env) -> pki_ca.CA:
    return pki_ca.init_ca(env.svc, TD)


def verify_issued(issued: issue.Issued, ca: pki_ca.CA, now: dt.datetime | None = None) -> Identity:
    return verify.identity_of(
        der([issued.cert, *issued.chain]), [ca.root], now or pki_ca.utcnow(), denylist.load(ca.folder), trust_domain=TD
    )


# --- identities ---------------------------------------------------------------------------------


def test_identity_round_trip() -> None:
    i = identity.parse("spiffe://example.org/prod/server/api-1.eu")
    assert (i.trust_domain, i.env, i.kind, i.name) == ("example.org", "prod", "server", "api-1.eu")
    assert i.uri == "spiffe://example.org/prod/server/api-1.eu"


@pytest.mark.parametrize(
    "bad",
    [
        "spiffe://Example.org/prod/server/api",
        "spiffe://example.org/prod/admin/api",
        "spiffe://example.org/prod/server/",
        "spiffe://example.org//server/api",
        "spiffe://example.org/prod/server/..",
        "spiffe://example.org/prod/server/a..b",
        "spiffe://example.org/prod/server/a%2fb",
        "spiffe://example.org/prod/server/api/extra",
        "spiffe://example.org/prod/server/api?x=1",
        "spiffe://example.org/prod/server/api#f",
        "spiffe://user@example.org/prod/server/api",
        "spiffe://example.org:443/prod/server/api",
        "spiffe://-bad.org/prod/server/api",
        "spiffe://example.org/Prod/server/api",
        "https://example.org/prod/server/api",
        "spiffe://example.org/prod/server/api\n",
        "spiffe://example.org/prod/server/.hidden",
    ],
)
def test_identity_refuses(bad: str) -> None:
    with pytest.raises(IdentityError):
        identity.parse(bad)


# --- ca init ------------------------------------------------------------------------------------


def _secret_forms(key: ec.EllipticCurvePrivateKey) -> list[bytes]:
    nums = key.private_numbers().private_value.to_bytes(32, "big")
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return [nums, pkcs8, pem, base64.b64encode(pkcs8), pem.split(b"\n")[1]]


def test_ca_init_files_private_and_no_key_in_clear(env: Env, ca: pki_ca.CA) -> None:
    folder = env.home / "ca"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for p in folder.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    root_key = store.unseal_key(env.svc, (folder / "root-1.key.json").read_bytes(), "root", TD)
    issuing_key = ca.issuing_key(env.svc)
    assert root_key.public_key() == ca.root.public_key()
    assert issuing_key.public_key() == ca.issuing.public_key()
    everything = b"".join(p.read_bytes() for p in env.home.rglob("*") if p.is_file())
    for key in (root_key, issuing_key):
        for form in _secret_forms(key):
            assert form not in everything
    assert {e.operation for e in env.sink.events} >= {"ca-init", "wrap"}
    bc = ca.root.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 1
    assert ca.issuing.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert ca.root.not_valid_after_utc - ca.root.not_valid_before_utc > dt.timedelta(days=3600)


def test_ca_init_refuses_overwrite(env: Env, ca: pki_ca.CA) -> None:
    with pytest.raises(DestinationExists):
        pki_ca.init_ca(env.svc, TD)
    again = pki_ca.init_ca(env.svc, TD, force=True)
    assert again.root.fingerprint(hashes.SHA256()) != ca.root.fingerprint(hashes.SHA256())
    assert sorted(p.name for p in (env.home / "ca").iterdir() if "-" in p.name) == [
        "issuing-2.key.json",
        "issuing-2.pem",
        "next-2.key.json",
        "root-2.key.json",
        "root-2.pem",
    ]


def test_ca_key_sealed_under_context(env: Env, ca: pki_ca.CA) -> None:
    data = (env.home / "ca" / "issuing-1.key.json").read_bytes()
    with pytest.raises(CertificateError):  # sealed for the issuing key, not the root
        store.unseal_key(env.svc, data, "root", TD)
    doc = json.loads(data)
    relabelled = json.dumps({**doc, "ca": "root"}).encode()  # the wrap's context names the issuing key
    with pytest.raises(ModelsealError):
        store.unseal_key(env.svc, relabelled, "root", TD)
    ct = bytearray(base64.b64decode(doc["ciphertext"]))
    ct[5] ^= 1
    with pytest.raises(DecryptionError):
        store.unseal_key(
            env.svc, json.dumps({**doc, "ciphertext": base64.b64encode(ct).decode()}).encode(), "issuing", TD
        )


# --- issue --------------------------------------------------------------------------------------


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.mark.parametrize("kind", ["server", "service", "user"])
def test_issue_each_kind(env: Env, ca: pki_ca.CA, kind: str) -> None:
    dns, ips = (["api.example.org"], ["10.0.0.7"]) if kind == "server" else ([], [])
    issued = issue.issue(env.svc, ident(kind), dns=dns, ips=ips)
    san = issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ident(kind).uri]
    assert san.get_values_for_type(x509.DNSName) == dns
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ips
    want = {ExtendedKeyUsageOID.CLIENT_AUTH} | ({ExtendedKeyUsageOID.SERVER_AUTH} if kind == "server" else set())
    assert _eku(issued.cert) == want
    life = issued.cert.not_valid_after_utc - issued.cert.not_valid_before_utc
    assert life == dt.timedelta(hours=24) + pki_ca.BACKDATE
    assert 0 < issued.cert.serial_number < 1 << 159
    assert verify_issued(issued, ca) == ident(kind)
    out = env.work / f"cert-{kind}"
    issue.write_dir(issued, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    chain = x509.load_pem_x509_certificates((out / "cert.pem").read_bytes())
    assert chain == [issued.cert, ca.issuing]
    assert x509.load_pem_x509_certificate((out / "ca.pem").read_bytes()) == ca.root
    if OPENSSL:
        inter = env.work / f"inter-{kind}.pem"
        inter.write_bytes(ca.issuing.public_bytes(serialization.Encoding.PEM))
        leaf = env.work / f"leaf-{kind}.pem"
        leaf.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
        purpose = "sslserver" if kind == "server" else "sslclient"
        r = subprocess.run(
            [
                OPENSSL,
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                str(out / "ca.pem"),
                "-untrusted",
                str(inter),
                str(leaf),
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr
    if kind == "server":
        from cryptography.x509 import verification as v

        verifier = (
            v.PolicyBuilder().store(v.Store([ca.root])).time(pki_ca.utcnow()).build_server_verifier(v.DNSName(dns[0]))
        )
        verifier.verify(issued.cert, [ca.issuing])
    assert [e.operation for e in env.sink.events][-1] == "cert-issue"


def test_issue_ttl_bounds(env: Env, ca: pki_ca.CA) -> None:
    with pytest.raises(PolicyDenied):
        issue.issue(env.svc, ident(), ttl=issue.MAX_TTL + dt.timedelta(seconds=1))
    issued = issue.issue(env.svc, ident(), ttl=issue.MAX_TTL)
    assert issued.cert.not_valid_after_utc - issued.cert.not_valid_before_utc == issue.MAX_TTL + pki_ca.BACKDATE


def test_issue_refuses_sans_on_clients_and_other_domains(env: Env, ca: pki_ca.CA) -> None:
    with pytest.raises(PolicyDenied):
        issue.issue(env.svc, ident("user"), dns=["x.example.org"])
    with pytest.raises(PolicyDenied):
        issue.issue(env.svc, Identity.of("other.org", "prod", "user", "bob"))


# --- verify -------------------------------------------------------------------------------------


def _foreign_leaf(
    ca: pki_ca.CA, env: Env, sans: list[x509.GeneralName], not_after: dt.datetime | None = None
) -> x509.Certificate:
    """A leaf signed by this CA's issuing key, with SANs the issuer would never write."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = pki_ca.utcnow()
    ski = ca.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(ca.issuing.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(ca.issuing_key(env.svc), hashes.SHA256())
    )


def test_verify_refuses_other_ca_expired_revoked(env: Env, ca: pki_ca.CA, tmp_path: Path) -> None:
    issued = issue.issue(env.svc, ident())
    other = pki_ca.init_ca(env.svc, TD, folder=tmp_path / "other-ca")
    with pytest.raises(CertificateError):
        verify.identity_of(der([issued.cert, *issued.chain]), [other.root], pki_ca.utcnow(), trust_domain=TD)
    with pytest.raises(CertificateError):
        verify_issued(issued, ca, now=pki_ca.utcnow() + dt.timedelta(days=2))
    with pytest.raises(CertificateError):  # the right CA, the wrong trust domain expected
        verify.identity_of(der([issued.cert, *issued.chain]), [ca.root], pki_ca.utcnow(), trust_domain="other.org")
    issue.revoke(env.svc, issued.cert.serial_number, "test")
    assert denylist.is_revoked(issued.cert.serial_number, ca.folder)
    with pytest.raises(CertificateRevoked):
        verify_issued(issued, ca)


@pytest.mark.parametrize(
    "sans",
    [
        [
            x509.UniformResourceIdentifier(f"spiffe://{TD}/prod/user/a"),
            x509.UniformResourceIdentifier(f"spiffe://{TD}/prod/user/b"),
        ],
        [x509.UniformResourceIdentifier("https://example.org/prod/user/a")],
        [x509.UniformResourceIdentifier(f"spiffe://{TD}/prod/admin/a")],
        [x509.DNSName("a.example.org")],
    ],
)
def test_verify_refuses_bad_uri_sans(env: Env, ca: pki_ca.CA, sans: list[x509.GeneralName]) -> None:
    leaf = _foreign_leaf(ca, env, sans)
    with pytest.raises(CertificateError):
        verify.identity_of(der([leaf, ca.issuing]), [ca.root], pki_ca.utcnow(), trust_domain=TD)


# --- renew and revoke ---------------------------------------------------------------------------


def test_renew(env: Env, ca: pki_ca.CA) -> None:
    out = env.work / "svc"
    old = issue.issue(env.svc, ident("server"), dns=["a.example.org"], ttl=dt.timedelta(hours=6))
    issue.write_dir(old, out)
    old_key = (out / "key.pem").read_bytes()
    new = issue.renew(env.svc, out, now=pki_ca.utcnow() + dt.timedelta(hours=4))
    assert new.identity == old.identity
    assert new.cert.serial_number != old.cert.serial_number
    assert (out / "key.pem").read_bytes() != old_key
    assert new.cert.not_valid_after_utc - new.cert.not_valid_before_utc == dt.timedelta(hours=6) + pki_ca.BACKDATE
    san = new.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example.org"]
    assert x509.load_pem_x509_certificates((out / "cert.pem").read_bytes())[0] == new.cert
    assert sorted(os.listdir(out)) == ["ca.pem", "cert.pem", "key.pem"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    with pytest.raises(CertificateError):  # expired by then
        issue.renew(env.svc, out, now=pki_ca.utcnow() + dt.timedelta(hours=11))
    issue.revoke(env.svc, new.cert.serial_number)
    with pytest.raises(CertificateRevoked):
        issue.renew(env.svc, out, now=pki_ca.utcnow() + dt.timedelta(hours=5))


def test_renewals_are_recorded_and_revocation_follows_them(env: Env, ca: pki_ca.CA) -> None:
    out = env.work / "chain"
    issue.write_dir(issue.issue(env.svc, ident(), ttl=dt.timedelta(minutes=10)), out)
    first = issue.read_chain(out)[0]
    second = issue.renew(env.svc, out).cert
    third = issue.renew(env.svc, out).cert
    for c in (second, third):  # the short lifetime is kept, never the default 24 h
        assert c.not_valid_after_utc - c.not_valid_before_utc == dt.timedelta(minutes=10) + pki_ca.BACKDATE
    rows = {str(r["serial"]): r for r in issue.list_issued(ca)}
    hexed = [denylist.serial_hex(c.serial_number) for c in (first, second, third)]
    assert denylist.PARENT not in rows[hexed[0]]
    assert rows[hexed[1]][denylist.PARENT] == hexed[0] and rows[hexed[2]][denylist.PARENT] == hexed[1]
    other = issue.issue(env.svc, ident(name="bystander"))
    env.sink.events.clear()
    assert issue.revoke_all(env.svc, second.serial_number, "stolen") == (True, [hexed[2]])
    listed = denylist.load(ca.folder)
    assert not listed.revoked(first.serial_number) and not listed.revoked(other.cert.serial_number)
    assert listed.entries[third.serial_number].reason == f"renewed from revoked certificate {hexed[1]} (stolen)"
    assert {(e.operation, e.result, e.artifact) for e in env.sink.events} == {
        ("cert-revoke", "ok", hexed[1]),
        ("cert-revoke", "ok", hexed[2]),
    }
    assert issue.revoke_all(env.svc, second.serial_number) == (False, [])  # idempotent
    with pytest.raises(CertificateRevoked):
        issue.renew(env.svc, out)


def test_renewal_refused_while_an_ancestor_is_revoked(env: Env, ca: pki_ca.CA) -> None:
    out = env.work / "heir"
    issue.write_dir(issue.issue(env.svc, ident(), ttl=dt.timedelta(hours=1)), out)
    first = issue.read_chain(out)[0]
    second = issue.renew(env.svc, out).cert
    denylist.add(first.serial_number, "test", None, ca.folder)  # the ancestor only
    with pytest.raises(
        CertificateRevoked, match=f"renewed from revoked certificate {denylist.serial_hex(first.serial_number)}"
    ):
        issue.renew(env.svc, out)
    assert issue.read_chain(out)[0] == second
    # A renewal whose parent was revoked while it was being signed is denied once recorded.
    csr = backend.make_csr(ec.generate_private_key(ec.SECP256R1()), [])
    with pytest.raises(CertificateRevoked):
        issue.sign_csr(issue.LocalIssuer(env.svc, ca), ident(), csr, renewed_from=second.serial_number)
    late = [r for r in issue.list_issued(ca) if r.get(denylist.PARENT) == denylist.serial_hex(second.serial_number)]
    assert len(late) == 1 and denylist.load(ca.folder).revoked(denylist.parse_serial(str(late[0]["serial"])))


def test_a_certificate_valid_for_less_than_the_minimum_cannot_renew(env: Env, ca: pki_ca.CA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = pki_ca.utcnow()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    short = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(minutes=2))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(PolicyDenied, match="cannot renew itself"):
        issue.renewal_terms(short, backend.MAX_TTL)


def test_renew_refuses_other_ca(env: Env, ca: pki_ca.CA, tmp_path: Path) -> None:
    other = pki_ca.init_ca(env.svc, TD, folder=tmp_path / "other-ca")
    out = env.work / "foreign"
    issue.write_dir(issue.issue(env.svc, ident(), ca=other), out)
    with pytest.raises(CertificateError):
        issue.renew(env.svc, out)


def test_revoke_idempotent_and_serial_spellings(env: Env, ca: pki_ca.CA) -> None:
    issued = issue.issue(env.svc, ident())
    h = denylist.serial_hex(issued.cert.serial_number)
    assert denylist.parse_serial(":".join(h[i : i + 2] for i in range(0, len(h), 2))) == issued.cert.serial_number
    assert denylist.parse_serial("serial=" + h) == issued.cert.serial_number
    assert denylist.parse_serial("0x" + h.lower()) == issued.cert.serial_number
    assert issue.revoke(env.svc, issued.cert.serial_number, "key leaked")
    assert not issue.revoke(env.svc, issued.cert.serial_number)
    doc = (env.home / "ca" / "revoked.json").read_text()
    assert doc.count(h) == 1 and "key leaked" in doc
    for bad in ("", "xyz", "0", "1" * 41, "-1"):
        with pytest.raises(ValueError):
            denylist.parse_serial(bad)


# --- pins ---------------------------------------------------------------------------------------


def test_pin_matches_openssl(env: Env, ca: pki_ca.CA) -> None:
    if not OPENSSL:
        pytest.skip("no openssl")
    pem = ca.issuing.public_bytes(serialization.Encoding.PEM)
    pub = subprocess.run([OPENSSL, "x509", "-pubkey", "-noout"], input=pem, capture_output=True, check=True).stdout
    d = subprocess.run(
        [OPENSSL, "pkey", "-pubin", "-outform", "der"], input=pub, capture_output=True, check=True
    ).stdout
    digest = subprocess.run([OPENSSL, "dgst", "-sha256", "-binary"], input=d, capture_output=True, check=True).stdout
    assert pins.pin_of(ca.issuing) == base64.b64encode(digest).decode()


def test_pin_set_needs_backup_and_match(env: Env, ca: pki_ca.CA) -> None:
    leaf = issue.issue(env.svc, ident("server"), dns=["a.example.org"]).cert
    chain = [leaf, ca.issuing]
    live, backup = pins.pin_of(ca.issuing), pins.pin_of_key(ca.next_public)
    with pytest.raises(CertificateError, match="backup"):
        pins.check_pins([live], chain)
    assert pins.check_pins([live, backup], chain) == live
    stranger = pins.pin_of_key(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(pins.PinMismatch):
        pins.check_pins([backup, stranger], chain)
    with pytest.raises(pins.PinMismatch):  # the leaf's own key is no CA pin
        pins.check_pins([pins.pin_of(leaf), backup], chain)
    with pytest.raises(CertificateError):
        pins.check_pins(["not-a-pin"], chain)


def test_rollover_to_backup_pin(env: Env, ca: pki_ca.CA) -> None:
    client_pins = [pins.pin_of(ca.issuing), pins.pin_of_key(ca.next_public)]
    old_leaf = issue.issue(env.svc, ident("server"), dns=["a.example.org"])
    rolled = pki_ca.rotate_intermediate(env.svc)
    assert rolled.generation == 2
    assert pins.pin_of(rolled.issuing) == client_pins[1]
    assert rolled.root == ca.root
    new_leaf = issue.issue(env.svc, ident("server"), dns=["a.example.org"])
    assert new_leaf.chain == [rolled.issuing]
    # Old clients accept the new intermediate through the backup pin, and still the old leaf.
    assert pins.check_pins(client_pins, [new_leaf.cert, rolled.issuing]) == client_pins[1]
    assert pins.check_pins(client_pins, [old_leaf.cert, ca.issuing]) == client_pins[0]
    assert verify_issued(old_leaf, rolled) == ident("server")
    assert verify_issued(new_leaf, rolled) == ident("server")
    # After the roll-over, clients move to live + the new backup pin.
    with pytest.raises(CertificateError, match="backup"):
        pins.check_pins([pins.pin_of(rolled.issuing)], [new_leaf.cert, rolled.issuing])
    assert pins.pin_of_key(rolled.next_public) not in client_pins
    assert "ca-rotate-intermediate" in {e.operation for e in env.sink.events}


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_flow(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "init", "--trust-domain", TD]) == 0
    assert "backup pin" in capsys.readouterr().out
    assert main(["ca", "init", "--trust-domain", TD]) == 7
    assert "--force" in _err(capsys)
    out = env.work / "api"
    assert (
        main(
            ["cert", "issue", "api", "--kind", "server", "--env", "prod", "--dns", "api.example.org", "--out", str(out)]
        )
        == 0
    )
    assert sorted(os.listdir(out)) == ["ca.pem", "cert.pem", "key.pem"]
    cert = x509.load_pem_x509_certificates((out / "cert.pem").read_bytes())[0]
    capsys.readouterr()
    assert main(["cert", "renew", str(out)]) == 0
    assert main(["cert", "list", "--json"]) == 0
    assert denylist.serial_hex(cert.serial_number) in capsys.readouterr().out
    assert main(["cert", "revoke", denylist.serial_hex(cert.serial_number)]) == 0
    assert main(["cert", "revoke", denylist.serial_hex(cert.serial_number)]) == 0
    assert "already" in capsys.readouterr().out
    assert main(["ca", "rotate-intermediate"]) == 0
    assert main(["ca", "pins", "--json"]) == 0


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("modelseal: error: "), err
    return err


def test_cli_bad_input(env: Env, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["cert", "issue", "api", "--kind", "user", "--env", "prod", "--out", str(env.work / "x")]) == 13
    _err(capsys)  # no CA yet
    assert main(["ca", "init", "--trust-domain", "Bad_Domain"]) == 2
    _err(capsys)
    assert main(["ca", "init", "--trust-domain", TD]) == 0
    capsys.readouterr()
    for name, e in (("../etc", "prod"), ("a%2f", "prod"), ("api", "PROD"), ("api", "")):
        assert main(["cert", "issue", name, "--kind", "user", "--env", e, "--out", str(env.work / "x")]) == 2
        _err(capsys)
    assert not (env.work / "x").exists()
    assert main(["cert", "revoke", "not-hex"]) == 2
    _err(capsys)
    assert (
        main(["cert", "issue", "a", "--kind", "user", "--env", "prod", "--ttl", "8d", "--out", str(env.work / "y")])
        == 8
    )
    _err(capsys)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert main(["cert", "issue", "a", "--kind", "user", "--env", "prod", "--out", str(shared)]) == 8
    _err(capsys)
    busy = env.work / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["cert", "issue", "a", "--kind", "user", "--env", "prod", "--out", str(busy)]) == 8
    _err(capsys)
    assert (busy / "notes.txt").read_text() == "mine"
    assert main(["cert", "renew", str(env.work / "missing")]) == 7
    _err(capsys)


def test_cli_refuses_dir_of_another_user(env: Env, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a folder of another user")
    assert main(["ca", "init", "--trust-domain", TD]) == 0
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 12345, 12345)
    capsys.readouterr()
    assert main(["cert", "issue", "a", "--kind", "user", "--env", "prod", "--out", str(theirs)]) == 8
    assert "another user" in _err(capsys)


# --- the configured maximum lifetime and the backend checks -------------------------------------


def _config(env: Env, text: str) -> None:
    path = env.home / "config.toml"
    path.write_text(text)
    path.chmod(0o600)


def test_configured_max_ttl_on_issue_and_renew(env: Env, ca: pki_ca.CA, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.work / "svc"
    issue.write_dir(issue.issue(env.svc, ident(), ttl=dt.timedelta(days=3)), out)
    _config(env, '[pki]\nmax_ttl = "2d"\n')
    with pytest.raises(PolicyDenied, match="maximum of 2d"):
        issue.issue(env.svc, ident(), ttl=dt.timedelta(days=2, seconds=1))
    assert issue.issue(env.svc, ident(), ttl=dt.timedelta(days=2)).cert.not_valid_after_utc
    renewed = issue.renew(env.svc, out)  # a 3d leaf renews as a 2d one: the lowered maximum applies
    assert (
        renewed.cert.not_valid_after_utc - renewed.cert.not_valid_before_utc == dt.timedelta(days=2) + pki_ca.BACKDATE
    )
    _config(env, '[pki]\nmax_ttl = "12h"\n')
    default = issue.issue(env.svc, ident())  # the 24 h default gives way to a lower maximum
    assert (
        default.cert.not_valid_after_utc - default.cert.not_valid_before_utc == dt.timedelta(hours=12) + pki_ca.BACKDATE
    )
    args = ["cert", "issue", "a", "--kind", "user", "--env", "prod", "--out", str(env.work / "a")]
    assert main([*args, "--ttl", "13h"]) == 8
    assert "maximum of 12h" in _err(capsys)
    assert not (env.work / "a").exists()


@pytest.mark.parametrize(
    "text",
    [
        '[pki]\nmax_ttl = "8d"\n',  # never above the 7 d ceiling
        '[pki]\nmax_ttl = "1m"\n',
        "[pki]\nmax_ttl = 3600\n",
        '[pki]\nmax_ttl = "3 days"\n',
        '[pki]\nbackend = "acme"\n',
        '[pki]\ntransit_mount = "../sys"\n',
        '[pki]\nmaxttl = "1d"\n',
        'pki = "x"\n',
    ],
)
def test_pki_config_refused(env: Env, ca: pki_ca.CA, text: str) -> None:
    _config(env, text)
    with pytest.raises(backend.PkiConfigError):
        issue.issue(env.svc, ident())
    assert issue.list_issued(ca) == []


def test_pki_config_must_be_private(env: Env, ca: pki_ca.CA) -> None:
    _config(env, '[pki]\nmax_ttl = "1d"\n')
    (env.home / "config.toml").chmod(0o666)
    with pytest.raises(ModelsealError, match="writable"):
        issue.issue(env.svc, ident())


def test_sign_csr_takes_only_the_key_of_the_csr(env: Env, ca: pki_ca.CA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = backend.make_csr(key, [x509.UniformResourceIdentifier(f"spiffe://{TD}/prod/server/admin")])
    signed = issue.sign_csr(issue.LocalIssuer(env.svc, ca), ident(), csr)
    assert verify_issued(issue.Issued(signed.identity, signed.cert, signed.chain, signed.root, key), ca) == ident()
    assert signed.cert.public_key() == key.public_key()
    p384 = backend.make_csr(ec.generate_private_key(ec.SECP384R1()), [])
    with pytest.raises(CertificateError, match="P-256"):
        issue.sign_csr(issue.LocalIssuer(env.svc, ca), ident(), p384)


class _LaxIssuer(issue.LocalIssuer):
    """A backend that signs more than it was asked to (as a lax OpenBao role would)."""

    def sign(
        self,
        identity: Identity,
        csr: x509.CertificateSigningRequest,
        sans: list[x509.GeneralName],
        ttl: dt.timedelta,
        now: dt.datetime,
    ) -> backend.Signed:
        return super().sign(identity, csr, [*sans, x509.DNSName("evil.example.org")], ttl, now)


def test_a_backend_answer_with_other_names_is_refused(env: Env, ca: pki_ca.CA) -> None:
    with pytest.raises(CertificateError, match="other names"):
        issue.issue(env.svc, ident(), ca=_LaxIssuer(env.svc, ca))
    assert issue.list_issued(ca) == []
    assert [e.result for e in env.sink.events if e.operation == "cert-issue"][-1] == "CertificateError"
