"""The sealing write path (format/writer.py): staged output through the page cache (the
default), with O_DIRECT and its fallbacks, and the folder's parallel files; every path
gives the same bytes."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from blake3 import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import modelseal
from modelseal.errors import StorageError
from modelseal.format import writer
from modelseal.format.header import TAG_LEN
from modelseal.format.stream import ChunkCipher, ChunkLayout, fd_reader
from modelseal.util.walk import walk_folder

from .conftest import Env, make_model_folder, tree_bytes

KEY = bytes(range(32))
CHUNK = 1 << 16  # the smallest chunk the format allows


def _reference(layout: ChunkLayout, plain: bytes) -> bytes:
    """The payload, chunk by chunk, straight from docs/format.md section 6."""
    aead = AESGCM(KEY)
    return b"".join(
        aead.encrypt(layout.nonce(i), plain[i * CHUNK : i * CHUNK + layout.plain_len(i)], None)
        for i in range(layout.count)
    )


def _seal_range(folder: Path, plain: bytes, payload_offset: int) -> tuple[bytes, int, list[bytes], str, list[int]]:
    """Run encrypt_file_range; returns (file bytes, file flags after, chunk hashes, sha256,
    the fd flags seen by each pwrite)."""
    layout = ChunkLayout(CHUNK, len(plain), payload_offset)
    src, dst = folder / "plain", folder / "out"
    src.write_bytes(plain)
    flags_seen: list[int] = []
    real = os.pwrite

    def spy(fd: int, data: object, offset: int) -> int:
        flags_seen.append(fcntl.fcntl(fd, fcntl.F_GETFL))
        return real(fd, data, offset)  # type: ignore[arg-type]

    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    table = [b""] * layout.count
    digest = hashlib.sha256()
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(os, "pwrite", spy)
            writer.encrypt_file_range(ChunkCipher(KEY, layout), fd_reader(sfd), dfd, None, digest.update, table)
        after = fcntl.fcntl(dfd, fcntl.F_GETFL)
    finally:
        os.close(sfd)
        os.close(dfd)
    return dst.read_bytes(), after, table, digest.hexdigest(), flags_seen


SIZES = [0, 1, 4095, CHUNK, CHUNK + 1, 5 * CHUNK - 7, 23 * CHUNK + 12345]


def _folders(tmp_path: Path) -> list[Path]:
    out = [tmp_path]
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        out.append(shm)
    return out


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("payload_offset", [12288, 12288 + 100])
@pytest.mark.parametrize("mode", ["direct", "page-cache", "fcntl-refused", "write-refused"])
def test_every_path_writes_the_reference_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, payload_offset: int, mode: str
) -> None:
    # Small stages, so that a few hundred KiB span many stages and wrap the ring of buffers.
    monkeypatch.setattr(writer, "STAGE", 2 * writer.ALIGN)
    monkeypatch.setattr(writer, "DIRECT", mode != "page-cache")
    if mode == "fcntl-refused":
        real_fcntl = fcntl.fcntl

        def no_direct(fd: int, cmd: int, arg: int = 0) -> int:
            if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_fcntl(fd, cmd, arg)

        monkeypatch.setattr(writer.fcntl, "fcntl", no_direct)
    plain = os.urandom(size)
    layout = ChunkLayout(CHUNK, size, payload_offset)
    want = _reference(layout, plain)
    for folder in _folders(tmp_path):
        work = folder / f"ms-write-{os.getpid()}-{mode}"
        work.mkdir(exist_ok=True)
        try:
            if mode == "write-refused":
                _refuse_direct_writes(monkeypatch)
            data, after, table, digest, seen = _seal_range(work, plain, payload_offset)
        finally:
            for p in work.iterdir():
                p.unlink()
            work.rmdir()
        assert len(data) == layout.file_length
        assert data[payload_offset:] == want
        assert not any(data[:payload_offset])  # the header region is the caller's
        assert digest == hashlib.sha256(plain).hexdigest()
        assert table == [blake3(want[k : k + CHUNK + TAG_LEN]).digest() for k in range(0, len(want), CHUNK + TAG_LEN)]
        assert not after & os.O_DIRECT  # the caller writes the header through the same fd
        direct_calls = sum(1 for f in seen if f & os.O_DIRECT)
        if not writer._up(payload_offset) < writer._down(layout.file_length):  # no whole block to write
            assert direct_calls == 0
        elif mode == "direct":
            edges = (payload_offset % writer.ALIGN > 0) + (layout.file_length % writer.ALIGN > 0)
            assert direct_calls == len(seen) - edges > 0  # all but the unaligned edges
        else:  # one refused attempt, then the page cache for good
            assert direct_calls == (1 if mode == "write-refused" else 0)


def _refuse_direct_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that accepts O_DIRECT at fcntl but refuses the writes (EINVAL)."""
    real = os.pwrite

    def pwrite(fd: int, data: object, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(writer.os, "pwrite", pwrite)


def test_plaintext_buffers_are_private_and_zeroed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[memoryview] = []
    real: Callable[[int], memoryview] = writer.secret_buffer

    def recording(size: int) -> memoryview:
        made.append(real(size))
        return made[-1]

    monkeypatch.setattr(writer, "secret_buffer", recording)
    _seal_range(tmp_path, os.urandom(9 * CHUNK + 5), 12288)
    assert made and all(not any(b) for b in made)


@pytest.mark.parametrize("direct", [False, True])
def test_a_failed_write_is_a_one_line_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    monkeypatch.setattr(writer, "STAGE", 2 * writer.ALIGN)
    monkeypatch.setattr(writer, "DIRECT", direct)
    real = os.pwrite
    calls = []

    def pwrite(fd: int, data: object, offset: int) -> int:
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    with pytest.raises(StorageError) as e:
        _seal_range(tmp_path, os.urandom(12 * CHUNK), 12288)
    assert str(e.value) == "write failed: Input/output error"


def test_folder_files_sealed_in_parallel_keep_their_order(env: Env) -> None:
    model = make_model_folder(env.work / "model")
    for k in range(6):
        (model / f"shard-{k}.bin").write_bytes(os.urandom(70_000 * (k + 1)))
    seen: list[int] = []
    modelseal.seal(model, env.work / "s", key="test-kek", keys=env.svc, progress=seen.append)
    assert sum(seen) == sum(len(b) for b in tree_bytes(model).values())
    with modelseal.open_folder(env.work / "s", keys=env.svc) as f:
        paths = [e.path for e in f.entries()]
        assert paths == [rel for rel, _, _ in walk_folder(model)]  # the walk's order, not finishing order
        assert {p: f.read(p) for p in paths} == tree_bytes(model)
    out = env.work / "out"
    modelseal.unseal(env.work / "s", out, keys=env.svc)
    assert tree_bytes(out) == tree_bytes(model)
