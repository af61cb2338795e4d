"""Golden vectors (tests/vectors/index.json): every one gives its labelled outcome."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.errors import DecryptionError, FormatError
from modelseal.format.envelope import verify_with_dek
from modelseal.format.file import read_raw
from modelseal.format.reader import SealedReader
from modelseal.format.source import FdSource
from modelseal.keys import keystore
from modelseal.keys.service import KeyService

VECTORS = Path(__file__).parent / "vectors"
INDEX = json.loads((VECTORS / "index.json").read_text())


@pytest.fixture
def vector_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KeyService:
    home = tmp_path / "home"
    shutil.copytree(VECTORS / "home", home)
    (home / "keystore.json").chmod(0o600)  # git does not keep file modes
    monkeypatch.setenv("MODELSEAL_HOME", str(home))
    monkeypatch.setenv("MODELSEAL_PASSPHRASE", INDEX["passphrase"])
    keystore.clear_cache()
    return KeyService(sink=MemorySink())


@pytest.mark.parametrize("vec", INDEX["vectors"], ids=lambda v: v["file"])
def test_vector(vec: dict[str, object], vector_keys: KeyService) -> None:
    path = VECTORS / str(vec["file"])
    expect = vec["expect"]
    if expect in ("not sealed", "unsupported"):
        with pytest.raises(FormatError):
            modelseal.open(path, keys=vector_keys)
    elif expect in ("header failure", "wrong key"):
        with pytest.raises(DecryptionError):
            modelseal.open(path, keys=vector_keys)
    elif expect == "payload failure":
        with modelseal.open(path, keys=vector_keys) as r, pytest.raises(DecryptionError):
            r.read()
    else:
        assert expect == "success"
        with modelseal.open(path, keys=vector_keys) as r:
            data = r.read()
        assert len(data) == vec["plaintext_length"]
        assert hashlib.sha256(data).hexdigest() == vec["plaintext_sha256"]
        assert r.metadata()["sha256"] == vec["plaintext_sha256"]
        # The recorded DEK opens it without any provider (format-level check).
        fd = os.open(path, os.O_RDONLY)
        src = FdSource(fd)
        raw = read_raw(src)
        keys = verify_with_dek(raw.core, bytes.fromhex(str(vec["dek"])))
        with SealedReader(src, raw, keys) as direct:
            assert direct.read() == data


def test_every_outcome_is_covered() -> None:
    outcomes = {v["expect"] for v in INDEX["vectors"]}
    assert outcomes == {"success", "header failure", "payload failure", "wrong key", "not sealed", "unsupported"}


def test_signature_vectors(vector_keys: KeyService, tmp_path: Path) -> None:
    """Golden signature vectors (generate_signatures.py): the commitment construction,
    the signature id and verification keep their meaning in every release."""
    from modelseal.errors import VerificationError
    from modelseal.signing.commitment import artifact_digest, hash_sealed_file
    from modelseal.signing.signers import VerifyKey
    from modelseal.signing.trust import TrustPolicy
    from modelseal.signing.verification import verify_artifact

    want = json.loads((VECTORS / "signatures.json").read_text())
    key = VerifyKey.from_file(VECTORS / "signing-ed25519.pub")
    assert key.key_id == want["key_id"]
    _, c = hash_sealed_file(VECTORS / "signed-three-chunks.mseal", ".")
    assert (c.header, c.chunks, artifact_digest([c])) == (
        want["header_digest"],
        want["chunks_digest"],
        want["artifact_digest"],
    )
    policy = TrustPolicy.from_keys([key])
    # copies: verify-on-load records nothing, but keep the committed files untouched anyway
    for name in ("signed-three-chunks.mseal", "signed-tampered.mseal"):
        shutil.copy(VECTORS / name, tmp_path / name)
        shutil.copy(VECTORS / (name + ".msig"), tmp_path / (name + ".msig"))
    v = verify_artifact(tmp_path / "signed-three-chunks.mseal", policy)
    assert v.name == "vector-three-chunks" and v.results[0].id == want["signature_id"]
    with modelseal.open(tmp_path / "signed-three-chunks.mseal", keys=vector_keys, verify=policy) as r:
        assert r.verified
        plain = r.read()
    with modelseal.open(VECTORS / "ok-three-chunks.mseal", keys=vector_keys) as r:
        assert plain == r.read()
    with pytest.raises(VerificationError, match="does not match the artifact"):
        verify_artifact(tmp_path / "signed-tampered.mseal", policy)
    with (
        modelseal.open(tmp_path / "signed-tampered.mseal", keys=vector_keys, verify=policy) as r,
        pytest.raises(VerificationError, match="chunk 1"),
    ):
        r.read()
