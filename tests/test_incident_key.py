"""``modelseal incident key-compromise``: dry run, execution over paths (local key), the audit
trail and report, the old copies refused, resume after kill -9 and after a failure, @VERSION
with the audit-history search. The registry and OpenBao Transit cases are in
test_incident_key_remote.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import modelseal
from modelseal.errors import IncidentError, KeyDisabled, Revoked
from modelseal.format.envelope import artifact_id, parse_slots
from modelseal.recovery import journal as journal_mod
from modelseal.recovery.incident_find import read_header
from modelseal.recovery.keycompromise import KeyIncident, execute
from modelseal.signing.revocation import RevocationList
from modelseal.signing.sigfile import SignatureFile, signature_path
from modelseal.signing.verification import verify_artifact
from tests.conftest import Env, make_model_folder
from tests.incident_helpers import Trust, audit_ops, cli, journal_of, make_trust, plaintext, seal_signed, snapshot

KEY = "local:test-kek"


def _versions(path: Path) -> list[int]:
    raw, _ = read_header(path)
    return sorted(r.key_version for _, s in parse_slots(raw.slots) for r in s.recipients)


def _aid(path: Path) -> str:
    return artifact_id(read_header(path)[0].core.binding)


def _artifacts(env: Env, trust: Trust | None, n: int = 3, size: int = 300_000) -> tuple[Path, dict[Path, object]]:
    root = env.work / "models"
    root.mkdir()
    made: dict[Path, object] = {}
    for i in range(n):
        src = env.work / f"w{i}.bin"
        src.write_bytes(os.urandom(size + i))
        dst = seal_signed(env.svc, src, root / f"w{i}.sealed", KEY, trust, f"w{i}")
        made[dst] = src.read_bytes()
    folder = seal_signed(env.svc, make_model_folder(env.work / "m-src", big=200_000), root / "m", KEY, trust, "m")
    made[folder] = plaintext(env.svc, folder)
    return root, made


def test_dry_run_changes_nothing_then_execute(env: Env, tmp_path: Path) -> None:
    trust = make_trust(tmp_path / "trust")
    root, made = _artifacts(env, trust)
    keep = env.work / "old-copy.sealed"  # a copy the incident does not reach
    first = sorted(p for p in made if p.is_file())[0]
    shutil.copy(first, keep)
    shutil.copy(signature_path(first), signature_path(keep))
    old_sig = SignatureFile.load(signature_path(first))
    assert old_sig is not None
    old_ids = {p: _aid(p) for p in made}
    before = snapshot([root, trust.revocations])

    rc, out, _ = cli("incident", "key-compromise", KEY, "--path", str(root))
    assert rc == 0, out
    assert "dry run" in out and out.count("exposed (header)") == 4
    assert "blocks --execute: resign" in out  # signed artifacts and no --sign-key
    assert snapshot([root, trust.revocations]) == before
    assert env.svc.info(KEY).latest == 1
    assert not (env.home / "incidents").exists()

    report = env.work / "report.json"
    rc, out, err = cli("incident", "key-compromise", KEY, "--path", str(root), *trust.args(), "--execute",
                       "--report", str(report))  # fmt: skip
    assert rc == 0, out + err
    info = env.svc.info(KEY)
    assert info.latest == 2
    assert {v.version: v.state for v in info.versions} == {1: "pending-destroy", 2: "active"}
    policy = trust.load()
    for p, content in made.items():
        assert _versions(p) == [2] and _aid(p) != old_ids[p]
        assert plaintext(env.svc, p) == content
        verdict = verify_artifact(p, policy)
        assert verdict.signed and verdict.version == 2  # the next version: the rollback floor refuses the old copy
    rl = RevocationList.load(trust.revocations, *policy.revocation_keys()[:1])
    assert rl.version == 2 and rl.revoked("signature", old_sig.signatures[0].id) is not None
    with pytest.raises(KeyDisabled):
        modelseal.open(keep, keys=env.svc, verify=False)
    with pytest.raises(Revoked):
        verify_artifact(keep, policy)
    doc = json.loads(report.read_text())
    assert doc["closed"] and doc["steps"]["reencrypt"]["count"] == 4 and doc["steps"]["verify"]["status"] == "done"
    assert all(a["state"] == "done" and a["verified"] for a in doc["artifacts"])
    assert "re-encrypted" in report.with_suffix(".txt").read_text()
    ops = [e["operation"] for e in audit_ops(env.home) if e["operation"].startswith("incident-")]
    assert ops[0] == "incident-open" and ops[-1] == "incident-close"
    for op, n in [("incident-rotate", 1), ("incident-reencrypt", 4), ("incident-resign", 4),
                  ("incident-revoke-signature", 4), ("incident-verify", 4), ("incident-disable", 1)]:  # fmt: skip
        assert ops.count(op) == n, (op, ops)
    reencrypted = {e["artifact"] for e in audit_ops(env.home) if e["operation"] == "incident-reencrypt"}
    assert reencrypted == set(old_ids.values())

    rc, _, err = cli("incident", "key-compromise", KEY, "--path", str(root), *trust.args(), "--execute")
    assert rc == IncidentError.exit_code and "closed" in err  # never reopened, never rotated twice
    assert env.svc.info(KEY).latest == 2


def _done_records(home: Path) -> int:
    base = home / "incidents"
    n = 0
    for p in base.glob("*/artifacts/*.json") if base.exists() else []:
        with contextlib.suppress(ValueError, OSError):  # being replaced right now
            n += json.loads(p.read_text()).get("state") == "done"
    return n


def test_kill_9_midway_then_the_same_command_resumes(env: Env, tmp_path: Path) -> None:
    trust = make_trust(tmp_path / "trust")
    root = env.work / "many"
    root.mkdir()
    made = {}
    for i in range(24):
        src = env.work / f"s{i}.bin"
        src.write_bytes(os.urandom(200_000))
        made[seal_signed(env.svc, src, root / f"a{i:02}.sealed", KEY, trust, f"a{i}")] = src.read_bytes()
    old_sigs = {p: SignatureFile.load(signature_path(p)).signatures[0].id for p in made}  # type: ignore[union-attr]
    args = ["incident", "key-compromise", KEY, "--path", str(root), *trust.args(), "--execute"]
    proc = subprocess.Popen([sys.executable, "-m", "modelseal.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 60
    while _done_records(env.home) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    doc, items = journal_of(env.home)
    assert doc["closed"] is None and 3 <= sum(i["state"] == "done" for i in items) < 24, "killed too late"
    assert env.svc.info(KEY).latest == 2

    rc, out, err = cli(*args)
    assert rc == 0, out + err
    assert env.svc.info(KEY).latest == 2  # rotated once, not again on resume
    assert sum(1 for e in audit_ops(env.home) if e["operation"] == "rotate") == 1
    policy = trust.load()
    rl = policy.revocations()
    assert rl is not None
    for p, content in made.items():
        assert _versions(p) == [2]
        assert plaintext(env.svc, p) == content
        assert rl.revoked("signature", old_sigs[p]) is not None
        assert verify_artifact(p, policy).signed
    leftovers = sorted(x.name for x in root.iterdir() if not x.name.endswith((".sealed", ".msig")))
    assert leftovers == []
    doc, items = journal_of(env.home)
    assert doc["closed"] and len(items) == 24 and all(i["verified"] for i in items)
    assert doc["steps"]["artifacts"]["runs"] == 2


def test_a_failure_names_the_step_and_artifact_and_a_rerun_resumes(env: Env, tmp_path: Path) -> None:
    root, made = _artifacts(env, None, n=3)
    rc, _, err = cli("incident", "key-compromise", KEY, "--execute")  # nowhere to look: it would only disable
    assert rc == IncidentError.exit_code and "name where the artifacts are" in err
    assert env.svc.info(KEY).latest == 1 and not (env.home / "incidents").exists()
    bad = root / "w1.sealed"
    data = bytearray(bad.read_bytes())
    data[-100] ^= 1  # one payload byte: the header still names the key, the chunk does not authenticate
    bad.write_bytes(bytes(data))
    args = ["incident", "key-compromise", KEY, "--path", str(root), "--execute"]
    rc, _, err = cli(*args)
    assert rc == IncidentError.exit_code
    assert err.count("\n") == 1 and "reencrypt:" in err and "w1.sealed" in err
    _, items = journal_of(env.home)
    failed = [i for i in items if i["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["location"] == str(bad) and failed[0]["error"].startswith("reencrypt")
    assert env.svc.info(KEY).versions[0].state == "active"  # not disabled: the incident is not done
    bad.unlink()  # the operator's remedy for the damaged copy: it is deleted (restored later, re-sealed)
    rc, out, err = cli(*args)  # everything else is done; the disable step waits for the operator's word
    assert rc == IncidentError.exit_code and "disable:" in err and "--accept-gone" in err, out + err
    assert env.svc.info(KEY).versions[0].state == "active"
    rc, out, err = cli(*args, "--accept-gone")
    assert rc == 0, out + err
    assert f"not done: path:{bad}: gone" in out
    assert env.svc.info(KEY).latest == 2
    for p in made:
        if p != bad:
            assert _versions(p) == [2]


def test_an_exception_in_a_journal_write_leaves_old_or_new_and_resumes(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, made = _artifacts(env, None, n=3)
    real = journal_mod.write_atomic  # type: ignore[attr-defined]
    calls = {"n": 0}

    def flaky(dst: Path, data: bytes, **kw: object) -> None:
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # stopped between two writes (and inside none: they are atomic)
        real(dst, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(journal_mod, "write_atomic", flaky)
    inc = KeyIncident(KEY, paths=(str(root),))
    with pytest.raises(KeyboardInterrupt):
        execute(inc, env.svc)
    folder = next((env.home / "incidents").iterdir())
    for p in [folder / "journal.json", *(folder / "artifacts").iterdir()]:
        assert p.name.endswith(".json"), p  # no temporary name left behind
        json.loads(p.read_text())  # each file whole
    monkeypatch.setattr(journal_mod, "write_atomic", real)
    report = execute(inc, env.svc)
    assert report["closed"] and env.svc.info(KEY).latest == 2
    for p, content in made.items():
        assert _versions(p) == [2] and plaintext(env.svc, p) == content


def test_at_version_re_encrypts_that_version_only_and_finds_rewrapped_ones_by_history(env: Env, tmp_path: Path) -> None:
    from modelseal.audit.log import MerkleAuditLog
    from modelseal.keys.service import KeyService
    from modelseal.recipes.rotation import rotate

    svc = KeyService(sink=MerkleAuditLog(env.home / "audit.db"))  # wraps recorded in the audit log
    root = env.work / "v"
    root.mkdir()
    for name in ("v1-a", "v1-b"):
        (env.work / name).write_bytes(os.urandom(1000))
        modelseal.seal(env.work / name, root / f"{name}.sealed", KEY, keys=svc)
    rotate(KEY, [root / "v1-b.sealed"], force=True, keys=svc)  # v1-b is rewrapped to v2: its header says 2
    (env.work / "v2-c").write_bytes(os.urandom(1000))
    modelseal.seal(env.work / "v2-c", root / "v2-c.sealed", KEY, keys=svc)
    untouched = (root / "v2-c.sealed").read_bytes()
    assert _versions(root / "v1-b.sealed") == [2] and _versions(root / "v1-a.sealed") == [1]

    rc, out, _ = cli("incident", "key-compromise", KEY + "@1", "--path", str(root), "--json")
    assert rc == 0
    plan = json.loads(out)
    assert {Path(f["location"]).name: f["why"] for f in plan["found"]} == {
        "v1-a.sealed": "header",
        "v1-b.sealed": "audit history",  # its data key was wrapped under v1 before the rewrap
    }
    rc, out, err = cli(
        "incident", "key-compromise", KEY + "@1", "--path", str(root), "--execute", "--destroy-after", "0"
    )
    assert rc == 0, out + err
    states = {v.version: v.state for v in svc.info(KEY).versions}
    assert states == {1: "destroyed", 2: "active", 3: "active"}
    assert (root / "v2-c.sealed").read_bytes() == untouched
    assert _versions(root / "v1-a.sealed") == [3] and _versions(root / "v1-b.sealed") == [3]
