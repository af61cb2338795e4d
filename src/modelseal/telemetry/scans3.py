"""``modelseal scan s3://BUCKET/PREFIX``: every object under the prefix by content (ranged GETs
of its first bytes), and the bucket's own protection.

Objects are listed (``ListObjectsV2``) and each is read with ``Range`` GETs at the offsets
``scanartifacts`` asks for, never whole. A sealed object's signature file is the object the
format puts beside it (``KEY.msig``; ``signatures.msig`` beside a folder's ``manifest.mseal``),
read up to ``MAX_SIGFILE``.

The bucket: ``GetBucketEncryption`` (no default server-side encryption:
``bucket-no-default-encryption``) and ``GetPublicAccessBlock`` (any of the four settings off,
or none set: ``bucket-public-access``), the storage layer's own encryption at rest and access
control, which the artifact's encryption does not replace. Where the service does not
implement a call (SeaweedFS answers ``GetPublicAccessBlock`` with 501 NotImplemented), the
setting is reported as unknown in a note, never as a pass; the bucket's ACL
(``GetBucketAcl``: a grant to AllUsers or AuthenticatedUsers) and policy status
(``GetBucketPolicyStatus``) are then asked, and public access they show is a finding.

Endpoint, region and credentials: the standard AWS settings, read by boto3 (as
``registry.s3blobs``). Errors name the S3 operation and its error code, never a credential.
"""

from __future__ import annotations

import os
from typing import Any

from modelseal.errors import StorageError
from modelseal.signing.sigfile import MAX_SIGFILE
from modelseal.telemetry.scanartifacts import ScanContext, examine
from modelseal.telemetry.scanmodel import BUCKET_NO_DEFAULT_ENCRYPTION, BUCKET_PUBLIC_ACCESS, Finding, ScanReport

REMOTE_PREFIX = 16 << 10  # one GET covers the sniffed prefix and a typical sealed header with its slots
_PUBLIC_GROUPS = (
    "http://acs.amazonaws.com/groups/global/AllUsers",
    "http://acs.amazonaws.com/groups/global/AuthenticatedUsers",
)
_BLOCK_SETTINGS = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")
_UNSUPPORTED = ("NotImplemented", "NotSupported", "MethodNotAllowed", "XNotImplemented")


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    error = response.get("Error", {}) if isinstance(response, dict) else {}
    code = error.get("Code") if isinstance(error, dict) else None
    return str(code) if code else type(exc).__name__


def client() -> Any:
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60)
    region = os.environ.get("AWS_REGION") or None
    return boto3.session.Session().client("s3", region_name=region, config=config)


def parse_target(target: str) -> tuple[str, str]:
    rest = target.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket or any(ord(c) < 0x20 for c in rest):
        raise ValueError("s3:// needs a bucket name: s3://BUCKET/PREFIX")
    return bucket, prefix


class S3Blob:
    """One object, read by ranged GETs."""

    def __init__(self, s3: Any, bucket: str, key: str, size: int) -> None:
        self._s3, self.bucket, self.key, self._size = s3, bucket, key, size

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0 or offset >= self._size:
            return b""
        last = min(offset + length, self._size) - 1
        try:
            r = self._s3.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={offset}-{last}")
        except Exception as e:
            raise OSError(f"GetObject {_code(e)}") from None
        body = r["Body"]
        try:
            if offset and not str(r.get("ContentRange", "")).startswith(f"bytes {offset}-"):
                raise OSError("the S3 service ignored the Range of a GetObject")
            return bytes(body.read(last - offset + 1))  # never more than asked, whatever was sent
        except OSError:
            raise
        except Exception as e:
            raise OSError(f"GetObject {_code(e)}") from None
        finally:
            body.close()


def _object_bytes(s3: Any, bucket: str, key: str) -> list[bytes]:
    """A small object whole (a signature file), at most ``MAX_SIGFILE``; [] if there is none,
    ``[b""]`` (a signature file that does not parse) if it cannot be read."""
    try:
        r = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{MAX_SIGFILE}")
    except Exception as e:
        return [] if _code(e) in ("NoSuchKey", "404", "InvalidRange") else [b""]
    body = r["Body"]
    try:
        data = bytes(body.read(MAX_SIGFILE + 1))
    except Exception:
        return [b""]
    finally:
        body.close()
    return [data if len(data) <= MAX_SIGFILE else b""]


def scan_s3(target: str, ctx: ScanContext, s3: Any = None) -> None:
    bucket, prefix = parse_target(target)
    s3 = s3 if s3 is not None else client()
    saved, ctx.prefix = ctx.prefix, max(ctx.prefix, REMOTE_PREFIX)
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                _object(s3, bucket, obj, ctx)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"cannot list s3://{bucket}/{prefix}: ListObjectsV2 {_code(e)}") from None
    finally:
        ctx.prefix = saved
    bucket_settings(s3, bucket, ctx.report)  # once the bucket is known to exist (listed)


def _object(s3: Any, bucket: str, obj: dict[str, Any], ctx: ScanContext) -> None:
    key, size = obj.get("Key"), obj.get("Size")
    if not isinstance(key, str) or not isinstance(size, int) or (key.endswith("/") and size == 0):
        return  # a "folder" marker; a key ending in "/" that holds bytes is an object like any other
    blob = S3Blob(s3, bucket, key, size)

    def neighbours(kind: int) -> tuple[str, list[bytes]]:
        if kind == 1:
            return blob.location, _object_bytes(s3, bucket, key + ".msig")
        folder = key.rpartition("/")[0]
        sig = f"{folder}/signatures.msig" if folder else "signatures.msig"
        return f"s3://{bucket}/{folder}", _object_bytes(s3, bucket, sig)

    try:
        examine(blob, ctx, neighbours)
    except OSError as e:
        ctx.report.error(blob.location, f"cannot read it ({e})")


def bucket_settings(s3: Any, bucket: str, report: ScanReport) -> None:
    """Findings on the bucket's default encryption and public access block."""
    where = f"s3://{bucket}"
    try:
        rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"].get("Rules", [])
        algs = [r.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm") for r in rules]
        if not any(algs):
            report.add(Finding(BUCKET_NO_DEFAULT_ENCRYPTION, where, "a default encryption rule without an algorithm"))
    except Exception as e:
        code = _code(e)
        if code == "ServerSideEncryptionConfigurationNotFoundError":
            report.add(
                Finding(BUCKET_NO_DEFAULT_ENCRYPTION, where, "no default server-side encryption (SSE-S3 or SSE-KMS)")
            )
        elif code in _UNSUPPORTED:
            report.note(f"{where}: default encryption unknown (GetBucketEncryption: {code} by this S3 service)")
        else:
            report.note(f"{where}: default encryption unknown (GetBucketEncryption: {code})")
    _public_access(s3, bucket, where, report)


def _public_access(s3: Any, bucket: str, where: str, report: ScanReport) -> None:
    try:
        block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
        off = [k for k in _BLOCK_SETTINGS if not block.get(k)]
        if off:
            report.add(Finding(BUCKET_PUBLIC_ACCESS, where, f"the public access block leaves off {', '.join(off)}"))
        return
    except Exception as e:
        code = _code(e)
    if code == "NoSuchPublicAccessBlockConfiguration":
        report.add(Finding(BUCKET_PUBLIC_ACCESS, where, "no public access block configured"))
        return
    how = f"{code} by this S3 service" if code in _UNSUPPORTED else code
    public, asked = _public_now(s3, bucket, report, where)
    if public:
        report.add(Finding(BUCKET_PUBLIC_ACCESS, where, public))
    else:
        why = f"GetPublicAccessBlock: {how}"
        shown = "its ACL and policy status do not show it public" if asked else "its ACL or policy status unread"
        report.note(f"{where}: public access block unknown ({why}); {shown}")


def _public_now(s3: Any, bucket: str, report: ScanReport, where: str) -> tuple[str, bool]:
    """Why the bucket is public now, by its ACL or its policy status ("" if neither says so),
    and whether both could be asked."""
    asked = True
    try:
        grants = s3.get_bucket_acl(Bucket=bucket).get("Grants", [])
        for g in grants:
            uri = g.get("Grantee", {}).get("URI")
            if uri in _PUBLIC_GROUPS:
                return f"the bucket ACL grants {g.get('Permission')} to {uri.rsplit('/', 1)[-1]}", True
    except Exception as e:
        asked = False
        report.note(f"{where}: bucket ACL unknown (GetBucketAcl: {_code(e)})")
    try:
        if s3.get_bucket_policy_status(Bucket=bucket).get("PolicyStatus", {}).get("IsPublic"):
            return "the bucket policy makes it public", True
    except Exception as e:
        if _code(e) != "NoSuchBucketPolicy":
            asked = False
            report.note(f"{where}: bucket policy status unknown (GetBucketPolicyStatus: {_code(e)})")
    return "", asked


__all__ = ["REMOTE_PREFIX", "S3Blob", "bucket_settings", "client", "parse_target", "scan_s3"]
