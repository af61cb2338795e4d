"""The registry core (docs/registry.md): uploads, blobs, manifests, tags and referrers over
the metadata store (``registry.sqlmeta``) and the blob store (``registry.blobs``).

Synchronous and HTTP-free: the server runs these calls in a thread pool and maps each
``RegistryRefused`` (status, OCI code, one-line message) to its answer. Names, tags and
digests are validated here (``registry.names``) before they reach either store. An upload
belongs to the identity that started it: any other gets 404, as for a missing one.

An upload becomes a blob only in ``finish``: its bytes are always hashed, as they arrived
when this process received every chunk (``registry.chunks.Running``), else by the blob
store reading the parts back; the blob exists only if its SHA-256 matches; then, under
``sealed-only``, it is classified and its payload sampled (``registry.policy``); only then
does one metadata transaction make it visible in the repository. A chunk (``Chunk``) is
appended by compare-and-set on the upload's byte count, with a part index no other request
ever gets, so chunks of one upload may go to different instances, and two never mix.

Digests: sha256 everywhere; sha512 for manifests, and for blobs whose bytes all went through
this one process (their SHA-256, the storage key, is computed on the way: up to 64 MiB).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from modelseal.errors import DigestMismatch
from modelseal.registry import names, policy
from modelseal.registry.blobs import UPLOAD_ID, BlobStore
from modelseal.registry.chunks import Chunk, Running, refused
from modelseal.registry.manifests import Manifest, parse_manifest, referrer_descriptor
from modelseal.registry.meta import BlobRow, ManifestRow, NewManifest, Upload
from modelseal.registry.names import Digest
from modelseal.registry.sqlmeta import Busy, SqlMeta, open_meta
from modelseal.registry.stores import open_blobs

MAX_TAGS_PAGE = 1000
MAX_REFERRERS = 1000


@dataclass(frozen=True)
class Limits:
    """Bounds and grace periods (docs/registry.md, "Garbage collection" and "Limits")."""

    open_uploads_per_identity: int = 256
    upload_ttl: float = 24 * 3600.0  # an upload untouched this long is abandoned
    link_grace: float = 24 * 3600.0  # a pushed blob no manifest references is kept this long
    blob_grace: float = 3600.0  # a blob no repository links is kept this long


class Registry:
    """One registry over its two stores; safe to share between threads and instances."""

    def __init__(
        self,
        meta: SqlMeta,
        blobs: BlobStore,
        content: str = policy.SEALED_ONLY,
        limits: Limits | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.meta, self.blobs, self.content = meta, blobs, policy.check_policy(content)
        self.limits = limits or Limits()
        self.now = now
        self._running: OrderedDict[str, Running] = OrderedDict()

    def close(self) -> None:
        self.meta.close()

    # -- uploads ----------------------------------------------------------------------

    def start_upload(self, repo: str, owner: str) -> str:
        names.check_name(repo)
        upload = secrets.token_hex(16)
        if not self.meta.upload_create(upload, repo, owner, self.now(), self.limits.open_uploads_per_identity):
            raise refused(
                429, "TOOMANYREQUESTS", f"{owner} already has the maximum of open uploads; finish or cancel some"
            )
        self._running[upload] = Running()
        while len(self._running) > 4096:
            self._running.popitem(last=False)
        return upload

    def upload_status(self, repo: str, upload: str, owner: str) -> Upload:
        """The upload ``upload`` of ``repo`` if ``owner`` started it. Another identity's
        upload is answered exactly as a missing one (404), so an id's existence never leaks."""
        names.check_name(repo)
        row = self.meta.upload_get(upload) if UPLOAD_ID.fullmatch(upload) else None
        if row is None or row.repo != repo or row.owner != owner:
            raise refused(404, "BLOB_UPLOAD_UNKNOWN", "no such upload in this repository")
        return row

    def begin_chunk(self, repo: str, upload: str, owner: str, start: int | None, length: int | None) -> Chunk:
        """Open the next chunk of an upload. ``start`` is the Content-Range start (None: at
        the current end); a start elsewhere is a gap or an overlap: 416. ``length`` is the
        announced size. The caller ``write``s the body, then ``close``s (or ``abort``s)."""
        row = self.upload_status(repo, upload, owner)
        if start is not None and start != row.received:
            raise refused(416, "BLOB_UPLOAD_INVALID", f"the chunk starts at {start}; the upload has {row.received}")
        index = self.meta.upload_reserve(upload, self.now())
        if index is None:
            raise refused(404, "BLOB_UPLOAD_UNKNOWN", "no such upload in this repository")
        running = self._running.get(upload)
        if running is not None and (running.received != row.received or running.active):
            running = None  # bytes this process did not see, or two chunks at once: no running hash
            self._running.pop(upload, None)
        if running is not None:
            running.active = True
        return Chunk(self, row, owner, index, running, length)

    def append(
        self, repo: str, upload: str, owner: str, start: int | None, chunks: Iterable[bytes], length: int | None
    ) -> Upload:
        """Append one chunk from an iterable of byte strings (see ``begin_chunk``)."""
        chunk = self.begin_chunk(repo, upload, owner, start, length)
        try:
            for data in chunks:
                chunk.write(data)
        except BaseException:
            chunk.abort()
            raise
        return chunk.close()

    def finish(
        self,
        repo: str,
        upload: str,
        owner: str,
        digest_text: str,
        start: int | None = None,
        chunks: Iterable[bytes] = (),
        length: int | None = 0,
    ) -> BlobRow:
        """Close the upload (with an optional last chunk) as the blob ``digest_text``. The
        bytes are always hashed (on arrival, or by ``BlobStore.assemble``), whether or not the
        store already holds that digest: a blob is linked into ``repo`` only for bytes its
        caller sent."""
        digest = names.parse_digest(digest_text)
        row = self.upload_status(repo, upload, owner)
        if length != 0 or start is not None:
            row = self.append(repo, upload, owner, start, chunks, length)
        storage = self._storage_key(upload, digest, row)
        # Hashed on arrival when this process saw every byte: SHA-256 is the storage key.
        running = self._running.get(upload)
        hashed = running is not None and running.received == row.received and not running.active
        if running is not None and hashed and not secrets.compare_digest(running.sha256.hexdigest(), storage):
            self._drop_upload(upload)
            raise refused(400, "DIGEST_INVALID", "the uploaded bytes do not match the digest given")
        try:
            self._hold(storage, upload)
            try:
                size = self.blobs.assemble(upload, row.parts, storage, hashed=hashed)
            except DigestMismatch:
                raise refused(400, "DIGEST_INVALID", "the uploaded bytes do not match the digest given") from None
            kind = self._classify(storage, size)
        except BaseException:
            self.meta.release(storage, upload)
            self._drop_upload(upload)
            raise
        blob = BlobRow(str(digest), storage, size, kind)
        self.meta.blob_record(blob, repo, upload, self.now())
        self._drop_upload(upload)
        return blob

    def _storage_key(self, upload: str, digest: Digest, row: Upload) -> str:
        if digest.algorithm == "sha256":
            return digest.hex
        running = self._running.get(upload)
        if running is None or running.received != row.received or running.sha512 is None:
            self._drop_upload(upload)
            raise refused(
                400,
                "DIGEST_INVALID",
                "sha512 blobs must be uploaded to one server instance and be at most 64 MiB; use sha256",
            )
        if not secrets.compare_digest(running.sha512.hexdigest(), digest.hex):
            self._drop_upload(upload)
            raise refused(400, "DIGEST_INVALID", "the uploaded bytes do not match the digest given")
        return running.sha256.hexdigest()

    def _hold(self, storage: str, upload: str) -> None:
        for _ in range(50):
            try:
                self.meta.hold_pending(storage, upload, self.now())
                return
            except Busy:
                time.sleep(0.2)
        raise refused(503, "TOOMANYREQUESTS", "the blob is being garbage-collected; retry")

    def _classify(self, storage: str, size: int) -> str:
        if self.content == policy.ANY:
            return policy.UNCHECKED
        head = b"".join(self.blobs.read(storage, 0, min(size, policy.HEAD_BYTES)))
        kind = policy.classify(head, size)
        if kind == policy.SEALED:  # the payload is read back through the store, as it will be served
            windows = policy.cipher_windows(head, size)
            policy.check_ciphertext([b"".join(self.blobs.read(storage, at, n)) for at, n in windows])
        return kind

    def _drop_upload(self, upload: str) -> None:
        self._running.pop(upload, None)
        self.meta.upload_delete(upload)
        self.blobs.delete_upload(upload)

    def cancel(self, repo: str, upload: str, owner: str) -> None:
        self.upload_status(repo, upload, owner)
        self._drop_upload(upload)

    def mount(self, repo: str, digest_text: str, source: str | None, may_read: Callable[[str], bool]) -> BlobRow | None:
        """Link a blob of ``source`` (or, without one, of any repository ``may_read`` allows)
        into ``repo``; None if it cannot be mounted (the caller then opens an upload)."""
        names.check_name(repo)
        digest = str(names.parse_digest(digest_text))
        sources = [names.check_name(source)] if source else self.meta.repos_with_blob(digest)
        for src in sources:
            if may_read(src) and self.meta.blob_in_repo(src, digest) is not None:
                return self.meta.blob_link(repo, digest, self.now())
        return None

    # -- blobs ------------------------------------------------------------------------

    def blob(self, repo: str, digest_text: str) -> BlobRow:
        names.check_name(repo)
        digest = str(names.parse_digest(digest_text))
        row = self.meta.blob_in_repo(repo, digest)
        if row is None:
            raise refused(404, "BLOB_UNKNOWN", "blob unknown to this repository")
        return row

    def read_blob(self, row: BlobRow, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        return self.blobs.read(row.storage, start, length)

    def delete_blob(self, repo: str, digest_text: str) -> None:
        self.blob(repo, digest_text)
        self.meta.blob_unlink(repo, str(names.parse_digest(digest_text)))

    # -- manifests, tags, referrers ----------------------------------------------------------

    def put_manifest(
        self, repo: str, reference: str, body: bytes, content_type: str | None, tags: Iterable[str] = ()
    ) -> tuple[str, str | None, tuple[str, ...]]:
        """Store a manifest; returns (its digest, its subject, the tags set)."""
        names.check_name(repo)
        ref = names.parse_reference(reference)
        extra = tuple(names.check_tag(t) for t in tags)
        if isinstance(ref, Digest):
            digest = Digest(ref.algorithm, hashlib.new(ref.algorithm, body).hexdigest())
            if not secrets.compare_digest(digest.hex, ref.hex):
                raise refused(400, "DIGEST_INVALID", "the manifest does not hash to the digest in the URL")
            all_tags = extra
        else:
            digest = Digest("sha256", hashlib.sha256(body).hexdigest())
            all_tags = (ref, *extra)
        m = parse_manifest(body, content_type)
        self._check_refs(repo, m)
        new = NewManifest(
            repo,
            str(digest),
            m.media_type,
            body,
            m.subject,
            m.artifact_type,
            self.meta.annotations_json(m.annotations),
            tuple((r.digest, r.is_manifest, r.must_exist) for r in m.refs),
            all_tags,
        )
        missing = self.meta.manifest_put(new, self.now())
        if missing:
            raise refused(
                400, "MANIFEST_BLOB_UNKNOWN", f"the manifest references {missing[0]}, unknown to this repository"
            )
        return str(digest), m.subject, all_tags

    def _check_refs(self, repo: str, m: Manifest) -> None:
        blob_refs = [r.digest for r in m.refs if not r.is_manifest]
        kinds = self.meta.kinds(repo, blob_refs)
        for r in m.refs:
            if r.must_exist and not r.is_manifest and r.digest not in kinds:
                raise refused(
                    400, "MANIFEST_BLOB_UNKNOWN", f"the manifest references {r.digest}, unknown to this repository"
                )
        if self.content == policy.SEALED_ONLY:
            policy.check_manifest(m.doc, m.media_type, kinds)

    def get_manifest(self, repo: str, reference: str, body: bool = True) -> ManifestRow:
        names.check_name(repo)
        ref = names.lookup_reference(reference)
        if isinstance(ref, Digest):
            row = self.meta.manifest_get(repo, str(ref), None, body)
        else:
            row = None if ref is None else self.meta.manifest_get(repo, None, ref, body)
        if row is None:
            raise refused(404, "MANIFEST_UNKNOWN", "manifest unknown to this repository")
        return row

    def delete_manifest(self, repo: str, reference: str) -> None:
        """Delete a tag (a tag reference) or a manifest and every tag on it (a digest)."""
        names.check_name(repo)
        ref = names.lookup_reference(reference)
        tag_gone = ref is not None and not isinstance(ref, Digest) and self.meta.tag_delete(repo, ref)
        done = self.meta.manifest_delete(repo, str(ref)) if isinstance(ref, Digest) else tag_gone
        if not done:
            raise refused(404, "MANIFEST_UNKNOWN", "manifest unknown to this repository")

    def tags(self, repo: str, n: int | None, last: str | None) -> tuple[list[str], bool]:
        """Up to ``n`` tags after ``last`` in bytewise order, and whether more follow."""
        names.check_name(repo)
        if last is not None:
            names.check_tag(last)
        if not self.meta.repo_exists(repo):
            raise refused(404, "NAME_UNKNOWN", "repository name not known to this registry")
        want = MAX_TAGS_PAGE if n is None else max(0, min(n, MAX_TAGS_PAGE))
        if want == 0:
            return [], False
        got = self.meta.tags(repo, last, want + 1)
        return got[:want], len(got) > want

    def referrers(self, repo: str, digest_text: str, artifact_type: str | None) -> list[dict[str, object]]:
        names.check_name(repo)
        subject = str(names.parse_digest(digest_text))
        out: list[dict[str, object]] = []
        for r in self.meta.referrers(repo, subject, artifact_type, MAX_REFERRERS):
            annotations = json.loads(r.annotations) if r.annotations else None
            out.append(referrer_descriptor(r.media_type, r.digest, r.size, r.artifact_type, annotations))
        return out


def open_registry(
    data: Path,
    db: str | None = None,
    blobs: str | None = None,
    content: str = policy.SEALED_ONLY,
    limits: Limits | None = None,
) -> Registry:
    """The registry of ``modelseal serve --data DIR [--db URL] [--blobs URL] [--content ...]``."""
    policy.check_policy(content)
    return Registry(open_meta(db, data), open_blobs(blobs, data), content, limits)


__all__ = ["Chunk", "Limits", "Registry", "open_registry", "refused"]
