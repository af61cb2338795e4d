"""Scale-out (issue 12, section 5): stateless ``modelseal serve`` instances sharing one
PostgreSQL and one S3 bucket (SeaweedFS), all real, on 127.0.0.1; any instance serves any
request, and an instance killed with SIGKILL loses nothing and leaves nothing half-visible.

Raw HTTP (stdlib ``http.client`` over ``server.tls.client_context``): no client library."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import modelseal
from modelseal.registry.s3blobs import S3Blobs
from modelseal.server import tls
from tests.conftest import Env
from tests.oci_helpers import SEALED_LAYER, SERVE, TD, Client, Server, image, make_dir, sha
from tests.push_pull_helpers import bind_all
from tests.services import free_port, postgres, seaweedfs

MiB = 1 << 20
BUCKET = "modelseal-scaleout"
PREFIX = "registry"
REPO = "team/model"
ARTIFACT = "application/vnd.modelseal.artifact.v1"


@dataclass
class Stack:
    a: Server
    b: Server
    store: S3Blobs  # the bucket, as the test inspects it

    def both(self) -> tuple[Server, Server]:
        return self.a, self.b


@pytest.fixture
def stack(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    from modelseal.pki import ca as pki_ca

    with seaweedfs(tmp_path / "s3") as endpoint, postgres() as db:
        # Set only now: SeaweedFS started with AWS_* set would demand those credentials.
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "scaleout-access-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "scaleout-secret-not-secret")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        # The database password travels in the environment (libpq's PGPASSWORD), not in argv.
        url = urlsplit(db)
        monkeypatch.setenv("PGPASSWORD", url.password or "")
        db_url = f"postgresql://{url.username}@{url.hostname}:{url.port}{url.path}"
        store = S3Blobs(BUCKET, PREFIX, check=False)
        store.client.create_bucket(Bucket=BUCKET)
        pki_ca.init_ca(env.svc, TD)
        tls_dir = make_dir(env, env.work / "server-tls", "server", "registry", ips=["127.0.0.1"])
        client_dir = make_dir(env, env.work / "client-tls", "service", "trainer")
        bind_all(env.work / "data-a", db_url)  # one governance database, as the registry's: PostgreSQL
        servers = []
        for name in ("a", "b"):
            port = free_port()
            args = [
                *SERVE, "--listen", f"127.0.0.1:{port}", "--tls-dir", str(tls_dir),
                "--data", str(env.work / f"data-{name}"), "--db", db_url, "--blobs", f"s3://{BUCKET}/{PREFIX}",
            ]  # fmt: skip
            log = env.work / f"serve-{name}.log"
            servers.append(Server(port, env.work / f"data-{name}", None, env, log, client_dir, args))  # type: ignore[arg-type]
        try:
            for s in servers:
                s.start()
            yield Stack(servers[0], servers[1], store)
        finally:
            for s in servers:
                s.stop()
            store.close()


def kill9(server: Server) -> None:
    """SIGKILL the instance: its supervisor and every worker (its own process group)."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()


def sealed(env: Env, size: int) -> bytes:
    src = env.work / "weights.bin"
    src.write_bytes(os.urandom(size))
    modelseal.seal(src, env.work / "weights.sealed", key="test-kek", keys=env.svc)
    return (env.work / "weights.sealed").read_bytes()


def connect(server: Server, timeout: float = 60) -> http.client.HTTPSConnection:
    ctx: ssl.SSLContext = tls.client_context(server.client_dir)
    return http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=timeout)


def blob_keys(store: S3Blobs, under: str) -> dict[str, int]:
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/{under}")
    return {o["Key"]: int(o["Size"]) for p in pages for o in p.get("Contents", [])}


def multiparts(store: S3Blobs, under: str) -> list[dict[str, Any]]:
    return list(store.client.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{PREFIX}/{under}").get("Uploads", []))


def nothing_partial(stack: Stack, complete: dict[str, bytes]) -> None:
    """The bucket holds exactly the complete blobs, each whole and under its own digest, and
    no object or multipart upload of a finished upload is left."""
    blobs = blob_keys(stack.store, "blobs/")
    assert blobs == {f"{PREFIX}/blobs/sha256/{d[7:]}": len(body) for d, body in complete.items()}
    for d in complete:
        assert "sha256:" + hashlib.sha256(b"".join(stack.store.read(d[7:]))).hexdigest() == d
    assert multiparts(stack.store, "blobs/") == []
    assert blob_keys(stack.store, "uploads/") == {}


def push_chunked_alternating(stack: Stack, data: bytes, chunk: int) -> str:
    """POST on A, PATCH chunks alternately on B and A (the status agreeing on both), PUT the last."""
    clients = [stack.a.client(), stack.b.client()]
    try:
        r = clients[0].request("POST", f"/v2/{REPO}/blobs/uploads/")
        assert r.status == 202, r.body
        loc = r.header("Location")
        assert loc is not None and loc.startswith(f"/v2/{REPO}/blobs/uploads/")
        offsets = list(range(0, len(data), chunk))
        for n, start in enumerate(offsets[:-1]):
            c, other = clients[(n + 1) % 2], clients[n % 2]
            end = start + chunk
            r = c.request("PATCH", loc, data[start:end], {"Content-Range": f"{start}-{end - 1}"})
            assert r.status == 202 and r.header("Range") == f"0-{end - 1}", r.body
            loc = r.header("Location") or loc
            r = other.request("GET", loc)
            assert r.status == 204 and r.header("Range") == f"0-{end - 1}"
        last = offsets[-1]
        c = clients[len(offsets) % 2]
        r = c.request("PUT", f"{loc}?digest={sha(data)}", data[last:], {"Content-Range": f"{last}-{len(data) - 1}"})
        assert r.status == 201 and r.header("Docker-Content-Digest") == sha(data), r.body
    finally:
        for c in clients:
            c.close()
    return sha(data)


def test_any_instance_serves_any_request_and_a_killed_one_loses_nothing(env: Env, stack: Stack) -> None:
    ct = sealed(env, 40 * MiB)
    layer = push_chunked_alternating(stack, ct, 5 * MiB + 7)  # 9 chunks: A, B, A, ...
    a, b = stack.a.client(), stack.b.client()
    cfg = b.push_blob(REPO, b"{}")
    doc = image(cfg, [(SEALED_LAYER, layer, len(ct))], artifactType=ARTIFACT)
    r = a.put_manifest(REPO, "v1", doc)
    assert r.status == 201, r.body
    r = b.request("GET", f"/v2/{REPO}/manifests/v1", headers={"Accept": doc["mediaType"]})  # type: ignore[dict-item]
    assert r.status == 200 and json.loads(r.body) == doc
    for c in (a, b):
        r = c.request("HEAD", f"/v2/{REPO}/blobs/{layer}")
        assert r.status == 200 and r.header("Content-Length") == str(len(ct))
    a.close()

    # A pull from A, which is killed (SIGKILL) after the first 6 MiB ...
    conn = connect(stack.a)
    conn.request("GET", f"/v2/{REPO}/blobs/{layer}")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") == str(len(ct))
    got = bytearray(resp.read(6 * MiB))
    kill9(stack.a)
    try:
        while chunk := resp.read(1 * MiB):  # what the kernel still held, then the cut
            got += chunk
    except (http.client.IncompleteRead, ConnectionError, ssl.SSLError) as e:
        if isinstance(e, http.client.IncompleteRead):
            got += e.partial
    conn.close()
    assert 6 * MiB <= len(got) < len(ct), "the pull was not cut by the kill"
    assert bytes(got) == ct[: len(got)]
    # ... resumes on B with a Range request, and ends with the same digest.
    r = b.request("GET", f"/v2/{REPO}/blobs/{layer}", headers={"Range": f"bytes={len(got)}-"})
    assert r.status == 206 and r.header("Content-Range") == f"bytes {len(got)}-{len(ct) - 1}/{len(ct)}"
    assert sha(bytes(got) + r.body) == layer

    # Nothing lost, nothing partial; the killed instance restarts with no state of its own.
    nothing_partial(stack, {layer: ct, cfg: b"{}"})
    stack.a.start()
    a = stack.a.client()
    r = a.request("GET", f"/v2/{REPO}/manifests/v1", headers={"Accept": doc["mediaType"]})  # type: ignore[dict-item]
    assert r.status == 200 and json.loads(r.body) == doc
    assert sha(a.request("GET", f"/v2/{REPO}/blobs/{layer}").body) == layer
    assert b.request("GET", f"/v2/{REPO}/tags/list").json() == {"name": REPO, "tags": ["v1"]}
    a.close()
    b.close()


def test_an_upload_survives_the_instance_killed_mid_chunk(env: Env, stack: Stack) -> None:
    ct = sealed(env, 24 * MiB)
    first, cut = 4 * MiB, 16 * MiB
    b = stack.b.client()
    r = b.request("POST", f"/v2/{REPO}/blobs/uploads/")
    loc = r.header("Location")
    assert r.status == 202 and loc is not None
    r = b.request("PATCH", loc, ct[:first], {"Content-Range": f"0-{first - 1}"})
    assert r.status == 202
    # A takes the next chunk (12 MiB announced) and dies after 10 MiB of it reached S3 as a
    # multipart upload in progress: invisible, never part of the upload.
    conn = connect(stack.a)
    conn.putrequest("PATCH", loc)
    conn.putheader("Content-Range", f"{first}-{cut - 1}")
    conn.putheader("Content-Length", str(cut - first))
    conn.endheaders()
    conn.send(ct[first : cut - 2 * MiB])
    deadline = time.monotonic() + 60
    while not multiparts(stack.store, "uploads/") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert multiparts(stack.store, "uploads/"), "the chunk never reached the store"
    kill9(stack.a)
    conn.close()
    r = b.request("GET", loc)
    assert r.status == 204 and r.header("Range") == f"0-{first - 1}"  # only whole chunks count
    assert stack.store.size(hashlib.sha256(ct).hexdigest()) is None
    # The client resumes on B from the offset B reports, and finishes there.
    r = b.request("PATCH", loc, ct[first:cut], {"Content-Range": f"{first}-{cut - 1}"})
    assert r.status == 202 and r.header("Range") == f"0-{cut - 1}", r.body
    r = b.request("PUT", f"{loc}?digest={sha(ct)}", ct[cut:], {"Content-Range": f"{cut}-{len(ct) - 1}"})
    assert r.status == 201, r.body
    assert sha(b.request("GET", f"/v2/{REPO}/blobs/{sha(ct)}").body) == sha(ct)
    # Closing the upload also aborted the dead instance's multipart upload of the chunk.
    assert multiparts(stack.store, "uploads/") == []
    assert stack.store.sweep_tmp(time.time() + 1) == 0
    nothing_partial(stack, {sha(ct): ct})
    b.close()


def test_the_pushed_blobs_are_ciphertext_only(env: Env, stack: Stack) -> None:
    plain = os.urandom(1000) + b"tensor-name-model.layers.0.weight" + os.urandom(1000)
    src = env.work / "w.bin"
    src.write_bytes(plain)
    modelseal.seal(src, env.work / "w.sealed", key="test-kek", keys=env.svc)
    ct = (env.work / "w.sealed").read_bytes()
    b = stack.b.client()
    d = b.push_blob(REPO, ct)
    b.close()
    stored = b"".join(stack.store.read(d[7:]))
    assert stored == ct and b"tensor-name-model" not in stored
    c = Client(tls.client_context(stack.a.client_dir), stack.a.port)
    r = c.request("POST", f"/v2/{REPO}/blobs/uploads/?digest={sha(plain)}", plain)
    assert r.status == 403  # sealed-only: the plaintext is refused on every instance
    c.close()
    b = stack.b.client()
    assert b.request("HEAD", f"/v2/{REPO}/blobs/{sha(plain)}").status == 404  # nor visible on another
    b.close()


def test_a_wrong_bucket_stops_serve_at_start_with_one_line(env: Env, stack: Stack) -> None:
    args = [a.replace(f"s3://{BUCKET}/", "s3://no-such-bucket-x/") for a in stack.a.args]
    args[args.index("--listen") + 1] = f"127.0.0.1:{free_port()}"
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 15, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "the bucket does not exist" in lines[0], out.stderr
    assert "scaleout-secret" not in out.stderr and "127.0.0.1" not in out.stderr
