"""The registry's metadata store: what the API can see. The rows, and the one way to open it.

The blob store holds bytes; this store says which of them exist for the API: blobs known
(digest -> storage key, size, kind) and their per-repository links, manifests (stored here,
in the exact bytes pushed, at most 4 MiB), what each manifest references, tags, the
referrers index (``subject`` with ``artifactType`` and annotations), uploads in progress
(id, repository, bytes received, part list, owner identity, timestamps) and the holds that
keep the garbage collector and an assembling upload apart.

One SQL implementation (``registry.sqlmeta.SqlMeta``, opened by ``sqlmeta.open_meta``) runs over SQLite (the embedded
default, ``DATA/registry.db``, WAL, safe across processes) and PostgreSQL 15 (``--db
postgresql://...``) through psycopg 3. Every change is one short transaction, serializable
on PostgreSQL (retried on a serialization failure) and ``BEGIN IMMEDIATE`` on SQLite, so
any number of server instances can share it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Upload:
    id: str
    repo: str
    owner: str
    received: int
    parts: tuple[int, ...]
    created: float
    touched: float


@dataclass(frozen=True)
class BlobRow:
    digest: str
    storage: str  # the SHA-256 hex key of the bytes in the blob store
    size: int
    kind: str


@dataclass(frozen=True)
class ManifestRow:
    digest: str
    media_type: str
    size: int
    body: bytes | None


@dataclass(frozen=True)
class Referrer:
    digest: str
    media_type: str
    size: int
    artifact_type: str | None
    annotations: str | None  # JSON text


@dataclass(frozen=True)
class NewManifest:
    repo: str
    digest: str
    media_type: str
    body: bytes
    subject: str | None
    artifact_type: str | None
    annotations: str | None
    refs: tuple[tuple[str, bool, bool], ...]  # (digest, is_manifest, must_exist)
    tags: tuple[str, ...]


__all__ = ["BlobRow", "ManifestRow", "NewManifest", "Referrer", "Upload"]
