"""The registry's content policy (docs/registry.md, "Content policy"): what a blob is, and
whether a blob or a manifest may be stored. Pure: the service hands in bytes it read.

``sealed-only`` (the default) stores ciphertext and the little that travels with it:

- a blob is **classified** once, when its upload completes, from its first bytes and its
  size (``classify``): ``sealed`` (a modelseal header that parses, ``format.header``, and a
  size that is exactly what that header's chunk layout implies), ``signature`` (a JSON
  object whose ``mediaType`` is a signature type), ``json`` (any other JSON value of at most
  64 KiB), ``empty`` (zero bytes). Everything else is refused with what it looks like:
  plaintext safetensors, pickle, a zip (torch), GGUF, ONNX, HDF5, NumPy, or unknown content.
- a **manifest** (``check_manifest``) must be an OCI image manifest or index; its config the
  OCI empty config (``application/vnd.oci.empty.v1+json``); each layer either a modelseal
  sealed layer (a media type under ``application/vnd.modelseal.`` other than the signature
  type, whose blob is ``sealed``), a signature (``SIGNATURE_TYPES``, blob ``signature``),
  or the empty descriptor. Its ``artifactType``, if any, is the modelseal artifact type or a
  signature type. No descriptor may carry ``data`` (inline bytes bypass the blob check) or
  ``urls`` (content stored elsewhere).
- **Metadata stays opaque**: an annotation (on the manifest or on any descriptor) is refused
  if its key is one that names files (``REFUSED_ANNOTATIONS``: ``org.opencontainers.image.title``
  and the ORAS/ModelPack file-path keys) or its value ends like a file name of model weights
  or a plaintext format (``.safetensors``, ``.bin``, ``.pt``, ``.gguf``, ``.onnx``, ...).
  The server cannot tell a plaintext digest from a ciphertext one, or a tensor name from
  other text; keeping those out of annotations is the client's (modelseal seals its folder
  manifest, so it has none to leak).

``any`` classifies nothing and refuses nothing: a general OCI registry, for mirrors.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from typing import Any

from modelseal.errors import DecryptionError, FormatError, RegistryRefused
from modelseal.format.header import MAX_HEADER, parse_core
from modelseal.format.stream import ChunkLayout
from modelseal.util.bounded import json_loads

SEALED_ONLY = "sealed-only"
ANY = "any"
POLICIES = (SEALED_ONLY, ANY)

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
ARTIFACT_TYPE = "application/vnd.modelseal.artifact.v1"
SEALED_LAYER_PREFIX = "application/vnd.modelseal."
MODELSEAL_SIGNATURES = "application/vnd.modelseal.signatures.v1+json"  # signing.sigfile.MEDIA_TYPE
SIGNATURE_TYPES = frozenset(
    {
        MODELSEAL_SIGNATURES,
        "application/vnd.dev.sigstore.bundle.v0.3+json",  # signing.oms.BUNDLE_MEDIA_TYPE
        "application/vnd.dev.sigstore.bundle+json;version=0.3",
        "application/vnd.dev.sigstore.bundle+json;version=0.2",
        "application/vnd.dev.sigstore.bundle.v0.2+json",
    }
)

HEAD_BYTES = MAX_HEADER  # how much of a blob ``classify`` wants to see
MAX_JSON_BLOB = 64 * 1024
MAX_SIGNATURE_BLOB = 1 << 20

REFUSED_ANNOTATIONS = frozenset(
    {
        "org.opencontainers.image.title",  # ORAS puts each file's name here
        "io.deis.oras.content.digest",
        "io.deis.oras.content.unpack",
        "org.cncf.model.filepath",
        "org.cnai.model.filepath",
        "org.cnai.model.file.metadata+json",
    }
)
PLAINTEXT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".gguf",
    ".ggml",
    ".onnx",
    ".h5",
    ".hdf5",
    ".npz",
    ".npy",
    ".msgpack",
    ".tflite",
    ".mlmodel",
    ".model",
    ".json",
    ".txt",
)

SEALED, SIGNATURE, JSON_BLOB, EMPTY, UNCHECKED = "sealed", "signature", "json", "empty", "unchecked"


def _denied(message: str) -> RegistryRefused:
    return RegistryRefused(f"content policy sealed-only: {message}", status=403, code="DENIED")


def check_policy(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"--content takes {' or '.join(POLICIES)}")
    return name


def _looks_like(head: bytes) -> str:
    """What a refused blob looks like, for the message (a guess, never a decision)."""
    if len(head) >= 10:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000 and head[8:9] == b"{" and head[9:10] in b'"}':
            return "a plaintext safetensors file"
    if head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05":
        return "a pickle (plaintext torch/numpy weights)"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (a plaintext torch checkpoint?)"
    if head[:4] == b"GGUF":
        return "a plaintext GGUF model"
    if head[:4] == b"\x89HDF":
        return "an HDF5 file"
    if head[:6] == b"\x93NUMPY":
        return "a NumPy array"
    if head[:1] == b"\x08" and (b"onnx" in head[:4096] or b"pytorch" in head[:4096] or b"\x12" in head[2:4]):
        return "a plaintext ONNX model"
    return "not a modelseal sealed file (unknown content)"


def _is_sealed(head: bytes, size: int) -> bool:
    try:
        core = parse_core(head)
    except (DecryptionError, FormatError):
        return False
    return ChunkLayout(core.chunk_size, core.plaintext_length, core.payload_offset).file_length == size


def _json_value(data: bytes) -> Any:
    def error(message: str) -> ValueError:
        return ValueError(message)

    try:
        return json_loads(data, max_depth=32, max_values=100_000, error=error, what="the blob")
    except ValueError:
        return None


def classify(head: bytes, size: int) -> str:
    """The kind of a blob of ``size`` bytes that starts with ``head`` (at least
    ``min(size, HEAD_BYTES)`` of them): ``sealed``, ``signature``, ``json`` or ``empty``.
    Anything else raises ``RegistryRefused`` (403 DENIED) saying what it looks like."""
    if size == 0:
        return EMPTY
    if _is_sealed(head, size):
        return SEALED
    if size <= MAX_SIGNATURE_BLOB and len(head) >= size:
        value = _json_value(head[:size])
        if isinstance(value, dict) and value.get("mediaType") in SIGNATURE_TYPES:
            return SIGNATURE
        if value is not None and size <= MAX_JSON_BLOB:
            return JSON_BLOB
    raise _denied(f"refused a blob that is {_looks_like(head)}")


def _annotations(where: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise RegistryRefused(f"{where}: annotations must be an object", status=400, code="MANIFEST_INVALID")
    for key, text in value.items():
        if key in REFUSED_ANNOTATIONS:
            raise _denied(f"{where}: annotation {key} names a file; metadata must stay opaque")
        if isinstance(text, str) and text.lower().rstrip().endswith(PLAINTEXT_SUFFIXES):
            raise _denied(f"{where}: annotation {key[:80]} looks like a plaintext file name")


def _descriptors(doc: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if isinstance(doc.get("config"), dict):
        yield "config", doc["config"]
    for field in ("layers", "manifests"):
        for i, d in enumerate(doc.get(field) or []):
            if isinstance(d, dict):
                yield f"{field}[{i}]", d
    if isinstance(doc.get("subject"), dict):
        yield "subject", doc["subject"]


def check_manifest(doc: Mapping[str, Any], media_type: str, kinds: Mapping[str, str]) -> None:
    """Refuse (403 DENIED) a manifest that ``sealed-only`` does not store. ``doc`` is already
    valid OCI (``registry.manifests``); ``kinds`` maps each referenced blob digest to its kind."""
    if media_type not in (MANIFEST_TYPE, INDEX_TYPE):
        raise _denied(f"refused a manifest of type {media_type[:100]!r}; only OCI image manifests and indexes")
    artifact = doc.get("artifactType")
    if artifact is not None and artifact != ARTIFACT_TYPE and artifact not in SIGNATURE_TYPES:
        raise _denied(f"refused artifactType {str(artifact)[:100]!r}")
    _annotations("manifest", doc.get("annotations"))
    for where, d in _descriptors(doc):
        _annotations(where, d.get("annotations"))
        if "data" in d or "urls" in d:
            raise _denied(f"{where}: descriptors may not carry inline data or external urls")
    if media_type == INDEX_TYPE:
        return
    config = doc["config"]
    if config.get("mediaType") != EMPTY_TYPE or kinds.get(config["digest"]) not in (JSON_BLOB, EMPTY):
        raise _denied(f"the config must be the OCI empty config ({EMPTY_TYPE})")
    for i, layer in enumerate(doc.get("layers") or []):
        _check_layer(f"layers[{i}]", layer, kinds.get(layer["digest"], UNCHECKED))


def _check_layer(where: str, layer: Mapping[str, Any], kind: str) -> None:
    media = str(layer.get("mediaType", ""))
    if media in SIGNATURE_TYPES:
        if kind != SIGNATURE:
            raise _denied(f"{where}: a {media[:80]} layer must be a signature document")
    elif media == EMPTY_TYPE:
        if kind not in (JSON_BLOB, EMPTY):
            raise _denied(f"{where}: an empty descriptor must point at the empty JSON blob")
    elif media.startswith(SEALED_LAYER_PREFIX):
        if kind != SEALED:
            raise _denied(f"{where}: layer {media[:80]} is not a modelseal sealed file")
    else:
        raise _denied(f"{where}: unknown layer media type {media[:100]!r}")


__all__ = [
    "ANY",
    "ARTIFACT_TYPE",
    "EMPTY_TYPE",
    "HEAD_BYTES",
    "INDEX_TYPE",
    "MANIFEST_TYPE",
    "POLICIES",
    "SEALED_ONLY",
    "SIGNATURE_TYPES",
    "check_manifest",
    "check_policy",
    "classify",
]
