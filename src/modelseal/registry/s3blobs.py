"""The ``s3://BUCKET/PREFIX`` blob store: blobs and upload parts as S3 objects, through boto3.

Layout under ``PREFIX/``: ``blobs/sha256/<hex>`` (verified blobs) and ``uploads/<id>/<index>``
(parts of uploads in progress). Every object appears whole or not at all: a part or blob
small enough for one buffer is one ``PutObject``; a larger one is an S3 multipart upload
that is completed only at the end (a part: ``commit``; a blob: after its SHA-256 matched)
and aborted on any failure. A crash leaves at most an incomplete multipart upload, which
S3 never lists as an object; ``sweep_tmp`` (which the GC calls) aborts those that received
no part for a while, and ``delete_upload`` those of its upload.

``assemble`` streams the parts through this process (GET, hash, upload part), one upload
in flight while the next bytes are read: the bytes hashed are the bytes written. Endpoint,
region and credentials come from the standard AWS settings (``AWS_ENDPOINT_URL(_S3)``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``...), read by boto3 itself.
Errors become one-line ``BlobStoreError``\\s naming the S3 operation and error code, never
an endpoint URL or a credential (and they keep no botocore exception as their cause).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from modelseal.errors import BlobStoreError, DigestMismatch
from modelseal.registry.blobs import HEX64, UPLOAD_ID, check_hex, check_upload

MiB = 1 << 20
PART_MIN = 8 * MiB  # S3 parts are >= 5 MiB except the last; 8 MiB per buffer
PART_MAX = 256 * MiB  # part size doubles every 1000 parts: S3's 10000 parts hold ~1.45 TiB
READ_CHUNK = 4 * MiB
STREAM_RETRIES = 3


def _part_size(part_number: int) -> int:
    return min(PART_MIN << ((part_number - 1) // 1000), PART_MAX)


def _code(exc: Exception) -> str:
    """The S3 error code of a botocore ClientError (the HTTP status for a HEAD), else ""."""
    resp = getattr(exc, "response", None)
    if not isinstance(resp, dict):
        return ""
    return str(resp.get("Error", {}).get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _error(op: str, exc: Exception) -> BlobStoreError:
    """A one-line BlobStoreError for a botocore failure: the operation and S3 error code only."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, BlobStoreError):
        return exc
    code = _code(exc)
    if code == "NoSuchBucket" or (op == "HeadBucket" and code == "404"):
        return BlobStoreError(f"S3 {op} failed: the bucket does not exist")
    if isinstance(exc, ClientError):
        return BlobStoreError(f"S3 {op} failed: {code[:64] or '?'}")
    if isinstance(exc, EndpointConnectionError):
        return BlobStoreError(f"S3 {op} failed: the S3 endpoint is unreachable")
    if isinstance(exc, NoCredentialsError):
        return BlobStoreError(f"S3 {op} failed: no AWS credentials are configured")
    return BlobStoreError(f"S3 {op} failed: {type(exc).__name__}")


class _ObjectWriter:
    """Bytes written to one key, visible only after ``commit``: one PutObject if they fit in
    the first buffer, otherwise a multipart upload with one part upload in flight."""

    def __init__(self, s3: S3Blobs, key: str) -> None:
        self._s3 = s3
        self._key = key
        self._buf = bytearray()
        self._mpu: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._inflight: Future[dict[str, Any]] | None = None
        self._number = 1  # the S3 part number the buffer will be sent as
        self._size = 0
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        if self._done:
            raise BlobStoreError("S3 write after commit or abort")
        view = memoryview(data).cast("B")
        while view:
            take = view[: _part_size(self._number) - len(self._buf)]
            self._buf += take
            self._size += len(take)
            view = view[len(take) :]
            if len(self._buf) >= _part_size(self._number):
                self._flush()

    def _flush(self) -> None:
        """Send the buffer as part ``_number``, once the part before it has finished."""
        try:
            if self._mpu is None:
                r = self._s3.client.create_multipart_upload(Bucket=self._s3.bucket, Key=self._key)
                self._mpu = str(r["UploadId"])
            self._settle()
            body, self._buf = bytes(self._buf), bytearray()
            self._inflight = self._s3.pool.submit(self._upload_part, self._mpu, self._number, body)
            self._number += 1
        except Exception as exc:
            self.abort()
            raise _error("UploadPart", exc) from None

    def _upload_part(self, mpu: str, number: int, body: bytes) -> dict[str, Any]:
        r = self._s3.client.upload_part(
            Bucket=self._s3.bucket, Key=self._key, UploadId=mpu, PartNumber=number, Body=body
        )
        return {"PartNumber": number, "ETag": r["ETag"]}

    def _settle(self) -> None:
        if self._inflight is not None:
            future, self._inflight = self._inflight, None
            self._parts.append(future.result())

    def commit(self) -> int:
        """Make the object visible; returns its size."""
        if self._done:
            raise BlobStoreError("S3 commit after commit or abort")
        try:
            if self._mpu is None:
                self._s3.client.put_object(Bucket=self._s3.bucket, Key=self._key, Body=bytes(self._buf))
            else:
                if self._buf:
                    self._flush()
                self._settle()
                self._s3.client.complete_multipart_upload(
                    Bucket=self._s3.bucket, Key=self._key, UploadId=self._mpu, MultipartUpload={"Parts": self._parts}
                )
        except Exception as exc:
            self.abort()
            raise _error("PutObject" if self._mpu is None else "CompleteMultipartUpload", exc) from None
        self._done = True
        self._buf = bytearray()
        return self._size

    def abort(self) -> None:
        """Leave nothing: wait for the part in flight, then abort the multipart upload."""
        if self._done:
            return
        self._done = True
        self._buf = bytearray()
        if self._inflight is not None:
            self._inflight.exception()  # wait; its failure is the one already being raised
            self._inflight = None
        if self._mpu is not None:
            # An abort that fails leaves an incomplete (invisible) upload, which the sweep removes.
            with contextlib.suppress(Exception):
                self._s3.client.abort_multipart_upload(Bucket=self._s3.bucket, Key=self._key, UploadId=self._mpu)


class _BlobReader:
    """Bytes ``[offset, end)`` of one object, read in chunks from one ranged GET; a stream that
    breaks is re-opened from where it stopped (same ETag), a few times at most."""

    def __init__(self, s3: S3Blobs, key: str, start: int, end: int | None, what: str = "blob") -> None:
        self._s3 = s3
        self._key = key
        self._what = what
        self._offset = start
        self._end = end
        self._etag: str | None = None
        self._body: Any = None
        self._retries = STREAM_RETRIES
        self._open()

    def _open(self) -> None:
        args: dict[str, Any] = {"Bucket": self._s3.bucket, "Key": self._key}
        if self._offset or self._end is not None:
            last = "" if self._end is None else str(self._end - 1)
            args["Range"] = f"bytes={self._offset}-{last}"
        if self._etag is not None:
            args["IfMatch"] = self._etag
        try:
            r = self._s3.client.get_object(**args)
        except Exception as exc:
            code = _code(exc)
            if code in ("NoSuchKey", "404"):
                raise BlobStoreError(f"{self._what} not found in the S3 store") from None
            if code == "InvalidRange" and self._etag is None:
                self._end = self._offset  # the range starts at or past the end: nothing to read
                if self._s3.size_of(self._key) is None:
                    raise BlobStoreError(f"{self._what} not found in the S3 store") from None
                return
            raise _error("GetObject", exc) from None
        self._etag = str(r["ETag"])
        self._body = r["Body"]
        self._end = self._offset + int(r["ContentLength"])  # a range past the end is served to the end

    def __iter__(self) -> _BlobReader:
        return self

    def __next__(self) -> bytes:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        while self._end is not None and self._offset < self._end:
            try:
                chunk = self._body.read(min(READ_CHUNK, self._end - self._offset))
            except (BotoCoreError, HTTPError, OSError) as exc:
                chunk, failure = b"", exc
            else:
                failure = None
            if chunk:
                self._offset += len(chunk)
                return bytes(chunk)
            self.close()
            if self._retries == 0:
                raise _error("GetObject", failure or EOFError()) from None
            self._retries -= 1
            self._open()
        self.close()
        raise StopIteration

    def close(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            body.close()

    def __del__(self) -> None:
        self.close()


class S3Blobs:
    """The BlobStore over one S3 bucket and key prefix (``registry.blobs.BlobStore``)."""

    def __init__(self, bucket: str, prefix: str, *, max_connections: int = 64, check: bool = True) -> None:
        """``check``: ask S3 for the bucket now (one HeadBucket), so a wrong bucket, endpoint or
        credential stops ``modelseal serve`` at start with one line, not at the first request."""
        import boto3
        from botocore.config import Config

        if not bucket or "/" in bucket:
            raise ValueError("s3:// needs a bucket name")
        segments = [s for s in prefix.split("/") if s]
        if any(s in (".", "..") for s in segments) or any(ord(c) < 0x20 for c in prefix):
            raise ValueError("the S3 prefix has a '.', '..' or control character segment")
        self.bucket = bucket
        self._root = "".join(f"{s}/" for s in segments)
        config = Config(
            max_pool_connections=max_connections,
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            tcp_keepalive=True,
        )
        region = os.environ.get("AWS_REGION") or None  # else boto3's own chain (AWS_DEFAULT_REGION...)
        self.client: Any = boto3.session.Session().client("s3", region_name=region, config=config)
        # Background part uploads: one in flight per writer, so up to half the pool.
        self.pool = ThreadPoolExecutor(max_workers=max(2, max_connections // 2), thread_name_prefix="s3blobs")
        if check:
            try:
                self.client.head_bucket(Bucket=bucket)
            except Exception as exc:
                raise _error("HeadBucket", exc) from None

    def _blob_key(self, digest_hex: str) -> str:
        return f"{self._root}blobs/sha256/{check_hex(digest_hex)}"

    def _upload_prefix(self, upload: str) -> str:
        return f"{self._root}uploads/{check_upload(upload)}/"

    def _part_key(self, upload: str, index: int) -> str:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 1 << 31:
            raise ValueError("a part index is an int in [0, 2**31)")
        return f"{self._upload_prefix(upload)}{index}"

    def size_of(self, key: str) -> int | None:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise _error("HeadObject", exc) from None
        return int(r["ContentLength"])

    def part_writer(self, upload: str, index: int) -> _ObjectWriter:
        return _ObjectWriter(self, self._part_key(upload, index))

    def delete_upload(self, upload: str) -> None:
        prefix = self._upload_prefix(upload)
        self._abort_multiparts(prefix, older_than=None)
        self._delete_keys([str(o["Key"]) for o in self._list(prefix)])

    def assemble(self, upload: str, parts: Sequence[int], digest_hex: str, *, hashed: bool = False) -> int:
        """The parts are always read and hashed (they are copied anyway, so ``hashed`` changes
        nothing); when the blob already exists (the same digest) only the copy is skipped,
        never the check."""
        del hashed
        key = self._blob_key(digest_hex)
        keys = [self._part_key(upload, i) for i in parts]
        out = None if self.size_of(key) is not None else _ObjectWriter(self, key)
        digest = hashlib.sha256()
        size = 0
        try:
            for part in keys:
                for chunk in _BlobReader(self, part, 0, None, what="upload part"):
                    digest.update(chunk)
                    size += len(chunk)
                    if out is not None:
                        out.write(chunk)
        except BaseException:
            if out is not None:
                out.abort()
            raise
        if not hmac.compare_digest(digest.hexdigest().encode(), digest_hex.encode()):
            if out is not None:
                out.abort()
            raise DigestMismatch("the uploaded bytes do not match the digest they were pushed under")
        return size if out is None else out.commit()

    def size(self, digest_hex: str) -> int | None:
        return self.size_of(self._blob_key(digest_hex))

    def read(self, digest_hex: str, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        if start < 0 or (length is not None and length < 0):
            raise ValueError("a range starts and extends at 0 or more")
        key = self._blob_key(digest_hex)
        if length == 0:
            if self.size_of(key) is None:
                raise BlobStoreError("blob not found in the S3 store")
            return iter(())
        return _BlobReader(self, key, start, None if length is None else start + length)

    def delete(self, digest_hex: str) -> None:
        key = self._blob_key(digest_hex)  # a ValueError, not a store failure
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise _error("DeleteObject", exc) from None

    def digests(self) -> Iterator[str]:
        prefix = f"{self._root}blobs/sha256/"
        for obj in self._list(prefix):
            name = str(obj["Key"])[len(prefix) :]
            if HEX64.fullmatch(name):
                yield name

    def uploads(self) -> Iterator[str]:
        """Upload ids with committed parts (a chunk still being received is not one)."""
        prefix = f"{self._root}uploads/"
        last = None
        # Keys, not CommonPrefixes: SeaweedFS keeps listing a "folder" whose parts are deleted.
        for obj in self._list(prefix):
            name = str(obj["Key"])[len(prefix) :].split("/", 1)[0]
            if name != last and UPLOAD_ID.fullmatch(name):
                last = name
                yield name

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        try:
            for page in pages:
                yield from page.get("Contents", [])
        except Exception as exc:
            raise _error("ListObjectsV2", exc) from None

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            try:
                r = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as exc:
                raise _error("DeleteObjects", exc) from None
            if r.get("Errors"):
                raise BlobStoreError(f"S3 DeleteObjects failed: {str(r['Errors'][0].get('Code'))[:64]}")

    def _abort_multiparts(self, prefix: str, older_than: float | None) -> int:
        """Abort the incomplete multipart uploads under ``prefix`` idle for more than
        ``older_than`` seconds (every one if None). Returns how many were aborted."""
        cutoff = None if older_than is None else time.time() - older_than
        aborted = 0
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
        try:
            stale = [
                u for p in pages for u in p.get("Uploads", []) if cutoff is None or u["Initiated"].timestamp() < cutoff
            ]
        except Exception as exc:
            raise _error("ListMultipartUploads", exc) from None
        for up in stale:
            if cutoff is not None and self._last_part(up) >= cutoff:
                continue  # started long ago but still sending parts: a long assembly, alive
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
            except Exception as exc:
                if _code(exc) != "NoSuchUpload":  # another instance's sweep got there first
                    raise _error("AbortMultipartUpload", exc) from None
            aborted += 1
        return aborted

    def _last_part(self, up: dict[str, Any]) -> float:
        """When the multipart upload ``up`` last received a part (its start if none)."""
        latest = float(up["Initiated"].timestamp())
        pages = self.client.get_paginator("list_parts").paginate(
            Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
        )
        try:
            for page in pages:
                for part in page.get("Parts", []):
                    latest = max(latest, float(part["LastModified"].timestamp()))
        except Exception as exc:
            if _code(exc) == "NoSuchUpload":
                return latest
            raise _error("ListParts", exc) from None
        return latest

    def sweep_tmp(self, older_than: float) -> int:
        """The janitor the GC calls (as ``LocalBlobs.sweep_tmp``): abort the multipart uploads,
        of chunks or blobs, that received nothing since ``older_than`` (epoch s); how many."""
        return self._abort_multiparts(self._root, older_than=time.time() - older_than)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()
