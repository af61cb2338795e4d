"""Backup parts, the review's findings (issue 15): an environment's restore merges into the
live host instead of replacing it, the OpenBao scope check sees every transit key, the config
part's fixed allowlist, the broker's keys in an environment's keystore, and a config restore
checked whole before its first write."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from modelseal.errors import BackupError, BackupTampered
from modelseal.keys import keystore
from modelseal.recovery import parts, restoreparts, sqldump
from modelseal.recovery.locations import Locations
from modelseal.recovery.partcodec import decode_files, encode_files

from .conftest import PASSPHRASE, Env
from .test_backup_parts import CONFIG, _by_name, _host, _private


def _keys(path: Path) -> dict[str, object]:
    keystore.clear_cache()
    return dict(keystore.unlock(path, lambda: PASSPHRASE.encode()).keys)


def _broker_row(db: Path, name: str, env: str, backing: str) -> None:
    sqldump.create_schema("governance", "sqlite", str(db))  # every governance table, as a server makes them
    con = sqlite3.connect(db)
    con.execute(
        "INSERT INTO gov_broker_keys (name, env, backing, created_by, created) VALUES (?, ?, ?, 'admin', ?)",
        (name, env, backing, time.time()),
    )
    con.commit()
    con.close()


def test_an_environments_keystore_restore_merges_and_keeps_the_others(env: Env) -> None:
    """Finding 2: restoring prod's keystore part (even with replace) adds or replaces prod's keys
    only; another environment's keys, made before or after the backup, stay."""
    loc = _host(env)
    part = _by_name(parts.collect(loc, "prod", env.svc))["keystore"]
    before = _keys(env.home / "keystore.json")
    env.svc.create("local:dev-kek-2")  # made after the backup, in dev
    env.svc.rotate("local:prod-kek")  # prod's key moved on since the backup
    args = ("keystore", "files", part.data, loc)
    with pytest.raises(BackupError, match="key prod-kek of the keystore differs"):
        restoreparts.restore_part(*args, replace=False, env="prod")
    assert _keys(env.home / "keystore.json")["prod-kek"] != before["prod-kek"]  # nothing written
    out = restoreparts.restore_part(*args, replace=True, env="prod")
    assert out["written"] == 1 and out["replaced"] == 1
    after = _keys(env.home / "keystore.json")
    assert after["prod-kek"] == before["prod-kek"] and after["llama-prod"] == before["llama-prod"]
    assert {"dev-kek", "llama-dev", "dev-kek-2", "test-kek"} <= set(after)
    assert restoreparts.restore_part(*args, replace=False, env="prod")["written"] == 0  # re-runnable
    # A whole-host keystore part is not an environment's: refused, not merged wholesale.
    whole = _by_name(parts.collect(loc, None, env.svc))["keystore"]
    with pytest.raises(BackupError, match="not environment prod's alone"):
        restoreparts.restore_part("keystore", "files", whole.data, loc, replace=True, env="prod")


def test_an_environments_governance_restore_touches_its_rows_only(env: Env) -> None:
    """Finding 2: an environment's governance part replaces that environment's rows (bindings,
    holds, broker keys); the other environments' rows and the host-wide tables stay. The parts
    of the whole host are refused for an environment's restore."""
    loc = _host(env)
    db = loc.registry_data / "governance.db"  # type: ignore[operator]
    _broker_row(db, "p1", "prod", "local:p1")
    _broker_row(db, "s1", "dev", "local:s1")
    got = _by_name(parts.collect(loc, "prod", env.svc))
    con = sqlite3.connect(db)
    con.execute("DELETE FROM gov_bindings WHERE env = 'prod'")  # prod's state lost...
    con.execute("DELETE FROM gov_broker_keys WHERE env = 'prod'")
    con.execute("INSERT INTO gov_generation (name, value) VALUES ('host-wide', 7)")  # ...a host-wide row added
    con.commit()
    out = restoreparts.restore_part("governance", "sql", got["governance"].data, loc, replace=False, env="prod")
    assert out["env"] == "prod" and "gov_generation" in out["kept"]
    rows = sorted(con.execute("SELECT id, env FROM gov_bindings").fetchall())
    assert rows == [("b0", "prod"), ("b1", "dev"), ("b2", "prod")]
    assert sorted(con.execute("SELECT name, env FROM gov_broker_keys").fetchall()) == [("p1", "prod"), ("s1", "dev")]
    assert con.execute("SELECT value FROM gov_generation WHERE name = 'host-wide'").fetchone() == (7,)
    con.execute("DELETE FROM gov_broker_keys WHERE name = 's1'")
    con.execute("INSERT INTO gov_broker_keys VALUES ('p2', 'prod', 'local:p2', 'x', 1.0, NULL)")
    con.commit()
    with pytest.raises(BackupError, match="holds rows of prod"):
        restoreparts.restore_part("governance", "sql", got["governance"].data, loc, replace=False, env="prod")
    restoreparts.restore_part("governance", "sql", got["governance"].data, loc, replace=True, env="prod")
    assert sorted(con.execute("SELECT name FROM gov_broker_keys").fetchall()) == [("p1",)]
    for name in restoreparts.HOST_WIDE:
        p = got[name]
        with pytest.raises(BackupError, match="whole host's"):
            restoreparts.restore_part(name, p.kind, p.data, loc, replace=True, env="prod")
    # A part claiming prod but holding another environment's rows is refused.
    forged, _ = sqldump.dump("governance", "sqlite", str(db), name="governance")
    with pytest.raises(BackupTampered, match="another environment"):
        restoreparts.restore_part("governance", "sql", forged, loc, replace=True, env="prod")


SCOPE = """
[recovery]
openbao_env = "prod"
[environments.prod]
keys = ["transit:transit/prod-kek"]
[environments.dev]
keys = ["local:dev-kek"]
[broker.keys.llama-prod]
key = "transit:transit/llama-prod"
env = "prod"
"""


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ('[broker.keys.llama-dev]\nkey = "transit:transit/llama-dev"\nenv = "dev"\n', "transit/llama-dev"),
        ('[broker]\ncreate = { dev = "transit" }\n', "create makes dev"),
        ('[broker]\ncreate = { "*" = "transit" }\n', "every other"),
        ('[pki]\nkek = "transit:transit/ca-kek"\n', "transit/ca-kek"),
        ('[pki]\nbackend = "transit-pki"\n', "transit-pki"),
        ('[governance]\nkey = "transit:transit/gov"\n', "transit/gov"),
        ('[projects.x]\ndev = ["transit:transit/x-dev"]\n', "transit/x-dev"),
    ],
)
def test_the_openbao_scope_sees_every_transit_key(env: Env, extra: str, why: str) -> None:
    """Finding 3: any transit key in config.toml that is not prod's refuses prod's snapshot."""
    _private(env.home / "config.toml", SCOPE + extra)
    loc = Locations.from_args(env.home)
    with pytest.raises(BackupError, match=f"not prod's own.*{why}"):
        parts.check_bao_scope(loc, "prod")


def test_the_openbao_scope_sees_the_broker_catalog_and_the_ca(env: Env, tmp_path: Path) -> None:
    _private(env.home / "config.toml", SCOPE)
    data = tmp_path / "registry"
    loc = Locations.from_args(env.home, registry_data=data)
    parts.check_bao_scope(loc, "prod")  # everything on the cluster is prod's
    data.mkdir()
    _broker_row(data / "governance.db", "p", "prod", "transit:transit/broker-prod-1")
    parts.check_bao_scope(loc, "prod")
    _broker_row(data / "governance.db", "d", "dev", "transit:transit/broker-dev-1")
    with pytest.raises(BackupError, match="catalog has a transit key of environment dev"):
        parts.check_bao_scope(loc, "prod")
    _private(env.home / "config.toml", SCOPE)
    _private(env.home / "ca" / "ca.json", '{"backend": "transit-pki", "format": "modelseal-ca-transit-pki-v1"}')
    with pytest.raises(BackupError, match="CA is on transit-pki"):
        parts.check_bao_scope(Locations.from_args(env.home), "prod")


def test_an_environments_keystore_holds_its_broker_keys(env: Env) -> None:
    """Finding 8: prod's broker keys backed by ``local:`` (static in config.toml, or made through
    the API and named only in ``gov_broker_keys``) are in prod's keystore export; dev's are not."""
    loc = _host(env)
    _private(
        env.home / "config.toml",
        CONFIG + '[broker.keys.llama-p]\nkey = "local:static-prod"\nenv = "prod"\n'
        '[broker.keys.llama-d]\nkey = "local:static-dev"\nenv = "dev"\n',
    )
    for k in ("static-prod", "static-dev", "broker-prod-1", "broker-dev-1"):
        env.svc.create(f"local:{k}")
    db = loc.registry_data / "governance.db"  # type: ignore[operator]
    _broker_row(db, "made-p", "prod", "local:broker-prod-1")
    _broker_row(db, "made-d", "dev", "local:broker-dev-1")
    part = _by_name(parts.collect(loc, "prod", env.svc))["keystore"]
    _, files = decode_files(part.data, "keystore")
    exported = env.work / "export" / "keystore.json"
    _private(exported, files["keystore.json"][0])
    assert set(_keys(exported)) == {"prod-kek", "llama-prod", "static-prod", "broker-prod-1"}


@pytest.mark.parametrize(
    "name",
    [
        "keystore.json",
        "backup-state.json",
        "backup-signing.key",
        "audit-signing.key",
        "recovery/offline.pub",
        "ca/ca.json",
        "evidence/backups/x.json",
        "incidents/1/journal.json",
        "audit.db",
        "restore-journal.json",
        "policy.sh",
    ],
)
def test_a_config_part_never_writes_a_name_other_state_owns(tmp_path: Path, name: str) -> None:
    """Finding 6: a config part's own config.toml naming the keystore, the backup state, a
    signing key, a recovery key, the CA or evidence as a policy file writes nothing."""
    config = f'trust_policy = "policy.toml"\n[governance]\npolicy = "{name}"\n'.encode()
    policy = f'[signers.x]\nkeys = ["{name}"]\n[revocation]\nlist = "{name}"\n'.encode()
    files = {"config.toml": (config, 0o600), "policy.toml": (policy, 0o600), name: (b"planted", 0o644)}
    home = tmp_path / "home"
    loc = Locations(home, None, None, None, home / "audit.db", None)
    with pytest.raises(BackupTampered, match="not a file it may restore"):
        restoreparts.restore_part("config", "files", encode_files("config", files), loc, replace=True)
    assert not home.exists() or not any(home.rglob("*"))


def test_a_config_restore_forces_0600_and_checks_every_folder_first(tmp_path: Path) -> None:
    """Findings 6 and 9: every restored config file is 0600 whatever the part says; a folder of
    the plan that leads out of the home refuses the part before its first write."""
    home = tmp_path / "home"
    loc = Locations(home, None, None, None, home / "audit.db", None)
    config = b'trust_policy = "aaa-policy.toml"\n'
    policy = b'[signers.x]\nkeys = ["trust/k.pub"]\n'
    files = {
        "config.toml": (config, 0o644),
        "aaa-policy.toml": (policy, 0o644),
        "trust/k.pub": (b"k", 0o644),
        "audit/audit-hosts.toml": (b"[hosts]\n", 0o644),
    }
    data = encode_files("config", files)
    outside = tmp_path / "outside"
    outside.mkdir()
    home.mkdir(mode=0o700)
    (home / "trust").symlink_to(outside)
    with pytest.raises(BackupError, match="leads out of"):
        restoreparts.restore_part("config", "files", data, loc, replace=True)
    assert sorted(p.name for p in home.iterdir()) == ["trust"] and not any(outside.iterdir())  # nothing at all
    (home / "trust").unlink()
    assert restoreparts.restore_part("config", "files", data, loc, replace=True)["written"] == 4
    for n in ("config.toml", "aaa-policy.toml", "trust/k.pub", "audit-hosts.toml"):
        assert (home / n).stat().st_mode & 0o777 == 0o600, n
