"""How a sealed artifact is laid out in an OCI registry (docs/push-pull.md). Pure: bytes in, bytes out.

A sealed file or a sealed folder is ONE OCI image manifest (``artifactType``
``application/vnd.modelseal.artifact.v1``, the empty config) with one layer per sealed
file: a lone sealed file is one ``SEALED_FILE`` layer; a folder is its ``manifest.mseal``
(``FOLDER_MANIFEST``) then every ``blobs/<32 hex>`` (``FOLDER_BLOB``), sorted. The only
annotation is ``dev.modelseal.path`` on a folder's layers, the artifact path of the layer:
``manifest.mseal`` or ``blobs/<32 random hex>``, names that say nothing about the content.
No plaintext file name, tensor name or plaintext digest is ever written into a manifest,
an annotation or a config: a folder's member names live inside the sealed manifest.mseal.

Its signature file travels as a referrer: an image manifest with ``subject`` set to the
artifact's manifest, ``artifactType`` ``SIGNATURES`` and one layer, the signature file.
Where the registry has no referrers API, the referrers are listed in an image index
tagged ``sha256-<hex of the artifact manifest's digest>`` (the OCI tag-scheme fallback).

Manifests are encoded as compact JSON with sorted keys, with no timestamp in the artifact's
own manifest, so pushing the same sealed bytes twice gives the same digest. Parsing is
strict: anything not written here is refused. A layer, and an artifact's layers together,
are at most 1 TiB (``MAX_LAYER_SIZE``, ``MAX_ARTIFACT_SIZE``), at push and at pull: a size
is a number the registry chose, never a reason to allocate without bound.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from modelseal.errors import RegistryError
from modelseal.util.bounded import json_loads

ARTIFACT_TYPE = "application/vnd.modelseal.artifact.v1"
SEALED_FILE = "application/vnd.modelseal.sealed.v1"
FOLDER_MANIFEST = "application/vnd.modelseal.folder-manifest.v1"
FOLDER_BLOB = "application/vnd.modelseal.folder-blob.v1"
SIGNATURES = "application/vnd.modelseal.signatures.v1+json"  # = signing.sigfile.MEDIA_TYPE
IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
IMAGE_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_BYTES = b"{}"
PATH_ANNOTATION = "dev.modelseal.path"
CREATED_ANNOTATION = "org.opencontainers.image.created"
FILE_PATH = "."  # the artifact path of a lone sealed file (signing.commitment.FILE_PATH)
MANIFEST_PATH = "manifest.mseal"
MAX_MANIFEST = 4 << 20  # what registries accept (distribution, the spec's SHOULD)
MAX_LAYERS = 100_001  # a folder's manifest and at most 100 000 blobs (format.folder.MAX_ENTRIES)
MAX_REFERRERS = 1024
MAX_SIZE = (1 << 63) - 1
MAX_LAYER_SIZE = 1 << 40  # 1 TiB: a sealed file modelseal pushes or pulls, at most
MAX_ARTIFACT_SIZE = 1 << 40  # 1 TiB: all of an artifact's sealed files together, at most
_BLOB_PATH = re.compile(r"blobs/[0-9a-f]{32}")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
_CREATED = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor; ``digest`` is ``sha256:<64 hex>``."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str | None = None

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.artifact_type is not None:
            out["artifactType"] = self.artifact_type
        return out


@dataclass(frozen=True)
class Layer:
    """A layer of an artifact: the sealed file at artifact path ``path`` (``.``, ``manifest.mseal``
    or ``blobs/<32 hex>``) with its descriptor."""

    path: str
    descriptor: Descriptor


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


EMPTY_CONFIG = Descriptor(EMPTY, sha256_digest(EMPTY_BYTES), len(EMPTY_BYTES))


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def layer_for(path: str, digest: str, size: int) -> Layer:
    """The layer of the sealed file at artifact path ``path``; ``RegistryError`` for any other path."""
    if not _SHA256.fullmatch(digest) or not 0 <= size <= MAX_SIZE:
        raise RegistryError("a layer needs a sha256 digest and a size")
    if path == FILE_PATH:
        return Layer(path, Descriptor(SEALED_FILE, digest, size))
    if path == MANIFEST_PATH:
        return Layer(path, Descriptor(FOLDER_MANIFEST, digest, size, {PATH_ANNOTATION: path}))
    if _BLOB_PATH.fullmatch(path):
        return Layer(path, Descriptor(FOLDER_BLOB, digest, size, {PATH_ANNOTATION: path}))
    raise RegistryError("only a sealed file, or a sealed folder's manifest.mseal and blobs, can be layers")


def artifact_manifest(layers: list[Layer]) -> bytes:
    """The artifact's image manifest. ``layers`` are one lone sealed file, or a folder's
    manifest.mseal and blobs (put in the canonical order here)."""
    paths = [layer.path for layer in layers]
    if paths != [FILE_PATH] and (MANIFEST_PATH not in paths or FILE_PATH in paths or len(set(paths)) != len(paths)):
        raise RegistryError("an artifact is one sealed file, or a sealed folder's manifest.mseal and blobs")
    check_sizes([layer.descriptor.size for layer in layers])
    ordered = sorted(layers, key=lambda layer: (layer.path != MANIFEST_PATH, layer.path))
    data = encode(
        {
            "schemaVersion": 2,
            "mediaType": IMAGE_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": EMPTY_CONFIG.to_json(),
            "layers": [layer.descriptor.to_json() for layer in ordered],
        }
    )
    if len(data) > MAX_MANIFEST:
        raise RegistryError(f"the OCI manifest of this folder would exceed {MAX_MANIFEST >> 20} MiB: too many files")
    return data


def check_sizes(sizes: list[int]) -> None:
    """Refuse a layer over ``MAX_LAYER_SIZE``, or layers over ``MAX_ARTIFACT_SIZE`` together."""
    if any(size > MAX_LAYER_SIZE for size in sizes):
        raise RegistryError(f"the artifact has a layer of {max(sizes)} bytes, over the 1 TiB limit: refused")
    if sum(sizes) > MAX_ARTIFACT_SIZE:
        raise RegistryError(f"the artifact's layers come to {sum(sizes)} bytes, over the 1 TiB limit: refused")


def signature_manifest(signatures: Descriptor, subject: Descriptor, created: str) -> bytes:
    """The referrer that carries a signature file, ``subject`` being the artifact's manifest."""
    if not _CREATED.fullmatch(created):
        raise RegistryError("created must be an RFC 3339 UTC time to the second")
    return encode(
        {
            "schemaVersion": 2,
            "mediaType": IMAGE_MANIFEST,
            "artifactType": SIGNATURES,
            "config": EMPTY_CONFIG.to_json(),
            "layers": [Descriptor(SIGNATURES, signatures.digest, signatures.size).to_json()],
            "subject": Descriptor(IMAGE_MANIFEST, subject.digest, subject.size).to_json(),
            "annotations": {CREATED_ANNOTATION: created},
        }
    )


def referrers_index(referrers: list[Descriptor]) -> bytes:
    """The image index of the tag-scheme fallback (and of the referrers API's answer)."""
    return encode(
        {"schemaVersion": 2, "mediaType": IMAGE_INDEX, "manifests": [d.to_json() for d in referrers[:MAX_REFERRERS]]}
    )


_FALLBACK_TAG = re.compile(r"sha256-[0-9a-f]{64}")


def is_fallback_index(tag: str, body: bytes) -> bool:
    """Whether ``tag`` with manifest ``body`` is a tag-scheme referrers index (``fallback_tag``'s
    form, and an image index), not an artifact's tag."""
    if not _FALLBACK_TAG.fullmatch(tag):
        return False
    try:
        parse_index(body)
    except RegistryError:
        return False
    return True


def fallback_tag(manifest_digest: str) -> str:
    """The tag under which referrers of ``manifest_digest`` are listed without a referrers API."""
    if not _SHA256.fullmatch(manifest_digest):
        raise RegistryError("not a sha256 digest")
    return "sha256-" + manifest_digest.removeprefix("sha256:")


# ---- parsing what a registry returned (untrusted) ----------------------------------------


def _bad(what: str) -> RegistryError:
    return RegistryError(f"the registry returned a malformed {what}")


def _load(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_MANIFEST:
        raise RegistryError(f"the registry returned a {what} over {MAX_MANIFEST >> 20} MiB")
    doc = json_loads(data, max_depth=6, max_values=8 * MAX_LAYERS + 64, error=lambda _why: _bad(what), what=what)
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise _bad(what)
    return doc


def _descriptor(obj: Any, what: str, *, annotations: frozenset[str] = frozenset()) -> Descriptor:
    if not isinstance(obj, dict) or not {"mediaType", "digest", "size"} <= set(obj):
        raise _bad(what)
    media, digest, size = obj["mediaType"], obj["digest"], obj["size"]
    notes = obj.get("annotations", {})
    atype = obj.get("artifactType")
    if not (isinstance(media, str) and isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise _bad(what)
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_SIZE:
        raise _bad(what)
    if not isinstance(notes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in notes.items()):
        raise _bad(what)
    if atype is not None and not isinstance(atype, str):
        raise _bad(what)
    return Descriptor(media, digest, size, {k: v for k, v in notes.items() if k in annotations}, atype)


def parse_artifact(data: bytes) -> list[Layer]:
    """The layers of an artifact manifest, checked: the modelseal artifact type, the empty
    config, one sealed file or a folder's manifest.mseal and distinct blobs."""
    doc = _load(data, "artifact manifest")
    if doc.get("mediaType") != IMAGE_MANIFEST or doc.get("artifactType") != ARTIFACT_TYPE:
        raise RegistryError(f"not a modelseal artifact (its artifactType is not {ARTIFACT_TYPE})")
    config = _descriptor(doc.get("config"), "artifact manifest")
    if config.media_type != EMPTY or config.digest != EMPTY_CONFIG.digest:
        raise _bad("artifact manifest config")
    raw = doc.get("layers")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_LAYERS:
        raise _bad("artifact manifest layer list")
    layers: list[Layer] = []
    for obj in raw:
        d = _descriptor(obj, "artifact layer", annotations=frozenset({PATH_ANNOTATION}))
        path = FILE_PATH if d.media_type == SEALED_FILE else d.annotations.get(PATH_ANNOTATION, "")
        want = {SEALED_FILE: FILE_PATH, FOLDER_MANIFEST: MANIFEST_PATH}.get(d.media_type)
        if d.media_type not in (SEALED_FILE, FOLDER_MANIFEST, FOLDER_BLOB):
            raise RegistryError("the artifact has a layer of a media type modelseal does not write")
        if (want is not None and path != want) or (want is None and not _BLOB_PATH.fullmatch(path)):
            raise _bad("artifact layer path")
        layers.append(Layer(path, d))
    paths = [layer.path for layer in layers]
    if len(set(paths)) != len(paths) or (paths != [FILE_PATH] and paths[0] != MANIFEST_PATH):
        raise _bad("artifact layer list")
    check_sizes([layer.descriptor.size for layer in layers])
    return layers


def parse_signature_manifest(data: bytes, subject_digest: str) -> Descriptor:
    """The signature-file layer of a referrer whose subject must be ``subject_digest``."""
    doc = _load(data, "signature manifest")
    if doc.get("mediaType") != IMAGE_MANIFEST or doc.get("artifactType") != SIGNATURES:
        raise _bad("signature manifest")
    subject = _descriptor(doc.get("subject"), "signature manifest subject")
    if subject.digest != subject_digest:
        raise RegistryError("a signature manifest names another artifact as its subject")
    raw = doc.get("layers")
    if not isinstance(raw, list) or len(raw) != 1:
        raise _bad("signature manifest")
    layer = _descriptor(raw[0], "signature layer")
    if layer.media_type != SIGNATURES:
        raise _bad("signature layer")
    return layer


def parse_index(data: bytes) -> list[Descriptor]:
    """The manifest descriptors of an image index (a referrers list), at most ``MAX_REFERRERS``."""
    doc = _load(data, "image index")
    raw = doc.get("manifests")
    if doc.get("mediaType", IMAGE_INDEX) != IMAGE_INDEX or not isinstance(raw, list) or len(raw) > MAX_REFERRERS:
        raise _bad("image index")
    return [_descriptor(obj, "index entry", annotations=frozenset({CREATED_ANNOTATION})) for obj in raw]


def newest_signatures(referrers: list[Descriptor]) -> list[Descriptor]:
    """The signature referrers, newest first (by their created annotation, then digest)."""
    sigs = [d for d in referrers if d.artifact_type == SIGNATURES and d.media_type == IMAGE_MANIFEST]
    return sorted(sigs, key=lambda d: (d.annotations.get(CREATED_ANNOTATION, ""), d.digest), reverse=True)


__all__ = [
    "ARTIFACT_TYPE",
    "EMPTY",
    "EMPTY_BYTES",
    "EMPTY_CONFIG",
    "FOLDER_BLOB",
    "FOLDER_MANIFEST",
    "IMAGE_INDEX",
    "IMAGE_MANIFEST",
    "MAX_ARTIFACT_SIZE",
    "MAX_LAYER_SIZE",
    "SEALED_FILE",
    "SIGNATURES",
    "Descriptor",
    "Layer",
    "artifact_manifest",
    "check_sizes",
    "fallback_tag",
    "is_fallback_index",
    "layer_for",
    "newest_signatures",
    "parse_artifact",
    "parse_index",
    "parse_signature_manifest",
    "referrers_index",
    "sha256_digest",
    "signature_manifest",
]
