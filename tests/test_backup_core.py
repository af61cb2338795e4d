"""The backup core (docs/recovery.md, "The offline recovery key", "Backups"): the recovery key
and its shares, sealed parts, the signed manifest, the chain and the host's record of it, the
folder store's all-or-nothing write, and the ``modelseal backup`` commands' one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modelseal.cli import main
from modelseal.errors import (
    BackupError,
    BackupTampered,
    DecryptionError,
    DestinationExists,
    KeyNotFound,
    KeyProviderError,
)
from modelseal.format.header import Recipient
from modelseal.keys.providers import provider_for, recipient_key
from modelseal.keys.providers import recovery as provider
from modelseal.keys.service import KeyService
from modelseal.recovery import reckey
from modelseal.recovery.chain import read_manifest
from modelseal.recovery.create import create_backup
from modelseal.recovery.locations import Locations
from modelseal.recovery.manifest import MANIFEST_NAME, Manifest, signing_key
from modelseal.recovery.parts import Part
from modelseal.recovery.sealing import load_verified, seal_part, unseal_part
from modelseal.recovery.stores import open_store
from tests.conftest import PASSPHRASE, Env

ROOT = Path(__file__).resolve().parent.parent
MARK = b"PLAINTEXT-MARKER-7f3a91"
CONFIG = """
[environments.prod]
keys = ["local:prod-kek"]
[environments.dev]
keys = ["local:dev-kek"]
[backup]
recovery_keys = ["recovery:offline"]
"""


@pytest.fixture(autouse=True)
def _no_installed_recovery_keys() -> object:
    provider.forget()
    yield None
    provider.forget()


@pytest.fixture
def bk(env: Env) -> tuple[Env, list[str], KeyService]:
    (env.home / "config.toml").write_text(CONFIG)
    env.svc.create("prod-kek")
    env.svc.create("dev-kek")
    shares = reckey.generate("offline", 3, 2, env.home)
    return env, shares, KeyService(sink=env.sink)


def parts(tag: bytes = b"") -> list[Part]:
    return [
        Part("keystore", "files", MARK + b"-keystore" + tag + os.urandom(3000), {"files": 1}),
        Part("config", "files", MARK + b"-config" + tag, {"files": 2}),
        Part("audit", "sql", MARK + b"-audit" + tag * 100, {"size": 3, "root": "00" * 32}),
    ]


def backup(env: Env, svc: KeyService, dest: Path, tag: bytes = b"") -> Manifest:
    return create_backup(str(dest), Locations.from_args(env.home), "prod", svc, parts=parts(tag))


def every_file(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


# -- the recovery key ------------------------------------------------------------


def test_recovery_key_derivation_is_fixed() -> None:
    """A known answer: the seed -> key derivation (docs/format.md, section 9a) never changes,
    or every share set ever handed out would stop opening backups."""
    _private, public = provider.derive(bytes(range(32)))
    assert len(public) == provider.PUBLIC_LEN
    assert provider.fingerprint(public).hex() == "4cb21d5e4a8f81ab61eeca4177c405947172277ceddd78cc62f889791cf3adba"


def test_wrap_needs_only_the_public_key_and_unwrap_only_the_shares(bk: tuple[Env, list[str], KeyService]) -> None:
    env, shares, _ = bk
    p = provider_for("recovery")
    ctx = (("env", "prod"), ("purpose", "backup"))
    r = p.wrap("offline", b"k" * 32, ctx)
    assert (r.scheme, r.key_id, r.key_version, len(r.wrapped)) == ("recovery", "offline", 1, 1168)
    with pytest.raises(KeyNotFound, match="not unlocked"):
        p.unwrap(r, ctx)
    reckey.unlock("offline", shares[1:], home=env.home)
    assert p.unwrap(r, ctx) == b"k" * 32
    with pytest.raises(DecryptionError):
        p.unwrap(r, (("env", "dev"), ("purpose", "backup")))  # bound to its context
    with pytest.raises(DecryptionError):
        p.unwrap(Recipient("recovery", "offline", 1, r.wrapped[:-1] + bytes([r.wrapped[-1] ^ 1])), ctx)
    with pytest.raises(KeyNotFound):
        p.unwrap(Recipient("recovery", "offline", 2, r.wrapped), ctx)
    assert recipient_key("recovery", "offline") == "recovery:offline"
    with pytest.raises(KeyProviderError):
        recipient_key("recovery", "../x")


def test_unlock_refuses_short_foreign_and_repeated_share_sets(bk: tuple[Env, list[str], KeyService]) -> None:
    env, shares, _ = bk
    other = reckey.generate("other", 2, 2, env.home)
    with pytest.raises(BackupError, match="do not combine") as short:
        reckey.unlock("offline", shares[:1], home=env.home)
    assert shares[0].split()[0] not in str(short.value)  # no word of a share in the line
    with pytest.raises(BackupError, match="another recovery key"):
        reckey.unlock("offline", other, home=env.home)
    with pytest.raises(BackupError, match="twice"):
        reckey.unlock("offline", [shares[0], shares[0]], home=env.home)
    with pytest.raises(BackupError, match="do not combine"):
        reckey.unlock("offline", [shares[0], other[0]], home=env.home)
    assert provider.installed("offline") is None


def test_public_key_file_others_can_write_is_refused(bk: tuple[Env, list[str], KeyService]) -> None:
    env, _, _ = bk
    pub = env.home / "recovery" / "offline.pub"
    assert b"public_key" in pub.read_bytes() and oct(pub.stat().st_mode & 0o777) == "0o644"
    pub.chmod(0o666)
    with pytest.raises(KeyProviderError, match="writable by group or others"):
        provider_for("recovery").wrap("offline", b"k" * 32, ())
    pub.chmod(0o644)
    doc = json.loads(pub.read_text())
    doc["fingerprint"] = "00" * 32
    pub.write_text(json.dumps(doc))
    with pytest.raises(KeyProviderError, match="not a valid recovery public key"):
        provider.load_public("offline", env.home)


def test_too_many_recipients_for_the_slot_is_a_clear_error(bk: tuple[Env, list[str], KeyService]) -> None:
    env, _, svc = bk
    names = [f"offline-2026-{i}" for i in range(4)]
    for n in names:
        reckey.generate(n, 2, 2, env.home)
    uris = ["local:prod-kek"] + [f"recovery:{n}" for n in names]
    seal_part("config", b"x", env="prod", backup_id="20260101T000000Z-0123abcd", key_uris=uris[:4], svc=svc)
    with pytest.raises(BackupError, match="do not fit"):
        seal_part("config", b"x", env="prod", backup_id="20260101T000000Z-0123abcd", key_uris=uris, svc=svc)


def test_generate_refuses_an_existing_name(bk: tuple[Env, list[str], KeyService]) -> None:
    env, _, _ = bk
    with pytest.raises(DestinationExists, match="exists already"):
        reckey.generate("offline", 2, 2, env.home)


# -- backups ----------------------------------------------------------------------


def test_round_trip_sealed_signed_and_chained(bk: tuple[Env, list[str], KeyService], tmp_path: Path) -> None:
    env, _, svc = bk
    dest = tmp_path / "dest"
    first = backup(env, svc, dest, b"1")
    second = backup(env, svc, dest, b"2")
    store, m = load_verified(str(dest), home=env.home)
    assert m.id == second.id and m.sequence == 2
    stored = (dest / first.id / MANIFEST_NAME).read_bytes()
    assert m.previous == first.digest == hashlib.sha256(stored).hexdigest()
    assert m.recipients == ("local:prod-kek", "recovery:offline")
    assert [p.name for p in m.parts] == ["keystore", "config", "audit"]
    want = {p.name: p.data for p in parts(b"2")}
    got = {e.name: unseal_part(store, m, e, svc) for e in m.parts}
    assert got["config"] == want["config"] and got["audit"] == want["audit"]
    assert got["keystore"].startswith(MARK + b"-keystore2")
    ok = [e for e in env.sink.events if e.operation == "backup-create" and e.result == "ok"]
    assert [e.key for e in ok] == [f"backup:{first.id}", f"backup:{second.id}"]
    assert ok[-1].artifact == m.digest
    records = list((env.home / "evidence" / "backups").glob("backup-*.json"))
    assert len(records) == 2 and all(r.stat().st_mode & 0o077 == 0 for r in records)
    vouched = {e.key for e in env.sink.events if e.operation == "backup-record"}
    assert vouched == {f"evidence:evidence/backups/{r.name}" for r in records}
    state = json.loads((env.home / "backup-state.json").read_text())
    assert next(iter(state["stores"].values()))["sequence"] == 2


def test_the_backup_is_never_plaintext(bk: tuple[Env, list[str], KeyService], tmp_path: Path) -> None:
    env, _, svc = bk
    dest = tmp_path / "dest"
    backup(env, svc, dest)
    files = every_file(dest)
    assert len(files) >= 4
    for f in files:
        assert MARK not in f.read_bytes(), f
    for f in every_file(dest):
        if f.suffix == ".mseal":
            assert f.read_bytes()[:8] == b"\x89MSEAL\r\n"


def test_no_recovery_key_configured_is_refused(env: Env, tmp_path: Path) -> None:
    (env.home / "config.toml").write_text('[environments.prod]\nkeys = ["local:test-kek"]\n')
    with pytest.raises(BackupError, match="modelseal backup keygen"):
        create_backup(
            str(tmp_path / "d"), Locations.from_args(env.home), "prod", KeyService(sink=env.sink), parts=parts()
        )
    assert not (tmp_path / "d").exists() or open_store(str(tmp_path / "d")).list_ids() == []
    assert [e.result for e in env.sink.events if e.operation == "backup-create"] == ["BackupError"]


def test_a_destination_inside_the_home_is_refused(bk: tuple[Env, list[str], KeyService]) -> None:
    env, _, svc = bk
    with pytest.raises(BackupError, match="inside MODELSEAL_HOME"):
        backup(env, svc, env.home / "backups")
    assert not (env.home / "backups").exists()


def test_a_tampered_part_is_refused_before_anything_is_opened(
    bk: tuple[Env, list[str], KeyService], tmp_path: Path
) -> None:
    env, _, svc = bk
    dest = tmp_path / "dest"
    m = backup(env, svc, dest)
    part = dest / m.id / "parts" / "config.mseal"
    data = bytearray(part.read_bytes())
    data[-5] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(BackupTampered, match=r"part config .* does not match"):
        load_verified(str(dest), home=env.home)
    unwraps = sum(e.operation == "unwrap" for e in env.sink.events)
    store = open_store(str(dest))
    mm = read_manifest(store, m.id)
    with pytest.raises(BackupTampered):
        unseal_part(store, mm, mm.part("config"), svc)
    assert sum(e.operation == "unwrap" for e in env.sink.events) == unwraps  # no key was asked


def test_an_edited_manifest_fails_its_signature(bk: tuple[Env, list[str], KeyService], tmp_path: Path) -> None:
    env, _, svc = bk
    dest = tmp_path / "dest"
    m = backup(env, svc, dest)
    path = dest / m.id / MANIFEST_NAME
    path.write_bytes(path.read_bytes().replace(b'"host":"', b'"host":"x', 1))
    with pytest.raises(BackupTampered, match="signature"):
        load_verified(str(dest), home=env.home)


def test_an_untrusted_signer_is_refused(bk: tuple[Env, list[str], KeyService], tmp_path: Path) -> None:
    env, _, svc = bk
    dest = tmp_path / "dest"
    backup(env, svc, dest)
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o700)
    with pytest.raises(BackupError, match="--signer-key"):
        load_verified(str(dest), home=fresh)
    with pytest.raises(BackupTampered, match="does not trust"):
        load_verified(str(dest), home=fresh, signer_keys=["11" * 32])
    own = signing_key(env.home).public_key().public_bytes_raw().hex()
    load_verified(str(dest), home=fresh, signer_keys=[own])[0].close()


def test_a_backup_deleted_from_the_middle_breaks_the_chain(
    bk: tuple[Env, list[str], KeyService], tmp_path: Path
) -> None:
    env, _, svc = bk
    dest = tmp_path / "dest"
    ids = [backup(env, svc, dest, bytes([65 + i])).id for i in range(3)]
    shutil.rmtree(dest / ids[1])
    fresh = tmp_path / "fresh"  # no host state: the chain alone finds it
    fresh.mkdir(mode=0o700)
    own = signing_key(env.home).public_key().public_bytes_raw().hex()
    with pytest.raises(BackupTampered, match="gap"):
        load_verified(str(dest), home=fresh, signer_keys=[own])
    with pytest.raises(BackupTampered, match="gap"):
        backup(env, svc, dest)  # nothing is chained onto a broken chain


def test_an_older_backup_swapped_in_is_refused(bk: tuple[Env, list[str], KeyService], tmp_path: Path) -> None:
    env, _, svc = bk
    dest = tmp_path / "dest"
    backup(env, svc, dest, b"A")
    snapshot = tmp_path / "snapshot"
    shutil.copytree(dest, snapshot)
    newest = backup(env, svc, dest, b"B")
    # The whole store rolled back to its earlier state: a valid chain, but behind this host.
    shutil.rmtree(dest)
    shutil.copytree(snapshot, dest)
    with pytest.raises(BackupTampered, match="has seen sequence 2"):
        load_verified(str(dest), home=env.home)
    # The newest backup's folder replaced by a copy of the older one under its name.
    shutil.rmtree(dest)
    shutil.copytree(snapshot, dest)
    older = next(p for p in dest.iterdir() if p.is_dir())
    shutil.copytree(older, dest / newest.id)
    with pytest.raises(BackupTampered, match="names another backup"):
        load_verified(str(dest), home=env.home)


def test_sealed_to_keys_this_restorer_cannot_reach(bk: tuple[Env, list[str], KeyService], tmp_path: Path) -> None:
    """A fresh process on a fresh home: no keystore, no recovery key unlocked -> one clear
    BackupError naming the recipients; the shares alone then open every part."""
    env, shares, svc = bk
    dest = tmp_path / "dest"
    m = backup(env, svc, dest, b"Z")
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o700)
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        from modelseal.audit.events import MemorySink
        from modelseal.errors import BackupError
        from modelseal.keys.config import Config
        from modelseal.keys.service import KeyService
        from modelseal.recovery import reckey
        from modelseal.recovery.sealing import load_verified, seal_part, unseal_part
        a = json.loads(sys.stdin.read())
        svc = KeyService(sink=MemorySink(), config=Config())
        store, m = load_verified(a["dest"], signer_keys=[a["signer"]], home=Path(a["home"]))
        try:
            unseal_part(store, m, m.parts[0], svc)
            print("OPENED WITHOUT A KEY")
        except BackupError as e:
            print("refused:", e)
        name, fp = m.recovery_keys[0]
        reckey.unlock(name, a["shares"], expect_fingerprint=fp)
        print(json.dumps({e.name: unseal_part(store, m, e, svc).hex() for e in m.parts}))
        """
    )
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSEAL_")}
    child_env["MODELSEAL_HOME"] = str(fresh)
    own = signing_key(env.home).public_key().public_bytes_raw().hex()
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps({"dest": str(dest), "home": str(fresh), "signer": own, "shares": shares[::2]}),
        capture_output=True,
        text=True,
        env=child_env,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    refused, opened = done.stdout.strip().splitlines()
    assert refused.startswith("refused: no recipient of backup") and "local:prod-kek, recovery:offline" in refused
    got = {k: bytes.fromhex(v) for k, v in json.loads(opened).items()}
    assert got["config"] == MARK + b"-configZ" and len(got) == len(m.parts)


def test_an_exception_midway_leaves_nothing_that_lists(
    bk: tuple[Env, list[str], KeyService], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, _, svc = bk
    dest = tmp_path / "dest"
    from modelseal.recovery import create

    real, calls = create.seal_part, []

    def failing(*a: object, **k: object) -> bytes:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk on fire")
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(create, "seal_part", failing)
    with pytest.raises(OSError, match="disk on fire"):
        backup(env, svc, dest)
    assert open_store(str(dest)).list_ids() == []
    assert [p.name for p in dest.iterdir()] == [".modelseal-backup.lock"]  # the partial folder is gone
    assert [e.result for e in env.sink.events if e.operation == "backup-create"] == ["OSError"]


@pytest.mark.parametrize("where", ["second part", "before the rename"])
def test_a_killed_backup_leaves_nothing_that_lists(
    bk: tuple[Env, list[str], KeyService], tmp_path: Path, where: str
) -> None:
    """SIGKILL while a part is sealed, and with the manifest written just before the folder's
    rename: either way nothing lists, and the next run sweeps the partial folder."""
    env, _, svc = bk
    dest = tmp_path / "dest"
    script = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from modelseal.recovery import create, stores
        from modelseal.recovery.locations import Locations
        from modelseal.recovery.parts import Part
        def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        if sys.argv[2] == "second part":
            real, calls = create.seal_part, []
            def dying(*a, **k):
                calls.append(1)
                return die() if len(calls) == 2 else real(*a, **k)
            create.seal_part = dying
        else:
            stores.replace = die
        ps = [Part("keystore", "files", b"k" * 100, {}), Part("config", "files", b"c", {})]
        create.create_backup(sys.argv[1], Locations.from_args(Path(os.environ["MODELSEAL_HOME"])), "prod",
                             create.KeyService(), parts=ps)
        """
    )
    child_env = {**os.environ, "MODELSEAL_HOME": str(env.home), "MODELSEAL_PASSPHRASE": PASSPHRASE}
    done = subprocess.run([sys.executable, "-c", script, str(dest), where], env=child_env, cwd=ROOT, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert open_store(str(dest)).list_ids() == []
    partial = [p for p in dest.iterdir() if p.name.startswith(".partial-")]
    assert len(partial) == 1  # it died with a partial folder...
    assert (partial[0] / MANIFEST_NAME).exists() == (where == "before the rename")  # ...complete inside or not
    m = backup(env, svc, dest)  # the next run sweeps it, under the folder's lock
    assert open_store(str(dest)).list_ids() == [m.id]
    assert not any(p.name.startswith(".partial-") for p in dest.iterdir())
    assert load_verified(str(dest), home=env.home)[1].sequence == 1


def test_a_failed_keygen_leaves_no_public_key_and_no_shares(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = reckey.write_new, []

    def failing(*a: object, **k: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(reckey, "write_new", failing)
    out = tmp_path / "shares"
    with pytest.raises(OSError, match="No space"):
        reckey.generate_to("offline", 3, 2, env.home, out)
    assert not out.exists() and not (env.home / "recovery" / "offline.pub").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shares")] == []
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


# -- the CLI ----------------------------------------------------------------------


def test_cli_keygen_create_list_verify(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (env.home / "config.toml").write_text(CONFIG)
    env.svc.create("prod-kek")
    out = tmp_path / "shares"
    assert main(["backup", "keygen", "--name", "offline", "--shares", "3", "--threshold", "2", "--out", str(out)]) == 0
    files = sorted(out.iterdir())
    assert len(files) == 3 and all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    printed = capsys.readouterr().out
    assert "fingerprint" in printed and all(f.read_text().strip() not in printed for f in files)
    assert main(["backup", "keygen", "--name", "again", "--shares", "2", "--threshold", "2", "--out", str(out)]) == 7
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an empty folder" in err
    assert not (env.home / "recovery" / "again.pub").exists()

    dest = tmp_path / "dest"
    assert main(["backup", "create", "--to", str(dest), "--env", "prod"]) == 0
    assert "sealed to local:prod-kek, recovery:offline" in capsys.readouterr().out
    assert main(["backup", "create", "--to", str(dest), "--retain", "30d"]) == 23
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs an S3 bucket with Object Lock" in err
    assert main(["backup", "create", "--to", str(dest), "--retain", "forever"]) == 23
    assert "a duration like 30d" in capsys.readouterr().err
    assert main(["backup", "list", "--from", str(dest)]) == 0
    assert "#1" in capsys.readouterr().out
    assert main(["backup", "verify", "--from", str(dest), "--deep"]) == 0
    assert "every part opened here" in capsys.readouterr().out

    bad = next(dest.glob("*/parts/config.mseal"))
    bad.write_bytes(bad.read_bytes()[:-1] + b"\x00")
    assert main(["backup", "verify", "--from", str(dest)]) == 24
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("modelseal: error: part config")
    assert main(["backup", "verify", "--from", str(tmp_path / "nothing")]) == 23
    assert "no backup in" in capsys.readouterr().err
    (env.home / "config.toml").write_text(CONFIG.replace('recovery_keys = ["recovery:offline"]', ""))
    assert main(["backup", "create", "--to", str(tmp_path / "d2"), "--env", "prod"]) == 23
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "modelseal backup keygen" in err


# -- end to end, with the real collector ------------------------------------------


def test_a_prod_backup_holds_no_dev_key_end_to_end(bk: tuple[Env, list[str], KeyService], tmp_path: Path) -> None:
    """``create_backup`` with ``recovery.parts.collect``: the prod backup's keystore holds the
    prod key only; the whole-host backup holds every key; no stored file shows the keystore's or
    config.toml's plaintext."""
    from modelseal.keys import keystore
    from modelseal.recovery.partcodec import decode_files

    env, _, svc = bk
    loc = Locations.from_args(env.home)
    prod = create_backup(str(tmp_path / "prod"), loc, "prod", svc)
    whole = create_backup(str(tmp_path / "all"), loc, None, svc)
    assert prod.env == "prod" and whole.env is None
    assert {"keystore", "config"} <= {p.name for p in prod.parts}

    def key_names(dest: Path) -> set[str]:
        store, m = load_verified(str(dest), home=env.home)
        try:
            _, files = decode_files(unseal_part(store, m, m.part("keystore"), svc), "keystore")
        finally:
            store.close()
        copy = tmp_path / f"ks-{dest.name}.json"
        copy.write_bytes(files["keystore.json"][0])
        copy.chmod(0o600)
        keystore.clear_cache()
        return set(keystore.unlock(copy, lambda: PASSPHRASE.encode()).keys)

    assert key_names(tmp_path / "prod") == {"prod-kek"}
    assert key_names(tmp_path / "all") == {"test-kek", "prod-kek", "dev-kek"}
    assert b'"scrypt"' in (env.home / "keystore.json").read_bytes()  # in clear in the keystore file...
    for dest in (tmp_path / "prod", tmp_path / "all"):
        for f in every_file(dest):
            assert b'"scrypt"' not in f.read_bytes() and b"[environments" not in f.read_bytes(), f  # ...never here


# -- review findings (issue 15) -----------------------------------------------------


def _other_host(env: Env, tmp_path: Path, name: str) -> Path:
    """A second home with the same config and recovery public key: another host's backups
    (its own backup signing key and host state)."""
    home = tmp_path / name
    (home / "recovery").mkdir(mode=0o700, parents=True)
    shutil.copy2(env.home / "config.toml", home / "config.toml")
    shutil.copy2(env.home / "recovery" / "offline.pub", home / "recovery" / "offline.pub")
    return home


def _backup_from(home: Path, svc: KeyService, dest: Path, tag: bytes, at: int) -> Manifest:
    return create_backup(str(dest), Locations.from_args(home), "prod", svc, parts=parts(tag), now=lambda: at)


def test_manifests_are_signed_by_the_backup_key_never_the_audit_key(
    bk: tuple[Env, list[str], KeyService], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 1: the key that signs manifests is ``backup-signing.key`` (0600), in no part;
    the audit key and ``audit-hosts.toml``'s keys do not make a manifest trusted."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from modelseal.audit.hosts import host_line
    from modelseal.audit.log import load_or_create_signing_key, public_key_hex
    from modelseal.recovery import manifest as mf
    from modelseal.recovery.partcodec import decode_files

    env, _, svc = bk
    audit = load_or_create_signing_key(env.home / "audit-signing.key")
    peer = Ed25519PrivateKey.generate()
    (env.home / "audit-hosts.toml").write_text(f"[hosts]\n{host_line('peer', peer.public_key())}\n")
    (env.home / "audit-hosts.toml").chmod(0o600)
    dest = tmp_path / "dest"
    m = create_backup(str(dest), Locations.from_args(env.home), "prod", svc)  # the real collector
    key_file = env.home / "backup-signing.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert m.signer == mf.own_signer(env.home) != public_key_hex(audit.public_key())
    store, m = load_verified(str(dest), home=env.home)
    try:
        for e in m.parts:
            plain = unseal_part(store, m, e, svc)
            assert key_file.read_bytes() not in plain and b"PRIVATE KEY" not in plain, e.name
        _, config = decode_files(unseal_part(store, m, m.part("config"), svc), "config")
        assert not any(n.endswith(".key") for n in config)
    finally:
        store.close()
    # A manifest signed by the audit key or a fleet member's audit key is not trusted.
    body = json.loads((dest / m.id / MANIFEST_NAME).read_bytes())["manifest"]
    for forger in (audit, peer):
        forged = {**body, "signer": public_key_hex(forger.public_key())}
        (dest / m.id / MANIFEST_NAME).write_bytes(mf.sign(forged, forger))
        with pytest.raises(BackupTampered, match="does not trust"):
            load_verified(str(dest), home=env.home)
    # The record carries the backup key, and is signed by the audit key as every record is.
    record = json.loads(next((env.home / "evidence" / "backups").glob("*.json")).read_text())
    assert record["body"]["signer_key"] == m.signer and record["signer"] == public_key_hex(audit.public_key())
    main(["backup", "create", "--to", str(tmp_path / "cli")])
    assert f"signed by backup signing key {m.signer}" in capsys.readouterr().out


def test_another_hosts_chain_is_refused_even_with_its_key_trusted(
    bk: tuple[Env, list[str], KeyService], tmp_path: Path
) -> None:
    """Finding 4: a chain id, fixed at sequence 1 and signed in every manifest, is kept in the
    host state; a store whose backups the host saw were pruned must still be that chain,
    signed by that key. Another host's chain put in its place is refused."""
    from modelseal.recovery import manifest as mf

    env, _, svc = bk
    home_b = _other_host(env, tmp_path, "host-b")
    dest_a, dest_b = tmp_path / "a", tmp_path / "b"
    made_b = [_backup_from(home_b, svc, dest_b, b"B%d" % i, 1_800_000_000 + 100 * i) for i in range(5)]
    made_a = [_backup_from(env.home, svc, dest_a, b"A%d" % i, 1_800_000_000 + 100 * i) for i in range(3)]
    saved = (env.home / "backup-state.json").read_bytes()  # this host has seen sequence 3
    made_a += [_backup_from(env.home, svc, dest_a, b"A%d" % i, 1_800_000_000 + 100 * i) for i in (3, 4)]
    assert [m.sequence for m in made_a] == [1, 2, 3, 4, 5] and len({m.chain for m in made_a}) == 1
    assert made_a[0].chain != made_b[0].chain and all(len(m.chain) == 32 for m in made_a)
    assert json.loads(saved)["stores"][f"file://{dest_a}"]["chain"] == made_a[0].chain
    both = [mf.own_signer(env.home) or "", mf.own_signer(home_b) or ""]
    # This host's own chain, pruned past what it saw: accepted (the same chain, the same signer).
    for m in made_a[:3]:
        shutil.move(dest_a / m.id, tmp_path / m.id)
    (env.home / "backup-state.json").write_bytes(saved)
    store, newest = load_verified(str(dest_a), home=env.home)
    store.close()
    assert newest.id == made_a[-1].id
    # Another host's chain in its place, its key trusted too, sequences past what this host saw.
    (env.home / "backup-state.json").write_bytes(saved)
    for m in made_a[3:]:
        shutil.rmtree(dest_a / m.id)
    for m in made_b[3:]:
        shutil.copytree(dest_b / m.id, dest_a / m.id)
    with pytest.raises(BackupTampered, match="another chain"):
        load_verified(str(dest_a), home=env.home, signer_keys=both)
    with pytest.raises(BackupTampered, match="does not trust"):  # by default only this host's key
        load_verified(str(dest_a), home=env.home)
    # Two chains mixed in one store break the chain itself (a host with no record finds it too).
    for m in made_a[:3]:
        shutil.move(tmp_path / m.id, dest_a / m.id)
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o700)
    with pytest.raises(BackupTampered, match="does not chain"):
        load_verified(str(dest_a), home=fresh, signer_keys=both)


def test_a_symlink_swapped_in_does_not_reset_the_rollback_guard(
    bk: tuple[Env, list[str], KeyService], tmp_path: Path
) -> None:
    """Finding 5: the host state is keyed by the path as given (never resolved), and a read
    through a destination that is a symbolic link is refused."""
    env, _, svc = bk
    share = tmp_path / "share"
    share.mkdir()
    dest = share / "modelseal"
    made = [backup(env, svc, dest, bytes([65 + i])) for i in range(3)]
    state = json.loads((env.home / "backup-state.json").read_text())
    assert list(state["stores"]) == [f"file://{dest}"]
    shutil.copytree(dest, share / "copy")
    shutil.rmtree(share / "copy" / made[-1].id)
    dest.rename(share / "real")
    dest.symlink_to(share / "copy")
    with pytest.raises(BackupError, match="symbolic link"):
        load_verified(str(dest), home=env.home)
    dest.unlink()
    shutil.copytree(share / "copy", dest)  # the same copy, as a plain folder: behind this host
    with pytest.raises(BackupTampered, match="has seen sequence 3"):
        load_verified(str(dest), home=env.home)


def test_a_fresh_host_refuses_a_truncated_chain_when_told_what_to_expect(
    bk: tuple[Env, list[str], KeyService],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 12: a host with no record of a store takes ``--expect-sequence N`` and
    ``--expect-manifest SHA256`` (known out of band, as ``create`` prints them); ``verify``
    warns when the newest backup is older than ``[backup] rpo``."""
    env, _, svc = bk
    dest = tmp_path / "dest"
    made = [_backup_from(env.home, svc, dest, bytes([65 + i]), 1_700_000_000 + 60 * i) for i in range(3)]
    signer = made[0].signer
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o700)
    got = load_verified(str(dest), home=fresh, signer_keys=[signer], expect_sequence=3, expect_manifest=made[2].digest)
    got[0].close()
    shutil.rmtree(dest / made[-1].id)  # the newest deleted: a valid, shorter chain
    fresh2 = tmp_path / "fresh2"
    fresh2.mkdir(mode=0o700)
    load_verified(str(dest), home=fresh2, signer_keys=[signer])[0].close()  # nothing to tell it from a whole one
    with pytest.raises(BackupTampered, match="sequence 3 was expected"):
        load_verified(str(dest), home=fresh2, signer_keys=[signer], expect_sequence=3)
    with pytest.raises(BackupTampered, match="that was expected"):
        load_verified(str(dest), home=fresh2, signer_keys=[signer], expect_manifest=made[2].digest.upper())
    with pytest.raises(BackupError, match="64 hex"):
        load_verified(str(dest), home=fresh2, signer_keys=[signer], expect_manifest="abc")
    argv = ["backup", "verify", "--from", str(dest), "--signer-key", signer]
    cli_home = tmp_path / "cli-home"
    cli_home.mkdir(mode=0o700)
    monkeypatch.setenv("MODELSEAL_HOME", str(cli_home))
    assert main([*argv, "--expect-sequence", "3"]) == 24
    assert capsys.readouterr().err.count("\n") == 1
    assert main([*argv, "--expect-manifest", made[1].digest]) == 0
    out = capsys.readouterr()
    assert "verified" in out.out and "warning" not in out.err
    # The newest backup kept (2023) is older than the configured RPO: a warning, still exit 0.
    (cli_home / "config.toml").write_text('[backup]\nrpo = "4h"\n')
    (cli_home / "config.toml").chmod(0o600)
    assert main(argv) == 0
    assert "older than [backup] rpo (4.0 h)" in capsys.readouterr().err


def test_a_backup_written_but_not_recorded_says_so(
    bk: tuple[Env, list[str], KeyService], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 13: once the manifest is in the store the backup exists; a failure to record it
    on this host (the state file, the record) is reported as such, not as a failed backup."""
    from modelseal.recovery import create

    env, _, svc = bk
    dest = tmp_path / "dest"

    def no_state(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(create, "record_seen", no_state)
    with pytest.raises(BackupError, match=r"was written to .*, but not recorded on this host \(OSError"):
        backup(env, svc, dest)
    (made,) = open_store(str(dest)).list_ids()
    assert [e.result for e in env.sink.events if e.operation == "backup-create"] == ["ok"]
    assert len(list((env.home / "evidence" / "backups").glob("*.json"))) == 1  # the record is still written
    monkeypatch.undo()
    assert load_verified(str(dest), home=env.home)[1].id == made


def test_a_missing_or_loose_recovery_public_key_is_a_backup_error(
    bk: tuple[Env, list[str], KeyService], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 14: ``backup create`` without the recovery key's ``.pub``, or with one others may
    write, exits 23 (BackupError) with one line; an OpenBao address over http to another host is
    refused (the token and the snapshot would cross the network in clear)."""
    env, _, _ = bk
    pub = env.home / "recovery" / "offline.pub"
    pub.chmod(0o666)
    assert main(["backup", "create", "--to", str(tmp_path / "a"), "--env", "prod"]) == 23
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "writable by group or others" in err
    pub.rename(tmp_path / "offline.pub")
    assert main(["backup", "create", "--to", str(tmp_path / "a"), "--env", "prod"]) == 23
    assert "backup keygen" in capsys.readouterr().err
    with pytest.raises(BackupError, match="must be https"):
        Locations.from_args(env.home, bao_addr="http://bao.example.com:8200")
    for ok in ("http://127.0.0.1:8200", "http://[::1]:8200", "http://localhost:8200", "https://bao.example.com"):
        assert Locations.from_args(env.home, bao_addr=ok).bao is not None
