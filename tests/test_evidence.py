"""``modelseal evidence export`` and ``verify`` (docs/evidence.md): a round trip on a home with
keys, a CA, governance state, audit events, backup, drill and controls records and a TLS
report; every tamper case; the wrong key; the window; a failed export leaves no bundle."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelseal.audit import merkle
from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog, public_key_hex
from modelseal.cli import main
from modelseal.errors import EvidenceError, EvidenceTampered
from modelseal.evidence import auditproof, records, verify
from modelseal.evidence.bundle import Sources, export
from modelseal.evidence.controls import CONTROLS, NONE
from modelseal.evidence.model import Window, canonical
from modelseal.governance import review
from modelseal.governance.approvals import Approvals
from modelseal.governance.cedar import default_policy
from modelseal.governance.model import Binding, Resource
from modelseal.governance.store import GovStore
from modelseal.governance.versions import PolicyStore
from modelseal.keys import keystore
from modelseal.keys.service import KeyService
from modelseal.pki import ca as pki_ca
from modelseal.pki import issue
from modelseal.pki.identity import Identity
from modelseal.recipes import context as recipes_context
from modelseal.recovery import records as recovery_records
from modelseal.telemetry import controlsrecord
from modelseal.telemetry.scanmodel import TLS_CERTIFICATE_LIFETIME, Finding, ScanReport
from tests.conftest import PASSPHRASE

TD = "example.org"
ALICE = f"spiffe://{TD}/prod/user/alice"
BOB = f"spiffe://{TD}/prod/user/bob"
OLD = 1_600_000_000.0  # 2020-09-13: an event outside the window
DAY = 86400.0


@dataclass
class Site:
    root: Path
    home: Path
    data: Path
    bundle: Path
    key_hex: str
    start: str
    end: str
    serials: tuple[str, str]  # issued, revoked


def _today(offset: float = 0.0) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() + offset))


def _governance(target: str, cert_dir: Path, now: float) -> None:
    store = GovStore.open(target)
    store.bind(Binding("", BOB, "auditor", "prod", now + 90 * DAY), "boot", now)
    store.bind(Binding("", f"spiffe://{TD}/prod/service/*", "reader", "prod", now + 30 * DAY), ALICE, now)
    rows = store.bindings(include_expired=True, now=now)
    store.close()
    ps = PolicyStore.open(target)
    v = ps.propose(default_policy().text, ALICE, "the shipped policy", now=now)
    ps.activate(v.digest, ALICE, [BOB, "spiffe://example.org/prod/user/carol"], now=now + 1)
    ps.close()
    ap = Approvals.open(target)
    ap.request("policy.activate", Resource("policy", v.digest, {"env": "prod"}), {"digest": v.digest}, ALICE, now=now)
    ap.close()
    rv = review.build(rows, now=now)
    reviews = review.Reviews.open(target)
    reviews.keep(rv, ALICE)
    key, me = review.load_reviewer(cert_dir)
    leaf = (cert_dir / "cert.pem").read_bytes()
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(leaf).public_bytes(serialization.Encoding.DER)
    reviews.attest(str(rv["digest"]), me, review.sign(key, str(rv["digest"]), me), der, now=now + 5)
    reviews.close()


def _records(home: Path, log: MerkleAuditLog, now: float) -> None:
    recovery_records.write_record(
        recovery_records.DRILL,
        {"started": now, "finished": now + 12, "rto_seconds": 12.0},
        home,
        log,
        result="ok",
        started=now,
    )
    # A backup record as recovery.create writes it: signed under its domain, a backup-record event.
    from modelseal.recovery import create as recovery_create

    body = {"format": recovery_create.RECORD_FORMAT, "id": "b-0001", "created": int(now), "result": "ok", "sequence": 1}
    key = log.signing_key
    signed = recovery_create.RECORD_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    doc = {"body": body, "signer": public_key_hex(key.public_key()), "signature": key.sign(signed).hex()}
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    folder = home / "evidence" / "backups"
    folder.mkdir(parents=True, mode=0o700)
    (folder / "backup-0001.json").write_bytes(data)
    log.emit(
        AuditEvent(
            "backup-record",
            "evidence:evidence/backups/backup-0001.json",
            "ok",
            artifact=hashlib.sha256(data).hexdigest(),
        )
    )
    row = controlsrecord.Row("tls-1.2", "TLS 1.2 handshake", "refused", refused=True, local_alert=True)
    row.judge()
    rep = controlsrecord.Report("127.0.0.1:9", ALICE, now, [row], finished=now + 1)
    controlsrecord.record(rep, home, log)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("evidence")
    home, data = root / "home", root / "data"
    home.mkdir(mode=0o700)
    data.mkdir(mode=0o700)
    mp.setenv("MODELSEAL_HOME", str(home))
    mp.setenv("MODELSEAL_PASSPHRASE", PASSPHRASE)
    mp.delenv("MODELSEAL_AGENT_SOCK", raising=False)
    mp.delenv("MODELSEAL_AUDIT_URL", raising=False)
    mp.setattr(recipes_context, "_service", None)
    keystore.clear_cache()
    keystore.create(keystore.keystore_path(home), PASSPHRASE.encode(), scrypt_log2_n=14)
    cfg = home / "config.toml"
    cfg.write_text('rotate_after_days = 90\n[environments.prod]\nkeys = ["local:prod-kek"]\nrotate_after_days = 30\n')
    cfg.chmod(0o600)
    log = MerkleAuditLog(home / "audit.db")
    svc = KeyService(sink=log)
    now = time.time()
    log.emit(AuditEvent("rotate", "local:ancient-kek", "ok", 1, time=OLD))
    svc.create("local:prod-kek")
    svc.rotate("local:prod-kek")
    svc.create("local:retired-kek")
    svc.destroy("local:retired-kek", 1)
    pki_ca.init_ca(svc, TD)
    alice = issue.issue(svc, Identity.of(TD, "prod", "user", "alice"))
    issue.write_dir(alice, root / "alice-tls")
    gone = issue.issue(svc, Identity.of(TD, "prod", "service", "trainer"))
    issue.revoke(svc, gone.cert.serial_number, "key compromise")
    _governance(str(data / "governance.db"), root / "alice-tls", now)
    _records(home, log, now)
    scan = ScanReport("tls://127.0.0.1:8443")
    scan.add(Finding(TLS_CERTIFICATE_LIFETIME, "tls://127.0.0.1:8443", "leaf valid for 400 days <b>x</b>"))
    (root / "scan.json").write_text(json.dumps(scan.to_json()))
    start, end = _today(-DAY), _today(DAY)
    bundle = root / "bundle"
    rc = main(
        [
            "evidence",
            "export",
            "--from",
            start,
            "--to",
            end,
            "--out",
            str(bundle),
            "--data",
            str(data),
            "--tls-report",
            str(root / "scan.json"),
        ]
    )
    assert rc == 0
    hexkey = public_key_hex(log.signing_key.public_key())
    serials = (f"{alice.cert.serial_number:X}", f"{gone.cert.serial_number:X}")
    yield Site(root, home, data, bundle, hexkey, start, end, tuple(s.zfill(len(s) + len(s) % 2) for s in serials))
    keystore.clear_cache()
    mp.undo()


def _doc(bundle: Path, name: str) -> Any:
    return json.loads((bundle / name).read_text())


def _verify(bundle: Path, key_hex: str) -> tuple[int, str]:
    """The CLI's exit code and its stderr."""
    r = subprocess.run(
        [sys.executable, "-m", "modelseal.cli", "evidence", "verify", str(bundle), "--signer-key", key_hex],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=60,
    )
    return r.returncode, r.stderr


def test_round_trip_gathers_every_section(site: Site) -> None:
    keys = _doc(site.bundle, "keys.json")["items"]
    inv = {k["key"]: k for k in keys["keys.inventory"]}
    assert inv["local:prod-kek"]["latest_version"] == 2 and inv["local:prod-kek"]["rotate_after_days"] == 30
    assert inv["local:retired-kek"]["destroyed_versions"] == [1] and inv["local:retired-kek"]["rotate_after_days"] == 90
    assert inv["local:prod-kek"]["environments"] == ["prod"] and not inv["local:prod-kek"]["rotation_due"]
    ops = [(e["operation"], e["key"]) for e in keys["keys.history"]]
    assert ("rotate", "local:prod-kek") in ops and ("destroy", "local:retired-kek") in ops
    certs = _doc(site.bundle, "certificates.json")["items"]
    assert {c["role"] for c in certs["certificates.authority"]} == {"root", "issuing"}
    assert {c["serial"] for c in certs["certificates.issued"]} >= set(site.serials)
    assert [c["serial"] for c in certs["certificates.revoked"]] == [site.serials[1]]
    access = _doc(site.bundle, "access.json")["items"]
    assert {b["identity"] for b in access["access.bindings"]} == {BOB, f"spiffe://{TD}/prod/service/*"}
    assert [a["reviewer"] for a in access["access.attestations"]] == [ALICE]
    changes = _doc(site.bundle, "changes.json")["items"]
    assert changes["changes.activations"][0]["approved_by"] == sorted([BOB, "spiffe://example.org/prod/user/carol"])
    assert [a["action"] for a in changes["changes.approvals"]] == ["policy.activate"]
    assert changes["changes.policy_versions"][0]["proposer"] == ALICE
    rec = _doc(site.bundle, "recovery.json")["items"]
    for item, kind in (
        ("recovery.drills", "drills"),
        ("recovery.backups", "backups"),
        ("recovery.controls_tests", "controls"),
    ):
        (r,) = rec[item]
        copy = (site.bundle / r["file"]).read_bytes()
        assert r["file"].startswith(f"records/{kind}/") and hashlib.sha256(copy).hexdigest() == r["sha256"]
        assert isinstance(r["entry"], int)
    assert rec["recovery.drills"][0]["signature"].startswith("valid")
    assert rec["recovery.backups"][0]["signature"].startswith("valid")
    assert rec["recovery.controls_tests"][0]["signature"] == "unsigned"
    tls = _doc(site.bundle, "tls.json")["items"]["tls.scans"]
    assert tls[0]["target"] == "tls://127.0.0.1:8443" and len(tls[0]["findings"]) == 1
    audit = _doc(site.bundle, "audit.json")
    (v,) = audit["items"]["audit.verification"]
    assert v["ok"] is True and audit["tree_head"]["size"] == v["entries"]


def test_the_index_lists_every_control_and_says_when_one_has_no_evidence(site: Site) -> None:
    index = _doc(site.bundle, "index.json")
    refs = [c["ref"] for c in index["controls"]]
    assert refs == [c.ref for c in CONTROLS]
    assert {"CC6.1", "CC6.7", "CC7.2", "CC8.1", "A1.3", "A.8.24", "A.8.13", "3.6", "3.7"} <= set(refs)
    assert all(c["title"] and c["items"] for c in index["controls"])
    assert all(c["status"] != NONE for c in index["controls"])  # this home evidences every one
    a13 = next(c for c in index["controls"] if c["ref"] == "A1.3")
    assert {i["item"]: i["count"] for i in a13["items"]}["recovery.drills"] == 1


def test_verify_accepts_the_bundle_and_every_cited_event_is_proven(site: Site) -> None:
    code, err = _verify(site.bundle, site.key_hex)
    assert code == 0, err
    audit = _doc(site.bundle, "audit.json")
    th = audit["tree_head"]
    for p in audit["proofs"]:  # offline, with nothing but the tree head
        leaf = merkle.leaf_hash(p["body"].encode())
        path = [bytes.fromhex(h) for h in p["inclusion_proof"]]
        assert merkle.verify_inclusion(p["entry"] - 1, th["size"], leaf, path, bytes.fromhex(th["head"]))
    cited = {
        e["entry"]
        for f in ("keys.json", "certificates.json", "recovery.json")
        for items in _doc(site.bundle, f)["items"].values()
        for e in items
        if isinstance(e.get("entry"), int)
    }
    assert cited and cited <= {p["entry"] for p in audit["proofs"]}


def test_the_window_filters_events(site: Site, tmp_path: Path) -> None:
    inside = _doc(site.bundle, "keys.json")["items"]["keys.history"]
    assert "local:ancient-kek" not in {e["key"] for e in inside}
    src = Sources(site.home, site.home / "audit.db", str(site.data / "governance.db"))
    old = export(tmp_path / "old", Window.parse("2020-09-01", "2020-09-30"), src, KeyService())
    history = _doc(old.folder, "keys.json")["items"]["keys.history"]
    assert [(e["operation"], e["key"], e["time"]) for e in history] == [("rotate", "local:ancient-kek", OLD)]
    assert _doc(old.folder, "certificates.json")["items"]["certificates.issued"] == []
    assert _doc(old.folder, "recovery.json")["items"]["recovery.drills"] == []  # its event is of today
    assert not (old.folder / "records").exists()
    index = _doc(old.folder, "index.json")
    a13 = next(c for c in index["controls"] if c["ref"] == "A1.3")
    assert a13["status"] == NONE and set(a13["missing"]) == set(
        a13["items"][i]["item"] for i in range(len(a13["items"]))
    )
    assert verify.check(old.folder, verify.trusted_keys([site.key_hex], site.home / "audit.db")).ok


def _copy(site: Site, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(site.bundle, out)
    return out


def _problems(bundle: Path, key_hex: str) -> list[str]:
    return list(verify.check(bundle, verify.trusted_keys([key_hex], "/nonexistent")).problems)


def test_an_edited_byte_is_named(site: Site, tmp_path: Path) -> None:
    b = _copy(site, tmp_path)
    data = bytearray((b / "keys.json").read_bytes())
    i = data.index(b"prod-kek")
    data[i] = ord("q")
    (b / "keys.json").write_bytes(bytes(data))
    assert _problems(b, site.key_hex) == ["keys.json: changed (its SHA-256 is not the manifest's)"]
    code, err = _verify(b, site.key_hex)
    assert code == EvidenceTampered.exit_code and "keys.json: changed" in err and len(err.strip().splitlines()) == 2


def test_a_deleted_file_is_named(site: Site, tmp_path: Path) -> None:
    b = _copy(site, tmp_path)
    (b / "tls.json").unlink()
    assert _problems(b, site.key_hex) == ["tls.json: missing (deleted)"]
    drill = next((b / "records" / "drills").iterdir())
    drill.unlink()
    assert f"records/drills/{drill.name}: missing (deleted)" in _problems(b, site.key_hex)


def test_an_added_file_is_named(site: Site, tmp_path: Path) -> None:
    b = _copy(site, tmp_path)
    (b / "records" / "drills" / "extra.json").write_text("{}")
    assert _problems(b, site.key_hex) == ["records/drills/extra.json: not in the manifest (added)"]
    code, err = _verify(b, site.key_hex)
    assert code == 28 and "added" in err


def test_two_reordered_entries_of_a_list_are_caught(site: Site, tmp_path: Path) -> None:
    b = _copy(site, tmp_path)
    doc = _doc(b, "keys.json")
    hist = doc["items"]["keys.history"]
    assert len(hist) >= 2
    hist[0], hist[1] = hist[1], hist[0]
    (b / "keys.json").write_bytes(canonical(doc))  # still canonical JSON, only the order changed
    assert _problems(b, site.key_hex) == ["keys.json: changed (its SHA-256 is not the manifest's)"]


def test_reordered_manifest_entries_break_the_signature(site: Site, tmp_path: Path) -> None:
    b = _copy(site, tmp_path)
    m = _doc(b, "manifest.json")
    m["files"][1], m["files"][2] = m["files"][2], m["files"][1]
    (b / "manifest.json").write_bytes(canonical(m))
    problems = _problems(b, site.key_hex)
    assert any("manifest.sig: the signature does not verify" in p for p in problems)
    assert any("not listed in the bundle's order" in p for p in problems)


def test_a_swapped_signature_or_the_wrong_key_is_refused(site: Site, tmp_path: Path) -> None:
    b = _copy(site, tmp_path)
    other = Ed25519PrivateKey.generate()
    raw = (b / "manifest.json").read_bytes()
    forged = canonical({"format": "modelseal-evidence-signature/v1", "signature": other.sign(raw).hex()})
    (b / "manifest.sig").write_bytes(forged)
    expect = "manifest.sig: the signature does not verify under the expected key (another key, or an edited manifest)"
    assert _problems(b, site.key_hex) == [expect]
    # The untouched bundle under another expected key: refused, whatever key the manifest names.
    assert _problems(site.bundle, public_key_hex(other.public_key())) == [expect]
    code, err = _verify(site.bundle, public_key_hex(other.public_key()))
    assert code == 28 and "signature does not verify" in err


def test_a_forged_inclusion_proof_is_caught_even_if_resigned(site: Site, tmp_path: Path) -> None:
    """An exporter cannot cite an event the log does not hold: the proof fails against the
    tree head the log signed, whatever key signs the manifest."""
    doc = json.loads((site.bundle / "audit.json").read_text())
    doc["proofs"][0]["body"] = doc["proofs"][0]["body"].replace('"ok"', '"FORGED"', 1)
    doc["proofs"][0]["leaf_hash"] = merkle.leaf_hash(doc["proofs"][0]["body"].encode()).hex()
    problems, proven = auditproof.check(doc)
    assert problems == [
        f"audit entry {doc['proofs'][0]['entry']}: the inclusion proof does not verify against the signed tree head"
    ]
    assert doc["proofs"][0]["entry"] not in proven


def test_proof_tree_matches_the_audit_merkle_code() -> None:
    for n in range(1, 70):
        leaves = [merkle.leaf_hash(bytes([i % 256, n])) for i in range(n)]
        tree = auditproof.ProofTree(leaves)
        assert tree.root() == merkle.root(leaves)
        for size in (n, max(1, n // 2)):
            for i in range(size):
                assert tree.path(i, size) == merkle.inclusion_proof(i, leaves[:size])


def test_record_domains_match_the_recovery_records() -> None:
    from modelseal.recovery import create as recovery_create

    for kind, fmt in recovery_records.FORMATS.items():
        assert records.DOMAINS[fmt] == recovery_records.DOMAIN[kind]
    assert records.DOMAINS[recovery_create.RECORD_FORMAT] == recovery_create.RECORD_DOMAIN


def test_export_refuses_an_existing_folder_and_bad_dates(site: Site, tmp_path: Path) -> None:
    src = Sources(site.home, site.home / "audit.db")
    (tmp_path / "there").mkdir()
    with pytest.raises(EvidenceError, match="already exists"):
        export(tmp_path / "there", Window.parse(site.start, site.end), src, KeyService())
    with pytest.raises(EvidenceError, match="no offset"):
        Window.parse("2026-01-01T10:00:00", "2026-02-01")
    with pytest.raises(EvidenceError, match="empty"):
        Window.parse("2026-02-01", "2026-01-01")
    assert main(["evidence", "export", "--from", "yesterday", "--to", site.end, "--out", str(tmp_path / "x")]) == 27


def test_a_failed_export_leaves_no_bundle(site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelseal.evidence import bundle

    calls = []
    real = bundle.write_new

    def failing(path: Path, data: bytes, mode: int = 0o600) -> None:
        calls.append(path.name)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        real(path, data, mode)

    monkeypatch.setattr(bundle, "write_new", failing)
    out = tmp_path / "out"
    with pytest.raises(EvidenceError, match="No space left"):
        export(out, Window.parse(site.start, site.end), Sources(site.home, site.home / "audit.db"), KeyService())
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_killed_export_leaves_no_bundle(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = f"""
import os, signal
from pathlib import Path
from modelseal.evidence import bundle
from modelseal.evidence.model import Window
from modelseal.keys.service import KeyService
real, n = bundle.write_new, [0]
def dying(path, data, mode=0o600):
    n[0] += 1
    if n[0] == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data, mode)
bundle.write_new = dying
bundle.export(Path({str(out)!r}), Window.parse({site.start!r}, {site.end!r}),
              bundle.Sources(Path({str(site.home)!r}), Path({str(site.home / "audit.db")!r})), KeyService())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".out.") for p in leftovers)  # a hidden temporary, never the bundle
    code_rc, err = _verify(out, site.key_hex)
    assert code_rc == 28 and "no evidence bundle here" in err
