"""Regression tests for the findings of the first security review (docs/decisions.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.errors import FormatError, KeystoreError, PolicyDenied, StorageError
from modelseal.format.file import read_raw
from modelseal.format.header import Recipient, encode_context, encode_recipients
from modelseal.format.source import FdSource
from modelseal.keys import keystore
from modelseal.keys.providers.local import LocalProvider
from modelseal.keys.service import KeyService

from .conftest import Env, make_model_folder


def _slots_offset(path: Path) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        core = read_raw(FdSource(fd, owns=False)).core
        return core.slots_offset, core.slot_size
    finally:
        os.close(fd)


def test_seal_refuses_names_a_reader_would_refuse(env: Env) -> None:
    model = make_model_folder(env.work / "model", big=10)
    (model / "weights\\part1.bin").write_bytes(b"x")
    with pytest.raises(PolicyDenied, match="cannot be sealed"):
        modelseal.seal(model, env.work / "s", key="test-kek", keys=env.svc)
    assert not (env.work / "s").exists()


def test_forged_high_generation_slot_is_not_trusted(env: Env) -> None:
    src = env.work / "a.bin"
    src.write_bytes(b"model" * 100)
    sealed = env.work / "a.sealed"
    modelseal.seal(src, sealed, key="test-kek", keys=env.svc)
    base, size = _slots_offset(sealed)
    forged_body = encode_recipients((1 << 64) - 1, (Recipient("local", "attacker-kek", 1, b"x" * 60),))
    forged = (forged_body + b"\x01" * 32).ljust(size, b"\x00")
    data = bytearray(sealed.read_bytes())
    data[base + size : base + 2 * size] = forged
    sealed.write_bytes(bytes(data))

    info = modelseal.inspect(sealed)
    assert info["recipients_authenticated"] is False
    assert info["recipients"][0]["key"] == "local:attacker-kek"  # shown, but flagged as unverified
    full = modelseal.inspect(sealed, contents=True, keys=env.svc)
    assert full["recipients_authenticated"] is True
    assert full["recipients"] == [{"key": "local:test-kek", "version": 1}] and full["active_slot"] == "A"
    assert modelseal.open(sealed, keys=env.svc).read() == b"model" * 100
    res = modelseal.rewrap(sealed, keys=env.svc)  # follows the authenticated generation: 1 -> 2
    assert res.generation == 2
    assert modelseal.inspect(sealed)["slots"] == [
        {"slot": "A", "state": "empty", "generation": None},
        {"slot": "B", "state": "well-formed", "generation": 2},
    ]


def test_unseal_never_overwrites_the_keystore_home(env: Env) -> None:
    src = env.work / "a.bin"
    src.write_bytes(b"abc")
    modelseal.seal(src, env.work / "a.sealed", key="test-kek", keys=env.svc)
    with pytest.raises(PolicyDenied):
        modelseal.unseal(env.work / "a.sealed", env.home, force=True, keys=env.svc)
    with pytest.raises(PolicyDenied):
        modelseal.unseal(env.work / "a.sealed", env.home.parent, force=True, keys=env.svc)
    assert keystore.keystore_path(env.home).exists()


def test_a_fifo_in_place_of_a_blob_does_not_hang(env: Env) -> None:
    model = make_model_folder(env.work / "model", big=10)
    sealed = env.work / "s"
    modelseal.seal(model, sealed, key="test-kek", keys=env.svc)
    blob = next((sealed / "blobs").iterdir())
    blob.unlink()
    os.mkfifo(blob)
    with modelseal.open_folder(sealed, keys=env.svc) as f:
        failures = 0
        for path in f:
            try:
                f.read(path)
            except StorageError:
                failures += 1
        assert failures == 1


def test_damaged_keystore_fields_are_reported_as_damage(env: Env) -> None:
    path = keystore.keystore_path(env.home)
    doc = json.loads(path.read_text())
    doc["root"]["nonce"] = ""
    path.write_text(json.dumps(doc))
    keystore.clear_cache()
    with pytest.raises(KeystoreError, match="damaged"):
        keystore.unlock(path)


def test_a_different_passphrase_source_is_checked_not_trusted(env: Env) -> None:
    path = keystore.keystore_path(env.home)
    keystore.unlock(path)  # cached with the right passphrase
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        LocalProvider(passphrase=lambda: b"WRONG").list()


def test_keystore_create_never_replaces(env: Env) -> None:
    path = keystore.keystore_path(env.home)
    before = path.read_bytes()
    with pytest.raises(KeystoreError, match="already exists"):
        keystore.create(path, b"other", scrypt_log2_n=14)
    assert path.read_bytes() == before


class ToyProvider:
    """A second provider for this test only: AES-GCM under a fixed in-memory key."""

    scheme = "toy"

    def __init__(self) -> None:
        self._aead = AESGCM(bytes(32))

    def wrap(self, name: str, dek: bytes, context: tuple[tuple[str, str], ...]) -> Recipient:
        nonce = os.urandom(12)
        return Recipient("toy", name, 1, nonce + self._aead.encrypt(nonce, dek, encode_context(context)))

    def unwrap(self, recipient: Recipient, context: tuple[tuple[str, str], ...]) -> bytes:
        w = recipient.wrapped
        return self._aead.decrypt(w[:12], w[12:], encode_context(context))


def test_any_one_recipient_opens_even_without_a_local_keystore(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    toy = ToyProvider()
    svc = KeyService(sink=MemorySink(), providers={"toy": toy})
    src = env.work / "a.bin"
    src.write_bytes(b"weights")
    sealed = env.work / "a.sealed"
    modelseal.seal(src, sealed, key=["test-kek", "toy:backup"], keys=svc)
    # Another host: no local keystore at all, only the toy provider (an empty home: a
    # missing MODELSEAL_HOME is refused, see tests/test_redteam_verify.py).
    (env.work / "empty-home").mkdir(mode=0o700)
    monkeypatch.setenv("MODELSEAL_HOME", str(env.work / "empty-home"))
    keystore.clear_cache()
    other = KeyService(sink=MemorySink(), providers={"toy": toy})
    assert modelseal.open(sealed, keys=other).read() == b"weights"
    # With neither, the keystore problem is what is reported.
    with pytest.raises(KeystoreError, match="modelseal init"):
        modelseal.open(sealed, keys=KeyService(sink=MemorySink()))


def test_destroy_waiting_period_cannot_be_skipped_by_accident(env: Env) -> None:
    import subprocess
    import sys

    for bad in ("nan", "-1d", "0"):
        r = subprocess.run(
            [sys.executable, "-m", "modelseal.cli", "key", "destroy", "test-kek", "--yes", "--after", bad],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2, (bad, r.stderr)
    keystore.clear_cache()
    assert LocalProvider().info("test-kek").versions[0].state == "active"


def test_rotate_never_follows_symlinks_out_of_its_paths(env: Env) -> None:
    from modelseal.recipes.rotation import rotate

    outside = env.work / "outside"
    outside.mkdir()
    src = env.work / "a.bin"
    src.write_bytes(b"x")
    modelseal.seal(src, outside / "victim.sealed", key="test-kek", keys=env.svc)
    inside = env.work / "inside"
    inside.mkdir()
    os.symlink(outside / "victim.sealed", inside / "link.sealed")
    os.symlink(outside, inside / "dirlink")
    os.mkfifo(inside / "fifo")
    r = rotate("test-kek", [inside], force=True, keys=env.svc)
    assert r.rewrapped == [] and modelseal.inspect(outside / "victim.sealed")["slot_generation"] == 1


def test_hf_refuses_trust_remote_code(env: Env) -> None:
    import modelseal.hf as mhf

    with pytest.raises(PolicyDenied, match="trust_remote_code"):
        mhf.from_pretrained(object, env.work, trust_remote_code=True)


def test_onnx_single_file_with_external_data_is_refused(env: Env) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import modelseal.onnx as monnx

    w = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[w],
    )
    folder = env.work / "m"
    folder.mkdir()
    onnx.save_model(
        helper.make_model(graph), folder / "model.onnx", save_as_external_data=True, location="w.bin", size_threshold=0
    )
    modelseal.seal(folder / "model.onnx", env.work / "model.sealed", key="test-kek", keys=env.svc)
    (env.work / "w.bin").write_bytes(b"planted")  # would be read from the working directory
    with pytest.raises(FormatError, match="seal its folder"):
        monnx.inference_session(env.work / "model.sealed", keys=env.svc)
