"""The audit log as evidence: its verification, a signed tree head, the events of the window,
and an RFC 9162 inclusion proof of every event the bundle cites (docs/evidence.md, "Audit").

The tree head is the one the log itself signed: the stored head after entry ``size`` and the
Ed25519 signature of that entry's writer over ``(size, head)`` (``audit.checks.signed_message``,
the shape of ``MerkleAuditLog.checkpoint``), so ``audit.checks.parse_checkpoint`` checks it
offline. Proofs are ``MerkleAuditLog.prove``'s, computed once over the leaves with the large
subtree roots kept (one pass for every proof instead of one per proof); ``check`` verifies them
with ``audit.merkle.verify_inclusion`` (the tree head under a trusted key) and knows nothing of
the log; ``check_citations`` holds the sections' entries to the proven events.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from modelseal.audit import merkle
from modelseal.audit.checks import parse_checkpoint, read_checkpoint, signed_message
from modelseal.audit.hosts import key_id
from modelseal.audit.log import MerkleAuditLog, public_key_hex
from modelseal.audit.store import Row
from modelseal.errors import EvidenceError, ModelsealError
from modelseal.evidence.controls import RECORD_ITEMS, qualifies
from modelseal.evidence.model import RECORD_KINDS, RECORDS_DIR, SAFE_NAME, event_entry, section_file
from modelseal.util.bounded import json_loads

# Items whose entries are audit events as cited (``model.event_entry``).
EVENT_ITEMS = (
    "keys.history",
    "certificates.events",
    "access.events",
    "changes.events",
    "recovery.events",
    "audit.security_events",
)
_KEEP = 32  # subtree roots of at least this many leaves are kept: about 2n/32 hashes in memory


class ProofTree:
    """Inclusion proofs over one list of leaf hashes (RFC 9162 2.1.3.1)."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.leaves = leaves
        self._kept: dict[tuple[int, int], bytes] = {}

    def root(self, lo: int = 0, hi: int | None = None) -> bytes:
        hi = len(self.leaves) if hi is None else hi
        n = hi - lo
        if n == 0:
            return merkle.EMPTY_ROOT
        if n == 1:
            return self.leaves[lo]
        hit = self._kept.get((lo, hi))
        if hit is not None:
            return hit
        k = 1 << ((n - 1).bit_length() - 1)
        node = merkle.node_hash(self.root(lo, lo + k), self.root(lo + k, hi))
        if n >= _KEEP:
            self._kept[(lo, hi)] = node
        return node

    def path(self, index: int, size: int) -> list[bytes]:
        """PATH(index, D[size]): ``merkle.inclusion_proof(index, leaves[:size])``."""
        if not 0 <= index < size <= len(self.leaves):
            raise ValueError("leaf index outside the tree")
        siblings, lo, hi = [], 0, size
        while hi - lo > 1:
            k = 1 << ((hi - lo - 1).bit_length() - 1)
            if index < lo + k:
                siblings.append(self.root(lo + k, hi))
                hi = lo + k
            else:
                siblings.append(self.root(lo, lo + k))
                lo += k
        return siblings[::-1]


def _unreadable(_why: str) -> ValueError:
    return ValueError("unreadable")


def parse_event(body: str) -> dict[str, Any] | None:
    """A stored event body, parsed bounded (a row may come from anyone who can write the database)."""
    try:
        doc = json_loads(body.encode(), max_depth=4, max_values=4096, error=_unreadable)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def event_time(e: Mapping[str, Any]) -> float | None:
    t = e.get("time")
    return float(t) if isinstance(t, int | float) and not isinstance(t, bool) else None


@dataclass
class AuditView:
    """What the export reads of the log: the verification, the rows up to the signed tree head
    the bundle proves against, and their parsed events (with ``entry``)."""

    verification: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    tree_head: dict[str, Any] | None = None
    tree: ProofTree | None = None

    def proofs(self, cited: set[int]) -> list[dict[str, Any]]:
        if self.tree is None or self.tree_head is None:
            return []
        size = int(self.tree_head["size"])
        out = []
        for n in sorted(e for e in cited if 1 <= e <= size):
            out.append(
                {
                    "entry": n,
                    "body": self.rows[n - 1][1],
                    "leaf_hash": self.tree.leaves[n - 1].hex(),
                    "inclusion_proof": [h.hex() for h in self.tree.path(n - 1, size)],
                }
            )
        return out


def _signed_head(rows: list[Row], size: int, keys: Mapping[str, Ed25519PublicKey]) -> dict[str, Any] | None:
    """The newest entry at or before ``size`` whose signature verifies under one of ``keys``."""
    for seq in range(size, max(0, size - 1000), -1):
        _, body, _, head, sig = rows[seq - 1]
        doc = parse_event(body) or {}
        named = doc.get("signer")
        candidates = [keys[named]] if isinstance(named, str) and named in keys else list(keys.values())
        for key in candidates:
            try:
                key.verify(sig, signed_message(seq, head))
            except InvalidSignature:
                continue
            return {
                "size": seq,
                "head": head.hex(),
                "signature": sig.hex(),
                "public_key": public_key_hex(key),
                "key_id": key_id(key),
            }
    return None


def load(target: str | Path, witness: Path | None = None, now: float | None = None) -> AuditView:
    """Verify the log (against the witness's checkpoint too, given one) and read it once."""
    checked = time.time() if now is None else now
    try:
        checkpoint = read_checkpoint(witness) if witness is not None else None
    except ModelsealError as e:
        raise EvidenceError(f"--witness: {str(e)[:300]}") from None
    if not str(target).startswith(("postgresql://", "postgres://")) and not Path(target).exists():
        return AuditView(
            {"ok": False, "entries": 0, "reason": "there is no audit log on this host", "checked": checked}
        )
    log = MerkleAuditLog(target)
    v = log.verify(checkpoint)
    verification: dict[str, Any] = {
        "ok": v.ok,
        "entries": v.size,
        "head": v.head.hex(),
        "reason": v.reason,
        "first_bad": v.first_bad,
        "checked": checked,
        "witness_checkpoint": None if checkpoint is None else checkpoint.get("size"),
    }
    rows = log.store.rows()
    good = v.size if v.first_bad is None else v.first_bad - 1
    rows = rows[: max(0, min(good, len(rows)))]
    leaves = [merkle.leaf_hash(body.encode()) for _, body, _, _, _ in rows]
    tree = ProofTree(leaves)
    if v.ok and rows and tree.root() != v.head:
        raise EvidenceError("the audit log changed while it was read for the evidence bundle: export again")
    keys = log.trusted_keys()
    stored = log.store.public_key()
    if not keys and stored:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(stored))
        keys = {key_id(key): key}
    head = _signed_head(rows, len(rows), keys) if rows else None
    if head is not None:
        rows = rows[: head["size"]]
        verification["proven_size"] = head["size"]
    events = []
    for seq, body, *_ in rows:
        doc = parse_event(body)
        if doc is not None:
            events.append({**doc, "entry": seq})
    return AuditView(verification, rows, events, head, tree)


# -- the verifier's side --------------------------------------------------------------------


def _malformed(p: object) -> str:
    n = p.get("entry") if isinstance(p, dict) else None
    return f"audit.json: a malformed inclusion proof (entry {str(n)[:20]})"


def check(
    doc: Mapping[str, Any], trusted: Mapping[str, Ed25519PublicKey] | None = None
) -> tuple[list[str], dict[int, dict[str, Any]]]:
    """Check audit.json's tree head (signed by one of ``trusted``, when given) and every
    inclusion proof, offline: the problems (one line each) and the proven events by entry."""
    problems: list[str] = []
    proven: dict[int, dict[str, Any]] = {}
    proofs = doc.get("proofs", [])
    th = doc.get("tree_head")
    if th is None:
        if proofs:
            problems.append("audit.json: inclusion proofs without a signed tree head")
        return problems, proven
    size_ok = isinstance(th, dict) and isinstance(th.get("size"), int) and 0 < th["size"] < 1 << 63
    parsed = parse_checkpoint(th) if isinstance(th, dict) and size_ok else None
    if parsed is None:
        problems.append("audit.json: the tree head's signature does not verify")
        return problems, proven
    key, (size, head) = parsed
    if isinstance(th, dict) and th.get("key_id") not in (None, key_id(key)):
        problems.append("audit.json: the tree head names another key id than its key")
    if trusted is not None and public_key_hex(key) not in {public_key_hex(k) for k in trusted.values()}:
        problems.append(f"audit.json: the tree head is signed by key {key_id(key)[:16]}, not an expected key")
        return problems, proven
    if not isinstance(proofs, list):
        return [*problems, "audit.json: proofs is not a list"], proven
    for p in proofs:
        try:
            n, body, hexes = p["entry"], p["body"], p["inclusion_proof"]
            if (
                not isinstance(n, int)
                or isinstance(n, bool)
                or not isinstance(body, str)
                or not isinstance(hexes, list)
            ):
                raise ValueError
            leaf = merkle.leaf_hash(body.encode())
            path = [bytes.fromhex(h) for h in hexes]
            if not isinstance(p["leaf_hash"], str) or bytes.fromhex(p["leaf_hash"]) != leaf:
                raise ValueError
        except (KeyError, TypeError, ValueError, AttributeError, UnicodeError):
            problems.append(_malformed(p))
            continue
        if not merkle.verify_inclusion(n - 1, size, leaf, path, head):
            problems.append(f"audit entry {n}: the inclusion proof does not verify against the signed tree head")
            continue
        event = parse_event(body)
        if event is None:
            problems.append(f"audit entry {n}: the proven event is not readable")
            continue
        proven[n] = {**event, "entry": n}
    return problems, proven


def _record(
    item: str, entry: Mapping[str, Any], event: Mapping[str, Any] | None, digests: Mapping[str, str], end: str
) -> list[str]:
    """The problems of one record entry: its path, its copy, its event."""
    kind = next(k for k, i in RECORD_KINDS.items() if i == item)
    path, file, sha = entry.get("path"), entry.get("file"), entry.get("sha256")
    name = str(path).rsplit("/", 1)[-1]
    if not isinstance(path, str) or path != f"evidence/{kind}/{name}" or not SAFE_NAME.fullmatch(name):
        return [f"{item}: a record entry names no record of its kind"]
    out = []
    if file is not None and file != f"{RECORDS_DIR}/{kind}/{name}":
        out.append(f"{item}: the record {name} is copied under another name")
    elif file is not None and digests.get(file) != sha:
        out.append(f"{item}: the record {name} is not in the bundle with its entry's digest")
    if event is not None:
        if event.get("key") != f"evidence:{path}":
            out.append(f"{item}: the record {name} cites an audit event of another file")
        if any(entry.get(k) != event.get(k) for k in ("operation", "result", "artifact", "time")):
            out.append(f"{item}: the record {name} differs from its proven audit event")
        if (file is not None or qualifies(item, entry, end)) and event.get("artifact") != sha:
            out.append(f"{item}: the record {name} is not the file its audit event's digest names")
    elif qualifies(item, entry, end):
        out.append(f"{item}: the record {name} counts as evidence without a proven audit event")
    return out


def check_citations(
    docs: Mapping[str, Mapping[str, Any]], proven: Mapping[int, Any], digests: Mapping[str, str]
) -> list[str]:
    """Every audit entry the section files (``docs``, their items type-checked) cite has a
    proof, and each event entry equals its proven event; every record entry matches its
    proven event and its copy (``digests``: the bundle's files that hash as listed), and
    every record copy is named by an entry."""
    problems: list[str] = []
    named: set[str] = set()
    for name, doc in docs.items():
        window = doc.get("window")
        end = str(window.get("to")) if isinstance(window, dict) else ""
        for item, entries in doc["items"].items():
            for entry in entries:
                n = entry.get("entry")
                if item in RECORD_ITEMS and isinstance(entry.get("file"), str):
                    named.add(entry["file"])
                if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n not in proven):
                    why = f"cites audit entry {str(n)[:20]}, which has no valid inclusion proof"
                    problems.append(f"{section_file(name)}: {item} {why}")
                    continue
                if item in EVENT_ITEMS and (n is None or event_entry(proven[n]) != entry):
                    problems.append(f"{section_file(name)}: {item} entry {n} differs from the proven audit event")
                elif item in RECORD_ITEMS:
                    problems.extend(_record(item, entry, None if n is None else proven[n], digests, end))
    for file in sorted(f for f in digests if f.startswith(RECORDS_DIR + "/") and f not in named):
        problems.append(f"{file}: a record copy no entry of recovery.json names")
    return problems


__all__ = ["AuditView", "ProofTree", "check", "check_citations", "event_time", "load", "parse_event"]
