"""A small OCI distribution-spec v1.1 client over ``registry.transport``: one repository's blobs,
uploads, manifests, tags and referrers.

Every name, tag and digest is checked against the OCI grammar before it is put in a URL.
``Location`` headers may be relative or absolute (absolute only to this registry's own
endpoints). An OCI error becomes ``RegistryRefused(status, code)`` with a one-line message
that quotes the server's text only escaped and bounded. Digests the server reports are never
trusted: manifests are hashed here, blobs by the caller as they arrive.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

from modelseal.errors import DigestMismatch, RegistryError, RegistryRefused
from modelseal.registry import layout
from modelseal.registry.names import check_name, check_tag, parse_digest, shown
from modelseal.registry.transport import Reply, Transport, body_of

_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_RANGE = re.compile(r"(?:bytes=)?0-([0-9]{1,19})")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")
ACCEPT_MANIFEST = f"{layout.IMAGE_MANIFEST}, {layout.IMAGE_INDEX}"
MAX_TAGS_PAGES = 1000


def refused(reply: Reply, what: str) -> RegistryRefused:
    """The ``RegistryRefused`` of a non-success reply, from its OCI error body if it has one."""
    code, message = "", ""
    try:
        doc = json.loads(reply.body[:65536]) if reply.body.startswith(b"{") else None
        first = doc["errors"][0] if isinstance(doc, dict) else None
        if isinstance(first, dict):
            c, m = first.get("code"), first.get("message")
            code, message = (c if isinstance(c, str) else ""), (m if isinstance(m, str) else "")
    except (ValueError, KeyError, IndexError, TypeError):
        pass
    if not _CODE.fullmatch(code or ""):
        code = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NOT_FOUND", 429: "TOOMANYREQUESTS"}.get(reply.status, "")
    reason = f": {shown(message, 120)}" if message else ""
    return RegistryRefused(
        f"the registry refused {what}: {reply.status} {code or 'error'}{reason}", status=reply.status, code=code
    )


def _digest(text: str) -> str:
    d = parse_digest(text)
    if d.algorithm != "sha256":
        raise RegistryError("only sha256 digests are used by modelseal")
    return str(d)


def _with_query(path: str, **params: str) -> str:
    sep = "&" if urlsplit(path).query else "?"
    return path + sep + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


def _range_end(reply: Reply) -> int:
    """The next offset of an upload from its ``Range: 0-N`` header (0 when nothing is stored)."""
    value = reply.header("Range")
    if value is None:
        return 0
    m = _RANGE.fullmatch(value.strip())
    if m is None:
        raise RegistryError(f"the registry sent a malformed Range header {shown(value)}")
    end = int(m[1])
    # "0-0" is what registries send for an empty upload (and, ambiguously, for one byte):
    # read as empty; a wrong guess costs a digest mismatch at the PUT, never a wrong blob.
    return end + 1 if end else 0


class Repository:
    """One repository ``name`` of the registry behind ``transport``."""

    def __init__(self, transport: Transport, name: str) -> None:
        self.transport = transport
        self.name = check_name(name)
        self.base = f"/v2/{self.name}"

    # ---- base, blobs ------------------------------------------------------------------------

    def blob_size(self, digest: str) -> int | None:
        """The size of a blob of this repository, or None if it has none by that digest."""
        reply = self.transport.request("HEAD", f"{self.base}/blobs/{_digest(digest)}")
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise refused(reply, "a blob check")
        length = reply.header("Content-Length") or ""
        return int(length) if length.isdigit() else None

    @contextlib.contextmanager
    def blob(self, digest: str, start: int = 0, end: int | None = None) -> Iterator[http.client.HTTPResponse]:
        """A blob's bytes from ``start`` (to ``end``, inclusive) as a live response. A registry that
        ignores the range answers the whole blob: the bytes before ``start`` are skipped here."""
        path = f"{self.base}/blobs/{_digest(digest)}"
        headers = {"Range": f"bytes={start}-{'' if end is None else end}"} if start or end is not None else {}
        for _ in range(3):  # a redirect (307) to the same registry, at most twice
            with self.transport.stream("GET", path, headers=headers) as (resp, _ep):
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.getheader("Location")
                    resp.read(65536)
                    path = self.transport.resolve_location(location, path)
                    continue
                if resp.status not in (200, 206):
                    raise refused(Reply(resp.status, resp.headers, resp.read(65536), _ep), "a blob download")
                if resp.status == 206:
                    m = _CONTENT_RANGE.fullmatch(resp.getheader("Content-Range") or "")
                    if m is None or int(m[1]) != start:
                        raise RegistryError("the registry answered another range than the one asked for")
                elif start:
                    _skip(resp, start)
                yield resp
                return
        raise RegistryError("the registry redirected a blob download too often")

    def start_upload(self, *, mount: str | None = None, mount_from: str | None = None) -> tuple[str | None, int]:
        """Open an upload: (its location, the smallest chunk the registry takes, 0 if it says none).
        With ``mount`` and ``mount_from``, ask for a cross-repository mount first: a location of
        None means the blob was mounted and nothing needs uploading."""
        path = f"{self.base}/blobs/uploads/"
        if mount is not None and mount_from is not None:
            path = _with_query(path, mount=_digest(mount), **{"from": check_name(mount_from)})
        reply = self.transport.request("POST", path)
        if reply.status == 201 and mount is not None:
            return None, 0
        if reply.status != 202:
            raise refused(reply, "the start of an upload")
        minimum = reply.header("OCI-Chunk-Min-Length") or "0"
        location = self.transport.resolve_location(reply.header("Location"), path)
        return location, int(minimum) if minimum.isdigit() else 0

    def upload_status(self, location: str) -> tuple[str, int] | None:
        """(location, next offset) of an upload in progress, or None if the registry no longer has it."""
        reply = self.transport.request("GET", location)
        if reply.status in (404, 400, 416):
            return None
        if reply.status != 204:
            raise refused(reply, "an upload status check")
        return self.transport.resolve_location(reply.header("Location") or location, location), _range_end(reply)

    def upload_chunk(self, location: str, path: Path, offset: int, length: int) -> tuple[str, int]:
        """PATCH ``length`` bytes of the file ``path`` from ``offset``; returns (the new location,
        the next offset the registry reports). Not retried: the caller asks ``upload_status``."""
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{offset}-{offset + length - 1}",
            "Content-Length": str(length),
        }
        reply = self.transport.request(
            "PATCH", location, headers=headers, body=body_of(path, offset, length), retry=False
        )
        if reply.status != 202:
            raise refused(reply, "an upload chunk")
        nxt = _range_end(reply) if reply.header("Range") is not None else offset + length
        return self.transport.resolve_location(reply.header("Location") or location, location), nxt

    def finish_upload(
        self, location: str, digest: str, path: Path | None = None, offset: int = 0, length: int = 0
    ) -> None:
        """PUT ``?digest=``, with the last ``length`` bytes of ``path`` from ``offset`` as its body if given."""
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        body = body_of(path, offset, length) if path is not None and length else None
        reply = self.transport.request(
            "PUT", _with_query(location, digest=_digest(digest)), headers=headers, body=body, retry=False
        )
        if reply.status not in (201, 204):
            raise refused(reply, "the completion of an upload")

    def put_blob_bytes(self, data: bytes) -> str:
        """Upload a small blob whole (a config, a signature file); returns its digest."""
        digest = layout.sha256_digest(data)
        if self.blob_size(digest) == len(data):
            return digest
        location, _ = self.start_upload()
        assert location is not None
        headers = {"Content-Type": "application/octet-stream"}
        reply = self.transport.request("PUT", _with_query(location, digest=digest), headers=headers, body=data)
        if reply.status not in (201, 204):
            raise refused(reply, "a blob upload")
        return digest

    # ---- manifests, tags, referrers ---------------------------------------------------------

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> tuple[str, bool]:
        """PUT a manifest under a tag or its digest: (its digest, whether the registry answered
        ``OCI-Subject``, i.e. it indexes referrers itself)."""
        digest = layout.sha256_digest(data)
        ref = digest if reference == digest else check_tag(reference)
        reply = self.transport.request(
            "PUT", f"{self.base}/manifests/{ref}", headers={"Content-Type": media_type}, body=data
        )
        if reply.status not in (200, 201, 202):
            raise refused(reply, "a manifest upload")
        return digest, reply.header("OCI-Subject") is not None

    def get_manifest(self, reference: str) -> tuple[bytes, str] | None:
        """(the manifest's bytes, their digest) by tag or digest, None if there is none. A manifest
        asked for by digest must hash to it."""
        ref = _digest(reference) if ":" in reference else check_tag(reference)
        reply = self.transport.request("GET", f"{self.base}/manifests/{ref}", headers={"Accept": ACCEPT_MANIFEST})
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise refused(reply, "a manifest download")
        digest = layout.sha256_digest(reply.body)
        if ":" in reference and digest != ref:
            raise DigestMismatch("the registry returned a manifest that does not hash to the digest asked for")
        return reply.body, digest

    def tags(self, page: int = 1000) -> list[str]:
        """Every tag of the repository, following the ``Link`` header's pagination."""
        out: list[str] = []
        path = f"{self.base}/tags/list?n={page}"
        for _ in range(MAX_TAGS_PAGES):
            reply = self.transport.request("GET", path)
            if reply.status == 404:
                return out
            if reply.status != 200:
                raise refused(reply, "the tag list")
            try:
                doc = json.loads(reply.body)
                tags = doc.get("tags") or []
            except (ValueError, AttributeError):
                raise RegistryError("the registry returned a malformed tag list") from None
            out.extend(check_tag(t) for t in tags if isinstance(t, str))
            link = reply.header("Link")
            m = re.match(r"<([^>]+)>", link or "")
            if m is None:
                return out
            path = self.transport.resolve_location(m[1], path)
        raise RegistryError("the tag list has too many pages")

    def referrers(self, digest: str, artifact_type: str) -> list[layout.Descriptor] | None:
        """The referrers of ``digest`` of ``artifact_type`` from the referrers API, or None if the
        registry has no referrers API (404: use the tag-scheme fallback)."""
        path = _with_query(f"{self.base}/referrers/{_digest(digest)}", artifactType=artifact_type)
        reply = self.transport.request("GET", path, headers={"Accept": layout.IMAGE_INDEX})
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise refused(reply, "the referrers list")
        return [d for d in layout.parse_index(reply.body) if d.artifact_type == artifact_type]

    def delete_manifest(self, digest: str) -> None:
        reply = self.transport.request("DELETE", f"{self.base}/manifests/{_digest(digest)}")
        if reply.status not in (202, 200, 404):
            raise refused(reply, "a manifest deletion")


def _skip(resp: http.client.HTTPResponse, n: int) -> None:
    while n:
        data = resp.read(min(n, 1 << 20))
        if not data:
            raise RegistryError("the blob ended before the offset asked for")
        n -= len(data)


def sha256_file(path: Path, block: int = 4 << 20) -> tuple[str, int]:
    """``sha256:<hex>`` and the size of the file at ``path``, read in blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return "sha256:" + h.hexdigest(), size


__all__ = ["ACCEPT_MANIFEST", "Repository", "refused", "sha256_file"]
