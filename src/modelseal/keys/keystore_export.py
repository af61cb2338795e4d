"""An environment's share of the keystore, for an environment-scoped backup (docs/recovery.md).

``export_subset`` returns the bytes of a keystore file (docs/format.md, section 9) whose key
table holds only the named keys, under the SAME root key and the same passphrase wrap (the
``format``, ``kdf`` and ``root`` members are copied unchanged), so the passphrase and the
``recovery split`` shares of the host's keystore open it, and nothing else does. The body is
encrypted afresh (new nonce) under that root key; versions whose destruction is overdue
are erased first, as every save does. The bytes stay in memory: the caller seals them.

Which keys belong to an environment is ``environment_keys``': the ``local:`` keys that
config.toml lists under ``[environments.ENV] keys`` or a project's ``ENV`` list (the caller,
``recovery.parts``, adds the ``local:`` backings of that environment's broker keys, which the
keys layer cannot read). A key listed under no environment is bound to none and is left out of
every environment's export. Owns no file format of its own.

``merge_export`` is the inverse for an environment's restore: the exported keys go into the
live keystore under its write lock (``keystore.locked_update``), added, or replaced only when
asked; every other key of the live keystore is left as it is. ``merge_plan`` says what it
would write, reading only (a restore's precheck).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelseal.errors import BackupError
from modelseal.keys import keystore
from modelseal.keys.config import Config
from modelseal.keys.providers import parse_key_uri

# The key table's AAD (keystore.py's ``_BODY_AAD``; docs/format.md, section 9): a file this
# module writes must open with ``keystore.unlock``, which the tests check.
BODY_AAD = b"modelseal/keystore/v1/body"


def environment_keys(cfg: Config, env: str) -> set[str]:
    """The names of the ``local:`` keys config.toml binds to ``env`` (directly or by project)."""
    listed = list(cfg.environments.get(env, []))
    listed += [k for per_env in cfg.projects.values() for k in per_env.get(env, [])]
    names = set()
    for uri in listed:
        ref = parse_key_uri(uri)
        if ref.scheme == "local":
            names.add(ref.name)
    return names


def export_subset(
    path: Path,
    names: set[str],
    passphrase: Callable[[], bytes] = keystore.read_passphrase,
    *,
    now: float | None = None,
) -> tuple[bytes, list[str]]:
    """The keystore at ``path`` holding only ``names`` (module docstring), and the names kept."""
    ks = keystore.unlock(path, passphrase)
    keys = {n: copy.deepcopy(e) for n, e in ks.keys.items() if n in names}
    keystore.purge_overdue(keys, time.time() if now is None else now)
    body = json.dumps({"keys": keys}, sort_keys=True, separators=(",", ":")).encode()
    nonce = os.urandom(12)
    sealed = AESGCM(ks.root_key).encrypt(nonce, body, BODY_AAD)
    doc = dict(ks.header)
    doc["body"] = {"nonce": base64.b64encode(nonce).decode(), "ct": base64.b64encode(sealed).decode()}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n", sorted(keys)


def _incoming(path: Path, data: bytes, passphrase: Callable[[], bytes]) -> tuple[dict[str, object], dict[str, object]]:
    """The live keystore's key table and the export's (``data`` opens with the live root key
    when it is the same, else with the passphrase: the one of the backup's time)."""
    # keystore's own parsing and unwrapping (no second copy of the format's checks).
    doc = keystore._parse_doc(data)
    live = keystore.unlock(path, passphrase)
    root = live.root_key if keystore._header_of(doc) == live.header else keystore._unwrap_root(doc, passphrase())
    return live.keys, keystore._open_body(doc, root)


def _changes(incoming: dict[str, object], have: dict[str, object]) -> tuple[dict[str, object], list[str]]:
    todo = {n: e for n, e in incoming.items() if have.get(n) != e}
    return todo, sorted(n for n in todo if n in have)


def merge_plan(
    path: Path, data: bytes, passphrase: Callable[[], bytes] = keystore.read_passphrase
) -> tuple[list[str], list[str]]:
    """What ``merge_export`` would do, read only: the keys it would write, and those of them
    that differ from a live key (which need ``replace``)."""
    live, incoming = _incoming(path, data, passphrase)
    todo, clash = _changes(incoming, live)
    return sorted(todo), clash


def merge_export(
    path: Path, data: bytes, *, replace: bool, passphrase: Callable[[], bytes] = keystore.read_passphrase
) -> dict[str, int]:
    """Put the keys of the exported keystore ``data`` into the keystore at ``path`` (module
    docstring). A key of the live keystore that differs from the export's needs ``replace``.
    Returns counts; nothing is written when nothing differs."""
    live, incoming = _incoming(path, data, passphrase)

    def changes(have: dict[str, object]) -> dict[str, object]:
        todo, clash = _changes(incoming, have)
        if clash and not replace:
            raise BackupError(f"key {clash[0]} of the keystore differs from the backup's: restore with replace")
        return todo

    if not changes(live):
        return {"keys": len(incoming), "written": 0}
    with keystore.locked_update(path, passphrase) as work:
        todo = changes(work.keys)  # again under the lock: what another process did meanwhile counts
        replaced = sum(n in work.keys for n in todo)
        for n, e in todo.items():
            work.keys[n] = copy.deepcopy(e)
    return {"keys": len(incoming), "written": len(todo), "replaced": replaced}


__all__ = ["BODY_AAD", "environment_keys", "export_subset", "merge_export", "merge_plan"]
