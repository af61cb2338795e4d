"""``modelseal scan`` after the red-team review of issue 14 (docs/scan.md): an incomplete scan
exits 22 and says so in the textfile; a sealed magic that does not parse is a finding; the
local walk and the signature file never leave the folder; signatures are judged as
``modelseal verify`` judges them (a forged one without a trust policy, an unusable revocation
list, versions that disagree, a rollback); one target's bad certificate hides nothing; lines
cannot be forged by names; findings are bounded in memory; S3 keys ending in '/'; the
registry cursor's query."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import save

import modelseal
from modelseal.cli import main
from modelseal.format.file import canonical_json, read_raw
from modelseal.format.source import FdSource
from modelseal.registry.sqlmeta import SqlMeta
from modelseal.signing.commitment import header_digest
from modelseal.signing.revocation import RevocationList, write_list
from modelseal.signing.rollback import remember_accepted
from modelseal.signing.sigfile import signature_path
from modelseal.signing.signers import ED25519, P256, PemSigner, generate, private_pem
from modelseal.signing.trust import load_policy
from modelseal.telemetry import scanlocal, scanmodel, scans3
from modelseal.telemetry.scan import ScanOptions, context, scan
from modelseal.telemetry.scankeys import scan_service
from modelseal.telemetry.scanmodel import Finding, ScanReport
from modelseal.util.files import open_regular
from tests.conftest import Env
from tests.test_scan_remote import _self_signed, _tls_server

KEY = "local:test-kek"


def _safetensors() -> bytes:
    return bytes(save({"w": np.arange(4096, dtype=np.float32)}))


def _signers(tmp: Path) -> dict[str, PemSigner]:
    out = {}
    for name, alg in (("release", P256), ("security", ED25519)):
        s = generate(alg)
        (tmp / f"{name}.pem").write_bytes(private_pem(s, None))
        (tmp / f"{name}.pub").write_text(s.public.pem())
        out[name] = s
    return out


def _policy(tmp: Path, extra_rule: str = "", extra: str = "") -> Path:
    p = tmp / "trust.toml"
    p.write_text(
        f'version = 1\nstrict = true\n{extra}[signers.release]\nkeys = ["{tmp / "release.pub"}"]\n'
        f'[signers.security]\nkeys = ["{tmp / "security.pub"}"]\n'
        f'[[rules]]\nartifacts = ["*"]\nenvironments = ["*"]\nsigners = ["release", "security"]\n{extra_rule}'
    )
    os.chmod(p, 0o600)
    return p


def _seal(env: Env, path: Path, signer: PemSigner | None = None, name: str = "m") -> Path:
    src = env.work / f"{path.name}.src"
    src.write_bytes(os.urandom(3000))
    path.parent.mkdir(parents=True, exist_ok=True)
    modelseal.seal(src, path, KEY, keys=env.svc, sign_key=signer, name=name)
    return path


def _scan(root: Path, env: Env, policy: Path | None = None) -> ScanReport:
    opts = ScanOptions(policy=load_policy(policy) if policy else None, svc=scan_service(env.svc), table={})
    return scan([str(root)], opts)


def _kinds(report: ScanReport) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in report.findings:
        out.setdefault(Path(f.location).name, set()).add(f.kind)
    return out


# -- 2: an incomplete scan is not a clean one --------------------------------------------------


def test_an_incomplete_scan_exits_22_and_the_textfile_counts_its_errors(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = env.work / "tree"
    deep = root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "model.safetensors").write_bytes(_safetensors())
    monkeypatch.setattr(scanlocal, "MAX_DEPTH", 2, raising=False)  # what cannot be reached: an error
    textfile = tmp_path / "scan.prom"
    assert main(["scan", str(root), "--textfile", str(textfile)]) == 22
    out = capsys.readouterr()
    assert "incomplete" in out.err and out.out.splitlines()[-1].endswith("1 unreadable, 0 notes; INCOMPLETE")
    families = {f.name: f for f in text_string_to_metric_families(textfile.read_text())}
    assert families["modelseal_scan_errors"].samples[0].value == 1
    assert main(["scan", str(root), "--allow-errors"]) == 0
    (root / "plain.npy").write_bytes(_npy())
    assert main(["scan", str(root)]) == 19  # findings over --fail-on come first
    capsys.readouterr()


def _npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 4), dtype=np.float32))
    return buf.getvalue()


def test_a_sealed_magic_that_does_not_parse_is_a_finding(env: Env) -> None:
    root = env.work / "tree"
    root.mkdir()
    (root / "disguised.bin").write_bytes(b"\x89MSEAL\r\n" + _safetensors())
    (root / "short.mseal").write_bytes(b"\x89MSEAL\r\n")
    report = _scan(root, env)
    by = {Path(f.location).name: f for f in report.findings}
    assert set(by) == {"disguised.bin", "short.mseal"}
    assert all(f.kind == "damaged-slot" and f.severity == "critical" for f in by.values())
    assert "safetensors model behind the magic" in by["disguised.bin"].detail


# -- 10, 13: the walk and the signature file stay inside the folder ----------------------------


def test_a_folder_swapped_for_a_symlink_during_the_walk_is_not_followed(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = env.work / "root", env.work / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "0-first.txt").write_text("listed before a/ is entered")
    (outside / "secret-model.npy").write_bytes(_npy())
    real = scanlocal.examine
    swapped: list[bool] = []

    def examine(blob: Any, ctx: Any, neighbours: Any) -> None:
        if not swapped:  # between listing root and entering a/, a/ becomes a link outside
            (root / "a").rmdir()
            os.symlink(outside, root / "a")
            swapped.append(True)
        real(blob, ctx, neighbours)

    monkeypatch.setattr(scanlocal, "examine", examine)
    report = _scan(root, env)
    assert swapped and not report.findings, [f.line() for f in report.findings]
    assert report.formats["symlink"] == 1


def test_a_symlinked_signature_file_is_not_read(env: Env, tmp_path: Path) -> None:
    signers = _signers(tmp_path)
    art = _seal(env, env.work / "tree" / "b.mseal", signers["release"])
    elsewhere = env.work / "elsewhere"
    elsewhere.mkdir()
    shutil.move(signature_path(art), elsewhere / "b.mseal.msig")
    os.symlink(elsewhere / "b.mseal.msig", signature_path(art))
    report = _scan(env.work / "tree", env, _policy(tmp_path))
    assert _kinds(report) == {"b.mseal": {"untrusted-signature"}}
    assert report.states["sealed-signed"] == 0


# -- 6, 7, 8: signatures judged as verify judges them ---------------------------------------------


def _forge(art: Path, donor_sig: Path) -> None:
    """A signature file whose statement names ``art``'s header, the envelope's signature left as
    it was (now invalid), its id recomputed (a public hash)."""
    src = FdSource(open_regular(art))
    raw = read_raw(src)
    src.close()
    doc = json.loads(donor_sig.read_bytes())
    e = doc["signatures"][0]
    st = json.loads(base64.b64decode(e["envelope"]["payload"]))
    st["predicate"]["files"][0]["header"]["blake3"] = header_digest(raw)
    st["predicate"]["files"][0]["size"] = raw.layout.file_length
    payload = canonical_json(st)
    e["envelope"]["payload"] = base64.b64encode(payload).decode()
    e["id"] = hashlib.sha256(e["envelope"]["signatures"][0]["keyid"].encode() + b"\x00" + payload).hexdigest()
    signature_path(art).write_text(json.dumps(doc))


def test_without_a_trust_policy_a_forged_signature_is_untrusted(env: Env, tmp_path: Path) -> None:
    signers = _signers(tmp_path)
    good = _seal(env, env.work / "tree" / "good.mseal", signers["release"])
    forged = _seal(env, env.work / "tree" / "forged.mseal")
    _forge(forged, signature_path(good))
    report = _scan(env.work / "tree", env)
    assert _kinds(report) == {"forged.mseal": {"untrusted-signature"}}, [f.line() for f in report.findings]
    assert report.states["sealed-signed"] == 1 and report.states["sealed-unsigned"] == 1
    assert any("keys they carry" in n for n in report.notes)


def test_an_expired_revocation_list_fails_closed(env: Env, tmp_path: Path) -> None:
    signers = _signers(tmp_path)
    _seal(env, env.work / "tree" / "m.mseal", signers["release"])
    now = datetime.now(UTC)
    lst = tmp_path / "revocations.json"
    write_list(lst, RevocationList(1, now - timedelta(days=8), now - timedelta(hours=1), []), signers["security"])
    policy = _policy(tmp_path, extra_rule=f'[revocation]\nlist = "{lst}"\nsigners = ["security"]\n')
    report = _scan(env.work / "tree", env, policy)
    assert _kinds(report) == {"m.mseal": {"untrusted-signature"}}
    assert "revocation list cannot be used" in report.findings[0].detail
    assert report.states["sealed-signed"] == 0


def test_signatures_are_judged_as_verify_judges_them(env: Env, tmp_path: Path) -> None:
    signers = _signers(tmp_path)
    split = _seal(env, env.work / "tree" / "split.mseal")
    modelseal.sign(split, signers["release"], name="split", version=1, keys=env.svc)
    modelseal.sign(split, signers["security"], name="split", version=3, keys=env.svc)
    sig = json.loads(signature_path(split).read_bytes())  # both current, as a hand-edited file has them
    sig["signatures"] += [{k: v for k, v in h.items() if k != "superseded_at"} for h in sig.get("history", [])]
    sig["history"] = []
    signature_path(split).write_text(json.dumps(sig))
    _seal(env, env.work / "tree" / "old.mseal", signers["release"], name="old")
    _seal(env, env.work / "tree" / "ok.mseal", signers["release"], name="ok")
    policy = _policy(tmp_path, extra_rule="threshold = 1\n")
    env_of = str(modelseal.inspect(env.work / "tree" / "old.mseal")["context"]["env"])
    remember_accepted(load_policy(policy).identity(), env_of, "old", 5)  # this host accepted version 5 once
    report = _scan(env.work / "tree", env, policy)
    assert _kinds(report) == {"split.mseal": {"untrusted-signature"}, "old.mseal": {"untrusted-signature"}}
    by = {Path(f.location).name: f.detail for f in report.findings}
    assert "disagree on the artifact's version" in by["split.mseal"]
    assert "rolled back" in by["old.mseal"]
    assert report.states["sealed-signed"] == 1
    # a policy that requires names: judged under the signed name, and said so
    named = _policy(tmp_path, extra="require_name = true\n")
    report = _scan(env.work / "tree" / "ok.mseal", env, named)
    assert not report.findings and any("expected name" in n for n in report.notes)


# -- 9: one target's bad certificate hides nothing ----------------------------------------------------


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def _children(data: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(data):
        tag, n = data[i], data[i + 1]
        i += 2
        if n & 0x80:
            width = n & 0x7F
            n, i = int.from_bytes(data[i : i + width], "big"), i + width
        out.append((tag, data[i : i + n]))
        i += n
    return out


def _utctime_without_seconds(cert_pem: Path) -> None:
    """Rewrite the certificate's notBefore as a UTCTime without seconds (OpenSSL takes it,
    cryptography refuses it); the signature no longer matches, which no client here checks."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(cert_pem.read_bytes()).public_bytes(serialization.Encoding.DER)
    ((_, cert),) = _children(der)
    (_, tbs), alg, sig = _children(cert)
    parts = _children(tbs)
    nb, na = _children(parts[4][1])  # version, serial, signature algorithm, issuer, validity
    parts[4] = (0x30, _tlv(0x17, nb[1][:10] + b"Z") + _tlv(*na))
    body = _tlv(0x30, _tlv(0x30, b"".join(_tlv(t, c) for t, c in parts)) + _tlv(*alg) + _tlv(*sig))
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(body).not_valid_before_utc
    cert_pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(body) + b"-----END CERTIFICATE-----\n")


def test_a_certificate_that_does_not_parse_hides_no_other_target(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no sslyze: an error line; the rest still checked
    monkeypatch.delenv("MODELSEAL_SSLYZE_PYTHON", raising=False)
    cert, key = _self_signed(tmp_path / "tls", 30)
    _utctime_without_seconds(cert)
    (env.work / "tree").mkdir()
    (env.work / "tree" / "w.safetensors").write_bytes(_safetensors())
    textfile = tmp_path / "t.prom"
    with _tls_server(cert, key) as port:
        code = main(["scan", str(env.work / "tree"), f"tls://127.0.0.1:{port}", "--textfile", str(textfile)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 19
    assert any(x.startswith("plaintext-model  ") for x in lines), lines
    assert any(x.startswith("tls-pin-mismatch  ") and "does not parse" in x for x in lines), lines
    assert "modelseal_scan_findings" in textfile.read_text()


# -- 15: lines names cannot forge, findings bounded ---------------------------------------------------


def test_a_location_cannot_fake_the_fields_of_a_line(env: Env) -> None:
    root = env.work / "tree"
    root.mkdir()
    name = "x.npy  plaintext-model  fake"
    (root / name).write_bytes(_npy())
    (lines,) = [x for x in _scan(root, env).lines() if x.startswith("plaintext-model")]
    _kind, location, detail = lines.split("  ", 2)
    assert location == str(root / name).replace(" ", "\\x20") and " " not in location
    assert detail == "a plaintext NumPy .npy model file, not sealed"


def test_findings_are_bounded_in_memory_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scanmodel, "MAX_PER_KIND", 5, raising=False)
    report = ScanReport("x")
    for i in range(12):
        report.add(Finding("plaintext-model", f"/m/{i}", "a plaintext model", "critical"))
    assert len(report.findings) == 5 and report.by_kind()["plaintext-model"] == 12
    assert any("7 more plaintext-model findings" in x for x in report.lines())
    assert report.lines()[-1].startswith("scanned 0 files in 0.00s: 12 findings")


# -- 12, 15: S3 -----------------------------------------------------------------------------------------


class _S3Stub:
    """An S3 service in memory that keeps a key ending in '/' with bytes (AWS does; SeaweedFS
    rewrites such keys) and refuses the ACL call."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def get_paginator(self, name: str) -> Any:
        objects = self.objects

        class Pages:
            def paginate(self, **kw: Any) -> list[dict[str, Any]]:
                return [{"Contents": [{"Key": k, "Size": len(v)} for k, v in objects.items()]}]

        return Pages()

    def get_object(self, Bucket: str, Key: str, Range: str) -> dict[str, Any]:
        a, b = (int(x) for x in Range.removeprefix("bytes=").split("-"))
        data = self.objects[Key][a : b + 1]
        return {"Body": io.BytesIO(data), "ContentRange": f"bytes {a}-{a + len(data) - 1}/{len(self.objects[Key])}"}

    def get_bucket_encryption(self, Bucket: str) -> dict[str, Any]:
        return {
            "ServerSideEncryptionConfiguration": {
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
            }
        }

    def get_public_access_block(self, Bucket: str) -> dict[str, Any]:
        raise _S3Error("NotImplemented")

    def get_bucket_acl(self, Bucket: str) -> dict[str, Any]:
        raise _S3Error("AccessDenied")

    def get_bucket_policy_status(self, Bucket: str) -> dict[str, Any]:
        return {"PolicyStatus": {"IsPublic": False}}


class _S3Error(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}}


def test_s3_keys_ending_in_a_slash_are_objects_and_notes_claim_nothing_unread() -> None:
    report = ScanReport("s3://b/models/")
    stub = _S3Stub({"models/llama/": _safetensors(), "models/dir/": b"", "models/x.safetensors": _safetensors()})
    scans3.scan_s3("s3://b/models/", context(report, ScanOptions(table={}), {}), s3=stub)
    assert sorted(f.location for f in report.findings) == ["s3://b/models/llama/", "s3://b/models/x.safetensors"]
    assert report.files == 2
    (note,) = [n for n in report.notes if "public access block unknown" in n]
    assert "grant no public access" not in note and "unread" in note


# -- 14: the registry cursor costs its page, not a scan from the start -----------------------------


def test_manifest_page_is_an_index_range(tmp_path: Path) -> None:
    meta = SqlMeta.sqlite(tmp_path / "registry.db")
    with meta._connection() as conn:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO reg_manifests VALUES (?, ?, 'm', x'00', 1, NULL, NULL, NULL, 0)",
            [(f"repo{i // 100:04d}", f"sha256:{i:064x}") for i in range(20_000)],
        )
        conn.execute("COMMIT")
        steps: list[int] = []
        conn.set_progress_handler(lambda: steps.append(1) or 0, 100)
        page = meta.manifest_page(("repo0190", f"sha256:{19_050:064x}"), 10)
        conn.set_progress_handler(None, 100)
    assert page[0][:2] == ("repo0190", f"sha256:{19_051:064x}") and len(page) == 10
    assert len(steps) < 20, len(steps)  # a scan from the start takes over 1000 (100 VM steps each)
    meta.close()
