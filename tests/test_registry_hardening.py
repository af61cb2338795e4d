"""The red-team findings of issue 12 on the registry server (notes/redteam-12.md), each
reproduced and shown closed: 1 (a known digest taken without its bytes), 3 (plaintext in
JSON "signatures" and configs), 5 (slow bodies starving the pool), 7 (a sealed header over
plaintext), 8 (manifest bodies unbounded per identity), 9 (upload ids as bearer tokens),
and the sealed-only annotation allowlist. Service-level tests run on SQLite and a blob
folder; the HTTP ones against a real ``modelseal serve --workers 1``."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import modelseal
from modelseal.errors import DigestMismatch, RegistryRefused
from modelseal.format.header import parse_core
from modelseal.registry import layout, policy
from modelseal.registry.localblobs import LocalBlobs
from modelseal.registry.service import Registry
from modelseal.registry.sqlmeta import open_meta
from modelseal.server import tls
from modelseal.signing import oms
from modelseal.signing.signers import P256, generate
from tests.conftest import Env
from tests.oci_helpers import EMPTY, SEALED_LAYER, Client, Server, image, make_dir, running_server, sha

ME = "spiffe://example.org/prod/service/trainer"
MALLORY = "spiffe://example.org/prod/service/attacker"
REPO = "team/model"
EMPTY_D = layout.EMPTY_CONFIG.digest


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    r = Registry(open_meta(None, tmp_path / "data"), LocalBlobs(tmp_path / "blobs"), policy.SEALED_ONLY)
    yield r
    r.close()


def seal_bytes(env: Env, plaintext: bytes, name: str = "w") -> bytes:
    (env.work / f"{name}.bin").write_bytes(plaintext)
    modelseal.seal(env.work / f"{name}.bin", env.work / f"{name}.sealed", key="test-kek", keys=env.svc)
    return (env.work / f"{name}.sealed").read_bytes()


def push(reg: Registry, data: bytes, repo: str = REPO, owner: str = ME) -> str:
    up = reg.start_upload(repo, owner)
    return reg.finish(repo, up, owner, sha(data), None, [data], len(data)).digest


def refused(fn: object, *args: object, status: int = 403, word: str = "") -> RegistryRefused:
    with pytest.raises(RegistryRefused) as e:
        fn(*args)  # type: ignore[operator]
    assert e.value.status == status, e.value
    assert word in str(e.value)
    return e.value


# -- 1: a known digest is never taken without its bytes ---------------------------------------------


def test_an_upload_claiming_a_stored_digest_is_hashed(env: Env, reg: Registry) -> None:
    secret = seal_bytes(env, os.urandom(30_000))
    d = push(reg, secret, "victim/private")
    for body in (b"", b"garbage-not-the-blob"):  # an empty PUT, then wrong bytes, under the victim's digest
        up = reg.start_upload("attacker/repo", MALLORY)
        e = refused(reg.finish, "attacker/repo", up, MALLORY, d, None, [body], len(body), status=400)
        assert e.code == "DIGEST_INVALID"
        refused(reg.blob, "attacker/repo", d, status=404)  # nothing was linked
    assert b"".join(reg.read_blob(reg.blob("victim/private", d))) == secret  # the victim's blob is intact
    assert push(reg, secret, "attacker/repo", MALLORY) == d  # the real bytes still dedup


def test_local_assemble_hashes_parts_when_the_blob_exists(tmp_path: Path) -> None:
    store = LocalBlobs(tmp_path)
    data = b"the real bytes"
    key = hashlib.sha256(data).hexdigest()
    for upload, body in (("a" * 32, data), ("b" * 32, b"other bytes")):
        w = store.part_writer(upload, 0)
        w.write(body)
        w.commit()
    assert store.assemble("a" * 32, (0,), key) == len(data)
    with pytest.raises(DigestMismatch):
        store.assemble("b" * 32, (0,), key)
    with pytest.raises(DigestMismatch):
        store.assemble("b" * 32, (), key)  # no part at all
    assert store.assemble("a" * 32, (0,), key) == len(data)  # the same bytes again: accepted, not copied
    assert b"".join(store.read(key)) == data


# -- 3: only real signature documents and the exact empty config ------------------------------------


def signature_file(env: Env) -> bytes:
    seal_bytes(env, b"weights" * 100, "s")
    modelseal.sign(env.work / "s.sealed", generate(), name="m", keys=env.svc)
    return (env.work / "s.sealed.msig").read_bytes()


def with_entry_id(doc: dict[str, object]) -> bytes:
    """``doc`` with each entry's id recomputed (what ``Entry.from_json`` checks)."""
    for e in doc["signatures"]:  # type: ignore[attr-defined]
        keyid = e["envelope"]["signatures"][0].get("keyid", "")
        payload = base64.b64decode(e["envelope"]["payload"])
        e["id"] = hashlib.sha256(keyid.encode() + b"\x00" + payload).hexdigest()
    return json.dumps(doc).encode()


def test_signature_blobs_must_be_what_they_claim(env: Env) -> None:
    real = signature_file(env)
    assert policy.classify(real, len(real)) == policy.SIGNATURE
    stuffed = json.loads(real)
    stuffed["model.safetensors"] = base64.b64encode(b"plaintext weights" * 100).decode()
    data = json.dumps(stuffed).encode()
    refused(policy.classify, data, len(data), word="unknown top-level")
    # a statement that parses but carries more than modelseal signs (an extra predicate field)
    doc = json.loads(real)
    env_ = doc["signatures"][0]["envelope"]
    st = json.loads(base64.b64decode(env_["payload"]))
    st["predicate"]["tensors"] = ["model.layers.0.self_attn.q_proj.weight"]
    env_["payload"] = base64.b64encode(json.dumps(st, sort_keys=True, separators=(",", ":")).encode()).decode()
    data = with_entry_id(doc)
    refused(policy.classify, data, len(data), word="predicate has unknown fields")
    # the same statement, re-encoded with white space: not the canonical bytes modelseal signs
    doc = json.loads(real)
    env_ = doc["signatures"][0]["envelope"]
    env_["payload"] = base64.b64encode(json.dumps(json.loads(base64.b64decode(env_["payload"])), indent=4).encode())
    env_["payload"] = env_["payload"].decode()
    data = with_entry_id(doc)
    refused(policy.classify, data, len(data), word="not one modelseal writes")
    # the red team's "signature": any JSON object with a signature mediaType
    fake = json.dumps(
        {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "w": base64.b64encode(b"x" * 5000).decode()}
    ).encode()
    refused(policy.classify, fake, len(fake), word="not one")


def test_sigstore_bundles_must_have_the_bundle_shape() -> None:
    bundle = oms.bundle_for_file(generate(P256), "m", "ab" * 32)
    assert policy.classify(bundle, len(bundle)) == policy.SIGSTORE
    doc = json.loads(bundle)
    for broken in (
        {**doc, "extra": "plaintext"},
        {k: v for k, v in doc.items() if k != "dsseEnvelope"},
        {**doc, "messageSignature": {"signature": "AAAA"}},  # both kinds of content
        {**doc, "dsseEnvelope": {**doc["dsseEnvelope"], "payload": "A" * (300 << 10)}},  # over its bound
        {**doc, "verificationMaterial": {"publicKey": {"hint": "x", "note": "extra"}}},
    ):
        data = json.dumps(broken).encode()
        refused(policy.classify, data, len(data), word="not one")


def safetensors_header() -> bytes:
    names = {
        f"model.layers.{i}.mlp.up_proj.weight": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]} for i in range(4)
    }
    return json.dumps(names).encode()


def test_the_config_and_empty_layers_are_exactly_the_empty_json(env: Env, reg: Registry) -> None:
    header = safetensors_header()
    refused(push, reg, header, word="refused a blob")  # no JSON blob but {} is stored at all
    cfg, layer = push(reg, b"{}"), push(reg, seal_bytes(env, os.urandom(5000)))
    ok = image(cfg, [(SEALED_LAYER, layer, 1)], artifactType=policy.ARTIFACT_TYPE)
    assert reg.put_manifest(REPO, "ok", json.dumps(ok).encode(), policy.MANIFEST_TYPE)[0]
    # the policy alone, as if the header had been stored under a kind the old code gave it
    kinds = {sha(header): policy.JSON_BLOB, layer: policy.SEALED}
    as_config = image(sha(header), [(SEALED_LAYER, layer, 1)])
    refused(policy.check_manifest, as_config, policy.MANIFEST_TYPE, kinds, word="empty config")
    as_layer = image(EMPTY_D, [(EMPTY, sha(header), len(header))])
    kinds[EMPTY_D] = policy.JSON_BLOB
    refused(policy.check_manifest, as_layer, policy.MANIFEST_TYPE, kinds, word="empty JSON blob")
    wrong_size = image(EMPTY_D, [])
    wrong_size["config"]["size"] = 3  # type: ignore[index]
    refused(policy.check_manifest, wrong_size, policy.MANIFEST_TYPE, kinds, word="empty config")


# -- 7: a sealed header over plaintext ---------------------------------------------------------------


def splice(sealed: bytes, body: bytes) -> bytes:
    """A genuine header with ``body`` (padded or cut to length) where its ciphertext was."""
    start = parse_core(sealed[: policy.HEAD_BYTES]).payload_offset
    room = len(sealed) - start
    return sealed[:start] + (body * (room // len(body) + 1))[:room]


def plaintext_safetensors(n: int) -> bytes:
    header = safetensors_header()
    weights = struct.pack(f"<{n // 2}e", *((i % 97) / 50 - 1 for i in range(n // 2)))
    return struct.pack("<Q", len(header)) + header + weights


def test_a_genuine_header_over_plaintext_is_refused(env: Env, reg: Registry) -> None:
    for size in (2000, 200_000, 3 << 20):  # whole-payload sample, and 16 windows
        sealed = seal_bytes(env, os.urandom(size), f"w{size}")
        forged = splice(sealed, plaintext_safetensors(size))
        assert policy.classify(forged[: policy.HEAD_BYTES], len(forged)) == policy.SEALED  # the header is real
        refused(push, reg, forged, word="not ciphertext")
        refused(reg.blob, REPO, sha(forged), status=404)
        for filler in (b"\0", b"model.layers.0.weight "):  # a broken sealer: zeros, or text
            bad = splice(sealed, filler)
            refused(push, reg, bad, word="not ciphertext")


def test_real_sealed_files_always_pass(env: Env, reg: Registry) -> None:
    bodies = [os.urandom(1), os.urandom(50_000), b"\0" * 300_000, plaintext_safetensors(2 << 20), b"a" * 70]
    for i, plain in enumerate(bodies):
        assert push(reg, seal_bytes(env, plain, f"p{i}"))


def test_the_ciphertext_test_never_refuses_random_bytes() -> None:
    sizes = [64, 100, 1000, 4096, 16 * 1024, 40_000, 64 * 1024]
    for i in range(300):
        n = sizes[i % len(sizes)]
        samples = [os.urandom(n)] if n < 64 * 1024 else [os.urandom(4096) for _ in range(16)]
        assert policy.ciphertext_refusal(samples) is None
    assert policy.ciphertext_refusal([b"x" * 63]) is None  # too small to judge: never refused on so little
    assert policy.ciphertext_refusal([bytes(range(256)) * 15 + b"\0" * 40_000]) is not None


def test_cipher_windows_cover_the_payload(env: Env) -> None:
    sealed = seal_bytes(env, os.urandom(1 << 20))
    start = parse_core(sealed[: policy.HEAD_BYTES]).payload_offset
    windows = policy.cipher_windows(sealed[: policy.HEAD_BYTES], len(sealed))
    assert len(windows) == 16 and all(n == 4096 for _, n in windows)
    assert windows[0][0] == start and windows[-1][0] + 4096 == len(sealed)
    assert all(a + 4096 <= b for (a, _), (b, _) in itertools.pairwise(windows))  # disjoint, in order
    small = seal_bytes(env, os.urandom(1000), "small")
    (only,) = policy.cipher_windows(small[: policy.HEAD_BYTES], len(small))
    assert only[0] + only[1] == len(small)
    assert policy.cipher_windows(sealed[: policy.HEAD_BYTES], len(sealed) + 1) == []  # the size must fit the layout


# -- the annotation allowlist ------------------------------------------------------------------------


def test_only_the_annotations_modelseal_writes_pass(env: Env) -> None:
    sig_d = "sha256:" + "2" * 64
    layers = [
        layout.layer_for("manifest.mseal", "sha256:" + "1" * 64, 10),
        layout.layer_for("blobs/" + "ab" * 16, "sha256:" + "3" * 64, 10),
    ]
    folder = json.loads(layout.artifact_manifest(layers))
    kinds = {EMPTY_D: policy.JSON_BLOB, sig_d: policy.SIGNATURE}
    kinds.update({layer.descriptor.digest: policy.SEALED for layer in layers})
    policy.check_manifest(folder, policy.MANIFEST_TYPE, kinds)
    subject = layout.Descriptor(layout.IMAGE_MANIFEST, "sha256:" + "4" * 64, 100)
    sig = layout.signature_manifest(layout.Descriptor(layout.SIGNATURES, sig_d, 5), subject, "2026-12-02T03:04:05Z")
    policy.check_manifest(json.loads(sig), policy.MANIFEST_TYPE, kinds)
    index = {
        "schemaVersion": 2,
        "mediaType": policy.INDEX_TYPE,
        "manifests": [
            {
                "mediaType": policy.MANIFEST_TYPE,
                "digest": "sha256:" + "5" * 64,
                "size": 10,
                "annotations": {"org.opencontainers.image.created": "2026-12-02T03:04:05Z"},
            }
        ],
    }
    policy.check_manifest(index, policy.INDEX_TYPE, kinds)
    bad_path = json.loads(layout.artifact_manifest(layers))
    bad_path["layers"][1]["annotations"]["dev.modelseal.path"] = "model-00001-of-00002.safetensors"
    bad_time = json.loads(sig)
    bad_time["annotations"]["org.opencontainers.image.created"] = "tokenizer.json (2 files)"
    extra = json.loads(sig)
    extra["annotations"]["org.opencontainers.image.description"] = "a digest: " + "ab" * 32
    on_config = json.loads(sig)
    on_config["config"]["annotations"] = {"dev.modelseal.path": "manifest.mseal"}
    for doc in (bad_path, bad_time, extra, on_config):
        refused(policy.check_manifest, doc, policy.MANIFEST_TYPE, kinds, word="annotation")


def test_annotations_are_free_under_any(tmp_path: Path) -> None:
    reg = Registry(open_meta(None, tmp_path / "data"), LocalBlobs(tmp_path / "blobs"), policy.ANY)
    cfg = push(reg, b"free config")
    doc = image(cfg, [], annotations={"org.opencontainers.image.title": "model.safetensors"})
    assert reg.put_manifest(REPO, "v1", json.dumps(doc).encode(), policy.MANIFEST_TYPE)[0]
    reg.close()


# -- 9: an upload belongs to the identity that started it ---------------------------------------------


def test_another_identity_cannot_touch_an_upload(reg: Registry) -> None:
    up = reg.start_upload(REPO, ME)
    reg.append(REPO, up, ME, 0, [b"abc"], 3)
    for call in (
        lambda: reg.upload_status(REPO, up, MALLORY),
        lambda: reg.append(REPO, up, MALLORY, 3, [b"def"], 3),
        lambda: reg.finish(REPO, up, MALLORY, sha(b"abc")),
        lambda: reg.cancel(REPO, up, MALLORY),
        lambda: reg.upload_status(REPO, up, ME + "x"),  # exact strings: no prefix match
        lambda: reg.upload_status(REPO, up, ME.upper()),
    ):
        e = refused(call, status=404)
        assert e.code == "BLOB_UPLOAD_UNKNOWN"
    assert reg.upload_status(REPO, up, ME).received == 3  # untouched


# -- over HTTP: ownership, the minimum rate, the pool and the body slots ------------------------------


@pytest.fixture
def server(env: Env) -> Iterator[Server]:
    with running_server(env, "--workers", "1") as s:
        yield s


@pytest.fixture
def slow_server(env: Env) -> Iterator[Server]:
    with running_server(env, "--workers", "1", "--body-timeout", "2") as s:
        yield s


def client_as(server: Server, name: str) -> Client:
    folder = make_dir(server.env, server.env.work / f"id-{name}", "service", name)
    return Client(tls.client_context(folder), server.port)


def raw_request(server: Server, name: str, head: str, first: bytes) -> ssl.SSLSocket:
    """A TLS connection as identity ``name`` that sent ``head`` and the first body bytes."""
    folder = server.env.work / f"id-{name}"
    if not folder.exists():
        make_dir(server.env, folder, "service", name)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s = tls.client_context(folder).wrap_socket(raw, server_hostname="127.0.0.1")
    s.sendall(head.encode() + first)
    return s


class Trickle:
    """Send one byte to every socket every ``every`` seconds until stopped."""

    def __init__(self, socks: list[ssl.SSLSocket], every: float) -> None:
        self.socks, self.every = socks, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.send(b"x")

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def answer(s: ssl.SSLSocket, timeout: float) -> bytes:
    s.settimeout(timeout)
    try:
        return s.recv(4096)
    except (TimeoutError, ssl.SSLError, OSError):
        return b""


def test_uploads_belong_to_their_identity_over_http(env: Env, server: Server) -> None:
    alice, mallory = server.client(), client_as(server, "attacker")
    blob = seal_bytes(env, os.urandom(5000))
    loc = alice.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
    assert loc is not None
    assert alice.request("PATCH", loc, blob[:100], {"Content-Range": "0-99"}).status == 202
    for method, path, body, headers in (
        ("GET", loc, None, {}),
        ("PATCH", loc, b"evil", {"Content-Range": "100-103"}),
        ("PATCH", loc, b"evil", {}),
        ("PUT", f"{loc}?digest={sha(blob)}", blob[100:], {}),
        ("PUT", f"{loc}?digest={sha(blob[:100])}", b"", {"Content-Length": "0"}),
        ("DELETE", loc, None, {}),
    ):
        r = mallory.request(method, path, body, headers)
        assert r.status == 404 and r.code() == "BLOB_UPLOAD_UNKNOWN", (method, r.status, r.body)
    r = alice.request("GET", loc)
    assert r.status == 204 and r.header("Range") == "0-99"
    assert alice.request("PUT", f"{loc}?digest={sha(blob)}", blob[100:], {}).status == 201
    alice.close()
    mallory.close()


def test_a_known_digest_over_http_needs_its_bytes(env: Env, server: Server) -> None:
    victim, attacker = server.client(), client_as(server, "attacker")
    secret = seal_bytes(env, os.urandom(30_000))
    d = victim.push_blob("victim/private", secret)
    loc = attacker.request("POST", "/v2/attacker/repo/blobs/uploads/").header("Location")
    r = attacker.request("PUT", f"{loc}?digest={d}", b"", {"Content-Length": "0"})
    assert r.status == 400 and r.code() == "DIGEST_INVALID"
    assert attacker.request("GET", f"/v2/attacker/repo/blobs/{d}").status == 404
    victim.close()
    attacker.close()


def test_plaintext_in_signatures_configs_and_forged_sealed_blobs_over_http(env: Env, server: Server) -> None:
    c = server.client()
    fake = json.dumps(
        {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "w": base64.b64encode(b"x" * 9000).decode()}
    ).encode()
    forged = splice(seal_bytes(env, os.urandom(100_000)), plaintext_safetensors(100_000))
    for blob in (fake, safetensors_header(), forged):
        loc = c.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
        r = c.request("PUT", f"{loc}?digest={sha(blob)}", blob, {})
        assert r.status == 403 and r.code() == "DENIED", r.body
        assert c.request("HEAD", f"/v2/{REPO}/blobs/{sha(blob)}").status == 404
    c.close()


def test_a_trickling_body_is_cut_off(slow_server: Server) -> None:
    c = slow_server.client()
    loc = c.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
    s = raw_request(slow_server, "trainer", f"PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n", b"x")
    manifest = raw_request(
        slow_server,
        "trickler",
        f"PUT /v2/{REPO}/manifests/v1 HTTP/1.1\r\nHost: x\r\nContent-Type: {policy.MANIFEST_TYPE}\r\n"
        "Content-Length: 100000\r\n\r\n",
        b"{",
    )
    trickle = Trickle([s, manifest], 0.5)  # a byte every 0.5 s: never silent for the 2 s body timeout
    try:
        got = answer(s, 15), answer(manifest, 15)
    finally:
        trickle.close()
    assert got[0].startswith(b"HTTP/1.1 408"), got[0][:200]
    assert got[1].startswith(b"HTTP/1.1 408"), got[1][:200]
    assert b"slower than" in got[0]
    c.close()


def test_trickling_uploads_leave_threads_for_everyone_else(server: Server) -> None:
    owners = [f"trickle{i}" for i in range(4)]
    clients = {o: client_as(server, o) for o in owners}
    socks = []
    for o in owners:  # 4 identities x 8 bodies = 32, the pool's size
        for _ in range(8):
            loc = clients[o].request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
            socks.append(
                raw_request(server, o, f"PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n", b"x")
            )
    trickle = Trickle(socks, 1.0)
    try:
        time.sleep(2)
        other = server.client()
        other.conn = None
        t0 = time.monotonic()
        r = other.request("GET", f"/v2/{REPO}/tags/list")  # a pool thread is free for it
        assert r.status in (200, 404) and time.monotonic() - t0 < 10
        refusals = [a for a in (answer(s, 0.2) for s in socks) if a]
        assert len(refusals) == 32 - 24 and all(a.startswith(b"HTTP/1.1 429") for a in refusals), refusals[:1]
        assert all(b"Retry-After: 1" in a for a in refusals)
        other.close()
    finally:
        trickle.close()
    for c in clients.values():
        c.close()


def test_manifest_bodies_take_the_identitys_body_slots(server: Server) -> None:
    put = f"PUT /v2/{REPO}/manifests/t HTTP/1.1\r\nHost: x\r\nContent-Type: {policy.MANIFEST_TYPE}\r\n"
    stalled = [raw_request(server, "manifester", put + "Content-Length: 4000000\r\n\r\n", b"{") for _ in range(8)]
    try:
        time.sleep(1.5)
        c = client_as(server, "manifester")
        r = c.put_manifest(REPO, "v2", image(EMPTY_D, []))
        assert r.status == 429 and r.code() == "TOOMANYREQUESTS" and r.header("Retry-After") == "1"
        loc = c.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
        r = c.request("PATCH", str(loc), b"abc", {"Content-Range": "0-2"})
        assert r.status == 429  # the same slots as blob bodies
        assert client_as(server, "someone-else").request("GET", f"/v2/{REPO}/tags/list").status == 200
        c.close()
    finally:
        for s in stalled:
            s.close()
