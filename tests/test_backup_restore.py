"""``modelseal backup restore`` for real (docs/recovery.md, "Restores"): one component back
and the others untouched; an interrupted restore re-run finishes from its journal; a backup
whose keys this restorer cannot reach stops before anything is written; a CA restore
re-issues the live certificates and revokes the old serials; an environment's restore keeps
the other environments' keys and governance rows; every restore is recorded."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modelseal.audit.log import MerkleAuditLog
from modelseal.cli import main
from modelseal.errors import BackupError
from modelseal.governance.store import GovStore
from modelseal.keys import keystore
from modelseal.keys.providers import recovery as provider
from modelseal.keys.service import KeyService
from modelseal.pki import ca as pki_ca
from modelseal.pki import denylist, issue
from modelseal.pki.identity import Identity
from modelseal.recovery import reckey, records
from modelseal.recovery.create import create_backup
from modelseal.recovery.locations import Locations
from modelseal.recovery.restore import JOURNAL, RestoreRequest, run_restore
from modelseal.recovery.restoreparts import restore_part
from modelseal.recovery.sealing import load_verified
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

def killed(name, kind, data, loc, *, replace, env=None):
    if name == "registry":
        os.kill(os.getpid(), signal.SIGKILL)  # a real crash between two parts
    return restore_part(name, kind, data, loc, replace=replace, env=env)

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
    config_sha = next(e.sha256 for e in load_verified(str(h.dest), home=env.home)[1].parts if e.name == "config")
    assert journal["done"] == {"config": config_sha} and (env.home / "trust.toml").exists()
    assert not (h.data / "registry.db").exists()

    def interrupted(name: str, kind: str, data: bytes, loc: Any, *, replace: bool, env: str | None) -> dict[str, Any]:
        if name == "registry":
            raise KeyboardInterrupt  # the operator's Ctrl-C on the second run
        return restore_part(name, kind, data, loc, replace=replace, env=env)

    req = RestoreRequest(str(h.dest), components=("config", "registry"), replace=True)
    with pytest.raises(KeyboardInterrupt):
        run_restore(req, h.loc, h.svc, h.log, restore=interrupted)
    assert h.log.events()[-1]["result"] == "KeyboardInterrupt"  # recorded, never as ok
    # Another restore is refused while this one is unfinished.
    with pytest.raises(BackupError, match="unfinished restore"):
        _restore(h, components=("registry",), replace=True)
    report = _restore(h, components=("config", "registry"), replace=True)
    # The part the journal says is done was checked against its target, which holds it.
    assert report["resumed"] == ["config"] and report["parts"]["config"] == {"resumed": "verified"}
    assert _manifests(h) == want and not (env.home / JOURNAL).exists()
    body = records.read_record(Path(report["record"]), records.RESTORE, [records.host_key(env.home)])
    assert body["resumed"] == ["config"] and body["parts"]["config"] == {"resumed": "verified"}


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


def _ca_host(env: Env) -> tuple[Host, dict[str, Any]]:
    made: dict[str, Any] = {}

    def with_ca(e: Env, svc: KeyService) -> None:
        ca = pki_ca.init_ca(svc, TD)
        made["ca"] = ca
        made["old"] = [
            issue.issue(svc, Identity.of(TD, "prod", kind, name), ca=ca).serial
            for kind, name in (("service", "trainer"), ("user", "alice"))
        ]

    return make_host(env, with_ca), made


def test_a_ca_restore_reissues_the_live_certificates_and_revokes_the_old(env: Env) -> None:
    h, made = _ca_host(env)
    # After the backup: a certificate issued, and another issued and revoked (its key stolen).
    later = issue.issue(h.svc, Identity.of(TD, "prod", "service", "late"), ca=made["ca"])
    stolen = issue.issue(h.svc, Identity.of(TD, "prod", "service", "stolen"), ca=made["ca"])
    issue.revoke(h.svc, stolen.cert.serial_number, "key stolen", ca=made["ca"])
    ca_json = env.home / "ca" / "ca.json"
    ca_json.write_text("{}")  # the live CA damaged; its records still there
    with pytest.raises(BackupError, match="--reissue-dir"):
        _restore(h, components=("ca",))
    out = env.work / "reissued"
    with pytest.raises(BackupError, match="differs from the backup's CA: restore with --replace"):
        _restore(h, components=("ca",), reissue_dir=out)
    assert ca_json.read_text() == "{}" and not (env.home / JOURNAL).exists()  # refused before any write
    report = _restore(h, components=("ca",), reissue_dir=out, replace=True)
    ca_counts = report["parts"]["ca"]
    assert ca_counts["live"] == "merged" and ca_counts["later_revocations"] == 1
    assert ca_counts["later_certificates"] == 2 and "warnings" not in report
    # The certificate revoked after the backup stays revoked; the one issued after it is known
    # to the restored CA, re-issued like the others and revoked with them.
    listed = denylist.load(env.home / "ca")
    assert listed.revoked(stolen.cert.serial_number) and listed.revoked(later.cert.serial_number)
    assert later.serial in {r["serial"] for r in issue.list_issued(pki_ca.load_ca(env.home / "ca"))}
    assert report["reissue"]["issued"] == 3
    assert sorted(report["reissue"]["revoked"]) == sorted([*made["old"], later.serial])
    assert all(listed.revoked(denylist.parse_serial(s)) for s in made["old"])
    index = json.loads((out / "reissued.json").read_text())["identities"]
    assert sorted(index) == sorted(
        f"spiffe://{TD}/prod/{k}/{n}" for k, n in (("service", "trainer"), ("user", "alice"), ("service", "late"))
    )
    for entry in index.values():
        cert = issue.read_chain(out / entry["folder"])[0]
        assert not listed.revoked(cert.serial_number)
    assert Path(report["record"]).is_file()
    # Run again: the folder holds the backup's CA (and more records): nothing to do, no refusal.
    again = _restore(h, components=("ca",), reissue_dir=out)
    assert again["parts"]["ca"]["written"] == 0 and again["reissue"]["issued"] == 0
    assert denylist.load(env.home / "ca").revoked(stolen.cert.serial_number)


def test_a_ca_restore_without_a_live_ca_says_later_revocations_cannot_be_known(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    h, made = _ca_host(env)
    later = issue.issue(h.svc, Identity.of(TD, "prod", "service", "late"), ca=made["ca"])
    shutil.rmtree(env.home / "ca")  # the CA lost, and with it what it recorded after the backup
    args = ["backup", "restore", "--from", str(h.dest), "--component", "ca", "--reissue-dir", str(env.work / "re")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "WARNING: no live ca/" in out and "cannot be known" in out
    event = h.log.events()[-1]
    body = records.read_record(
        env.home / event["key"].removeprefix("evidence:"), records.RESTORE, [records.host_key(env.home)]
    )
    assert body["parts"]["ca"]["live"] == "absent" and "cannot be known" in body["warnings"][0]
    # What the live CA issued after the backup is unknown to the restored one: the warning's point.
    assert later.serial not in {r["serial"] for r in issue.list_issued(pki_ca.load_ca(env.home / "ca"))}


def test_a_ca_restore_over_unreadable_live_records_warns(env: Env) -> None:
    h, made = _ca_host(env)
    stolen = issue.issue(h.svc, Identity.of(TD, "prod", "service", "stolen"), ca=made["ca"])
    issue.revoke(h.svc, stolen.cert.serial_number, "key stolen", ca=made["ca"])
    (env.home / "ca" / "revoked.json").write_text("not json")  # the live denylist damaged
    report = _restore(h, components=("ca",), reissue_dir=env.work / "re", replace=True)
    ca_counts = report["parts"]["ca"]
    assert ca_counts["live"] == "unreadable" and ca_counts["unreadable"] == ["live revoked.json"]
    assert ca_counts["later_revocations"] is None and ca_counts["later_certificates"] == 1
    assert "live revoked.json could not be read" in report["warnings"][0]
    # The revocation is lost with the live denylist (hence the warning), but the certificate is
    # still known from the readable issued.json, so the re-authentication revokes it again.
    assert denylist.load(env.home / "ca").revoked(stolen.cert.serial_number)
    assert stolen.serial in report["reissue"]["revoked"]


ENV_CONFIG = """host_env = "prod"
[environments.prod]
keys = ["local:prod-kek", "local:prod-extra"]
[environments.dev]
keys = ["local:dev-kek"]
[backup]
recovery_keys = ["recovery:offline"]
"""


def _bindings(db: Path) -> list[tuple[str, str, str]]:
    con = sqlite3.connect(db)
    try:
        return sorted(con.execute("SELECT id, env, role FROM gov_bindings").fetchall())
    finally:
        con.close()


def _bind(db: Path, rows: list[tuple[str, str, str]]) -> None:
    GovStore.open(db).close()  # the governance tables, as a server makes them
    con = sqlite3.connect(db)
    for i, e, role in rows:
        sql = "INSERT INTO gov_bindings VALUES (?, ?, ?, ?, 2e9, 'binding', 'r', 'admin', 1.0, NULL)"
        con.execute(sql, (i, f"spiffe://d/{e}/user/{i}", role, e))
    con.commit()
    con.close()


def test_an_environments_restore_keeps_the_other_environments_keys_and_rows(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """``backup restore --env prod`` merges prod's keys into the live keystore and replaces
    prod's governance rows only: dev's keys and rows, made before or after the backup, stay;
    the host-wide parts the backup holds (config, audit) are left out unless named."""
    config = env.home / "config.toml"
    config.write_text(ENV_CONFIG)
    config.chmod(0o600)
    reckey.generate("offline", 3, 2, env.home)
    log = MerkleAuditLog(env.home / "audit.db")
    svc = KeyService(sink=log)
    for k in ("prod-kek", "prod-extra", "dev-kek"):
        svc.create(f"local:{k}")
    data = env.work / "registry"
    db = data / "governance.db"
    _bind(db, [("p1", "prod", "reader"), ("p2", "prod", "writer"), ("d1", "dev", "reader")])
    dest = env.work / "backups"
    m = create_backup(str(dest), Locations.from_args(env.home, registry_data=data), "prod", svc, sink=log)
    assert {"keystore", "governance", "config", "audit"} <= {p.name for p in m.parts}
    ks = keystore.keystore_path(env.home)
    before = keystore.unlock(ks).keys
    # After the backup: dev moves on (a key, a binding); prod loses a key and a binding changes.
    svc.create("local:dev-kek-2")
    _bind(db, [("d2", "dev", "writer")])
    with keystore.locked_update(ks) as work:
        del work.keys["prod-extra"]
    con = sqlite3.connect(db)
    con.execute("UPDATE gov_bindings SET role = 'admin' WHERE id = 'p2'")
    con.commit()
    con.close()
    config.write_text(ENV_CONFIG + "# changed after the backup\n")
    keystore.clear_cache()
    args = ["backup", "restore", "--from", str(dest), "--env", "prod", "--data", str(data)]
    # Prod's rows differ: refused before the first write (the keystore, merged first, untouched).
    assert main(args) == BackupError.exit_code
    assert "holds other rows of prod" in capsys.readouterr().err
    keystore.clear_cache()
    assert "prod-extra" not in keystore.unlock(ks).keys and not (env.home / JOURNAL).exists()
    assert main([*args, "--replace"]) == 0, capsys.readouterr().err
    keystore.clear_cache()
    after = keystore.unlock(ks).keys
    assert after["prod-extra"] == before["prod-extra"] and after["prod-kek"] == before["prod-kek"]
    assert after["dev-kek"] == before["dev-kek"] and "dev-kek-2" in after  # dev's keys stay
    assert _bindings(db) == [
        ("d1", "dev", "reader"),
        ("d2", "dev", "writer"),  # made after the backup: kept
        ("p1", "prod", "reader"),
        ("p2", "prod", "writer"),  # prod's row as the backup had it
    ]
    assert config.read_text().endswith("# changed after the backup\n")  # host-wide: left out
    event = log.events()[-1]
    body = records.read_record(
        env.home / event["key"].removeprefix("evidence:"), records.RESTORE, [records.host_key(env.home)]
    )
    assert body["env"] == "prod" and body["selected"] == ["keystore", "governance"]
    assert body["backup"]["signer_key"] == m.signer
    assert body["parts"]["governance"]["env"] == "prod" and body["parts"]["keystore"]["written"] == 1
    # A host-wide part comes back only when named, and then whole.
    req = RestoreRequest(str(dest), env="prod", components=("config",), replace=True)
    report = run_restore(req, Locations.from_args(env.home, registry_data=data), svc, log)
    assert report["selected"] == ["config"] and config.read_text() == ENV_CONFIG
