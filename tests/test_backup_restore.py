"""``modelseal backup restore`` for real (docs/recovery.md, "Restores"): one component back
and the others untouched; an interrupted restore re-run finishes from its journal; a backup
whose keys this restorer cannot reach stops before anything is written; a CA restore
re-issues the live certificates and revokes the old serials; every restore is recorded."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modelseal.cli import main
from modelseal.errors import BackupError
from modelseal.keys import keystore
from modelseal.keys.providers import recovery as provider
from modelseal.keys.service import KeyService
from modelseal.pki import ca as pki_ca
from modelseal.pki import denylist, issue
from modelseal.pki.identity import Identity
from modelseal.recovery import records
from modelseal.recovery.restore import JOURNAL, RestoreRequest, run_restore
from modelseal.recovery.restoreparts import restore_part
from modelseal.registry.sqlmeta import open_meta
from tests.conftest import Env
from tests.drill_helpers import Host, make_host, secret_file

TD = "example.org"


@pytest.fixture(autouse=True)
def _no_installed_recovery_keys() -> object:
    provider.forget()
    yield None
    provider.forget()


def _manifests(h: Host) -> set[str]:
    meta = open_meta(None, h.data)
    try:
        return {d for _, d, _ in meta.manifest_page(None, 100)}
    finally:
        meta.close()


def _restore(h: Host, **kw: Any) -> dict[str, Any]:
    return run_restore(RestoreRequest(source=str(h.dest), **kw), h.loc, h.svc, h.log)


def _wreck_registry(h: Host) -> None:
    for p in h.data.glob("registry.db*"):
        p.unlink()


def test_one_component_comes_back_and_the_others_stay_as_they_are(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    h = make_host(env)
    want = _manifests(h)
    _wreck_registry(h)
    config = env.home / "config.toml"
    config.write_text(config.read_text() + "# changed after the backup\n")
    code = main(["backup", "restore", "--from", str(h.dest), "--component", "registry", "--data", str(h.data)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert _manifests(h) == want and "registry:" in out
    assert config.read_text().endswith("# changed after the backup\n")  # not part of this restore
    event = h.log.events()[-1]
    assert event["operation"] == "backup-restore" and event["result"] == "ok"
    body = records.read_record(
        env.home / event["key"].removeprefix("evidence:"), records.RESTORE, [records.host_key(env.home)]
    )
    assert body["selected"] == ["registry"] and body["keys"] == "production"
    # An environment is restored from a backup made for it, never cut out of a whole-host one.
    with pytest.raises(BackupError, match="whole host, not of environment dev"):
        _restore(h, env="dev")


KILLER = """
import os, signal, sys
from pathlib import Path
from modelseal.audit.log import MerkleAuditLog
from modelseal.keys.service import KeyService
from modelseal.recovery.locations import Locations
from modelseal.recovery.restore import RestoreRequest, run_restore
from modelseal.recovery.restoreparts import restore_part

def killed(name, kind, data, loc, *, replace):
    if name == "registry":
        os.kill(os.getpid(), signal.SIGKILL)  # a real crash between two parts
    return restore_part(name, kind, data, loc, replace=replace)

home = Path(os.environ["MODELSEAL_HOME"])
log = MerkleAuditLog(home / "audit.db")
req = RestoreRequest(sys.argv[1], components=("config", "registry"), replace=True)
run_restore(req, Locations.from_args(home, registry_data=sys.argv[2]), KeyService(sink=log), log, restore=killed)
"""


def test_an_interrupted_restore_run_again_finishes(env: Env) -> None:
    h = make_host(env)
    want = _manifests(h)
    _wreck_registry(h)
    (env.home / "trust.toml").unlink()
    killed = subprocess.run([sys.executable, "-c", KILLER, str(h.dest), str(h.data)], capture_output=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    journal = json.loads((env.home / JOURNAL).read_text())
    assert journal["done"] == ["config"] and (env.home / "trust.toml").exists()
    assert not (h.data / "registry.db").exists()

    def interrupted(name: str, kind: str, data: bytes, loc: Any, *, replace: bool) -> dict[str, Any]:
        if name == "registry":
            raise KeyboardInterrupt  # the operator's Ctrl-C on the second run
        return restore_part(name, kind, data, loc, replace=replace)

    req = RestoreRequest(str(h.dest), components=("config", "registry"), replace=True)
    with pytest.raises(KeyboardInterrupt):
        run_restore(req, h.loc, h.svc, h.log, restore=interrupted)
    assert h.log.events()[-1]["result"] == "KeyboardInterrupt"  # recorded, never as ok
    # Another restore is refused while this one is unfinished.
    with pytest.raises(BackupError, match="unfinished restore"):
        _restore(h, components=("registry",), replace=True)
    report = _restore(h, components=("config", "registry"), replace=True)
    assert report["resumed"] is True and report["parts"]["config"] == "done before"
    assert _manifests(h) == want and not (env.home / JOURNAL).exists()


def test_a_backup_under_keys_this_restorer_cannot_reach_writes_nothing(env: Env) -> None:
    h = make_host(env)
    _wreck_registry(h)
    ks = keystore.keystore_path(env.home)
    h.svc.destroy("local:test-kek", None)  # the production key lost; no recovery shares given
    keystore.clear_cache()
    before = ks.read_bytes()
    with pytest.raises(BackupError, match="no recipient of backup"):
        _restore(h, components=("keystore", "registry"), replace=True)
    assert ks.read_bytes() == before and not (h.data / "registry.db").exists()
    assert not (env.home / JOURNAL).exists()
    assert h.log.events()[-1]["result"] == "BackupError"
    # With the recovery key's shares the same restore goes through.
    rec = secret_file(env.work / "shares.txt", h.shares[:2])
    report = _restore(h, components=("keystore", "registry"), replace=True, recovery_shares=(rec,))
    assert report["keys"] == "recovery:offline" and provider.installed("offline") is None
    keystore.clear_cache()
    assert keystore.unlock(ks).keys["test-kek"]["versions"]["1"]["state"] == "active"  # the backup's keystore


def test_a_ca_restore_reissues_the_live_certificates_and_revokes_the_old(env: Env) -> None:
    made: dict[str, Any] = {}

    def with_ca(e: Env, svc: KeyService) -> None:
        ca = pki_ca.init_ca(svc, TD)
        made["ca"] = ca
        made["old"] = [
            issue.issue(svc, Identity.of(TD, "prod", kind, name), ca=ca).serial
            for kind, name in (("service", "trainer"), ("user", "alice"))
        ]

    h = make_host(env, with_ca)
    later = issue.issue(h.svc, Identity.of(TD, "prod", "service", "late"), ca=made["ca"])  # after the backup
    shutil.rmtree(env.home / "ca")  # the CA lost
    with pytest.raises(BackupError, match="--reissue-dir"):
        _restore(h, components=("ca",))
    assert not (env.home / "ca").exists()
    out = env.work / "reissued"
    report = _restore(h, components=("ca",), reissue_dir=out)
    assert report["reissue"]["issued"] == 2 and sorted(report["reissue"]["revoked"]) == sorted(made["old"])
    listed = denylist.load(env.home / "ca")
    assert all(listed.revoked(denylist.parse_serial(s)) for s in made["old"])
    index = json.loads((out / "reissued.json").read_text())["identities"]
    assert sorted(index) == sorted(
        f"spiffe://{TD}/prod/{k}/{n}" for k, n in (("service", "trainer"), ("user", "alice"))
    )
    for entry in index.values():
        cert = issue.read_chain(out / entry["folder"])[0]
        assert not listed.revoked(cert.serial_number)
    # A certificate issued after the backup is unknown to the restored CA's records.
    assert later.serial not in {r["serial"] for r in issue.list_issued(pki_ca.load_ca(env.home / "ca"))}
    assert Path(report["record"]).is_file()
