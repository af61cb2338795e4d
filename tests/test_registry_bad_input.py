"""Issue 12, section 6, the server side: each bad input against a real ``modelseal serve``
(sealed-only, mTLS) gets the right status, an OCI error body with a one-line reason, and
leaves nothing behind (no blob, manifest or tag becomes visible)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import modelseal
from modelseal.server import tls
from tests.conftest import Env
from tests.oci_helpers import EMPTY, SEALED_LAYER, Client, Resp, Server, image, running_server, sha

REPO = "team/model"


@pytest.fixture
def server(env: Env) -> Iterator[Server]:
    with running_server(env, "--body-timeout", "2") as s:
        yield s


@pytest.fixture
def c(server: Server) -> Iterator[Client]:
    client = server.client()
    yield client
    client.close()


def one_line_error(r: Resp, status: int, code: str) -> str:
    assert r.status == status, r.body
    doc = json.loads(r.body)
    err = doc["errors"][0]
    assert err["code"] == code
    assert err["message"] and "\n" not in err["message"]
    return str(err["message"])


def sealed(env: Env, size: int = 5000) -> bytes:
    src = env.work / f"w{size}.bin"
    src.write_bytes(os.urandom(size))
    modelseal.seal(src, env.work / f"w{size}.sealed", key="test-kek", keys=env.svc)
    return (env.work / f"w{size}.sealed").read_bytes()


def nothing_visible(c: Client, digest: str) -> None:
    assert c.request("HEAD", f"/v2/{REPO}/blobs/{digest}").status == 404


def test_malformed_and_oversized_manifests(c: Client) -> None:
    r = c.request("PUT", f"/v2/{REPO}/manifests/v1", b"{not json", {"Content-Type": image("", [])["mediaType"]})  # type: ignore[dict-item]
    one_line_error(r, 400, "MANIFEST_INVALID")
    r = c.request("PUT", f"/v2/{REPO}/manifests/v1", b'{"schemaVersion": 1}', {"Content-Type": "application/json"})
    one_line_error(r, 400, "MANIFEST_INVALID")
    big = b'{"schemaVersion":2,"x":"' + b"a" * (4 << 20) + b'"}'
    r = c.request(
        "PUT", f"/v2/{REPO}/manifests/v1", big, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
    )
    one_line_error(r, 413, "SIZE_INVALID")
    deep = b"[" * 10000 + b"]" * 10000
    one_line_error(c.request("PUT", f"/v2/{REPO}/manifests/v1", deep), 400, "MANIFEST_INVALID")
    assert c.request("GET", f"/v2/{REPO}/manifests/v1").status == 404


def test_digest_mismatch_leaves_no_blob(c: Client) -> None:
    data = os.urandom(1000)
    loc = c.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
    r = c.request("PUT", f"{loc}?digest={sha(b'something else')}", data)
    one_line_error(r, 400, "DIGEST_INVALID")
    nothing_visible(c, sha(b"something else"))
    nothing_visible(c, sha(data))
    one_line_error(c.request("GET", str(loc)), 404, "BLOB_UPLOAD_UNKNOWN")  # the upload is gone too
    one_line_error(c.request("PUT", f"{loc}?digest=sha256:nothex", b""), 400, "DIGEST_INVALID")


def test_upload_range_gaps_and_overlaps(env: Env, c: Client) -> None:
    blob = sealed(env)
    loc = c.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
    assert c.request("PATCH", str(loc), blob[:1000], {"Content-Range": "0-999"}).status == 202
    for rng, part in (("1500-1999", blob[1500:2000]), ("500-1499", blob[500:1500]), ("0-999", blob[:1000])):
        r = c.request("PATCH", str(loc), part, {"Content-Range": rng})
        one_line_error(r, 416, "BLOB_UPLOAD_INVALID")
        assert r.header("Range") == "0-999"
    one_line_error(c.request("PATCH", str(loc), b"x" * 10, {"Content-Range": "1000-1003"}), 400, "SIZE_INVALID")
    one_line_error(c.request("PATCH", str(loc), b"x", {"Content-Range": "1000-999"}), 416, "BLOB_UPLOAD_INVALID")
    one_line_error(c.request("PATCH", str(loc), b"x", {"Content-Range": "garbage"}), 400, "BLOB_UPLOAD_INVALID")
    assert c.request("GET", str(loc)).header("Range") == "0-999"
    r = c.request("PUT", f"{loc}?digest={sha(blob)}", blob[1000:], {"Content-Range": f"1000-{len(blob) - 1}"})
    assert r.status == 201
    assert c.request("GET", f"/v2/{REPO}/blobs/{sha(blob)}").body == blob


def raw_request(server: Server, request_line: bytes) -> bytes:
    ctx = tls.client_context(server.client_dir)
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.sendall(request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize(
    "name, status",
    [("team/../etc", 400), ("Team/Model", 400), ("a%00b", 400), ("a%2F..%2Fb", 400), ("a/" * 20 + "b", 400)],
)
def test_bad_repository_names(c: Client, name: str, status: int) -> None:
    r = c.request("GET", f"/v2/{name}/tags/list")
    one_line_error(r, status, "NAME_INVALID")
    r = c.request("POST", f"/v2/{name}/blobs/uploads/")
    one_line_error(r, status, "NAME_INVALID")


def test_a_raw_nul_in_the_path_is_refused(server: Server) -> None:
    out = raw_request(server, b"GET /v2/a\x00b/tags/list HTTP/1.1")
    assert out.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")  # aiohttp's parser refuses it before any handler


def test_plaintext_weights_and_unknown_types_are_refused(env: Env, c: Client, server: Server) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    plain = len(header).to_bytes(8, "little") + header + os.urandom(8)
    r = c.request("POST", f"/v2/{REPO}/blobs/uploads/?digest={sha(plain)}", plain)
    assert "safetensors" in one_line_error(r, 403, "DENIED")
    nothing_visible(c, sha(plain))
    import pickle

    pick = pickle.dumps({"weights": list(range(100))})
    r = c.request("POST", f"/v2/{REPO}/blobs/uploads/?digest={sha(pick)}", pick)
    assert "pickle" in one_line_error(r, 403, "DENIED")
    nothing_visible(c, sha(pick))
    # a sealed layer under an unknown media type, an OCI image config, a title annotation
    ct = sealed(env)
    layer = c.push_blob(REPO, ct)
    cfg = c.push_blob(REPO, b"{}")
    for doc, word in (
        (image(cfg, [("application/vnd.oci.image.layer.v1.tar", layer, len(ct))]), "unknown layer media type"),
        ({**image(cfg, [(SEALED_LAYER, layer, len(ct))]), "artifactType": "application/x-unknown"}, "artifactType"),
        (
            image(
                cfg,
                [(SEALED_LAYER, layer, len(ct))],
                annotations={"org.opencontainers.image.title": "model.safetensors"},
            ),
            "opaque",
        ),
    ):
        r = c.put_manifest(REPO, "v1", doc)
        assert word in one_line_error(r, 403, "DENIED")
    assert c.request("GET", f"/v2/{REPO}/tags/list").json() == {"name": REPO, "tags": []}
    good = image(cfg, [(SEALED_LAYER, layer, len(ct))], artifactType="application/vnd.modelseal.artifact.v1")
    assert c.put_manifest(REPO, "v1", good).status == 201
    assert good["config"] == {"mediaType": EMPTY, "digest": cfg, "size": 2}
    time.sleep(0)  # the refused blobs are invisible now; the GC removes their bytes later
    assert server.proc.poll() is None


def test_a_slow_client_is_cut_off(c: Client, server: Server) -> None:
    loc = c.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
    ctx = tls.client_context(server.client_dir)
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=20) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.sendall(
            f"PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nContent-Range: 0-99999\r\n\r\n".encode()
            + b"x" * 1000
        )
        start = time.monotonic()
        answer = s.recv(65536)  # the server answers 408 after the 2 s body timeout, then closes
        waited = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 1.0 < waited < 15
    assert c.request("GET", str(loc)).header("Range") == "0-0"  # nothing of the slow chunk was kept


def test_server_killed_mid_upload_then_the_upload_resumes(env: Env, server: Server) -> None:
    blob = sealed(env, 3 << 20)
    c = server.client()
    loc = c.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
    assert c.request("PATCH", str(loc), blob[: 1 << 20], {"Content-Range": f"0-{(1 << 20) - 1}"}).status == 202
    # the kill comes while the second chunk is in flight
    ctx = tls.client_context(server.client_dir)
    raw = ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=20), server_hostname="127.0.0.1")
    raw.sendall(
        f"PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 20}\r\nContent-Range: {1 << 20}-{(2 << 20) - 1}\r\n\r\n".encode()
        + blob[1 << 20 : (1 << 20) + 300_000]
    )
    time.sleep(0.5)
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    raw.close()
    c.close()
    server.start()
    c = server.client()
    r = c.request("GET", str(loc))
    assert r.status == 204 and r.header("Range") == f"0-{(1 << 20) - 1}"  # the committed chunk survived
    assert c.request("PATCH", str(loc), blob[1 << 20 :], {"Content-Range": f"{1 << 20}-{len(blob) - 1}"}).status == 202
    assert c.request("PUT", f"{loc}?digest={sha(blob)}", b"").status == 201
    assert c.request("GET", f"/v2/{REPO}/blobs/{sha(blob)}").body == blob
    c.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_the_disk_filling_during_an_upload_serves_no_partial_blob(env: Env, small_disk: Path) -> None:
    data = small_disk / "data"
    with running_server(env, data=data) as server:
        c = server.client()
        # A committed part becomes the blob by a hard link (no copy), so the disk fills while
        # a chunk is written: the first chunk fits on the 8 MiB disk, the second does not.
        big = sealed(env, 5 << 20)
        more = os.urandom(4 << 20)
        d = sha(big + more)
        loc = c.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
        assert c.request("PATCH", str(loc), big, {"Content-Range": f"0-{len(big) - 1}"}).status == 202
        r = c.request("PATCH", str(loc), more, {"Content-Range": f"{len(big)}-{len(big) + len(more) - 1}"})
        assert "disk is full" in one_line_error(r, 507, "UNKNOWN")
        assert c.request("GET", str(loc)).header("Range") == f"0-{len(big) - 1}"  # the failed chunk left nothing
        assert c.request("HEAD", f"/v2/{REPO}/blobs/{d}").status == 404
        assert c.request("DELETE", str(loc)).status == 204
        assert [p for p in (data / "blobs").rglob("*") if p.is_file()] == []  # no partial blob, no parts left
        huge = os.urandom(9 << 20)  # a chunk bigger than the disk: the part itself fails
        loc = c.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
        r = c.request("PATCH", str(loc), huge, {"Content-Range": f"0-{len(huge) - 1}"})
        assert "disk is full" in one_line_error(r, 507, "UNKNOWN")
        assert c.request("GET", str(loc)).header("Range") == "0-0"
        assert c.request("DELETE", str(loc)).status == 204
        small = sealed(env, 1000)  # the disk has room again: the registry works on
        assert c.request("POST", f"/v2/{REPO}/blobs/uploads/?digest={sha(small)}", small).status == 201
        assert c.request("GET", f"/v2/{REPO}/blobs/{sha(small)}").body == small
        c.close()
