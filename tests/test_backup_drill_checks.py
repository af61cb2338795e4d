"""The pieces of a restore drill on their own (docs/recovery.md, "Restore drills"): the signed
record and its audit event (and the monitoring metric it feeds), the artifact checks over a
real registry (SQLite, a blob folder, sealed and signed artifacts put through
``registry.service``), a corrupted blob named, and the audit-log checks against a recorded
tree head, the live log and a witness checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog
from modelseal.errors import EvidenceTampered
from modelseal.recovery import records
from modelseal.recovery.drillaudit import check_audit
from modelseal.recovery.drillcheck import Findings, Targets, check_artifacts
from modelseal.signing.trust import load_policy
from modelseal.telemetry.auditpass import AuditPass
from tests.conftest import Env
from tests.drill_helpers import blob_file, layer_digests, push, registry, release, sealed_file, sealed_folder


def test_a_record_is_signed_audited_and_feeds_the_last_drill_metric(env: Env) -> None:
    log = MerkleAuditLog(env.home / "audit.db")
    body = {"result": "ok", "backup": {"id": "b1"}, "steps": [{"name": "restore", "seconds": 1.5}]}
    path, digest = records.write_record(records.DRILL, body, env.home, log, result="ok", started=1.7e9)
    assert path.parent == env.home / "evidence" / "drills" and oct(path.stat().st_mode & 0o777) == "0o600"
    event = log.events()[-1]
    assert event["operation"] == "backup-drill" and event["result"] == "ok"
    assert event["key"] == "evidence:evidence/drills/" + path.name and event["artifact"] == digest
    got = records.read_record(path, records.DRILL, [records.host_key(env.home)])
    assert got["backup"] == {"id": "b1"} and got["format"] == "modelseal-backup-drill/v1"
    # The monitoring pass turns the ok event into the last-drill metric.
    fams = {f.name: f for f in AuditPass().families(SimpleNamespace(audit=log), now=1.7e9)}
    sample = fams["modelseal_backup_drill_last_success_timestamp_seconds"].samples[0][1]
    assert sample == pytest.approx(event["time"])
    # A failed drill's event carries the error class, and is no last success.
    records.write_record(records.DRILL, {"result": "DrillFailed"}, env.home, log, result="DrillFailed", started=0)
    fams = {f.name: f for f in AuditPass().families(SimpleNamespace(audit=log), now=1.8e9)}
    assert fams["modelseal_backup_drill_last_success_timestamp_seconds"].samples[0][1] == sample


def test_a_record_edited_re_signed_by_another_key_or_of_another_kind_is_refused(env: Env) -> None:
    log = MerkleAuditLog(env.home / "audit.db")
    path, _ = records.write_record(records.DRILL, {"result": "ok"}, env.home, log, result="ok", started=0)
    trusted = [records.host_key(env.home)]
    with pytest.raises(EvidenceTampered, match="not a restore record"):
        records.read_record(path, records.RESTORE, trusted)
    doc = json.loads(path.read_bytes())
    doc["body"]["result"] = "ok!"
    path.write_bytes(records.canonical(doc) + b"\n")
    with pytest.raises(EvidenceTampered, match="does not verify"):
        records.read_record(path, records.DRILL, trusted)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Ed25519PrivateKey.generate()
    path.write_bytes(records.seal_record(records.DRILL, {"result": "ok"}, other))
    with pytest.raises(EvidenceTampered, match="not signed by a trusted"):
        records.read_record(path, records.DRILL, trusted)
    assert records.read_record(path, records.DRILL, [other.public_key()])["result"] == "ok"


@pytest.fixture
def small_registry(env: Env) -> tuple[Path, list[str]]:
    signer = release(env)
    data = env.work / "registry"
    reg = registry(data)
    digests = [
        push(reg, "team/a", "v1", sealed_file(env, "a", signer)),
        push(reg, "team/b", "v1", sealed_folder(env, "b", signer)),
        push(reg, "team/c", "v1", sealed_file(env, "c", signer, size=3 * (1 << 20) + 5)),
    ]
    reg.close()
    return data, digests


def _check(env: Env, data: Path, **kw: Any) -> Findings:
    reg = registry(data)
    try:
        policy = load_policy(env.home / "trust.toml")
        targets = Targets(reg.meta, reg.blobs, **kw)
        scratch = env.work / f"scratch-{os.urandom(4).hex()}"
        scratch.mkdir()
        return check_artifacts(targets, policy, env.svc, scratch)
    finally:
        reg.close()


def test_every_registry_artifact_opens_and_its_plaintext_matches(
    env: Env, small_registry: tuple[Path, list[str]]
) -> None:
    data, digests = small_registry
    found = _check(env, data)
    assert not found.failures, found.failures
    checked = {c.subject: c for c in found.checked}
    assert set(checked) == {f"team/{r}@{d}" for r, d in zip("abc", digests, strict=True)}
    assert checked[f"team/b@{digests[1]}"].files == 5 and checked[f"team/c@{digests[2]}"].size == 3 * (1 << 20) + 5
    assert all(c.signed for c in checked.values())
    sampled = _check(env, data, sample=2)
    assert sampled.registry_total == 3 and sampled.sampled == 2 and len(sampled.checked) == 2


def test_a_corrupted_blob_fails_the_artifact_and_names_it(env: Env, small_registry: tuple[Path, list[str]]) -> None:
    data, digests = small_registry
    reg = registry(data)
    layer = layer_digests(reg, "team/b", digests[1])[-1]
    reg.close()
    seg = blob_file(data / "blobs", layer)
    raw = bytearray(seg.read_bytes())
    raw[len(raw) // 2] ^= 1
    os.chmod(seg, 0o600)
    seg.write_bytes(bytes(raw))
    found = _check(env, data)
    assert [f.subject for f in found.failures] == [f"team/b@{digests[1]}"]
    assert layer in found.failures[0].what and "corrupted" in found.failures[0].what
    assert len(found.checked) == 2


def test_a_path_without_a_valid_signature_and_a_missing_policy_fail(env: Env) -> None:
    signer = release(env)
    good = sealed_file(env, "good", signer)
    bad = sealed_file(env, "bad", signer)
    sig = bad.with_name(bad.name + ".msig")
    sig.unlink()
    policy = load_policy(env.home / "trust.toml")
    (env.work / "s").mkdir()
    found = check_artifacts(Targets(None, None, (good, bad)), policy, env.svc, env.work / "s")
    assert [c.subject for c in found.checked] == [str(good)]
    assert [f.subject for f in found.failures] == [str(bad)] and "not signed" in found.failures[0].what
    none = check_artifacts(Targets(None, None, (good,)), None, env.svc, env.work / "s")
    assert none.failures[0].subject == "trust policy" and not none.checked


def test_the_audit_checks_against_the_recorded_head_the_live_log_and_a_checkpoint(env: Env) -> None:
    live = MerkleAuditLog(env.home / "audit.db")
    for i in range(5):
        live.emit(AuditEvent("unwrap", "local:k", "ok", artifact=f"{i:02x}"))
    witness = env.work / "witness"
    cp = live.checkpoint(witness)
    backup = env.work / "backup-audit.db"
    backup.write_bytes((env.home / "audit.db").read_bytes())  # the log as the backup holds it
    head = (5, bytes.fromhex(cp["head"]))
    for i in range(3):
        live.emit(AuditEvent("unwrap", "local:k", "ok", artifact=f"{i + 5:02x}"))
    cp_later = live.checkpoint(witness)
    trusted = live.trusted_keys()
    scratch = env.work / "scratch"
    scratch.mkdir()
    ok = check_audit(backup, trusted, head, scratch=scratch, live=live, checkpoint=cp)
    assert not ok.failures and ok.restored_size == 5 and ok.events_after == 3
    newer = check_audit(backup, trusted, head, scratch=scratch, live=live, checkpoint=cp_later)
    assert not newer.failures and newer.checkpoint_size == 8
    blind = check_audit(backup, trusted, head, scratch=scratch, checkpoint=cp_later)
    assert "newer than the backup" in blind.failures[0].what
    wrong = check_audit(backup, trusted, (4, head[1]), scratch=scratch)
    assert "not the one the backup recorded" in wrong.failures[0].what
    assert "trusts no audit key" in check_audit(backup, {}, head, scratch=scratch).failures[0].what
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from modelseal.audit.hosts import key_id

    other = Ed25519PrivateKey.generate().public_key()
    stranger = check_audit(backup, {key_id(other): other}, head, scratch=scratch)
    assert stranger.failures and "does not verify" in stranger.failures[0].what


def test_an_attached_signature_that_does_not_verify_fails_under_a_lax_policy(env: Env) -> None:
    signer = release(env)
    policy_file = env.home / "trust.toml"
    policy_file.write_text(policy_file.read_text().replace("strict = true", "strict = false"))
    policy = load_policy(policy_file)
    a = sealed_file(env, "a", signer)
    x = sealed_file(env, "x", signer)
    x.with_name(x.name + ".msig").write_bytes(a.with_name(a.name + ".msig").read_bytes())  # another's signature
    data = env.work / "registry"
    reg = registry(data)
    digest = push(reg, "team/x", "v1", x)
    reg.close()
    found = _check(env, data)
    # The policy would take x unsigned; but a signature is attached and none of them is x's.
    assert [f.subject for f in found.failures] == [f"team/x@{digest}"] and not found.checked
    assert "attached signatures" in found.failures[0].what
    # With no signature at all, the lax policy is obeyed (and the row says unsigned).
    x.with_name(x.name + ".msig").unlink()
    (env.work / "s").mkdir()
    lax = check_artifacts(Targets(None, None, (x,)), policy, env.svc, env.work / "s")
    assert not lax.failures and [c.signed for c in lax.checked] == [False]
