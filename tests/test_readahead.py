"""Sequential reads through the read-ahead window: same bytes as random reads, bounded,
errors raised only for chunks actually read, nothing left running after close."""

from __future__ import annotations

import io
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

import modelseal
from modelseal.errors import DecryptionError
from modelseal.format import readahead
from modelseal.format.file import read_raw
from modelseal.format.source import FdSource
from modelseal.keys.service import KeyService
from modelseal.recipes import writing

from .conftest import Env

CS = 1 << 16  # small chunks: many chunks in a small file


@pytest.fixture()
def sealed(env: Env, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, bytes]:
    monkeypatch.setattr(writing, "DEFAULT_CHUNK_LOG2", 16)
    data = os.urandom(40 * CS + 123)
    src = env.work / "plain.bin"
    src.write_bytes(data)
    out = env.work / "plain.sealed"
    modelseal.seal(src, out, "test-kek", keys=env.svc)
    return out, data


@pytest.fixture()
def keys(env: Env) -> KeyService:
    return env.svc


def _read_all(f: io.RawIOBase | io.BufferedReader, n: int) -> bytes:
    parts = []
    while True:
        b = f.read(n)
        if not b:
            return b"".join(parts)
        parts.append(b)


@pytest.mark.parametrize("n", [1, 1000, CS - 1, CS, CS + 1, 3 * CS + 7, 64 * CS])
def test_sequential_reads_return_the_plaintext(sealed: tuple[Path, bytes], keys: KeyService, n: int) -> None:
    path, data = sealed
    with modelseal.open(path, keys=keys, verify=False) as r:
        assert _read_all(r, n) == data
        assert r.read(10) == b""


def test_interleaved_seeks_and_sequential_reads(sealed: tuple[Path, bytes], keys: KeyService) -> None:
    path, data = sealed
    with modelseal.open(path, keys=keys, verify=False) as r:
        assert r.read(5000) == data[:5000]
        r.seek(20 * CS + 3)
        assert r.read(2 * CS) == data[20 * CS + 3 : 22 * CS + 3]
        assert r.read(CS) == data[22 * CS + 3 : 23 * CS + 3]  # continues: read-ahead again
        r.seek(2)
        assert r.read(CS) == data[2 : CS + 2]  # backwards: the window is rebuilt
        assert r.pread(39 * CS, 2 * CS) == data[39 * CS :]
        assert r.read(7) == data[CS + 2 : CS + 9]


def test_buffered_and_copyfileobj(sealed: tuple[Path, bytes], keys: KeyService) -> None:
    path, data = sealed
    with modelseal.open(path, keys=keys, verify=False) as r:
        assert io.BufferedReader(r).read() == data  # type: ignore[arg-type]
    with modelseal.open(path, keys=keys, verify=False) as r:
        out = io.BytesIO()
        shutil.copyfileobj(r, out)
        assert out.getvalue() == data


def test_window_is_bounded(sealed: tuple[Path, bytes], keys: KeyService) -> None:
    path, _ = sealed
    with modelseal.open(path, keys=keys, verify=False) as r:
        r.read(10)
        ahead = r._ahead
        assert ahead is not None
        assert len(ahead._slots) == readahead.depth_for(CS) <= 40
        assert sum(len(s.buf) for s in ahead._slots) <= readahead.MAX_BYTES
    assert readahead.depth_for(1 << 30) == 2  # a huge chunk size still gets at least double buffering
    assert readahead.depth_for(16 << 20) * (16 << 20) <= readahead.MAX_BYTES + (16 << 20)


def _flip(path: Path, chunk: int) -> None:
    with open(path, "r+b") as f:
        layout = read_raw(FdSource(f.fileno(), owns=False)).layout
        assert layout.chunk_size == CS
        off = layout.offset(chunk) + 10
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 1]))


def test_tampered_chunk_raises_only_when_read(sealed: tuple[Path, bytes], keys: KeyService) -> None:
    path, data = sealed
    _flip(path, 5)
    with modelseal.open(path, keys=keys, verify=False) as r:
        assert r.read(4 * CS) == data[: 4 * CS]  # chunk 5 is already being decrypted ahead: no error yet
        buf = bytearray(2 * CS)
        with pytest.raises(DecryptionError):
            r.readinto(buf)  # chunks 4 and 5
        assert buf == bytes(len(buf))  # nothing of the failed read reaches the caller
        r.seek(6 * CS)
        assert r.read(CS) == data[6 * CS : 7 * CS]  # later chunks still read
        r.seek(5 * CS)
        with pytest.raises(DecryptionError):
            r.read(10)  # retried, not served from a poisoned slot


def test_close_waits_for_workers_and_zeroes(sealed: tuple[Path, bytes], keys: KeyService) -> None:
    path, _ = sealed
    r = modelseal.open(path, keys=keys, verify=False)
    r.read(100)
    ahead = r._ahead
    assert ahead is not None
    slots = list(ahead._slots)
    assert any(bytes(s.buf[:64]) != bytes(64) for s in slots)
    r.close()
    assert all(s.future is None for s in slots)
    assert all(bytes(s.buf) == bytes(len(s.buf)) for s in slots)
    with pytest.raises(ValueError):
        r.read(1)


def test_concurrent_pread_while_streaming(sealed: tuple[Path, bytes], keys: KeyService) -> None:
    path, data = sealed
    errors: list[BaseException] = []
    with modelseal.open(path, keys=keys, verify=False) as r:

        def hammer() -> None:
            try:
                for k in range(200):
                    off = (k * 7919) % (len(data) - 5000)
                    assert r.pread(off, 5000) == data[off : off + 5000]
            except BaseException as e:  # reported below
                errors.append(e)

        t = threading.Thread(target=hammer)
        t.start()
        got = _read_all(r, 3000)
        t.join()
    assert not errors
    assert got == data


def test_big_reads_use_every_core_and_keep_unverified_bytes_out_of_the_buffer(
    sealed: tuple[Path, bytes], keys: KeyService
) -> None:
    path, data = sealed
    with modelseal.open(path, keys=keys, verify=False) as r:
        big = bytearray(r._direct_min + 5)
        assert r.readinto(big) == len(big)
        assert big == data[: len(big)]
        assert r._ahead is None  # served by the parallel path, not the window
        assert r.read(3) == data[len(big) : len(big) + 3]  # and the stream continues


def test_big_read_of_a_tampered_chunk_leaves_zeroes(sealed: tuple[Path, bytes], keys: KeyService) -> None:
    path, _ = sealed
    _flip(path, 6)
    with modelseal.open(path, keys=keys, verify=False) as r:
        big = bytearray(b"\xaa" * (10 * CS))
        with pytest.raises(DecryptionError):
            r.readinto(big)
        assert big == bytes(len(big))


def test_another_thread_never_sees_forged_plaintext_in_the_callers_buffer(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller's buffer (a bytearray too) only ever receives authenticated plaintext: a
    tampered chunk of an all-zero file would otherwise show its flipped bit to a thread
    watching the buffer while the read runs."""
    monkeypatch.setattr(writing, "DEFAULT_CHUNK_LOG2", 16)
    src, out = env.work / "zeros.bin", env.work / "zeros.sealed"
    src.write_bytes(bytes(40 * CS))
    modelseal.seal(src, out, "test-kek", keys=env.svc)
    with open(out, "r+b") as f:
        layout = read_raw(FdSource(f.fileno(), owns=False)).layout
        for i in range(layout.count):
            f.seek(layout.offset(i) + 5)
            f.write(b"\x01")  # every chunk forged: its plaintext would hold a 1
    seen = threading.Event()
    stop = threading.Event()
    buf = bytearray(16 * CS)

    def watch() -> None:
        view = memoryview(buf)
        while not stop.is_set():
            if any(view[k * CS + 5] for k in range(16)):
                seen.set()

    t = threading.Thread(target=watch)
    t.start()
    try:
        with modelseal.open(out, keys=env.svc, verify=False) as r:
            assert len(buf) >= r._direct_min  # the parallel path that once decrypted in place
            for _ in range(100):
                r.seek(0)
                with pytest.raises(DecryptionError):
                    r.readinto(buf)
    finally:
        stop.set()
        t.join()
    assert not seen.is_set()


def test_reads_racing_close_return_the_right_bytes_or_fail_typed(sealed: tuple[Path, bytes], keys: KeyService) -> None:
    from modelseal.errors import ModelsealError

    path, data = sealed
    for trial in range(60):
        r = modelseal.open(path, keys=keys, verify=False)
        outcome: list[object] = []

        def read(r: Any = r, trial: int = trial, outcome: list[object] = outcome) -> None:
            try:
                for k in range(5):
                    if trial % 2:
                        outcome.append((CS // 2, r.pread(CS // 2, 2 * CS)))
                    else:
                        outcome.append((k * 3 * CS, r.read(3 * CS)))
            except (ValueError, ModelsealError) as e:  # closed: refused, or the source went away
                outcome.append(e)

        t = threading.Thread(target=read)
        t.start()
        r.close()
        t.join()
        for o in outcome:
            if isinstance(o, tuple):
                at, got = o
                assert got == data[at : at + len(got)]  # never zeroes passed off as data
        assert r._ahead is None and bytes(r._cache) == bytes(len(r._cache))


def test_a_forked_child_reads_on_after_the_parent_read_ahead(sealed: tuple[Path, bytes], keys: KeyService) -> None:
    import signal
    import time

    from modelseal.format import stream

    path, data = sealed
    r = modelseal.open(path, keys=keys, verify=False)
    try:
        for _ in range(stream.workers()):
            stream.submit(lambda: time.sleep(0.5))  # the pool is busy at the fork: futures still pending
        assert r.read(100) == data[:100]
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            signal.alarm(20)
            ok = r.read(3 * CS) == data[100 : 100 + 3 * CS]
            r.close()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
    finally:
        r.close()


def test_sealed_over_sealed_from_two_threads_does_not_deadlock(
    sealed: tuple[Path, bytes], keys: KeyService, env: Env
) -> None:
    import random

    from modelseal.loaders.fs import SealedFileSystem

    inner, data = sealed
    outer = env.work / "twice.sealed"  # sealed twice: sealed:: over sealed:: gives back the plaintext
    modelseal.seal(inner, outer, "test-kek", keys=keys)
    fs = SealedFileSystem(fs=SealedFileSystem(keys=keys), keys=keys)
    done = [0, 0]
    with fs.open(str(outer), "rb") as f:
        r = f.raw

        def work(k: int) -> None:
            rnd = random.Random(k)  # test offsets, not secrets
            for _ in range(30):
                off = rnd.randrange(0, len(data) - 8 * CS)
                assert r.pread(off, 8 * CS) == data[off : off + 8 * CS]
                done[k] += 1

        ts = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not any(t.is_alive() for t in ts), f"deadlocked after {done} reads"
    assert done == [30, 30]


def test_huge_page_hint_is_best_effort_and_never_changes_contents() -> None:
    import numpy as np

    from modelseal.util.hardening import HUGE_PAGE, prefer_huge_pages

    assert not prefer_huge_pages(bytearray(4096))  # no 2 MiB-aligned interior
    assert not prefer_huge_pages(b"x" * (3 * HUGE_PAGE))  # read-only memory is left alone
    arr = np.arange(3 * HUGE_PAGE // 8, dtype=np.int64)
    before = arr.copy()
    ok = prefer_huge_pages(arr)
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if mode.exists() and "[never]" not in mode.read_text():
        assert ok  # madvise accepted on a range that is certainly page-aligned inside
    assert np.array_equal(arr, before)


def test_parallel_decrypt_failure_in_the_callers_own_run(sealed: tuple[Path, bytes], keys: KeyService) -> None:
    path, data = sealed
    _flip(path, 0)  # the first run is the one the calling thread decrypts
    with modelseal.open(path, keys=keys, verify=False) as r:
        out = bytearray(b"\x55" * (8 * CS))
        with pytest.raises(DecryptionError):
            r.preadinto(0, memoryview(out))
        assert out == bytes(len(out))
        assert r.pread(CS, 2 * CS) == data[CS : 3 * CS]
