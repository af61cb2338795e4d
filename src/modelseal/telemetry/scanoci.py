"""``modelseal scan oci://HOST[:PORT]/REPO[:TAG]``: every layer of every tagged manifest of a
repository by content, through our registry client: mutual TLS with the operator's
certificate and the CA pins of the registry settings (``registry.settings``: ``--tls-dir``,
``--pin``, the environment, ``[registry]``), as push and pull use them, except that a scan
never renews the client certificate (it changes nothing).

Nothing a manifest says decides what is skipped: whatever its ``mediaType`` or
``artifactType`` (OCI or Docker, image, artifact, signature referrer), every manifest's
``layers`` (and an artifact manifest's ``blobs``) are read, each distinct digest once per
manifest, and every entry of its ``manifests`` list (an OCI index, a Docker manifest list, or
any manifest carrying one) is followed, ``MAX_DEPTH`` levels and ``MAX_MANIFESTS`` manifests
per target at most, ``MAX_INDEX`` entries per list. What a bound leaves out is an error of
the report (the scan is incomplete), never silence. A descriptor's ``size`` is not trusted
either: each layer's first bytes are read with one ``Range`` GET of the prefix, and its size
is the one the registry states for the blob (``Content-Range``, else ``Content-Length``,
else a ``HEAD``). Further reads are ranged GETs of the bytes ``scanartifacts`` asks for.

A sealed layer's signatures are the manifest's signature referrers
(``transfer.fetch_signatures``: the newest few, each bounded and digest-checked), fetched
once per manifest. What the registry serves is what is judged: a ranged read cannot be
checked against the blob's digest (``pull`` checks every byte; a scan reads headers only).
"""

from __future__ import annotations

import http.client
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.errors import RegistryError, RegistryRefused
from modelseal.registry import settings, transfer
from modelseal.registry.client import Repository
from modelseal.registry.reference import parse_reference
from modelseal.registry.transport import RegistryUnavailable, Transport
from modelseal.telemetry.scanartifacts import ScanContext, examine
from modelseal.util.bounded import json_loads

REMOTE_PREFIX = 16 << 10
MAX_INDEX = 1024  # entries of one manifest list that are followed
MAX_DEPTH = 4  # levels of lists within lists
MAX_MANIFESTS = 20_000  # manifests read per target
MAX_LAYERS = 100_001  # layout.MAX_LAYERS: a folder's manifest and its blobs
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")


class OciBlob:
    """One layer of a repository: its first bytes and its size from one ranged GET (``open``),
    the rest by ranged GETs."""

    def __init__(self, repo: Repository, where: str, digest: str) -> None:
        self._repo, self._where, self.digest = repo, where, digest
        self._head = b""
        self._size = 0

    @property
    def location(self) -> str:
        return f"{self._where}#{self.digest}"

    @property
    def size(self) -> int:
        return self._size

    def open(self, prefix: int) -> None:
        """Read the first ``prefix`` bytes and learn the blob's size from the registry."""
        total: int | None = None
        try:
            with self._repo.blob(self.digest, 0, prefix - 1) as resp:
                self._head = bytes(resp.read(prefix))
                if resp.status == 206:
                    m = _CONTENT_RANGE.fullmatch(resp.getheader("Content-Range") or "")
                    total = int(m[3]) if m is not None and m[3] != "*" else None
                else:
                    length = resp.getheader("Content-Length") or ""
                    total = int(length) if length.isdigit() else None
            if total is None and len(self._head) < prefix:
                total = len(self._head)  # the whole blob came back
            if total is None:
                total = self._repo.blob_size(self.digest)
        except RegistryUnavailable:
            raise
        except RegistryRefused as e:
            if e.status != 416:  # an empty blob has no first byte to range over
                raise OSError(str(e)) from None
            total = self._empty()
        except (RegistryError, http.client.HTTPException, ValueError) as e:
            raise OSError(str(e)) from None
        if total is None or total < len(self._head):
            raise OSError("the registry does not say how large the blob is")
        self._size = total

    def _empty(self) -> int | None:
        try:
            return self._repo.blob_size(self.digest)
        except (RegistryError, http.client.HTTPException, ValueError) as e:
            raise OSError(str(e)) from None

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0 or offset >= self._size:
            return b""
        if offset + length <= len(self._head) or (offset < len(self._head) and len(self._head) == self._size):
            return self._head[offset : offset + length]
        last = min(offset + length, self._size) - 1
        try:
            with self._repo.blob(self.digest, offset, last) as resp:
                return bytes(resp.read(last - offset + 1))
        except RegistryUnavailable:
            raise
        except (RegistryError, http.client.HTTPException, ValueError) as e:
            raise OSError(str(e)) from None


@dataclass
class _Walk:
    repo: Repository
    ctx: ScanContext
    seen: set[str] = field(default_factory=set)
    cut: bool = False


def _doc(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json_loads(body, max_depth=8, max_values=8 * MAX_LAYERS + 64, error=ValueError, what="manifest")
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def digests(doc: dict[str, Any], key: str) -> list[str]:
    """The distinct digests of the descriptors under ``key``, in order (sizes and types ignored)."""
    items = doc.get(key)
    out = [d.get("digest") for d in items if isinstance(d, dict)] if isinstance(items, list) else []
    return list(dict.fromkeys(d for d in out if isinstance(d, str)))


def scan_oci(target: str, ctx: ScanContext, *, tls_dir: Path | None = None, pins: list[str] | None = None) -> None:
    ref = parse_reference(target, default_tag="")
    if ref.endpoint is None:
        raise ValueError("oci:// needs HOST[:PORT]/REPO")
    s = settings.load(tls_dir=tls_dir, pins=pins)
    # Not transfer.open_repository: a scan changes nothing, not even the client certificate
    # (push and pull renew it when due). A pin mismatch is still audited by the transport.
    repo = Repository(Transport(settings.endpoints_for(ref, s), settings.require_tls_dir(s), s.pins), ref.name)
    base = f"oci://{ref.endpoint}/{ref.name}"
    saved, ctx.prefix = ctx.prefix, max(ctx.prefix, REMOTE_PREFIX)
    try:
        if ref.digest is not None:
            wanted = [str(ref.digest)]
        elif ref.tag:
            wanted = [ref.tag]
        else:
            wanted = repo.tags()
        walk = _Walk(repo, ctx)
        for reference in wanted:
            got = repo.get_manifest(reference)
            if got is None:
                ctx.report.error(f"{base}:{reference}", "no such manifest")
                continue
            sep = "@" if reference.startswith("sha256:") else ":"
            _manifest(walk, f"{base}{sep}{reference}", got[0], got[1], depth=0)
    finally:
        ctx.prefix = saved
        repo.transport.close()


def _manifest(walk: _Walk, where: str, body: bytes, digest: str, depth: int) -> None:
    report = walk.ctx.report
    if digest in walk.seen:
        return
    if len(walk.seen) >= MAX_MANIFESTS:
        if not walk.cut:
            report.error(where, f"more than {MAX_MANIFESTS} manifests: the rest of this target is not scanned")
            walk.cut = True
        return
    walk.seen.add(digest)
    doc = _doc(body)
    if doc is None:
        report.error(where, "a manifest that is not JSON: not scanned")
        return
    children = digests(doc, "manifests")
    if children and depth >= MAX_DEPTH:
        report.error(where, f"manifest lists nested more than {MAX_DEPTH} deep: {len(children)} not scanned")
    elif children:
        if len(children) > MAX_INDEX:
            report.error(
                where, f"a list of {len(children)} manifests: the last {len(children) - MAX_INDEX} not scanned"
            )
        for child in children[:MAX_INDEX]:
            try:
                got = walk.repo.get_manifest(child)
            except RegistryUnavailable:
                raise
            except (RegistryError, ValueError) as e:
                report.error(f"{where}@{child}", f"a listed manifest cannot be read ({e})")
                continue
            if got is None:
                report.error(f"{where}@{child}", "a listed manifest the registry does not have")
                continue
            _manifest(walk, f"{where}@{child}", got[0], got[1], depth + 1)
    _layers(walk, where, doc, digest)


def _layers(walk: _Walk, where: str, doc: dict[str, Any], digest: str) -> None:
    ctx, repo = walk.ctx, walk.repo
    layers = list(dict.fromkeys([*digests(doc, "layers"), *digests(doc, "blobs")]))
    if len(layers) > MAX_LAYERS:
        ctx.report.error(where, f"{len(layers)} layers, more than {MAX_LAYERS}: the rest not scanned")
    signatures: list[bytes] | None = None

    def neighbours(kind: int) -> tuple[str, list[bytes]]:
        nonlocal signatures
        if signatures is None:
            try:
                signatures = transfer.fetch_signatures(repo, digest)[0]
            except RegistryUnavailable:
                raise
            except RegistryError as e:
                ctx.report.error(where, f"its signature referrers cannot be listed ({e})")
                signatures = []
        return where, signatures

    for layer in layers[:MAX_LAYERS]:
        blob = OciBlob(repo, where, layer)
        try:
            blob.open(ctx.prefix)
        except OSError as e:
            ctx.report.files += 1
            ctx.report.error(blob.location, f"cannot read it ({e})")
            continue
        try:
            examine(blob, ctx, neighbours)
        except OSError as e:
            ctx.report.error(blob.location, f"cannot read it ({e})")


__all__ = ["MAX_DEPTH", "MAX_INDEX", "MAX_MANIFESTS", "OciBlob", "digests", "scan_oci"]
