"""The encryption standards at push and pull: before a manifest is stored under
``sealed-only``, the header of each sealed layer it names (a lone sealed file, or a folder's
manifest) is read from the blob store and decided as ``artifact.push`` on an ``Artifact`` by
``server.authz``, with the facts ``governance.standards.facts_from_header`` finds in it,
judged by this server's environment; a GET of a manifest is decided the same way as
``artifact.pull`` before its body is served, so an exception that expires stops pulls at
once. A standard's deny (``std-prod-kms``: never ``local:`` in prod, the KEK cryptoperiod,
TLS 1.3) refuses with 403 and the standard's reason, unless an exception waives it (then
audited ``allow-exception:ID``). The facts of a manifest digest never change (its layers
are named by digest; no clock or key state enters them here), so pulls keep them in memory
per manifest digest (``MAX_CACHED``); the decision itself is made on every request.

Only the first bytes of a layer are read (its header, at most ``format.header.MAX_HEADER``);
the body is parsed as the registry parses it (a body that is not a manifest is refused
the same way), and a layer the repository does not hold is left to the registry, which
refuses the manifest. Folder blobs have no recipients and are not
read. Knows no HTTP beyond the decision it asks for.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from modelseal.errors import FormatError, RegistryRefused
from modelseal.format.header import MAX_HEADER
from modelseal.governance.model import Resource
from modelseal.governance.standards import ArtifactFacts, facts_from_header
from modelseal.registry import layout
from modelseal.registry.manifests import parse_manifest
from modelseal.registry.meta import ManifestRow
from modelseal.registry.service import Registry
from modelseal.server import authz
from modelseal.server import ocihttp as h

SEALED_MEDIA = (layout.SEALED_FILE, layout.FOLDER_MANIFEST)
FIRST_READ = 64 << 10  # most headers; a longer one is read again, up to MAX_HEADER
MAX_CHECKED = 16  # sealed layers one manifest may name (an artifact has one)
MAX_CACHED = 4096  # manifests whose layer facts pulls keep (cleared whole when full)
Facts = tuple[tuple[str, ArtifactFacts], ...]
_cache: dict[tuple[str, str], Facts] = {}  # (server env, manifest digest) -> its sealed layers' facts
_cache_lock = threading.Lock()


def sealed_layers(body: bytes, content_type: str | None) -> list[tuple[str, int]]:
    """``(digest, size)`` of the sealed layers the manifest ``body`` names (parsed as the
    registry parses it: ``RegistryRefused`` 400 when it is not a manifest)."""
    layers = parse_manifest(body, content_type).doc.get("layers")
    out: dict[str, int] = {}
    for d in layers if isinstance(layers, list) else []:
        if not isinstance(d, dict) or d.get("mediaType") not in SEALED_MEDIA:
            continue
        digest, size = d.get("digest"), d.get("size")
        if isinstance(digest, str) and isinstance(size, int) and not isinstance(size, bool) and size > 0:
            out.setdefault(digest, size)
    if len(out) > MAX_CHECKED:
        raise h.bad(400, "MANIFEST_INVALID", f"a manifest names at most {MAX_CHECKED} sealed layers")
    return list(out.items())


def _head(reg: Registry, repo: str, digest: str, length: int) -> bytes | None:
    """The first ``length`` bytes of blob ``digest`` of ``repo``; None if it holds none."""
    try:
        row = reg.blob(repo, digest)
    except RegistryRefused:
        return None
    parts, got = [], 0
    for chunk in reg.read_blob(row, 0, min(length, row.size)):
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def _layer_facts(
    request: web.Request, repo: str, body: bytes, ctype: str | None, reg: Registry, pool: ThreadPoolExecutor
) -> tuple[Facts, bool]:
    """The facts of each sealed layer of the manifest ``body`` that ``repo`` holds, and
    whether it held every one; a header that does not parse is refused (403)."""
    env = request.app[authz.AUTHZ].env
    layers = await h.in_thread(pool, sealed_layers, body, ctype)
    out: list[tuple[str, ArtifactFacts]] = []
    for digest, size in layers:
        raw = await h.in_thread(pool, _head, reg, repo, digest, FIRST_READ)
        if raw is None:
            continue  # unknown to the repository: the registry refuses the manifest
        try:
            try:
                facts = facts_from_header(raw, env)
            except FormatError:
                if len(raw) >= min(size, MAX_HEADER):
                    raise
                raw = await h.in_thread(pool, _head, reg, repo, digest, MAX_HEADER)
                facts = facts_from_header(raw or b"", env)
        except FormatError as e:
            raise authz.Refusal(403, "DENIED", f"layer {digest[:80]}: its sealed header does not parse ({e})") from None
        out.append((digest, facts))
    return tuple(out), len(out) == len(layers)


async def check_push(request: web.Request, repo: str, body: bytes, reg: Registry, pool: ThreadPoolExecutor) -> None:
    """Decide ``artifact.push`` for each sealed layer of the manifest ``body`` (module
    docstring); a refusal is raised (``authz.Refusal``)."""
    facts, _ = await _layer_facts(request, repo, body, request.headers.get("Content-Type"), reg, pool)
    for digest, f in facts:
        await authz.authorize(request, "artifact.push", Resource("Artifact", digest, f.attrs()))


async def check_pull(
    request: web.Request, repo: str, row: ManifestRow, reg: Registry, pool: ThreadPoolExecutor
) -> None:
    """Decide ``artifact.pull`` for each sealed layer of the manifest ``row`` about to be
    served (module docstring); a refusal is raised (``authz.Refusal``)."""
    key = (request.app[authz.AUTHZ].env, row.digest)
    with _cache_lock:
        facts = _cache.get(key)
    if facts is None:
        facts, whole = await _layer_facts(request, repo, row.body or b"", row.media_type, reg, pool)
        with _cache_lock:
            if whole:  # a layer this repository lacks is looked for again next time
                if len(_cache) >= MAX_CACHED:
                    _cache.clear()
                _cache[key] = facts
    for digest, f in facts:
        await authz.authorize(request, "artifact.pull", Resource("Artifact", digest, f.attrs()))


__all__ = ["MAX_CACHED", "SEALED_MEDIA", "check_pull", "check_push", "sealed_layers"]
