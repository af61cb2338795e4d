"""The awskms: provider.

AWS KMS cannot run on this machine, so these tests use botocore's Stubber: a STUB, not
KMS. It validates every request against the real KMS API model (parameter names and
types) and the tests check the exact parameters: KeyId, KeySpec and the
EncryptionContext carrying the artifact's context. Nothing here proves KMS-side
behaviour beyond what the API model states.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.errors import DecryptionError, KeyDisabled, KeyNotFound
from modelseal.keys.providers.awskms import AwsKmsProvider
from modelseal.keys.service import KeyService

from .conftest import Env

KEY = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.fixture
def kms() -> Any:
    client = boto3.client("kms", region_name="eu-west-1", aws_access_key_id="stub", aws_secret_access_key="stub")
    with Stubber(client) as stub:
        yield client, stub
        stub.assert_no_pending_responses()


def test_seal_uses_generate_data_key_and_open_uses_decrypt(env: Env, kms: Any) -> None:
    client, stub = kms
    dek = os.urandom(32)
    blob = b"\x01\x02" + os.urandom(180)  # opaque to us, as KMS ciphertext is
    ec = {"modelseal": "v1", "env": "prod", "artifact": "llama-ft"}
    stub.add_response(
        "generate_data_key",
        {"Plaintext": dek, "CiphertextBlob": blob, "KeyId": KEY},
        {"KeyId": KEY, "KeySpec": "AES_256", "EncryptionContext": ec},
    )
    stub.add_response(
        "decrypt", {"Plaintext": dek, "KeyId": KEY}, {"CiphertextBlob": blob, "KeyId": KEY, "EncryptionContext": ec}
    )
    svc = KeyService(sink=MemorySink(), providers={"awskms": AwsKmsProvider(lambda: client)})
    src = env.work / "m.bin"
    src.write_bytes(os.urandom(10_000))
    sealed = env.work / "m.sealed"
    modelseal.seal(src, sealed, key=f"awskms:{KEY}", context={"env": "prod", "artifact": "llama-ft"}, keys=svc)
    assert modelseal.inspect(sealed)["recipients"] == [{"key": f"awskms:{KEY}", "version": 1}]
    assert modelseal.open(sealed, keys=svc).read() == src.read_bytes()


def test_second_recipient_uses_encrypt(env: Env, kms: Any) -> None:
    client, stub = kms
    stub.add_response(
        "encrypt",
        {"CiphertextBlob": b"wrapped-by-kms", "KeyId": KEY},
        {"KeyId": KEY, "Plaintext": ANY, "EncryptionContext": {"modelseal": "v1", "env": "dev"}},  # env: the default
    )
    svc = KeyService(sink=MemorySink(), providers={"awskms": AwsKmsProvider(lambda: client)})
    src = env.work / "m.bin"
    src.write_bytes(b"x" * 100)
    modelseal.seal(src, env.work / "m.sealed", key=["local:test-kek", f"awskms:{KEY}"], keys=svc)
    info = modelseal.inspect(env.work / "m.sealed")
    assert [r["key"] for r in info["recipients"]] == ["local:test-kek", f"awskms:{KEY}"]


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("NotFoundException", KeyNotFound),
        ("DisabledException", KeyDisabled),
        ("InvalidCiphertextException", DecryptionError),
    ],
)
def test_kms_errors_map_to_modelseal_errors(kms: Any, code: str, error: type[Exception]) -> None:
    client, stub = kms
    stub.add_client_error("decrypt", service_error_code=code, http_status_code=400)
    from modelseal.format.header import Recipient

    with pytest.raises(error):
        AwsKmsProvider(lambda: client).unwrap(Recipient("awskms", KEY, 1, b"blob"), ())
