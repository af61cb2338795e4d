"""The encryption standards at push: before a manifest is stored under ``sealed-only``, the
header of each sealed layer it names (a lone sealed file, or a folder's manifest) is read
from the blob store and decided as ``artifact.push`` on an ``Artifact`` by ``server.authz``,
with the facts ``governance.standards.facts_from_header`` finds in it, judged by this
server's environment. A standard's deny (``std-prod-kms``: never ``local:`` in prod, the
KEK cryptoperiod, TLS 1.3) refuses the push with 403 and the standard's reason, unless an
exception waives it (then audited ``allow-exception:ID``).

Only the first bytes of a layer are read (its header, at most ``format.header.MAX_HEADER``);
the body is parsed as the registry parses it (a body that is not a manifest is refused
the same way), and a layer the repository does not hold is left to the registry, which
refuses the manifest. Folder blobs have no recipients and are not
read. Knows no HTTP beyond the decision it asks for.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from modelseal.errors import FormatError, RegistryRefused
from modelseal.format.header import MAX_HEADER
from modelseal.governance.model import Resource
from modelseal.governance.standards import facts_from_header
from modelseal.registry import layout
from modelseal.registry.manifests import parse_manifest
from modelseal.registry.service import Registry
from modelseal.server import authz
from modelseal.server import ocihttp as h

SEALED_MEDIA = (layout.SEALED_FILE, layout.FOLDER_MANIFEST)
FIRST_READ = 64 << 10  # most headers; a longer one is read again, up to MAX_HEADER
MAX_CHECKED = 16  # sealed layers one manifest may name (an artifact has one)


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


async def check_push(request: web.Request, repo: str, body: bytes, reg: Registry, pool: ThreadPoolExecutor) -> None:
    """Decide ``artifact.push`` for each sealed layer of the manifest ``body`` (module
    docstring); a refusal is raised (``authz.Refusal``)."""
    decider = request.app[authz.AUTHZ]
    layers = await h.in_thread(pool, sealed_layers, body, request.headers.get("Content-Type"))
    for digest, size in layers:
        raw = await h.in_thread(pool, _head, reg, repo, digest, FIRST_READ)
        if raw is None:
            continue  # unknown to the repository: the registry refuses the manifest
        try:
            try:
                facts = facts_from_header(raw, decider.env)
            except FormatError:
                if len(raw) >= min(size, MAX_HEADER):
                    raise
                raw = await h.in_thread(pool, _head, reg, repo, digest, MAX_HEADER)
                facts = facts_from_header(raw or b"", decider.env)
        except FormatError as e:
            raise authz.Refusal(403, "DENIED", f"layer {digest[:80]}: its sealed header does not parse ({e})") from None
        await authz.authorize(request, "artifact.push", Resource("Artifact", digest, facts.attrs()))


__all__ = ["SEALED_MEDIA", "check_push", "sealed_layers"]
