"""The OCI distribution-spec v1.1 routes (end-2 .. end-14; end-1 ``GET /v2/`` is ``server.app``).

A handler parses the request, asks ``allowed`` (the Cedar decision of ``server.authz`` on
the ``Repository`` in this server's environment; at a manifest push or GET under ``sealed-only``,
the encryption standards too, ``server.pushstandards``) and calls ``registry.service.Registry`` in a
thread pool; a ``RegistryRefused`` becomes its status with an OCI error body, any other
registry failure a 503 (507 for a full disk). ``Location`` headers are relative
(``/v2/<name>/...``). Request bodies are read on the event loop in ~1 MiB batches at a
minimum rate (``server.ocihttp.body_batches``); only the write of each batch runs in the
pool, while the next one is read, so a slow client holds no thread. Bodies in flight (blob
chunks and manifests) are bounded per identity and per worker (``ocihttp.UploadSlots``), and
an upload is only ever touched by the identity that started it. Names, tags and digests
reach the registry only as text it validates; the raw path is used and any percent-encoding
in it is refused, so ``%2F`` cannot split a name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from modelseal.errors import BlobStoreError, ModelsealError, RegistryError, RegistryRefused
from modelseal.governance.model import Resource
from modelseal.registry import names
from modelseal.registry.manifests import MAX_MANIFEST
from modelseal.registry.meta import Upload
from modelseal.registry.policy import SEALED_ONLY
from modelseal.registry.service import Registry
from modelseal.server import authz, refusals
from modelseal.server import ocihttp as h
from modelseal.server.authz import AUTHZ
from modelseal.server.identity import IDENTITY
from modelseal.server.pushstandards import check_pull, check_push

log = logging.getLogger("modelseal.server")

REGISTRY: web.AppKey[Registry] = web.AppKey("registry", Registry)
POOL: web.AppKey[ThreadPoolExecutor] = web.AppKey("pool", ThreadPoolExecutor)
SLOTS: web.AppKey[h.UploadSlots] = web.AppKey("slots", h.UploadSlots)
BODY_TIMEOUT: web.AppKey[float] = web.AppKey("body_timeout", float)
INDEX = "application/vnd.oci.image.index.v1+json"
MAX_TAG_PARAMS = 100

Handler = Callable[[web.Request, str, str], Awaitable[web.StreamResponse]]


def repository(request: web.Request, repo: str) -> Resource:
    """The Cedar resource of repository ``repo`` of this server (its environment)."""
    return Resource("Repository", repo, {"env": request.app[AUTHZ].env})


async def allowed(request: web.Request, action: str, repo: str) -> None:
    """The authorization seam: may the request's identity do ``action`` (``pull``, ``push``,
    ``delete``) on ``repo``? The Cedar decision of ``server.authz`` (audited there), asked
    once per request before the handler runs; a refusal is raised (``authz.Refusal``)."""
    if AUTHZ not in request.app:
        raise authz.Refusal(503, "UNAVAILABLE", "this server has no authorization configured")
    await authz.authorize(request, action, repository(request, repo))


def _may_pull(request: web.Request) -> Callable[[str], bool]:
    """For a cross-repository mount (run in the pool): may the caller pull ``source``? A
    refusal only means the blob is uploaded instead (OCI), so it counts no denial."""
    decider, ident = request.app[AUTHZ], request[IDENTITY]

    def may(source: str) -> bool:
        try:
            return decider.decide(ident, "pull", Resource("Repository", source, {"env": decider.env})).allowed
        except ModelsealError:
            return False

    return may


def _loc(name: str, rest: str) -> str:
    return f"/v2/{name}/{rest}"


async def _call(request: web.Request, fn: Callable[..., Any], *args: Any) -> Any:
    return await h.in_thread(request.app[POOL], fn, *args)


def _reg(request: web.Request) -> Registry:
    return request.app[REGISTRY]


def _upload_headers(name: str, upload: str, received: int) -> dict[str, str]:
    return {
        "Location": _loc(name, f"blobs/uploads/{upload}"),
        "Range": f"0-{max(received - 1, 0)}",
        "Docker-Upload-UUID": upload,
    }


# -- blobs (end-2, end-10) ------------------------------------------------------------


async def blob(request: web.Request, name: str, digest: str) -> web.StreamResponse:
    reg = _reg(request)
    if request.method == "DELETE":
        await _call(request, reg.delete_blob, name, digest)
        return web.Response(status=202)
    row = await _call(request, reg.blob, name, digest)
    headers = {
        "Docker-Content-Digest": row.digest,
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
    }
    try:
        span = h.byte_range(request.headers.get("Range"), row.size)
    except RegistryRefused as e:
        return h.error(416, e.code, str(e), request.method == "HEAD", {"Content-Range": f"bytes */{row.size}"})
    start, length = span if span is not None else (0, row.size)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{row.size}"
    headers["Content-Length"] = str(length)
    status = 206 if span is not None else 200
    if request.method == "HEAD":
        return web.Response(status=status, headers=headers)
    resp = web.StreamResponse(status=status, headers=headers)
    await resp.prepare(request)
    it = await _call(request, reg.read_blob, row, start, length)
    pool = request.app[POOL]
    loop = asyncio.get_running_loop()
    pending = loop.run_in_executor(pool, next, it, b"")
    while True:
        chunk = await pending
        if not chunk:
            break
        pending = loop.run_in_executor(pool, next, it, b"")  # read the next MiB while this one is sent
        await resp.write(chunk)
    await resp.write_eof()
    return resp


# -- uploads (end-4a/b, end-5, end-6, end-11, end-13, end-14) --------------------------------


@contextlib.asynccontextmanager
async def _body_slot(request: web.Request) -> AsyncIterator[None]:
    who = request[IDENTITY].uri
    slots = request.app[SLOTS]
    why = slots.take(who)
    if why is not None:
        raise h.bad(429, "TOOMANYREQUESTS", why)
    try:
        yield
    finally:
        slots.give(who)


async def _send_chunk(request: web.Request, name: str, upload: str, start: int | None, length: int | None) -> Upload:
    """Stream the request body into the next chunk of ``upload``: each batch is written in
    the pool while the next one is read on the loop (two batches in memory at most). The
    caller holds a body slot."""
    reg = _reg(request)
    chunk = await _call(request, reg.begin_chunk, name, upload, request[IDENTITY].uri, start, length)
    writing: asyncio.Future[None] | None = None
    try:
        async for batch in h.body_batches(request, request.app[BODY_TIMEOUT]):
            if writing is not None:
                await writing
            writing = asyncio.ensure_future(_call(request, chunk.write, batch))
        if writing is not None:
            await writing
        row: Upload = await _call(request, chunk.close)
        return row
    except BaseException:
        if writing is not None:
            writing.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.shield(_call(request, chunk.abort))  # waits for a write still running
        raise


async def _finish(
    request: web.Request, name: str, upload: str, digest: str, start: int | None, length: int | None
) -> web.Response:
    reg = _reg(request)
    names.parse_digest(digest)  # before any byte of the body is read
    async with _body_slot(request):  # the assembly (hashing the whole blob) holds the slot too
        if length != 0 or start is not None:
            await _send_chunk(request, name, upload, start, length)
        row = await _call(request, reg.finish, name, upload, request[IDENTITY].uri, digest)
    return web.Response(
        status=201, headers={"Location": _loc(name, f"blobs/{row.digest}"), "Docker-Content-Digest": row.digest}
    )


async def start_upload(request: web.Request, name: str, _: str) -> web.StreamResponse:
    reg = _reg(request)
    q = request.query
    mount = q.get("mount")
    if mount is not None:
        source = q.get("from")
        row = await _call(request, reg.mount, name, mount, source, _may_pull(request))
        if row is not None:
            return web.Response(
                status=201, headers={"Location": _loc(name, f"blobs/{row.digest}"), "Docker-Content-Digest": row.digest}
            )
    upload = await _call(request, reg.start_upload, name, request[IDENTITY].uri)
    digest = q.get("digest")
    if digest is None or mount is not None:
        return web.Response(status=202, headers=_upload_headers(name, upload, 0))
    return await _finish(request, name, upload, digest, None, h.content_length(request))


async def upload(request: web.Request, name: str, upload: str) -> web.StreamResponse:
    reg = _reg(request)
    owner = request[IDENTITY].uri
    if request.method == "GET":
        row = await _call(request, reg.upload_status, name, upload, owner)
        return web.Response(status=204, headers=_upload_headers(name, upload, row.received))
    if request.method == "DELETE":
        await _call(request, reg.cancel, name, upload, owner)
        return web.Response(status=204)
    length = h.content_length(request)
    span = h.content_range(request.headers.get("Content-Range"))
    start = None
    if span is not None:
        start, ranged = span
        if length is not None and length != ranged:
            raise h.bad(400, "SIZE_INVALID", "Content-Length differs from the Content-Range")
        length = ranged
        status = await _call(request, reg.upload_status, name, upload, owner)
        if start != status.received:  # before any byte is read: a gap or an overlap
            return h.error(
                416,
                "BLOB_UPLOAD_INVALID",
                f"the chunk starts at {start}, the upload has {status.received} bytes",
                headers=_upload_headers(name, upload, status.received),
            )
    if request.method == "PATCH":
        async with _body_slot(request):
            row = await _send_chunk(request, name, upload, start, length)
        return web.Response(status=202, headers=_upload_headers(name, upload, row.received))
    digest = request.query.get("digest")
    if digest is None:
        raise h.bad(400, "DIGEST_INVALID", "closing an upload takes ?digest=")
    return await _finish(request, name, upload, digest, start, length)


# -- manifests (end-3, end-7, end-9) ------------------------------------------------------


async def _read_manifest(request: web.Request) -> bytes:
    """The manifest body (at most 4 MiB), read at the same minimum rate as blob bodies; the
    caller holds a body slot."""
    length = h.content_length(request)
    if length is not None and length > MAX_MANIFEST:
        raise h.bad(413, "SIZE_INVALID", f"a manifest over {MAX_MANIFEST} bytes is refused")
    parts: list[bytes] = []
    size = 0
    async for batch in h.body_batches(request, request.app[BODY_TIMEOUT], code="MANIFEST_INVALID"):
        size += len(batch)
        if size > MAX_MANIFEST:
            raise h.bad(413, "SIZE_INVALID", f"a manifest over {MAX_MANIFEST} bytes is refused")
        parts.append(batch)
    return b"".join(parts)


async def manifest(request: web.Request, name: str, reference: str) -> web.StreamResponse:
    reg = _reg(request)
    if request.method == "DELETE":
        await _call(request, reg.delete_manifest, name, reference)
        return web.Response(status=202)
    if request.method == "PUT":
        tags = request.query.getall("tag", [])
        if len(tags) > MAX_TAG_PARAMS:
            raise h.bad(414, "MANIFEST_INVALID", f"at most {MAX_TAG_PARAMS} tag parameters")
        ctype = request.headers.get("Content-Type")
        async with _body_slot(request):
            body = await _read_manifest(request)
            if reg.content == SEALED_ONLY:  # the encryption standards, on the sealed layers' headers
                await check_push(request, name, body, reg, request.app[POOL])
            digest, subject, set_tags = await _call(request, reg.put_manifest, name, reference, body, ctype, tags)
        headers = {"Location": _loc(name, f"manifests/{digest}"), "Docker-Content-Digest": digest}
        if subject:
            headers["OCI-Subject"] = subject
        if tags:
            headers["OCI-Tag"] = ", ".join(t for t in set_tags if t in tags)
        return web.Response(status=201, headers=headers)
    head = request.method == "HEAD"
    row = await _call(request, reg.get_manifest, name, reference, not head)
    headers = {"Docker-Content-Digest": row.digest, "Content-Type": row.media_type, "Content-Length": str(row.size)}
    if head:
        return web.Response(status=200, headers=headers)
    if reg.content == SEALED_ONLY:  # the encryption standards again, as artifact.pull
        await check_pull(request, name, row, reg, request.app[POOL])
    return web.Response(
        status=200, body=row.body, headers={"Docker-Content-Digest": row.digest, "Content-Type": row.media_type}
    )


# -- discovery (end-8, end-12) --------------------------------------------------------------


async def tags_list(request: web.Request, name: str, _: str) -> web.StreamResponse:
    n_text = request.query.get("n")
    if n_text is not None and (not n_text.isdigit() or len(n_text) > 9):
        raise h.bad(400, "UNSUPPORTED", "n must be a non-negative integer")
    n = None if n_text is None else int(n_text)
    last = request.query.get("last")
    tags, more = await _call(request, _reg(request).tags, name, n, last)
    headers = {}
    if more and tags:
        page = f"n={n}&" if n is not None else ""
        headers["Link"] = f'<{_loc(name, "tags/list")}?{page}last={tags[-1]}>; rel="next"'
    return web.json_response({"name": name, "tags": tags}, headers=headers)


async def referrers(request: web.Request, name: str, digest: str) -> web.StreamResponse:
    artifact_type = request.query.get("artifactType")
    found = await _call(request, _reg(request).referrers, name, digest, artifact_type)
    headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type is not None else {}
    body = {"schemaVersion": 2, "mediaType": INDEX, "manifests": found}
    headers["Content-Type"] = INDEX  # exactly, with no charset parameter (the spec's MUST)
    return web.Response(body=json.dumps(body).encode(), headers=headers)


# -- dispatch ----------------------------------------------------------------------------------

ROUTES: list[tuple[re.Pattern[str], dict[str, tuple[str, Handler]]]] = [
    (re.compile(r"/v2/(.+)/blobs/uploads/"), {"POST": ("push", start_upload)}),
    (
        re.compile(r"/v2/(.+)/blobs/uploads/([^/]+)"),
        {"GET": ("push", upload), "PATCH": ("push", upload), "PUT": ("push", upload), "DELETE": ("push", upload)},
    ),
    (
        re.compile(r"/v2/(.+)/blobs/([^/]+)"),
        {"GET": ("pull", blob), "HEAD": ("pull", blob), "DELETE": ("delete", blob)},
    ),
    (
        re.compile(r"/v2/(.+)/manifests/([^/]+)"),
        {
            "GET": ("pull", manifest),
            "HEAD": ("pull", manifest),
            "PUT": ("push", manifest),
            "DELETE": ("delete", manifest),
        },
    ),
    (re.compile(r"/v2/(.+)/tags/(list)"), {"GET": ("pull", tags_list)}),
    (re.compile(r"/v2/(.+)/referrers/([^/]+)"), {"GET": ("pull", referrers)}),
]


_CODES = {403: "DENIED", 429: "TOOMANYREQUESTS", 503: "UNAVAILABLE"}


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Route ``/v2/<name>/...`` by the raw path; map refusals to OCI errors."""
    head = request.method == "HEAD"
    path = request.raw_path.split("?", 1)[0]
    if "%" in path:
        return h.error(400, "NAME_INVALID", "percent-encoded characters are not allowed in the path", head)
    for pattern, methods in ROUTES:
        m = pattern.fullmatch(path)
        if m is None:
            continue
        entry = methods.get(request.method)
        if entry is None:
            return h.error(
                405, "UNSUPPORTED", f"{request.method} is not allowed here", head, {"Allow": ", ".join(methods)}
            )
        action, handler = entry
        name, arg = m.group(1), (m.group(2) if m.lastindex and m.lastindex > 1 else "")
        try:
            await allowed(request, action, name)
        except authz.Refusal as r:
            return h.error(r.status, _CODES.get(r.status, "DENIED"), r.reason_line, head, r.extra)
        try:
            return await handler(request, name, arg)
        except authz.Refusal as r:  # a decision inside the handler (the standards at push)
            return h.error(r.status, _CODES.get(r.status, "DENIED"), r.reason_line, head, r.extra)
        except RegistryRefused as e:
            log.info("%s %s refused: %s %s", request.method, action, e.status, e.code)
            refusals.content_refused(request, name, e)  # a sealed-only refusal is audited (content-refused)
            resp = h.refusal(e, head)
            if e.status in (408, 413) or (e.status == 429 and not request.content.at_eof()):
                resp.force_close()  # a body left unread is not drained: the connection goes
            if e.status == 429:
                resp.headers["Retry-After"] = "1"
            return resp
        except BlobStoreError as e:
            log.error("blob store failure on %s: %s", request.method, e)
            return h.error(507 if "full" in str(e) else 503, "UNKNOWN", str(e), head)
        except RegistryError as e:
            log.error("registry failure on %s: %s", request.method, e)
            return h.error(503, "UNKNOWN", str(e), head)
    return h.error(404, "NAME_UNKNOWN", "no such endpoint", head)


def add_routes(
    app: web.Application, registry: Registry, body_timeout: float = h.BODY_READ_TIMEOUT, workers: int = 32
) -> None:
    """Mount the OCI routes over ``registry`` on ``app`` (its thread pool closes with the app).
    ``body_timeout``: seconds each MiB of a request body (or its rest) may take before it is
    refused (408). Bodies in flight are capped below ``workers`` (the pool's threads)."""
    app[REGISTRY] = registry
    app[BODY_TIMEOUT] = body_timeout
    app[POOL] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="registry")
    app[SLOTS] = h.UploadSlots(total=max(1, min(h.MAX_UPLOADS, workers * 3 // 4)))
    app.router.add_route("*", "/v2/{tail:.+}", dispatch)

    async def close_pool(app: web.Application) -> None:
        app[POOL].shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(close_pool)


__all__ = ["POOL", "REGISTRY", "add_routes", "allowed", "dispatch", "repository"]
