"""Parsing and validation of pushed manifests (OCI image manifest and index, and their Docker
v2 equivalents). Pure: bytes in, a ``Manifest`` or ``RegistryRefused`` out.

A manifest is stored in the exact bytes pushed; this module only reads it: its type (the
``mediaType`` field, which MUST equal the request's Content-Type when both are given), the
descriptors it references (config and layers, or child manifests), its ``subject`` and the
descriptor the referrers API lists for it (``artifactType``: the manifest's own, else for an
image manifest its config's media type; and its annotations). Size bound: 4 MiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelseal.errors import RegistryRefused
from modelseal.registry.names import Digest, parse_digest
from modelseal.util.bounded import json_loads

MAX_MANIFEST = 4 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
NONDISTRIBUTABLE = ("application/vnd.oci.image.layer.nondistributable.", "application/vnd.docker.image.rootfs.foreign.")


@dataclass(frozen=True)
class Ref:
    """One referenced descriptor: its digest, and whether it names a manifest (index child)."""

    digest: str
    is_manifest: bool
    must_exist: bool


@dataclass(frozen=True)
class Manifest:
    media_type: str
    doc: Mapping[str, Any]
    refs: tuple[Ref, ...]
    subject: str | None
    artifact_type: str | None
    annotations: Mapping[str, str] | None


def invalid(message: str) -> RegistryRefused:
    return RegistryRefused(f"manifest invalid: {message}", status=400, code="MANIFEST_INVALID")


def _descriptor(where: str, d: Any) -> Digest:
    if not isinstance(d, dict):
        raise invalid(f"{where} is not a descriptor object")
    media, size = d.get("mediaType"), d.get("size")
    if not isinstance(media, str) or not media or len(media) > 255:
        raise invalid(f"{where}.mediaType must be a string of 1 to 255 characters")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise invalid(f"{where}.size must be a non-negative integer")
    digest = d.get("digest")
    if not isinstance(digest, str):
        raise invalid(f"{where}.digest must be a string")
    try:
        parsed = parse_digest(digest)
    except RegistryRefused as e:
        raise invalid(f"{where}.digest: {e}") from None
    if "annotations" in d:
        _check_annotations(f"{where}.annotations", d["annotations"])
    return parsed


def _check_annotations(where: str, value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise invalid(f"{where} must map strings to strings")


def _type_of(doc: Mapping[str, Any], content_type: str | None) -> str:
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise invalid("mediaType must be a string")
    given = (content_type or "").split(";")[0].strip() or None
    if declared and given and declared != given:
        raise invalid(f"mediaType {declared[:100]!r} differs from the Content-Type {given[:100]!r}")
    media = declared or given
    if media not in IMAGE_TYPES | INDEX_TYPES:
        raise invalid(f"unsupported manifest type {str(media)[:100]!r}")
    return media


def parse_manifest(body: bytes, content_type: str | None) -> Manifest:
    """The parsed ``body`` (at most 4 MiB), or ``RegistryRefused`` (400 MANIFEST_INVALID; 413 if too large)."""
    if len(body) > MAX_MANIFEST:
        raise RegistryRefused(
            f"manifest invalid: {len(body)} bytes is over the {MAX_MANIFEST}-byte limit",
            status=413,
            code="SIZE_INVALID",
        )
    doc = json_loads(body, max_depth=32, max_values=200_000, error=invalid, what="the manifest")
    if not isinstance(doc, dict):
        raise invalid("not a JSON object")
    if doc.get("schemaVersion") != 2 or isinstance(doc.get("schemaVersion"), bool):
        raise invalid("schemaVersion must be 2")
    media = _type_of(doc, content_type)
    refs: list[Ref] = []
    if media in IMAGE_TYPES:
        config = _descriptor("config", doc.get("config"))
        refs.append(Ref(str(config), False, True))
        layers = doc.get("layers", [])
        if not isinstance(layers, list):
            raise invalid("layers must be an array")
        for i, layer in enumerate(layers):
            dg = _descriptor(f"layers[{i}]", layer)
            foreign = str(layer["mediaType"]).startswith(NONDISTRIBUTABLE)
            refs.append(Ref(str(dg), False, not foreign))
        artifact = doc.get("artifactType") or doc["config"]["mediaType"]
    else:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise invalid("manifests must be an array")
        for i, child in enumerate(children):
            refs.append(Ref(str(_descriptor(f"manifests[{i}]", child)), True, True))
        artifact = doc.get("artifactType") or None
    if artifact is not None and not isinstance(artifact, str):
        raise invalid("artifactType must be a string")
    subject = None
    if doc.get("subject") is not None:
        subject = str(_descriptor("subject", doc["subject"]))
    annotations = doc.get("annotations")
    if annotations is not None:
        _check_annotations("annotations", annotations)
    return Manifest(media, doc, tuple(refs), subject, artifact, annotations)


def referrer_descriptor(
    media_type: str, digest: str, size: int, artifact_type: str | None, annotations: Mapping[str, str] | None
) -> dict[str, Any]:
    """The descriptor the referrers API lists for a manifest."""
    out: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if artifact_type:
        out["artifactType"] = artifact_type
    if annotations:
        out["annotations"] = dict(annotations)
    return out


__all__ = ["MAX_MANIFEST", "Manifest", "Ref", "invalid", "parse_manifest", "referrer_descriptor"]
