"""Governance as evidence (docs/evidence.md, "Access" and "Changes"), read from the
governance database of ``modelseal serve`` (``governance.store.open_target``) and from this
host's pinned policy.

Access: every binding, grant and break-glass window active at some time in the window, with
the flags of an access review built at export time (``governance.review.build``: expired,
unused, separation-of-duties conflict, held); one removed before the export (its row is
deleted) is rebuilt from the audit log: its ``access-unbind`` event (or the ``approval-run``
of an approved ``access.unbind``), the ``access-bind``/``access-grant`` event that made it,
and the approval requests that name it (identity, expiry), flagged ``removed``. The signed
attestations of reviews made in the window, and the access events. Changes: the policy
versions (digest, proposer, note), their activations with who requested and who approved
each, the two-person approval requests that lived in the window and their outcome, the
exceptions to the encryption standards of the policy in force on the server and on this
host (owner, approver, expiry), and change events. A SQLite governance file that does not
exist is a gap, not created.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelseal.errors import ModelsealError
from modelseal.evidence.model import Section, Window, event_entry, utc
from modelseal.governance import review
from modelseal.governance.approvals import Approval, Approvals
from modelseal.governance.cedar import PolicySet
from modelseal.governance.holds import HoldStore
from modelseal.governance.localpolicy import client_policy
from modelseal.governance.store import GovStore
from modelseal.governance.versions import PolicyStore

ACCESS_OPS = frozenset(
    {
        "access-bind",
        "access-grant",
        "access-break-glass",
        "access-unbind",
        "access-attest",
        "break-glass-use",
        "hold-place",
        "hold-release",
        "mfa-enroll",
        "mfa-confirm",
    }
)
CHANGE_PREFIXES = ("approval-",)
CHANGE_OPS = frozenset({"policy-propose", "exception-expired", "trust-override"})
MAX_APPROVALS = 100_000
BIND_OPS = ("access-bind", "access-grant")
_UNBIND_RUN = "access.unbind Governance:"  # approval-run key of an approved officer unbind
REMOVED_NOTE = (
    "a binding removed before the export is listed from its audit events (flag removed); one removed "
    "without an audit event (outside modelseal serve) cannot be listed"
)


def _exists(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://")) or Path(target).is_file()


def _role_env(result: object) -> tuple[str | None, str | None]:
    """``ok:ROLE@ENV`` (the result of a bind, grant or unbind event)."""
    text = str(result or "")
    if not text.startswith("ok:") or "@" not in text:
        return None, None
    role, env = text[3:].split("@", 1)
    return role, env


def _binding_events(every: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Binding id -> the event that made it, and -> the event that removed it."""
    made: dict[str, dict[str, Any]] = {}
    gone: dict[str, dict[str, Any]] = {}
    for ev in every:
        op, key = ev.get("operation"), str(ev.get("key", ""))
        if op in BIND_OPS and key.startswith("binding:"):
            made[key.removeprefix("binding:")] = ev
        elif op == "access-unbind" and key.startswith("binding:"):
            gone[key.removeprefix("binding:")] = ev
        elif op == "approval-run" and key.startswith(_UNBIND_RUN) and str(ev.get("result", "")).startswith("done:"):
            gone[key.removeprefix(_UNBIND_RUN)] = ev
    return made, gone


def _approved(approvals: list[Approval]) -> dict[str, dict[str, Any]]:
    """Binding id -> what the approval requests that made or removed it say of it."""
    out: dict[str, dict[str, Any]] = {}
    for ap in approvals:
        r = ap.result if ap.state == "done" and isinstance(ap.result, Mapping) else {}
        if ap.action == "access.unbind" and isinstance(r.get("removed"), str):
            out.setdefault(r["removed"], {}).update(
                {k: r.get(k) for k in ("identity", "role", "env") if isinstance(r.get(k), str)}
            )
        elif isinstance(r.get("binding"), str):
            who = ap.requester if ap.params.get("kind") == "break-glass" else ap.params.get("identity")
            info = {"identity": who, "kind": ap.params.get("kind"), "expires": r.get("expires"), "made": ap.finished}
            out.setdefault(r["binding"], {}).update({k: v for k, v in info.items() if v is not None})
    return out


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _removed(
    present: set[str], every: list[dict[str, Any]], approvals: list[Approval], window: Window, s: Section
) -> None:
    """The bindings of the window that the governance database no longer holds."""
    made, gone = _binding_events(every)
    known = _approved(approvals)
    for bid in sorted(gone, key=lambda b: (_num(gone[b].get("time")) or 0, b)):
        if bid in present:
            continue
        end_ev, start_ev, info = gone[bid], made.get(bid), known.get(bid, {})
        created = _num(start_ev.get("time")) if start_ev else _num(info.get("made"))
        removed, expires = _num(end_ev.get("time")), _num(info.get("expires"))
        ends = [x for x in (removed, expires) if x is not None]
        if (ends and min(ends) <= window.start) or (created is not None and created >= window.end):
            continue
        role, env = _role_env(end_ev.get("result"))
        if role is None and start_ev is not None:
            role, env = _role_env(start_ev.get("result"))
        entry = {
            "id": bid,
            "identity": info.get("identity"),
            "role": info.get("role", role),
            "env": info.get("env", env),
            "kind": info.get("kind") or ("grant" if start_ev and start_ev.get("operation") == "access-grant" else None),
            "created": utc(created),
            "created_by": start_ev.get("actor") if start_ev else None,
            "expires_at": utc(expires),
            "removed": utc(removed),
            "removed_by": end_ev.get("actor"),
            "entry": end_ev.get("entry"),
            "made_entry": start_ev.get("entry") if start_ev else None,
            "flags": ["removed"],
        }
        s.add("access.bindings", entry)
    for bid, ev in sorted(made.items()):
        if bid not in present and bid not in gone and window.contains(_num(ev.get("time"))):
            lost = f"binding {bid[:40]} (entry {ev.get('entry')}) is not in the database and no audit event removed it"
            s.note("access.bindings", lost)
    s.note("access.bindings", REMOVED_NOTE)


def _access(
    target: str, window: Window, now: float, s: Section, every: list[dict[str, Any]], approvals: list[Approval]
) -> None:
    with_holds = HoldStore.open(target)
    try:
        holds = with_holds.active(now)
    finally:
        with_holds.close()
    store = GovStore.open(target)
    try:
        rows = store.bindings(include_expired=True, now=now)
    finally:
        store.close()
    rv = review.build(rows, now=now, holds=holds)
    for entry in rv["entries"]:
        if window.overlaps(float(entry["created"]), float(entry["expires"])):
            s.add(
                "access.bindings",
                {
                    **entry,
                    "created": utc(entry["created"]),
                    "expires_at": utc(entry["expires"]),
                    "last_used": utc(entry["last_used"]),
                },
            )
    _removed({b.id for b in rows}, every, approvals, window, s)
    flagged = {k: v for k, v in rv["summary"].items() if v}
    if flagged:
        s.note(
            "access.bindings", "review flags at export: " + ", ".join(f"{k} {v}" for k, v in sorted(flagged.items()))
        )
    reviews = review.Reviews.open(target)
    try:
        for a in reviews.attestations():
            if not window.contains(a.created):
                continue
            kept = reviews.review(a.digest)
            summary = kept.get("summary") if kept else None
            s.add(
                "access.attestations",
                {
                    "review": a.digest,
                    "reviewer": a.reviewer,
                    "attested": utc(a.created),
                    "certificate_sha256": a.certificate,
                    "signature": a.signature,
                    "review_generated": utc(kept.get("generated")) if kept else "",
                    "review_entries": len(kept.get("entries", [])) if kept else None,
                    "review_flags": summary if isinstance(summary, dict) else {},
                },
            )
    finally:
        reviews.close()
    if not s.items["access.attestations"]:
        s.note("access.attestations", "no access review was attested in the window")


def _exceptions(ps: PolicySet, where: str, window: Window, now: float, s: Section) -> None:
    for x in sorted(ps.exceptions, key=lambda x: (x.expires, x.id)):
        state = "expired" if x.expired(now) else "active"
        s.add(
            "changes.exceptions",
            {
                **x.describe(),
                "source": where,
                "policy_digest": ps.digest,
                "state": state,
                "expires_in_window": window.contains(x.expires),
            },
        )
        if not x.expired(now) and x.expires - now < 30 * 86400:
            s.note("changes.exceptions", f"exception {x.id} ({where}) expires {x.expires_text}")


def _changes(
    target: str, window: Window, now: float, s: Section, every: list[dict[str, Any]], recent: list[Approval]
) -> None:
    del every  # the changes are read from the database
    ps = PolicyStore.open(target)
    try:
        for v in ps.versions():
            s.add(
                "changes.policy_versions",
                {**v.to_json(), "proposed": utc(v.proposed), "in_window": window.contains(v.proposed)},
            )
        activations = ps.activations()
        for i, a in enumerate(activations):
            until = activations[i + 1].activated if i + 1 < len(activations) else None
            if window.overlaps(a.activated, until):
                s.add(
                    "changes.activations",
                    {
                        "seq": a.seq,
                        "digest": a.digest,
                        "requested_by": a.requested_by,
                        "approved_by": list(a.approvals),
                        "activated": utc(a.activated),
                        "superseded": utc(until),
                    },
                )
        _exceptions(ps.active(), "server policy", window, now, s)
    finally:
        ps.close()
    for ap in sorted(recent, key=lambda r: (r.created, r.id)):
        if window.overlaps(ap.created, ap.finished if ap.finished is not None else ap.expires):
            doc = ap.to_json(now)
            s.add(
                "changes.approvals",
                {**doc, "created": utc(ap.created), "expires": utc(ap.expires), "finished": utc(ap.finished)},
            )


def _approvals(target: str) -> list[Approval]:
    approvals = Approvals.open(target)
    try:
        return approvals.recent(MAX_APPROVALS)
    finally:
        approvals.close()


def gather(
    target: str | None,
    home: Path,
    window: Window,
    events: list[dict[str, Any]],
    now: float,
    every: list[dict[str, Any]] | None = None,
) -> tuple[Section, Section]:
    """The ``access`` and ``changes`` sections. ``events``: those of the window; ``every``: all
    the log's (a removed binding's events may lie before the window)."""
    access, changes = Section("access"), Section("changes")
    if target is None or not _exists(target):
        msg = "no governance database on this host (give the server's --data or --governance-db)"
        access.gaps.append(msg)
        changes.gaps.append(msg)
    else:
        try:
            recent = _approvals(target)
        except ModelsealError as e:
            recent = []
            changes.gaps.append(f"the approval requests could not be read: {str(e)[:300]}")
        for fn, s in ((_access, access), (_changes, changes)):
            try:
                fn(target, window, now, s, events if every is None else every, recent)
            except ModelsealError as e:
                s.gaps.append(f"the governance database could not be read: {str(e)[:300]}")
    try:
        _exceptions(client_policy(home), "host policy (config.toml [governance])", window, now, changes)
    except ModelsealError as e:
        changes.gaps.append(f"this host's policy could not be read: {str(e)[:300]}")
    for ev in events:
        op = str(ev.get("operation", ""))
        if op in ACCESS_OPS:
            access.add("access.events", event_entry(ev))
        elif op in CHANGE_OPS or op.startswith(CHANGE_PREFIXES):
            changes.add("changes.events", event_entry(ev))
    if any(e.get("operation") == "break-glass-use" for e in access.items["access.events"]):
        access.note("access.events", "break-glass access was used in the window")
    return access, changes


__all__ = ["ACCESS_OPS", "CHANGE_OPS", "gather"]
