"""``modelseal backup drill`` end to end on a small real host (docs/recovery.md, "Restore
drills"): a SQLite registry with sealed, signed artifacts put through ``registry.service``,
the tamper-evident audit log, a real backup (``recovery.create``), then the drill: it passes
and writes a signed record and a ``backup-drill`` event into the live home and log; a
corrupted blob fails it (exit 25) naming the artifact; with the production key gone, the
offline recovery key's shares and the keystore's shares recover everything."""

from __future__ import annotations

import json
from typing import Any

import pytest

from modelseal.cli import main
from modelseal.errors import DrillFailed
from modelseal.keys import keystore
from modelseal.keys.providers import recovery as provider
from modelseal.recovery import records
from modelseal.recovery.drill import DrillReport, DrillRequest, run_drill
from modelseal.recovery.locations import Locations
from tests.conftest import PASSPHRASE, Env
from tests.drill_helpers import Host, blob_file, layer_digests, make_host, registry, secret_file


@pytest.fixture(autouse=True)
def _no_installed_recovery_keys() -> object:
    provider.forget()
    yield None
    provider.forget()


@pytest.fixture
def host(env: Env) -> Host:
    return make_host(env)


def _drill(h: Host, **kw: Any) -> DrillReport:
    req = DrillRequest(source=str(h.dest), registry_data=h.data, **kw)
    return run_drill(req, Locations.from_args(h.env.home), h.svc, h.log, check=False)


def test_a_drill_passes_and_writes_a_verifying_record_and_event(host: Host) -> None:
    before = {p.name for p in (host.env.home).iterdir()}
    report = _drill(host)
    report.raise_if_failed()
    assert report.result == "ok" and report.keys == "production" and report.keystore == "passphrase"
    assert {c.subject for c in report.findings.checked} == {f"{r}@{d}" for r, d in host.digests.items()}
    steps = [s.name for s in report.steps]
    assert steps == ["verify backup", "unseal parts", "restore", "open keystore", "check audit log", "check artifacts"]
    assert report.audit is not None and report.record is not None
    assert report.audit.restored_size > 0 and (report.audit.events_after or 0) >= 1
    assert report.rto["ok"] is True and report.rto["target"] == 3600 and report.rpo["ok"] is True
    body = records.read_record(report.record, records.DRILL, [records.host_key(host.env.home)])
    assert body["result"] == "ok" and body["artifacts"]["passed"] == 2 and body["failures"] == []
    event = host.log.events()[-1]
    assert event["operation"] == "backup-drill" and event["result"] == "ok"
    assert event["artifact"] == report.record_sha256
    # Only the record came into the live home: the restore went to a temporary one, now gone.
    after = {p.name for p in (host.env.home).iterdir()}
    assert after - before <= {"evidence"}
    assert "modelseal-drill-" not in json.dumps(body["steps"])


def test_a_corrupted_blob_fails_the_drill_and_names_it(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    reg = registry(host.data)
    layer = layer_digests(reg, "team/a", host.digests["team/a"])[0]
    reg.close()
    seg = blob_file(host.data / "blobs", layer)
    raw = bytearray(seg.read_bytes())
    raw[-100] ^= 0x40
    seg.chmod(0o600)
    seg.write_bytes(bytes(raw))
    code = main(["backup", "drill", "--from", str(host.dest), "--registry-data", str(host.data)])
    out = capsys.readouterr()
    assert code == DrillFailed.exit_code
    assert f"team/a@{host.digests['team/a']}" in out.out and "corrupted" in out.out
    assert "DrillFailed" in out.err or "drill failed" in out.err
    event = host.log.events()[-1]
    assert event["operation"] == "backup-drill" and event["result"] == "DrillFailed"
    path = host.env.home / event["key"].removeprefix("evidence:")
    body = records.read_record(path, records.DRILL, [records.host_key(host.env.home)])
    assert [f["subject"] for f in body["failures"]] == [f"team/a@{host.digests['team/a']}"]
    assert body["artifacts"]["passed"] == 1


def test_without_the_production_key_the_recovery_shares_and_keystore_shares_recover(host: Host) -> None:
    env = host.env
    # The keystore's root split for its custodians, then the production key lost on this host.
    ks_shares = keystore.split_root(3, 2, keystore.keystore_path(env.home))
    host.svc.destroy("local:test-kek", None)
    keystore.clear_cache()
    req = DrillRequest(source=str(host.dest), registry_data=host.data)
    with pytest.raises(DrillFailed, match="stopped at unseal parts"):
        run_drill(req, Locations.from_args(env.home), host.svc, host.log)
    rec = secret_file(env.work / "recovery-shares.txt", host.shares[1:])
    kss = secret_file(env.work / "keystore-shares.txt", ks_shares[:2])
    report = _drill(host, recovery_shares=(rec,), keystore_shares=(kss,))
    report.raise_if_failed()
    assert report.keys == "recovery:offline" and report.keystore == "shares"
    assert len(report.findings.checked) == 2
    assert provider.installed("offline") is None  # dropped from the process afterwards
    # The live keystore is untouched: its key is still destroyed, its passphrase unchanged.
    live = keystore.unlock_uncached(keystore.keystore_path(env.home), PASSPHRASE.encode())
    assert live.keys["test-kek"]["versions"]["1"]["state"] == "destroyed"
    # Shares given in the clear to others are refused: secrets come from private files only.
    rec.chmod(0o644)
    with pytest.raises(DrillFailed, match="chmod 600"):
        run_drill(
            DrillRequest(source=str(host.dest), registry_data=host.data, recovery_shares=(rec,)),
            Locations.from_args(env.home),
            host.svc,
            host.log,
        )
