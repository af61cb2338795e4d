"""The OCI distribution API of ``modelseal serve --content any`` over real mTLS HTTP
(docs/registry.md): every endpoint end-2 .. end-14, with the statuses and headers the
distribution-spec v1.1 and its conformance suite expect."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from tests.conftest import Env
from tests.oci_helpers import INDEX, MANIFEST, Client, Server, image, running_server, sha

REPO = "conformance/repo1"
REPO2 = "conformance/repo2"


@pytest.fixture
def server(env: Env) -> Iterator[Server]:
    with running_server(env, "--content", "any") as s:
        yield s


@pytest.fixture
def c(server: Server) -> Iterator[Client]:
    client = server.client()
    yield client
    client.close()


def test_base_and_empty_repository(c: Client) -> None:
    r = c.request("GET", "/v2/")
    assert r.status == 200 and r.header("Docker-Distribution-API-Version") == "registry/2.0"
    assert c.request("GET", f"/v2/{REPO}/tags/list").status == 404
    r = c.request("GET", f"/v2/{REPO}/referrers/{sha(b'nothing')}")
    assert r.status == 200 and r.header("Content-Type") == INDEX
    assert r.json() == {"schemaVersion": 2, "mediaType": INDEX, "manifests": []}
    r = c.request("GET", f"/v2/{REPO}/blobs/{sha(b'missing')}")
    assert r.status == 404 and r.code() == "BLOB_UNKNOWN"
    r = c.request("GET", f"/v2/{REPO}/manifests/missing-tag")
    assert r.status == 404 and r.code() == "MANIFEST_UNKNOWN"


def test_blob_push_variants_head_get_delete(c: Client) -> None:
    # post only (end-4b)
    data = os.urandom(512)
    r = c.request("POST", f"/v2/{REPO}/blobs/uploads/?digest={sha(data)}", data, {"Content-Length": "512"})
    assert r.status == 201 and r.header("Location") == f"/v2/{REPO}/blobs/{sha(data)}"
    assert r.header("Docker-Content-Digest") == sha(data)
    # post + put (end-4a, end-6)
    d2 = c.push_blob(REPO, b"post+put")
    # chunked (end-5) with status (end-13), then a closing PUT with the last chunk
    blob = os.urandom(3000)
    r = c.request("POST", f"/v2/{REPO}/blobs/uploads/", b"", {"Content-Length": "0"})
    assert r.status == 202
    loc = r.header("Location")
    assert loc is not None and loc.startswith(f"/v2/{REPO}/blobs/uploads/")
    r = c.request("PATCH", loc, blob[:1000], {"Content-Range": "0-999", "Content-Type": "application/octet-stream"})
    assert r.status == 202 and r.header("Range") == "0-999"
    loc = r.header("Location")
    assert loc is not None
    r = c.request("PATCH", loc, blob[1000:2000], {"Content-Range": "1000-1999"})
    assert r.status == 202 and r.header("Range") == "0-1999"
    r = c.request("GET", loc)
    assert r.status == 204 and r.header("Range") == "0-1999" and r.header("Location") == loc
    r = c.request("PUT", f"{loc}?digest={sha(blob)}", blob[2000:], {"Content-Range": "2000-2999"})
    assert r.status == 201 and r.header("Docker-Content-Digest") == sha(blob)
    # stream: one PATCH without Content-Range, then an empty PUT
    stream = os.urandom(4096)
    loc = c.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
    assert loc is not None
    r = c.request("PATCH", loc, stream)
    assert r.status == 202 and r.header("Range") == "0-4095"
    r = c.request("PUT", f"{r.header('Location')}?digest={sha(stream)}", b"", {"Content-Length": "0"})
    assert r.status == 201
    for d, body in ((sha(data), data), (d2, b"post+put"), (sha(blob), blob), (sha(stream), stream)):
        r = c.request("HEAD", f"/v2/{REPO}/blobs/{d}")
        assert r.status == 200 and r.header("Content-Length") == str(len(body)) and r.body == b""
        assert r.header("Docker-Content-Digest") == d
        r = c.request("GET", f"/v2/{REPO}/blobs/{d}")
        assert r.status == 200 and r.body == body
    # delete (end-10) is immediate
    assert c.request("DELETE", f"/v2/{REPO}/blobs/{d2}").status == 202
    assert c.request("HEAD", f"/v2/{REPO}/blobs/{d2}").status == 404
    assert c.request("DELETE", f"/v2/{REPO}/blobs/{d2}").status == 404
    # empty blob and empty JSON
    for body in (b"", b"{}"):
        d = c.push_blob(REPO, body)
        r = c.request("GET", f"/v2/{REPO}/blobs/{d}")
        assert r.status == 200 and r.body == body


def test_ranges(c: Client) -> None:
    body = os.urandom(2048)
    d = c.push_blob(REPO, body)
    cases = {
        "bytes=500-1499": (206, body[500:1500], "bytes 500-1499/2048"),
        "bytes=500-": (206, body[500:], "bytes 500-2047/2048"),
        "bytes=-500": (206, body[-500:], "bytes 1548-2047/2048"),
        "bytes=2000-5000": (206, body[2000:], "bytes 2000-2047/2048"),
    }
    for rng, (status, want, crange) in cases.items():
        r = c.request("GET", f"/v2/{REPO}/blobs/{d}", headers={"Range": rng})
        assert (r.status, r.body, r.header("Content-Range")) == (status, want, crange), rng
        assert r.header("Content-Length") == str(len(want))
    for rng in ("bytes=500-0", "bytes=5000-10000"):
        r = c.request("GET", f"/v2/{REPO}/blobs/{d}", headers={"Range": rng})
        assert r.status == 416 and r.header("Content-Range") == "bytes */2048", rng


def test_chunk_out_of_order_is_416_and_resumable(c: Client) -> None:
    blob = os.urandom(3000)
    loc = c.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
    assert loc is not None
    r = c.request("PATCH", loc, blob[1000:2000], {"Content-Range": "1000-1999"})
    assert r.status == 416 and r.code() == "BLOB_UPLOAD_INVALID"
    r = c.request("GET", loc)
    assert r.status == 204 and r.header("Range") == "0-0"
    assert c.request("PATCH", loc, blob[:1000], {"Content-Range": "0-999"}).status == 202
    r = c.request("PUT", f"{loc}?digest={sha(blob)}", blob[2000:], {"Content-Range": "2000-2999"})
    assert r.status == 416  # a gap: 1000-1999 was never sent
    r = c.request("PATCH", loc, blob[500:1500], {"Content-Range": "500-1499"})
    assert r.status == 416  # an overlap
    assert c.request("PATCH", loc, blob[1000:2000], {"Content-Range": "1000-1999"}).status == 202
    r = c.request("PUT", f"{loc}?digest={sha(blob)}", blob[2000:], {"Content-Range": "2000-2999"})
    assert r.status == 201
    assert c.request("GET", f"/v2/{REPO}/blobs/{sha(blob)}").body == blob


def test_cancel_bad_digest_and_mounts(c: Client) -> None:
    loc = c.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
    assert loc is not None
    assert c.request("DELETE", loc).status == 204
    assert c.request("GET", loc).status == 404
    data = os.urandom(700)
    loc = c.request("POST", f"/v2/{REPO}/blobs/uploads/").header("Location")
    r = c.request("PUT", f"{loc}?digest={sha(data)}", data + b"oh no")
    assert r.status == 400 and r.code() == "DIGEST_INVALID"
    assert c.request("HEAD", f"/v2/{REPO}/blobs/{sha(data)}").status == 404
    r = c.request("POST", f"/v2/{REPO}/blobs/uploads/?digest={sha(data)}", data + b"x")
    assert r.status == 400 and r.code() == "DIGEST_INVALID"
    # mount from another repository (end-11), anonymous mount, and the 202 fallback
    d = c.push_blob(REPO2, data)
    r = c.request("POST", f"/v2/{REPO}/blobs/uploads/?mount={d}&from={REPO2}")
    assert r.status == 201 and r.header("Location") == f"/v2/{REPO}/blobs/{d}"
    assert c.request("GET", f"/v2/{REPO}/blobs/{d}").body == data
    r = c.request("POST", f"/v2/other/blobs/uploads/?mount={d}")
    assert r.status == 201
    r = c.request("POST", f"/v2/{REPO}/blobs/uploads/?mount={sha(b'never')}&from={REPO2}")
    assert r.status == 202 and r.header("Location") is not None


def test_manifests_tags_referrers_delete(c: Client) -> None:
    cfg = c.push_blob(REPO, b"{}")
    layer = c.push_blob(REPO, b"layer-bytes")
    doc = image(cfg, [("application/vnd.oci.image.layer.v1.tar", layer, 11)])
    r = c.put_manifest(REPO, "v1", doc)
    assert r.status == 201, r.body
    body = json.dumps(doc).encode()
    md = sha(body)
    assert r.header("Location") == f"/v2/{REPO}/manifests/{md}" and r.header("Docker-Content-Digest") == md
    for ref in ("v1", md):
        r = c.request("GET", f"/v2/{REPO}/manifests/{ref}", headers={"Accept": MANIFEST})
        assert r.status == 200 and r.body == body and r.header("Content-Type") == MANIFEST
        assert r.header("Docker-Content-Digest") == md
        r = c.request("HEAD", f"/v2/{REPO}/manifests/{ref}")
        assert r.status == 200 and r.header("Content-Length") == str(len(body)) and r.body == b""
    # a manifest naming a blob the repository lacks
    r = c.put_manifest(REPO, "bad", image(cfg, [("application/vnd.oci.image.layer.v1.tar", sha(b"absent"), 6)]))
    assert r.status == 400 and r.code() == "MANIFEST_BLOB_UNKNOWN"
    # push by digest with tag parameters (end-7b), and a wrong digest
    doc2 = image(cfg, [], annotations={"x": "2"})
    b2 = json.dumps(doc2).encode()
    r = c.request("PUT", f"/v2/{REPO}/manifests/{sha(b2)}?tag=a&tag=b", b2, {"Content-Type": MANIFEST})
    assert r.status == 201 and r.header("OCI-Tag") == "a, b"
    r = c.request("PUT", f"/v2/{REPO}/manifests/{sha(b2)}", b2 + b"  ", {"Content-Type": MANIFEST})
    assert r.status == 400 and r.code() == "DIGEST_INVALID"
    r = c.request("PUT", f"/v2/{REPO}/manifests/sha256:baddigeststring", b2, {"Content-Type": MANIFEST})
    assert r.status == 400
    # tags: sorted, paginated with Link
    for t in ("c", "d", "e"):
        assert c.put_manifest(REPO, t, doc).status == 201
    r = c.request("GET", f"/v2/{REPO}/tags/list")
    assert r.json() == {"name": REPO, "tags": ["a", "b", "c", "d", "e", "v1"]}
    r = c.request("GET", f"/v2/{REPO}/tags/list?n=2")
    assert r.json() == {"name": REPO, "tags": ["a", "b"]}
    assert r.header("Link") == f'</v2/{REPO}/tags/list?n=2&last=b>; rel="next"'
    r = c.request("GET", f"/v2/{REPO}/tags/list?n=2&last=b")
    assert r.json()["tags"] == ["c", "d"]  # type: ignore[index]
    assert c.request("GET", f"/v2/{REPO}/tags/list?last=d").json()["tags"] == ["e", "v1"]  # type: ignore[index]
    r = c.request("GET", f"/v2/{REPO}/tags/list?n=0")
    assert r.json()["tags"] == [] and r.header("Link") is None  # type: ignore[index]
    # referrers: a subject that does not exist yet is accepted (OCI-Subject), filtered by artifactType
    subject = {"mediaType": MANIFEST, "digest": md, "size": len(body)}
    sig = image(cfg, [], artifactType="application/vnd.example.sig", subject=subject, annotations={"k": "v"})
    r = c.put_manifest(REPO, sha(json.dumps(sig).encode()), sig)
    assert r.status == 201 and r.header("OCI-Subject") == md
    sbom = image(cfg, [], subject=subject)
    sbom["config"] = {"mediaType": "application/vnd.example.sbom", "digest": cfg, "size": 2}
    assert c.put_manifest(REPO, sha(json.dumps(sbom).encode()), sbom).status == 201
    r = c.request("GET", f"/v2/{REPO}/referrers/{md}")
    found = {m["artifactType"]: m for m in r.json()["manifests"]}  # type: ignore[index]
    assert set(found) == {"application/vnd.example.sig", "application/vnd.example.sbom"}
    assert found["application/vnd.example.sig"]["annotations"] == {"k": "v"}
    r = c.request("GET", f"/v2/{REPO}/referrers/{md}?artifactType=application/vnd.example.sbom")
    assert r.header("OCI-Filters-Applied") == "artifactType"
    assert [m["artifactType"] for m in r.json()["manifests"]] == ["application/vnd.example.sbom"]  # type: ignore[index]
    assert c.request("GET", f"/v2/{REPO}/referrers/sha256:bad").status == 400
    # an index of the manifest
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [{"mediaType": MANIFEST, "digest": md, "size": len(body)}],
    }
    assert c.put_manifest(REPO, "idx", index, INDEX).status == 201
    missing = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [{"mediaType": MANIFEST, "digest": sha(b"x"), "size": 1}],
    }
    assert c.put_manifest(REPO, "idx2", missing, INDEX).code() == "MANIFEST_BLOB_UNKNOWN"
    # delete a tag, then the manifest by digest (its other tags go with it)
    assert c.request("DELETE", f"/v2/{REPO}/manifests/v1").status == 202
    assert c.request("HEAD", f"/v2/{REPO}/manifests/v1").status == 404
    assert c.request("HEAD", f"/v2/{REPO}/manifests/c").status == 200
    assert c.request("DELETE", f"/v2/{REPO}/manifests/{md}").status == 202
    for ref in (md, "c", "d"):
        assert c.request("GET", f"/v2/{REPO}/manifests/{ref}").status == 404
    assert c.request("DELETE", f"/v2/{REPO}/manifests/{md}").status == 404


def test_methods_names_and_encoding(c: Client) -> None:
    assert c.request("POST", f"/v2/{REPO}/tags/list").status == 405
    assert c.request("GET", "/v2/UPPER/tags/list").code() == "NAME_INVALID"
    assert c.request("GET", "/v2/a%2Fb/tags/list").status == 400
    assert c.request("GET", "/v2/a/../b/tags/list").status in (400, 404)
    assert c.request("GET", f"/v2/{REPO}/blobs/uploads/not-an-upload").status == 404
    r = c.request("HEAD", f"/v2/{REPO}/manifests/{sha(b'none')}")
    assert r.status == 404 and r.body == b""
    assert c.request("GET", f"/v2/{REPO}/manifests/bad+tag").status == 404  # a lookup: see the test below


def test_lookups_of_a_tag_outside_the_grammar_are_404_and_a_push_is_400(c: Client) -> None:
    # No push can store such a tag, so a lookup finds nothing (docker's registry and the
    # OCI conformance suite v1.1 answer 404); pushing under it is refused as invalid.
    cfg = c.push_blob(REPO, b"{}")
    c.put_manifest(REPO, "v1", image(cfg, []))
    for method in ("GET", "HEAD", "DELETE"):
        r = c.request(method, f"/v2/{REPO}/manifests/.INVALID_MANIFEST_NAME")
        assert r.status == 404, (method, r.status, r.body)
        if method != "HEAD":
            assert json.loads(r.body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    r = c.put_manifest(REPO, ".INVALID_MANIFEST_NAME", image(cfg, []))
    assert r.status == 400 and json.loads(r.body)["errors"][0]["code"] in ("MANIFEST_INVALID", "TAG_INVALID")
    r = c.request("GET", f"/v2/{REPO}/manifests/sha256:nothex")  # a malformed digest stays a 400
    assert r.status == 400
