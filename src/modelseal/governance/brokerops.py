"""The key broker's operations (docs/broker.md): the broker recipient's encoding, the checks
every call passes, and the batched unwrap and rewrap over ``keys.service.KeyService``.

An artifact's ``broker`` recipient names a broker key and carries the backing provider's
own recipient: ``wrapped = 0x01 || u8 len || scheme || u16 len || key_id || u32 version ||
wrapped`` (big-endian), parsed strictly on the way back in (``decode_inner``). The server
looks the name up in its catalog (``governance.brokerkeys``) and refuses an inner recipient
that names any other key than that entry's backing key (``check_inner``, canonical
identities compared the untrusted way), so an artifact never chooses a key; and a broker
key serves only contexts of its own environment (``check_context``).

Batches: Transit's ``unwrap_many``/``rewrap_many`` (one audit event per provider call,
the caller as actor); any other provider item by item. A batch the provider fails on one
item's account is retried item by item, so each item gets its own result or error. No
HTTP and no authorization here (``server.keys_api`` decides first); data keys are never
cached (``KeyService.unwrap(cache=False)``) and never in a message.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Sequence
from typing import TypeVar

from modelseal.errors import (
    DecryptionError,
    GovernanceError,
    KeyDisabled,
    KeyNotFound,
    ModelsealError,
    PolicyDenied,
    ProviderUnavailable,
)
from modelseal.format.header import MAX_WRAPPED, Recipient, valid_key_id
from modelseal.governance.brokerkeys import SCHEME, BrokerKey, BrokerKeys
from modelseal.keys.providers import canonical_key, parse_key_uri, recipient_key
from modelseal.keys.service import KeyService, printable

T = TypeVar("T")
Context = tuple[tuple[str, str], ...]
Item = tuple[int, bytes, Context]  # a broker recipient's version and wrapped bytes, and its context
ENCODING = 1
_INNER_SCHEME = re.compile(r"[a-z][a-z0-9]{0,15}")
_HEAD = struct.Struct(">BB")


def encode_inner(inner: Recipient) -> bytes:
    """The ``wrapped`` bytes of a ``broker`` recipient standing for the backing ``inner``."""
    scheme, key_id = inner.scheme.encode("ascii"), inner.key_id.encode("utf-8")
    out = (
        _HEAD.pack(ENCODING, len(scheme))
        + scheme
        + struct.pack(">H", len(key_id))
        + key_id
        + struct.pack(">I", inner.key_version)
        + inner.wrapped
    )
    if len(out) > MAX_WRAPPED:
        raise GovernanceError("the backing key's wrap is too large for a broker recipient")
    return out


def decode_inner(wrapped: bytes) -> Recipient:
    """The backing recipient inside a broker recipient's ``wrapped`` bytes, parsed strictly
    (untrusted: any malformation is ``DecryptionError``, which says nothing more)."""
    try:
        version, slen = _HEAD.unpack_from(wrapped, 0)
        pos = _HEAD.size
        scheme = wrapped[pos : pos + slen].decode("ascii")
        pos += slen
        (klen,) = struct.unpack_from(">H", wrapped, pos)
        key_id = wrapped[pos + 2 : pos + 2 + klen].decode("utf-8")
        pos += 2 + klen
        (key_version,) = struct.unpack_from(">I", wrapped, pos)
        inner = bytes(wrapped[pos + 4 :])
    except (struct.error, UnicodeDecodeError):
        raise DecryptionError() from None
    ok = (
        version == ENCODING
        and len(scheme) == slen
        and _INNER_SCHEME.fullmatch(scheme) is not None
        and scheme != SCHEME
        and len(key_id.encode("utf-8")) == klen
        and valid_key_id(key_id)
        and key_version >= 1
        and 1 <= len(inner) <= MAX_WRAPPED
    )
    if not ok:
        raise DecryptionError()
    return Recipient(scheme, key_id, key_version, inner)


def outer(name: str, inner: Recipient) -> Recipient:
    """The ``broker`` recipient an artifact stores for ``inner`` under broker key ``name``."""
    return Recipient(SCHEME, name, inner.key_version, encode_inner(inner))


def check_context(entry: BrokerKey, context: tuple[tuple[str, str], ...]) -> None:
    """A broker key serves only its own environment: the context's ``env`` must be the key's."""
    env = dict(context).get("env")
    if env != entry.env:
        shown = printable(env) if env is not None else "(none)"
        raise PolicyDenied(f"broker key {entry.name} is of env {entry.env}; refusing it for env={shown}")


def check_inner(svc: KeyService, entry: BrokerKey, key_version: int, wrapped: bytes) -> Recipient:
    """The backing recipient of a broker recipient of ``entry``, or ``PolicyDenied``: it must
    name exactly ``entry``'s backing key (canonical identities, the untrusted way) and the
    version the broker recipient records. Untrusted input never chooses a key."""
    return inner_checker(svc, entry)(key_version, wrapped)


def inner_checker(svc: KeyService, entry: BrokerKey) -> Callable[[int, bytes], Recipient]:
    """``check_inner`` for many items of one entry. An inner key id must first be, exactly,
    one of the spellings this server itself writes when it wraps with the entry's backing
    key (the URI's name, its canonical form, the resolved identity such as a KMS key ARN),
    so untrusted bytes never drive a provider lookup; only then is it resolved (once per
    distinct id) and its canonical identity compared with the backing key's."""
    ref = parse_key_uri(entry.backing)
    scheme = ref.scheme
    expected: list[str] = []
    spellings: set[str] = set()
    seen: dict[str, bool] = {}

    def same(inner: Recipient) -> bool:
        if not expected:  # the operator's own key, resolved from config.toml: never from the artifact
            expected.append(svc.canonical(entry.backing))
            spellings.update((ref.name, parse_key_uri(canonical_key(entry.backing)).name))
            spellings.add(parse_key_uri(expected[0]).name)
        if inner.key_id not in spellings:
            return False
        try:
            recipient_key(inner.scheme, inner.key_id)  # a refused mount, a pkcs11 module-path: the artifact's fault
        except ModelsealError:
            return False
        try:
            return svc.recipient_identity(inner) == expected[0]
        except KeyNotFound:
            return False  # other provider faults (a KMS out of reach) are the server's, and propagate

    def check(key_version: int, wrapped: bytes) -> Recipient:
        inner = decode_inner(wrapped)
        if inner.key_version != key_version:
            raise DecryptionError()
        if inner.scheme != scheme:
            raise PolicyDenied(f"the wrapped key does not belong to broker key {entry.name}")
        if inner.key_id not in seen:
            seen[inner.key_id] = same(inner)
        if not seen[inner.key_id]:
            raise PolicyDenied(f"the wrapped key does not belong to broker key {entry.name}")
        return inner

    return check


# -- operations, run in a worker thread -----------------------------------------------


def _one_by_one(many: Callable[[list[int]], list[T]], n: int) -> list[T | ModelsealError]:
    """``many`` over all ``n`` items, or, when that fails on one item's account (a provider
    such as Transit fails a whole batch on its first bad item), each item on its own."""
    try:
        return list(many(list(range(n))))
    except ModelsealError as e:
        if n == 1 or isinstance(e, ProviderUnavailable):
            return [e] * n  # the provider itself failed: each item would, after its own retries
    out: list[T | ModelsealError] = []
    for i in range(n):
        try:
            out.append(many([i])[0])
        except ModelsealError as e:
            out.append(e)
    return out


def _group(
    svc: KeyService, entry: BrokerKey, items: Sequence[Item]
) -> tuple[list[tuple[Recipient, Context]], dict[int, ModelsealError]]:
    """The checked backing recipients of one broker key's items, and each refused item's error."""
    ok: list[tuple[Recipient, Context]] = []
    bad: dict[int, ModelsealError] = {}
    check = inner_checker(svc, entry)
    envs: set[str | None] = set()  # the server's own environment bindings depend on env alone
    for i, (version, wrapped, ctx) in enumerate(items):
        try:
            check_context(entry, ctx)
            if (env := dict(ctx).get("env")) not in envs:
                svc.check_environment(entry.backing, ctx)
                envs.add(env)
            ok.append((check(version, wrapped), ctx))
        except ModelsealError as e:
            bad[i] = e
    return ok, bad


def unwrap_items(svc: KeyService, entry: BrokerKey, items: Sequence[Item], actor: str) -> list[bytes | ModelsealError]:
    """The data keys of one broker key's items (or each item's error), in order."""
    ok, bad = _group(svc, entry, items)
    provider = svc.provider(parse_key_uri(entry.backing).scheme)
    many = getattr(provider, "unwrap_many", None)
    if ok and callable(many) and len({r.key_id for r, _ in ok}) == 1:

        def batch(idx: list[int]) -> list[bytes]:
            rs, cs = [ok[i][0] for i in idx], [ok[i][1] for i in idx]
            got: list[bytes] = svc.audited("unwrap", entry.backing, lambda: many(rs, (), contexts=cs), _same(rs), actor)
            return got

        done: list[bytes | ModelsealError] = _one_by_one(batch, len(ok))
    else:
        done = []
        for r, c in ok:
            try:
                done.append(svc.unwrap(r, c, op="unwrap", actor=actor, cache=False))
            except ModelsealError as e:
                done.append(e)
    return _merge(len(items), done, bad)


def rewrap_items(
    svc: KeyService, entry: BrokerKey, items: Sequence[Item], actor: str
) -> list[Recipient | ModelsealError]:
    """New broker recipients, under the backing key's newest version, for one broker key's
    items. Transit rewraps inside OpenBao; any other provider unwraps and wraps here (the
    data key stays in this process)."""
    ok, bad = _group(svc, entry, items)
    provider = svc.provider(parse_key_uri(entry.backing).scheme)
    many = getattr(provider, "rewrap_many", None)
    if ok and callable(many) and len({r.key_id for r, _ in ok}) == 1:

        def batch(idx: list[int]) -> list[Recipient]:
            rs, cs = [ok[i][0] for i in idx], [ok[i][1] for i in idx]
            got: list[Recipient] = svc.audited("rewrap", entry.backing, lambda: many(rs, (), contexts=cs), None, actor)
            return [outer(entry.name, r) for r in got]

        done: list[Recipient | ModelsealError] = _one_by_one(batch, len(ok))
    else:
        done = []
        for r, c in ok:
            try:
                dek = svc.unwrap(r, c, op="rewrap", actor=actor, cache=False)
                done.append(outer(entry.name, svc.wrap(entry.backing, dek, c, op="rewrap", actor=actor)))
            except ModelsealError as e:
                done.append(e)
    return _merge(len(items), done, bad)


def _same(rs: Sequence[Recipient]) -> int | None:
    versions = {r.key_version for r in rs}
    return versions.pop() if len(versions) == 1 else None


def _merge(n: int, done: Sequence[T | ModelsealError], bad: dict[int, ModelsealError]) -> list[T | ModelsealError]:
    it = iter(done)
    return [bad[i] if i in bad else next(it) for i in range(n)]


def wrap_one(svc: KeyService, entry: BrokerKey, dek: bytes, ctx: Context, actor: str) -> Recipient:
    if entry.destroyed is not None:
        raise KeyDisabled(f"broker key {entry.name} is destroyed")
    check_context(entry, ctx)
    return outer(entry.name, svc.wrap(entry.backing, dek, ctx, actor=actor))


def create_key(svc: KeyService, keys: BrokerKeys, name: str, env: str, actor: str) -> BrokerKey:
    """A new backing key (random name, the provider ``[broker] create`` names for ``env``)
    under a new catalog entry."""
    keys.check_free(name)
    backing = keys.new_backing(env)
    svc.create(backing, actor=actor)
    return keys.add(name, env, backing, actor)


def check_change(op: str, version: int | None) -> None:
    """Refuse a lifecycle change that cannot run: disable and enable name a version
    (rotate makes one; destroy without one destroys every version)."""
    if op in ("disable", "enable") and version is None:
        raise GovernanceError(f"{op} takes the version to {op}")


def change(svc: KeyService, entry: BrokerKey, op: str, version: int | None, actor: str) -> None:
    if entry.destroyed is not None:
        raise KeyDisabled(f"broker key {entry.name} is destroyed")
    check_change(op, version)
    if op == "rotate":
        svc.rotate(entry.backing, actor=actor)
    elif version is not None:  # check_change refused disable and enable without one
        svc.set_state(entry.backing, version, "disabled" if op == "disable" else "active", actor=actor)


def destroy_now(svc: KeyService, keys: BrokerKeys, name: str, version: int | None, actor: str) -> dict[str, object]:
    entry = keys.get(name)
    if entry.destroyed is not None:
        raise KeyDisabled(f"broker key {name} is destroyed already")
    svc.destroy(entry.backing, version, actor=actor)
    if version is None:
        keys.mark_destroyed(name)
    return {"key": name, "destroyed": "all versions" if version is None else f"version {version}"}


__all__ = [
    "ENCODING",
    "change",
    "check_change",
    "check_context",
    "check_inner",
    "create_key",
    "decode_inner",
    "destroy_now",
    "encode_inner",
    "inner_checker",
    "outer",
    "rewrap_items",
    "unwrap_items",
    "wrap_one",
]
