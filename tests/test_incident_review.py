"""``modelseal incident key-compromise``: one regression test per finding of the red-team review
(the registry and Transit ones are in test_incident_key_remote.py, the certificate one in
test_incident_cert.py). Local keys, small artifacts, the CLI in this process."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import pytest

import modelseal
from modelseal.errors import IncidentError
from modelseal.format.envelope import artifact_id, open_envelope, parse_slots
from modelseal.format.file import write_slot_in_place
from modelseal.governance.brokerops import outer
from modelseal.recipes import rekey
from modelseal.recovery import incident_signing
from modelseal.recovery.incident_find import read_header
from modelseal.recovery.incident_registry import RegistryTarget
from modelseal.recovery.journal import item_name
from modelseal.recovery.keycompromise import KeyIncident, execute, plan
from modelseal.signing.signers import ED25519, PemSigner, generate, private_pem
from modelseal.signing.verification import verify_artifact
from modelseal.util import files
from tests.conftest import Env, make_model_folder
from tests.incident_helpers import Trust, cli, journal_of, make_trust, plaintext, seal_signed

KEY = "local:test-kek"


def _seal(env: Env, dst: Path, key: str = KEY, trust: Trust | None = None, size: int = 5000) -> Path:
    src = env.work / f"{dst.name}.src"
    src.write_bytes(os.urandom(size))
    return seal_signed(env.svc, src, dst, key, trust, dst.stem)


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 1  # a payload byte: found by its header, refused when re-encrypted
    path.write_bytes(bytes(data))


def _versions(path: Path) -> list[int]:
    raw, _ = read_header(path)
    return sorted(r.key_version for _, s in parse_slots(raw.slots) for r in s.recipients)


def _aid(path: Path) -> str:
    return artifact_id(read_header(path)[0].core.binding)


def _pem(path: Path) -> Path:
    s = generate(ED25519)
    path.write_bytes(private_pem(s, None))
    os.chmod(path, 0o600)
    path.with_suffix(".pub").write_text(s.public.pem())
    return path


def test_f1_a_revocation_key_the_policy_does_not_trust_blocks_and_leaves_the_list(env: Env, tmp_path: Path) -> None:
    trust = make_trust(tmp_path / "trust")
    rogue = _pem(tmp_path / "rogue.pem")
    root = env.work / "models"
    root.mkdir()
    a = _seal(env, root / "a.sealed", trust=trust)
    before = trust.revocations.read_bytes()
    args = ["incident", "key-compromise", KEY, "--path", str(root), "--sign-key", str(trust.release2),
            "--trust", str(trust.policy), "--revocation-key", str(rogue)]  # fmt: skip
    rc, out, _ = cli(*args)
    assert rc == 0 and "blocks --execute: revoke-signatures: --revocation-key" in out
    rc, _, err = cli(*args, "--execute")
    assert rc == IncidentError.exit_code and "not a key of the revocation list's signers" in err
    assert trust.revocations.read_bytes() == before and env.svc.info(KEY).latest == 1
    # The library refuses such a list before it replaces the file or records its version as seen.
    policy = trust.load()
    floor = policy.version_floor()
    with pytest.raises(IncidentError, match="would not accept"):
        incident_signing.extend(policy, [PemSigner.from_file(rogue)], ["ab" * 32], "test")
    assert trust.revocations.read_bytes() == before and policy.version_floor() == floor
    assert verify_artifact(a, policy).signed


def test_f2_sign_keys_are_checked_in_the_plan_and_each_new_signature_before_any_revocation(
    env: Env, tmp_path: Path
) -> None:
    trust = make_trust(tmp_path / "trust")
    rogue, ops = _pem(tmp_path / "rogue.pem"), _pem(tmp_path / "ops.pem")
    with trust.policy.open("a") as f:  # a signer the policy trusts, for other artifacts than these
        f.write(f'[signers.ops]\nkeys = ["{ops.with_suffix(".pub")}"]\n'
                '[[rules]]\nartifacts = ["ops-*"]\nenvironments = ["*"]\nsigners = ["ops"]\n')  # fmt: skip
    root = env.work / "models"
    root.mkdir()
    a = _seal(env, root / "a.sealed", trust=trust)
    before = trust.revocations.read_bytes()

    def run(sign_key: Path, *extra: str) -> tuple[int, str, str]:
        return cli("incident", "key-compromise", KEY, "--path", str(root), "--sign-key", str(sign_key), "--trust",
                   str(trust.policy), "--revocation-key", str(trust.security), *extra)  # fmt: skip

    rc, out, _ = run(rogue)
    assert rc == 0 and "blocks --execute: resign: --sign-key" in out and "not a key of the trust policy" in out
    rc, _, err = run(ops, "--execute")  # trusted, but not for "a": refused right after signing
    assert rc == IncidentError.exit_code and "resign:" in err
    _, items = journal_of(env.home)
    assert items[0]["state"] == "failed" and items[0]["failed_in"] == "reencrypted"
    assert trust.revocations.read_bytes() == before  # nothing revoked while no new signature verifies
    rc, out, err = run(trust.release2, "--execute")
    assert rc == 0, out + err
    verdict = verify_artifact(a, trust.load())
    assert verdict.signed and verdict.version == 2


def test_f2_a_done_record_whose_new_signature_no_longer_verifies_is_re_signed(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trust = make_trust(tmp_path / "trust")
    release3 = _pem(tmp_path / "trust" / "release3.pem")
    root = env.work / "models"
    root.mkdir()
    made = [_seal(env, root / f"a{i}.sealed", trust=trust) for i in range(2)]
    real = incident_signing.extend

    def stop(*a: object, **kw: object) -> None:
        raise KeyboardInterrupt  # stopped after every record is done, before the revocation

    monkeypatch.setattr(incident_signing, "extend", stop)

    def inc(sign_key: Path) -> KeyIncident:
        return KeyIncident(KEY, paths=(str(root),), sign_keys=(str(sign_key),), trust=str(trust.policy),
                           revocation_keys=(str(trust.security),))  # fmt: skip

    with pytest.raises(KeyboardInterrupt):
        execute(inc(trust.release2), env.svc)
    _, items = journal_of(env.home)
    assert {i["state"] for i in items} == {"done"}
    # The policy stops trusting release2 (it leaked too, say): release3 takes its place.
    text = trust.policy.read_text().replace(str(trust.release2.with_suffix(".pub")), str(release3.with_suffix(".pub")))
    trust.policy.write_text(text)
    monkeypatch.setattr(incident_signing, "extend", real)
    report = execute(inc(release3), env.svc)
    assert report["closed"]
    for p in made:
        verdict = verify_artifact(p, trust.load())
        assert verdict.signed and verdict.version == 2


def test_f5_a_missing_path_under_another_folder_is_not_gone_and_gone_waits_for_accept(env: Env) -> None:
    mnt = env.work / "mnt"
    sub = mnt / "models"
    sub.mkdir(parents=True)
    made = [_seal(env, sub / f"a{i}.sealed") for i in range(3)]
    _corrupt(made[0])
    args = ["incident", "key-compromise", KEY, "--path", str(mnt), "--execute"]
    assert cli(*args)[0] == IncidentError.exit_code  # a0 does not re-encrypt: the incident stays open
    os.rename(mnt, env.work / "offline")
    mnt.mkdir()  # the share is not mounted: an empty mount point
    rc, _, err = cli(*args)
    assert rc == IncidentError.exit_code and "not treated as deleted" in err
    assert env.svc.info(KEY).versions[0].state == "active"
    assert all(i["state"] != "gone" for i in journal_of(env.home)[1])
    mnt.rmdir()
    os.rename(env.work / "offline", mnt)  # the share is back; the damaged copy is deleted on purpose
    made[0].unlink()
    rc, _, err = cli(*args)
    assert rc == IncidentError.exit_code and "--accept-gone" in err
    assert env.svc.info(KEY).versions[0].state == "active"
    rc, out, err = cli(*args, "--accept-gone")
    assert rc == 0, out + err
    assert _versions(made[1]) == [2] and _versions(made[2]) == [2]


def test_f6_no_password_in_the_registry_db_and_no_user_or_query_recorded() -> None:
    rc, _, err = cli("incident", "key-compromise", KEY, "--registry", "127.0.0.1:1", "--registry-db",
                     "postgresql://ops:hunter2@127.0.0.1:1/reg")  # fmt: skip
    assert rc == 2 and "password" in err and "hunter2" not in err
    with pytest.raises(ValueError):
        RegistryTarget("127.0.0.1:1", db="postgresql://db.internal/reg?password=x")
    t = RegistryTarget("127.0.0.1:1", db="postgresql://ops@db.internal:5432/reg?sslmode=require")
    assert t.to_json()["catalog"] == "postgresql://db.internal:5432/reg"


def _plant(env: Env, record: dict[str, object]) -> None:
    (folder,) = (env.home / "incidents").iterdir()
    (folder / "artifacts" / item_name(str(record["ref"]))).write_text(json.dumps(record))


def test_f9_journal_records_are_data_not_instructions(env: Env) -> None:
    env.svc.create("other")
    root, outside = env.work / "models", env.work / "elsewhere"
    root.mkdir()
    outside.mkdir()
    _seal(env, root / "a.sealed")
    bad = _seal(env, root / "b.sealed")
    _corrupt(bad)
    victim, inside = _seal(env, outside / "victim.sealed", "local:other"), _seal(env, root / "o.sealed", "local:other")
    before = {p: p.read_bytes() for p in (victim, inside)}
    args = ["incident", "key-compromise", KEY, "--path", str(root), "--execute"]
    assert cli(*args)[0] == IncidentError.exit_code  # b fails: the incident stays open

    def record(p: Path, state: str) -> dict[str, object]:
        return {"ref": f"path:{p}", "kind": "path", "location": str(p), "old_id": _aid(p), "versions": [1],
                "why": "header", "signed": True, "size": 1, "digest": None, "tags": [], "folder": False,
                "state": state, "old_signatures": []}  # fmt: skip

    _plant(env, record(victim, "planned"))  # outside --path
    rc, _, err = cli(*args)
    assert rc == IncidentError.exit_code and "does not cover" in err and str(victim) in err
    (next((env.home / "incidents").iterdir()) / "artifacts" / item_name(f"path:{victim}")).unlink()
    _plant(env, record(inside, "started"))  # inside --path, but another key's artifact
    bad.unlink()
    rc, out, err = cli(*args, "--accept-gone")
    assert rc == 0, out + err
    assert {p: p.read_bytes() for p in (victim, inside)} == before
    states = {Path(i["location"]).name: i["state"] for i in journal_of(env.home)[1]}
    assert states == {"a.sealed": "done", "b.sealed": "gone", "o.sealed": "left"}


def test_f10_a_malformed_journal_is_an_incident_error(env: Env) -> None:
    root = env.work / "models"
    root.mkdir()
    _corrupt(_seal(env, root / "b.sealed"))
    args = ["incident", "key-compromise", KEY, "--path", str(root)]
    assert cli(*args, "--execute")[0] == IncidentError.exit_code
    (folder,) = (env.home / "incidents").iterdir()
    jpath, (ipath,) = folder / "journal.json", list((folder / "artifacts").iterdir())
    doc, item = json.loads(jpath.read_text()), json.loads(ipath.read_text())
    cases = [
        ({**doc, "versions": {**doc["versions"], "compromised": [2]}}, item),  # the new version, not one decided
        ({**doc, "steps": []}, item),
        (doc, {**item, "state": "zzz"}),
        (doc, {**item, "location": [1]}),
    ]
    for d, i in cases:
        jpath.write_text(json.dumps(d))
        ipath.write_text(json.dumps(i))
        for extra in ([], ["--execute"]):
            rc, _, err = cli(*args, *extra)
            assert rc == IncidentError.exit_code and "not a readable incident journal file" in err, (d, i, err)


def test_f11_a_crash_mid_folder_swap_without_rename_exchange_resumes(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    root = env.work / "models"
    root.mkdir()
    folder = root / "m"
    modelseal.seal(make_model_folder(env.work / "src", big=20_000), folder, KEY, keys=env.svc)
    content = plaintext(env.svc, folder)
    leftover = root / ".x.sealed.tmp-0123456789ab"  # a temporary name a crashed write left
    _seal(env, leftover)
    monkeypatch.setattr(files, "renameat2", lambda *a: False)  # a filesystem without RENAME_EXCHANGE
    real = os.rename

    def crash(src: object, dst: object) -> None:
        real(src, dst)  # type: ignore[arg-type]
        if str(dst).endswith(".replaced-by-modelseal"):
            raise KeyboardInterrupt  # between the swap's two renames

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        execute(KeyIncident(KEY, paths=(str(root),)), env.svc)
    monkeypatch.setattr(os, "rename", real)
    assert not folder.exists() and (root / ".m.replaced-by-modelseal").is_dir()
    p = plan(KeyIncident(KEY, paths=(str(root),)), env.svc)
    assert p.blockers == [] and not p.found  # the old copy stands for m, journaled; the temporary name is skipped
    report = execute(KeyIncident(KEY, paths=(str(root),)), env.svc)
    assert report["closed"] and [a["state"] for a in report["artifacts"]] == ["done"]
    assert sorted(x.name for x in root.iterdir()) == [leftover.name, "m"]
    assert _versions(folder) == [2] and plaintext(env.svc, folder) == content


def test_f12_durations_and_the_destroy_delay_are_range_checked(env: Env) -> None:
    from modelseal.cli.incident import parse_duration, parse_since

    for bad in ("99999999999999d", "9999-12-31T00:00:00+00:00", "0001-01-01T00:00:00+00:00"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_since(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("9" * 400)
    assert abs(parse_since("1d") - (time.time() - 86400)) < 60
    root = env.work / "models"
    root.mkdir()
    _seal(env, root / "a.sealed")
    for delay in (400 * 86400.0, math.inf, -1.0):
        p = plan(KeyIncident(KEY, paths=(str(root),), destroy_after=delay), env.svc)
        assert any("--destroy-after" in b for b in p.blockers), delay
    rc, _, err = cli("incident", "key-compromise", KEY, "--path", str(root), "--destroy-after", "400d", "--execute")
    assert rc == IncidentError.exit_code and "--destroy-after" in err and env.svc.info(KEY).latest == 1


def test_f13_an_artifact_sealed_to_a_broker_key_backed_by_this_one_blocks(env: Env) -> None:
    root = env.work / "models"
    root.mkdir()
    a = _seal(env, root / "a.sealed")
    src, raw = rekey.open_locked(a)  # its only recipient becomes broker:models, backed by the key
    try:
        opened = open_envelope(raw.core, raw.slots, lambda r: env.svc.unwrap(r, raw.core.context))
        inner = env.svc.wrap(KEY, opened.dek, raw.core.context, artifact_id(raw.core.binding))
        write_slot_in_place(src.fd, raw, opened, (outer("models", inner),))
    finally:
        src.close()
    rc, out, _ = cli("incident", "key-compromise", KEY, "--path", str(root))
    assert rc == 0 and "blocks --execute: find:" in out and "run the incident on broker:models" in out
    rc, _, err = cli("incident", "key-compromise", KEY, "--path", str(root), "--execute")
    assert rc == IncidentError.exit_code and "broker:models" in err and env.svc.info(KEY).latest == 1
