"""The tamper-evident audit log: an RFC 9162 Merkle tree with signed tree heads (SQLite or PostgreSQL).

Every event (canonical JSON: actor, operation, key URI and version, artifact id,
result, time, and ``signer``, the key id of the audit key that signs it; never a
secret) is a leaf ``SHA-256(0x00 || event)``. Each row also stores the tree head
after it and an Ed25519 signature over ``(seq, head)`` by the audit key of the host
that wrote it, a key kept apart from every data key
(``$MODELSEAL_HOME/audit-signing.key``, 0600). Several hosts may share one log: each
entry is checked against the key it names, which must be this host's own or one
configured in ``audit-hosts.toml`` (``audit.hosts``). ``verify`` recomputes every head
from the events and names the first entry whose head or signature does not match: an
edited, deleted, inserted or reordered row. Someone holding an audit key could
rewrite the whole log, so signed checkpoints are also exported to a witness folder
kept elsewhere (another mount, WORM storage, another team). Every verification runs
every check: the heads and signatures, the host's own record of what it last wrote to
this log (``audit.state``: a truncation or rollback), and, given a checkpoint, that the
log extends it. Every append checks the entries since this host's last write first.
Database triggers refuse UPDATE, DELETE and TRUNCATE as a guard against mistakes,
not as the security boundary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelseal.audit import merkle
from modelseal.audit.checks import (
    LATEST,
    AuditLogError,
    OnRows,
    Verification,
    check_after,
    check_rows,
    head_at,
    parse_checkpoint,
    read_checkpoint,
    read_checkpoint_bytes,
)
from modelseal.audit.checks import signed_message as _signed_message
from modelseal.audit.events import AuditEvent
from modelseal.audit.hosts import HOSTS_NAME, HostKey, key_id, load_hosts
from modelseal.audit.state import HostState, StateFiles
from modelseal.audit.store import AppendTx, Row, SqliteStore, open_store
from modelseal.util.bounded import json_loads
from modelseal.util.files import write_atomic
from modelseal.util.home import modelseal_home

__all__ = [
    "AuditLogError",
    "MerkleAuditLog",
    "Verification",
    "load_or_create_signing_key",
    "public_key_hex",
    "read_checkpoint",
]

_log = logging.getLogger("modelseal.audit")


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

    def __init__(
        self,
        target: Path | str,
        key_path: Path | None = None,
        now: Callable[[], float] = time.time,
        *,
        hosts: Mapping[str, HostKey] | None = None,
    ) -> None:
        """``hosts`` (key id -> host) replaces the configured ``audit-hosts.toml``."""
        self.store = open_store(target)
        local = isinstance(self.store, SqliteStore)
        self._key_path = key_path or (
            Path(target).with_name("audit-signing.key") if local else modelseal_home() / "audit-signing.key"
        )
        # What this host last appended to this log: a shorter or different log is a rollback.
        self._state = StateFiles(self._key_path, self.store.identity)
        self.hosts_path = self._key_path.with_name(HOSTS_NAME)  # the configured other hosts
        self._hosts = dict(hosts) if hosts is not None else None
        self._now = now
        self._lock = threading.Lock()
        self._key: Ed25519PrivateKey | None = None

    @property
    def _state_path(self) -> Path:
        """This host's record of its last write to this log."""
        return self._state.path

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            self._key = load_or_create_signing_key(self._key_path)
        return self._key

    def emit(self, event: AuditEvent) -> None:
        self.emit_many([event])

    def emit_many(self, events: Sequence[AuditEvent]) -> None:
        """Append ``events`` in order, in one transaction: all or none (one commit, one
        record of this host's last write; ``audit.batch`` groups concurrent emitters)."""
        if not events:
            return
        signer = key_id(self.signing_key.public_key())
        public = public_key_hex(self.signing_key.public_key())
        bodies = []
        for event in events:
            if not event.time:
                event = replace(event, time=self._now())
            bodies.append(json.dumps({**event.fields(), "signer": signer}, sort_keys=True, separators=(",", ":")))
        with self._lock:
            with self.store.transaction() as tx:
                frontier = self._checked_frontier(tx, strict=False)
                for body in bodies:
                    leaf = merkle.leaf_hash(body.encode())
                    head = frontier.append(leaf)
                    sig = self.signing_key.sign(_signed_message(frontier.size, head))
                    tx.insert((frontier.size, body, leaf, head, sig), public)
            self._state.save(frontier)

    def ready(self) -> None:
        """Raise ``AuditLogError`` if an event could not be appended now (a rollback, or
        entries this host does not trust after its last write): checked before a key
        change, so a change is not made that its event cannot record."""
        with self._lock, self.store.transaction() as tx:
            self._checked_frontier(tx)
            # Ordinary events may have been recorded on top of an entry this host does not
            # trust (so reads go on); a key change is made only on a log that verifies
            # whole. Key changes are rare: one full pass over the log each is the price.
            v, _, _ = check_rows(
                tx.rows_after(0), self.trusted_keys(), merkle.Frontier(), unknown_ok=len(self.trusted_keys()) <= 1
            )
            if not v.ok:
                raise AuditLogError(f"refusing a key change on an audit log that does not verify: {v.reason}")

    def _checked_frontier(self, tx: AppendTx, *, strict: bool = True) -> merkle.Frontier:
        """The frontier of the log as it is, after checking it: that it still holds what
        this host last wrote, and that every entry since verifies (heads and signatures),
        so this host never signs on top of a forged or rolled-back log. Only the entries
        since that write are read, except on a first write to a log (or with a record
        from before frontiers were kept), which checks the whole log once."""
        size = tx.size()
        last = self._state.last_written(tx.head_at)
        if last is not None and (size < last.size or tx.head_at(last.size) != last.head):
            hint = f" ({last.path.name}, from before records were kept per log)" if last.legacy else ""
            raise AuditLogError(
                f"the audit log is shorter than, or differs from, what this host last wrote{hint} "
                "(truncated or rewritten); run modelseal audit verify"
            )
        # With no other host configured, entries of unknown signers are left to verify (they
        # may be a peer's not yet listed); configured hosts make every entry's signature count.
        trusted = self.trusted_keys()
        unknown_ok = len(trusted) <= 1
        if last is not None and last.frontier is not None:
            frontier = last.frontier
            v, _, _ = check_rows(tx.rows_after(last.size), trusted, frontier, named=True, unknown_ok=unknown_ok)
        else:
            frontier = merkle.Frontier()
            v, _, _ = check_rows(tx.rows_after(0), trusted, frontier, unknown_ok=unknown_ok)
        if not v.ok:
            if strict:  # a key change (ready()) is refused on top of entries this host does not trust
                raise AuditLogError(f"refusing to append to an audit log that does not verify: {v.reason}")
            # An ordinary event (an unwrap) is still recorded, so one foreign or forged row
            # cannot stop decryption on every host sharing the log; the structure must hold,
            # and the row stays for `audit verify` to name.
            frontier = self._structural_frontier(tx)
            _log.warning("audit log %s: %s; recording this event anyway", self._state.path.name, v.reason)
        return frontier

    def _structural_frontier(self, tx: AppendTx) -> merkle.Frontier:
        """The frontier over every row, checking only that each head is the tree head after
        it (no signatures): enough to append consistently. A changed, moved or inserted
        row still refuses the append."""
        last = self._state.last_written(tx.head_at)
        frontier = last.frontier if last is not None and last.frontier is not None else merkle.Frontier()
        for seq, body, _leaf, head, _sig in tx.rows_after(frontier.size):
            if seq != frontier.size + 1 or frontier.append(merkle.leaf_hash(body.encode())) != head:
                raise AuditLogError(f"refusing to append to an audit log that does not verify: entry {seq} was changed")
        return frontier

    def _last_written(self, rows: list[Row]) -> HostState | None:
        heads = {row[0]: row[3] for row in rows}
        return self._state.last_written(heads.get)

    def pinned_key(self) -> Ed25519PublicKey | None:
        """The audit key this host signs with (from the key file, not from the log)."""
        if not self._key_path.exists():
            return None
        return self.signing_key.public_key()

    def trusted_keys(self) -> dict[str, Ed25519PublicKey]:
        """Key id -> key of every audit key whose entries verify here: this host's own
        and the configured hosts' (``audit-hosts.toml`` beside the audit key)."""
        hosts = self._hosts if self._hosts is not None else load_hosts(self.hosts_path)
        keys = {kid: h.key for kid, h in hosts.items()}
        own = self.pinned_key()
        if own is not None:
            keys[key_id(own)] = own
        return keys

    def _rows(self) -> list[Row]:
        return self.store.rows()

    def _stored_key(self) -> Ed25519PublicKey | None:
        """The key the log names (its first writer's): a hint, never trusted by itself."""
        hexkey = self.store.public_key()
        try:
            return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hexkey)) if hexkey else None
        except ValueError:
            raise AuditLogError("the audit log names a malformed audit key") from None

    # -- verification ----------------------------------------------------
    def verify(self, checkpoint: Mapping[str, Any] | None = None) -> Verification:
        """Run every check and name the first entry that fails.

        Each entry's signature is checked with the audit key it names (an entry written
        before entries named their signer: with any trusted key), which must be this
        host's own or a configured one; then that the log still holds, unchanged, what
        this host last wrote; then, given ``checkpoint``, that the log extends it. A
        host with no audit key and no configured hosts (an auditor's machine) trusts
        the checkpoint's key, else the key the log names.
        """
        return self._verify(checkpoint)[0]

    def verify_from(
        self, frontier: merkle.Frontier | None = None, batch: int = 4096, on_rows: OnRows | None = None
    ) -> tuple[Verification, merkle.Frontier]:
        """``verify`` without a checkpoint, of the entries after ``frontier`` (an earlier call's; None: all),
        ``batch`` rows at a time (``checks.check_after``): the verification and the frontier to go on from."""
        fetch, keys = self.store.rows_after, (self.trusted_keys(), self._stored_key())
        last = self._state.last_written(lambda seq: head_at(fetch, seq))
        written = None if last is None else (last.size, last.head)
        return check_after(fetch, *keys, frontier or merkle.Frontier(), batch, written, on_rows)

    def verify_against(self, checkpoint: Mapping[str, Any]) -> Verification:
        """``verify`` with a checkpoint (kept for callers of the earlier name)."""
        return self.verify(checkpoint)

    def _verify(self, checkpoint: Mapping[str, Any] | None) -> tuple[Verification, list[Row], Ed25519PublicKey | None]:
        """The verification, the rows it read, and the key that signed the last row if it verifies."""

        def bad(reason: str, first_bad: int | None = None, size: int = 0, head: bytes = b"") -> Verification:
            return Verification(size, head, first_bad, reason)

        trusted = self.trusted_keys()
        anchor: tuple[int, bytes] | None = None
        if checkpoint is not None:
            parsed = parse_checkpoint(checkpoint)
            if parsed is None:
                return bad("the checkpoint itself is invalid or not signed by the audit key"), [], None
            cp_key, anchor = parsed
            if trusted and key_id(cp_key) not in trusted:
                return bad("the checkpoint is signed by an audit key that is not configured"), [], None
            trusted = trusted or {key_id(cp_key): cp_key}
        stored = self._stored_key()
        if not trusted and stored is not None:
            trusted = {key_id(stored): stored}
        if stored is not None and key_id(stored) not in trusted:
            return bad("the log names another audit key than the configured ones (re-signed?)", 1), [], None
        recorded = self._state.last_written(lambda _seq: None)  # before the rows: a writer saves it after its commit
        rows = self._rows()  # one read: every check below uses the same rows
        v, leaves, last_key = check_rows(rows, trusted)
        if not v.ok:
            return v, rows, None
        last = recorded if recorded is not None else self._last_written(rows)
        if last is not None:
            heads = {row[0]: row[3] for row in rows}
            if v.size < last.size or heads.get(last.size) != last.head:
                why = f"the log was rolled back: this host wrote {last.size} entries"
                return bad(why, None, v.size, v.head), rows, None
        if anchor is not None:
            size, head = anchor
            if v.size < size:
                why = f"the log was rolled back: it has {v.size} entries, the checkpoint {size}"
                return bad(why, v.size + 1, v.size, v.head), rows, None
            if merkle.root(leaves[:size]) != head:
                return (
                    bad(f"the first {size} entries differ from the signed checkpoint", None, v.size, v.head),
                    rows,
                    None,
                )
            if v.size > size:
                proof = merkle.consistency_proof(size, leaves)
                if not merkle.verify_consistency(size, v.size, proof, head, v.head):
                    return bad("the log is not an extension of the checkpoint", None, v.size, v.head), rows, None
        return v, rows, last_key

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
            "event": _event_of(n, rows[n - 1][1]),
            "leaf_hash": leaves[n - 1].hex(),
            "tree_size": len(rows),
            "tree_head": rows[-1][3].hex(),
            "tree_head_signature": rows[-1][4].hex(),
            "inclusion_proof": [h.hex() for h in merkle.inclusion_proof(n - 1, leaves)],
        }

    def checkpoint(self, witness: Path) -> dict[str, Any]:
        """Export the latest signed tree head to a witness folder (kept elsewhere).

        The log must verify against the witness's latest checkpoint first: a witness
        never moves back to a shorter or different log.
        """
        found = read_checkpoint_bytes(witness, missing_ok=True)
        v, rows, key = self._verify(None if found is None else found[0])
        if not v.ok:
            raise AuditLogError(f"the audit log does not verify: {v.reason}")
        if not rows or key is None:
            raise AuditLogError("the audit log is empty: nothing to checkpoint")
        cp = {
            "size": v.size,
            "head": rows[-1][3].hex(),
            "signature": rows[-1][4].hex(),
            "public_key": public_key_hex(key),  # the key that signed this head: its writer's
            "time": self._now(),
        }
        witness.mkdir(parents=True, exist_ok=True)
        # Chained to the previous checkpoint: the bytes just verified against, not a re-read.
        cp["previous"] = None if found is None else hashlib.sha256(found[1]).hexdigest()
        data = json.dumps(cp, sort_keys=True, indent=1).encode() + b"\n"
        write_atomic(witness / f"checkpoint-{cp['size']:012d}.json", data, mode=0o644)
        write_atomic(witness / LATEST, data, mode=0o644)
        return cp

    def verified_events(
        self, key: str | None = None, since: float | None = None
    ) -> tuple[list[dict[str, Any]], Verification]:
        """The events of the entries that verify (all of them, or those before the first
        bad one), and the verification: rows anyone with write access to the database
        inserted are never presented as genuine."""
        v, rows, _ = self._verify(None)
        if v.first_bad is not None:
            rows = [r for r in rows if r[0] < v.first_bad]
        return self._select(rows, key, since), v

    def events(
        self, key: str | None = None, since: float | None = None, *, unverified: bool = False
    ) -> list[dict[str, Any]]:
        """The events, oldest first; ``AuditLogError`` naming the first bad entry if the log
        does not verify (``unverified`` lists every row as stored, forged or not)."""
        if unverified:
            return self._select(self._rows(), key, since)
        events, v = self.verified_events(key, since)
        if not v.ok:
            raise AuditLogError(f"the audit log does not verify: {v.reason}")
        return events

    @staticmethod
    def _select(rows: list[Row], key: str | None, since: float | None) -> list[dict[str, Any]]:
        out = []
        for seq, body, *_ in rows:
            e = _event_of(seq, body)
            if key is not None and e.get("key") != key:
                continue
            if since is not None and _time_of(e) < since:
                continue
            out.append({**e, "entry": seq})
        return out


def _event_of(seq: int, body: str) -> dict[str, Any]:
    """A row's event, parsed bounded (the row may come from anyone who can write the database)."""

    def unreadable(_why: str) -> AuditLogError:
        return AuditLogError(f"entry {seq} is not a readable audit event")

    doc = json_loads(body.encode(), max_depth=4, max_values=4096, error=unreadable)
    if not isinstance(doc, dict):
        raise unreadable("not an object")
    return doc


def _time_of(e: dict[str, Any]) -> float:
    try:
        return float(e.get("time", 0))
    except (TypeError, ValueError, OverflowError):
        return 0.0
