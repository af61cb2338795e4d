"""An environment's share of the keystore, for an environment-scoped backup (docs/recovery.md).

``export_subset`` returns the bytes of a keystore file (docs/format.md, section 9) whose key
table holds only the named keys, under the SAME root key and the same passphrase wrap (the
``format``, ``kdf`` and ``root`` members are copied unchanged), so the passphrase and the
``recovery split`` shares of the host's keystore open it, and nothing else does. The body is
encrypted afresh (new nonce) under that root key; versions whose destruction is overdue
are erased first, as every save does. The bytes stay in memory: the caller seals them.

Which keys belong to an environment is ``environment_keys``': the ``local:`` keys that
config.toml lists under ``[environments.ENV] keys`` or a project's ``ENV`` list. A key listed
under no environment is bound to none and is left out of every environment's export.
Owns no file format of its own and changes nothing on disk.
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


__all__ = ["BODY_AAD", "environment_keys", "export_subset"]
