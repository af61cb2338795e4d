"""The S3 blob store (registry.s3blobs) on a real SeaweedFS S3 gateway started on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelseal.errors import BlobStoreError, DigestMismatch
from modelseal.registry.s3blobs import READ_CHUNK, S3Blobs, _part_size
from modelseal.registry.stores import open_blobs

from .services import seaweedfs

MiB = 1 << 20
BUCKET = "modelseal-test"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # The AWS_* settings are set only once SeaweedFS runs: given them, it would demand them.
    with seaweedfs(tmp_path_factory.mktemp("s3")) as endpoint:
        yield endpoint


@pytest.fixture
def aws_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key-not-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return s3_endpoint


@pytest.fixture
def store(aws_env: str) -> Iterator[S3Blobs]:
    s = S3Blobs(BUCKET, f"t/{secrets.token_hex(4)}", check=False)
    try:
        s.client.create_bucket(Bucket=BUCKET)
    except s.client.exceptions.ClientError as e:
        if "BucketAlready" not in str(e):
            raise
    yield s
    s.close()


def _upload() -> str:
    return secrets.token_hex(16)


def _put(store: S3Blobs, upload: str, index: int, data: bytes, write: int = 1 << 20) -> int:
    w = store.part_writer(upload, index)
    for i in range(0, len(data), write):
        w.write(memoryview(data)[i : i + write])
    return w.commit()


def _keys(store: S3Blobs) -> list[str]:
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=store._root)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def _multiparts(store: S3Blobs) -> list[dict[str, Any]]:
    r = store.client.list_multipart_uploads(Bucket=BUCKET, Prefix=store._root)
    return list(r.get("Uploads", []))


def _read(store: S3Blobs, hexd: str, start: int = 0, length: int | None = None) -> bytes:
    chunks = list(store.read(hexd, start, length))
    assert all(0 < len(c) <= READ_CHUNK for c in chunks)
    return b"".join(chunks)


def test_every_method_on_a_small_blob(store: S3Blobs) -> None:
    up = _upload()
    data = os.urandom(1000)
    hexd = hashlib.sha256(data).hexdigest()
    assert _put(store, up, 0, data[:300]) == 300
    assert _put(store, up, 1, data[300:]) == 700
    assert list(store.uploads()) == [up]
    assert store.size(hexd) is None
    assert store.assemble(up, [0, 1], hexd) == 1000
    assert store.size(hexd) == 1000
    assert _read(store, hexd) == data
    assert list(store.digests()) == [hexd]
    store.delete_upload(up)
    store.delete_upload(up)  # idempotent
    assert list(store.uploads()) == []
    assert _keys(store) == [f"{store._root}blobs/sha256/{hexd}"]
    store.delete(hexd)
    store.delete(hexd)  # idempotent
    assert store.size(hexd) is None
    assert list(store.digests()) == []
    with pytest.raises(BlobStoreError, match="not found"):
        store.read(hexd)


def test_a_64_mib_blob_across_parts_and_its_ranges(store: S3Blobs) -> None:
    up = _upload()
    data = os.urandom(64 * MiB + 12345)
    cuts = [0, 20 * MiB + 3, 20 * MiB + 4, 45 * MiB, len(data)]  # a large part, a 1-byte part, two more
    for i in range(4):
        assert _put(store, up, i, data[cuts[i] : cuts[i + 1]], write=3 * MiB + 1) == cuts[i + 1] - cuts[i]
    assert _multiparts(store) == []  # every part's own multipart upload completed on commit
    hexd = hashlib.sha256(data).hexdigest()
    assert store.assemble(up, [0, 1, 2, 3], hexd) == len(data)
    assert _multiparts(store) == []
    assert store.size(hexd) == len(data)
    assert hashlib.sha256(_read(store, hexd)).hexdigest() == hexd
    # Ranges across the 8 MiB S3 part boundaries, to and past the end.
    n = len(data)
    for start, length in [
        (0, 1),
        (8 * MiB - 5, 10),
        (5 * MiB, 17 * MiB),
        (n - 3, 3),
        (n - 3, 100),
        (n, None),
        (n + 5, 9),
    ]:
        end = n if length is None else start + length
        assert _read(store, hexd, start, length) == data[start:end], (start, length)
    assert _read(store, hexd, 7 * MiB) == data[7 * MiB :]
    assert _read(store, hexd, 123, 0) == b""


def test_empty_blobs(store: S3Blobs) -> None:
    empty = hashlib.sha256(b"").hexdigest()
    up = _upload()
    assert _put(store, up, 0, b"") == 0
    assert store.assemble(up, [0], empty) == 0
    assert store.size(empty) == 0
    assert _read(store, empty) == b""
    assert _read(store, empty, 0, 0) == b""
    assert _read(store, empty, 0, 10) == b""
    store.delete(empty)
    assert store.assemble(_upload(), [], empty) == 0  # no parts at all
    assert store.size(empty) == 0


@pytest.mark.parametrize("size", [5000, 20 * MiB], ids=["one-put", "multipart"])
def test_a_digest_mismatch_leaves_nothing(store: S3Blobs, size: int) -> None:
    up = _upload()
    data = os.urandom(size)
    _put(store, up, 0, data)
    wrong = hashlib.sha256(data + b"x").hexdigest()
    with pytest.raises(DigestMismatch):
        store.assemble(up, [0], wrong)
    assert store.size(wrong) is None
    assert list(store.digests()) == []
    assert _multiparts(store) == []
    assert not [k for k in _keys(store) if "/blobs/" in k]
    # The parts stay (the caller deletes the upload); the right digest still assembles.
    assert store.assemble(up, [0], hashlib.sha256(data).hexdigest()) == size


def test_assemble_is_idempotent(store: S3Blobs) -> None:
    up = _upload()
    data = os.urandom(10 * MiB)
    hexd = hashlib.sha256(data).hexdigest()
    _put(store, up, 0, data)
    assert store.assemble(up, [0], hexd) == len(data)
    assert store.assemble(up, [0], hexd) == len(data)
    store.delete_upload(up)
    again = _upload()
    _put(store, again, 0, data)
    assert store.assemble(again, [0], hexd) == len(data)  # the same bytes: accepted, not copied again
    assert list(store.digests()) == [hexd]


def test_a_stored_digest_is_not_taken_without_its_bytes(store: S3Blobs) -> None:
    """Finding 1: a claim of a digest the store holds proves nothing; the parts are hashed."""
    data = os.urandom(10 * MiB)
    hexd = hashlib.sha256(data).hexdigest()
    first = _upload()
    _put(store, first, 0, data)
    assert store.assemble(first, [0], hexd) == len(data)
    wrong = _upload()
    _put(store, wrong, 0, b"garbage-not-the-blob")
    with pytest.raises(DigestMismatch):
        store.assemble(wrong, [0], hexd)
    empty = _upload()
    _put(store, empty, 0, b"")
    with pytest.raises(DigestMismatch):
        store.assemble(empty, [0], hexd)
    with pytest.raises(BlobStoreError):
        store.assemble(_upload(), [0, 1], hexd)  # parts that do not exist
    assert _read(store, hexd) == data and _multiparts(store) == []


def test_a_part_is_replaced_whole(store: S3Blobs) -> None:
    up = _upload()
    _put(store, up, 0, os.urandom(12 * MiB))  # a multipart part ...
    _put(store, up, 0, b"second")  # ... replaced by a small one
    _put(store, up, 1, b"tail-old")
    _put(store, up, 1, b"-tail")
    hexd = hashlib.sha256(b"second-tail").hexdigest()
    assert store.assemble(up, [0, 1], hexd) == len(b"second-tail")
    assert _read(store, hexd) == b"second-tail"


def test_an_aborted_or_unfinished_part_leaves_nothing(store: S3Blobs) -> None:
    up = _upload()
    w = store.part_writer(up, 0)
    w.write(os.urandom(20 * MiB))
    assert len(_multiparts(store)) == 1  # in progress, invisible
    assert _keys(store) == []
    w.abort()
    assert _multiparts(store) == []
    assert _keys(store) == []
    with pytest.raises(BlobStoreError):
        w.write(b"more")
    # A missing part: assembling fails with a BlobStoreError and leaves no blob.
    _put(store, up, 0, b"abc")
    hexd = hashlib.sha256(b"abcdef").hexdigest()
    with pytest.raises(BlobStoreError, match="upload part not found"):
        store.assemble(up, [0, 1], hexd)
    assert store.size(hexd) is None
    assert _multiparts(store) == []


def test_delete_upload_removes_parts_and_parts_in_progress(store: S3Blobs) -> None:
    up, other = _upload(), _upload()
    for i in range(3):
        _put(store, up, i, b"x" * 10)
    _put(store, other, 0, b"keep")
    w = store.part_writer(up, 3)
    w.write(os.urandom(9 * MiB))  # one S3 part sent: a multipart upload in progress
    store.delete_upload(up)
    assert list(store.uploads()) == [other]
    assert _multiparts(store) == []
    with pytest.raises(BlobStoreError):
        w.commit()  # its multipart upload was aborted: it can never appear
    assert _keys(store) == [f"{store._root}uploads/{other}/0"]


def test_sweeps_abort_multipart_uploads_left_by_a_crash(store: S3Blobs) -> None:
    # A real crash: a process killed (SIGKILL) in the middle of assembling a 48 MiB blob.
    up = _upload()
    data = os.urandom(48 * MiB)
    hexd = hashlib.sha256(data).hexdigest()
    for i in range(6):
        _put(store, up, i, data[i * 8 * MiB : (i + 1) * 8 * MiB])
    script = textwrap.dedent(f"""
        from modelseal.registry.s3blobs import S3Blobs
        S3Blobs({BUCKET!r}, {store._root.rstrip("/")!r}).assemble({up!r}, list(range(6)), {hexd!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _multiparts(store) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the assembly finished before it could be killed"
    assert store.size(hexd) is None  # nothing partial visible
    assert list(store.digests()) == []
    assert len(_multiparts(store)) == 1
    # The janitor (the GC calls it with now - 1 h) aborts what received nothing since its cut-off.
    assert list(store.uploads()) == [up]
    assert store.sweep_tmp(time.time() - 3600) == 0
    assert len(_multiparts(store)) == 1
    assert store.sweep_tmp(time.time() + 1) == 1
    assert _multiparts(store) == []
    assert store.assemble(up, list(range(6)), hexd) == len(data)  # the parts survived the crash


def test_the_janitor_spares_a_long_upload_still_sending_parts(store: S3Blobs) -> None:
    w = store.part_writer(_upload(), 0)
    w.write(os.urandom(9 * MiB))  # starts the multipart upload and sends part 1
    started = time.time()
    time.sleep(2.2)  # S3 timestamps have a resolution of a second
    w.write(os.urandom(16 * MiB))  # part 2 is sent once part 3 fills: part 2 has arrived
    assert store.sweep_tmp(started + 1.1) == 0  # started before the cut-off, active after it
    assert len(_multiparts(store)) == 1
    assert w.commit() == 25 * MiB
    assert store.sweep_tmp(time.time() + 1) == 0  # completed: nothing to abort


def test_s3_parts_hold_a_blob_of_more_than_1_tib() -> None:
    sizes = [_part_size(n) for n in range(1, 10_001)]  # S3 allows 10 000 parts
    assert min(sizes) >= 5 * MiB and max(sizes) <= 5 << 30  # S3's part size bounds
    assert sum(sizes) > 1 << 40  # docs/registry.md: a blob is at most 1 TiB


def test_concurrent_uploads_share_a_small_pool(store: S3Blobs) -> None:
    store = S3Blobs(BUCKET, f"t/{secrets.token_hex(4)}", max_connections=4)
    blobs: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def job() -> None:
        try:
            up = _upload()
            data = os.urandom(9 * MiB + secrets.randbelow(1000))
            _put(store, up, 0, data)
            hexd = hashlib.sha256(data).hexdigest()
            store.assemble(up, [0], hexd)
            blobs[hexd] = data
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(store.digests()) == sorted(blobs)
    for hexd, data in blobs.items():
        assert _read(store, hexd) == data
    store.close()


def test_errors_are_one_line_and_name_no_endpoint(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BlobStoreError) as e:
        S3Blobs("no-such-bucket-here", "p")  # checked at once
    assert str(e.value) == "S3 HeadBucket failed: the bucket does not exist"
    assert e.value.__cause__ is None and e.value.__suppress_context__
    missing = S3Blobs("no-such-bucket-here", "p", check=False)
    w = missing.part_writer(_upload(), 0)
    w.write(b"abc")
    with pytest.raises(BlobStoreError) as e:
        w.commit()
    # SeaweedFS answers AccessDenied where AWS answers NoSuchBucket.
    assert str(e.value) in ("S3 PutObject failed: the bucket does not exist", "S3 PutObject failed: AccessDenied")
    assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(BlobStoreError, match="bucket does not exist"):
        list(missing.digests())
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    down = S3Blobs(BUCKET, "p", check=False)
    down.client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(BlobStoreError) as e:
        down.size("a" * 64)
    text = str(e.value)
    assert "unreachable" in text and "127.0.0.1" not in text and "test-secret" not in text
    assert e.value.__cause__ is None


def test_keys_never_leave_the_prefix(store: S3Blobs) -> None:
    with pytest.raises(ValueError):
        store.size("../../etc")
    with pytest.raises(ValueError):
        store.delete("../uploads")
    with pytest.raises(ValueError):
        store.part_writer("../x", 0)
    with pytest.raises(ValueError):
        store.part_writer(_upload(), -1)
    with pytest.raises(ValueError):
        store.assemble(_upload(), [0], "A" * 64)
    with pytest.raises(ValueError):
        S3Blobs(BUCKET, "a/../b")
    with pytest.raises(ValueError):
        store.read("a" * 64, -1)


def test_open_blobs_dispatches_s3_urls(store: S3Blobs, tmp_path: Path) -> None:
    s = open_blobs(f"s3://{BUCKET}/some/prefix/", tmp_path)
    assert isinstance(s, S3Blobs)
    assert s.bucket == BUCKET and s._root == "some/prefix/"
    bare = open_blobs(f"s3://{BUCKET}", tmp_path)
    assert isinstance(bare, S3Blobs) and bare._root == ""
