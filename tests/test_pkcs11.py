"""The pkcs11: provider against a real SoftHSM2 token (Debian softhsm2), initialised per run."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.errors import DecryptionError, KeyDisabled, KeyNotFound, KeyProviderError
from modelseal.format.header import normalize_context
from modelseal.keys.providers.pkcs11 import Pkcs11Provider, parse_uri
from modelseal.keys.service import KeyService

from .conftest import Env
from .services import softhsm_token

PIN = "4711-modelseal"
LABEL = f"ms-{secrets.token_hex(4)}"
OTHER = f"ms-other-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import subprocess

    with softhsm_token(tmp_path_factory.mktemp("hsm"), LABEL, PIN) as module:
        # A second token, made before the module is loaded (SoftHSM lists tokens at start-up).
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", OTHER, "--pin", PIN, "--so-pin", "so-pin-1"],
            check=True,
            capture_output=True,
        )
        yield module


@pytest.fixture
def provider(hsm: str, monkeypatch: pytest.MonkeyPatch) -> Pkcs11Provider:
    monkeypatch.setenv("MODELSEAL_PKCS11_MODULE", hsm)
    monkeypatch.setenv("MODELSEAL_PKCS11_PIN", PIN)
    return Pkcs11Provider()


def uri(obj: str) -> str:
    return f"token={LABEL};object={obj}"


def test_rfc7512_uri_parsing() -> None:
    u = parse_uri("token=My%20HSM;object=prod-kek?module-path=/usr/lib/x.so&pin-source=file:/run/pin")
    assert (u.token, u.object, u.module, u.pin_source) == ("My HSM", "prod-kek", "/usr/lib/x.so", "file:/run/pin")
    assert u.key_id == "token=My%20HSM;object=prod-kek"
    assert parse_uri(u.key_id, from_artifact=True).token == "My HSM"
    with pytest.raises(KeyProviderError):
        parse_uri("object=only")
    # A label containing ';' cannot re-parse as another token or object.
    tricky = parse_uri("token=a%3Bobject%3Dx;object=k")
    assert parse_uri(tricky.key_id, from_artifact=True) == parse_uri("token=a%3Bobject%3Dx;object=k")


def test_an_artifact_cannot_choose_the_module_or_the_pin(env: Env, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Regression: a recipient's key_id once reached module-path= (code loading) and pin-source=."""
    from modelseal.format.header import Recipient

    marker = tmp_path_factory.mktemp("evil") / "loaded"
    for key_id in (
        f"token=t;object=o?module-path={marker}.so",
        "token=t;object=o?pin-source=file:/dev/zero",
        "token=t;object=o;module-path=/tmp/evil.so",
    ):
        with pytest.raises(DecryptionError):
            Pkcs11Provider().unwrap(Recipient("pkcs11", key_id, 1, b"x" * 60), ())
    assert not marker.exists()


def test_concurrent_use_from_threads(provider: Pkcs11Provider) -> None:
    """Regression: python-pkcs11 calls into the module without its locking; calls are serialised."""
    from concurrent.futures import ThreadPoolExecutor

    provider.create(uri("thread-kek"))
    ctx = normalize_context({"env": "prod"})

    def work(i: int) -> bool:
        dek = os.urandom(32)
        return provider.unwrap(provider.wrap(uri("thread-kek"), dek, ctx), ctx) == dek

    with ThreadPoolExecutor(8) as ex:
        assert all(ex.map(work, range(400)))


def test_key_is_generated_in_the_token_non_extractable(provider: Pkcs11Provider, hsm: str) -> None:
    import pkcs11
    from pkcs11 import Attribute

    provider.create(uri("hsm-kek"))
    lib = pkcs11.lib(hsm)
    with lib.get_token(token_label=LABEL).open() as s:  # the provider's pooled session is logged in
        key = s.get_key(label="hsm-kek")
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]


def test_wrap_bound_to_context_and_version(provider: Pkcs11Provider) -> None:
    provider.create(uri("ctx-kek"))
    dek = os.urandom(32)
    prod = normalize_context({"env": "prod"})
    r = provider.wrap(uri("ctx-kek"), dek, prod)
    assert (r.scheme, r.key_id, r.key_version) == ("pkcs11", uri("ctx-kek"), 1)
    assert provider.unwrap(r, prod) == dek
    with pytest.raises(DecryptionError):
        provider.unwrap(r, normalize_context({"env": "dev"}))


def test_seal_rotate_rewrap_disable_destroy(env: Env, provider: Pkcs11Provider) -> None:
    svc = KeyService(sink=MemorySink(), providers={"pkcs11": provider})
    key = f"pkcs11:{uri('model-kek')}"
    svc.create(key)
    src = env.work / "w.bin"
    src.write_bytes(os.urandom(200_000))
    sealed = env.work / "w.sealed"
    modelseal.seal(src, sealed, key=key, context={"env": "prod"}, keys=svc)
    assert modelseal.open(sealed, keys=svc).read() == src.read_bytes()
    svc.rotate(key)
    # A rewrap writes only keys the operator vouches for: here config.toml's key for env=prod.
    (env.home / "config.toml").write_text(f'[environments.prod]\nkeys = ["{key}"]\n')
    modelseal.rewrap(sealed, keys=KeyService(sink=MemorySink(), providers={"pkcs11": provider}))
    assert modelseal.inspect(sealed)["recipients"] == [{"key": key, "version": 2}]
    svc.destroy(key, 1)  # the old version is gone from the token; the artifact still opens
    assert modelseal.open(sealed, keys=svc).read() == src.read_bytes()
    svc.set_state(key, 2, "disabled")
    with pytest.raises(KeyDisabled):
        modelseal.open(sealed, keys=svc)
    svc.set_state(key, 2, "active")
    svc.destroy(key, None)
    with pytest.raises(KeyNotFound):
        modelseal.open(sealed, keys=svc)


def test_wrong_pin_and_missing_key(
    hsm: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    monkeypatch.setenv("MODELSEAL_PKCS11_MODULE", hsm)
    monkeypatch.setenv("MODELSEAL_PKCS11_PIN", PIN)
    with pytest.raises(KeyNotFound):
        Pkcs11Provider().wrap(uri("no-such-kek"), os.urandom(32), ())
    with pytest.raises(KeyNotFound, match="no token"):
        Pkcs11Provider().wrap("token=absent;object=k", os.urandom(32), ())
    # The second token, reached through a URI with pin-source= naming a wrong PIN.
    pin_file = tmp_path_factory.mktemp("pin") / "pin"
    pin_file.write_text("0000-wrong")
    with pytest.raises(KeyProviderError, match="wrong PIN"):
        Pkcs11Provider().wrap(f"token={OTHER};object=k?pin-source=file:{pin_file}", os.urandom(32), ())
    # The failed login is not remembered: the right PIN works at once.
    Pkcs11Provider().create(f"token={OTHER};object=k")


# --- signing keys in the token (the same SoftHSM instance: a module loads its config once) -----


def test_pkcs11_signer_signs_sealed_artifacts(env: Env, provider: Pkcs11Provider, tmp_path: Path) -> None:
    from modelseal.cli import main
    from modelseal.signing.pkcs11 import Pkcs11Signer, create_signing_key
    from modelseal.signing.signers import ED25519, P256
    from modelseal.signing.trust import TrustPolicy
    from modelseal.signing.verification import verify_artifact

    from .conftest import make_model_folder

    pub = tmp_path / "hsm.pub"
    assert main(["signing-key", f"pkcs11:{uri('release-sign')}", str(pub), "--algorithm", P256]) == 0
    signer = Pkcs11Signer(uri("release-sign"))
    # the private half is sensitive and not extractable
    from pkcs11 import Attribute, ObjectClass

    with signer._tok.session() as s:
        (priv,) = s.get_objects({Attribute.LABEL: "release-sign", Attribute.CLASS: ObjectClass.PRIVATE_KEY})
        assert priv[Attribute.SENSITIVE] and not priv[Attribute.EXTRACTABLE]
    src = make_model_folder(env.work / "m")
    sealed = env.work / "m.sealed"
    spec = f"pkcs11:{uri('release-sign')}"
    assert main(["seal", str(src), str(sealed), "--key", "local:test-kek", "--sign-key", spec]) == 0
    assert main(["verify", str(sealed), "--public-key", str(pub)]) == 0
    v = verify_artifact(sealed, TrustPolicy.from_keys([signer.public]))
    assert v.results[0].keyid == signer.public.key_id
    with pytest.raises(Exception, match="P-256"):
        create_signing_key(uri("ed"), ED25519)
    assert main(["sign", str(sealed), "--sign-key", f"pkcs11:{uri('no-such-signing-key')}"]) == 5
