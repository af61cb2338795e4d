"""Write failures midway leave the destination and the source exactly as they were."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import modelseal
from modelseal.errors import StorageError
from modelseal.format import stream
from modelseal.format.source import FdSource

from .conftest import Env, make_model_folder, tree_bytes


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class _FailAfter:
    def __init__(self, real: object, n: int) -> None:
        self.real, self.n = real, n

    def __call__(self, *args: object) -> int:
        self.n -= 1
        if self.n < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(*args)  # type: ignore[operator]


@pytest.mark.parametrize("fail_after", [0, 1, 3])
def test_seal_write_failure_keeps_existing_destination(
    env: Env, monkeypatch: pytest.MonkeyPatch, fail_after: int
) -> None:
    src = env.work / "w.bin"
    src.write_bytes(os.urandom(5 << 20))
    dst = env.work / "w.sealed"
    modelseal.seal(src, dst, key="test-kek", keys=env.svc)
    before = _snapshot(env.work)
    with monkeypatch.context() as m:
        m.setattr(stream.os, "pwrite", _FailAfter(os.pwrite, fail_after))
        with pytest.raises(StorageError, match="No space left"):
            modelseal.seal(src, dst, key="test-kek", keys=env.svc, force=True)
    assert _snapshot(env.work) == before  # no temp file, old artifact intact
    assert modelseal.open(dst, keys=env.svc).read() == src.read_bytes()


def test_folder_seal_failure_midway_leaves_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model_folder(env.work / "model")
    before = _snapshot(env.work)
    with monkeypatch.context() as m:
        m.setattr(stream.os, "pwrite", _FailAfter(os.pwrite, 4))
        with pytest.raises(StorageError):
            modelseal.seal(model, env.work / "model.sealed", key="test-kek", keys=env.svc)
    assert _snapshot(env.work) == before
    assert sorted(p.name for p in env.work.iterdir()) == ["model"]


def test_unseal_write_failure_keeps_existing_output(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model_folder(env.work / "model")
    sealed = env.work / "s"
    modelseal.seal(model, sealed, key="test-kek", keys=env.svc)
    out = env.work / "out"
    modelseal.unseal(sealed, out, keys=env.svc)
    (out / "marker").write_text("old output")
    before = _snapshot(env.work)

    with monkeypatch.context() as m:
        m.setattr(os, "write", _FailAfter(os.write, 2))
        with pytest.raises(StorageError):
            modelseal.unseal(sealed, out, keys=env.svc, force=True)
    assert _snapshot(env.work) == before


def test_rewrap_failure_leaves_artifact_openable(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    src = env.work / "r.bin"
    src.write_bytes(os.urandom(10000))
    dst = env.work / "r.sealed"
    modelseal.seal(src, dst, key="test-kek", keys=env.svc)
    env.svc.rotate("test-kek")
    from modelseal.format import file as artifact

    # Fail while writing the new slot, and (separately) while erasing the old one.
    for n in (0, 1):
        with monkeypatch.context() as m:
            m.setattr(artifact.os, "pwrite", _FailAfter(os.pwrite, n))
            with pytest.raises(StorageError):
                modelseal.rewrap(dst, keys=env.svc)
        assert modelseal.open(dst, keys=env.svc).read() == src.read_bytes()
    modelseal.rewrap(dst, keys=env.svc)
    assert modelseal.inspect(dst)["recipients"][0]["version"] == 2


def test_torn_slot_write_is_survivable(env: Env) -> None:
    """Simulate a crash halfway through writing the new slot: half of it on disk."""
    from modelseal.format.file import read_raw

    src = env.work / "t.bin"
    src.write_bytes(os.urandom(1000))
    dst = env.work / "t.sealed"
    modelseal.seal(src, dst, key="test-kek", keys=env.svc)
    good = dst.read_bytes()
    env.svc.rotate("test-kek")
    modelseal.rewrap(dst, keys=env.svc)  # the new wrap sits in slot B now, slot A is zero
    rewrapped = dst.read_bytes()
    fd = os.open(dst, os.O_RDONLY)
    raw = read_raw(FdSource(fd, owns=False))
    os.close(fd)
    a = raw.core.slots_offset
    s = raw.core.slot_size
    torn = bytearray(good)  # old slot A intact, slot B half written
    torn[a + s : a + s + s // 2] = rewrapped[a + s : a + s + s // 2]
    dst.write_bytes(bytes(torn))
    assert modelseal.open(dst, keys=env.svc).read() == src.read_bytes()


def test_source_is_never_modified(env: Env) -> None:
    model = make_model_folder(env.work / "model")
    before = tree_bytes(model)
    modelseal.seal(model, env.work / "s", key="test-kek", keys=env.svc)
    with pytest.raises(modelseal.PolicyDenied):
        modelseal.seal(model, model / "inside.sealed", key="test-kek", keys=env.svc)
    assert tree_bytes(model) == before


def test_concurrent_rewraps_and_reencrypt_never_lose_the_key(env: Env) -> None:
    """Rewrap updates slots in place under an exclusive lock: many concurrent rewraps
    (and a reencrypt replacing the file) must leave an artifact that opens."""
    from concurrent.futures import ThreadPoolExecutor

    data = os.urandom(50_000)
    src = env.work / "c.bin"
    src.write_bytes(data)
    dst = env.work / "c.sealed"
    modelseal.seal(src, dst, key="test-kek", keys=env.svc)

    def work(i: int) -> None:
        if i == 7:
            modelseal.reencrypt(dst, keys=env.svc)
        else:
            modelseal.rewrap(dst, keys=env.svc)

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(work, range(24)))
    assert modelseal.open(dst, keys=env.svc).read() == data
    info = modelseal.inspect(dst)
    assert info["inactive_slot"] == "empty"


def test_force_replaces_across_file_and_folder_kinds(env: Env) -> None:
    model = make_model_folder(env.work / "model", big=10)
    f = env.work / "f.bin"
    f.write_bytes(b"x")
    dst = env.work / "dst"
    dst.write_bytes(b"an old file")
    modelseal.seal(model, dst, key="test-kek", keys=env.svc, force=True)
    assert (dst / "manifest.mseal").exists()
    modelseal.seal(f, dst, key="test-kek", keys=env.svc, force=True)
    assert dst.is_file() and modelseal.open(dst, keys=env.svc).read() == b"x"
    assert sorted(p.name for p in env.work.iterdir()) == ["dst", "f.bin", "model"]


def test_folder_replace_failure_restores_the_original(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelseal.util import files as fsutil

    model = make_model_folder(env.work / "model", big=10)
    dst = env.work / "s"
    modelseal.seal(model, dst, key="test-kek", keys=env.svc)
    before = _snapshot(dst)
    real_rename = os.rename
    calls = []

    def flaky_rename(a: object, b: object) -> None:
        calls.append(1)
        if len(calls) == 2:  # the old folder has been moved aside; moving the new one in fails
            raise OSError(errno.EIO, "I/O error")
        real_rename(a, b)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        # Where the filesystem cannot RENAME_EXCHANGE, the swap is two renames (the fallback).
        m.setattr(fsutil, "renameat2", lambda *a: False)
        m.setattr(fsutil.os, "rename", flaky_rename)
        with pytest.raises(StorageError):
            modelseal.reencrypt(dst, keys=env.svc)
    assert _snapshot(dst) == before
    assert sorted(p.name for p in env.work.iterdir()) == ["model", "s"]
    assert modelseal.open_folder(dst, keys=env.svc).read("config.json") == (model / "config.json").read_bytes()


def test_direct_write_failure_midway_keeps_existing_destination(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The staged O_DIRECT path (format/writer.py): an I/O error on a direct write after
    some stages are on disk leaves no temp file and the old artifact intact."""
    import fcntl

    from modelseal.format import writer

    monkeypatch.setattr(writer, "DIRECT", True)  # off by default (docs/decisions.md), still supported
    src = env.work / "d.bin"
    src.write_bytes(os.urandom(9 << 20))  # stages of 4 MiB: two whole ones, then the last
    dst = env.work / "d.sealed"
    modelseal.seal(src, dst, key="test-kek", keys=env.svc)
    before = _snapshot(env.work)
    real, direct_writes = os.pwrite, []

    def pwrite(fd: int, data: object, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_writes.append(offset)
            if len(direct_writes) == 2:
                raise OSError(errno.EIO, "Input/output error")
        return real(fd, data, offset)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(writer.os, "pwrite", pwrite)
        with pytest.raises(StorageError, match=r"^write failed: Input/output error$"):
            modelseal.seal(src, dst, key="test-kek", keys=env.svc, force=True)
    assert len(direct_writes) == 2
    assert _snapshot(env.work) == before
    assert modelseal.open(dst, keys=env.svc).read() == src.read_bytes()


def test_parallel_folder_failure_stops_the_other_files(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files of a folder are sealed in parallel: one failing stops the rest, nothing is left."""
    from modelseal.recipes import seal as seal_recipe

    model = make_model_folder(env.work / "model")
    for k in range(4):
        (model / f"shard-{k}.bin").write_bytes(os.urandom(2 << 20))
    before = _snapshot(env.work)
    real_reader = seal_recipe.fd_reader

    def reader(fd: int) -> stream.ReadAt:
        read_at = real_reader(fd)
        if os.fstat(fd).st_size == 2 << 20:

            def failing(buf: memoryview, offset: int) -> None:
                if offset >= 1 << 20:
                    raise StorageError("source file changed size while it was being sealed")
                read_at(buf, offset)

            return failing
        return read_at

    with monkeypatch.context() as m:
        m.setattr(seal_recipe, "fd_reader", reader)
        with pytest.raises(StorageError, match="changed size"):
            modelseal.seal(model, env.work / "model.sealed", key="test-kek", keys=env.svc)
    assert _snapshot(env.work) == before
    assert sorted(p.name for p in env.work.iterdir()) == ["model"]
