"""Environments and projects: ``$MODELSEAL_HOME/config.toml``.

Owns the mapping from environments (dev, staging, prod) and projects to key
URIs, the default environment, and the rotation policy. ``KeyService`` uses it
to keep keys inside their environment: a key listed under ``prod`` refuses to
wrap or unwrap for any context whose ``env`` is not ``prod``. Example::

    host_env = "prod"             # this host's environment: artifacts of others are refused
    default_env = "dev"           # default: host_env if declared, else dev
    rotate_after_days = 90
    trust_policy = "trust.toml"   # verify signatures on load (docs/signing.md)

    [environments.dev]
    keys = ["local:dev-kek"]

    [environments.prod]
    keys = ["transit:prod-kek", "local:prod-recovery"]
    rotate_after_days = 30

    [projects.llama-ft]
    prod = ["transit:llama-prod"]

The file is optional; without it no key is bound to an environment and the
default environment is ``dev``. With ``host_env``, verification, ``open``, ``unseal``
and the loaders refuse artifacts sealed for any other environment unless the caller
pins another one explicitly. The file, and ``$MODELSEAL_HOME`` itself, must be
writable by their owner only: they decide which keys and which trust policy apply.
A home that does not exist is refused (``util.home.check_home``), not read as empty.

The system configuration, ``/etc/modelseal/config.toml`` (``SYSTEM_CONFIG``), holds
what no user's environment may undo, and only that: ``host_env``, which a home's
config.toml may repeat but not change, and ``trust_policy``, which must pass as well as
the home's (``Config.system_trust_policy``). Whichever ``MODELSEAL_HOME`` or ``HOME``
a process has, both apply. It too must be writable by its owner only, in a folder
others cannot write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelseal.errors import ModelsealError
from modelseal.keys.providers import parse_key_uri
from modelseal.util.bounded import toml_loads
from modelseal.util.files import read_limited
from modelseal.util.home import check_home, check_private, modelseal_home

CONFIG_NAME = "config.toml"
SYSTEM_CONFIG = Path("/etc/modelseal/config.toml")
_SYSTEM_KEYS = {"host_env", "trust_policy"}
DEFAULT_ENV = "dev"
DEFAULT_ROTATE_DAYS = 90
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

MAX_CONFIG = 1 << 20  # config.toml is a page of settings, never more than this


class ConfigError(ModelsealError):
    """The configuration file is invalid."""

    exit_code = 2


@dataclass(frozen=True)
class Config:
    default_env: str = DEFAULT_ENV
    rotate_after_days: int = DEFAULT_ROTATE_DAYS
    environments: dict[str, list[str]] = field(default_factory=dict)
    env_rotate_days: dict[str, int] = field(default_factory=dict)
    projects: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    trust_policy: Path | None = None  # signatures are verified on load when set
    host_env: str | None = None  # this host's environment: artifacts of others are refused by default
    system_trust_policy: Path | None = None  # SYSTEM_CONFIG's: must pass as well as trust_policy

    def keys_for(self, env: str, project: str | None = None) -> list[str]:
        if project is not None:
            keys = self.projects.get(project, {}).get(env)
            if keys:
                return list(keys)
        return list(self.environments.get(env, []))

    def rotation_days(self, env: str | None) -> int:
        return self.env_rotate_days.get(env or "", self.rotate_after_days)


def _keys(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"config: {where} must be a list of key URIs")
    for k in value:
        parse_key_uri(k)
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(f"config: {where} must be a name of [a-z0-9_-]")
    return value


def _days(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 3650:
        raise ConfigError(f"config: {where} must be a number of days from 1 to 3650")
    return value


def parse(doc: dict[str, Any]) -> Config:
    host_env = None if doc.get("host_env") is None else _name(doc["host_env"], "host_env")
    default_env = _name(doc.get("default_env", host_env or DEFAULT_ENV), "default_env")
    rotate = _days(doc.get("rotate_after_days", DEFAULT_ROTATE_DAYS), "rotate_after_days")
    envs: dict[str, list[str]] = {}
    env_days: dict[str, int] = {}
    raw_envs = doc.get("environments", {})
    if not isinstance(raw_envs, dict):
        raise ConfigError("config: [environments] must be a table")
    for env, spec in raw_envs.items():
        _name(env, "an environment name")
        if not isinstance(spec, dict):
            raise ConfigError(f"config: [environments.{env}] must be a table")
        envs[env] = _keys(spec.get("keys", []), f"environments.{env}.keys")
        if "rotate_after_days" in spec:
            env_days[env] = _days(spec["rotate_after_days"], f"environments.{env}.rotate_after_days")
    projects: dict[str, dict[str, list[str]]] = {}
    raw_projects = doc.get("projects", {})
    if not isinstance(raw_projects, dict):
        raise ConfigError("config: [projects] must be a table")
    for project, per_env in raw_projects.items():
        _name(project, "a project name")
        if not isinstance(per_env, dict):
            raise ConfigError(f"config: [projects.{project}] must be a table")
        projects[project] = {
            _name(e, "an environment name"): _keys(k, f"projects.{project}.{e}") for e, k in per_env.items()
        }
    trust = doc.get("trust_policy")
    if trust is not None and (not isinstance(trust, str) or not trust):
        raise ConfigError("config: trust_policy must be the path of a trust policy file")
    return Config(default_env, rotate, envs, env_days, projects, Path(trust) if trust else None, host_env)


def _read(path: Path, what: str) -> dict[str, Any] | None:
    """The TOML document at ``path`` (None if there is none)."""
    try:
        raw = read_limited(path, MAX_CONFIG, ConfigError, f"{what} {path}", regular=True)
    except FileNotFoundError:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config: {path} is not UTF-8") from None
    return toml_loads(
        text,
        max_depth=8,
        max_key_parts=8,
        max_values=100_000,
        error=lambda why: ConfigError(f"config: {path} is not valid TOML ({why})"),
    )


def config_table(name: str, home: Path | None = None) -> dict[str, Any]:
    """One table (``[registry]``, ``[broker]``, ``[governance]``) of ``$MODELSEAL_HOME/config.toml``
    under config.toml's ownership and size rules; empty without the file or the table."""
    path = (home or modelseal_home()) / CONFIG_NAME
    if not path.is_file():
        return {}
    check_private(path, "the configuration", ConfigError)
    doc = _read(path, "the configuration") or {}
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"config: [{name}] must be a table")
    return table


def _system() -> tuple[str | None, Path | None]:
    """``host_env`` and ``trust_policy`` of the system configuration (``SYSTEM_CONFIG``)."""
    path = SYSTEM_CONFIG
    check_private(path, "the system configuration", ConfigError, parent=True)
    doc = _read(path, "the system configuration")
    if doc is None:
        return None, None
    if not set(doc) <= _SYSTEM_KEYS:
        raise ConfigError(f"config: {path} may set only {' and '.join(sorted(_SYSTEM_KEYS))}")
    cfg = parse(doc)
    trust = cfg.trust_policy
    return cfg.host_env, (path.parent / trust if trust is not None and not trust.is_absolute() else trust)


def load(home: Path | None = None) -> Config:
    home = home or modelseal_home()
    path = home / CONFIG_NAME
    check_home(home, ConfigError)
    check_private(path, "the configuration", ConfigError)
    system_env, system_policy = _system()
    doc = _read(path, "the configuration") or {}
    if system_env is not None:
        if doc.get("host_env", system_env) != system_env:
            raise ConfigError(
                f"config: {path} declares host_env {doc['host_env']!r}, but {SYSTEM_CONFIG} declares"
                f" {system_env!r}: a home cannot change this host's environment"
            )
        doc = {**doc, "host_env": system_env}
    cfg = parse(doc)
    if cfg.trust_policy is not None and not cfg.trust_policy.is_absolute():
        cfg = replace(cfg, trust_policy=home / cfg.trust_policy)
    return replace(cfg, system_trust_policy=system_policy)
