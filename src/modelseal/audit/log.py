"""The tamper-evident audit log: an RFC 9162 Merkle tree with signed tree heads (SQLite or PostgreSQL).

Every event (canonical JSON: actor, operation, key URI and version, artifact id,
result, time; never a secret) is a leaf ``SHA-256(0x00 || event)``. Each row also
stores the tree head after it and an Ed25519 signature over ``(seq, head)`` by the
audit key, a key kept apart from every data key (``$MODELSEAL_HOME/audit-signing.key``,
0600). ``verify`` recomputes every head from the events and names the first entry
whose head or signature does not match: an edited, deleted, inserted or reordered
row. Someone holding the audit key could rewrite the whole log, so signed
checkpoints are also exported to a witness folder kept elsewhere (another mount,
WORM storage, another team); ``verify`` against it detects a rollback or a
rewrite of anything the checkpoint covers (a consistency check of the heads).
SQLite triggers refuse UPDATE and DELETE as a guard against mistakes, not as
the security boundary.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelseal.audit import merkle
from modelseal.audit.events import AuditEvent
from modelseal.audit.store import Row, SqliteStore, open_store
from modelseal.errors import ModelsealError
from modelseal.util.files import write_atomic
from modelseal.util.home import modelseal_home

_SIG_LABEL = b"modelseal/audit/v1\x00"


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


def _signed_message(seq: int, head: bytes) -> bytes:
    return _SIG_LABEL + struct.pack(">Q", seq) + head


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            write_atomic(path, pem, mode=0o600, exclusive=True)
        except FileExistsError:
            return load_or_create_signing_key(path)  # another process made it first
        return key
    loaded = serialization.load_pem_private_key(raw, password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise AuditLogError(f"{path} is not an Ed25519 key")
    return loaded


def public_key_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


class MerkleAuditLog:
    """An ``AuditSink`` that appends to the tamper-evident log."""

    def __init__(self, target: Path | str, key_path: Path | None = None, now: Callable[[], float] = time.time) -> None:
        self.store = open_store(target)
        local = isinstance(self.store, SqliteStore)
        self._key_path = key_path or (
            Path(target).with_name("audit-signing.key") if local else modelseal_home() / "audit-signing.key"
        )
        # What this host last appended: a shorter or different log is a rollback.
        self._state_path = self._key_path.with_name(self._key_path.name + ".state")
        self._now = now
        self._lock = threading.Lock()
        self._frontier: merkle.Frontier | None = None
        self._key: Ed25519PrivateKey | None = None

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            self._key = load_or_create_signing_key(self._key_path)
        return self._key

    def emit(self, event: AuditEvent) -> None:
        if not event.time:
            event = AuditEvent(**{**asdict(event), "time": self._now()})
        body = event.to_json()
        with self._lock:
            try:
                with self.store.transaction() as tx:
                    size = tx.size()
                    last = self._last_written()
                    if last is not None and (size < last[0] or tx.head_at(last[0]) != last[1]):
                        raise AuditLogError(
                            "the audit log is shorter than, or differs from, what this host last wrote "
                            "(truncated or rewritten); run modelseal audit verify"
                        )
                    frontier = self._frontier if self._frontier is not None and self._frontier.size == size else None
                    if frontier is None:
                        frontier = merkle.Frontier()
                        for old in tx.leaves():
                            frontier.append(old)
                    leaf = merkle.leaf_hash(body.encode())
                    head = frontier.append(leaf)
                    sig = self.signing_key.sign(_signed_message(size + 1, head))
                    tx.insert((size + 1, body, leaf, head, sig), public_key_hex(self.signing_key.public_key()))
                self._frontier = frontier
                state = json.dumps({"size": size + 1, "head": head.hex()}).encode()
                write_atomic(self._state_path, state, mode=0o600)
            except BaseException:
                self._frontier = None
                raise

    def _last_written(self) -> tuple[int, bytes] | None:
        try:
            doc = json.loads(self._state_path.read_text())
            return int(doc["size"]), bytes.fromhex(doc["head"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            raise AuditLogError(f"the audit state file {self._state_path} is damaged") from None

    def pinned_key(self) -> Ed25519PublicKey | None:
        """The audit key this host signs with (from the key file, not from the log)."""
        if not self._key_path.exists():
            return None
        return self.signing_key.public_key()

    def _rows(self) -> list[Row]:
        return self.store.rows()

    def _public_key(self) -> Ed25519PublicKey | None:
        hexkey = self.store.public_key()
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hexkey)) if hexkey else None

    # -- verification ----------------------------------------------------
    def verify(self, public_key: Ed25519PublicKey | None = None) -> Verification:
        """Recompute every leaf and tree head; name the first entry that does not match.

        Signatures are checked with ``public_key``, else the key this host signs with;
        the key the log itself names is used only when neither exists, and must agree.
        """
        stored = self._public_key()
        key = public_key or self.pinned_key() or stored
        if stored is not None and key is not None and public_key_hex(stored) != public_key_hex(key):
            return Verification(0, b"", 1, "the log names another audit key than the pinned one (re-signed?)")
        last = self._last_written()
        frontier = merkle.Frontier()
        expected = 1
        rows = self._rows()  # one read: the state check below uses the same rows
        for seq, body, _leaf, head, sig in rows:
            if seq != expected:
                return Verification(frontier.size, frontier.root(), expected, f"entry {expected} is missing")
            recomputed = frontier.append(merkle.leaf_hash(body.encode()))
            if recomputed != head:
                return Verification(frontier.size, recomputed, seq, f"entry {seq} was changed, moved or inserted")
            try:
                if key is None:
                    raise InvalidSignature
                key.verify(sig, _signed_message(seq, head))
            except InvalidSignature:
                return Verification(frontier.size, recomputed, seq, f"entry {seq} has no valid signature")
            expected += 1
        if last is not None and public_key is None:
            heads = {seq: head for seq, _b, _l, head, _s in rows}
            if frontier.size < last[0] or heads.get(last[0]) != last[1]:
                return Verification(
                    frontier.size, frontier.root(), None, f"the log was rolled back: this host wrote {last[0]} entries"
                )
        return Verification(frontier.size, frontier.root())

    def leaves(self) -> list[bytes]:
        return [merkle.leaf_hash(body.encode()) for _, body, _, _, _ in self._rows()]

    def prove(self, n: int) -> dict[str, Any]:
        """An inclusion proof of entry ``n`` (1-based) in the current tree."""
        rows = self._rows()
        if not 1 <= n <= len(rows):
            raise AuditLogError(f"there is no entry {n} (the log has {len(rows)})")
        leaves = [merkle.leaf_hash(body.encode()) for _, body, _, _, _ in rows]
        return {
            "entry": n,
            "event": json.loads(rows[n - 1][1]),
            "leaf_hash": leaves[n - 1].hex(),
            "tree_size": len(rows),
            "tree_head": rows[-1][3].hex(),
            "tree_head_signature": rows[-1][4].hex(),
            "inclusion_proof": [h.hex() for h in merkle.inclusion_proof(n - 1, leaves)],
        }

    def checkpoint(self, witness: Path) -> dict[str, Any]:
        """Export the latest signed tree head to a witness folder (kept elsewhere)."""
        v = self.verify()
        if not v.ok:
            raise AuditLogError(f"the audit log does not verify: {v.reason}")
        rows = self._rows()
        key = self._public_key()
        row = (rows[-1][0], rows[-1][3], rows[-1][4]) if rows else None
        if row is None or key is None:
            raise AuditLogError("the audit log is empty: nothing to checkpoint")
        cp = {
            "size": int(row[0]),
            "head": bytes(row[1]).hex(),
            "signature": bytes(row[2]).hex(),
            "public_key": public_key_hex(key),
            "time": self._now(),
        }
        witness.mkdir(parents=True, exist_ok=True)
        try:  # chain each checkpoint to the previous one exported to this witness
            cp["previous"] = hashlib.sha256((witness / "latest.json").read_bytes()).hexdigest()
        except FileNotFoundError:
            cp["previous"] = None
        data = json.dumps(cp, sort_keys=True, indent=1).encode() + b"\n"
        write_atomic(witness / f"checkpoint-{cp['size']:012d}.json", data, mode=0o644)
        write_atomic(witness / "latest.json", data, mode=0o644)
        return cp

    def verify_against(self, checkpoint: dict[str, Any]) -> Verification:
        """Verify the log, then that it still contains, unchanged, what ``checkpoint`` signed."""
        try:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(checkpoint["public_key"]))
            size, head = int(checkpoint["size"]), bytes.fromhex(checkpoint["head"])
            key.verify(bytes.fromhex(checkpoint["signature"]), _signed_message(size, head))
        except (KeyError, ValueError, TypeError, InvalidSignature):
            return Verification(0, b"", None, "the checkpoint itself is invalid or not signed by the audit key")
        v = self.verify(public_key=key)
        if not v.ok:
            return v
        if v.size < size:
            return Verification(
                v.size, v.head, v.size + 1, f"the log was rolled back: it has {v.size} entries, the checkpoint {size}"
            )
        leaves = self.leaves()
        if merkle.root(leaves[:size]) != head:
            return Verification(v.size, v.head, None, f"the first {size} entries differ from the signed checkpoint")
        if v.size > size:
            proof = merkle.consistency_proof(size, leaves)
            if not merkle.verify_consistency(size, v.size, proof, head, v.head):
                return Verification(v.size, v.head, None, "the log is not an extension of the checkpoint")
        return v

    def events(self, key: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
        out = []
        for seq, body, *_ in self._rows():
            e = json.loads(body)
            if key is not None and e.get("key") != key:
                continue
            if since is not None and float(e.get("time", 0)) < since:
                continue
            out.append({"entry": seq, **e})
        return out
