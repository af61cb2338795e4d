"""modelseal.safetensors: lazy, encrypted, validated safetensors loading."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

import modelseal
from modelseal import safetensors as mst
from modelseal.errors import DecryptionError, FormatError, KeyNotFound

from .conftest import Env


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "encoder.layer.0.weight": rng.standard_normal((300, 1000)).astype(np.float32),
        "encoder.layer.0.bias": rng.standard_normal(1000).astype(np.float32),
        "embeddings.word": rng.standard_normal((512, 64)).astype(np.float16),
        "ids": np.arange(-50, 50, dtype=np.int64),
        "mask": rng.integers(0, 2, size=(7, 3)).astype(bool),
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _seal_st(env: Env, tensors: dict[str, np.ndarray], name: str = "model.safetensors") -> Path:
    plain = env.work / name
    safetensors.numpy.save_file(tensors, str(plain), metadata={"format": "np", "secret_note": "v7-finetune"})
    sealed = env.work / (name + ".sealed")
    modelseal.seal(plain, sealed, key="test-kek", keys=env.svc)
    return sealed


def test_load_file_numpy_matches_and_names_are_hidden(env: Env) -> None:
    t = _tensors()
    sealed = _seal_st(env, t)
    raw = sealed.read_bytes()
    # Only names of 8+ bytes: a shorter string turns up in a MiB of random ciphertext by chance.
    for name in [
        "encoder.layer.0.weight",
        "encoder.layer.0.bias",
        "embeddings.word",
        "secret_note",
        "v7-finetune",
        "data_offsets",
        "__metadata__",
    ]:
        assert name.encode() not in raw
    got = mst.load_file(sealed, keys=env.svc)
    assert set(got) == set(t)
    for k in t:
        assert got[k].dtype == t[k].dtype and got[k].shape == t[k].shape
        np.testing.assert_array_equal(got[k], t[k])


def test_safe_open_keys_metadata_tensor_and_slices(env: Env) -> None:
    t = _tensors()
    sealed = _seal_st(env, t)
    with mst.safe_open(sealed, framework="np", keys=env.svc) as f:
        assert f.keys() == sorted(t)
        assert f.metadata() == {"format": "np", "secret_note": "v7-finetune"}
        w = t["encoder.layer.0.weight"]
        np.testing.assert_array_equal(f.get_tensor("encoder.layer.0.weight"), w)
        sl = f.get_slice("encoder.layer.0.weight")
        assert sl.get_shape() == [300, 1000] and sl.get_dtype() == "F32"
        for index in [
            slice(10, 20),
            (slice(5, 200, 7), slice(0, 10)),
            17,
            -1,
            (slice(None), 3),
            (..., 2),
            slice(250, 400),
        ]:
            np.testing.assert_array_equal(sl[index], w[index])
        with pytest.raises(IndexError):
            sl[300]
        with pytest.raises(KeyError):
            f.get_tensor("nope")


def test_torch_framework_with_bf16(env: Env) -> None:
    t = {"w": torch.randn(33, 65, dtype=torch.bfloat16), "b": torch.randn(65), "i": torch.arange(10, dtype=torch.int32)}
    plain = env.work / "pt.safetensors"
    safetensors.torch.save_file(t, str(plain))
    sealed = env.work / "pt.sealed"
    modelseal.seal(plain, sealed, key="test-kek", keys=env.svc)
    got = mst.load_file(sealed, framework="pt", keys=env.svc)
    for k in t:
        assert got[k].dtype == t[k].dtype and torch.equal(got[k], t[k])
    with mst.safe_open(sealed, framework="pt", keys=env.svc) as f:
        assert torch.equal(f.get_slice("w")[3:9, ::2], t["w"][3:9, ::2])
    with pytest.raises(mst.SafetensorsError, match="no numpy equivalent"):
        mst.load_file(sealed, framework="np", keys=env.svc)


def test_sharded_sealed_folder(env: Env) -> None:
    rng = np.random.default_rng(1)
    a = {"layer.0.w": rng.standard_normal((64, 64)).astype(np.float32)}
    b = {
        "layer.1.w": rng.standard_normal((64, 32)).astype(np.float32),
        "head": rng.standard_normal(32).astype(np.float32),
    }
    model = env.work / "model"
    model.mkdir()
    safetensors.numpy.save_file(a, str(model / "model-00001-of-00002.safetensors"))
    safetensors.numpy.save_file(b, str(model / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {"total_size": 1},
        "weight_map": {
            **{k: "model-00001-of-00002.safetensors" for k in a},
            **{k: "model-00002-of-00002.safetensors" for k in b},
        },
    }
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (model / "config.json").write_text("{}")
    sealed = env.work / "model.sealed"
    modelseal.seal(model, sealed, key="test-kek", keys=env.svc)
    got = mst.load_file(sealed, keys=env.svc)
    assert set(got) == {*a, *b}
    np.testing.assert_array_equal(got["head"], b["head"])
    with mst.safe_open(sealed, keys=env.svc) as f:
        assert f.metadata() == {"total_size": "1"}
        np.testing.assert_array_equal(f.get_tensor("layer.0.w"), a["layer.0.w"])
    # One member addressed by path inside the sealed folder.
    one = mst.load_file(sealed / "model-00001-of-00002.safetensors", keys=env.svc)
    assert set(one) == set(a)


def test_data_key_unwrapped_once_per_artifact(env: Env) -> None:
    sealed = _seal_st(env, _tensors())
    env.sink.events.clear()
    for _ in range(3):
        with mst.safe_open(sealed, keys=env.svc) as f:
            for k in f:
                f.get_tensor(k)
    assert [e.operation for e in env.sink.events] == ["unwrap"]


def test_wrong_key_fails_before_any_tensor(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelseal.keys import keystore
    from modelseal.keys.service import KeyService

    sealed = _seal_st(env, _tensors())
    other = env.work / "other-home"
    monkeypatch.setenv("MODELSEAL_HOME", str(other))
    monkeypatch.setenv("MODELSEAL_PASSPHRASE", "p2")
    keystore.clear_cache()
    keystore.create(keystore.keystore_path(other), b"p2", scrypt_log2_n=14)
    with pytest.raises(KeyNotFound):
        mst.load_file(sealed, keys=KeyService())
    svc = KeyService()
    svc.create("test-kek")
    with pytest.raises(DecryptionError):
        mst.safe_open(sealed, keys=svc)


def test_tampered_tensor_chunk_never_hands_over_a_tensor(env: Env) -> None:
    big = {"w": np.random.default_rng(3).standard_normal((1 << 20,)).astype(np.float32)}  # 4 MiB: several chunks
    sealed = _seal_st(env, big)
    data = bytearray(sealed.read_bytes())
    data[-(2 << 20)] ^= 1  # inside the weight data, not the header
    sealed.write_bytes(bytes(data))
    with mst.safe_open(sealed, keys=env.svc) as f:
        assert f.keys() == ["w"]
        with pytest.raises(DecryptionError):
            f.get_tensor("w")


def _raw_safetensors(header: dict[str, object], data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize(
    "header",
    [
        {"huge": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}},
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        },
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},  # 8 bytes of data left over
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**62]}},
        {"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}},
        {"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}},
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}},
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "extra": 1}},
    ],
)
def test_malicious_headers_are_refused_without_allocation(env: Env, header: dict[str, object]) -> None:
    plain = env.work / "evil.safetensors"
    plain.write_bytes(_raw_safetensors(header, bytes(16)))
    sealed = env.work / "evil.sealed"
    modelseal.seal(plain, sealed, key="test-kek", keys=env.svc)
    with pytest.raises(mst.SafetensorsError):
        mst.load_file(sealed, keys=env.svc)


def test_huge_header_length_and_duplicate_keys(env: Env) -> None:
    for blob in (struct.pack("<Q", 2**62) + b"{}", b'\x1c\x00\x00\x00\x00\x00\x00\x00{"a": {}, "a": {}, "b": 1}  '):
        plain = env.work / "x.safetensors"
        plain.write_bytes(blob)
        modelseal.seal(plain, env.work / "x.sealed", key="test-kek", keys=env.svc, force=True)
        with pytest.raises(mst.SafetensorsError):
            mst.safe_open(env.work / "x.sealed", keys=env.svc)


def test_sealed_non_safetensors_file(env: Env) -> None:
    plain = env.work / "notes.txt"
    plain.write_bytes(b"these are not weights at all, just text")
    modelseal.seal(plain, env.work / "notes.sealed", key="test-kek", keys=env.svc)
    with pytest.raises(mst.SafetensorsError, match="not a safetensors file"):
        mst.load_file(env.work / "notes.sealed", keys=env.svc)


def test_plaintext_is_refused_unless_allowed(env: Env) -> None:
    t = _tensors()
    plain = env.work / "plain.safetensors"
    safetensors.numpy.save_file(t, str(plain))
    with pytest.raises(FormatError, match="allow_plaintext=True"):
        mst.load_file(plain, keys=env.svc)
    got = mst.load_file(plain, allow_plaintext=True, keys=env.svc)
    np.testing.assert_array_equal(got["ids"], t["ids"])
    folder = env.work / "plainfolder"
    folder.mkdir()
    os.replace(plain, folder / "model.safetensors")
    with pytest.raises(FormatError):
        mst.load_file(folder, keys=env.svc)
    assert set(mst.load_file(folder, allow_plaintext=True, keys=env.svc)) == set(t)
