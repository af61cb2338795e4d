"""Holds: the responses a detector (or a security officer) puts in place pending review
(docs/access.md, "Holds"), stored. What a hold is, its subjects and events:
``governance.holdmodel``; the decider's cached view: ``governance.holdindex`` (both
re-exported here).

A hold names one subject of one kind in one environment: an ``identity`` is denied every
action; a ``source`` (an address or a network) every request from inside it; a ``key`` its
``key.unwrap`` and ``key.rewrap`` under any catalog name of the same backing key (wraps go
on: new data stays sealed). Only the servers of the hold's environment enforce it, and only
that environment's officers see and release it.

Table ``gov_holds`` on the governance database (``util.sqldb``, SQLite and PostgreSQL), and
a generation token (``gov_holds_generation``) that every place and release sets to a new
random value in its own transaction. ``place`` is idempotent (an active hold of the same
environment, kind and subject is returned and its ``detections`` counted, never duplicated;
a partial unique index backs this up); at most ``MAX_ACTIVE`` holds are active per
environment. ``release`` ends an active hold only, keeps who released it and why, and,
given the ``seen`` count its caller reviewed, loses to a detection that arrived since.
Holds never expire: only a release ends one. Nothing is deleted.

No HTTP, no authorization here.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from pathlib import Path
from typing import Any

from modelseal.errors import GovernanceError
from modelseal.governance.holdindex import (
    CACHE_SECONDS,
    KEY_HELD_ACTIONS,
    STALE_SECONDS,
    HoldIndex,
    HoldView,
    backing_resolver,
    check,
)
from modelseal.governance.holdmodel import (
    HOLD_KINDS,
    MAX_ACTOR,
    MAX_REASON,
    Hold,
    HoldChanged,
    HoldReleased,
    HoldsUnreadable,
    TooManyHolds,
    UnknownHold,
    check_hold_id,
    check_line,
    check_source,
    check_subject,
    deny_reason,
    held_identities,
    hold_env,
    place_event,
    release_event,
    source_form,
)
from modelseal.governance.store import dialect_of, shown
from modelseal.util.sqldb import Q, SqlDatabase

MAX_ACTIVE = 10_000  # active holds per environment
MAX_PAGE = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gov_holds (
    id TEXT PRIMARY KEY, env TEXT NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL,
    reason TEXT NOT NULL, placed_by TEXT NOT NULL, placed_at {REAL} NOT NULL, backing TEXT,
    detections INTEGER NOT NULL, last_seen {REAL}, released_by TEXT, released_at {REAL},
    release_reason TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS gov_holds_live ON gov_holds (env, kind, subject) WHERE released_at IS NULL;
CREATE INDEX IF NOT EXISTS gov_holds_order ON gov_holds (env, placed_at, id);
CREATE TABLE IF NOT EXISTS gov_holds_generation (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
"""
_SELECT = (
    "SELECT id, kind, subject, reason, placed_by, placed_at, released_by, released_at, release_reason,"
    " env, backing, detections, last_seen FROM gov_holds"
)

_COUNT = "SELECT kind, COUNT(*) FROM gov_holds"


def _row(r: Any) -> Hold:
    try:
        h = Hold(
            str(r[0]),
            str(r[1]),
            str(r[2]),
            str(r[3]),
            str(r[4]),
            float(r[5]),
            None if r[6] is None else str(r[6]),
            None if r[7] is None else float(r[7]),
            None if r[8] is None else str(r[8]),
            str(r[9]),
            None if r[10] is None else str(r[10]),
            int(r[11]),
            None if r[12] is None else float(r[12]),
        )
    except (ValueError, TypeError, IndexError):
        h = None
    if h is None or h.kind not in HOLD_KINDS or not math.isfinite(h.placed_at):
        raise HoldsUnreadable(f"a hold row is malformed: {shown(str(r[0]), 40)}")
    return h


def _where(env: str | None, active: bool) -> tuple[str, tuple[Any, ...]]:
    parts = ([] if env is None else ["env = ?"]) + (["released_at IS NULL"] if active else [])
    return (" WHERE " + " AND ".join(parts)) if parts else "", () if env is None else (env,)


class HoldStore(SqlDatabase):
    """The holds of one server's governance database (see the module docstring)."""

    SCHEMA = _SCHEMA
    ERROR = GovernanceError
    LABEL = "the governance database"
    LOCK = 7369244

    @classmethod
    def open(cls, target: str | Path) -> HoldStore:
        """On the same target as ``store.GovStore.open``."""
        return cls(*dialect_of(target))

    @staticmethod
    def _bump(q: Q) -> None:
        token = secrets.randbits(62) + 1  # never a value a worker cached: a lost or restored row cannot fool it
        if q("UPDATE gov_holds_generation SET value = ? WHERE name = 'holds'", token).rowcount == 0:
            q("INSERT INTO gov_holds_generation (name, value) VALUES ('holds', ?)", token)

    def place_once(
        self,
        kind: str,
        subject: str,
        reason: str,
        by: str,
        now: float | None = None,
        *,
        env: str | None = None,
        backing: str | None = None,
    ) -> tuple[Hold, bool]:
        """``place``, and whether this call made the hold (False: it was active already, and
        this detection is counted on it)."""
        check_subject(kind, subject)
        where = hold_env(kind, subject, env)
        check_line(reason, "a hold's reason")
        check_line(by, "who holds", MAX_ACTOR)
        if backing is not None:
            check_line(backing, "a held key's backing key", MAX_ACTOR)
        t = time.time() if now is None else now

        def tx(q: Q) -> tuple[Hold, bool]:
            sql = _SELECT + " WHERE env = ? AND kind = ? AND subject = ? AND released_at IS NULL"
            r = q(sql, where, kind, subject).fetchone()
            if r is not None:  # held already: count the detection (a racing release then conflicts)
                h = _row(r)
                q("UPDATE gov_holds SET detections = detections + 1, last_seen = ? WHERE id = ?", t, h.id)
                return dataclasses.replace(h, detections=h.detections + 1, last_seen=t), False
            n = q("SELECT COUNT(*) FROM gov_holds WHERE env = ? AND released_at IS NULL", where).fetchone()[0]
            if int(n) >= MAX_ACTIVE:
                raise TooManyHolds(
                    f"{where} has {MAX_ACTIVE} active holds, the most there may be: release some, or hold a network"
                )
            h = Hold(secrets.token_hex(8), kind, subject, reason, by, t, env=where, backing=backing, last_seen=t)
            q(
                "INSERT INTO gov_holds (id, env, kind, subject, reason, placed_by, placed_at, backing, detections,"
                " last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
                *(h.id, h.env, h.kind, h.subject, h.reason, h.placed_by, h.placed_at, h.backing, t),
            )
            self._bump(q)
            return h, True

        return self.run(tx)

    def place(self, kind: str, subject: str, reason: str, by: str, now: float | None = None, **kw: Any) -> Hold:
        """Hold ``subject`` of ``kind`` (``env=``: the environment, an identity's own by
        default; ``backing=``: a key's canonical backing key); GovernanceError if anything is
        invalid; an active hold of the same environment, kind and subject is returned."""
        return self.place_once(kind, subject, reason, by, now, **kw)[0]

    def release(
        self,
        hold_id: str,
        by: str,
        reason: str,
        now: float | None = None,
        *,
        env: str | None = None,
        seen: int | None = None,
    ) -> Hold:
        """End active hold ``hold_id``, by ``by`` for ``reason``: ``UnknownHold`` if there is
        none (in ``env``, when given), ``HoldReleased`` if it was released already,
        ``HoldChanged`` if it counts other ``detections`` than ``seen`` (when given)."""
        check_hold_id(hold_id)
        check_line(reason, "a release's reason")
        check_line(by, "who releases", MAX_ACTOR)
        t = time.time() if now is None else now

        def tx(q: Q) -> Hold:
            r = q(_SELECT + " WHERE id = ?", hold_id).fetchone()
            h = None if r is None else _row(r)
            if h is None or (env is not None and h.env != env):
                raise UnknownHold(f"no hold {hold_id}")
            if not h.active:
                raise HoldReleased(f"hold {hold_id} was released already, by {h.released_by}")
            if seen is not None and h.detections != seen:
                raise HoldChanged(f"hold {hold_id} was detected again since it was read ({h.detections}): review it")
            sql = "UPDATE gov_holds SET released_by = ?, released_at = ?, release_reason = ? WHERE id = ?"
            q(sql, by, t, reason, hold_id)
            self._bump(q)
            return dataclasses.replace(h, released_by=by, released_at=t, release_reason=reason)

        return self.run(tx)

    def active(self, now: float | None = None, *, env: str | None = None) -> list[Hold]:
        """The holds in force (of ``env``; every environment's without), oldest first."""
        del now  # accepted for symmetry: holds never expire
        where, args = _where(env, True)
        rows = self.run(lambda q: q(_SELECT + where + " ORDER BY placed_at, id", *args).fetchall(), False)
        return [_row(r) for r in rows]

    def all(self, *, env: str | None = None) -> list[Hold]:
        """Every hold (of ``env``), released ones too, oldest first (unbounded: use ``page``)."""
        where, args = _where(env, False)
        rows = self.run(lambda q: q(_SELECT + where + " ORDER BY placed_at, id", *args).fetchall(), False)
        return [_row(r) for r in rows]

    def page(
        self, env: str, *, released: bool = False, limit: int = MAX_PAGE, after: str | None = None
    ) -> tuple[list[Hold], str | None]:
        """At most ``limit`` holds of ``env`` (active ones, or all with ``released``), oldest
        first, after the hold ``after``; and the id to pass as ``after`` for more (None: done)."""
        if not 1 <= limit <= MAX_PAGE:
            raise GovernanceError(f"a page holds 1 to {MAX_PAGE} holds")
        where, args = _where(env, not released)

        def tx(q: Q) -> list[Any]:
            cond, extra = "", list[Any]()  # the rows after ``after``'s (placed_at, id), when given
            if after is not None:
                mark = q("SELECT placed_at FROM gov_holds WHERE id = ? AND env = ?", check_hold_id(after), env)
                at = mark.fetchone()
                if at is None:
                    raise UnknownHold(f"no hold {after}")
                cond = " AND (placed_at > ? OR (placed_at = ? AND id > ?))"
                extra = [at[0], at[0], after]
            sql = _SELECT + where + cond + " ORDER BY placed_at, id LIMIT ?"
            return list(q(sql, *args, *extra, limit + 1).fetchall())

        rows = [_row(r) for r in self.run(tx, write=False)]
        return rows[:limit], rows[limit - 1].id if len(rows) > limit else None

    def get(self, hold_id: str) -> Hold | None:
        r = self.run(lambda q: q(_SELECT + " WHERE id = ?", hold_id).fetchone(), write=False)
        return None if r is None else _row(r)

    def counts(self, env: str | None = None) -> dict[str, int]:
        """Active holds per kind (of ``env``), every kind present (the ``modelseal_holds`` gauge)."""
        where, args = _where(env, True)
        sql = _COUNT + where + " GROUP BY kind"
        found = {str(k): int(n) for k, n in self.run(lambda q: q(sql, *args).fetchall(), write=False)}
        return {k: found.get(k, 0) for k in HOLD_KINDS}

    def snapshot(self, known: int | None, env: str | None = None) -> tuple[int, list[Hold] | None]:
        """The generation token and, unless it is ``known``, the active holds of ``env``
        (read after it, so a view is never older than its token)."""
        where, args = _where(env, True)

        def tx(q: Q) -> tuple[int, list[Any] | None]:
            g = q("SELECT value FROM gov_holds_generation WHERE name = 'holds'").fetchone()
            token = 0 if g is None else int(g[0])
            return token, None if token == known else q(_SELECT + where, *args).fetchall()

        token, rows = self.run(tx, write=False)
        return token, None if rows is None else [_row(r) for r in rows]


__all__ = ["CACHE_SECONDS", "HOLD_KINDS", "KEY_HELD_ACTIONS", "MAX_ACTIVE", "MAX_PAGE", "MAX_REASON", "STALE_SECONDS"]
__all__ += ["Hold", "HoldChanged", "HoldIndex", "HoldReleased", "HoldStore", "HoldView", "HoldsUnreadable"]
__all__ += ["TooManyHolds", "UnknownHold", "backing_resolver", "check", "check_hold_id", "check_line"]
__all__ += ["check_source", "check_subject", "deny_reason", "held_identities", "place_event", "release_event"]
__all__ += ["source_form"]
