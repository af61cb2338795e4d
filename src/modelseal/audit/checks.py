"""The checks of audit-log verification, as functions of the rows and the trusted keys.

Owns the signed message of a tree head, the checkpoint file a witness keeps, and the
row check: every head recomputed from the events, every signature checked with the
audit key the entry names. Reading the store, the host's own state and which keys
are trusted are ``audit.log``'s.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from modelseal.audit import merkle
from modelseal.audit.hosts import key_id
from modelseal.audit.store import Row
from modelseal.errors import ModelsealError
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited

_SIG_LABEL = b"modelseal/audit/v1\x00"
LATEST = "latest.json"  # the witness's newest checkpoint
MAX_CHECKPOINT = 64 * 1024
_KEY_ID = re.compile(r"[0-9a-f]{64}")


class AuditLogError(ModelsealError):
    """The audit log does not verify: tampered with, rolled back, or unreadable."""

    exit_code = 9


@dataclass(frozen=True)
class Verification:
    size: int
    head: bytes
    first_bad: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.first_bad is None and not self.reason


def signed_message(seq: int, head: bytes) -> bytes:
    return _SIG_LABEL + struct.pack(">Q", seq) + head


def read_checkpoint(witness: Path, missing_ok: bool = False) -> dict[str, Any] | None:
    """The witness folder's latest checkpoint (``None`` if there is none and ``missing_ok``)."""
    found = read_checkpoint_bytes(witness, missing_ok)
    return None if found is None else found[0]


def read_checkpoint_bytes(witness: Path, missing_ok: bool = False) -> tuple[dict[str, Any], bytes] | None:
    """The latest checkpoint and the very bytes it was parsed from (to chain the next one
    to what was verified, not to a file swapped in meanwhile)."""
    try:  # a FIFO never blocks; a file over the limit is refused
        raw = read_limited(
            witness / LATEST, MAX_CHECKPOINT, AuditLogError, f"the checkpoint in {witness}", regular=True
        )
    except FileNotFoundError:
        if missing_ok:
            return None
        raise AuditLogError(f"no readable checkpoint in {witness}") from None
    try:
        doc = _bounded(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise AuditLogError(f"no readable checkpoint in {witness}")
    return doc, raw


def parse_checkpoint(cp: Mapping[str, Any]) -> tuple[Ed25519PublicKey, tuple[int, bytes]] | None:
    """The checkpoint's key and (size, head), if it is well-formed and signed by that key."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(cp["public_key"]))
        size, head = cp["size"], bytes.fromhex(cp["head"])
        if not isinstance(size, int) or isinstance(size, bool) or size < 1 or len(head) != 32:
            return None
        key.verify(bytes.fromhex(cp["signature"]), signed_message(size, head))
    except (KeyError, ValueError, TypeError, InvalidSignature):
        return None
    return key, (size, head)


def _bounded(raw: bytes) -> Any:
    """Rows and checkpoints come from a shared database or a witness folder: bounded JSON
    (an event or a checkpoint is one flat object); a violation is a ``ValueError``."""

    def fail(why: str) -> ValueError:
        return ValueError(why)

    return json_loads(raw, max_depth=4, max_values=4096, error=fail)


def _signer_of(body: str) -> str | None:
    """The key id an entry names (``None``: written before entries named their signer;
    ``""``: a malformed claim, which no key matches)."""
    try:
        doc = _bounded(body.encode())
    except ValueError:
        return None
    if not isinstance(doc, dict) or "signer" not in doc:
        return None
    signer = doc["signer"]
    return signer if isinstance(signer, str) and _KEY_ID.fullmatch(signer) else ""


def _signed_by(key: Ed25519PublicKey, sig: bytes, seq: int, head: bytes) -> bool:
    try:
        key.verify(sig, signed_message(seq, head))
    except InvalidSignature:
        return False
    return True


def check_rows(
    rows: list[Row],
    trusted: Mapping[str, Ed25519PublicKey],
    frontier: merkle.Frontier | None = None,
    named: bool = False,
    *,
    unknown_ok: bool = False,
) -> tuple[Verification, list[bytes], Ed25519PublicKey | None]:
    """Recompute every head and check every signature; the leaves and the last entry's signer.

    Given the ``frontier`` of the entries before ``rows`` (checked earlier: this host's
    record of its last write), only ``rows`` are checked, and extend that frontier;
    ``named`` says an earlier entry named its signer. With ``unknown_ok`` an entry no
    trusted key can check (naming another key, or no key) passes unchecked; every other
    check still applies."""
    frontier = merkle.Frontier() if frontier is None else frontier
    leaves: list[bytes] = []
    # once an entry names its signer, every later one must
    last: Ed25519PublicKey | None = None
    for expected, (seq, body, _leaf, head, sig) in enumerate(rows, start=frontier.size + 1):
        if seq != expected:
            return Verification(frontier.size, frontier.root(), expected, f"entry {expected} is missing"), leaves, None
        leaves.append(merkle.leaf_hash(body.encode()))
        recomputed = frontier.append(leaves[-1])
        if recomputed != head:
            why = f"entry {seq} was changed, moved or inserted"
            return Verification(frontier.size, recomputed, seq, why), leaves, None
        signer = _signer_of(body)
        if signer is None and named:
            why = f"entry {seq} names no signer, after entries that do"
            return Verification(frontier.size, recomputed, seq, why), leaves, None
        named = named or signer is not None
        if unknown_ok and (signer == "" or (signer and signer not in trusted)):
            last = None
            continue
        if signer and signer not in trusted:
            why = f"entry {seq} is signed by audit key {signer[:16]}, which is not configured (audit-hosts.toml)"
            return Verification(frontier.size, recomputed, seq, why), leaves, None
        candidates = list(trusted.values()) if signer is None else [trusted[signer]] if signer else []
        last = next((k for k in candidates if _signed_by(k, sig, seq, head)), None)
        if last is None and not (unknown_ok and signer is None):
            return Verification(frontier.size, recomputed, seq, f"entry {seq} has no valid signature"), leaves, None
    return Verification(frontier.size, frontier.root()), leaves, last


Fetch = Callable[[int, int], list[Row]]  # (after entry, at most) -> rows: ``AuditStore.rows_after``
OnRows = Callable[[list[Row]], None]  # told each batch of rows that verified


def head_at(fetch: Fetch, seq: int) -> bytes | None:
    """The stored tree head after entry ``seq`` (None if there is no such entry)."""
    rows = fetch(seq - 1, 1) if seq > 0 else []
    return rows[0][3] if rows and rows[0][0] == seq else None


def check_after(
    fetch: Fetch,
    trusted: Mapping[str, Ed25519PublicKey],
    stored: Ed25519PublicKey | None,
    frontier: merkle.Frontier,
    batch: int = 4096,
    written: tuple[int, bytes] | None = None,
    on_rows: OnRows | None = None,
) -> tuple[Verification, merkle.Frontier]:
    """``check_rows`` over the entries after ``frontier`` (those verified before; an empty
    one: every entry), ``batch`` rows at a time, never the whole log in memory.

    The keys are chosen as ``MerkleAuditLog.verify`` chooses them without a checkpoint
    (``stored``: the key the log names). The log must still hold the verified entries: the
    head stored after entry ``frontier.size`` is the frontier's root (not truncated, nor
    rewritten up to there with new heads); every later head is recomputed on from the
    frontier (a consistency with what was verified) and every signature checked. Then, given
    ``written`` (this host's last write: size, head), the log must hold it. ``on_rows`` gets
    each batch that verified. Returns the verification and the frontier after the last entry
    (``frontier`` itself when a check fails)."""
    trusted = dict(trusted) or ({key_id(stored): stored} if stored is not None else {})
    if stored is not None and key_id(stored) not in trusted:
        why = "the log names another audit key than the configured ones (re-signed?)"
        return Verification(0, b"", 1, why), frontier
    f = merkle.Frontier.restore(frontier.size, frontier.hashes())
    named = False
    if f.size:
        prev = fetch(f.size - 1, 1)
        if not prev or prev[0][0] != f.size or prev[0][3] != f.root():
            why = f"the log no longer holds the {f.size} entries verified before (truncated or rewritten)"
            return Verification(f.size, f.root(), None, why), frontier
        named = _signer_of(prev[0][1]) is not None
    while rows := fetch(f.size, batch):
        v, _, _ = check_rows(rows, trusted, f, named)
        if not v.ok:
            return v, frontier
        named = named or _signer_of(rows[-1][1]) is not None  # once one names its signer, all later do
        if on_rows is not None:
            on_rows(rows)
    if written is not None and (f.size < written[0] or head_at(fetch, written[0]) != written[1]):
        why = f"the log was rolled back: this host wrote {written[0]} entries"
        return Verification(f.size, f.root(), None, why), frontier
    return Verification(f.size, f.root()), f
