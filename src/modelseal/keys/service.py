"""The boundary in front of every key provider.

``KeyService`` is the one place that calls providers. Like python-tuf's
``FetcherInterface.fetch`` around ``_fetch``, each operation here normalises
whatever a backend raises into the modelseal error tree and emits one audit
event (success or failure) per key operation. Recipes never call a provider
directly.

It also owns key identity: ``canonical`` (an operator's key URI) and
``recipient_identity`` (a recipient read from an artifact, parsed the untrusted way)
give one spelling per key, resolved by the provider where a key has several (AWS KMS),
and every comparison (environment bindings, the recipients a rewrap keeps) uses them.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from modelseal.audit.events import AuditEvent, AuditSink
from modelseal.errors import KeyProviderError, ModelsealError, PolicyDenied, StorageError
from modelseal.format.header import Recipient
from modelseal.keys import keystore
from modelseal.keys.config import Config
from modelseal.keys.config import load as load_config
from modelseal.keys.providers import (
    DataKeyGenerator,
    KeyAdmin,
    KeyInfo,
    KeyProvider,
    KeyResolver,
    canonical_key,
    parse_key_uri,
    provider_for,
    recipient_key,
)
from modelseal.util import observe
from modelseal.util.home import check_home, modelseal_home

T = TypeVar("T")


def printable(text: str) -> str:
    r"""``text`` as one unambiguous line, for messages that quote untrusted data (a key id
    read from an artifact must not forge lines of output): a backslash and every
    non-printable character are escaped (``\\``, ``\xHH``, ``\uHHHH``, ``\UHHHHHHHH``)."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    if c == "\\":
        return "\\\\"
    if c.isprintable():
        return c
    n = ord(c)
    return f"\\x{n:02x}" if n <= 0xFF else f"\\u{n:04x}" if n <= 0xFFFF else f"\\U{n:08x}"


def default_sink() -> AuditSink:
    """The tamper-evident audit log under ``$MODELSEAL_HOME`` (``audit.db``)."""
    from modelseal.audit.log import MerkleAuditLog

    home = modelseal_home()
    # A missing MODELSEAL_HOME is refused: a fresh audit log there would be one nobody watches.
    check_home(home, StorageError)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)  # only this user's own default, on first use
    # MODELSEAL_AUDIT_URL=postgresql://... keeps the log in PostgreSQL (the registry's).
    return MerkleAuditLog(os.environ.get("MODELSEAL_AUDIT_URL") or Path(home) / "audit.db")


# Operations that change a key: their audit event is checked for before and reported after.
LIFECYCLE_OPS = frozenset(
    {
        "create",
        "rotate",
        "rotate-root",
        "disable",
        "enable",
        "min-version",
        "destroy",
        "schedule-destroy",
        "cancel-destroy",
    }
)
UNWRAP_CACHE_TTL = 300.0
# A key disabled in a KMS/HSM by someone else is honoured by this process within this time.
REMOTE_CACHE_TTL = 60.0
UNWRAP_CACHE_SIZE = 256


def _event(op: str, key: str, result: str, version: int | None, artifact: str | None, actor: str | None) -> AuditEvent:
    event = AuditEvent(op, key, result, version, artifact)
    return replace(event, actor=actor) if actor else event


class KeyService:
    """Calls providers; caches unwrapped data keys so a KMS round trip (or a keystore
    unlock) is paid once per artifact per process, not once per tensor or file.

    The cache is keyed by the exact recipient (scheme, key id, version, wrapped
    bytes) and context, lives ``UNWRAP_CACHE_TTL`` seconds, and is emptied by
    any disable, enable, rotate or destroy made through this service. Cache hits
    emit no audit event: only provider calls do.
    """

    def __init__(
        self,
        sink: AuditSink | None = None,
        providers: dict[str, KeyProvider] | None = None,
        now: Callable[[], float] = time.monotonic,
        config: Config | None = None,
    ) -> None:
        self._config = config
        self._sink = sink
        self._providers: dict[str, KeyProvider] = dict(providers or {})
        self._now = now
        self._unwrapped: OrderedDict[tuple[object, ...], tuple[bytes, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0  # bumped by every lifecycle change: an in-flight unwrap cannot re-fill the cache

    def with_sink(self, sink: AuditSink) -> KeyService:
        """The same providers (shared) and configuration, events to ``sink`` (the broker's queue)."""
        view = KeyService(sink, None, self._now, self._config)
        view._providers = self._providers
        return view

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config()
        return self._config

    def canonical(self, key_uri: str) -> str:
        """The one identity of an operator's key URI (``transit:k`` is ``transit:transit/k``;
        a pkcs11 key is its token and object; an AWS KMS key is its key ARN)."""
        return self._resolve(canonical_key(key_uri))

    def recipient_identity(self, recipient: Recipient) -> str:
        """The identity of a recipient read from an artifact, in the same spelling as
        ``canonical``. Parsed the untrusted way (no pkcs11 module or PIN, allowed transit
        mounts only); for comparison, never to wrap to."""
        return self._resolve(recipient_key(recipient.scheme, recipient.key_id))

    def _resolve(self, canon: str) -> str:
        ref = parse_key_uri(canon)
        p = self.provider(ref.scheme)
        return f"{ref.scheme}:{p.canonical_name(ref.name)}" if isinstance(p, KeyResolver) else canon

    def environments_of(self, key_uri: str) -> set[str]:
        """Every environment config.toml lists the key under (directly or through a project),
        whatever spelling either side uses."""
        return self._bound(parse_key_uri(key_uri).scheme, lambda: self.canonical(key_uri))

    def _bound(self, scheme: str, identity: Callable[[], str]) -> set[str]:
        cfg = self.config
        listed = [(env, k) for env, keys in cfg.environments.items() for k in keys]
        listed += [(env, k) for per_env in cfg.projects.values() for env, keys in per_env.items() for k in keys]
        same = [(env, k) for env, k in listed if parse_key_uri(k).scheme == scheme]
        if not same:
            return set()  # nothing to compare with: no provider round trip
        me = identity()
        return {env for env, k in same if self.canonical(k) == me}

    def check_environment(self, key_uri: str, context: tuple[tuple[str, str], ...]) -> None:
        """A key listed under some environments serves only contexts of those environments.

        Keys are compared by canonical identity (``canonical``), so no spelling of a key
        (``transit:k`` or ``transit:transit/k``, an AWS KMS alias, key id or ARN) escapes
        the binding.
        """
        self._check_bound(parse_key_uri(key_uri).scheme, lambda: self.canonical(key_uri), context, key_uri)

    def _check_bound(
        self, scheme: str, identity: Callable[[], str], context: tuple[tuple[str, str], ...], shown: str
    ) -> None:
        bound = self._bound(scheme, identity)
        env = dict(context).get("env")
        if bound and env not in bound:
            raise PolicyDenied(
                f"key {printable(shown)} belongs to environment {', '.join(sorted(bound))}; "
                f"refusing it for env={printable(env) if env is not None else '(none)'}"
            )

    def forget_unwrapped(self) -> None:
        with self._lock:
            self._unwrapped.clear()
            self._generation += 1

    @property
    def sink(self) -> AuditSink:
        if self._sink is None:
            self._sink = default_sink()
        return self._sink

    def provider(self, scheme: str) -> KeyProvider:
        if scheme not in self._providers:
            self._providers[scheme] = provider_for(scheme)
        return self._providers[scheme]

    def admin(self, scheme: str) -> KeyAdmin:
        p = self.provider(scheme)
        if not isinstance(p, KeyAdmin):
            raise KeyProviderError(f"the {scheme}: provider does not manage key lifecycle here")
        return p

    def _call(
        self,
        op: str,
        key: str,
        fn: Callable[[], T],
        version: int | None = None,
        artifact: str | None = None,
        actor: str | None = None,
    ) -> T:
        changes = op in LIFECYCLE_OPS
        ready = getattr(self.sink, "ready", None)
        if changes and callable(ready):
            ready()  # a log that cannot take the event refuses the change before it is made
        try:
            result = observe.timed("kms", key.partition(":")[0], fn)  # the provider's request duration
        except ModelsealError as e:
            self.sink.emit(_event(op, key, type(e).__name__, version, artifact, actor))
            raise
        except Exception as e:  # a backend's own exception: normalised, message not echoed
            self.sink.emit(_event(op, key, "KeyProviderError", version, artifact, actor))
            raise KeyProviderError(f"key provider failed during {op} of {key} ({type(e).__name__})") from None
        if isinstance(result, Recipient):
            version = result.key_version
        elif isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Recipient):
            version = result[1].key_version
        elif isinstance(result, KeyInfo) and version is None and result.versions:
            version = result.latest  # rotate: the version it made
        try:
            self.sink.emit(_event(op, key, "ok", version, artifact, actor))
        except ModelsealError as e:
            if not changes:
                raise  # nothing was changed: the result is simply not returned
            done = f"{op} of {printable(key)}" + (f" version {version}" if version is not None else "")
            raise type(e)(f"{done} WAS carried out, but its audit event could not be written: {e}") from None
        return result

    def audited(
        self, op: str, key: str, fn: Callable[[], T], version: int | None = None, actor: str | None = None
    ) -> T:
        """A provider call without a method here (the broker's batched ``unwrap_many``,
        ``rewrap_many``), normalised and audited like every other: one event, ``actor``."""
        return self._call(op, key, fn, version, None, actor)

    def wrap(
        self,
        key_uri: str,
        dek: bytes,
        context: tuple[tuple[str, str], ...],
        artifact: str | None = None,
        op: str = "wrap",
        actor: str | None = None,
    ) -> Recipient:
        ref = parse_key_uri(key_uri)

        def wrap() -> Recipient:
            self.check_environment(ref.uri, context)
            return self.provider(ref.scheme).wrap(ref.name, dek, context)

        return self._call(op, ref.uri, wrap, artifact=artifact, actor=actor)

    def generate(self, key_uri: str, context: tuple[tuple[str, str], ...]) -> tuple[bytes, Recipient] | None:
        """A data key made by the provider, if it makes them (else None: use a local CSPRNG)."""
        ref = parse_key_uri(key_uri)
        p = self.provider(ref.scheme)
        if not isinstance(p, DataKeyGenerator):
            return None

        def generate() -> tuple[bytes, Recipient]:
            self.check_environment(ref.uri, context)
            return p.generate(ref.name, context)

        return self._call("generate", ref.uri, generate)

    def unwrap(
        self,
        recipient: Recipient,
        context: tuple[tuple[str, str], ...],
        artifact: str | None = None,
        op: str = "unwrap",
        actor: str | None = None,
        cache: bool = True,
    ) -> bytes:
        """``cache=False`` (the broker's server: every call audited, no data key kept) skips the cache."""
        uri = f"{recipient.scheme}:{recipient.key_id}"  # names the key in events; never parsed as a key URI
        cache_key = (recipient.scheme, recipient.key_id, recipient.key_version, recipient.wrapped, context)
        with self._lock:
            hit = self._unwrapped.get(cache_key) if cache else None
            generation = self._generation
        if hit is not None and hit[1] > self._now() and op == "unwrap":
            self._check_recipient(recipient, context)  # the configuration may have changed since
            with self._lock:
                if cache_key in self._unwrapped:
                    self._unwrapped.move_to_end(cache_key)
            return hit[0]

        def unwrap() -> bytes:
            self._check_recipient(recipient, context)
            return self.provider(recipient.scheme).unwrap(recipient, context)

        dek = self._call(op, uri, unwrap, recipient.key_version, artifact, actor)
        ttl = UNWRAP_CACHE_TTL if recipient.scheme == "local" else REMOTE_CACHE_TTL
        with self._lock:
            if cache and generation == self._generation:
                self._unwrapped[cache_key] = (dek, self._now() + ttl)
                while len(self._unwrapped) > UNWRAP_CACHE_SIZE:
                    self._unwrapped.popitem(last=False)
        return dek

    def _check_recipient(self, recipient: Recipient, context: tuple[tuple[str, str], ...]) -> None:
        shown = f"{recipient.scheme}:{recipient.key_id}"
        self._check_bound(recipient.scheme, lambda: self.recipient_identity(recipient), context, shown)

    def create(self, key_uri: str, actor: str | None = None) -> KeyInfo:
        ref = parse_key_uri(key_uri)
        return self._call("create", ref.uri, lambda: self.admin(ref.scheme).create(ref.name), 1, actor=actor)

    def rotate(self, key_uri: str, actor: str | None = None) -> KeyInfo:
        self.forget_unwrapped()
        ref = parse_key_uri(key_uri)
        return self._call("rotate", ref.uri, lambda: self.admin(ref.scheme).rotate(ref.name), actor=actor)

    def rotate_root(self, new_passphrase: bytes | None = None) -> tuple[list[KeyInfo], list[str]]:
        """Rotate the local keystore's root key, and first every local KEK with an active
        version (each audited): an old copy of the keystore opened with old recovery shares
        holds the old root and the old KEK versions, so without new versions it would open
        every artifact sealed after the rotation. Returns the rotated keys and the URIs of
        keys left alone (no active version: they seal nothing). Artifacts sealed before
        still open with the old versions until rewrapped and those versions destroyed.

        Rotating the KEKs first keeps every step safe to repeat: after a failure of the
        root rotation, running it again makes newer versions still."""
        try:
            keys = self.list("local")
            rotated = [self.rotate(k.uri) for k in keys if any(v.state == "active" for v in k.versions)]
        except ModelsealError as e:
            self.sink.emit(AuditEvent("rotate-root", "local:*", type(e).__name__))
            raise
        left = [k.uri for k in keys if not any(v.state == "active" for v in k.versions)]
        local: Any = self.provider("local")
        path = local.path if isinstance(getattr(local, "path", None), Path) else None
        self._call("rotate-root", "local:*", lambda: keystore.rotate_root(path, new_passphrase=new_passphrase))
        return rotated, left

    def set_state(self, key_uri: str, version: int, state: str, actor: str | None = None) -> KeyInfo:
        self.forget_unwrapped()
        ref = parse_key_uri(key_uri)
        op = "disable" if state == "disabled" else "enable"
        return self._call(
            op,
            ref.uri,
            lambda: self.admin(ref.scheme).set_version_state(ref.name, version, state),
            version,
            None,
            actor,
        )

    def set_min_version(self, key_uri: str, version: int) -> KeyInfo:
        """Versions below ``version`` stop decrypting (local keys, Transit's ``min_decryption_version``)."""
        self.forget_unwrapped()
        ref = parse_key_uri(key_uri)
        admin: Any = self.admin(ref.scheme)
        if not hasattr(admin, "set_min_decryption_version"):
            raise KeyProviderError(f"the {ref.scheme}: provider has no minimum decryption version; use key disable")
        info: KeyInfo = self._call(
            "min-version", ref.uri, lambda: admin.set_min_decryption_version(ref.name, version), version
        )
        return info

    def destroy(self, key_uri: str, version: int | None, after: float = 0.0, actor: str | None = None) -> KeyInfo:
        """Destroy now (``after`` = 0) or schedule it ``after`` seconds ahead (local keys)."""
        if not math.isfinite(after) or after < 0:
            raise ValueError("the waiting period must be a finite, non-negative number of seconds")
        self.forget_unwrapped()
        ref = parse_key_uri(key_uri)
        admin: Any = self.admin(ref.scheme)
        if after > 0:
            if not hasattr(admin, "cancel_destroy"):
                raise KeyProviderError(f"the {ref.scheme}: provider destroys at once; schedule it there instead")
            scheduled: KeyInfo = self._call(
                "schedule-destroy", ref.uri, lambda: admin.destroy(ref.name, version, after), version
            )
            return scheduled
        destroyed: KeyInfo = self._call(
            "destroy", ref.uri, lambda: admin.destroy(ref.name, version), version, None, actor
        )
        return destroyed

    def cancel_destroy(self, key_uri: str, version: int | None) -> KeyInfo:
        ref = parse_key_uri(key_uri)
        admin: Any = self.admin(ref.scheme)
        if not hasattr(admin, "cancel_destroy"):
            raise KeyProviderError(f"the {ref.scheme}: provider has no scheduled destruction")
        cancelled: KeyInfo = self._call(
            "cancel-destroy", ref.uri, lambda: admin.cancel_destroy(ref.name, version), version
        )
        return cancelled

    def list(self, scheme: str = "local") -> list[KeyInfo]:
        return self.admin(scheme).list()

    def info(self, key_uri: str) -> KeyInfo:
        ref = parse_key_uri(key_uri)
        admin: Any = self.admin(ref.scheme)
        if not hasattr(admin, "info"):
            raise KeyProviderError(f"the {ref.scheme}: provider cannot describe a key")
        return admin.info(ref.name)  # type: ignore[no-any-return]
