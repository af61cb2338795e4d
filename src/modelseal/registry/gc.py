"""Online garbage collection of the registry (docs/registry.md, "Garbage collection").

No stop-the-world pass: ``collect`` does a bounded batch of small steps, each its own short
transaction that re-checks its condition, so pushes and pulls go on, and any number of
instances may collect at once. One pass, in order:

1. **Links** a repository holds to blobs that none of its manifests references, older than
   ``link_grace`` (a blob pushed and then never named by a manifest), are dropped. Putting a
   manifest touches the links it references, in the same transaction that checks them.
2. **Blob rows** that no repository links any more, untouched for ``blob_grace``, are dropped.
   A mount or an upload of the same digest touches the row in its transaction, so it wins.
3. **Stored bytes** that no blob row names are deleted from the blob store, each under a
   ``sweep`` hold taken in one transaction with the check; an upload being assembled holds a
   ``pending`` hold on its key first (``Registry.finish``), so the two exclude each other.
4. **Uploads** untouched for ``upload_ttl`` are dropped with their parts; parts in the blob
   store of uploads the metadata no longer knows are deleted.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

from modelseal.registry.service import Registry

log = logging.getLogger("modelseal.registry")


@dataclass
class Swept:
    links: int = 0
    blob_rows: int = 0
    stored: int = 0
    uploads: int = 0
    errors: list[str] = field(default_factory=list)


def collect(reg: Registry, batch: int = 200) -> Swept:
    """One online pass over at most ``batch`` candidates of each kind."""
    out = Swept()
    now = reg.now()
    lim = reg.limits
    for repo, digest in reg.meta.stale_links(now - lim.link_grace, batch):
        out.links += reg.meta.drop_stale_link(repo, digest, now - lim.link_grace)
    for digest in reg.meta.orphan_blobs(now - lim.blob_grace, batch):
        out.blob_rows += reg.meta.drop_orphan_blob(digest, now - lim.blob_grace)
    holder = "gc-" + secrets.token_hex(8)
    for key in _first(reg.blobs.digests(), 100 * batch):
        if reg.meta.storage_known(key) or not reg.meta.hold_sweep(key, holder, reg.now()):
            continue
        try:
            reg.blobs.delete(key)
            out.stored += 1
        except Exception as e:  # a store failure stops nothing; the next pass retries
            out.errors.append(type(e).__name__)
        finally:
            reg.meta.release(key, holder)
    for upload in reg.meta.uploads_idle(now - lim.upload_ttl, batch):
        if reg.meta.upload_delete_idle(upload, now - lim.upload_ttl):
            reg.blobs.delete_upload(upload)
            out.uploads += 1
    for upload in _first(reg.blobs.uploads(), 100 * batch):
        if not reg.meta.upload_known(upload):
            reg.blobs.delete_upload(upload)
            out.uploads += 1
    sweep_tmp = getattr(reg.blobs, "sweep_tmp", None)
    if sweep_tmp is not None:
        sweep_tmp(now - 3600.0)
    if out.links or out.blob_rows or out.stored or out.uploads:
        log.info(
            "gc: %d links, %d blob rows, %d stored blobs, %d uploads swept",
            out.links,
            out.blob_rows,
            out.stored,
            out.uploads,
        )
    return out


def _first(items: object, n: int) -> list[str]:
    from collections.abc import Iterator

    assert isinstance(items, Iterator)
    got: list[str] = []
    for item in items:
        got.append(str(item))
        if len(got) >= n:
            break
    return got


__all__ = ["Swept", "collect"]
