"""The sealed-only content policy (registry.policy): blob classification and manifest rules."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest

import modelseal
from modelseal.errors import RegistryRefused
from modelseal.registry import policy
from tests.conftest import Env

EMPTY_D = policy.EMPTY_DIGEST
LAYER_D = "sha256:" + "1" * 64
SIG_D = "sha256:" + "2" * 64


def sealed_bytes(env: Env, plaintext: bytes) -> bytes:
    src = env.work / "plain.bin"
    src.write_bytes(plaintext)
    modelseal.seal(src, env.work / "x.sealed", key="test-kek", keys=env.svc)
    return (env.work / "x.sealed").read_bytes()


def refused_as(head: bytes, word: str) -> None:
    with pytest.raises(RegistryRefused) as e:
        policy.classify(head, len(head))
    assert e.value.status == 403 and e.value.code == "DENIED"
    assert word in str(e.value) and "sealed-only" in str(e.value)


def test_a_sealed_file_is_sealed(env: Env) -> None:
    data = sealed_bytes(env, b"weights" * 1000)
    assert policy.classify(data[: policy.HEAD_BYTES], len(data)) == policy.SEALED


def test_a_truncated_or_extended_sealed_file_is_not(env: Env) -> None:
    data = sealed_bytes(env, b"weights" * 1000)
    for wrong in (len(data) - 1, len(data) + 16):
        with pytest.raises(RegistryRefused):
            policy.classify(data, wrong)


def test_plaintext_formats_are_refused_by_name(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    refused_as(struct.pack("<Q", len(header)) + header + b"\0" * 4, "safetensors")
    refused_as(pickle.dumps({"w": [1.0] * 10}, protocol=4), "pickle")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"x")
    refused_as(buf.getvalue(), "zip")
    refused_as(b"GGUF\x03\x00\x00\x00" + b"\0" * 64, "GGUF")
    refused_as(b"\x08\x07\x12\x07pytorch\x1a\x031.0" + b"\0" * 64, "ONNX")
    refused_as(b"\x89HDF\r\n\x1a\n" + b"\0" * 64, "HDF5")
    refused_as(b"\x7fELF" + bytes(range(256)) * 4, "unknown content")


def test_json_signature_and_empty() -> None:
    assert policy.classify(b"", 0) == policy.EMPTY
    assert policy.classify(b"{}", 2) == policy.JSON_BLOB
    for other in (b"{ }", b"[]", b'{"a":1}'):  # only the exact empty config is a JSON blob
        with pytest.raises(RegistryRefused):
            policy.classify(other, len(other))
    sig = json.dumps({"mediaType": policy.MODELSEAL_SIGNATURES, "signatures": []}).encode()
    with pytest.raises(RegistryRefused, match="not one"):  # it claims the type but is no signature file
        policy.classify(sig, len(sig))


def manifest(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": policy.MANIFEST_TYPE,
        "artifactType": policy.ARTIFACT_TYPE,
        "config": {"mediaType": policy.EMPTY_TYPE, "digest": EMPTY_D, "size": 2},
        "layers": [
            {"mediaType": "application/vnd.modelseal.sealed.v1", "digest": LAYER_D, "size": 10},
            {"mediaType": policy.MODELSEAL_SIGNATURES, "digest": SIG_D, "size": 5},
        ],
    }
    doc.update(over)
    return doc


KINDS = {EMPTY_D: policy.JSON_BLOB, LAYER_D: policy.SEALED, SIG_D: policy.SIGNATURE}


def denied(doc: dict[str, object], word: str, kinds: dict[str, str] = KINDS, media: str = policy.MANIFEST_TYPE) -> None:
    with pytest.raises(RegistryRefused) as e:
        policy.check_manifest(doc, media, kinds)
    assert e.value.status == 403 and word in str(e.value)


def test_a_sealed_artifact_manifest_passes() -> None:
    policy.check_manifest(manifest(), policy.MANIFEST_TYPE, KINDS)
    policy.check_manifest(
        manifest(annotations={"org.opencontainers.image.created": "2026-12-02T00:00:00Z"}), policy.MANIFEST_TYPE, KINDS
    )


def test_manifest_refusals() -> None:
    denied(manifest(), "type", media="application/vnd.docker.distribution.manifest.v2+json")
    denied(manifest(artifactType="application/vnd.example.sbom"), "artifactType")
    denied(
        manifest(config={"mediaType": "application/vnd.oci.image.config.v1+json", "digest": EMPTY_D, "size": 2}),
        "empty config",
    )
    denied(
        manifest(layers=[{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": LAYER_D, "size": 1}]),
        "unknown layer media type",
    )
    denied(manifest(), "not a modelseal sealed file", {**KINDS, LAYER_D: policy.JSON_BLOB})
    denied(manifest(), "signature document", {**KINDS, SIG_D: policy.JSON_BLOB})
    denied(manifest(), "signature document", {**KINDS, SIG_D: policy.SIGSTORE})  # the kind must match the type
    layer = {"mediaType": "application/vnd.modelseal.sealed.v1", "digest": LAYER_D, "size": 10}
    denied(manifest(layers=[{**layer, "data": "AAAA"}]), "inline data")
    denied(manifest(layers=[{**layer, "urls": ["https://x"]}]), "urls")


def test_metadata_stays_opaque() -> None:
    layer = {"mediaType": "application/vnd.modelseal.sealed.v1", "digest": LAYER_D, "size": 10}
    denied(
        manifest(layers=[{**layer, "annotations": {"org.opencontainers.image.title": "model.safetensors"}}]),
        "not one modelseal writes",
    )
    denied(manifest(annotations={"description": "weights/model-00001.safetensors"}), "not one modelseal writes")
    denied(manifest(annotations={"org.cnai.model.filepath": "x"}), "not one modelseal writes")
