"""Policy change management: every proposed policy version kept by digest, and the active
one pinned by digest (tables ``gov_policy_versions`` and ``gov_policy_active`` on the
server's governance database, ``util.sqldb``).

``propose`` parses the text first (a policy that does not parse is never stored) and keeps
it with its proposer, time and note; proposing it again changes nothing. ``activate`` is
called only by the approval executor of ``policy.activate`` (``server.policy_api``), once
the two-person rule is met: it appends an activation row (who asked, who approved, when),
so the history of activations is kept too. ``active`` re-hashes the stored text against the
pinned digest on every load: a row edited behind the server's back is refused
(``GovernanceError``, "fails its pinned digest"), never replaced by the default, and the
server then denies every request until it is fixed. Until a first activation the active
set is the shipped ``default_policy()``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from modelseal.errors import GovernanceError
from modelseal.governance.cedar import PolicySet, default_policy
from modelseal.governance.exceptions import check_text
from modelseal.governance.store import dialect_of
from modelseal.util.sqldb import Q, SqlDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gov_policy_versions (
    digest TEXT PRIMARY KEY, body TEXT NOT NULL, proposer TEXT NOT NULL, proposed {REAL} NOT NULL,
    note TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS gov_policy_active (
    seq BIGINT PRIMARY KEY, digest TEXT NOT NULL, requested_by TEXT NOT NULL, approvals TEXT NOT NULL,
    activated {REAL} NOT NULL);
"""
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_NOTE = 400
DEFAULT = "default"  # what ``active_digest`` says before any activation


def check_digest(text: str) -> str:
    if not isinstance(text, str) or not DIGEST.fullmatch(text):
        raise GovernanceError("a policy version is named by sha256:<64 hex digits>")
    return text


def digest_of(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class PolicyVersion:
    digest: str
    proposer: str
    proposed: float
    note: str
    text: str = ""
    active: bool = False

    def to_json(self, with_text: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "digest": self.digest,
            "proposer": self.proposer,
            "proposed": self.proposed,
            "note": self.note,
            "active": self.active,
        }
        if with_text:
            out["text"] = self.text
        return out


@dataclass(frozen=True)
class Activation:
    seq: int
    digest: str
    requested_by: str
    approvals: tuple[str, ...]
    activated: float


def _tampered(digest: str) -> GovernanceError:
    return GovernanceError(f"the stored policy {digest} fails its pinned digest (tampered): refusing it")


class UnknownVersion(GovernanceError):
    """No policy version has this digest."""


class PolicyStore(SqlDatabase):
    """The policy versions of one server (see the module docstring)."""

    SCHEMA = _SCHEMA
    ERROR = GovernanceError
    LABEL = "the governance database"
    LOCK = 7369241

    def __init__(self, dialect: str, target: str) -> None:
        super().__init__(dialect, target)
        self._parsed: dict[str, PolicySet] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, target: str | Path) -> PolicyStore:
        """``postgresql://...`` or the path of a SQLite file (its folder is made 0700)."""
        return cls(*dialect_of(target))

    # -- versions ------------------------------------------------------------------------

    def propose(self, text: str, proposer: str, note: str = "", now: float | None = None) -> PolicyVersion:
        """Keep ``text`` as a version (parsed first: GovernanceError if it is not a valid
        policy set). Takes no effect: only ``activate`` does."""
        if note:
            check_text(note[:MAX_NOTE], "a proposal's note")
        ps = PolicySet.parse(text, "the proposed policy")
        t = time.time() if now is None else now

        def tx(q: Q) -> PolicyVersion:
            row = q("SELECT proposer, proposed, note FROM gov_policy_versions WHERE digest = ?", ps.digest).fetchone()
            if row is not None:
                return PolicyVersion(ps.digest, row[0], float(row[1]), row[2], text)
            q(
                "INSERT INTO gov_policy_versions (digest, body, proposer, proposed, note) VALUES (?, ?, ?, ?, ?)",
                ps.digest,
                text,
                proposer,
                t,
                note[:MAX_NOTE],
            )
            return PolicyVersion(ps.digest, proposer, t, note[:MAX_NOTE], text)

        return self.run(tx)

    def versions(self) -> list[PolicyVersion]:
        """Every version, oldest first, without its text."""
        active = self.active_digest()

        def read(q: Q) -> list[PolicyVersion]:
            rows = q("SELECT digest, proposer, proposed, note FROM gov_policy_versions ORDER BY proposed, digest")
            return [PolicyVersion(r[0], r[1], float(r[2]), r[3], active=r[0] == active) for r in rows.fetchall()]

        return self.run(read, write=False)

    def get(self, digest: str) -> PolicyVersion:
        """One version with its text, re-hashed (GovernanceError if unknown or tampered)."""
        v = self._load(digest)
        return PolicyVersion(v.digest, v.proposer, v.proposed, v.note, v.text, digest == self.active_digest())

    def _load(self, digest: str) -> PolicyVersion:
        check_digest(digest)
        row = self.run(
            lambda q: q(
                "SELECT body, proposer, proposed, note FROM gov_policy_versions WHERE digest = ?", digest
            ).fetchone(),
            write=False,
        )
        if row is None:
            raise UnknownVersion(f"no policy version {digest}")
        if not hmac.compare_digest(digest_of(row[0]), digest):
            raise _tampered(digest)
        return PolicyVersion(digest, row[1], float(row[2]), row[3], row[0])

    # -- the active version ----------------------------------------------------------------

    def activation(self) -> Activation | None:
        row = self.run(
            lambda q: q(
                "SELECT seq, digest, requested_by, approvals, activated FROM gov_policy_active"
                " ORDER BY seq DESC LIMIT 1"
            ).fetchone(),
            write=False,
        )
        if row is None:
            return None
        return Activation(int(row[0]), row[1], row[2], tuple(json.loads(row[3])), float(row[4]))

    def active_digest(self) -> str:
        a = self.activation()
        return DEFAULT if a is None else a.digest

    def active(self) -> PolicySet:
        """The policy set in force: the last activated version, re-hashed against its pin on
        every call (parsed once per digest); ``default_policy()`` before any activation."""
        a = self.activation()
        if a is None:
            return default_policy()
        try:
            text = self._load(a.digest).text
        except UnknownVersion:
            raise _tampered(a.digest) from None  # the pinned version is gone
        with self._lock:
            hit = self._parsed.get(a.digest)
        if hit is not None:
            return hit
        ps = PolicySet.parse(text, f"policy {a.digest}")
        with self._lock:
            self._parsed = {a.digest: ps}
        return ps

    def activate(
        self, digest: str, requested_by: str, approvals: Sequence[str], now: float | None = None
    ) -> Activation:
        """Pin ``digest`` as the active version. Only the approval executor calls this, once
        the two-person rule is met; the version must exist, hash to its digest and parse."""
        version = self._load(digest)
        PolicySet.parse(version.text, f"policy {digest}")
        t = time.time() if now is None else now
        approvers = json.dumps(sorted(set(approvals)))

        def tx(q: Q) -> Activation:
            (top,) = q("SELECT COALESCE(MAX(seq), 0) FROM gov_policy_active").fetchone()
            seq = int(top) + 1
            q(
                "INSERT INTO gov_policy_active (seq, digest, requested_by, approvals, activated)"
                " VALUES (?, ?, ?, ?, ?)",
                seq,
                digest,
                requested_by,
                approvers,
                t,
            )
            return Activation(seq, digest, requested_by, tuple(json.loads(approvers)), t)

        return self.run(tx)

    def activations(self) -> list[Activation]:
        rows = self.run(
            lambda q: q(
                "SELECT seq, digest, requested_by, approvals, activated FROM gov_policy_active ORDER BY seq"
            ).fetchall(),
            write=False,
        )
        return [Activation(int(r[0]), r[1], r[2], tuple(json.loads(r[3])), float(r[4])) for r in rows]


__all__ = ["DEFAULT", "Activation", "PolicyStore", "PolicyVersion", "UnknownVersion", "check_digest", "digest_of"]
