"""``modelseal incident cert-compromise SERIAL|IDENTITY``: the runbook as a command (docs/recovery.md).

What it covers: a serial (that certificate, and every certificate renewed from it: a thief
of its key could have renewed it; and the live certificates it was renewed from, which the
same host held: the lineage from its oldest live ancestor down), or an identity (every live
serial the CA's records hold for it, with their renewals). The identity's other live serials
are listed in the plan with a warning. ``plan`` changes nothing; ``execute``:

1. ``revoke``: each serial goes on the CA's denylist with its renewals, and is revoked at
   the issuing backend too (OpenBao's ``pki/revoke`` for ``transit-pki``): ``pki.issue.revoke_all``;
2. ``rotate-ca`` (``--rotate-ca``): the issuing intermediate rolls over to the standby key
   (``pki.ca.rotate_intermediate``, ``pki.transit_pki.rotate_intermediate``), once: the
   journal records the live pin before, and a resumed run that finds another one adopts it;
3. ``activity``: what the identity did in the window, from the audit log (only entries that
   verify): events whose actor or subject is the identity, and the CA's events about its
   serials. The window starts at ``since``, by default at the certificate's not-before (the
   earliest of the serials concerned, from the CA's records: issue time less the back-dating);
4. the report, and the journal is closed.

Events carry the identity, not the certificate it presented: with a serial given, the listing
covers every certificate of that identity in the window.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelseal.audit.events import AuditEvent
from modelseal.errors import IncidentError, ModelsealError
from modelseal.keys.service import KeyService
from modelseal.pki import ca as pki_ca
from modelseal.pki import denylist, issue, pins, transit_pki
from modelseal.pki.backend import Issuer
from modelseal.pki.identity import parse
from modelseal.recovery import incident_report, journal
from modelseal.util.home import modelseal_home

KIND = "cert"
BACKDATE = pki_ca.BACKDATE.total_seconds()
MAX_ACTIVITY = 100_000


@dataclass(frozen=True)
class CertIncident:
    target: str  # a serial (hex) or an identity URI
    since: float | None = None  # the window's start (default: the certificate's not-before)
    rotate_ca: bool = False
    reason: str = "certificate compromise"
    new_incident: bool = False


@dataclass
class CertPlan:
    id: str
    resuming: bool
    target: str
    identity: str | None
    serials: list[dict[str, Any]]
    since: float
    activity: list[dict[str, Any]] = field(default_factory=list)
    rotate_ca: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "resuming": self.resuming,
            "target": self.target,
            "identity": self.identity,
            "serials": self.serials,
            "since": self.since,
            "since_utc": _utc(self.since),
            "rotate_ca": self.rotate_ca,
            "activity": self.activity,
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        what = "resuming" if self.resuming else "new"
        out = [f"incident {self.id} ({what}): certificate compromise of {self.target}"]
        for s in self.serials:
            state = "revoked already" if s["revoked"] else "to revoke"
            out.append(f"  1. revoke serial {s['serial']} ({s['identity']}, until {s['not_after_utc']}): {state}")
        out.append(f"  2. rotate the issuing CA: {'yes' if self.rotate_ca else 'no (--rotate-ca)'}")
        out.append(f"  3. activity since {_utc(self.since)}: {len(self.activity)} audit event(s)")
        out += [
            f"    #{e['entry']} {e['time_utc']} {e['operation']} {e['key']} -> {e['result']}"
            for e in self.activity[:200]
        ]
        out += [f"  note: {n}" for n in self.notes]
        return out


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _row(r: dict[str, object], listed: denylist.Denylist) -> dict[str, Any]:
    serial = denylist.parse_serial(str(r.get("serial")))
    issued = r.get("issued_at")
    return {
        "serial": denylist.serial_hex(serial),
        "identity": str(r.get("identity", "")),
        "not_after": issue.not_after_of(r),
        "not_after_utc": _utc(issue.not_after_of(r)),
        "not_before": float(issued) - BACKDATE if isinstance(issued, int | float) else None,
        "renewed_from": r.get(denylist.PARENT),
        "revoked": listed.revoked(serial),
    }


def _oldest_live_ancestor(rows: list[dict[str, Any]], hexed: str, now: float) -> dict[str, Any] | None:
    """The oldest certificate, still valid, that ``hexed`` was renewed from (transitively)."""
    by_serial = {str(r.get("serial")): r for r in rows}
    seen, oldest = {hexed}, None
    parent = by_serial.get(hexed, {}).get(denylist.PARENT)
    while isinstance(parent, str) and parent in by_serial and parent not in seen:
        seen.add(parent)
        row = by_serial[parent]
        if issue.not_after_of(row) > now:
            oldest = row
        parent = row.get(denylist.PARENT)
    return oldest


def _resolve(issuer: Issuer, target: str, now: float) -> tuple[str, str | None, list[dict[str, Any]]]:
    """(the journal's target key, the identity, the serials concerned with their renewals)."""
    rows = [dict(r) for r in issue.list_issued(issuer)]
    listed = denylist.load(issuer.folder)
    if target.startswith("spiffe://"):
        ident = parse(target).uri
        mine = [r for r in rows if r.get("identity") == ident and issue.not_after_of(r) > now]
        return ident, ident, [_row(r, listed) for r in mine]
    serial = denylist.parse_serial(target)
    hexed = denylist.serial_hex(serial)
    own = [r for r in rows if r.get("serial") == hexed]
    top = _oldest_live_ancestor(rows, hexed, now)
    if top is not None:  # its lineage from there: revoke_all of the ancestor covers every one of it
        top_serial = denylist.parse_serial(str(top.get("serial")))
        concerned = [top, *denylist.descendants(rows, top_serial)]
    else:
        concerned = [*own, *denylist.descendants(rows, serial)]
    out = [_row(dict(r), listed) for r in concerned]
    if not own:
        out.insert(0, {"serial": hexed, "identity": "", "not_after": None, "not_after_utc": "?", "not_before": None,
                       "renewed_from": None, "revoked": listed.revoked(serial)})  # fmt: skip
    identity = next((str(r["identity"]) for r in out if r["identity"]), None)
    return f"serial:{hexed}", identity, out


def _others(issuer: Issuer, identity: str | None, serials: list[dict[str, Any]], now: float) -> list[str]:
    """The identity's live serials the incident does not revoke."""
    if identity is None:
        return []
    covered = {s["serial"] for s in serials}
    listed = denylist.load(issuer.folder)
    return [
        str(r.get("serial")) for r in issue.list_issued(issuer)
        if r.get("identity") == identity and issue.not_after_of(r) > now and str(r.get("serial")) not in covered
        and not listed.revoked(denylist.parse_serial(str(r.get("serial"))))
    ]  # fmt: skip


def activity(identity: str | None, serials: list[str], since: float) -> tuple[list[dict[str, Any]], str | None]:
    """Audit events since ``since`` whose actor or subject is ``identity``, or that are the
    CA's about one of ``serials``; and a note if the log does not verify to its end."""
    from modelseal.audit.log import MerkleAuditLog

    url = os.environ.get("MODELSEAL_AUDIT_URL")
    target: str | Path = url or modelseal_home() / "audit.db"
    if isinstance(target, Path) and not target.exists():
        return [], "no audit log on this host: no activity to list"
    events, v = MerkleAuditLog(target).verified_events(since=since)
    wanted = set(serials)
    out = []
    for e in events:
        key = e.get("key")
        mine = identity is not None and identity in (e.get("actor"), e.get("subject"))
        about = isinstance(key, str) and key.startswith("ca:") and e.get("artifact") in wanted
        if mine or about:
            try:
                t = float(e.get("time", 0))
            except (TypeError, ValueError):
                t = 0.0
            fields = ("entry", "operation", "key", "result", "actor", "subject", "source", "artifact", "version")
            out.append({**{k: e.get(k) for k in fields}, "time": t, "time_utc": _utc(t)})
            if len(out) >= MAX_ACTIVITY:
                return out, f"only the first {MAX_ACTIVITY} events are listed"
    note = None if v.ok else f"the audit log does not verify from entry {v.first_bad}: later entries not listed"
    return out, note


def plan(inc: CertIncident, svc: KeyService) -> CertPlan:
    t = time.monotonic()
    issuer = issue.load_issuer(svc)
    key, identity, serials = _resolve(issuer, inc.target, time.time())
    found = journal.peek(KIND, key, new=inc.new_incident)
    iid = found if isinstance(found, str) else found.id
    starts = [s["not_before"] for s in serials if s["not_before"] is not None]
    if inc.since is None and not starts:
        raise IncidentError(f"find: the CA has no record of {inc.target} to start the window at: give --since")
    since = inc.since if inc.since is not None else min(starts)
    p = CertPlan(iid, not isinstance(found, str), inc.target, identity, serials, since, rotate_ca=inc.rotate_ca)
    p.activity, note = activity(identity, [s["serial"] for s in serials], since)
    if note:
        p.notes.append(note)
    if not serials:
        p.notes.append(f"the CA's records hold no live certificate of {inc.target}: nothing to revoke")
    others = _others(issuer, identity, serials, time.time())
    if others:
        p.notes.append(f"warning: {identity} has {len(others)} other live certificate(s) this incident does not "
                       f"revoke: {', '.join(others)}; if their host may be compromised too, run the incident on "
                       f"{identity}")  # fmt: skip
    if not inc.target.startswith("spiffe://"):
        p.notes.append("events carry the identity, not the certificate: the activity covers the identity's every one")
    p.notes.append("issue the identity a new certificate (modelseal cert issue) once the host is safe again")
    if inc.rotate_ca:
        p.notes.append("after the roll-over give clients the new backup pin (modelseal ca pins); leaves the old "
                       "intermediate signed stay valid until they expire (they chain to the same root)")  # fmt: skip
    p.seconds = time.monotonic() - t
    return p


def _live_pin(svc: KeyService, issuer: Issuer) -> str:
    if isinstance(issuer, transit_pki.TransitPKI):
        return issuer.pins()["live"]
    return pins.pin_of(pki_ca.load_ca(issuer.folder).issuing)


def _rotate(svc: KeyService, issuer: Issuer, j: journal.Journal) -> str:
    """Roll the issuing CA over once; the new live pin."""
    ca = j.doc.setdefault("ca", {})
    now = _live_pin(svc, issuer)
    if ca.get("live_before") is None:
        ca["live_before"] = now
        j.save()
    elif now != ca["live_before"]:
        ca["live_after"] = now  # rolled over by a run that crashed before recording it
        return now
    if isinstance(issuer, transit_pki.TransitPKI):
        rolled = transit_pki.rotate_intermediate(issuer)
        ca["live_after"] = rolled.pins()["live"]
    else:
        ca["live_after"] = pins.pin_of(pki_ca.rotate_intermediate(svc, pki_ca.load_ca(issuer.folder)).issuing)
    return str(ca["live_after"])


def execute(inc: CertIncident, svc: KeyService, report_to: Path | None = None) -> dict[str, Any]:
    p = plan(inc, svc)
    issuer = issue.load_issuer(svc)
    key, _, _ = _resolve(issuer, inc.target, time.time())
    fields = {"identity": p.identity, "since": p.since}
    domain = f"ca:{issuer.trust_domain}"
    with journal.opened(KIND, key, fields, new=inc.new_incident) as j:

        def emit(op: str, result: str = "ok", artifact: str | None = j.id) -> None:
            svc.sink.emit(AuditEvent(op, domain, result, None, artifact, subject=p.identity))

        if not j.doc.get("opened"):
            j.doc["opened"] = time.time()
            emit("incident-open")
        find = j.step("find")
        find.update(status="done", runs=int(find.get("runs", 0)) + 1, seconds=float(find.get("seconds", 0)) + p.seconds)
        with j.timed("revoke"):
            results = j.doc.setdefault("results", {})
            for s in p.serials:
                if s["serial"] in results:
                    continue  # revoked in this incident already (a renewal of one before it)
                serial = denylist.parse_serial(s["serial"])
                try:
                    added, renewals = issue.revoke_all(svc, serial, inc.reason, ca=issuer)
                except ModelsealError as e:
                    emit("incident-cert-revoke", type(e).__name__, s["serial"])
                    raise IncidentError(f"revoke: serial {s['serial']}: {e}") from None
                results[s["serial"]] = "revoked" if added else results.get(s["serial"], "revoked already")
                for r in renewals:
                    results[r] = f"revoked (renewed from {s['serial']})"
                emit("incident-cert-revoke", "ok", s["serial"])
        if inc.rotate_ca:
            with j.timed("rotate-ca"):
                live = _rotate(svc, issuer, j)
                emit("incident-rotate-ca", "ok")
            j.doc["ca"]["summary"] = f"rolled over; live pin now {live}"
        with j.timed("activity"):
            events, note = activity(p.identity, [s["serial"] for s in p.serials], p.since)
        j.doc["notes"] = p.notes + ([note] if note else [])
        j.close()
        emit("incident-close")
        serials = [{**s, "result": j.doc["results"].get(s["serial"], "?")} for s in p.serials]
        extra = {"serials": serials, "identity": p.identity, "since": p.since, "since_utc": _utc(p.since)}
        extra.update(activity=events, ca=j.doc.get("ca", {}).get("summary"))
        report = incident_report.build(j, extra)
        incident_report.write(j, report, incident_report.cert_summary(report), report_to)
        return report


__all__ = ["CertIncident", "CertPlan", "activity", "execute", "plan"]
