"""Write failures midway leave the destination and the source exactly as they were."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import modelseal
from modelseal import stream
from modelseal.errors import StorageError
from modelseal.source import FdSource

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
    from modelseal import api

    with monkeypatch.context() as m:
        m.setattr(api.os, "write", _FailAfter(os.write, 2))
        with pytest.raises(StorageError):
            modelseal.unseal(sealed, out, keys=env.svc, force=True)
    assert _snapshot(env.work) == before


def test_rewrap_failure_leaves_artifact_openable(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    src = env.work / "r.bin"
    src.write_bytes(os.urandom(10000))
    dst = env.work / "r.sealed"
    modelseal.seal(src, dst, key="test-kek", keys=env.svc)
    env.svc.rotate("test-kek")
    from modelseal import artifact

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
    from modelseal.artifact import read_raw

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
