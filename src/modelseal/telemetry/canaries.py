"""Canary wrapped keys for the unwrap burst of ``modelseal controls test`` (docs/controls.md).

A reader cannot wrap, so the burst needs wrapped keys someone else made. ``make`` asks the
broker, as a *publisher* (``modelseal controls canaries --tls-dir PUBLISHER_DIR``), to wrap
``count`` fresh random data keys under one broker key, each with its own encryption context
``{"env": ENV, "artifact": "modelseal-controls-canary-NNNN"}`` (so each is a distinct
artifact's key); the data keys themselves are dropped at once and never written. The file
holds only what any sealed header shows (key name, version, wrapped bytes, context):
``$MODELSEAL_HOME/controls/canaries.json`` by default, written atomically. An unwrap of a
canary returns a key that protects nothing, so the burst costs no real key's secrecy.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

from modelseal.errors import GovernanceError, StorageError
from modelseal.registry.apiclient import ApiClient
from modelseal.util import bounded
from modelseal.util.files import write_atomic

FORMAT = "modelseal-controls-canaries/v1"
MAX_CANARIES = 5000
MAX_FILE = 8 << 20
FILE = ("controls", "canaries.json")


def default_path(home: Path) -> Path:
    return home.joinpath(*FILE)


def make(api: ApiClient, key: str, env: str, count: int) -> dict[str, Any]:
    """``count`` canary items wrapped by the broker under ``key`` for environment ``env``."""
    if not 1 <= count <= MAX_CANARIES:
        raise GovernanceError(f"the canary count is 1 to {MAX_CANARIES}")
    items = []
    for i in range(count):
        context = {"env": env, "artifact": f"modelseal-controls-canary-{i:04d}"}
        dek = os.urandom(32)
        doc = api.call("POST", "keys/wrap", {"key": key, "dek": base64.b64encode(dek).decode(), "context": context})
        del dek
        version, wrapped = doc.get("version"), doc.get("wrapped")
        if not isinstance(version, int) or not isinstance(wrapped, str):
            raise GovernanceError("the broker's answer to keys/wrap has no version and wrapped key")
        items.append({"key": key, "version": version, "wrapped": wrapped, "context": context})
    return {"format": FORMAT, "key": key, "env": env, "created": time.time(), "items": items}


def write(path: Path, doc: dict[str, Any]) -> None:
    """Write the canary file (0600, atomically; its folder 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n", mode=0o600)


def _bad(why: str) -> StorageError:
    return StorageError(f"the canary file is not usable: {why}")


def parse(data: bytes) -> list[dict[str, object]]:
    """The items of a canary file, each of the shape the broker takes; StorageError if not."""
    doc = bounded.json_loads(data, max_depth=5, max_values=20 * MAX_CANARIES + 64, error=_bad, what="canaries")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _bad(f"not a {FORMAT} file")
    items = doc.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_CANARIES:
        raise _bad(f"items must be a list of 1 to {MAX_CANARIES}")
    out: list[dict[str, object]] = []
    for it in items:
        ctx = it.get("context") if isinstance(it, dict) else None
        if (
            not isinstance(it, dict)
            or not isinstance(it.get("key"), str)
            or not isinstance(it.get("version"), int)
            or not isinstance(it.get("wrapped"), str)
            or not isinstance(ctx, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in ctx.items())
        ):
            raise _bad("an item is not {key, version, wrapped, context}")
        out.append({"key": it["key"], "version": it["version"], "wrapped": it["wrapped"], "context": dict(ctx)})
    if len({str(i["key"]) for i in out}) != 1:
        raise _bad("the items name more than one key")
    return out


def load(path: Path) -> list[dict[str, object]] | None:
    """The canaries at ``path``; None when there is no such file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_FILE:
        raise _bad(f"over {MAX_FILE} bytes")
    return parse(data)


__all__ = ["FORMAT", "MAX_CANARIES", "default_path", "load", "make", "parse", "write"]
