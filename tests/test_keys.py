"""Key lifecycle on the local keystore: rotate, rewrap, disable, destroy, audit."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from pathlib import Path

import pytest

import modelseal
from modelseal.errors import DecryptionError, KeyDisabled, KeyNotFound, KeyProviderError, KeystoreError, PolicyDenied
from modelseal.format.header import Recipient, normalize_context
from modelseal.keys import keystore
from modelseal.keys.providers.local import LocalProvider
from modelseal.keys.service import KeyService

from .conftest import PASSPHRASE, Env, make_model_folder


def _seal(env: Env, data: bytes = b"weights" * 1000, **kw: object) -> os.PathLike[str]:
    src = env.work / "m.bin"
    src.write_bytes(data)
    dst = env.work / "m.sealed"
    modelseal.seal(src, dst, key="test-kek", keys=env.svc, force=True, **kw)  # type: ignore[arg-type]
    return dst


def test_keystore_file_is_private_and_holds_no_plaintext_key(env: Env) -> None:
    path = keystore.keystore_path(env.home)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["kdf"]["alg"] == "scrypt" and doc["kdf"]["log2_n"] == 14
    assert "test-kek" not in path.read_text()  # even key names are inside the encrypted body


def test_keystore_with_loose_mode_is_refused(env: Env) -> None:
    path = keystore.keystore_path(env.home)
    path.chmod(0o644)
    keystore.clear_cache()
    with pytest.raises(KeystoreError, match="readable by others"):
        keystore.unlock(path)


def test_passphrase_is_paid_once_per_process(env: Env) -> None:
    keystore.clear_cache()
    calls = []

    def passphrase() -> bytes:
        calls.append(1)
        return PASSPHRASE.encode()

    for _ in range(5):
        keystore.unlock(keystore.keystore_path(env.home), passphrase)
    assert len(calls) == 1
    # After the TTL it is asked again.
    keystore.unlock(keystore.keystore_path(env.home), passphrase, now=lambda: time.monotonic() + 10_000)
    assert len(calls) == 2


def test_versions_record_creation_time(env: Env) -> None:
    t = 1_800_000_000.0
    p = LocalProvider(now=lambda: t)
    info = p.create("timed")
    assert info.versions[0].created == t


def test_rotate_then_rewrap_uses_newest_version_and_keeps_payload(env: Env) -> None:
    sealed = _seal(env, os.urandom(3 << 20))
    before = Path(sealed).read_bytes()
    env.svc.rotate("test-kek")
    res = modelseal.rewrap(sealed, keys=env.svc)
    assert res.recipients == ("local:test-kek#2",)
    after = Path(sealed).read_bytes()
    info = modelseal.inspect(sealed)
    assert info["recipients"] == [{"key": "local:test-kek", "version": 2}]
    off = len(before) - (3 << 20) - 16 * 3
    assert before[off:] == after[off:]  # payload untouched
    # v1 can now be disabled: the artifact no longer needs it.
    env.svc.set_state("test-kek", 1, "disabled")
    with modelseal.open(sealed, keys=env.svc) as r:
        assert len(r.read()) == 3 << 20


def test_rewrap_to_another_key_and_old_wrap_is_erased(env: Env) -> None:
    sealed = _seal(env)
    env.svc.create("other-kek")
    modelseal.rewrap(sealed, key="local:other-kek", keys=env.svc)
    env.svc.destroy("test-kek", None)  # the old key is gone: the artifact still opens
    with modelseal.open(sealed, keys=env.svc) as r:
        assert r.read().startswith(b"weights")
    info = modelseal.inspect(sealed)
    assert info["slot_generation"] == 2 and info["inactive_slot"] == "empty"


def test_disabled_version_and_reenable(env: Env) -> None:
    sealed = _seal(env)
    env.svc.set_state("test-kek", 1, "disabled")
    with pytest.raises(KeyDisabled):
        modelseal.open(sealed, keys=env.svc)
    env.svc.set_state("test-kek", 1, "active")
    assert modelseal.open(sealed, keys=env.svc).read().startswith(b"weights")


def test_min_decryption_version(env: Env) -> None:
    sealed = _seal(env)
    env.svc.rotate("test-kek")
    LocalProvider().set_min_decryption_version("test-kek", 2)
    with pytest.raises(KeyDisabled, match="minimum"):
        modelseal.open(sealed, keys=env.svc)


def test_destroyed_key_shreds_artifacts_for_good(env: Env) -> None:
    sealed = _seal(env)
    model = make_model_folder(env.work / "model", big=100)
    modelseal.seal(model, env.work / "folder.sealed", key="test-kek", keys=env.svc)
    env.svc.destroy("test-kek", None)
    doc = keystore.unlock(keystore.keystore_path(env.home)).keys["test-kek"]
    assert all(v["material"] is None for v in doc["versions"].values())
    for path in (sealed, env.work / "folder.sealed"):
        for attempt in (
            lambda p=path: (
                modelseal.open(p, keys=env.svc) if not os.path.isdir(p) else modelseal.open_folder(p, keys=env.svc)
            ),
            lambda p=path: modelseal.unseal(p, env.work / "out", keys=env.svc),
            lambda p=path: modelseal.rewrap(p, keys=env.svc),
            lambda p=path: modelseal.reencrypt(p, keys=env.svc),
            lambda p=path: modelseal.inspect(p, contents=True, keys=env.svc),
        ):
            with pytest.raises(KeyDisabled):
                attempt()
    with pytest.raises(KeyDisabled):
        env.svc.set_state("test-kek", 1, "active")
    # A new key of the same name does not bring the data back.
    env2 = LocalProvider()
    with pytest.raises(KeyProviderError):
        env2.create("test-kek")


def test_wrap_is_bound_to_context(env: Env) -> None:
    p = LocalProvider()
    dek = os.urandom(32)
    r = p.wrap("test-kek", dek, normalize_context({"env": "prod"}))
    assert p.unwrap(r, normalize_context({"env": "prod"})) == dek
    for other in ({"env": "dev"}, {}, {"env": "prod", "x": "y"}):
        with pytest.raises(DecryptionError):
            p.unwrap(r, normalize_context(other))


def test_unknown_key_and_scheme(env: Env) -> None:
    src = env.work / "x.bin"
    src.write_bytes(b"x")
    with pytest.raises(KeyNotFound):
        modelseal.seal(src, env.work / "x.sealed", key="nope", keys=env.svc)
    with pytest.raises(KeyProviderError, match="no key provider"):
        modelseal.seal(src, env.work / "x.sealed", key="vault9:nope", keys=env.svc)
    assert not (env.work / "x.sealed").exists()
    assert [p.name for p in env.work.iterdir()] == ["x.bin"]


def test_keystore_beside_the_data_is_refused(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model_folder(env.work / "model", big=10)
    inner_home = model / ".modelseal"
    keystore.create(keystore.keystore_path(inner_home), b"pw", scrypt_log2_n=14)
    monkeypatch.setenv("MODELSEAL_HOME", str(inner_home))
    with pytest.raises(PolicyDenied, match="beside the data"):
        modelseal.seal(model, env.work / "out.sealed", key="test-kek", keys=env.svc)
    monkeypatch.setenv("MODELSEAL_HOME", str(env.work / "dst" / "home"))
    with pytest.raises(PolicyDenied):
        modelseal.seal(model / "config.json", env.work / "dst", key="test-kek", keys=env.svc)


def test_audit_events_for_every_key_operation_and_no_secrets(env: Env) -> None:
    sealed = _seal(env)
    env.svc.rotate("test-kek")
    modelseal.rewrap(sealed, keys=env.svc)
    env.svc.set_state("test-kek", 1, "disabled")
    env.svc.set_state("test-kek", 1, "active")
    env.svc.destroy("test-kek", 1)
    ops = [e.operation for e in env.sink.events]
    for op in ("create", "wrap", "rotate", "rewrap", "disable", "enable", "destroy"):
        assert op in ops, op
    with pytest.raises(KeyDisabled):
        LocalProvider().unwrap(Recipient("local", "test-kek", 1, b"x" * 60), ())
    material = {
        v["material"]
        for k in keystore.unlock(keystore.keystore_path(env.home)).keys.values()
        for v in k["versions"].values()
        if v["material"]
    }
    text = "\n".join(e.to_json() for e in env.sink.events)
    assert PASSPHRASE not in text
    assert all(m not in text for m in material)
    assert all(e.result == "ok" for e in env.sink.events)


def test_jsonl_audit_sink(env: Env) -> None:
    from modelseal.audit.events import JsonLinesSink

    svc = KeyService(sink=JsonLinesSink(env.home / "audit.jsonl"))
    svc.create("audited")
    with contextlib.suppress(KeyProviderError):
        svc.create("audited")
    lines = [json.loads(x) for x in (env.home / "audit.jsonl").read_text().splitlines()]
    assert [(x["operation"], x["result"]) for x in lines] == [("create", "ok"), ("create", "KeyProviderError")]
    assert stat.S_IMODE((env.home / "audit.jsonl").stat().st_mode) == 0o600
    assert all(x["actor"] and x["time"] > 0 for x in lines)


def test_keystore_survives_concurrent_writers(env: Env) -> None:
    from concurrent.futures import ThreadPoolExecutor

    p = LocalProvider()
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda i: p.create(f"k{i}"), range(12)))
    keystore.clear_cache()
    names = {i.uri for i in LocalProvider().list()}
    assert {f"local:k{i}" for i in range(12)} <= names


def test_reencrypt_changes_data_key(env: Env) -> None:
    data = os.urandom(100_000)
    sealed = _seal(env, data)
    old_id = modelseal.inspect(sealed)["artifact_id"]
    modelseal.reencrypt(sealed, keys=env.svc)
    assert modelseal.inspect(sealed)["artifact_id"] != old_id
    assert modelseal.open(sealed, keys=env.svc).read() == data


def test_keystore_update_failure_keeps_old_keystore(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelseal.util import files as fsutil

    path = keystore.keystore_path(env.home)
    before = path.read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(fsutil.os, "replace", broken_replace)
        with pytest.raises(modelseal.StorageError):
            LocalProvider().create("will-not-exist")
    assert path.read_bytes() == before
    assert sorted(p.name for p in env.home.iterdir() if p.name.startswith(".")) == []
    keystore.clear_cache()
    names = {i.uri for i in LocalProvider().list()}
    assert names == {"local:test-kek"}


def test_backend_exceptions_are_normalised_without_their_message(env: Env) -> None:
    from modelseal.audit.events import MemorySink

    class Leaky:
        scheme = "leaky"

        def wrap(self, name: str, dek: bytes, context: tuple[tuple[str, str], ...]) -> Recipient:
            raise RuntimeError("token=s3cr3t-token-value")

        def unwrap(self, recipient: Recipient, context: tuple[tuple[str, str], ...]) -> bytes:
            raise RuntimeError("token=s3cr3t-token-value")

    sink = MemorySink()
    svc = KeyService(sink=sink, providers={"leaky": Leaky()})
    with pytest.raises(KeyProviderError) as ei:
        svc.wrap("leaky:k", b"\x00" * 32, ())
    assert "s3cr3t" not in str(ei.value) and ei.value.__cause__ is None
    assert sink.events[-1].result == "KeyProviderError" and "s3cr3t" not in sink.events[-1].to_json()


def test_scheduled_destruction_is_purged_after_the_waiting_period(env: Env) -> None:
    sealed = _seal(env)
    clock = [1_800_000_000.0]
    p = LocalProvider(now=lambda: clock[0])
    p.destroy("test-kek", None, after=7 * 86400)
    keystore.clear_cache()
    with pytest.raises(KeyDisabled, match="pending-destroy"):
        modelseal.open(sealed, keys=KeyService())
    assert p.purge() == []  # not yet
    clock[0] += 7 * 86400 + 1
    assert p.purge() == ["test-kek#1"]
    doc = keystore.unlock(keystore.keystore_path(env.home)).keys["test-kek"]
    assert doc["versions"]["1"]["material"] is None and doc["versions"]["1"]["state"] == "destroyed"
    with pytest.raises(KeyDisabled):
        p.set_version_state("test-kek", 1, "active")  # destroyed for good
