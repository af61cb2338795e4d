"""The blob store for ``--blobs URL``, chosen by scheme: each backend is imported only when used
(boto3 only for ``s3://``). Kept apart from ``registry.blobs`` so the backends can import the
interface's key grammar without a cycle."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from modelseal.registry.blobs import BlobStore


def open_blobs(url: str | None, data: Path) -> BlobStore:
    """The store for ``--blobs URL``: None or ``file:///abs/path`` is a folder (None: ``data/blobs``),
    ``s3://BUCKET/PREFIX`` is S3 (endpoint and credentials from the standard AWS settings)."""
    if url is None:
        from modelseal.registry.localblobs import LocalBlobs

        return LocalBlobs(data / "blobs")
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.path.startswith("/") and not parts.netloc:
        from modelseal.registry.localblobs import LocalBlobs

        return LocalBlobs(Path(parts.path))
    if parts.scheme == "s3" and parts.netloc:
        from modelseal.registry.s3blobs import S3Blobs

        return S3Blobs(parts.netloc, parts.path.strip("/"))
    raise ValueError("--blobs takes file:///PATH or s3://BUCKET/PREFIX")


__all__ = ["open_blobs"]
