"""Where the registry client's defaults come from: arguments, then the environment, then the
``[registry]`` table of ``$MODELSEAL_HOME/config.toml``::

    [registry]
    endpoints = ["registry-a.internal:5000", "registry-b.internal:5000"]  # MODELSEAL_REGISTRY (comma-separated)
    tls_dir = "/etc/modelseal/client-tls"                              # MODELSEAL_TLS_DIR
    pins = ["<live pin>", "<backup pin>"]                              # MODELSEAL_REGISTRY_PINS (comma-separated)
    cache = "/var/cache/modelseal"                                     # MODELSEAL_CACHE

The table is read here (``keys.config`` ignores it), with the same ownership rules as the rest
of config.toml. A reference that names a host goes to that host first; the other configured
endpoints of the same registry follow it, for failover. The ciphertext cache of ``oci://`` loads
defaults to ``$XDG_CACHE_HOME/modelseal`` (``~/.cache/modelseal``): never inside
``$MODELSEAL_HOME``, since data is never kept beside the keys.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelseal.errors import RegistryError
from modelseal.keys.config import ConfigError, config_table
from modelseal.registry.reference import Endpoint, Reference, parse_endpoint

REGISTRY_ENV = "MODELSEAL_REGISTRY"
TLS_DIR_ENV = "MODELSEAL_TLS_DIR"
PINS_ENV = "MODELSEAL_REGISTRY_PINS"
CACHE_ENV = "MODELSEAL_CACHE"


@dataclass(frozen=True)
class Settings:
    endpoints: list[Endpoint]
    tls_dir: Path | None
    pins: list[str]
    cache: Path | None


def _table() -> dict[str, Any]:
    return config_table("registry")


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"config: registry.{where} must be a list of strings")
    return list(value)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def load(
    *,
    endpoints: Sequence[str] | None = None,
    tls_dir: str | os.PathLike[str] | None = None,
    pins: Sequence[str] | None = None,
) -> Settings:
    """The settings in force: each argument given wins, then the environment, then config.toml."""
    table = _table()
    env_eps = os.environ.get(REGISTRY_ENV)
    eps = (
        list(endpoints)
        if endpoints
        else _split(env_eps)
        if env_eps
        else _strings(table.get("endpoints", []), "endpoints")
    )
    env_tls = os.environ.get(TLS_DIR_ENV)
    tls = tls_dir or env_tls or table.get("tls_dir")
    if tls is not None and not isinstance(tls, str | os.PathLike):
        raise ConfigError("config: registry.tls_dir must be a path")
    env_pins = os.environ.get(PINS_ENV)
    pin_list = list(pins) if pins else _split(env_pins) if env_pins else _strings(table.get("pins", []), "pins")
    cache = os.environ.get(CACHE_ENV) or table.get("cache")
    if cache is not None and not isinstance(cache, str):
        raise ConfigError("config: registry.cache must be a path")
    return Settings(
        [parse_endpoint(e) for e in eps], Path(tls) if tls else None, pin_list, Path(cache) if cache else None
    )


def endpoints_for(ref: Reference, settings: Settings) -> list[Endpoint]:
    """The endpoints to try for ``ref``: its own host first, then the configured ones (failover)."""
    if ref.endpoint is None:
        if not settings.endpoints:
            raise RegistryError(
                f"{ref} names no registry, and none is configured ({REGISTRY_ENV} or [registry] endpoints)"
            )
        return list(settings.endpoints)
    rest = [e for e in settings.endpoints if e != ref.endpoint]
    return [ref.endpoint, *rest] if ref.endpoint in settings.endpoints else [ref.endpoint]


def require_tls_dir(settings: Settings) -> Path:
    if settings.tls_dir is None:
        raise RegistryError(f"no client certificate folder: give --tls-dir, or set {TLS_DIR_ENV} or [registry] tls_dir")
    return settings.tls_dir


def cache_dir(settings: Settings) -> Path:
    """The ciphertext cache of ``oci://`` loads (see the module doc)."""
    if settings.cache is not None:
        return settings.cache
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "modelseal"


__all__ = ["CACHE_ENV", "PINS_ENV", "REGISTRY_ENV", "TLS_DIR_ENV", "Settings", "cache_dir", "endpoints_for", "load"]
