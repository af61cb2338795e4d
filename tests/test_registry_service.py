"""The registry core (registry.service, registry.gc) over both metadata backends: one contract
suite run on SQLite + a local blob folder and on a real PostgreSQL 15 + a local folder."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import modelseal
from modelseal.errors import RegistryRefused
from modelseal.registry import gc, policy
from modelseal.registry.localblobs import LocalBlobs
from modelseal.registry.service import Limits, Registry
from modelseal.registry.sqlmeta import SqlMeta, open_meta
from tests.conftest import Env
from tests.services import postgres

REPO = "team/model"
ME = "spiffe://example.org/prod/service/trainer"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """A factory of Registry instances sharing one database and one blob folder."""
    made: list[Registry] = []
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        meta_of = lambda: SqlMeta.postgres(url)  # noqa: E731
    else:
        meta_of = lambda: open_meta(None, tmp_path / "data")  # noqa: E731
    clock = Clock()

    def factory(content: str = policy.ANY, limits: Limits | None = None) -> Registry:
        reg = Registry(meta_of(), LocalBlobs(tmp_path / "blobs"), content, limits or Limits(), clock)
        made.append(reg)
        return reg

    factory.clock = clock  # type: ignore[attr-defined]
    yield factory
    if request.param == "postgres":
        for table in ("repositories", "blobs", "links", "manifests", "refs", "tags", "uploads", "holds"):
            made[0].meta.run(lambda q, t=table: q(f"DELETE FROM reg_{t}"))
    for reg in made:
        reg.close()


def push(reg: Registry, data: bytes, repo: str = REPO) -> str:
    up = reg.start_upload(repo, ME)
    return reg.finish(repo, up, ME, sha(data), None, [data], len(data)).digest


def test_upload_chunks_finish_and_read(make: object) -> None:
    reg = make()  # type: ignore[operator]
    up = reg.start_upload(REPO, ME)
    assert reg.append(REPO, up, ME, 0, [b"abc", b"def"], 6).received == 6
    assert reg.upload_status(REPO, up, ME).parts == (0,)
    with pytest.raises(RegistryRefused) as e:
        reg.append(REPO, up, ME, 3, [b"xyz"], 3)  # overlap
    assert e.value.status == 416
    with pytest.raises(RegistryRefused) as e:
        reg.append(REPO, up, ME, 9, [b"xyz"], 3)  # gap
    assert e.value.status == 416
    with pytest.raises(RegistryRefused) as e:
        reg.append(REPO, up, ME, 6, [b"toolong"], 3)
    assert e.value.code == "SIZE_INVALID"
    assert reg.upload_status(REPO, up, ME).received == 6  # a refused chunk leaves nothing
    row = reg.finish(REPO, up, ME, sha(b"abcdefghi"), 6, [b"ghi"], 3)
    assert row.size == 9 and b"".join(reg.read_blob(reg.blob(REPO, row.digest), 2, 4)) == b"cdef"
    with pytest.raises(RegistryRefused) as e:
        reg.upload_status(REPO, up, ME)
    assert e.value.code == "BLOB_UPLOAD_UNKNOWN"
    with pytest.raises(RegistryRefused):
        reg.blob("other/repo", row.digest)  # blobs are per repository


def test_chunks_alternate_between_two_instances(make: object) -> None:
    a, b = make(), make()  # type: ignore[operator]
    data = bytes(range(256)) * 4000
    up = a.start_upload(REPO, ME)
    step = 100_000
    for i, off in enumerate(range(0, len(data), step)):
        (a if i % 2 == 0 else b).append(REPO, up, ME, off, [data[off : off + step]], len(data[off : off + step]))
    row = b.finish(REPO, up, ME, sha(data), None, [], 0)
    assert b"".join(a.read_blob(a.blob(REPO, row.digest))) == data


def test_racing_chunks_one_wins_and_nothing_mixes(make: object) -> None:
    a, b = make(), make()  # type: ignore[operator]
    up = a.start_upload(REPO, ME)
    results: list[str] = []
    go = threading.Barrier(2)

    def send(reg: Registry, byte: bytes) -> None:
        def slow() -> Iterator[bytes]:
            go.wait()
            yield byte * 50_000

        try:
            reg.append(REPO, up, ME, 0, slow(), 50_000)
            results.append("ok:" + byte.decode())
        except RegistryRefused as e:
            results.append(str(e.status))

    threads = [threading.Thread(target=send, args=(r, x)) for r, x in ((a, b"x"), (b, b"y"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[:2] for r in results) == ["41", "ok"]
    winner = next(r for r in results if r.startswith("ok"))[-1].encode()
    row = a.finish(REPO, up, ME, sha(winner * 50_000), None, [], 0)
    assert row.size == 50_000


def test_digest_mismatch_leaves_nothing(make: object, tmp_path: Path) -> None:
    reg = make()  # type: ignore[operator]
    up = reg.start_upload(REPO, ME)
    with pytest.raises(RegistryRefused) as e:
        reg.finish(REPO, up, ME, sha(b"expected"), None, [b"actual"], 6)
    assert e.value.code == "DIGEST_INVALID"
    assert list(LocalBlobs(tmp_path / "blobs").digests()) == []
    assert list(LocalBlobs(tmp_path / "blobs").uploads()) == []
    with pytest.raises(RegistryRefused):
        reg.upload_status(REPO, up, ME)


def test_sha512_blob_and_manifest(make: object) -> None:
    reg = make()  # type: ignore[operator]
    data = b"sha512 content"
    d = "sha512:" + hashlib.sha512(data).hexdigest()
    up = reg.start_upload(REPO, ME)
    reg.append(REPO, up, ME, 0, [data[:5]], 5)
    assert reg.finish(REPO, up, ME, d, 5, [data[5:]], len(data) - 5).digest == d
    assert b"".join(reg.read_blob(reg.blob(REPO, d))) == data
    cfg = push(reg, b"{}")
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": policy.MANIFEST_TYPE,
            "config": {"mediaType": policy.EMPTY_TYPE, "digest": cfg, "size": 2},
            "layers": [],
        }
    ).encode()
    md = "sha512:" + hashlib.sha512(body).hexdigest()
    assert reg.put_manifest(REPO, md, body, policy.MANIFEST_TYPE)[0] == md
    assert reg.get_manifest(REPO, md).body == body


def test_open_uploads_per_identity_are_bounded(make: object) -> None:
    reg = make(limits=Limits(open_uploads_per_identity=2))  # type: ignore[operator]
    reg.start_upload(REPO, ME)
    reg.start_upload(REPO, ME)
    with pytest.raises(RegistryRefused) as e:
        reg.start_upload(REPO, ME)
    assert e.value.status == 429
    reg.start_upload(REPO, "spiffe://example.org/prod/service/other")  # another identity is not affected


def test_gc_sweeps_unreferenced_blobs_online_and_keeps_referenced(make: object, tmp_path: Path) -> None:
    limits = Limits(link_grace=100, blob_grace=50, upload_ttl=1000)
    reg = make(limits=limits)  # type: ignore[operator]
    clock = make.clock  # type: ignore[attr-defined]
    store = LocalBlobs(tmp_path / "blobs")
    kept, lost = push(reg, b"{}"), push(reg, b"orphan bytes")
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": policy.MANIFEST_TYPE,
            "config": {"mediaType": policy.EMPTY_TYPE, "digest": kept, "size": 2},
            "layers": [],
        }
    ).encode()
    reg.put_manifest(REPO, "v1", body, policy.MANIFEST_TYPE)
    abandoned = reg.start_upload(REPO, ME)
    reg.append(REPO, abandoned, ME, 0, [b"partial"], 7)
    assert gc.collect(reg).links == 0  # within the grace period nothing goes
    clock.t += 101
    swept = gc.collect(reg)
    assert (swept.links, swept.blob_rows, swept.stored) == (1, 1, 1)  # link, then row (untouched > 50 s), then bytes
    with pytest.raises(RegistryRefused):
        reg.blob(REPO, lost)
    assert reg.blob(REPO, kept).size == 2
    assert store.size(lost.split(":")[1]) is None
    assert store.size(kept.split(":")[1]) == 2
    clock.t += 1000
    assert gc.collect(reg).uploads >= 1
    assert abandoned not in list(store.uploads())


def test_gc_never_sweeps_a_blob_being_assembled(make: object, tmp_path: Path) -> None:
    reg = make(limits=Limits(link_grace=0, blob_grace=0))  # type: ignore[operator]
    store = LocalBlobs(tmp_path / "blobs")
    data = b"being pushed"
    up = reg.start_upload(REPO, ME)
    reg.append(REPO, up, ME, 0, [data], len(data))
    key = sha(data).split(":")[1]
    reg.meta.hold_pending(key, up, reg.now())  # what finish takes before assemble
    store.assemble(up, (0,), key)  # the bytes exist, the row does not yet
    assert gc.collect(reg).stored == 0
    assert store.size(key) == len(data)
    reg.meta.release(key, up)
    assert gc.collect(reg).stored == 1  # with no row and no hold the bytes are swept


def test_sealed_only_refuses_plaintext_and_keeps_ciphertext(make: object, env: Env) -> None:
    reg = make(content=policy.SEALED_ONLY)  # type: ignore[operator]
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    plain = len(header).to_bytes(8, "little") + header + b"\0\0\0\0"
    up = reg.start_upload(REPO, ME)
    with pytest.raises(RegistryRefused, match="safetensors") as e:
        reg.finish(REPO, up, ME, sha(plain), None, [plain], len(plain))
    assert e.value.status == 403
    with pytest.raises(RegistryRefused):
        reg.blob(REPO, sha(plain))
    (env.work / "w.bin").write_bytes(b"weights" * 500)
    modelseal.seal(env.work / "w.bin", env.work / "w.sealed", key="test-kek", keys=env.svc)
    sealed = (env.work / "w.sealed").read_bytes()
    assert reg.blob(REPO, push(reg, sealed)).kind == policy.SEALED
    empty = push(reg, b"{}")
    doc = {
        "schemaVersion": 2,
        "mediaType": policy.MANIFEST_TYPE,
        "artifactType": policy.ARTIFACT_TYPE,
        "config": {"mediaType": policy.EMPTY_TYPE, "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/vnd.modelseal.sealed.v1", "digest": sha(sealed), "size": len(sealed)}],
    }
    assert reg.put_manifest(REPO, "v1", json.dumps(doc).encode(), policy.MANIFEST_TYPE)[2] == ("v1",)
    doc["layers"][0]["annotations"] = {"org.opencontainers.image.title": "model.safetensors"}  # type: ignore[index]
    with pytest.raises(RegistryRefused, match="opaque"):
        reg.put_manifest(REPO, "v2", json.dumps(doc).encode(), policy.MANIFEST_TYPE)


def test_manifest_validation_and_deletes(make: object) -> None:
    reg = make()  # type: ignore[operator]
    with pytest.raises(RegistryRefused) as e:
        reg.put_manifest(REPO, "v1", b"{not json", policy.MANIFEST_TYPE)
    assert e.value.code == "MANIFEST_INVALID"
    with pytest.raises(RegistryRefused) as e:
        reg.put_manifest(REPO, "v1", b" " * (4 << 20) + b"{}", policy.MANIFEST_TYPE)
    assert e.value.status == 413
    cfg = push(reg, b"{}")
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": policy.MANIFEST_TYPE,
            "config": {"mediaType": "x", "digest": cfg, "size": 2},
            "layers": [],
        }
    ).encode()
    with pytest.raises(RegistryRefused, match="Content-Type"):
        reg.put_manifest(REPO, "v1", body, policy.INDEX_TYPE)
    digest = reg.put_manifest(REPO, "v1", body, policy.MANIFEST_TYPE)[0]
    reg.put_manifest(REPO, "v2", body, None)
    assert reg.tags(REPO, None, None) == (["v1", "v2"], False)
    reg.delete_manifest(REPO, "v1")
    assert reg.get_manifest(REPO, "v2").digest == digest
    reg.delete_manifest(REPO, digest)
    with pytest.raises(RegistryRefused):
        reg.get_manifest(REPO, "v2")
