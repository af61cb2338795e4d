"""``awskms:`` provider: KEKs in AWS KMS, through ``boto3``.

Key URI: ``awskms:KEY_ID``, ``awskms:alias/NAME`` or ``awskms:arn:aws:kms:...``.
Credentials and region come from the usual boto3 chain (environment, profile,
instance role). The encryption context is passed as KMS ``EncryptionContext``
on every call, so KMS itself refuses to decrypt under another context, and
CloudTrail records it. Data keys are made with ``GenerateDataKey`` when KMS is
the first recipient, and wrapped with ``Encrypt`` for additional recipients;
``Decrypt`` names the expected key. KMS key rotation is transparent (the
ciphertext names its backing key), so recipients record version 1.

One key has several spellings (key id, key ARN, alias name, alias ARN), and an
alias can be re-pointed. ``canonical_name`` resolves any of them to the key ARN with
``DescribeKey`` (cached for ``DESCRIBE_TTL`` seconds, at most ``DESCRIBE_CACHE_SIZE``
spellings), and ``KeyService`` compares keys only through it, so an environment binding
written with one spelling holds for all of them.

AWS cannot run on the test machines: the tests use botocore's ``Stubber``,
which checks every request against the real KMS API model, and say so.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from modelseal.errors import DecryptionError, KeyDisabled, KeyNotFound, KeyProviderError
from modelseal.format.header import Recipient

# How long a resolved identity is reused: an alias re-pointed in KMS is followed within this time.
DESCRIBE_TTL = 60.0
# Spellings kept at most: names may come from artifacts, so the cache must not grow without bound.
DESCRIBE_CACHE_SIZE = 256
# A key id, key ARN, alias name or alias ARN (KMS's own alphabet for all four).
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9:/_.-]{0,2047}")


def check_key_id(key_id: str) -> str:
    """Refuse a key id outside KMS's alphabet before it reaches a request (it may come from an artifact)."""
    if not _KEY_ID.fullmatch(key_id):
        raise KeyProviderError("awskms: invalid key id (expected a key id, key ARN, alias or alias ARN)")
    return key_id


def encryption_context(context: tuple[tuple[str, str], ...]) -> dict[str, str]:
    # A fixed entry keeps the context non-empty and marks whose wrap this is.
    return {"modelseal": "v1", **dict(context)}


class AwsKmsProvider:
    scheme = "awskms"

    def __init__(
        self, client_factory: Callable[[], Any] | None = None, now: Callable[[], float] = time.monotonic
    ) -> None:
        self._factory = client_factory or self._default_client
        self._client: Any = None
        self._now = now
        self._arns: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _default_client() -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("kms", config=Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5))

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if self._client is None:
                self._client = self._factory()
            return fn(self._client)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code == "NotFoundException":
                raise KeyNotFound(f"awskms: no such key for {what}") from None
            if code in ("DisabledException", "KMSInvalidStateException", "KeyUnavailableException"):
                raise KeyDisabled(f"awskms: the key is disabled or pending deletion ({what})") from None
            if code in ("InvalidCiphertextException", "IncorrectKeyException"):
                raise DecryptionError() from None
            raise KeyProviderError(f"awskms: {code or 'request failed'} during {what}") from None
        except BotoCoreError as e:
            raise KeyProviderError(f"awskms: {type(e).__name__} during {what}") from None

    def canonical_name(self, name: str) -> str:
        """The key ARN behind any spelling of a key (``DescribeKey``, cached)."""
        check_key_id(name)
        with self._lock:
            hit = self._arns.get(name)
        if hit is not None and hit[1] > self._now():
            return hit[0]
        resp = self._call(f"describe awskms:{name}", lambda c: c.describe_key(KeyId=name))
        arn = (resp.get("KeyMetadata") or {}).get("Arn")
        if not isinstance(arn, str) or not arn.startswith("arn:") or not _KEY_ID.fullmatch(arn):
            raise KeyProviderError("awskms: DescribeKey returned no usable key ARN")
        with self._lock:
            self._arns[name] = (arn, self._now() + DESCRIBE_TTL)
            self._arns.move_to_end(name)
            while len(self._arns) > DESCRIBE_CACHE_SIZE:
                self._arns.popitem(last=False)  # the oldest entry
        return arn

    def generate(self, name: str, context: tuple[tuple[str, str], ...]) -> tuple[bytes, Recipient]:
        resp = self._call(
            f"generate a data key with awskms:{name}",
            lambda c: c.generate_data_key(KeyId=name, KeySpec="AES_256", EncryptionContext=encryption_context(context)),
        )
        dek = bytes(resp["Plaintext"])
        if len(dek) != 32:
            raise KeyProviderError("awskms: GenerateDataKey returned a key of the wrong size")
        # Record the key's ARN, not an alias: an alias can later point at another key.
        return dek, Recipient("awskms", str(resp.get("KeyId") or name), 1, bytes(resp["CiphertextBlob"]))

    def wrap(self, name: str, dek: bytes, context: tuple[tuple[str, str], ...]) -> Recipient:
        resp = self._call(
            f"wrap with awskms:{name}",
            lambda c: c.encrypt(KeyId=name, Plaintext=dek, EncryptionContext=encryption_context(context)),
        )
        return Recipient("awskms", str(resp.get("KeyId") or name), 1, bytes(resp["CiphertextBlob"]))

    def unwrap(self, recipient: Recipient, context: tuple[tuple[str, str], ...]) -> bytes:
        check_key_id(recipient.key_id)
        resp = self._call(
            f"unwrap with awskms:{recipient.key_id}",
            lambda c: c.decrypt(
                CiphertextBlob=recipient.wrapped, KeyId=recipient.key_id, EncryptionContext=encryption_context(context)
            ),
        )
        dek = bytes(resp["Plaintext"])
        if len(dek) != 32:
            raise DecryptionError()
        return dek
