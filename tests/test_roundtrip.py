"""Round trips of files and folders, random access, and chunk-boundary properties."""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelseal
from modelseal.format.header import DEFAULT_CHUNK_LOG2

from .conftest import Env, make_model_folder, tree_bytes

C = 1 << DEFAULT_CHUNK_LOG2


@pytest.mark.parametrize("size", [0, 1, 100, C - 1, C, C + 1, 2 * C, 2 * C + 1, 3 * C - 5])
def test_file_round_trip_at_chunk_boundaries(env: Env, size: int) -> None:
    src = env.work / "plain.bin"
    data = os.urandom(size)
    src.write_bytes(data)
    sealed = env.work / "plain.sealed"
    res = modelseal.seal(src, sealed, key="test-kek", context={"env": "dev"}, keys=env.svc)
    assert res.bytes == size
    # The sealed bytes do not contain the plaintext (for non-trivial sizes).
    if size >= 32:
        assert data[:32] not in sealed.read_bytes()
    out = env.work / "out.bin"
    modelseal.unseal(sealed, out, keys=env.svc)
    assert out.read_bytes() == data
    with modelseal.open(sealed, keys=env.svc) as r:
        assert r.size == size
        assert r.read() == data
        assert r.metadata()["name"] == "plain.bin"
        assert r.context == {"env": "dev"}


def test_reader_seek_pread_and_small_reads(env: Env) -> None:
    data = os.urandom(2 * C + 12345)
    src = env.work / "w.bin"
    src.write_bytes(data)
    modelseal.seal(src, env.work / "w.sealed", key="test-kek", keys=env.svc)
    with modelseal.open(env.work / "w.sealed", keys=env.svc) as r:
        assert r.seekable() and r.readable()
        assert r.pread(C - 10, 20) == data[C - 10 : C + 10]
        assert r.pread(len(data) - 5, 100) == data[-5:]
        assert r.pread(len(data) + 10, 5) == b""
        r.seek(-7, io.SEEK_END)
        assert r.read() == data[-7:]
        r.seek(5)
        got = b"".join(r.read(997) for _ in range(3))
        assert got == data[5 : 5 + 3 * 997]
        buf = bytearray(C + 3)
        assert r.preadinto(C - 1, buf) == C + 3
        assert bytes(buf) == data[C - 1 : 2 * C + 2]
        with pytest.raises(ValueError):
            r.seek(-1)
    # io wrappers work on top of it
    with modelseal.open(env.work / "w.sealed", keys=env.svc) as r, io.BufferedReader(r) as b:
        assert b.read(10) == data[:10]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.sampled_from([0, 1, C - 1, C, C + 1, 2 * C - 1, 2 * C, 2 * C + 1]),
    offset=st.integers(min_value=0, max_value=2 * C + 2),
    length=st.integers(min_value=0, max_value=C + 2),
)
def test_property_pread_matches_plaintext(env: Env, size: int, offset: int, length: int) -> None:
    src = env.work / f"p{size}.bin"
    sealed = env.work / f"p{size}.sealed"
    if not sealed.exists():
        src.write_bytes(os.urandom(size))
        modelseal.seal(src, sealed, key="test-kek", keys=env.svc)
    data = src.read_bytes()
    with modelseal.open(sealed, keys=env.svc) as r:
        assert r.pread(offset, length) == data[offset : offset + length]


def test_folder_round_trip_and_opaque_names(env: Env) -> None:
    model = make_model_folder(env.work / "model")
    sealed = env.work / "model.sealed"
    res = modelseal.seal(model, sealed, key="test-kek", context={"env": "dev", "artifact": "bert-tiny"}, keys=env.svc)
    assert res.files == 5
    names = [p.relative_to(sealed).as_posix() for p in sealed.rglob("*")]
    assert "manifest.mseal" in names and "blobs" in names
    for n in names:  # no real file or folder name is visible
        for secret in ("config", "safetensors", "tokenizer", "nested", "adapter", "empty"):
            assert secret not in n
    for p in sealed.rglob("*"):
        if p.is_file():
            assert b"model_type" not in p.read_bytes() and b"tokenizer" not in p.read_bytes()
    out = env.work / "restored"
    modelseal.unseal(sealed, out, keys=env.svc)
    assert tree_bytes(out) == tree_bytes(model)


def test_folder_unwraps_once_and_opens_members(env: Env) -> None:
    model = make_model_folder(env.work / "model")
    sealed = env.work / "model.sealed"
    modelseal.seal(model, sealed, key="test-kek", keys=env.svc)
    env.sink.events.clear()
    with modelseal.open_folder(sealed, keys=env.svc) as folder:
        assert sorted(folder) == sorted(tree_bytes(model))
        for path, content in tree_bytes(model).items():
            assert folder.read(path) == content
        with folder.open("model.safetensors") as r:
            assert r.pread(C, 16) == (model / "model.safetensors").read_bytes()[C : C + 16]
    unwraps = [e for e in env.sink.events if e.operation == "unwrap"]
    assert len(unwraps) == 1
    with modelseal.open(sealed, member="config.json", keys=env.svc) as r:
        assert r.read() == (model / "config.json").read_bytes()


def test_inspect_shows_public_fields_only(env: Env) -> None:
    model = make_model_folder(env.work / "model")
    sealed = env.work / "model.sealed"
    modelseal.seal(model, sealed, key="test-kek", context={"env": "dev"}, keys=env.svc)
    info = modelseal.inspect(sealed, keys=env.svc)
    assert info["type"] == "folder" and info["blobs"] == 5
    assert info["recipients"] == [{"key": "local:test-kek", "version": 1}]
    assert info["context"] == {"env": "dev"}
    assert "files" not in info and "metadata" not in info
    full = modelseal.inspect(sealed, contents=True, keys=env.svc)
    assert {f["path"] for f in full["files"]} == set(tree_bytes(model))
    text = repr(full)
    assert "material" not in text


def test_multiple_recipients_each_open(env: Env) -> None:
    env.svc.create("second-kek")
    src = env.work / "a.bin"
    src.write_bytes(b"x" * 5000)
    sealed = env.work / "a.sealed"
    modelseal.seal(src, sealed, key=["test-kek", "local:second-kek"], keys=env.svc)
    env.svc.set_state("test-kek", 1, "disabled")
    with modelseal.open(sealed, keys=env.svc) as r:
        assert r.read() == b"x" * 5000
    env.svc.set_state("test-kek", 1, "active")
    env.svc.destroy("second-kek", None)
    with modelseal.open(sealed, keys=env.svc) as r:
        assert r.read() == b"x" * 5000


def test_empty_folder_and_large_count(env: Env) -> None:
    src = env.work / "many"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02}.txt").write_text(str(i))
    modelseal.seal(src, env.work / "many.sealed", key="test-kek", keys=env.svc)
    with modelseal.open_folder(env.work / "many.sealed", keys=env.svc) as f:
        assert f.read("f07.txt") == b"7"
    empty = env.work / "empty"
    empty.mkdir()
    modelseal.seal(empty, env.work / "empty.sealed", key="test-kek", keys=env.svc)
    modelseal.unseal(env.work / "empty.sealed", env.work / "empty.out", keys=env.svc)
    assert list((env.work / "empty.out").iterdir()) == []


def test_internal_symlink_is_followed(env: Env) -> None:
    model = make_model_folder(env.work / "model", big=10)
    os.symlink("config.json", model / "config-link.json")
    modelseal.seal(model, env.work / "s", key="test-kek", keys=env.svc)
    with modelseal.open_folder(env.work / "s", keys=env.svc) as f:
        assert f.read("config-link.json") == (model / "config.json").read_bytes()


def test_paths_accept_str_and_pathlike(env: Env) -> None:
    src = env.work / "s.bin"
    src.write_bytes(b"abc")
    modelseal.seal(str(src), str(env.work / "s.sealed"), key="test-kek", keys=env.svc)
    assert modelseal.open(Path(env.work / "s.sealed"), keys=env.svc).read() == b"abc"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    start=st.integers(min_value=0, max_value=C + 5),
    cuts=st.lists(st.integers(min_value=0, max_value=3 * C), min_size=0, max_size=6),
    private=st.booleans(),
)
def test_property_scatter_into_consecutive_buffers(env: Env, start: int, cuts: list[int], private: bool) -> None:
    """``preadinto_many`` (used to load every tensor in one pass) equals plain slicing,
    whatever the buffer boundaries are relative to chunk boundaries."""
    src = env.work / "scatter.bin"
    sealed = env.work / "scatter.sealed"
    if not sealed.exists():
        src.write_bytes(os.urandom(3 * C + 777))
        modelseal.seal(src, sealed, key="test-kek", keys=env.svc)
    data = src.read_bytes()
    end = len(data)
    bounds = sorted({start, end, *[min(end, max(start, c)) for c in cuts]})
    bufs = [memoryview(bytearray(b - a)) for a, b in itertools.pairwise(bounds)]
    with modelseal.open(sealed, keys=env.svc) as r:
        r.preadinto_many(start, bufs, private=private)
    assert b"".join(bytes(b) for b in bufs) == data[start:]


def test_scatter_failure_zeroes_every_buffer(env: Env) -> None:
    src = env.work / "z.bin"
    src.write_bytes(os.urandom(3 * C))
    sealed = env.work / "z.sealed"
    modelseal.seal(src, sealed, key="test-kek", keys=env.svc)
    raw = bytearray(sealed.read_bytes())
    raw[-100] ^= 1  # last chunk
    sealed.write_bytes(bytes(raw))
    bufs = [memoryview(bytearray(b"\xaa" * C)) for _ in range(3)]
    with modelseal.open(sealed, keys=env.svc) as r, pytest.raises(modelseal.DecryptionError):
        r.preadinto_many(0, bufs, private=True)
    assert all(not any(b) for b in bufs)
