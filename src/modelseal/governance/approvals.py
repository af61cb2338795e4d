"""The two-person rule: a dangerous operation is recorded as an approval request and runs
only once ``needs`` distinct officers, none of them the requester, approved it before it
expired; and then it runs exactly once.

Tables ``gov_approvals`` (one row per request: what, on what, with which parameters, by
whom, its digest, state) and ``gov_approval_votes`` (one row per officer and request; the
primary key keeps an officer from counting twice). ``approve`` records a vote and, in the
same transaction, the vote that reaches ``needs`` flips the request from ``pending`` to
``running``: however many final approvals race, one caller is told to run the operation
(``claimed``), and ``finish`` records its result. A request whose runner died stays
``running`` (never run twice; an officer files it again). Each approval comes with its own
fresh MFA code, checked by the caller (``server.gov_api``) against the request's digest.

Also the ``[governance]`` settings of config.toml (``settings``)::

    [governance]
    key = "local:modelseal-governance"  # the KEK of the MFA secrets
    approvals = 2                       # k of the k-of-n rule
    approval_ttl = "24h"                # a request expires unapproved after this
    break_glass_for = "4h"              # the longest break-glass window
    two_person = ["key.rotate"]         # also wait for approval (model.TWO_PERSON_CONFIGURABLE)
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelseal.errors import GovernanceError
from modelseal.governance import model
from modelseal.governance.model import Resource
from modelseal.governance.store import dialect_of
from modelseal.keys.config import ConfigError, config_table
from modelseal.util import bounded
from modelseal.util.sqldb import Q, SqlDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gov_approvals (
    id TEXT PRIMARY KEY, action TEXT NOT NULL, resource TEXT NOT NULL, params TEXT NOT NULL,
    requester TEXT NOT NULL, digest TEXT NOT NULL, needs INTEGER NOT NULL, created {REAL} NOT NULL,
    expires {REAL} NOT NULL, state TEXT NOT NULL, result TEXT, error TEXT, decided_by TEXT,
    reason TEXT NOT NULL, finished {REAL});
CREATE INDEX IF NOT EXISTS gov_approvals_state ON gov_approvals (state, expires);
CREATE TABLE IF NOT EXISTS gov_approval_votes (
    approval TEXT NOT NULL, officer TEXT NOT NULL, decided {REAL} NOT NULL, PRIMARY KEY (approval, officer));
"""
_SELECT = (
    "SELECT id, action, resource, params, requester, digest, needs, created, expires, state, result, error,"
    " decided_by, reason, finished FROM gov_approvals"
)
_ID = re.compile(r"[0-9a-f]{16}")
# The two-person actions, and the security-officer bindings, grants and removals that
# server.gov_api queues for approval (docs/access.md): one officer never reshapes the pool;
# nor holds another officer (``hold.release``: a hand-placed hold, server.holds_api).
# And the key lifecycle changes of model.TWO_PERSON_CONFIGURABLE, where config.toml says so.
_OFFICER_POOL = ("access.bind", "access.grant", "access.unbind", "hold.release")
APPROVABLE = (*model.TWO_PERSON, *model.TWO_PERSON_CONFIGURABLE, *_OFFICER_POOL)
MAX_PARAMS = 16 << 10


class Conflict(GovernanceError):
    """The request is not in a state that allows this: not pending, expired, one's own, or
    already approved by this officer."""


class UnknownApproval(GovernanceError):
    """No approval request has this id."""


class SettingsError(ConfigError, GovernanceError):
    """``[governance]`` of config.toml is invalid (the server refuses to start)."""


def _canonical(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        raise GovernanceError("an approval's parameters must be plain JSON") from None


def _load(text: str | None, what: str) -> Any:
    if text is None:
        return None
    return bounded.json_loads(text.encode(), max_depth=8, max_values=10_000, error=GovernanceError, what=what)


def _resource(r: Resource) -> dict[str, Any]:
    return {"type": r.type, "id": r.id, "attrs": dict(r.attrs)}


def check_id(approval_id: str) -> str:
    if not isinstance(approval_id, str) or not _ID.fullmatch(approval_id):
        raise GovernanceError("an approval id is 16 lowercase hex digits")
    return approval_id


@dataclass(frozen=True)
class Approval:
    """One request of a two-person operation and where it stands."""

    id: str
    action: str
    resource: Resource
    params: Mapping[str, Any]
    requester: str
    digest: str
    needs: int
    created: float
    expires: float
    state: str
    approvers: tuple[str, ...] = ()
    result: Mapping[str, Any] | None = None
    error: str | None = None
    decided_by: str | None = None
    reason: str = ""
    finished: float | None = None

    def state_at(self, now: float) -> str:
        """``state``, or ``expired`` for a pending request past its expiry."""
        return "expired" if self.state == "pending" and now >= self.expires else self.state

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "action": self.action,
            "resource": _resource(self.resource),
            "params": dict(self.params),
            "requester": self.requester,
            "digest": self.digest,
            "needs": self.needs,
            "approvals": list(self.approvers),
            "created": self.created,
            "expires": self.expires,
            "state": self.state_at(now),
            "result": None if self.result is None else dict(self.result),
            "error": self.error,
            "decided_by": self.decided_by,
            "reason": self.reason,
            "finished": self.finished,
        }


def approval_digest(action: str, resource: Resource, params: Mapping[str, Any], requester: str, created: float) -> str:
    """``sha256:HEX`` over the canonical JSON of what is asked, by whom and when."""
    doc = {
        "action": action,
        "resource": _resource(resource),
        "params": dict(params),
        "requester": requester,
        "created": created,
    }
    return "sha256:" + hashlib.sha256(_canonical(doc).encode()).hexdigest()


def _row(r: Any, votes: list[str]) -> Approval:
    res = _load(r[2], "an approval's resource")
    return Approval(
        id=r[0],
        action=r[1],
        resource=Resource(str(res["type"]), str(res["id"]), dict(res["attrs"])),
        params=_load(r[3], "an approval's parameters"),
        requester=r[4],
        digest=r[5],
        needs=int(r[6]),
        created=float(r[7]),
        expires=float(r[8]),
        state=r[9],
        approvers=tuple(votes),
        result=_load(r[10], "an approval's result"),
        error=r[11],
        decided_by=r[12],
        reason=r[13],
        finished=None if r[14] is None else float(r[14]),
    )


def _votes(q: Q, approval_id: str) -> list[str]:
    rows = q("SELECT officer FROM gov_approval_votes WHERE approval = ? ORDER BY decided, officer", approval_id)
    return [str(v[0]) for v in rows.fetchall()]


def _fetch(q: Q, approval_id: str) -> Approval:
    r = q(_SELECT + " WHERE id = ?", approval_id).fetchone()
    if r is None:
        raise UnknownApproval(f"no approval request {approval_id}")
    return _row(r, _votes(q, approval_id))


class Approvals(SqlDatabase):
    """The approval requests of one server (see the module docstring)."""

    SCHEMA = _SCHEMA
    ERROR = GovernanceError
    LABEL = "the governance database"
    LOCK = 7369241

    @classmethod
    def open(cls, target: str) -> Approvals:
        """On the same target as ``store.GovStore.open``."""
        return cls(*dialect_of(target))

    def request(
        self,
        action: str,
        resource: Resource,
        params: Mapping[str, Any],
        requester: str,
        needs: int = 2,
        ttl: float = 86400.0,
        now: float | None = None,
    ) -> Approval:
        """Record a request of ``action`` on ``resource`` by ``requester``; it waits for ``needs``
        approvals for ``ttl`` seconds."""
        if action not in APPROVABLE:
            raise GovernanceError(f"{action!r} is not a two-person operation")
        if not 1 <= needs <= 10 or not 0 < ttl <= model.MAX_GRANT:
            raise GovernanceError("an approval needs 1 to 10 officers and expires within 7 days")
        t = time.time() if now is None else now
        text = _canonical(dict(params))
        if len(text) > MAX_PARAMS:
            raise GovernanceError(f"an approval's parameters are at most {MAX_PARAMS} bytes of JSON")
        res = _canonical(_resource(resource))
        digest = approval_digest(action, resource, params, requester, t)
        a = Approval(
            secrets.token_hex(8), action, resource, dict(params), requester, digest, needs, t, t + ttl, "pending"
        )
        row = (a.id, a.action, res, text, a.requester, a.digest, a.needs, a.created, a.expires)
        sql = (
            "INSERT INTO gov_approvals (id, action, resource, params, requester, digest, needs, created, expires,"
            " state, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', '')"
        )
        self.run(lambda q: q(sql, *row))
        return a

    def get(self, approval_id: str) -> Approval:
        check_id(approval_id)
        return self.run(lambda q: _fetch(q, approval_id), write=False)

    def _pending_open(self, a: Approval, officer: str, now: float) -> None:
        if a.state != "pending":
            raise Conflict(f"approval {a.id} is {a.state}, not pending")
        if now >= a.expires:
            raise Conflict(f"approval {a.id} has expired")
        if officer == a.requester:
            raise Conflict(f"nobody approves their own request: {officer} asked for approval {a.id}")

    def approve(self, approval_id: str, officer: str, now: float | None = None) -> tuple[Approval, bool]:
        """Record ``officer``'s approval. The second value is True for exactly one caller: the
        one whose approval completed the request, which now runs it and calls ``finish``."""
        check_id(approval_id)
        t = time.time() if now is None else now

        def tx(q: Q) -> tuple[Approval, bool]:
            a = _fetch(q, approval_id)
            self._pending_open(a, officer, t)
            if officer in a.approvers:
                raise Conflict(f"{officer} already approved {a.id}: a second officer must approve it")
            q("INSERT INTO gov_approval_votes (approval, officer, decided) VALUES (?, ?, ?)", a.id, officer, t)
            claimed = False
            if len(a.approvers) + 1 >= a.needs:
                flipped = q("UPDATE gov_approvals SET state = 'running' WHERE id = ? AND state = 'pending'", a.id)
                claimed = flipped.rowcount == 1
            return _fetch(q, a.id), claimed

        return self.run(tx)

    def deny(self, approval_id: str, officer: str, reason: str = "", now: float | None = None) -> Approval:
        """Refuse a pending request for good (the requester may withdraw their own)."""
        check_id(approval_id)
        t = time.time() if now is None else now
        if len(reason) > 500 or not reason.isprintable():
            raise GovernanceError("a reason is one printable line of at most 500 characters")

        def tx(q: Q) -> Approval:
            a = _fetch(q, approval_id)
            if a.state != "pending":
                raise Conflict(f"approval {a.id} is {a.state}, not pending")
            q(
                "UPDATE gov_approvals SET state = 'denied', decided_by = ?, reason = ?, finished = ? WHERE id = ?",
                officer,
                reason,
                t,
                a.id,
            )
            return _fetch(q, a.id)

        return self.run(tx)

    def finish(
        self,
        approval_id: str,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
        now: float | None = None,
    ) -> Approval:
        """Record how the run of a claimed request ended (``running`` -> ``done``/``failed``)."""
        check_id(approval_id)
        t = time.time() if now is None else now
        state = "failed" if error is not None else "done"
        body = None if result is None else _canonical(dict(result))

        def tx(q: Q) -> Approval:
            flipped = q(
                "UPDATE gov_approvals SET state = ?, result = ?, error = ?, finished = ?"
                " WHERE id = ? AND state = 'running'",
                state,
                body,
                None if error is None else error[:500],
                t,
                approval_id,
            )
            if flipped.rowcount != 1:
                raise GovernanceError(f"approval {approval_id} is not running")
            return _fetch(q, approval_id)

        return self.run(tx)

    def pending(self, now: float | None = None) -> list[Approval]:
        """The requests still waiting for approvals (not expired), oldest first."""
        t = time.time() if now is None else now
        return self._list(" WHERE state = 'pending' AND expires > ? ORDER BY created, id", t)

    def recent(self, limit: int = 200) -> list[Approval]:
        """The latest ``limit`` requests, whatever their state, newest first."""
        return self._list(" ORDER BY created DESC, id LIMIT ?", int(limit))

    def _list(self, where: str, *args: Any) -> list[Approval]:
        def tx(q: Q) -> list[Approval]:
            return [_row(r, _votes(q, r[0])) for r in q(_SELECT + where, *args).fetchall()]

        return self.run(tx, write=False)


# -- settings --------------------------------------------------------------------------

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_duration(text: str, what: str = "a duration") -> float:
    """``90s``, ``30m``, ``8h``, ``90d``, ``2w`` or plain seconds; positive and finite."""
    try:
        value = float(text[:-1]) * _UNITS[text[-1]] if text[-1:] in _UNITS else float(text)
    except (ValueError, IndexError):
        raise ValueError(f"{what} takes a duration like 30m, 8h, 90d or 2w, got {text[:40]!r}") from None
    if not 0 < value < 1e12:  # NaN too
        raise ValueError(f"{what} must be a positive duration")
    return value


@dataclass(frozen=True)
class Settings:
    """``[governance]`` of config.toml: the MFA secrets' KEK, approvals needed, their expiry,
    the longest break-glass window, and the actions this server adds to the two-person rule."""

    key: str = "local:modelseal-governance"
    approvals: int = 2
    approval_ttl: float = 86400.0
    break_glass_for: float = 4 * 3600.0
    two_person: tuple[str, ...] = ()


def _two_person(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise SettingsError("config: governance.two_person must be a list of actions")
    for a in raw:
        if a not in model.TWO_PERSON_CONFIGURABLE + model.TWO_PERSON:
            known = "an unknown action" if a not in model.ACTIONS else "an action that cannot wait for approval"
            allowed = ", ".join(model.TWO_PERSON_CONFIGURABLE)
            raise SettingsError(f"config: governance.two_person: {a[:60]!r} is {known} (one of {allowed})")
    return tuple(dict.fromkeys(a for a in raw if a not in model.TWO_PERSON))  # those always wait


def parse_settings(table: Any) -> Settings:
    """``[governance]`` of config.toml as ``Settings``; ``SettingsError`` (a ``ConfigError``
    and a ``GovernanceError``) for anything invalid in it."""
    if table is None:
        return Settings()
    if not isinstance(table, dict):
        raise SettingsError("config: [governance] must be a table")
    d = Settings()
    key = table.get("key", d.key)
    n = table.get("approvals", d.approvals)
    if not isinstance(key, str) or ":" not in key:
        raise SettingsError("config: governance.key must be a key URI such as local:modelseal-governance")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
        raise SettingsError("config: governance.approvals must be a number from 1 to 10")

    def dur(name: str, default: float, limit: float) -> float:
        raw = table.get(name)
        if raw is None:
            return default
        try:
            value = parse_duration(str(raw), f"config: governance.{name}") if isinstance(raw, str) else float(raw)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        if not 60 <= value <= limit:
            raise SettingsError(f"config: governance.{name} must be from 1m to {int(limit // 86400)}d")
        return value

    ttl = dur("approval_ttl", d.approval_ttl, model.MAX_GRANT)
    glass = dur("break_glass_for", d.break_glass_for, model.MAX_GRANT)
    return Settings(key, n, ttl, glass, _two_person(table.get("two_person", [])))


def settings(home: Path | None = None) -> Settings:
    """The ``[governance]`` table of ``$MODELSEAL_HOME/config.toml`` (defaults without one)."""
    return parse_settings(config_table("governance", home))


__all__ = ["APPROVABLE", "Approval", "Approvals", "Conflict", "Settings", "SettingsError", "UnknownApproval"]
__all__ += ["approval_digest", "check_id", "parse_duration", "parse_settings", "settings"]
