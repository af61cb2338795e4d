"""The red-team review of the evidence bundle (docs/evidence.md): one regression test per
finding. Links in the record folders are never followed and no stray bytes are copied; a
control counts qualifying evidence only; removed bindings come back from the audit log;
verify reads nothing a trusted key did not sign and never crashes on malformed content; a
folder planted beside ``--out`` is never moved into place; the tree head's key must be
trusted; a lone surrogate does not block the export; truncated record folders say so; and
bad input exits 27 with one line."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelseal.audit.checks import signed_message
from modelseal.audit.events import AuditEvent
from modelseal.audit.hosts import key_id
from modelseal.audit.log import MerkleAuditLog, public_key_hex
from modelseal.cli import main
from modelseal.errors import EvidenceError
from modelseal.evidence import bundle, records, verify
from modelseal.evidence.bundle import Sources, export
from modelseal.evidence.controls import CONTROLS, EVIDENCED, NONE, UNVERIFIED
from modelseal.evidence.model import DOMAIN, Window, canonical
from modelseal.governance.model import Binding
from modelseal.governance.store import GovStore
from modelseal.keys.service import KeyService
from modelseal.recovery import records as recovery_records
from tests.conftest import Env

DAY = 86400.0


@dataclass
class Home:
    home: Path
    log: MerkleAuditLog
    key_hex: str
    window: Window


@pytest.fixture
def home(env: Env) -> Iterator[Home]:
    log = MerkleAuditLog(env.home / "audit.db")
    day = time.strftime("%Y-%m-%d", time.gmtime())
    before = time.strftime("%Y-%m-%d", time.gmtime(time.time() - DAY))
    yield Home(env.home, log, public_key_hex(log.signing_key.public_key()), Window.parse(before, day))


def _drill(h: Home, result: str = "ok") -> Path:
    now = time.time()
    path, _ = recovery_records.write_record(
        recovery_records.DRILL, {"started": now, "finished": now + 1}, h.home, h.log, result=result, started=now
    )
    return path


def _controls_record(h: Home, body: bytes, result: str = "pass", name: str = "controls-1.json") -> Path:
    folder = h.home / "evidence" / "controls"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    (folder / name).write_bytes(body)
    h.log.emit(AuditEvent("controls-test", f"evidence:evidence/controls/{name}", result, artifact=_sha(body)))
    return folder / name


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _export(h: Home, out: Path, governance: str | None = None, window: Window | None = None) -> bundle.Exported:
    return export(out, window or h.window, Sources(h.home, h.home / "audit.db", governance), KeyService())


def _doc(folder: Path, name: str) -> Any:
    return json.loads((folder / name).read_text())


def _problems(folder: Path, key_hex: str, window: Window | None = None) -> list[str]:
    return list(verify.check(folder, verify.trusted_keys([key_hex], "/nonexistent"), window).problems)


def _status(folder: Path) -> dict[str, str]:
    return {c["ref"]: c["status"] for c in _doc(folder, "index.json")["controls"]}


def _resign(folder: Path, log: MerkleAuditLog, name: str, data: bytes) -> None:
    """Replace ``name`` and sign the manifest again with the host's key: what only the key's
    holder can do; the contents checks must still catch what is wrong."""
    (folder / name).write_bytes(data)
    m = _doc(folder, "manifest.json")
    for f in m["files"]:
        if f["name"] == name:
            f["sha256"], f["size"] = _sha(data), len(data)
    raw = canonical(m)
    (folder / "manifest.json").write_bytes(raw)
    sig = {"format": "modelseal-evidence-signature/v1", "signature": log.signing_key.sign(DOMAIN + raw).hex()}
    (folder / "manifest.sig").write_bytes(canonical(sig))


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


# -- 1. links and stray files in $MODELSEAL_HOME/evidence ---------------------------------


def test_links_in_the_record_folders_are_never_followed(home: Home, tmp_path: Path) -> None:
    key = (home.home / "audit-signing.key").read_bytes()
    drill = _drill(home)
    drill.unlink()
    os.symlink("../../audit-signing.key", drill)  # the vouched record swapped for a link to the key
    ctl = _controls_record(home, canonical({"format": "modelseal-controls-test/v1", "started": time.time()}))
    ctl.unlink()
    os.link(home.home / "audit-signing.key", ctl)  # a hard link: a regular file with the key's bytes
    os.symlink(home.home, home.home / "evidence" / "backups")  # a linked kind folder
    done = _export(home, tmp_path / "b")
    blob = _all_bytes(done.folder)
    assert b"PRIVATE KEY" not in blob and key not in blob and not (done.folder / "records").exists()
    gaps = _doc(done.folder, "recovery.json")["gaps"]
    assert any(drill.name in g and "symbolic link" in g for g in gaps)
    assert any(ctl.name in g and "2 hard links" in g for g in gaps)
    assert any(g.startswith("evidence/backups: a symbolic link") for g in gaps)
    (entry,) = _doc(done.folder, "recovery.json")["items"]["recovery.drills"]
    assert entry["file"] is None and entry["signature"] == "unreadable" and isinstance(entry["entry"], int)
    assert _status(done.folder)["A1.3"] == UNVERIFIED  # the event is there, the record is not
    assert _problems(done.folder, home.key_hex) == []


def test_a_changed_or_unknown_record_is_listed_never_copied(home: Home, tmp_path: Path) -> None:
    drill = _drill(home)
    drill.write_bytes(drill.read_bytes().replace(b'"finished"', b'"finishes"'))  # differs from its event
    stray = home.home / "evidence" / "drills" / "notes.json"
    stray.write_bytes(b'{"password": "hunter2", "finished": %f}' % time.time())  # no record at all
    done = _export(home, tmp_path / "b")
    rec = _doc(done.folder, "recovery.json")
    by_path = {e["path"]: e for e in rec["items"]["recovery.drills"]}
    changed, other = by_path[f"evidence/drills/{drill.name}"], by_path["evidence/drills/notes.json"]
    assert changed["file"] is None and changed["sha256"] == _sha(drill.read_bytes()) != changed["artifact"]
    assert other["file"] is None and other["format"] is None and other["summary"] == {}
    assert b"hunter2" not in _all_bytes(done.folder) and not (done.folder / "records").exists()
    notes = rec["attention"]["recovery.drills"]
    assert any("differs from the digest" in n and "not copied" in n for n in notes)
    assert any("notes.json: not a modelseal-backup-drill/v1 record" in n for n in notes)
    assert _problems(done.folder, home.key_hex) == []


# -- 2. a control counts evidence, not entries --------------------------------------------


def test_only_qualifying_entries_evidence_a_control(home: Home, tmp_path: Path) -> None:
    forged = home.home / "evidence" / "drills"
    forged.mkdir(parents=True, mode=0o700)
    (forged / "drill-fake.json").write_text(json.dumps({"finished": time.time(), "result": "ok"}))
    home.log.emit(AuditEvent("backup-create", "backup:b-0001", "ok", artifact="00" * 32))
    first = _export(home, tmp_path / "forged")
    assert _status(first.folder)["A1.3"] == UNVERIFIED and _status(first.folder)["A.8.13"] == UNVERIFIED
    assert "SOC 2 A1.3" in first.unverified
    _drill(home, result="DrillFailed")
    failed = _export(home, tmp_path / "failed")
    a13 = next(c for c in _doc(failed.folder, "index.json")["controls"] if c["ref"] == "A1.3")
    assert a13["status"] == UNVERIFIED and {i["item"]: (i["count"], i["qualifying"]) for i in a13["items"]} == {
        "recovery.drills": (2, 0),
        "recovery.restores": (0, 0),
    }
    _drill(home)
    passed = _export(home, tmp_path / "passed")
    assert _status(passed.folder)["A1.3"] == EVIDENCED and _status(passed.folder)["A.8.13"] == EVIDENCED
    assert _problems(passed.folder, home.key_hex) == []


def test_incomplete_scans_and_undescribed_keys_do_not_count(home: Home, tmp_path: Path) -> None:
    (home.home / "config.toml").write_text('[environments.prod]\nkeys = ["local:gone-kek"]\n')
    scan = {"target": "tls://127.0.0.1:1", "findings": [], "errors": ["no TLS handshake"], "incomplete": True}
    src = Sources(home.home, home.home / "audit.db", tls_reports=(scan,))
    done = export(tmp_path / "b", home.window, src, KeyService())
    rows = {c["ref"]: c for c in _doc(done.folder, "index.json")["controls"]}
    assert rows["CC6.7"]["status"] == UNVERIFIED
    counted = {i["item"]: (i["count"], i["qualifying"]) for i in rows["5.3 Cryptoperiods"]["items"]}
    assert counted["keys.inventory"] == (2, 1)  # local:test-kek measured, local:gone-kek not
    assert {i["item"]: i["as_of"] for i in rows["5.3 Cryptoperiods"]["items"]}["keys.inventory"] == "state at export"


def test_a_past_window_lists_no_key_born_after_it(env: Env, home: Home, tmp_path: Path) -> None:
    env.svc.rotate("test-kek")
    done = _export(home, tmp_path / "b", window=Window.parse("2020-01-01", "2020-01-31"))
    keys = _doc(done.folder, "keys.json")
    assert keys["items"]["keys.inventory"] == []  # no negative ages: the key did not exist yet
    assert any("created after the window: local:test-kek" in n for n in keys["attention"]["keys.inventory"])
    assert _status(done.folder)["5.3 Cryptoperiods"] == NONE
    now = _export(home, tmp_path / "now")
    (row,) = _doc(now.folder, "keys.json")["items"]["keys.inventory"]
    assert row["latest_version"] == 2 and all(v["age_days"] >= 0 for v in row["versions"])


def test_verify_holds_each_record_entry_to_its_event(home: Home, tmp_path: Path) -> None:
    _drill(home)
    done = _export(home, tmp_path / "b")
    doc = _doc(done.folder, "recovery.json")
    (entry,) = doc["items"]["recovery.drills"]
    entry["artifact"] = entry["sha256"] = "ab" * 32  # a record the event never vouched for, counted
    _resign(done.folder, home.log, "recovery.json", canonical(doc))
    problems = _problems(done.folder, home.key_hex)
    assert any("differs from its proven audit event" in p for p in problems)
    assert any("not in the bundle with its entry's digest" in p for p in problems)


def test_the_control_table_after_review() -> None:
    by = {c.ref: c for c in CONTROLS}
    assert by["A1.3"].items == ("recovery.drills", "recovery.restores")
    assert set(by["A.8.13"].needs) == {"recovery.drills", "recovery.restores"}
    assert "audit.verification" not in by["3.6"].items
    assert {"changes.approvals", "access.attestations"} <= set(by["3.7"].items)


# -- 3. removed bindings -------------------------------------------------------------------


def test_a_binding_removed_before_export_is_listed_from_its_events(home: Home, tmp_path: Path) -> None:
    target = str(tmp_path / "governance.db")
    store = GovStore.open(target)
    now = time.time()
    who = "spiffe://example.org/prod/user/mallory"
    b = store.bind(Binding("", who, "key-admin", "prod", now + 30 * DAY), "spiffe://example.org/prod/user/alice", now)
    home.log.emit(AuditEvent("access-bind", f"binding:{b.id}", "ok:key-admin@prod", actor="alice", time=now))
    store.unbind(b.id, "alice")
    home.log.emit(AuditEvent("access-unbind", f"binding:{b.id}", "ok:key-admin@prod", actor="carol"))
    old = store.bind(Binding("", who, "auditor", "prod", now + DAY), "spiffe://example.org/prod/user/alice", now)
    store.unbind(old.id, "alice")
    home.log.emit(AuditEvent("access-unbind", f"binding:{old.id}", "ok:auditor@prod", time=now - 9 * DAY))
    store.close()
    done = _export(home, tmp_path / "b", governance=target)
    access = _doc(done.folder, "access.json")
    (row,) = access["items"]["access.bindings"]  # the one removed before the window is not of it
    assert (row["id"], row["role"], row["env"], row["flags"]) == (b.id, "key-admin", "prod", ["removed"])
    assert row["removed_by"] == "carol" and row["created_by"] == "alice" and row["removed"]
    assert any("removed before the export" in n for n in access["attention"]["access.bindings"])
    proven = {p["entry"] for p in _doc(done.folder, "audit.json")["proofs"]}
    assert row["entry"] in proven
    assert _problems(done.folder, home.key_hex) == []


# -- 4. verify reads nothing unsigned; malformed content is a problem line ---------------


def test_an_unsigned_bundle_is_listed_and_never_read(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = _export(home, tmp_path / "b")
    m = _doc(done.folder, "manifest.json")
    m["files"][0]["sha256"] = "\u00e9"
    m["files"].append({"name": "records/drills/big.json", "sha256": "00" * 32, "size": 64 << 20})
    (done.folder / "manifest.json").write_bytes(canonical(m))
    big = done.folder / "records" / "drills" / "big.json"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as f:
        f.truncate(64 << 20)  # sparse: costs the attacker nothing
    (done.folder / "keys.json").write_bytes(b'{"items": [1]}')

    def never(*_: object) -> None:
        raise AssertionError("verify read a file of a bundle no trusted key signed")

    monkeypatch.setattr(verify, "_hash", never)
    problems = _problems(done.folder, home.key_hex)
    assert problems[0].startswith("manifest.sig: the signature does not verify")
    assert "manifest.json: 1 malformed or repeated file entries" in problems
    assert "index.json: not in the manifest (added)" in problems
    code = main(["evidence", "verify", str(done.folder), "--signer-key", home.key_hex])
    assert code == 28


def test_malformed_signed_content_is_a_problem_line(home: Home, tmp_path: Path) -> None:
    _drill(home)
    done = _export(home, tmp_path / "b")
    keys = _doc(done.folder, "keys.json")
    keys["items"] = [1]
    _resign(done.folder, home.log, "keys.json", canonical(keys))
    audit = _doc(done.folder, "audit.json")
    audit["proofs"].append(7)
    _resign(done.folder, home.log, "audit.json", canonical(audit))
    problems = _problems(done.folder, home.key_hex)
    assert "keys.json: not a section file of the bundle (its items are malformed)" in problems
    assert "audit.json: a malformed inclusion proof (entry None)" in problems
    assert main(["evidence", "verify", str(done.folder), "--signer-key", home.key_hex]) == 28


# -- 5. no planted bundle at --out; the window verify prints and asserts ------------------


def test_a_folder_planted_beside_out_is_never_moved_into_place(
    home: Home, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _export(home, tmp_path / "old", window=Window.parse("2020-01-01", "2020-01-31"))
    planted = tmp_path / ".b.replaced-by-modelseal"  # util.files' swap-recovery name
    os.rename(old.folder, planted)
    done = _export(home, tmp_path / "b")
    assert _doc(done.folder, "index.json")["window"] == home.window.to_json() and planted.is_dir()
    capsys.readouterr()
    assert main(["evidence", "verify", str(done.folder)]) == 0
    out = capsys.readouterr().out
    w = home.window.to_json()
    assert f"window {w['from']} to {w['to']} (end excluded), host " in out and "generated 20" in out
    assert _problems(done.folder, home.key_hex, home.window) == []
    other = Window.parse("2020-01-01", "2020-01-31")
    assert any("not the window asked for" in p for p in _problems(done.folder, home.key_hex, other))
    assert main(["evidence", "verify", str(done.folder), "--from", "2020-01-01", "--to", "2020-01-31"]) == 28
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    tmp = tmp_path / "tmp-folder"
    tmp.mkdir()
    with pytest.raises(FileExistsError):
        bundle._commit(tmp, busy)  # appeared meanwhile: never replaced
    assert tmp.is_dir() and (busy / "x").exists()


# -- 6. the tree head's signer --------------------------------------------------------------


def test_a_tree_head_signed_by_an_untrusted_key_is_refused(home: Home, tmp_path: Path) -> None:
    _drill(home)
    done = _export(home, tmp_path / "b")
    rogue = Ed25519PrivateKey.generate()
    audit = _doc(done.folder, "audit.json")
    th = audit["tree_head"]
    th["signature"] = rogue.sign(signed_message(th["size"], bytes.fromhex(th["head"]))).hex()
    th["public_key"], th["key_id"] = public_key_hex(rogue.public_key()), key_id(rogue.public_key())
    _resign(done.folder, home.log, "audit.json", canonical(audit))
    problems = _problems(done.folder, home.key_hex)
    kid = key_id(rogue.public_key())[:16]
    assert f"audit.json: the tree head is signed by key {kid}, not an expected key" in problems


# -- 7. a lone surrogate ----------------------------------------------------------------------


def test_a_lone_surrogate_does_not_block_the_export(home: Home, tmp_path: Path) -> None:
    body = b'{"format": "modelseal-controls-test/v1", "started": %f, "registry": "\\ud800x"}' % time.time()
    _controls_record(home, body)
    done = _export(home, tmp_path / "b")
    (entry,) = _doc(done.folder, "recovery.json")["items"]["recovery.controls_tests"]
    assert entry["summary"]["registry"] == "\ud800x" and entry["file"] == "records/controls/controls-1.json"
    assert "?x" in (done.folder / "report.html").read_text()
    assert _problems(done.folder, home.key_hex) == []


# -- 8. more records than MAX_RECORDS ---------------------------------------------------------


def test_a_truncated_record_folder_says_so_and_keeps_the_vouched(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(records, "MAX_RECORDS", 3)
    body = canonical({"format": "modelseal-controls-test/v1", "started": time.time(), "result": "fail"})
    _controls_record(home, body, result="fail", name="a-failed.json")  # first by name, vouched
    for i in range(4):
        doc = {"format": "modelseal-controls-test/v1", "started": time.time(), "n": i}
        (home.home / "evidence" / "controls" / f"b{i}.json").write_bytes(canonical(doc))
    done = _export(home, tmp_path / "b")
    rec = _doc(done.folder, "recovery.json")
    paths = [e["path"] for e in rec["items"]["recovery.controls_tests"]]
    assert len(paths) == 3 and "evidence/controls/a-failed.json" in paths
    gap = "evidence/controls: 2 of 5 records not read (at most 3: the vouched-for, then the newest were read)"
    assert gap in rec["gaps"]


# -- 9. exit codes ------------------------------------------------------------------------


def test_bad_input_exits_27_with_one_line(home: Home, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["evidence", "export", "--from", "2026-01-01", "--out"]
    cases = [
        [*base, str(tmp_path / "a"), "--to", "9999-12-31"],
        [*base, str(tmp_path / "b"), "--to", "2026-01-02", "--tls", "http://127.0.0.1:1"],
        [*base, str(tmp_path / "c"), "--to", "2026-01-02", "--witness", str(tmp_path / "no-witness")],
        [*base, str(tmp_path / "d"), "--to", "2026-01-02", "--governance-db", "mysql://x"],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == EvidenceError.exit_code, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("modelseal: error: "), err
    assert not any(p.name in "abcd" for p in tmp_path.iterdir())
