"""The client of ``modelseal serve``'s own JSON API (``/modelseal/v1/...``: keys, access,
approvals, MFA, policy): one ``ApiClient`` per process over the registry's pinned mutual-TLS
transport (``registry.transport``), so the same client certificate, pins and failover apply.

Settings, each first found wins: the ``server`` argument, ``MODELSEAL_BROKER``, ``[broker]
server`` of config.toml, then the registry's endpoints (``registry.settings``); the client
folder from ``MODELSEAL_TLS_DIR``, ``[broker] tls_dir``, ``[registry] tls_dir``; the pins from
``MODELSEAL_REGISTRY_PINS``, ``[broker] pins``, ``[registry] pins``::

    [broker]
    server = "modelseal.internal:5000"     # or a list, for failover
    tls_dir = "/etc/modelseal/client-tls"
    pins = ["<live pin>", "<backup pin>"]

The answer of every call is a JSON object, or a typed error with one line that quotes the
server's text only escaped and bounded: 202 with ``approval`` is ``ApprovalRequired`` (the
operation waits for approvals; nothing ran), 403 ``AccessDenied`` with the server's reason,
429 ``AccessDenied`` (rate-limited, with the wait), another 4xx ``GovernanceError``, a 5xx or
a transport failure ``RegistryError``. Request bodies (they may carry an OTP code or a data
key) never appear in a message or a log.
"""

from __future__ import annotations

import http.client
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelseal.errors import AccessDenied, ApprovalRequired, GovernanceError, RegistryError
from modelseal.keys.config import ConfigError, config_table
from modelseal.keys.service import printable
from modelseal.registry import settings as registry_settings
from modelseal.registry.reference import Endpoint, parse_endpoint
from modelseal.registry.transport import Reply, Transport

PREFIX = "/modelseal/v1/"
BROKER_ENV = "MODELSEAL_BROKER"
MAX_API_REPLY = 16 << 20  # a batched unwrap of 10,000 keys is about 1 MiB
_PATH = re.compile(r"[A-Za-z0-9._~:@/-]{1,1024}(\?[A-Za-z0-9._~:@/&=%+,-]{0,2048})?")
_NET_ERRORS = (OSError, http.client.HTTPException)


def _broker_table() -> dict[str, Any]:
    """``[broker]`` of ``$MODELSEAL_HOME/config.toml``, under config.toml's ownership rules."""
    return config_table("broker")


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"config: broker.{where} must be a string or a list of strings")
    return list(value)


def _shown(text: str, limit: int = 300) -> str:
    one = printable(" ".join(text.split()))
    return one[:limit] + ("..." if len(one) > limit else "")


def _message(reply: Reply) -> str:
    """The server's one-line reason (``errors[0].message``), escaped; "" without one."""
    try:
        doc = json.loads(reply.body[:65536])
        first = doc["errors"][0] if isinstance(doc, dict) else None
        message = first.get("message") if isinstance(first, dict) else None
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    return _shown(message) if isinstance(message, str) else ""


def check_path(path: str) -> str:
    """``path`` as a request path under ``/modelseal/v1/`` (given with or without the prefix).
    The caller quotes what it puts in it; anything else is refused, never sent."""
    rel = path[len(PREFIX) :] if path.startswith(PREFIX) else path
    if not _PATH.fullmatch(rel) or rel.startswith("/") or ".." in rel.split("?", 1)[0].split("/"):
        raise GovernanceError(f"refusing the API path {_shown(path, 80)}")
    return PREFIX + rel


class ApiClient:
    """JSON calls to one server's ``/modelseal/v1/`` API over ``transport``."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    @classmethod
    def from_settings(
        cls,
        server: str | None = None,
        *,
        tls_dir: str | os.PathLike[str] | None = None,
        pins: Sequence[str] | None = None,
        timeout: float = 60.0,
    ) -> ApiClient:
        """A client from the settings in force (see the module docstring)."""
        reg = registry_settings.load()
        table = _broker_table()
        given = server or os.environ.get(BROKER_ENV)
        if given:
            eps = [parse_endpoint(e) for e in given.split(",") if e.strip()]
        elif "server" in table:
            eps = [parse_endpoint(e) for e in _strings(table["server"], "server")]
        else:
            eps = list(reg.endpoints)
        if not eps:
            raise RegistryError(
                f"no server configured: give --server, or set {BROKER_ENV}, [broker] server or [registry] endpoints"
            )
        folder = (
            tls_dir
            or os.environ.get(registry_settings.TLS_DIR_ENV)
            or (_strings(table["tls_dir"], "tls_dir")[0] if "tls_dir" in table else None)
            or reg.tls_dir
        )
        if not folder:
            raise RegistryError(
                f"no client certificate folder: set {registry_settings.TLS_DIR_ENV}, [broker] tls_dir"
                " or [registry] tls_dir"
            )
        pin_list = (
            list(pins or [])
            or [v.strip() for v in os.environ.get(registry_settings.PINS_ENV, "").split(",") if v.strip()]
            or (_strings(table["pins"], "pins") if "pins" in table else [])
            or list(reg.pins)
        )
        return cls(Transport(eps, Path(folder), pin_list, timeout=timeout))

    def endpoint(self) -> Endpoint:
        return self.transport.endpoint()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON request; the answer's JSON object, or a typed error (module docstring)."""
        if method not in ("GET", "POST", "PUT", "DELETE"):
            raise GovernanceError(f"refusing the API method {_shown(method, 20)}")
        full = check_path(path)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        what = f"{method} {full[len(PREFIX) - 1 :].split('?', 1)[0]}"
        reply = self.transport.request(
            method, full, headers=headers, body=data, retry=method == "GET", limit=MAX_API_REPLY
        )
        return _answer(reply, what)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _answer(reply: Reply, what: str) -> dict[str, Any]:
    status = reply.status
    if 200 <= status < 300:
        try:
            doc = json.loads(reply.body) if reply.body.strip() else {}
        except ValueError:
            raise RegistryError(f"{what}: the server's answer is not JSON") from None
        if not isinstance(doc, dict):
            raise RegistryError(f"{what}: the server's answer is not a JSON object")
        approval = doc.get("approval")
        if status == 202 and approval is not None:
            aid = _shown(str(approval), 80)
            needs = doc.get("needs")
            k = f" by {needs} security officers" if isinstance(needs, int) and not isinstance(needs, bool) else ""
            raise ApprovalRequired(
                f"{what} was not run: it waits for approval{k} as request {aid} (see `modelseal approvals list`)"
            )
        return doc
    message = _message(reply)
    if status == 403:
        raise AccessDenied(f"{what} denied: {message or 'forbidden'}")
    if status == 429:
        after = (reply.header("Retry-After") or "").strip()
        wait = after if after.isdigit() and len(after) <= 6 else "1"
        raise AccessDenied(f"{what}: rate-limited, retry after {wait} s")
    if 400 <= status < 500:
        raise GovernanceError(f"{what}: {status} {message or 'refused'}")
    raise RegistryError(f"{what}: the server failed ({status}{': ' + message if message else ''})")


__all__ = ["BROKER_ENV", "PREFIX", "ApiClient", "check_path"]
