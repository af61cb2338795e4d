"""The key broker's catalog (docs/broker.md): which broker key NAME stands for which backing
key on this server's providers, and in which environment.

A broker key is a name (``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``), an environment, and a
backing key URI on the server's own providers (``local``, ``transit``, ``pkcs11``,
``awskms``). Entries come from two places: the server's config.toml (static, the
operator's)::

    [broker]
    create = { prod = "transit", dev = "local" }   # the provider of keys made by POST keys

    [broker.keys.llama-prod]
    key = "transit:transit/llama-prod"
    env = "prod"

and the table ``gov_broker_keys`` of the governance database (keys made through the API,
each named by a fresh random backing name, so a requested name never becomes a provider
key name, a path or a setting). A name is never both.

The recipient encoding, the checks and the operations are ``governance.brokerops``'.
No I/O but the database and config.toml; no HTTP, no authorization, no key operation.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.errors import GovernanceError, KeyNotFound, ModelsealError
from modelseal.keys.config import ConfigError, config_table
from modelseal.keys.providers import KEY_NAME, canonical_key, parse_key_uri
from modelseal.keys.service import printable
from modelseal.pki.identity import check_env as check_identity_env
from modelseal.util.sqldb import SqlDatabase

SCHEME = "broker"
BACKING_SCHEMES = ("local", "transit", "pkcs11", "awskms")
CREATE_SCHEMES = ("local", "transit", "pkcs11")  # AWS KMS keys are made in AWS and configured statically
DEFAULT_CREATE = "local"
CACHE_SECONDS = 2.0  # how long a read entry is reused (another worker's destroy is seen within this)
MAX_CACHED = 10_000


def check_name(name: object) -> str:
    """A broker key name, or ``GovernanceError`` (never echoed unescaped)."""
    if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
        shown = printable(name[:80]) if isinstance(name, str) else type(name).__name__
        raise GovernanceError(f"invalid broker key name {shown!r}: 1-128 of [A-Za-z0-9._-], starting alphanumeric")
    return name


def check_env(env: object) -> str:
    if not isinstance(env, str):
        raise GovernanceError("a broker key's env must be a string")
    try:
        return check_identity_env(env)
    except ModelsealError as e:
        raise GovernanceError(str(e)) from None


@dataclass(frozen=True)
class BrokerKey:
    """One catalog entry. ``backing`` is the operator's (or the server's) key URI, never
    anything a client sent."""

    name: str
    env: str
    backing: str
    created_by: str = "config.toml"
    created: float = 0.0
    static: bool = False
    destroyed: float | None = None

    @property
    def uri(self) -> str:
        return f"{SCHEME}:{self.name}"


def _check_backing(uri: str, where: str) -> str:
    try:
        scheme = parse_key_uri(uri).scheme
        canonical_key(uri)
    except ModelsealError as e:
        raise ConfigError(f"config: {where}: {e}") from None
    if scheme not in BACKING_SCHEMES:
        raise ConfigError(f"config: {where} must be a key of {', '.join(BACKING_SCHEMES)}, not {scheme}:")
    return uri


def backing_uri(template: str, env: str, token: str | None = None) -> str:
    """A fresh backing key URI for a key made in ``env``: ``template`` is ``local``,
    ``transit`` or ``transit:MOUNT``, or ``pkcs11:token=LABEL[?module-path=...]``; the key's
    own name is random (``broker-ENV-HEX``), never the requested broker name."""
    obj = f"broker-{check_identity_env(env)}-{token or secrets.token_hex(12)}"
    scheme, _, rest = template.partition(":")
    if scheme == "local" and not rest:
        return f"local:{obj}"
    if scheme == "transit":
        return f"transit:{rest.strip('/') or 'transit'}/{obj}"
    if scheme == "pkcs11" and rest:
        path, sep, query = rest.partition("?")
        return f"pkcs11:{path.rstrip(';')};object={obj}{sep}{query}"
    raise ConfigError(f"config: broker.create takes one of {', '.join(CREATE_SCHEMES)} (pkcs11:token=LABEL)")


@dataclass(frozen=True)
class BrokerConfig:
    """The ``[broker]`` table of the server's config.toml."""

    keys: Mapping[str, BrokerKey] = field(default_factory=dict)
    create: Mapping[str, str] = field(default_factory=dict)  # env -> template; "*" is every other env

    def template(self, env: str) -> str:
        return self.create.get(env) or self.create.get("*") or DEFAULT_CREATE


def parse_config(table: Mapping[str, Any]) -> BrokerConfig:
    """Parse ``[broker]`` (``server``, ``tls_dir`` and ``pins`` are the client's; ignored here)."""
    raw_keys = table.get("keys", {})
    raw_create = table.get("create", {})
    if not isinstance(raw_keys, dict) or not isinstance(raw_create, dict):
        raise ConfigError("config: [broker.keys] and broker.create must be tables")
    keys: dict[str, BrokerKey] = {}
    for name, spec in raw_keys.items():
        try:
            check_name(name)
        except GovernanceError as e:
            raise ConfigError(f"config: [broker.keys]: {e}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("key"), str) or set(spec) - {"key", "env"}:
            raise ConfigError(f'config: [broker.keys.{name}] takes key = "SCHEME:..." and env = "ENV"')
        try:
            env = check_env(spec.get("env"))
        except GovernanceError as e:
            raise ConfigError(f"config: [broker.keys.{name}] env: {e}") from None
        keys[name] = BrokerKey(name, env, _check_backing(spec["key"], f"broker.keys.{name}.key"), static=True)
    create: dict[str, str] = {}
    for env, template in raw_create.items():
        if env != "*":
            check_env(env)
        if not isinstance(template, str):
            raise ConfigError(f"config: broker.create.{env} must be a string")
        _check_backing(backing_uri(template, "probe", "0" * 24), f"broker.create.{env}")
        create[env] = template
    return BrokerConfig(keys, create)


def load_config(home: Path | None = None) -> BrokerConfig:
    """``[broker]`` of ``$MODELSEAL_HOME/config.toml`` (empty without one)."""
    return parse_config(config_table("broker", home))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS gov_broker_keys (
    name TEXT{C} PRIMARY KEY,
    env TEXT NOT NULL,
    backing TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created {REAL} NOT NULL,
    destroyed {REAL}
);
"""


class BrokerKeys(SqlDatabase):
    """The catalog: config.toml's static entries over the ``gov_broker_keys`` rows."""

    SCHEMA = _SCHEMA
    ERROR = GovernanceError
    LABEL = "the broker key catalog"
    LOCK = 7369241

    def __init__(self, dialect: str, target: str, config: BrokerConfig | None = None) -> None:
        super().__init__(dialect, target)
        self.config = config if config is not None else BrokerConfig()
        self._cache: dict[str, tuple[float, BrokerKey]] = {}

    def cached(self, name: str) -> BrokerKey | None:
        """The entry of ``name`` if this process read it less than ``CACHE_SECONDS`` ago (no
        I/O: the request path skips a thread hop). A row changes only when its key is
        destroyed, and every backing provider refuses a destroyed key by itself."""
        if name in self.config.keys:
            return self.config.keys[name]
        hit = self._cache.get(name)
        return hit[1] if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS else None

    @classmethod
    def open(cls, target: str | Path, config: BrokerConfig | None = None) -> BrokerKeys:
        """``postgresql://...`` or the path of a SQLite file (``governance.store.open_target``)."""
        text = str(target)
        if text.startswith(("postgresql://", "postgres://")):
            return cls("pg", text, config)
        path = Path(text)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls("sqlite", str(path), config)

    def get(self, name: str) -> BrokerKey:
        """The entry of ``name`` (validated first); ``KeyNotFound`` if there is none."""
        check_name(name)
        static = self.config.keys.get(name)
        if static is not None:
            return static
        row = self.run(lambda q: q("SELECT * FROM gov_broker_keys WHERE name = ?", name).fetchone(), False)
        if row is None:
            raise KeyNotFound(f"no broker key {name}")
        entry = _entry(row)
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[name] = (time.monotonic(), entry)
        return entry

    def all(self) -> list[BrokerKey]:
        rows = self.run(lambda q: q("SELECT * FROM gov_broker_keys ORDER BY name").fetchall(), False)
        made = [_entry(r) for r in rows if r[0] not in self.config.keys]
        return sorted([*self.config.keys.values(), *made], key=lambda k: k.name)

    def new_backing(self, env: str) -> str:
        """The backing key URI a key made now for ``env`` gets (random name)."""
        return backing_uri(self.config.template(env), env)

    def check_free(self, name: str) -> None:
        """Refuse a name in use: configured, made, or made and destroyed (a name is never reused)."""
        try:
            self.get(name)
        except KeyNotFound:
            return
        raise GovernanceError(f"broker key {name} exists already (names are never reused)")

    def add(self, name: str, env: str, backing: str, by: str, now: float | None = None) -> BrokerKey:
        check_name(name)
        if name in self.config.keys:
            raise GovernanceError(f"broker key {name} is configured in config.toml")
        entry = BrokerKey(name, check_env(env), backing, by, time.time() if now is None else now)

        def insert(q: Any) -> None:
            if q("SELECT 1 FROM gov_broker_keys WHERE name = ?", name).fetchone() is not None:
                raise GovernanceError(f"broker key {name} exists already (names are never reused)")
            q(
                "INSERT INTO gov_broker_keys (name, env, backing, created_by, created) VALUES (?, ?, ?, ?, ?)",
                entry.name,
                entry.env,
                entry.backing,
                entry.created_by,
                entry.created,
            )

        self.run(insert)
        return entry

    def mark_destroyed(self, name: str, now: float | None = None) -> None:
        t = time.time() if now is None else now
        self.run(lambda q: q("UPDATE gov_broker_keys SET destroyed = ? WHERE name = ?", t, name))
        self._cache.pop(name, None)


def _entry(row: Any) -> BrokerKey:
    return BrokerKey(row[0], row[1], row[2], row[3], float(row[4]), False, None if row[5] is None else float(row[5]))


__all__ = [
    "BACKING_SCHEMES",
    "CREATE_SCHEMES",
    "SCHEME",
    "BrokerConfig",
    "BrokerKey",
    "BrokerKeys",
    "backing_uri",
    "check_env",
    "check_name",
    "load_config",
    "parse_config",
]
