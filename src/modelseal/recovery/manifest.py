"""A backup's signed manifest (docs/recovery.md, "Backups"): what the backup holds (each part's
file, digest, size and counts), whom its parts are sealed to, and its place in the chain
(``sequence``, and ``previous``, the SHA-256 of the previous backup's ``manifest.json``).

``manifest.json`` is canonical JSON (docs/format.md, section 2) of
``{"manifest": BODY, "signature": BASE64}``, the signature being Ed25519 by the host's backup
signing key (``$MODELSEAL_HOME/backup-signing.key``, a key of its own: never the audit key,
never inside any backup part) over ``DOMAIN || canonical_json(BODY)``. ``chain`` is a random id
fixed by the first backup of a destination and carried by every later one (signed), so a
chain is told apart from another host's or destination's. Pure data and checks: encoding,
parsing every field of untrusted bytes against its schema, and the signature under keys the
caller trusts (``trusted_signers``: keys given out of band, else this host's backup signing
key; never the key the manifest names by itself). Reading stores and the chain are
``recovery.chain``'s.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelseal.audit.log import public_key_hex
from modelseal.errors import BackupError, BackupTampered
from modelseal.format.file import canonical_json
from modelseal.recovery.parts import PART_NAMES
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited, write_atomic
from modelseal.util.home import check_private

FORMAT = "modelseal-backup-manifest/1"
DOMAIN = b"modelseal-backup-manifest/v1\n"
MANIFEST_NAME = "manifest.json"
SIGNING_KEY_NAME = "backup-signing.key"  # never the audit key, never in a backup part
MAX_MANIFEST = 1 << 20
MAX_PART = 1 << 40
ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")  # sorts by time; also a safe path segment
KINDS = ("files", "sql", "bao-snapshot")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHAIN = re.compile(r"[0-9a-f]{32}")
_ENV = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_KEY_URI = re.compile(r"[a-z][a-z0-9]{0,15}:[^\x00-\x1f\x7f]{1,512}")
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BODY_KEYS = {
    "chain",
    "created",
    "env",
    "format",
    "host",
    "id",
    "parts",
    "previous",
    "recipients",
    "recovery_keys",
    "sequence",
    "signer",
}
_PART_KEYS = {"file", "kind", "meta", "name", "sha256", "size"}


@dataclass(frozen=True)
class PartEntry:
    name: str  # one of recovery.parts.PART_NAMES
    kind: str  # "files" | "sql" | "bao-snapshot"
    file: str  # parts/<name>.mseal, relative to the backup
    sha256: str  # of the sealed file's bytes
    size: int  # the sealed file's length
    meta: dict[str, Any]  # counts, from the part's collector


@dataclass(frozen=True)
class Manifest:
    id: str
    sequence: int
    previous: str | None  # SHA-256 hex of the previous backup's manifest.json
    created: float
    env: str | None  # the scope: one environment, or None for everything
    host: str
    recipients: tuple[str, ...]  # the key URIs every part is sealed to
    parts: tuple[PartEntry, ...]
    signer: str  # Ed25519 public key hex
    raw: bytes  # the signed bytes: canonical JSON of the body (without DOMAIN)
    recovery_keys: tuple[tuple[str, str], ...] = ()  # (name, public key fingerprint hex)
    digest: str = ""  # SHA-256 hex of manifest.json as stored: what the next backup chains to
    signature: bytes = field(default=b"", repr=False)
    chain: str = ""  # the random id of this destination's chain (fixed at sequence 1)

    def part(self, name: str) -> PartEntry:
        for p in self.parts:
            if p.name == name:
                return p
        raise BackupError(f"backup {self.id} holds no part {name!r}")


def new_id(now: float) -> str:
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(4)}"


def part_file(name: str) -> str:
    return f"parts/{name}.mseal"


def new_chain_id() -> str:
    return secrets.token_hex(16)


def body_of(
    *,
    backup_id: str,
    sequence: int,
    previous: str | None,
    created: float,
    env: str | None,
    host: str,
    recipients: Sequence[str],
    recovery_keys: Mapping[str, str],
    parts: Sequence[PartEntry],
    signer: str,
    chain: str,
) -> dict[str, Any]:
    return {
        "chain": chain,
        "created": int(created),
        "env": env,
        "format": FORMAT,
        "host": host,
        "id": backup_id,
        "parts": [
            {"file": p.file, "kind": p.kind, "meta": p.meta, "name": p.name, "sha256": p.sha256, "size": p.size}
            for p in parts
        ],
        "previous": previous,
        "recipients": list(recipients),
        "recovery_keys": dict(recovery_keys),
        "sequence": sequence,
        "signer": signer,
    }


def sign(body: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """The bytes of ``manifest.json`` for ``body``, signed by ``key``."""
    signed = canonical_json(body)
    signature = key.sign(DOMAIN + signed)
    return canonical_json({"manifest": body, "signature": base64.b64encode(signature).decode()})


def _key_path(home: Path) -> Path:
    return home / SIGNING_KEY_NAME


def _read_key(path: Path) -> Ed25519PrivateKey | None:
    check_private(path, "the backup signing key", BackupError)
    try:
        raw = read_limited(path, 4096, BackupError, f"the backup signing key {path}", regular=True)
    except FileNotFoundError:
        return None
    if path.stat().st_mode & 0o077:
        raise BackupError(f"the backup signing key {path} is readable by others: chmod 600 it")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise BackupError(f"{path} is not an Ed25519 private key (PEM)")
    return key


def signing_key(home: Path) -> Ed25519PrivateKey:
    """This host's backup signing key (``$MODELSEAL_HOME/backup-signing.key``, mode 0600; made
    by the first backup). Only manifests are signed with it."""
    path = _key_path(home)
    key = _read_key(path)
    if key is not None:
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        write_atomic(path, pem, mode=0o600, exclusive=True)
    except FileExistsError:  # another backup made it first
        return signing_key(home)
    return key


def own_signer(home: Path) -> str | None:
    """The public key hex of this host's backup signing key, or None (none made yet)."""
    key = _read_key(_key_path(home))
    return None if key is None else public_key_hex(key.public_key())


def trusted_signers(home: Path, signer_keys: Sequence[str] = ()) -> dict[str, Ed25519PublicKey]:
    """Public key hex -> key of every signer whose manifests verify: the keys given (hex of
    the raw Ed25519 key, out of band), else this host's own backup signing key. Never the
    audit key or ``audit-hosts.toml``'s keys: a fleet member's audit key signs no backup."""
    if signer_keys:
        out: dict[str, Ed25519PublicKey] = {}
        for text in signer_keys:
            try:
                raw = bytes.fromhex(text)
                if len(raw) != 32:
                    raise ValueError
                out[raw.hex()] = Ed25519PublicKey.from_public_bytes(raw)
            except ValueError:
                raise BackupError("a signer key is the 64 hex digits of an Ed25519 public key") from None
        return out
    own = _read_key(_key_path(home))
    if own is None:
        return {}
    return {public_key_hex(own.public_key()): own.public_key()}


def _bad(backup_id: str, why: str) -> BackupTampered:
    return BackupTampered(f"the manifest of backup {backup_id} is malformed: {why}")


def _int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _parts(raw: Any, backup_id: str) -> tuple[PartEntry, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= len(PART_NAMES):
        raise _bad(backup_id, "parts")
    out: list[PartEntry] = []
    for p in raw:
        if not isinstance(p, dict) or set(p) != _PART_KEYS:
            raise _bad(backup_id, "a part entry")
        name = p["name"]
        if name not in PART_NAMES or any(e.name == name for e in out):
            raise _bad(backup_id, "a part name")
        if p["file"] != part_file(name) or p["kind"] not in KINDS:
            raise _bad(backup_id, f"the file or kind of part {name}")
        if not isinstance(p["sha256"], str) or not _HEX64.fullmatch(p["sha256"]) or not _int(p["size"], 1, MAX_PART):
            raise _bad(backup_id, f"the digest or size of part {name}")
        if not isinstance(p["meta"], dict):
            raise _bad(backup_id, f"the counts of part {name}")
        out.append(PartEntry(name, p["kind"], p["file"], p["sha256"], p["size"], p["meta"]))
    return tuple(out)


def _recipients(body: dict[str, Any], backup_id: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    recips, rkeys = body["recipients"], body["recovery_keys"]
    if not isinstance(recips, list) or not 2 <= len(recips) <= 16 or len(set(recips)) != len(recips):
        raise _bad(backup_id, "recipients")
    if not all(isinstance(r, str) and _KEY_URI.fullmatch(r) for r in recips):
        raise _bad(backup_id, "a recipient")
    if not isinstance(rkeys, dict) or not rkeys:
        raise _bad(backup_id, "recovery_keys")
    for name, fp in rkeys.items():
        if not _KEY_NAME.fullmatch(name) or not isinstance(fp, str) or not _HEX64.fullmatch(fp):
            raise _bad(backup_id, "a recovery key")
        if f"recovery:{name}" not in recips:
            raise _bad(backup_id, "a recovery key that is no recipient")
    return tuple(recips), tuple(sorted(rkeys.items()))


def parse(data: bytes, backup_id: str, digest: str) -> Manifest:
    """The manifest in ``data`` (``manifest.json`` of backup ``backup_id``), every field checked;
    its signature is not (``check_signature``). Any violation is ``BackupTampered``."""
    if len(data) > MAX_MANIFEST:
        raise _bad(backup_id, "too large")
    doc = json_loads(data, max_depth=8, max_values=20_000, error=lambda why: _bad(backup_id, why))
    if not isinstance(doc, dict) or set(doc) != {"manifest", "signature"} or not isinstance(doc["manifest"], dict):
        raise _bad(backup_id, "not a signed manifest")
    try:
        if canonical_json(doc) != data:
            raise _bad(backup_id, "not canonical JSON")
        signature = base64.b64decode(str(doc["signature"]), validate=True)
    except (ValueError, binascii.Error):
        raise _bad(backup_id, "not canonical JSON, or a bad signature encoding") from None
    body = doc["manifest"]
    if set(body) != _BODY_KEYS or body["format"] != FORMAT:
        raise _bad(backup_id, "unknown format or fields")
    if body["id"] != backup_id:
        raise BackupTampered(f"the manifest stored as backup {backup_id} names another backup: swapped")
    seq, prev = body["sequence"], body["previous"]
    if not _int(seq, 1, 2**53) or (prev is not None and not (isinstance(prev, str) and _HEX64.fullmatch(prev))):
        raise _bad(backup_id, "sequence or previous")
    if (seq == 1) != (prev is None):
        raise _bad(backup_id, "only the first backup of a chain has no previous")
    if not isinstance(body["chain"], str) or not _CHAIN.fullmatch(body["chain"]):
        raise _bad(backup_id, "chain")
    env, host, signer = body["env"], body["host"], body["signer"]
    if env is not None and not (isinstance(env, str) and _ENV.fullmatch(env)):
        raise _bad(backup_id, "env")
    if not isinstance(host, str) or not 1 <= len(host) <= 255 or not host.isprintable():
        raise _bad(backup_id, "host")
    if not isinstance(signer, str) or not _HEX64.fullmatch(signer) or not _int(body["created"], 0, 2**40):
        raise _bad(backup_id, "signer or created")
    recips, rkeys = _recipients(body, backup_id)
    return Manifest(
        id=backup_id,
        sequence=seq,
        previous=prev,
        created=float(body["created"]),
        env=env,
        host=host,
        recipients=recips,
        parts=_parts(body["parts"], backup_id),
        signer=signer,
        raw=canonical_json(body),
        recovery_keys=rkeys,
        digest=digest,
        signature=signature,
        chain=body["chain"],
    )


def check_signature(m: Manifest, trusted: Mapping[str, Ed25519PublicKey]) -> None:
    """The manifest's signature, under a key in ``trusted`` (the key it names must be one)."""
    if not trusted:
        raise BackupError(
            "no key to check backup signatures with: this host has no backup signing key; pass --signer-key HEX"
            " (the backing-up host's backup signing key, printed by its 'backup create', obtained out of band)"
        )
    key = trusted.get(m.signer)
    if key is None:
        raise BackupTampered(f"backup {m.id} is signed by a key this host does not trust ({m.signer[:16]}...)")
    try:
        key.verify(m.signature, DOMAIN + m.raw)
    except InvalidSignature:
        raise BackupTampered(f"the signature of backup {m.id}'s manifest does not verify") from None


__all__ = [
    "DOMAIN",
    "FORMAT",
    "ID",
    "MANIFEST_NAME",
    "Manifest",
    "PartEntry",
    "body_of",
    "check_signature",
    "new_chain_id",
    "new_id",
    "own_signer",
    "parse",
    "part_file",
    "sign",
    "signing_key",
    "trusted_signers",
]
