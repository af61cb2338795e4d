"""The registry's content policy (docs/registry.md, "Content policy"): what a blob is, and
whether a blob or a manifest may be stored. Pure: the service hands in bytes it read.

``sealed-only`` (the default) stores ciphertext and the little that travels with it:

- a blob is **classified** once, when its upload completes (``classify``): ``sealed`` (a
  modelseal header that parses, ``format.header``, a size exactly what that header's chunk
  layout implies, and a payload that looks like ciphertext, ``check_ciphertext`` on samples
  the service reads at ``cipher_windows``), ``signature`` (a modelseal signature file that
  parses, ``signing.sigfile``, holding only what modelseal writes), ``sigstore`` (a Sigstore
  bundle of the strict shape in ``_BUNDLE``), ``json`` (exactly the OCI empty config ``{}``),
  ``empty`` (zero bytes). Everything else is refused with what it looks like: plaintext
  safetensors, pickle, a zip (torch), GGUF, ONNX, HDF5, NumPy, or unknown content.
- a **manifest** (``check_manifest``) is an OCI image manifest or index; its config exactly
  the OCI empty config (``{}``, size 2); each layer a sealed layer (``application/vnd.modelseal.*``,
  blob ``sealed``), a signature of the matching kind, or the empty descriptor (again ``{}``);
  ``artifactType`` modelseal's or a signature type; no descriptor carries ``data`` or ``urls``.
- **Metadata stays opaque**: annotations are an allowlist of what modelseal writes
  (``_ALLOWED``): ``dev.modelseal.path`` on layers (``manifest.mseal`` or ``blobs/<32 hex>``)
  and ``org.opencontainers.image.created`` (RFC 3339) on a manifest or an index entry.

``any`` classifies and refuses nothing: a general OCI registry, for mirrors.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import struct
from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from modelseal.errors import DecryptionError, FormatError, RegistryRefused, VerificationError
from modelseal.format.file import canonical_json
from modelseal.format.header import MAX_HEADER, parse_core
from modelseal.format.stream import ChunkLayout
from modelseal.signing.sigfile import SignatureFile
from modelseal.signing.signers import unb64
from modelseal.util.bounded import json_loads

SEALED_ONLY = "sealed-only"
ANY = "any"
POLICIES = (SEALED_ONLY, ANY)

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_JSON).hexdigest()
ARTIFACT_TYPE = "application/vnd.modelseal.artifact.v1"
SEALED_LAYER_PREFIX = "application/vnd.modelseal."
MODELSEAL_SIGNATURES = "application/vnd.modelseal.signatures.v1+json"  # signing.sigfile.MEDIA_TYPE
SIGSTORE_TYPES = frozenset(
    {
        "application/vnd.dev.sigstore.bundle.v0.3+json",  # signing.oms.BUNDLE_MEDIA_TYPE
        "application/vnd.dev.sigstore.bundle+json;version=0.3",
        "application/vnd.dev.sigstore.bundle+json;version=0.2",
        "application/vnd.dev.sigstore.bundle.v0.2+json",
    }
)
SIGNATURE_TYPES = frozenset({MODELSEAL_SIGNATURES, *SIGSTORE_TYPES})

HEAD_BYTES = MAX_HEADER  # how much of a blob ``classify`` wants to see
MAX_SIGNATURE_BLOB = 1 << 20
SEALED, SIGNATURE, SIGSTORE = "sealed", "signature", "sigstore"
JSON_BLOB, EMPTY, UNCHECKED = "json", "empty", "unchecked"

# -- the ciphertext check (docs/registry.md, "Content policy": the false-positive rate) ----------
WINDOW = 4096
WINDOWS = 16  # at most 64 KiB sampled: the first and last window, 14 at random offsets
CHI2_MIN_SAMPLE = 16 * 1024  # >= 64 expected per byte value: the chi-square law holds well
CHI2_LIMIT = 524.0  # P(chi2 with 255 df > 524) ~ 1e-20
PRINTABLE = frozenset(b"\t\n\r" + bytes(range(0x20, 0x7F)))  # 98 of 256 byte values
HOEFFDING_MIN_SAMPLE = 64
HOEFFDING_LOG_FP = 52.0  # ln(257 * 1e20): 257 one-sided bounds, 1e-20 in all (rigorous, any n)


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


def _payload_offset(head: bytes, size: int) -> int | None:
    """Where the ciphertext starts, if ``head`` is a modelseal header whose chunk layout
    implies exactly ``size`` bytes; else None."""
    try:
        core = parse_core(head)
    except (DecryptionError, FormatError):
        return None
    layout = ChunkLayout(core.chunk_size, core.plaintext_length, core.payload_offset)
    return core.payload_offset if layout.file_length == size else None


def cipher_windows(head: bytes, size: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of a ``sealed`` blob to read for ``check_ciphertext``:
    its whole payload if at most 64 KiB, else 16 disjoint windows of 4 KiB, one in each
    sixteenth of the payload: the first, the last, and 14 at offsets the client cannot predict."""
    start = _payload_offset(head, size)
    if start is None:
        return []
    span = size - start
    if span <= WINDOW * WINDOWS:
        return [(start, span)] if span else []
    part = span // WINDOWS  # >= WINDOW: the windows never overlap, so no byte counts twice
    inner = [start + i * part + secrets.randbelow(part - WINDOW + 1) for i in range(1, WINDOWS - 1)]
    return [(at, WINDOW) for at in (start, *inner, size - WINDOW)]


def ciphertext_refusal(samples: list[bytes]) -> str | None:
    """Why ``samples`` of a payload are not uniformly random bytes (AES-GCM output), or None.
    Each test has a false-refusal rate near 1e-20 for genuine ciphertext: from 16 KiB, a
    chi-square test of the byte histogram (255 degrees of freedom); from 64 bytes, Hoeffding
    bounds on the share of printable ASCII (98/256 expected) and of the commonest value."""
    data = b"".join(samples)
    n = len(data)
    if n < HOEFFDING_MIN_SAMPLE:
        return None
    histogram = Counter(data)  # counted in C: ~4 ms for 64 KiB
    counts = [histogram[i] for i in range(256)]
    chi2 = sum((c - n / 256) ** 2 for c in counts) * 256 / n
    if n >= CHI2_MIN_SAMPLE and chi2 > CHI2_LIMIT:
        return f"its payload is not ciphertext (byte histogram chi-square {chi2:.0f} > {CHI2_LIMIT:.0f})"
    printable, top = sum(counts[b] for b in PRINTABLE) / n, max(counts) / n
    bound = (HOEFFDING_LOG_FP / (2 * n)) ** 0.5  # P(share - mean > bound) <= exp(-LOG_FP) each, 257 events
    if printable - len(PRINTABLE) / 256 > bound or top - 1 / 256 > bound:
        return f"its payload is not ciphertext ({printable:.0%} printable bytes, {top:.0%} one byte value)"
    return None


def check_ciphertext(samples: list[bytes]) -> None:
    """Refuse (403 DENIED) a sealed blob whose sampled payload is not ciphertext."""
    if (reason := ciphertext_refusal(samples)) is not None:
        raise _denied(f"refused a modelseal header over plaintext: {reason}")


# -- signature documents ---------------------------------------------------------------------
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ARTIFACT_PATH = re.compile(r"\.|manifest\.mseal|blobs/[0-9a-f]{32}")
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})")
_SHORT, _LONG = 256, 64 * 1024  # bounds on a name-like string and on an encoded key/cert/signature
MAX_CONTEXT, MAX_ATTACHMENT = 64, 256 * 1024  # context entries; base64 of the encrypted OMS bundle


def _is_time(text: str) -> bool:
    try:
        return bool(_RFC3339.fullmatch(text)) and datetime.fromisoformat(text.replace("Z", "+00:00")) is not None
    except ValueError:
        return False


def _text(value: Any, limit: int) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _digest_map(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"blake3"} and _text(value["blake3"], 64)


def _check_statement(raw: bytes) -> None:
    """The DSSE payload must be a statement exactly as modelseal writes it (canonical JSON,
    no field it does not write, bounded strings): it cannot carry anything else."""
    doc = json.loads(raw)
    if canonical_json(doc) != raw or set(doc) != {"_type", "predicate", "predicateType", "subject"}:
        raise ValueError("the statement is not one modelseal writes")
    pred = doc["predicate"]
    if not set(pred) <= {"context", "files", "kind", "signed_at", "version"} or len(pred["context"]) > MAX_CONTEXT:
        raise ValueError("the statement's predicate has unknown fields")
    if not all(_text(k, _SHORT) and _text(v, _SHORT) for k, v in pred["context"].items()):
        raise ValueError("an encryption context entry is too long")
    for f in pred["files"]:
        ok = _text(f["path"], 64) and _ARTIFACT_PATH.fullmatch(f["path"]) and type(f["size"]) is int
        if not (ok and _digest_map(f["header"]) and _digest_map(f["chunks"])):
            raise ValueError("a statement file entry is not one modelseal writes")
    if any(set(s) != {"digest", "name"} or set(s["digest"]) != {"blake3"} for s in doc["subject"]):
        raise ValueError("the statement's subject is not one modelseal writes")


def _check_modelseal_signatures(data: bytes) -> None:
    SignatureFile.parse(data)  # the schema, every envelope and statement
    doc = json.loads(data)
    if not set(doc) <= {"chunks", "history", "mediaType", "signatures"}:
        raise ValueError("unknown top-level fields")
    if not all(_text(k, 64) and _ARTIFACT_PATH.fullmatch(k) for k in doc["chunks"]):
        raise ValueError("a chunk table is not under an artifact path")
    for entry in (*doc["signatures"], *doc.get("history", [])):
        env = entry["envelope"]
        if set(env) != {"payload", "payloadType", "signatures"}:
            raise ValueError("unknown envelope fields")
        if not all(set(s) <= {"keyid", "sig"} and _text(s.get("keyid", ""), _SHORT) for s in env["signatures"]):
            raise ValueError("unknown signature fields")
        if not _text(entry.get("public_key", ""), _LONG) or not _text(entry.get("id"), 64):
            raise ValueError("a public key is too long")
        if "oms" in entry and not all(_text(v, MAX_ATTACHMENT) for v in entry["oms"].values()):
            raise ValueError("an attachment is too long")
        if "superseded_at" in entry and not (_text(entry["superseded_at"], 40) and _is_time(entry["superseded_at"])):
            raise ValueError("superseded_at is not a time")
        _check_statement(unb64(env["payload"]))


# The Sigstore bundle (protobuf-specs, v0.2/v0.3 JSON): a key maps to its schema; a leaf is a
# string bound (``int``) or ``"num"`` (a JSON integer or decimal string); ``[schema]`` a list.
_TLOG: dict[str, Any] = {
    "logIndex": "num",
    "logId": {"keyId": _SHORT},
    "kindVersion": {"kind": 64, "version": 64},
    "integratedTime": "num",
    "inclusionPromise": {"signedEntryTimestamp": _SHORT * 8},
    "inclusionProof": {
        "logIndex": "num",
        "rootHash": _SHORT,
        "treeSize": "num",
        "hashes": [_SHORT],
        "checkpoint": {"envelope": _SHORT * 16},
    },
    "canonicalizedBody": _LONG,
}
_BUNDLE: dict[str, Any] = {
    "mediaType": 64,
    "verificationMaterial": {
        "publicKey": {"hint": _SHORT},
        "x509CertificateChain": {"certificates": [{"rawBytes": _LONG}]},
        "certificate": {"rawBytes": _LONG},
        "tlogEntries": [_TLOG],
        "timestampVerificationData": {"rfc3161Timestamps": [{"signedTimestamp": _LONG}]},
    },
    "dsseEnvelope": {"payload": 4 * _LONG, "payloadType": _SHORT, "signatures": [{"sig": _LONG, "keyid": _SHORT}]},
    "messageSignature": {"messageDigest": {"algorithm": 64, "digest": _SHORT}, "signature": _LONG},
}
MAX_LIST = 64


def _fits(value: Any, schema: Any) -> bool:
    if isinstance(schema, int):
        return _text(value, schema)
    if schema == "num":
        return (type(value) is int and value >= 0) or (_text(value, 20) and str(value).isdigit())
    if isinstance(schema, list):
        return isinstance(value, list) and len(value) <= MAX_LIST and all(_fits(v, schema[0]) for v in value)
    return isinstance(value, dict) and set(value) <= set(schema) and all(_fits(v, schema[k]) for k, v in value.items())


def _check_sigstore_bundle(data: bytes) -> None:
    doc = json.loads(data)
    if not _fits(doc, _BUNDLE) or doc.get("mediaType") not in SIGSTORE_TYPES or "verificationMaterial" not in doc:
        raise ValueError("not a Sigstore bundle of the expected shape")
    if ("dsseEnvelope" in doc) == ("messageSignature" in doc):
        raise ValueError("a bundle holds a dsseEnvelope or a messageSignature")


def _signature_kind(data: bytes) -> str | None:
    """``signature``/``sigstore`` if ``data`` is such a document, None if it claims neither;
    RegistryRefused if it claims one and is not exactly that."""
    try:
        value = json_loads(data, max_depth=32, max_values=100_000, error=ValueError, what="the blob")
    except ValueError:
        return None
    media = value.get("mediaType") if isinstance(value, dict) else None
    if media not in SIGNATURE_TYPES:
        return None
    try:
        if media == MODELSEAL_SIGNATURES:
            _check_modelseal_signatures(data)
            return SIGNATURE
        _check_sigstore_bundle(data)
        return SIGSTORE
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, VerificationError) as e:
        detail = str(e) if isinstance(e, ValueError | VerificationError) else "a missing or malformed field"
        raise _denied(f"refused a {media[:80]} blob that is not one: {detail[:120]}") from None


def classify(head: bytes, size: int) -> str:
    """The kind of a blob of ``size`` bytes that starts with ``head`` (at least
    ``min(size, HEAD_BYTES)`` of them): ``sealed``, ``signature``, ``sigstore``, ``json``
    (exactly ``{}``) or ``empty``. A ``sealed`` blob still needs ``check_ciphertext`` on
    samples read at ``cipher_windows``. Anything else raises ``RegistryRefused`` (403)."""
    if size == 0:
        return EMPTY
    if _payload_offset(head, size) is not None:
        return SEALED
    if size == len(EMPTY_JSON) and head[:size] == EMPTY_JSON:
        return JSON_BLOB
    if size <= MAX_SIGNATURE_BLOB and len(head) >= size:
        kind = _signature_kind(head[:size])
        if kind is not None:
            return kind
    raise _denied(f"refused a blob that is {_looks_like(head)}")


# -- manifests -------------------------------------------------------------------------------
PATH_ANNOTATION = "dev.modelseal.path"  # registry.layout.PATH_ANNOTATION
CREATED_ANNOTATION = "org.opencontainers.image.created"
_LAYER_PATH = re.compile(r"manifest\.mseal|blobs/[0-9a-f]{32}")


_ALLOWED: dict[str, dict[str, Any]] = {
    "manifest": {CREATED_ANNOTATION: _is_time},
    "manifests": {CREATED_ANNOTATION: _is_time},
    "layers": {PATH_ANNOTATION: lambda v: bool(_LAYER_PATH.fullmatch(v))},
}


def _annotations(where: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise RegistryRefused(f"{where}: annotations must be an object", status=400, code="MANIFEST_INVALID")
    allowed = _ALLOWED.get(where.split("[", 1)[0], {})
    for key, text in value.items():
        check = allowed.get(key)
        if check is None:
            raise _denied(f"{where}: annotation {str(key)[:80]!r} is not one modelseal writes; metadata stays opaque")
        if not isinstance(text, str) or len(text) > 64 or not check(text):
            raise _denied(f"{where}: annotation {key} has a value modelseal does not write")


def _descriptors(doc: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if isinstance(doc.get("config"), dict):
        yield "config", doc["config"]
    for field in ("layers", "manifests"):
        for i, d in enumerate(doc.get(field) or []):
            if isinstance(d, dict):
                yield f"{field}[{i}]", d
    if isinstance(doc.get("subject"), dict):
        yield "subject", doc["subject"]


def _is_empty_config(d: Mapping[str, Any], kind: str | None) -> bool:
    return (
        d.get("mediaType") == EMPTY_TYPE
        and d.get("digest") == EMPTY_DIGEST
        and d.get("size") == 2
        and kind == JSON_BLOB
    )


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
    if not _is_empty_config(config, kinds.get(config["digest"])):
        raise _denied(f"the config must be the OCI empty config ({EMPTY_TYPE}, {EMPTY_DIGEST[:19]}..., size 2)")
    for i, layer in enumerate(doc.get("layers") or []):
        _check_layer(f"layers[{i}]", layer, kinds.get(layer["digest"], UNCHECKED))


def _check_layer(where: str, layer: Mapping[str, Any], kind: str) -> None:
    media = str(layer.get("mediaType", ""))
    if media in SIGNATURE_TYPES:
        if kind != (SIGNATURE if media == MODELSEAL_SIGNATURES else SIGSTORE):
            raise _denied(f"{where}: a {media[:80]} layer must be a signature document of that type")
    elif media == EMPTY_TYPE:
        if not _is_empty_config(layer, kind):
            raise _denied(f"{where}: an empty descriptor must point at the empty JSON blob {{}}")
    elif media.startswith(SEALED_LAYER_PREFIX):
        if kind != SEALED:
            raise _denied(f"{where}: layer {media[:80]} is not a modelseal sealed file")
    else:
        raise _denied(f"{where}: unknown layer media type {media[:100]!r}")


__all__ = [
    "ANY",
    "ARTIFACT_TYPE",
    "EMPTY_DIGEST",
    "EMPTY_TYPE",
    "HEAD_BYTES",
    "INDEX_TYPE",
    "MANIFEST_TYPE",
    "POLICIES",
    "SEALED_ONLY",
    "SIGNATURE_TYPES",
    "check_ciphertext",
    "check_manifest",
    "check_policy",
    "cipher_windows",
    "ciphertext_refusal",
    "classify",
]
