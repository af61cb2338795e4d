"""Plain (non-derived) Transit keys, the ones Vault tutorials make, against a real OpenBao.

The context is bound through ``associated_data``; the stored wrap is tagged ``ad:``, and
the tag is checked against the key, never obeyed. Derived keys keep their bare form.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.cli import main
from modelseal.errors import DecryptionError, KeyProviderError
from modelseal.format.envelope import parse_slots
from modelseal.format.file import open_keys, read_raw, write_slot_in_place
from modelseal.format.header import Recipient, normalize_context
from modelseal.format.source import FdSource
from modelseal.keys.providers.transit import TransitProvider, associated_data, derivation_context
from modelseal.keys.service import KeyService

from .conftest import Env
from .services import openbao_dev

PROD = normalize_context({"env": "prod"})
DEV = normalize_context({"env": "dev"})


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with openbao_dev(tmp_path_factory.mktemp("bao-plain")) as server:
        yield server


@pytest.fixture
def root(bao: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> hvac.Client:
    monkeypatch.setenv("BAO_ADDR", bao[0])
    monkeypatch.setenv("BAO_TOKEN", bao[1])
    return hvac.Client(url=bao[0], token=bao[1])


def svc_of(p: TransitProvider, sink: MemorySink | None = None) -> KeyService:
    return KeyService(sink=sink or MemorySink(), providers={"transit": p})


def stored(path: Path) -> tuple[Recipient, ...]:
    src = FdSource(os.open(path, os.O_RDONLY))
    try:
        return parse_slots(read_raw(src).slots)[0][1].recipients
    finally:
        src.close()


def replace_recipients(path: Path, svc: KeyService, recipients: tuple[Recipient, ...]) -> None:
    """What a holder of the artifact's data key can do: write a slot with other recipients."""
    src = FdSource(os.open(path, os.O_RDWR))
    try:
        raw = read_raw(src)
        opened = open_keys(raw, lambda r: svc.unwrap(r, raw.core.context))
        write_slot_in_place(src.fd, raw, opened, recipients)
    finally:
        src.close()


def decrypt_raw(root: hvac.Client, key: str, ciphertext: str, **binding: str) -> bytes:
    resp = root.secrets.transit.decrypt_data(key, ciphertext=ciphertext, **binding)
    return base64.b64decode(resp["data"]["plaintext"])


@pytest.mark.parametrize("key_type", ["aes256-gcm96", "chacha20-poly1305"])
def test_plain_key_seal_open_round_trip(env: Env, root: hvac.Client, key_type: str) -> None:
    name = f"plain-{key_type}"
    if key_type == "aes256-gcm96":
        root.secrets.transit.create_key(name)  # `bao write -f transit/keys/NAME`: the default type
    else:
        root.secrets.transit.create_key(name, key_type=key_type)
    sink = MemorySink()
    svc = svc_of(TransitProvider(), sink)
    src = env.work / "w.bin"
    src.write_bytes(os.urandom(200_000))
    sealed = env.work / "w.sealed"
    modelseal.seal(src, sealed, key=f"transit:{name}", context={"env": "prod"}, keys=svc)
    (r,) = stored(sealed)
    assert r.key_id == name and r.key_version == 1 and r.wrapped.startswith(b"ad:vault:v1:")
    assert [e.operation for e in sink.events] == ["generate"]
    assert modelseal.open(sealed, keys=svc_of(TransitProvider())).read() == src.read_bytes()
    # The CLI opens it too, with no modelseal-specific key setup.
    assert main(["unseal", str(sealed), str(env.work / "w.out")]) == 0
    assert (env.work / "w.out").read_bytes() == src.read_bytes()


def test_plain_key_wrap_is_bound_by_associated_data(root: hvac.Client) -> None:
    root.secrets.transit.create_key("ad-kek")
    p = TransitProvider()
    dek = os.urandom(32)
    r = p.wrap("ad-kek", dek, PROD)
    ct = r.wrapped.decode().removeprefix("ad:")
    assert p.unwrap(r, PROD) == dek
    with pytest.raises(DecryptionError):
        p.unwrap(r, DEV)
    with pytest.raises(DecryptionError):
        p.unwrap(r, ())
    # On the server itself: the wrap opens only with modelseal's associated data, never without any.
    assert decrypt_raw(root, "ad-kek", ct, associated_data=associated_data(PROD)) == dek
    for binding in ({}, {"associated_data": associated_data(DEV)}, {"context": derivation_context(PROD)}):
        with pytest.raises(hvac.exceptions.InvalidRequest, match="authentication failed"):
            decrypt_raw(root, "ad-kek", ct, **binding)


def test_recipient_copied_between_artifacts_does_not_unwrap(env: Env, root: hvac.Client) -> None:
    """A's wrap planted in B (another context) is refused by Transit itself, not only later by B's slot MAC."""
    root.secrets.transit.create_key("copy-kek")
    svc = svc_of(TransitProvider())
    src = env.work / "m.bin"
    src.write_bytes(b"weights" * 100)
    a, b = env.work / "a.sealed", env.work / "b.sealed"
    modelseal.seal(src, a, key="transit:copy-kek", context={"env": "prod"}, keys=svc)
    modelseal.seal(src, b, key="transit:copy-kek", context={"env": "dev"}, keys=svc)
    replace_recipients(b, svc, stored(a))
    sink = MemorySink()
    with pytest.raises(DecryptionError):
        modelseal.open(b, keys=svc_of(TransitProvider(), sink))
    unwraps = [e.result for e in sink.events if e.operation == "unwrap"]
    assert unwraps == ["DecryptionError"]  # the unwrap itself failed: the context is really bound


def test_binding_tag_is_checked_never_obeyed(root: hvac.Client) -> None:
    root.secrets.transit.create_key("tag-plain")
    p = TransitProvider()
    p.create("tag-derived")
    dek = os.urandom(32)
    plain = p.wrap("tag-plain", dek, PROD)
    derived = p.wrap("tag-derived", dek, PROD)
    assert plain.wrapped.startswith(b"ad:vault:v1:") and derived.wrapped.startswith(b"vault:v1:")

    def with_wrapped(r: Recipient, wrapped: bytes) -> Recipient:
        return Recipient(r.scheme, r.key_id, r.key_version, wrapped)

    forged = [
        with_wrapped(plain, plain.wrapped.removeprefix(b"ad:")),  # claims derived against a plain key
        with_wrapped(derived, b"ad:" + derived.wrapped),  # claims AD against a derived key
        with_wrapped(plain, b"ad:" + plain.wrapped),  # a doubled tag
        with_wrapped(plain, b"AD:" + plain.wrapped.removeprefix(b"ad:")),  # the tag is exact
    ]
    # A wrap made without any binding (anyone allowed to encrypt with the key can make one),
    # tagged as modelseal would tag it: opening it would mean the context was never bound.
    unbound = root.secrets.transit.encrypt_data("tag-plain", plaintext=base64.b64encode(dek).decode())
    forged.append(with_wrapped(plain, b"ad:" + unbound["data"]["ciphertext"].encode()))
    for r in forged:
        with pytest.raises(DecryptionError):
            p.unwrap(r, PROD)
    assert p.unwrap(plain, PROD) == dek and p.unwrap(derived, PROD) == dek


def test_derived_keys_keep_the_old_form(root: hvac.Client) -> None:
    """A wrap made the pre-AD way (derivation context, bare ciphertext) unwraps as before."""
    root.secrets.transit.create_key("legacy-kek", derived=True)
    dek = os.urandom(32)
    made = root.secrets.transit.encrypt_data(
        "legacy-kek", plaintext=base64.b64encode(dek).decode(), context=derivation_context(PROD)
    )["data"]["ciphertext"]
    p = TransitProvider()
    assert p.unwrap(Recipient("transit", "legacy-kek", 1, made.encode()), PROD) == dek
    fresh = p.wrap("legacy-kek", dek, PROD)
    assert fresh.wrapped.startswith(b"vault:v1:")
    assert decrypt_raw(root, "legacy-kek", fresh.wrapped.decode(), context=derivation_context(PROD)) == dek
    chacha = "legacy-chacha"
    root.secrets.transit.create_key(chacha, derived=True, key_type="chacha20-poly1305")
    assert p.unwrap(p.wrap(chacha, dek, DEV), DEV) == dek


def test_exportable_and_non_aead_keys_are_refused(
    env: Env, root: hvac.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    root.secrets.transit.create_key("exp-plain", exportable=True)
    root.secrets.transit.create_key("exp-derived", exportable=True, derived=True)
    root.secrets.transit.create_key("an-rsa", key_type="rsa-2048")
    root.secrets.transit.create_key("an-ed", key_type="ed25519")
    p = TransitProvider()
    for name in ("exp-plain", "exp-derived"):
        with pytest.raises(KeyProviderError, match="exportable, so its key material can leave the server"):
            p.wrap(name, os.urandom(32), PROD)
    for name, ktype in (("an-rsa", "rsa-2048"), ("an-ed", "ed25519")):
        with pytest.raises(KeyProviderError, match=f"'{ktype}' key, which cannot bind the encryption context"):
            p.wrap(name, os.urandom(32), PROD)
    # An exportable key is refused for unwrapping as well: nothing to read from it.
    made = root.secrets.transit.encrypt_data("exp-plain", plaintext=base64.b64encode(b"k" * 32).decode())
    with pytest.raises(KeyProviderError, match="exportable"):
        p.unwrap(Recipient("transit", "exp-plain", 1, b"ad:" + made["data"]["ciphertext"].encode()), PROD)
    src = env.work / "m.bin"
    src.write_bytes(b"weights")
    capsys.readouterr()
    assert main(["seal", str(src), str(env.work / "m.sealed"), "--key", "transit:exp-plain"]) == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("modelseal: error: ") and "exportable" in err
    assert not (env.work / "m.sealed").exists()


def test_plain_key_rewrap_and_min_decryption_version(env: Env, root: hvac.Client) -> None:
    root.secrets.transit.create_key("rw-kek")
    p = TransitProvider()
    svc = svc_of(p)
    src = env.work / "w.bin"
    src.write_bytes(os.urandom(100_000))
    sealed = env.work / "w.sealed"
    modelseal.seal(src, sealed, key="transit:rw-kek", context={"env": "prod"}, keys=svc)
    svc.rotate("transit:rw-kek")
    (env.home / "config.toml").write_text('[environments.prod]\nkeys = ["transit:rw-kek"]\n')
    modelseal.rewrap(sealed, keys=svc_of(p))
    (r,) = stored(sealed)
    assert r.key_version == 2 and r.wrapped.startswith(b"ad:vault:v2:")  # the binding survives the rewrap
    svc.set_min_version("transit:rw-kek", 2)  # version 1 stops decrypting: the rewrap really re-encrypted
    assert modelseal.open(sealed, keys=svc_of(TransitProvider())).read() == src.read_bytes()


def test_rotation_of_plain_key_in_batches_with_one_forged_artifact(env: Env, root: hvac.Client) -> None:
    """120 artifacts (2 batches) of varied contexts; one holds a tag-stripped wrap and fails alone."""
    from modelseal.recipes.rotation import rotate

    root.secrets.transit.create_key("fleet-plain")
    p = TransitProvider()
    svc = svc_of(p)
    src = env.work / "s.bin"
    src.write_bytes(b"adapter" * 50)
    folder = env.work / "fleet"
    folder.mkdir()
    paths = []
    for i in range(120):
        path = folder / f"a{i:03d}.sealed"
        modelseal.seal(src, path, key="transit:fleet-plain", context={"artifact": f"adapter-{i % 7}"}, keys=svc)
        paths.append(path)
    (good,) = stored(paths[42])
    stripped = Recipient(good.scheme, good.key_id, good.key_version, good.wrapped.removeprefix(b"ad:"))
    replace_recipients(paths[42], svc, (stripped,))
    report = rotate("transit:fleet-plain", [folder], force=True, keys=svc_of(p))
    assert report.rotated and len(report.rewrapped) == 119
    assert [name for name, _ in report.failed] == [str(paths[42])]
    svc.set_min_version("transit:fleet-plain", 2)
    for i in (0, 41, 43, 119):
        (r,) = stored(paths[i])
        assert r.key_version == 2 and r.wrapped.startswith(b"ad:vault:v2:")
        assert modelseal.open(paths[i], keys=svc_of(TransitProvider())).read() == src.read_bytes()


def test_batched_unwrap_and_rewrap_with_associated_data(root: hvac.Client) -> None:
    root.secrets.transit.create_key("batch-plain")
    p = TransitProvider()
    ctxs = [normalize_context({"env": "prod", "artifact": f"a{i % 5}"}) for i in range(250)]
    deks = [os.urandom(32) for _ in ctxs]  # three batches of at most 100
    wrapped = [p.wrap("batch-plain", d, c) for d, c in zip(deks, ctxs, strict=True)]
    assert p.unwrap_many(wrapped, (), contexts=ctxs) == deks
    p.rotate("batch-plain")
    rewrapped = p.rewrap_many(wrapped, (), contexts=ctxs)
    assert {r.key_version for r in rewrapped} == {2} and all(r.wrapped.startswith(b"ad:vault:v2:") for r in rewrapped)
    assert p.unwrap_many(rewrapped, (), contexts=ctxs) == deks
    wrong = [*ctxs[:-1], DEV]  # one item of the last batch under another context
    with pytest.raises(DecryptionError):
        p.unwrap_many(rewrapped, (), contexts=wrong)
    with pytest.raises(DecryptionError):
        p.rewrap_many(rewrapped, (), contexts=wrong)


def test_a_failed_batch_keeps_no_data_key_in_the_error_chain(root: hvac.Client) -> None:
    """Transit answers a batch with one bad item with a 400 whose body holds the other items'
    plaintexts (data keys); the error raised must not carry that response along."""
    import traceback

    root.secrets.transit.create_key("leak-check")
    p = TransitProvider()
    deks = [os.urandom(32) for _ in range(3)]
    ctxs = [normalize_context({"env": x}) for x in ("a", "b", "c")]
    wrapped = [p.wrap("leak-check", d, c) for d, c in zip(deks, ctxs, strict=True)]
    wrong = [ctxs[0], normalize_context({"env": "wrong"}), ctxs[2]]
    with pytest.raises(DecryptionError) as info:
        p.unwrap_many(wrapped, ctxs[0], contexts=wrong)
    text = "".join(traceback.format_exception(info.value, chain=True))
    chain: list[BaseException] = []
    e: BaseException | None = info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert len(chain) == 1  # nothing attached: the hvac error is gone with its response
    for d in deks:
        b64 = base64.b64encode(d).decode()
        assert b64 not in text
