"""``registry.layout``: the OCI manifests of a sealed artifact and its signature referrer (pure)."""

from __future__ import annotations

import json

import pytest

from modelseal.errors import RegistryError
from modelseal.registry import layout

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
BLOB_A = "blobs/" + "a" * 32
BLOB_B = "blobs/" + "b" * 32


def test_file_artifact_is_one_sealed_layer_with_the_empty_config() -> None:
    data = layout.artifact_manifest([layout.layer_for(".", D1, 10)])
    doc = json.loads(data)
    assert doc["artifactType"] == "application/vnd.modelseal.artifact.v1"
    assert doc["config"] == {
        "mediaType": "application/vnd.oci.empty.v1+json",
        "digest": layout.EMPTY_CONFIG.digest,
        "size": 2,
    }
    assert doc["layers"] == [{"mediaType": "application/vnd.modelseal.sealed.v1", "digest": D1, "size": 10}]
    assert "annotations" not in doc
    assert [x.path for x in layout.parse_artifact(data)] == ["."]
    assert layout.artifact_manifest([layout.layer_for(".", D1, 10)]) == data  # deterministic


def test_folder_artifact_orders_manifest_then_blobs_and_names_nothing_plain() -> None:
    layers = [
        layout.layer_for(BLOB_B, D3, 5),
        layout.layer_for("manifest.mseal", D1, 7),
        layout.layer_for(BLOB_A, D2, 9),
    ]
    data = layout.artifact_manifest(layers)
    parsed = layout.parse_artifact(data)
    assert [x.path for x in parsed] == ["manifest.mseal", BLOB_A, BLOB_B]
    assert [x.descriptor.media_type for x in parsed] == [layout.FOLDER_MANIFEST, layout.FOLDER_BLOB, layout.FOLDER_BLOB]
    annotations = [d.get("annotations") for d in json.loads(data)["layers"]]
    assert annotations == [{"dev.modelseal.path": p} for p in ("manifest.mseal", BLOB_A, BLOB_B)]


@pytest.mark.parametrize("path", ["config.json", "blobs/../x", "blobs/" + "A" * 32, "/abs", "blobs/x", ""])
def test_only_sealed_paths_can_be_layers(path: str) -> None:
    with pytest.raises(RegistryError):
        layout.layer_for(path, D1, 1)


def _tamper(data: bytes, fn: object) -> bytes:
    doc = json.loads(data)
    fn(doc)  # type: ignore[operator]
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(artifactType="application/vnd.other"),
        lambda d: d["layers"][0].update(mediaType="application/vnd.oci.image.layer.v1.tar"),
        lambda d: d["layers"][0].update(digest="sha512:" + "0" * 128),
        lambda d: d["layers"][0].update(size=-1),
        lambda d: d["layers"][0].update(size=True),
        lambda d: d["layers"][1]["annotations"].update({"dev.modelseal.path": "blobs/../../etc"}),
        lambda d: d["layers"].append(dict(d["layers"][1])),
        lambda d: d["layers"].reverse(),
        lambda d: d["config"].update(mediaType="application/json"),
        lambda d: d.update(schemaVersion=1),
        lambda d: d.update(layers=[]),
    ],
)
def test_parse_artifact_refuses_anything_not_written_here(change: object) -> None:
    good = layout.artifact_manifest([layout.layer_for("manifest.mseal", D1, 7), layout.layer_for(BLOB_A, D2, 9)])
    with pytest.raises(RegistryError):
        layout.parse_artifact(_tamper(good, change))


def test_parse_refuses_oversized_and_malformed() -> None:
    with pytest.raises(RegistryError):
        layout.parse_artifact(b"{" * 100)
    with pytest.raises(RegistryError):
        layout.parse_artifact(b" " * (layout.MAX_MANIFEST + 1))
    with pytest.raises(RegistryError):
        layout.parse_artifact(b"[]")


def test_signature_referrer_and_fallback_index() -> None:
    subject = layout.Descriptor(layout.IMAGE_MANIFEST, D1, 300)
    sig = layout.Descriptor(layout.SIGNATURES, D2, 1234)
    body = layout.signature_manifest(sig, subject, "2026-12-02T10:00:00Z")
    doc = json.loads(body)
    assert doc["artifactType"] == layout.SIGNATURES and doc["subject"]["digest"] == D1
    assert layout.parse_signature_manifest(body, D1).digest == D2
    with pytest.raises(RegistryError, match="another artifact"):
        layout.parse_signature_manifest(body, D3)
    entry = layout.Descriptor(
        layout.IMAGE_MANIFEST, D3, len(body), {layout.CREATED_ANNOTATION: "2026-12-02T10:00:00Z"}, layout.SIGNATURES
    )
    older = layout.Descriptor(
        layout.IMAGE_MANIFEST, D2, 10, {layout.CREATED_ANNOTATION: "2025-01-01T00:00:00Z"}, layout.SIGNATURES
    )
    other = layout.Descriptor(layout.IMAGE_MANIFEST, D1, 10, {}, "application/vnd.example.sbom")
    index = layout.referrers_index([older, entry, other])
    listed = layout.parse_index(index)
    assert [d.digest for d in layout.newest_signatures(listed)] == [D3, D2]
    assert layout.fallback_tag(D1) == "sha256-" + "1" * 64
    with pytest.raises(RegistryError):
        layout.fallback_tag("sha256:xyz")
    with pytest.raises(RegistryError):
        layout.signature_manifest(sig, subject, "yesterday")


def test_a_folder_too_big_for_one_manifest_is_refused_at_push() -> None:
    layers = [layout.layer_for("manifest.mseal", D1, 1)]
    layers += [layout.layer_for(f"blobs/{i:032x}", "sha256:" + f"{i:064x}", 1) for i in range(20_000)]
    with pytest.raises(RegistryError, match="MiB"):
        layout.artifact_manifest(layers)


def test_sizes_are_bounded_at_push_and_at_pull() -> None:
    tib = layout.MAX_LAYER_SIZE
    assert layout.MAX_LAYER_SIZE == layout.MAX_ARTIFACT_SIZE == 1 << 40
    ok = layout.artifact_manifest([layout.layer_for(".", D1, tib)])
    assert layout.parse_artifact(ok)[0].descriptor.size == tib  # 1 TiB itself is allowed
    with pytest.raises(RegistryError, match="over the 1 TiB limit"):
        layout.artifact_manifest([layout.layer_for(".", D1, tib + 1)])
    together = [layout.layer_for("manifest.mseal", D1, 1), layout.layer_for(BLOB_A, D2, tib // 2)]
    with pytest.raises(RegistryError, match="come to"):
        layout.artifact_manifest([*together, layout.layer_for(BLOB_B, D3, tib // 2)])
    doc = json.loads(ok)
    for size in (tib + 1, 1 << 62, (1 << 63) - 1):
        doc["layers"][0]["size"] = size
        with pytest.raises(RegistryError, match="over the 1 TiB limit"):
            layout.parse_artifact(json.dumps(doc).encode())
