"""The fsspec ``sealed::`` filesystem over local and in-memory filesystems."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import fsspec
import pandas as pd
import pytest

import modelseal
from modelseal.errors import DecryptionError
from modelseal.loaders.fs import SealedFileSystem

from .conftest import Env


def _sealed_csv(env: Env, rows: int = 20_000) -> tuple[bytes, str]:
    df = pd.DataFrame(
        {"id": range(rows), "text": [f"sample {i}" for i in range(rows)], "label": [i % 3 for i in range(rows)]}
    )
    plain = env.work / "train.csv"
    df.to_csv(plain, index=False)
    sealed = env.work / "train.csv.sealed"
    modelseal.seal(plain, sealed, key="test-kek", keys=env.svc)
    return plain.read_bytes(), str(sealed)


def test_entry_point_registers_the_protocol() -> None:
    assert fsspec.get_filesystem_class("sealed") is SealedFileSystem


def test_random_access_reads_over_local(env: Env) -> None:
    plain, sealed = _sealed_csv(env)
    with fsspec.open(f"sealed::file://{sealed}", "rb") as f:
        assert f.read(100) == plain[:100]
        f.seek(len(plain) // 2)
        assert f.read(1000) == plain[len(plain) // 2 : len(plain) // 2 + 1000]
        f.seek(-10, io.SEEK_END)
        assert f.read() == plain[-10:]
    fs = fsspec.filesystem("sealed", target_protocol="file")
    assert fs.info(sealed)["size"] == len(plain)
    assert fs.cat_file(sealed, 10, 20) == plain[10:20]
    with pytest.raises(NotImplementedError):
        fs.open(sealed, "wb")


def test_pandas_reads_sealed_training_data(env: Env) -> None:
    _plain, sealed = _sealed_csv(env)
    df = pd.read_csv(f"sealed::file://{sealed}")
    assert len(df) == 20_000 and df["label"].sum() == sum(i % 3 for i in range(20_000))
    with fsspec.open(f"sealed::file://{sealed}", "rt") as f:
        assert f.readline().strip() == "id,text,label"


def test_chains_over_the_memory_filesystem(env: Env) -> None:
    plain, sealed = _sealed_csv(env, rows=500)
    mem = fsspec.filesystem("memory")
    with open(sealed, "rb") as src:
        mem.pipe("/bucket/train.csv.sealed", src.read())
    with fsspec.open("sealed::memory://bucket/train.csv.sealed", "rb") as f:
        f.seek(100)
        assert f.read(50) == plain[100:150]
    df = pd.read_csv("sealed::memory://bucket/train.csv.sealed")
    assert len(df) == 500
    # Tampering in the remote copy is caught.
    blob = bytearray(mem.cat("/bucket/train.csv.sealed"))
    blob[-5] ^= 1
    mem.pipe("/bucket/bad.sealed", bytes(blob))
    with fsspec.open("sealed::memory://bucket/bad.sealed", "rb") as f, pytest.raises(DecryptionError):
        f.read()
    names = [os.path.basename(e["name"]) for e in fsspec.filesystem("sealed", target_protocol="memory").ls("/bucket")]
    assert sorted(names) == ["bad.sealed", "train.csv.sealed"]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from .services import seaweedfs

    with seaweedfs(tmp_path_factory.mktemp("s3")) as endpoint:
        yield endpoint


def test_chains_over_s3_on_a_real_seaweedfs(env: Env, s3_endpoint: str) -> None:
    """SeaweedFS is a real S3 server, started on 127.0.0.1 for this test."""
    plain, sealed = _sealed_csv(env, rows=3000)
    opts = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": s3_endpoint}}
    s3 = fsspec.filesystem("s3", **opts)
    s3.mkdir("models")
    s3.put(sealed, "models/train.csv.sealed")
    url = "sealed::s3://models/train.csv.sealed"
    with fsspec.open(url, "rb", s3=opts) as f:
        f.seek(1234)
        assert f.read(100) == plain[1234:1334]
    df = pd.read_csv(url, storage_options={"s3": opts})
    assert len(df) == 3000
    fs = fsspec.filesystem("sealed", target_protocol="s3", target_options=opts)
    assert fs.info("models/train.csv.sealed")["size"] == len(plain)
    # Only ciphertext is stored in the bucket.
    assert b"sample 1" not in s3.cat("models/train.csv.sealed")
