"""The key broker's core, without HTTP (docs/broker.md): the catalog on SQLite and PostgreSQL,
config.toml's ``[broker]``, the broker recipient's encoding, and the server-side operations
over a real KeyService with a local backing key: a recipient naming another backing key is
refused, a context of another environment is refused, each batch item gets its own result,
and every audit event names the caller."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelseal.errors import DecryptionError, GovernanceError, KeyNotFound, ModelsealError, PolicyDenied
from modelseal.format.header import MAX_WRAPPED, Recipient, normalize_context
from modelseal.governance import brokerops as ops
from modelseal.governance.brokerkeys import BrokerConfig, BrokerKey, BrokerKeys, backing_uri, check_name, parse_config
from modelseal.keys.config import ConfigError
from modelseal.keys.providers import canonical_key, recipient_key
from tests.conftest import Env
from tests.services import postgres

CALLER = "spiffe://example.org/prod/service/trainer"
PROD = normalize_context({"env": "prod", "model": "m1"})
DEV = normalize_context({"env": "dev"})


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerKeys]:
    config = parse_config({"keys": {"static-prod": {"key": "transit:transit/prod-kek", "env": "prod"}}})
    if request.param == "sqlite":
        keys = BrokerKeys.open(tmp_path / "gov" / "governance.db", config)
        yield keys
        keys.close()
        return
    with postgres() as url:
        keys = BrokerKeys.open(url, config)
        yield keys
        keys.close()


def test_catalog_add_get_list_and_names_never_reused(catalog: BrokerKeys) -> None:
    made = catalog.add("llama", "prod", "transit:transit/broker-prod-abc", CALLER, now=1000.0)
    assert catalog.get("llama") == made
    assert made.created_by == CALLER and made.created == 1000.0 and not made.static
    assert [k.name for k in catalog.all()] == ["llama", "static-prod"]
    assert catalog.get("static-prod").static and catalog.get("static-prod").backing == "transit:transit/prod-kek"
    with pytest.raises(GovernanceError, match="exists already"):
        catalog.add("llama", "dev", "local:other", CALLER)
    with pytest.raises(GovernanceError, match=r"configured in config\.toml"):
        catalog.add("static-prod", "prod", "local:x", CALLER)
    catalog.mark_destroyed("llama", now=2000.0)
    assert catalog.get("llama").destroyed == 2000.0
    with pytest.raises(GovernanceError, match="never reused"):
        catalog.check_free("llama")
    with pytest.raises(KeyNotFound):
        catalog.get("nothing-here")


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-lead", "x" * 129, "a b", "é", "a\x00"])
def test_bad_names_are_refused_before_any_lookup(tmp_path: Path, bad: str) -> None:
    keys = BrokerKeys.open(tmp_path / "g.db")
    with pytest.raises(GovernanceError, match="invalid broker key name"):
        keys.get(bad)
    with pytest.raises(GovernanceError):
        check_name(bad)
    assert check_name("Ok.name_1-x") == "Ok.name_1-x"


def test_config_static_keys_and_create_templates(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "create": {"prod": "transit", "dev": "local", "stage": "pkcs11:token=hsm?module-path=/m.so"},
            "keys": {"a": {"key": "awskms:arn:aws:kms:eu-west-1:111122223333:key/abcd", "env": "prod"}},
        }
    )
    assert cfg.keys["a"].env == "prod" and cfg.keys["a"].static
    assert cfg.template("prod") == "transit" and cfg.template("qa") == "local"
    assert backing_uri("transit", "prod", "ab") == "transit:transit/broker-prod-ab"
    assert backing_uri("transit:team", "prod", "ab") == "transit:team/broker-prod-ab"
    assert backing_uri("local", "dev", "ab") == "local:broker-dev-ab"
    assert (
        backing_uri(cfg.template("stage"), "stage", "ab") == "pkcs11:token=hsm;object=broker-stage-ab?module-path=/m.so"
    )
    made = BrokerKeys.open(tmp_path / "g.db", cfg).new_backing("prod")
    assert made.startswith("transit:transit/broker-prod-") and len(made) == len("transit:transit/broker-prod-") + 24
    for bad in (
        {"keys": {"k": {"key": "broker:loop", "env": "prod"}}},  # a broker key never backs a broker key
        {"keys": {"k": {"key": "local:k", "env": "Prod"}}},
        {"keys": {"k": {"key": "local:k", "env": "prod", "path": "/etc"}}},
        {"keys": {"../k": {"key": "local:k", "env": "prod"}}},
        {"create": {"prod": "awskms"}},
        {"create": {"prod": 3}},
    ):
        with pytest.raises(ConfigError):
            parse_config(bad)


def test_encoding_round_trip_and_strict_parse() -> None:
    inner = Recipient("transit", "transit/broker-prod-ab", 7, b"vault:v7:" + b"A" * 60)
    outer = ops.outer("llama", inner)
    assert (outer.scheme, outer.key_id, outer.key_version) == ("broker", "llama", 7)
    assert ops.decode_inner(outer.wrapped) == inner
    w = outer.wrapped
    bad = [
        b"",
        w[:3],
        w[: -len(inner.wrapped)],  # no inner wrap
        b"\x02" + w[1:],  # unknown encoding version
        w[:1] + b"\x06broker" + w[2 + 7 :],  # a broker recipient inside a broker recipient
        w[:1] + b"\x07Transit" + w[9:],  # a scheme outside the grammar
        w[:9] + struct.pack(">H", 2000) + w[11:],  # a key id running past the end
        w[:11] + b"transit/b\x1bkr" + w[11 + 12 :],  # a forbidden character in the key id
    ]
    for b in bad:
        with pytest.raises(DecryptionError):
            ops.decode_inner(b)
    with pytest.raises(GovernanceError, match="too large"):
        ops.encode_inner(Recipient("local", "k", 1, b"x" * MAX_WRAPPED))


@pytest.fixture
def local_entry(env: Env) -> BrokerKey:
    env.svc.create("broker-prod-kek")
    return BrokerKey("llama", "prod", "local:broker-prod-kek", CALLER, 1.0)


def test_a_recipient_naming_another_backing_key_is_refused(env: Env, local_entry: BrokerKey) -> None:
    dek = os.urandom(32)
    own = ops.wrap_one(env.svc, local_entry, dek, PROD, CALLER)
    assert ops.unwrap_items(env.svc, local_entry, [(own.key_version, own.wrapped, PROD)], CALLER) == [dek]
    # The caller's own key (test-kek) wrapped the same DEK; relabelled as broker key "llama", the
    # server must not unwrap it with test-kek: the catalog, not the artifact, names the key.
    other = env.svc.wrap("local:test-kek", dek, PROD)
    forged = ops.outer("llama", other)
    for version, wrapped in (
        (forged.key_version, forged.wrapped),
        (1, ops.encode_inner(Recipient("transit", "transit/broker-prod-kek", 1, b"vault:v1:x"))),
        (1, ops.encode_inner(Recipient("pkcs11", "token=t;object=o?module-path=/tmp/evil.so", 1, b"x" * 28))),
    ):
        got = ops.unwrap_items(env.svc, local_entry, [(version, wrapped, PROD)], CALLER)
        assert isinstance(got[0], PolicyDenied) and "does not belong to broker key llama" in str(got[0])
    with pytest.raises(DecryptionError):  # the version the broker recipient records must be the inner one
        ops.check_inner(env.svc, local_entry, own.key_version + 1, own.wrapped)


def test_context_env_must_be_the_keys_env(env: Env, local_entry: BrokerKey) -> None:
    dek = os.urandom(32)
    with pytest.raises(PolicyDenied, match="is of env prod; refusing it for env=dev"):
        ops.wrap_one(env.svc, local_entry, dek, DEV, CALLER)
    with pytest.raises(PolicyDenied, match=r"env=\(none\)"):
        ops.wrap_one(env.svc, local_entry, dek, normalize_context({"model": "m1"}), CALLER)
    own = ops.wrap_one(env.svc, local_entry, dek, PROD, CALLER)
    # The same wrap presented under a dev context: refused before any provider call.
    n = len(env.sink.events)
    got = ops.unwrap_items(env.svc, local_entry, [(own.key_version, own.wrapped, DEV)], CALLER)
    assert isinstance(got[0], PolicyDenied) and len(env.sink.events) == n
    # And a context that differs in another field is the AEAD's refusal.
    other = normalize_context({"env": "prod", "model": "m2"})
    got = ops.unwrap_items(env.svc, local_entry, [(own.key_version, own.wrapped, other)], CALLER)
    assert isinstance(got[0], DecryptionError)


def test_batches_answer_per_item_and_audit_the_caller_without_caching(env: Env, local_entry: BrokerKey) -> None:
    deks = [os.urandom(32) for _ in range(5)]
    wraps = [ops.wrap_one(env.svc, local_entry, d, PROD, CALLER) for d in deks]
    items = [(w.key_version, w.wrapped, PROD) for w in wraps]
    items[2] = (items[2][0], items[2][1][:-1] + bytes([items[2][1][-1] ^ 1]), PROD)  # one corrupted wrap
    got = ops.unwrap_items(env.svc, local_entry, items, CALLER)
    assert [g for i, g in enumerate(got) if i != 2] == [d for i, d in enumerate(deks) if i != 2]
    assert isinstance(got[2], DecryptionError)
    again = ops.unwrap_items(env.svc, local_entry, items[:1], CALLER)  # no cache on the server: a new event
    assert again == deks[:1]
    unwraps = [e for e in env.sink.events if e.operation == "unwrap"]
    assert len(unwraps) == 6 and {e.actor for e in unwraps} == {CALLER}
    assert [e.result for e in unwraps].count("DecryptionError") == 1
    assert all(e.actor == CALLER for e in env.sink.events if e.operation == "wrap")
    for e in env.sink.events:  # no data key in any event
        assert not any(d.hex() in e.to_json() for d in deks)


def test_rewrap_moves_to_the_newest_version_and_keeps_the_data_key(env: Env, local_entry: BrokerKey) -> None:
    dek = os.urandom(32)
    old = ops.wrap_one(env.svc, local_entry, dek, PROD, CALLER)
    ops.change(env.svc, local_entry, "rotate", None, CALLER)
    [new] = ops.rewrap_items(env.svc, local_entry, [(old.key_version, old.wrapped, PROD)], CALLER)
    assert isinstance(new, Recipient) and new.key_version == old.key_version + 1 and new.key_id == "llama"
    assert ops.unwrap_items(env.svc, local_entry, [(new.key_version, new.wrapped, PROD)], CALLER) == [dek]
    rotate = [e for e in env.sink.events if e.operation == "rotate"]
    assert rotate and rotate[-1].actor == CALLER


def test_create_and_destroy_through_the_catalog(env: Env, tmp_path: Path) -> None:
    keys = BrokerKeys.open(tmp_path / "g.db", BrokerConfig(create={"prod": "local"}))
    made = ops.create_key(env.svc, keys, "fresh", "prod", CALLER)
    assert made.backing.startswith("local:broker-prod-") and "fresh" not in made.backing
    assert {k.uri for k in env.svc.list("local")} >= {made.backing}
    with pytest.raises(GovernanceError, match="exists already"):
        ops.create_key(env.svc, keys, "fresh", "prod", CALLER)
    out = ops.destroy_now(env.svc, keys, "fresh", None, "spiffe://example.org/prod/user/alice")
    assert out["destroyed"] == "all versions" and keys.get("fresh").destroyed is not None
    with pytest.raises(ModelsealError, match="destroyed"):
        ops.wrap_one(env.svc, keys.get("fresh"), os.urandom(32), PROD, CALLER)
    destroy = [e for e in env.sink.events if e.operation == "destroy"]
    assert destroy[-1].actor == "spiffe://example.org/prod/user/alice"


def test_broker_recipients_are_validated_like_local_ones() -> None:
    assert recipient_key("broker", "llama") == "broker:llama"
    assert canonical_key("broker:llama") == "broker:llama"
    with pytest.raises(ModelsealError, match="broker recipient"):
        recipient_key("broker", "../../etc")


def test_errors_name_the_broker_key_not_its_backing_key() -> None:
    from modelseal.errors import KeyProviderError
    from modelseal.server.keys_api import hidden

    entry = BrokerKey("llama", "prod", "transit:broker-prod-0a1b", CALLER, 1.0)
    e = KeyProviderError("key provider failed during unwrap of transit:transit/broker-prod-0a1b (Timeout)")
    shown = hidden(e, entry)
    assert type(shown) is KeyProviderError and "broker-prod-0a1b" not in str(shown) and "broker:llama" in str(shown)
    assert hidden(DecryptionError(), entry).args == DecryptionError().args


def test_a_view_with_another_sink_shares_the_providers(env: Env, local_entry: BrokerKey) -> None:
    from modelseal.audit.events import MemorySink

    queue = MemorySink()
    view = env.svc.with_sink(queue)
    dek = os.urandom(32)
    own = ops.wrap_one(view, local_entry, dek, PROD, CALLER)
    assert view.provider("local") is env.svc.provider("local")
    assert [e.operation for e in queue.events] == ["wrap"] and queue.events[0].actor == CALLER
    assert not any(e.operation == "wrap" and e.actor == CALLER for e in env.sink.events)
    assert ops.unwrap_items(env.svc, local_entry, [(own.key_version, own.wrapped, PROD)], CALLER) == [dek]
