"""``modelseal scan`` over real remote targets (docs/scan.md): ``s3://`` against SeaweedFS with
the bucket's own settings, ``oci://`` against a running ``modelseal serve --content any`` (a
plaintext layer, sealed artifacts signed and not) with ``protection_states`` over the same
registry, and ``tls://`` against a running ``modelseal serve`` through sslyze (a clean
result, and a finding for wrong pins). Every service runs on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import io
import json
import os
import socket
import ssl
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

import modelseal
from modelseal.cli import main
from modelseal.pki import pins as pki_pins
from modelseal.registry import transfer
from modelseal.registry.service import open_registry
from modelseal.server import tls
from modelseal.signing.signers import P256, PemSigner, generate, private_pem
from modelseal.signing.trust import load_policy
from modelseal.telemetry import scans3
from modelseal.telemetry.scan import ScanOptions, scan
from modelseal.telemetry.scankeys import scan_service
from modelseal.telemetry.scanregistry import protection_states
from tests.conftest import Env
from tests.oci_helpers import EMPTY, Client, image, sha
from tests.push_pull_helpers import make_pki, modelseal_serve
from tests.services import seaweedfs, sslyze_python

KEY = "local:test-kek"
BUCKET = "scan-test"


@pytest.fixture
def release(env: Env) -> tuple[PemSigner, Path]:
    """A trusted P-256 signer and the trust policy that trusts it."""
    s = generate(P256)
    (env.work / "release.pem").write_bytes(private_pem(s, None))
    (env.work / "release.pub").write_text(s.public.pem())
    policy = env.work / "trust.toml"
    policy.write_text(
        f'version = 1\nstrict = true\n[signers.release]\nkeys = ["{env.work / "release.pub"}"]\n'
        '[[rules]]\nartifacts = ["*"]\nenvironments = ["*"]\nsigners = ["release"]\n'
    )
    os.chmod(policy, 0o600)
    return PemSigner.from_file(env.work / "release.pem"), policy


def _seal(env: Env, name: str, signer: PemSigner | None = None) -> Path:
    src = env.work / f"{name}.src"
    src.write_bytes(os.urandom(5000))
    dst = env.work / name
    modelseal.seal(src, dst, KEY, keys=env.svc, sign_key=signer, name=name)
    return dst


def _safetensors() -> bytes:
    return bytes(save({"w": np.arange(256, dtype=np.float32)}))


def _torch_like_zip() -> bytes:
    """A torch checkpoint's entries with ``data.pkl`` not first: found through the central
    directory, read by a ranged GET of the object's end."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ckpt/version", "3\n")
        z.writestr("ckpt/data/0", os.urandom(70_000))
        z.writestr("ckpt/data.pkl", b"\x80\x02}q\x00.")
    return buf.getvalue()


def _opts(env: Env, policy: Path) -> ScanOptions:
    return ScanOptions(policy=load_policy(policy), svc=scan_service(env.svc), table={})


def test_s3_objects_by_content_and_the_bucket_settings(
    env: Env, release: tuple[PemSigner, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer, policy = release
    unsigned, signed = _seal(env, "unsigned.mseal"), _seal(env, "signed.mseal", signer)
    with seaweedfs(tmp_path / "s3") as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key-not-secret")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        s3 = scans3.client()
        s3.create_bucket(Bucket=BUCKET)
        objects = {
            "m/weights.dat": _safetensors(),
            "m/ckpt.bin": _torch_like_zip(),
            "m/unsigned.mseal": unsigned.read_bytes(),
            "m/signed.mseal": signed.read_bytes(),
            "m/signed.mseal.msig": Path(f"{signed}.msig").read_bytes(),
            "m/noise": os.urandom(20_000),
            "elsewhere/weights.dat": _safetensors(),  # outside the prefix
        }
        for key, data in objects.items():
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)

        report = scan([f"s3://{BUCKET}/m/"], _opts(env, policy))
        got = sorted((f.kind, f.location) for f in report.findings)
        assert got == [
            ("bucket-no-default-encryption", f"s3://{BUCKET}"),
            ("plaintext-model", f"s3://{BUCKET}/m/ckpt.bin"),
            ("plaintext-model", f"s3://{BUCKET}/m/weights.dat"),
            ("unsigned", f"s3://{BUCKET}/m/unsigned.mseal"),
        ], [f.line() for f in report.findings]
        assert report.files == 6 and report.formats["torch"] == 1 and not report.errors
        assert report.states["sealed-signed"] == 1 and report.states["sealed-unsigned"] == 1
        # SeaweedFS does not implement the public access block: unknown, said so, not a pass.
        assert any("public access block unknown" in n and "NotImplemented" in n for n in report.notes), report.notes

        s3.put_bucket_encryption(
            Bucket=BUCKET,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
            },
        )
        again = scan([f"s3://{BUCKET}/m/"], _opts(env, policy))
        assert "bucket-no-default-encryption" not in {f.kind for f in again.findings}
        assert len(again.findings) == 3
        assert main(["scan", "s3://no-such-bucket-here/x"]) == 7  # the scan itself failing: StorageError


def test_oci_layers_by_content_signatures_and_protection_states(env: Env, release: tuple[PemSigner, Path]) -> None:
    signer, policy = release
    pki = make_pki(env)
    data = env.work / "serve-data"
    with modelseal_serve(env.work, pki.server_dir, pki.client_dir, "--data", str(data), "--content", "any") as port:
        host = f"127.0.0.1:{port}"
        kw = {"tls_dir": pki.client_dir, "pins": pki.pins()}
        transfer.push(_seal(env, "unsigned.mseal"), f"{host}/team/model:v1", **kw)  # type: ignore[arg-type]
        transfer.push(_seal(env, "signed.mseal", signer), f"{host}/team/model:v2", **kw)  # type: ignore[arg-type]
        client = Client(tls.client_context(pki.client_dir), port)
        layer = client.push_blob("team/model", _safetensors())
        config = client.push_blob("team/model", b"{}")
        doc = image(config, [("application/vnd.modelseal.sealed.v1", layer, len(_safetensors()))])
        assert doc["config"] == {"mediaType": EMPTY, "digest": sha(b"{}"), "size": 2}
        assert client.put_manifest("team/model", "plain", doc).status == 201
        client.close()

        opts = _opts(env, policy)
        opts.tls_dir, opts.pins = pki.client_dir, pki.pins()
        report = scan([f"oci://{host}/team/model"], opts)
        got = sorted((f.kind, f.location) for f in report.findings)
        assert got == [
            ("plaintext-model", f"oci://{host}/team/model:plain#{layer}"),
            ("unsigned", f"oci://{host}/team/model:v1"),
        ], [f.line() for f in report.findings]
        assert report.states == {"sealed-signed": 1, "sealed-unsigned": 1, "plaintext": 1}
        one = scan([f"oci://{host}/team/model:v2"], opts)
        assert one.files == 1 and not one.findings and one.states["sealed-signed"] == 1

        reg = open_registry(data, content="any")
        try:
            states = protection_states(reg, policy=load_policy(policy))
            assert states == {
                "sealed-signed": 1,
                "sealed-unsigned": 1,
                "revoked": 0,
                "past-cryptoperiod": 0,
                "plaintext": 1,
            }
            # bounded work: one manifest per call, the counts fill in as the cursor goes round
            small = open_registry(data, content="any")
            firsts = [sum(protection_states(small, budget=1).values()) for _ in range(6)]
            assert firsts[0] <= 1 and firsts[-1] == 3, firsts
            small.close()
        finally:
            reg.close()


def test_tls_endpoint_clean_and_with_a_wrong_pin(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = make_pki(env)
    monkeypatch.setenv("MODELSEAL_SSLYZE_PYTHON", str(sslyze_python()))
    with modelseal_serve(env.work, pki.server_dir, pki.client_dir, "--data", str(env.work / "d")) as port:
        target = f"tls://127.0.0.1:{port}"
        pins = [a for p in pki.pins() for a in ("--pin", p)]
        code = main(["scan", target, "--tls-dir", str(pki.client_dir), *pins, "--json"])
        doc = json.loads(capsys.readouterr().out)
        assert code == 0 and doc["findings"] == [] and doc["errors"] == [], doc
        assert doc["files"] == 1

        wrong = [pki_pins.pin_of_key(generate(P256).public.key) for _ in range(2)]
        code = main(["scan", target, "--tls-dir", str(pki.client_dir), "--pin", wrong[0], "--pin", wrong[1]])
        out = capsys.readouterr().out
    assert code == 19
    lines = out.splitlines()
    assert [x.split("  ")[0] for x in lines if not x.startswith(("note", "scanned"))] == ["tls-pin-mismatch"], lines
    assert lines[0].startswith(f"tls-pin-mismatch  {target}  ")


def _self_signed(folder: Path, days: int, started_days_ago: float = 0) -> tuple[Path, Path]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old-server")])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=started_days_ago)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "cert.pem", folder / "key.pem"


@contextmanager
def _tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 (a thread, no client certificate asked) that completes handshakes."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = socket.create_server(("127.0.0.1", 0))
    port = int(srv.getsockname()[1])

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    s.recv(1)
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield port
    finally:
        srv.close()


@pytest.mark.parametrize(
    ("days", "ago", "expected"),
    [(500, 0, "longer than 398 days"), (90, 70, "less than a third of its lifetime left"), (30, 40, "expired")],
)
def test_tls_certificate_lifetime_and_pins_of_an_endpoint_without_client_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, days: int, ago: float, expected: str
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no sslyze: said so in an error line, the rest still checked
    monkeypatch.delenv("MODELSEAL_SSLYZE_PYTHON", raising=False)
    monkeypatch.setenv("MODELSEAL_HOME", str(tmp_path / "no-home"))  # no config.toml: nothing but the arguments
    for name in ("MODELSEAL_REGISTRY", "MODELSEAL_REGISTRY_PINS", "MODELSEAL_TLS_DIR"):
        monkeypatch.delenv(name, raising=False)
    cert, key = _self_signed(tmp_path / "tls", days, ago)
    with _tls_server(cert, key) as port:
        target = f"tls://127.0.0.1:{port}"
        wrong = [pki_pins.pin_of_key(generate(P256).public.key) for _ in range(2)]
        report = scan([target], ScanOptions(pins=wrong, table={}))
    assert sorted(f.kind for f in report.findings) == ["tls-certificate-lifetime", "tls-pin-mismatch"]
    life = next(f for f in report.findings if f.kind == "tls-certificate-lifetime")
    assert life.detail.startswith(expected) and life.location == target
    assert life.severity == ("critical" if expected == "expired" else "warning")
    assert report.errors == [
        f"{target}: no sslyze: set MODELSEAL_SSLYZE_PYTHON or [scan] sslyze_python, or put sslyze on PATH"
    ]


# -- the red-team review of issue 14, findings 3 to 6: manifests never decide what is skipped ------

DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _evasions(client: Client, st: bytes) -> dict[str, str]:
    """One plaintext safetensors layer in each repository, behind what a manifest can claim;
    the reference that names it."""
    out = {}
    for repo in ("t/control", "t/sigtype", "t/withmanifests", "t/smallsize", "t/docker", "t/dlist"):
        layer, cfg = client.push_blob(repo, st), client.push_blob(repo, b"{}")
        layers = [("application/octet-stream", layer, len(st))]
        doc = image(cfg, layers)
        if repo == "t/sigtype":
            doc = image(cfg, layers, artifactType="application/vnd.modelseal.signatures.v1+json")
        elif repo == "t/withmanifests":
            doc = image(cfg, layers, manifests=[])
        elif repo == "t/smallsize":
            doc = image(cfg, [("application/octet-stream", layer, 7)])
        elif repo in ("t/docker", "t/dlist"):
            doc["mediaType"] = DOCKER
        if repo == "t/dlist":
            body = json.dumps(doc).encode()
            assert (
                client.request("PUT", f"/v2/{repo}/manifests/{sha(body)}", body, {"Content-Type": DOCKER}).status == 201
            )
            doc = {
                "schemaVersion": 2,
                "mediaType": DOCKER_LIST,
                "manifests": [{"mediaType": DOCKER, "digest": sha(body), "size": len(body)}],
            }
        media = str(doc.get("mediaType", MANIFEST))
        assert client.put_manifest(repo, "v1", doc, media).status == 201, repo  # type: ignore[arg-type]
        out[repo] = f"{repo}:v1"
    return out


def client_empty(pki: Any, port: int) -> tuple[str, str]:
    """t/empty:v1, a manifest whose one layer is an empty blob (no first byte to range over)."""
    client = Client(tls.client_context(pki.client_dir), port)
    layer, cfg = client.push_blob("t/empty", b""), client.push_blob("t/empty", b"{}")
    assert client.put_manifest("t/empty", "v1", image(cfg, [("application/octet-stream", layer, 0)])).status == 201
    client.close()
    return layer, cfg


def _amplified(env: Env, client: Client, host: str, kw: dict[str, object]) -> Path:
    """t/amp:v1, a signed sealed artifact with four signature referrers, and t/amp:big, a
    manifest repeating its one layer 256 times with the same four referrers."""
    art = _seal(env, "amp.mseal")
    for _ in range(4):  # four pushes, one more signature each: four distinct signature files
        modelseal.sign(art, generate(P256), name="amp", keys=env.svc)
        transfer.push(art, f"{host}/t/amp:v1", **kw)  # type: ignore[arg-type]
    v1 = client.request("GET", "/v2/t/amp/manifests/v1", headers={"Accept": MANIFEST}).body
    refs = json.loads(client.request("GET", f"/v2/t/amp/referrers/{sha(v1)}").body)["manifests"]
    assert len(refs) == 4
    big = json.loads(v1)
    big["layers"] = big["layers"] * 256
    body = json.dumps(big).encode()
    assert client.request("PUT", "/v2/t/amp/manifests/big", body, {"Content-Type": MANIFEST}).status == 201
    for r in refs:
        ref = json.loads(client.request("GET", f"/v2/t/amp/manifests/{r['digest']}", headers={"Accept": MANIFEST}).body)
        ref["subject"] = {"mediaType": MANIFEST, "digest": sha(body), "size": len(body)}
        rb = json.dumps(ref).encode()
        assert client.request("PUT", f"/v2/t/amp/manifests/{sha(rb)}", rb, {"Content-Type": MANIFEST}).status == 201
    return art


def _forged_referrer(env: Env, client: Client, host: str, kw: dict[str, object], donor: Path) -> None:
    """t/u:v1, an unsigned sealed artifact, with a signature referrer that names its header and
    whose signature does not verify (another artifact's, re-pointed)."""
    import base64
    import hashlib

    from modelseal.format.file import canonical_json, read_raw
    from modelseal.format.source import FdSource
    from modelseal.signing.commitment import header_digest
    from modelseal.util.files import open_regular

    unsigned = _seal(env, "u.mseal")
    transfer.push(unsigned, f"{host}/t/u:v1", **kw)  # type: ignore[arg-type]
    src = FdSource(open_regular(unsigned))
    raw = read_raw(src)
    src.close()
    sig = json.loads(Path(f"{donor}.msig").read_bytes())
    e = sig["signatures"][0]
    st = json.loads(base64.b64decode(e["envelope"]["payload"]))
    st["predicate"]["files"][0]["header"]["blake3"] = header_digest(raw)
    st["predicate"]["files"][0]["size"] = raw.layout.file_length
    payload = canonical_json(st)
    e["envelope"]["payload"] = base64.b64encode(payload).decode()
    e["id"] = hashlib.sha256(e["envelope"]["signatures"][0]["keyid"].encode() + b"\x00" + payload).hexdigest()
    forged = json.dumps(sig).encode()
    layer = client.push_blob("t/u", forged)
    empty = client.push_blob("t/u", b"{}")
    mu = client.request("GET", "/v2/t/u/manifests/v1", headers={"Accept": MANIFEST}).body
    ref = image(empty, [("application/vnd.modelseal.signatures.v1+json", layer, len(forged))])
    ref["artifactType"] = "application/vnd.modelseal.signatures.v1+json"
    ref["subject"] = {"mediaType": MANIFEST, "digest": sha(mu), "size": len(mu)}
    rb = json.dumps(ref).encode()
    assert client.request("PUT", f"/v2/t/u/manifests/{sha(rb)}", rb, {"Content-Type": MANIFEST}).status == 201


def test_manifests_never_decide_what_is_skipped_and_the_state_pass_is_bounded(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelseal.telemetry import scanoci, scanregistry

    pki = make_pki(env)
    data = env.work / "serve-data"
    st = bytes(save({"w": np.arange(4096, dtype=np.float32)}))
    with modelseal_serve(env.work, pki.server_dir, pki.client_dir, "--data", str(data), "--content", "any") as port:
        host = f"127.0.0.1:{port}"
        kw: dict[str, object] = {"tls_dir": pki.client_dir, "pins": pki.pins()}
        client = Client(tls.client_context(pki.client_dir), port)
        refs = _evasions(client, st)
        donor = _amplified(env, client, host, kw)
        _forged_referrer(env, client, host, kw, donor)
        client.close()
        opts = ScanOptions(table={}, tls_dir=pki.client_dir, pins=pki.pins())
        for repo, ref in refs.items():
            report = scan([f"oci://{host}/{ref}"], opts)
            assert [f.kind for f in report.findings] == ["plaintext-model"], (repo, report.lines())
            assert report.formats["safetensors"] == 1 and not report.errors, (repo, report.lines())
        client_empty(pki, port)
        empty = scan([f"oci://{host}/t/empty:v1"], opts)
        assert empty.files == 1 and empty.formats["other"] == 1 and not empty.errors, empty.lines()
        big = scan([f"oci://{host}/t/amp:big"], opts)
        assert big.files == 1 and big.states == {"sealed-signed": 1}, big.lines()  # one distinct layer, read once
        forged = scan([f"oci://{host}/t/u:v1"], opts)
        assert [f.kind for f in forged.findings] == ["untrusted-signature"], forged.lines()
        monkeypatch.setattr(scanoci, "MAX_DEPTH", 0)
        cut = scan([f"oci://{host}/t/dlist:v1"], opts)
        assert not cut.findings and cut.incomplete and "nested more than 0 deep" in cut.errors[0]
        monkeypatch.setattr(scanoci, "MAX_DEPTH", 4)

    examined, fetched = [], []
    real_examine, real_fetch = scanregistry.examine, scanregistry._signature_files
    monkeypatch.setattr(scanregistry, "examine", lambda *a: examined.append(1) or real_examine(*a))
    monkeypatch.setattr(scanregistry, "_signature_files", lambda *a: fetched.append(1) or real_fetch(*a))
    reg = open_registry(data, content="any")
    try:
        full = protection_states(reg)
        # the six plaintext layers, whatever their manifests claim; amp:v1 and amp:big signed
        # (verified against the keys they carry: no policy); the forged referrer does not count
        assert full == {"sealed-signed": 2, "sealed-unsigned": 1, "revoked": 0, "past-cryptoperiod": 0, "plaintext": 6}
        # each manifest's distinct layers once (big: 1, not 256), its signature files once
        assert len(examined) == 19, len(examined)  # 9 artifact layers, 9 signature files (8 of amp, 1 forged), 1 empty
        assert len(fetched) == 3, len(fetched)  # amp:v1, amp:big, u:v1
    finally:
        reg.close()
    small = open_registry(data, content="any")
    try:  # one layer per call: resumable, and the counts fill in as the cursor goes round
        rounds = [protection_states(small, max_reads=1) for _ in range(40)]
        assert rounds[-1] == full and sum(rounds[0].values()) <= 1, rounds[:3]
    finally:
        small.close()


def test_without_a_ca_of_ours_a_public_store_failure_is_not_a_pin_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A private CA fails sslyze's public trust stores: that says nothing of interception."""
    monkeypatch.setenv("MODELSEAL_SSLYZE_PYTHON", str(sslyze_python()))
    monkeypatch.setenv("MODELSEAL_HOME", str(tmp_path / "no-home"))
    for name in ("MODELSEAL_REGISTRY", "MODELSEAL_REGISTRY_PINS", "MODELSEAL_TLS_DIR"):
        monkeypatch.delenv(name, raising=False)
    cert, key = _self_signed(tmp_path / "tls", 30)
    with _tls_server(cert, key) as port:
        report = scan([f"tls://127.0.0.1:{port}"], ScanOptions(table={}))
    kinds = {f.kind for f in report.findings}
    assert "tls-weak-protocol" in kinds and "tls-pin-mismatch" not in kinds, report.lines()  # sslyze did run
    assert any("public trust stores" in n for n in report.notes) and not report.errors, report.lines()
