"""Backups in ``s3://BUCKET/PREFIX`` (docs/recovery.md, "Backups"), through boto3 with the
registry's S3 settings (``registry.s3blobs``: endpoint, region and credentials from the
standard AWS environment variables, errors as one line naming the S3 operation and code).

Parts first, ``manifest.json`` last; on any failure every object this run wrote is deleted
(in a versioned bucket that is a delete marker: nothing lists, the locked versions stay); a
key the store did not delete (a ``DeleteObjects`` answer's per-key ``Errors``, or the call
failing) is reported, never ignored. When
the bucket has an Object Lock configuration every object is written with retention (mode and
period from ``Retention``), which is then read back for the very version written: a store that
accepted the headers but did not keep them is refused. Nothing here trusts what it reads:
object keys come from the fixed layout, never from a listing's contents.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import Any

from modelseal.errors import BackupError, BackupTampered, BlobStoreError
from modelseal.recovery.manifest import ID, MANIFEST_NAME
from modelseal.recovery.storebase import BackupWriter, Retention, check_id, check_rel
from modelseal.registry.s3blobs import S3Blobs, _code, _error

MODES = ("COMPLIANCE", "GOVERNANCE")


def _fail(op: str, exc: Exception) -> BackupError:
    return BackupError(str(_error(op, exc)))


class _S3Writer:
    def __init__(self, store: S3Store, backup_id: str, retention: Retention | None) -> None:
        self._store = store
        self._id = backup_id
        self._retention = retention
        self._written: list[str] = []
        self._done = False

    def _lock_args(self) -> tuple[dict[str, Any], dt.datetime | None]:
        if self._retention is None:
            return {}, None
        until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self._retention.seconds)
        return {"ObjectLockMode": self._retention.mode, "ObjectLockRetainUntilDate": until}, until

    def _put(self, rel: str, data: bytes) -> None:
        key = self._store.key(self._id, rel)
        args, until = self._lock_args()
        self._written.append(key)  # before the call: a PUT that failed late may still have landed
        try:
            r = self._store.client.put_object(Bucket=self._store.bucket, Key=key, Body=data, **args)
        except Exception as exc:
            raise _fail("PutObject", exc) from None
        if self._retention is not None and until is not None:
            self._confirm(key, r.get("VersionId"), until)

    def _confirm(self, key: str, version: str | None, until: dt.datetime) -> None:
        """Read the retention of the version just written back; refuse one that did not stick."""
        assert self._retention is not None
        ask: dict[str, Any] = {"Bucket": self._store.bucket, "Key": key}
        if version:
            ask["VersionId"] = version
        try:
            got = self._store.client.get_object_retention(**ask).get("Retention", {})
        except Exception as exc:
            raise _fail("GetObjectRetention", exc) from None
        kept = got.get("RetainUntilDate")
        if got.get("Mode") != self._retention.mode or not isinstance(kept, dt.datetime):
            raise BackupError("the S3 store accepted the Object Lock retention but did not keep it: refusing")
        if kept.timestamp() < until.timestamp() - 1:
            raise BackupError("the S3 store kept a shorter Object Lock retention than requested: refusing")

    def put(self, rel: str, data: bytes) -> None:
        self._put(check_rel(rel), data)

    def commit(self, manifest: bytes) -> None:
        self._put(MANIFEST_NAME, manifest)
        self._done = True

    def abort(self) -> None:
        """Delete what this run wrote; ``BackupError`` naming what is left if the store refused."""
        if self._done or not self._written:
            return
        written, self._written = self._written, []
        try:
            left = self._store.delete_keys(written)
        except (BackupError, BlobStoreError) as e:
            raise BackupError(f"the {len(written)} objects this backup wrote could not be removed ({e})") from None
        if left:
            listed = "a manifest.json among them: it may list" if any(k.endswith(MANIFEST_NAME) for k in left) else ""
            raise BackupError(
                f"{len(left)} of the objects this backup wrote were not removed (first: {left[0][:120]}"
                f"{'; ' + listed if listed else ''}): remove them by hand"
            )


class S3Store:
    """The backup store over one bucket and key prefix."""

    def __init__(self, bucket: str, prefix: str) -> None:
        try:
            self._s3 = S3Blobs(bucket, prefix, max_connections=4, check=True)
        except ValueError as e:
            raise BackupError(f"s3://: {e}") from None
        except BlobStoreError as e:
            raise BackupError(str(e)) from None
        self.client: Any = self._s3.client
        self.bucket = bucket
        self._root = "".join(f"{s}/" for s in prefix.split("/") if s)
        self.url = f"s3://{bucket}/{self._root}"
        self.state_key = self.url

    def key(self, backup_id: str, rel: str) -> str:
        return f"{self._root}{check_id(backup_id)}/{check_rel(rel)}"

    def list_ids(self) -> list[str]:
        ids: set[str] = set()
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._root)
            for page in pages:
                for obj in page.get("Contents", []):
                    head, _, tail = str(obj["Key"])[len(self._root) :].partition("/")
                    if tail == MANIFEST_NAME and ID.fullmatch(head):
                        ids.add(head)
        except Exception as exc:
            raise _fail("ListObjectsV2", exc) from None
        return sorted(ids)

    def read(self, backup_id: str, rel: str, limit: int) -> bytes:
        key = self.key(backup_id, rel)
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise BackupTampered(f"backup {backup_id} has no {rel}: deleted") from None
            raise _fail("GetObject", exc) from None
        body = r["Body"]
        try:
            if int(r.get("ContentLength", 0)) > limit:
                raise BackupTampered(f"{rel} of backup {backup_id} is larger than it may be")
            data = bytes(body.read(limit + 1))
        except BackupTampered:
            raise
        except Exception as exc:
            raise _fail("GetObject", exc) from None
        finally:
            body.close()
        if len(data) > limit:
            raise BackupTampered(f"{rel} of backup {backup_id} is larger than it may be")
        return data

    def object_lock(self) -> bool:
        try:
            r = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except Exception as exc:
            if _code(exc) == "ObjectLockConfigurationNotFoundError":
                return False
            raise _fail("GetObjectLockConfiguration", exc) from None
        return bool(r.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled")

    def begin(self, backup_id: str, retention: Retention | None) -> BackupWriter:
        if retention is not None and retention.mode not in MODES:
            raise BackupError(f"the Object Lock mode is one of {', '.join(MODES)}")
        return _S3Writer(self, check_id(backup_id), retention)

    def delete_keys(self, keys: list[str]) -> list[str]:
        """Delete ``keys``; returns those the store answered with a per-key error for."""
        left: list[str] = []
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            try:
                r = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as exc:
                raise _fail("DeleteObjects", exc) from None
            left += [str(e.get("Key", "?")) for e in r.get("Errors") or []]
        return left

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        yield  # S3 has no lock here: one backup writer per destination (docs/recovery.md)

    def close(self) -> None:
        self._s3.close()


__all__ = ["MODES", "S3Store"]
