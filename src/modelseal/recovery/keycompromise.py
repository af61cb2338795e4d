"""``modelseal incident key-compromise KEY[@VERSION]``: the runbook as a command (docs/recovery.md).

``plan`` changes nothing: it reads headers (no key is used), the audit log and the key's
versions, and says what each step would do and what stops it. ``execute`` runs the steps in
this order, each timed, journaled (``journal``) and audited (``incident-*`` events):

1. ``rotate``: a new version becomes primary, once (``incident_keys.rotate_once``), so nothing
   is sealed under the compromised version while the incident runs;
2. ``hold``: no governance key hold is placed (``HOLD_WHY``);
3. ``artifacts``: every exposed artifact re-encrypted under a fresh data key (not rewrapped:
   the data keys were exposed), re-signed, and in the registry replaced under its tags with
   the old manifest deleted (``incident_artifacts``);
4. ``revoke-signatures``: the superseded signatures into the revocation list
   (``incident_signing``);
5. ``verify``: every result opens, authenticates, names no compromised version, verifies,
   and its superseded signatures are revoked (``incident_verify``);
6. ``disable``: only now, since re-encryption needed the old version once more, the
   compromised versions stop decrypting (``incident_keys``);
7. ``report``, then the journal is closed.

Re-running the same command resumes the incident: the versions decided at its start are the
journal's, artifacts found again are merged with the records already there, and every step is
safe to repeat. Any failure is an ``IncidentError`` naming the step and the artifact.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelseal.audit.events import AuditEvent
from modelseal.errors import IncidentError
from modelseal.keys.service import KeyService
from modelseal.recipes.context import check_keys_apart
from modelseal.recovery import incident_artifacts as steps
from modelseal.recovery import incident_keys as keys
from modelseal.recovery import incident_registry as reg
from modelseal.recovery import incident_report, journal
from modelseal.recovery import incident_signing as signing
from modelseal.recovery import incident_verify as verify
from modelseal.recovery.incident_find import Findings, History, history, in_paths
from modelseal.recovery.incident_plan import KeyIncident, Plan, check, describe, pending_refs, policy_of
from modelseal.recovery.incident_scope import Key, Scope, reconcile
from modelseal.registry import settings
from modelseal.signing.revocation import RevocationList
from modelseal.signing.trust import TrustPolicy

KIND = "key"
HOLD_WHY = (
    "no governance key hold: a hold stops key.unwrap and key.rewrap of every version of the backing key at the "
    "broker, so it would stop this re-encryption (which unwraps under the compromised version once more) and "
    "every reader of the re-encrypted artifacts (new version). The version-precise control is the disable step, "
    "at the provider, which covers every path to the key (broker, Transit, local), not the broker's alone. Hold "
    "or revoke the identity suspected of the leak instead (modelseal incident cert-compromise, modelseal access hold)"
)
Sessions = dict[str, reg.Session]


def _discover(
    inc: KeyIncident, svc: KeyService, canon: str, versions: list[int], sessions: Sessions
) -> tuple[Findings, History]:
    hist = history(svc, canon, versions)
    found = in_paths(svc, [Path(p) for p in inc.paths], canon, versions, hist)
    for session in sessions.values():
        remote = reg.in_registry(svc, session, canon, versions, hist)
        for name in ("found", "problems", "unknown", "broker", "notes"):
            getattr(found, name).extend(getattr(remote, name))
    return found, hist


def _scope(inc: KeyIncident) -> Scope:
    roots = tuple(Path(p).absolute() for p in inc.paths)
    return Scope(roots, {t.host: (t.repos or None) if t.has_catalog else t.repos for t in inc.targets()})


def connect(inc: KeyIncident, svc: KeyService, *, renew: bool = True) -> Sessions:
    """One session per registry (``renew``: the client certificate if due; a dry run does not)."""
    sessions: Sessions = {}
    try:
        for t in inc.targets():
            sessions[t.host] = reg.connect(t, svc, renew=renew)
    except BaseException:
        for s in sessions.values():
            s.close()
        raise
    return sessions


def plan(inc: KeyIncident, svc: KeyService, sessions: Sessions | None = None) -> Plan:
    """What ``execute`` would do, changing nothing (no journal is created either)."""
    t = time.monotonic()
    uri, version = keys.parse_target(inc.key)
    canon = svc.canonical(uri)
    target = f"{canon}@{version if version is not None else 'all'}"
    found_j = journal.peek(KIND, target, new=inc.new_incident)
    if isinstance(found_j, journal.Journal):
        versions, items, iid = found_j.doc["versions"], found_j.items, found_j.id
    else:
        versions, items, iid = keys.decide_versions(svc, uri, version), {}, found_j
    p = Plan(iid, isinstance(found_j, journal.Journal), uri, canon, target, versions, records=list(items.values()))
    own = sessions is None
    live = connect(inc, svc, renew=False) if sessions is None else sessions  # a dry run changes nothing
    try:
        compromised = [int(v) for v in versions["compromised"]]
        found, hist = _discover(inc, svc, canon, compromised, live)
        key = Key(svc, canon, compromised, versions.get("new"), hist)
        p.decision = reconcile(key, items, found.found, _scope(inc), live, _work(inc, iid))
    finally:
        if own:
            for s in live.values():
                s.close()
    p.found = [f for f in found.found if f.ref not in items]
    p.problems, p.unknown, p.history, p.audit = found.problems, found.unknown, hist.note, hist
    p.notes += found.notes
    p.steps = describe(uri, versions, inc)
    check(inc, svc, p, found.broker)
    p.seconds = time.monotonic() - t
    return p


def _work(inc: KeyIncident, iid: str) -> Path:
    base = Path(inc.work) if inc.work else settings.cache_dir(settings.load()) / "incidents"
    work = base / iid
    check_keys_apart(work)
    return work


def execute(
    inc: KeyIncident,
    svc: KeyService,
    progress: Callable[[str], None] | None = None,
    report_to: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the incident; returns the report (also written to ``report_to``)."""
    sessions = connect(inc, svc)
    try:
        p = plan(inc, svc, sessions)
        if p.blockers:
            raise IncidentError("plan: " + "; ".join(p.blockers))
        policy = policy_of(inc, svc)
        fields = {"key": p.key, "canonical": p.canonical, "versions": p.versions, "hold": HOLD_WHY}
        with journal.opened(KIND, p.target, fields, new=inc.new_incident) as j:
            return _run(inc, svc, p, j, sessions, policy, progress, report_to)
    finally:
        for s in sessions.values():
            s.close()


def _record(inc: KeyIncident, p: Plan, j: journal.Journal) -> None:
    """The run's inputs and findings into the journal, and what becomes of the old records."""
    given = [str(Path(x).absolute()) for x in inc.paths]
    j.doc["inputs"] = {"paths": sorted({*j.doc.get("inputs", {}).get("paths", []), *given})}
    registries = {str(r["host"]): r for r in j.doc.get("inputs", {}).get("registries", []) if isinstance(r, dict)}
    registries.update({t.host: t.to_json() for t in inc.targets()})
    if registries:
        j.doc["inputs"]["registries"] = [registries[h] for h in sorted(registries)]
    j.doc["notes"] = p.notes
    for f in p.found:
        j.save_item({**f.to_json(), "state": "planned"})
    for record in p.decision.reset.values():
        j.save_item(record)
    for ref, why in p.decision.left.items():
        if ref in j.items and j.items[ref].get("state") in journal.PENDING:
            j.save_item({**j.items[ref], "state": "left", "why_left": why})


def _run(
    inc: KeyIncident,
    svc: KeyService,
    p: Plan,
    j: journal.Journal,
    sessions: Sessions,
    policy: TrustPolicy | None,
    progress: Callable[[str], None] | None,
    report_to: Path | None,
) -> dict[str, Any]:
    uri, iid = p.key, j.id

    def emit(op: str, version: int | None = None, artifact: str | None = iid) -> None:
        svc.sink.emit(AuditEvent(op, uri, "ok", version, artifact))

    if not j.doc.get("opened"):
        j.doc["opened"] = time.time()
        emit("incident-open")
    _record(inc, p, j)
    find = j.step("find")
    find.update(status="done", runs=int(find.get("runs", 0)) + 1, seconds=float(find.get("seconds", 0)) + p.seconds)
    compromised = [int(v) for v in j.doc["versions"]["compromised"]]
    with j.timed("rotate"):
        new = keys.rotate_once(j, svc, uri)
        emit("incident-rotate", new)
    j.step("hold").update(status="skipped", why=HOLD_WHY)
    run = steps.Run(svc, j, uri, p.canonical, compromised, new, policy, p.signers, inc.keep_recipients, sessions,
                    _work(inc, iid), progress, p.audit)  # fmt: skip
    acted = pending_refs(p) | {f.ref for f in p.found} | set(p.decision.reset)
    recheck = set(p.decision.recheck)
    with j.timed("artifacts"):
        for ref, item in sorted(j.items.items()):
            again = ref in recheck and steps.resign_again(run, item)
            if (ref in acted or again) and item.get("state") in journal.PENDING:
                steps.advance(run, item)
    done = [i for _, i in sorted(j.items.items()) if i.get("state") == "done"]
    with j.timed("revoke-signatures"):
        ids = [str(s["id"]) for i in done for s in i.get("old_signatures", [])]
        if ids:
            assert policy is not None
            version = signing.extend(policy, p.list_signers, ids, f"{inc.reason}: incident {iid}")
            if version is not None:
                j.doc["revocation_list_version"] = version
                for sid in dict.fromkeys(ids):
                    emit("incident-revoke-signature", version, sid)
    with j.timed("verify"):
        rl = signing.current_list(policy) if policy is not None and any(i.get("signed") for i in done) else None
        for item in done:
            _verify(run, item, rl)
    with j.timed("disable"):
        _gone_check(inc, j)
        earlier = {d["version"]: d for d in j.doc.get("disabled", [])}  # what a run that crashed did
        now = keys.disable(svc, uri, compromised, inc.destroy_after)
        j.doc["disabled"] = [earlier.get(d["version"], d) for d in now]
        keys.check_disabled(svc, uri, compromised)
        for v in compromised:
            emit("incident-disable", v)
    j.close()
    emit("incident-close", new)
    report = incident_report.build(j)
    incident_report.write(j, report, incident_report.key_summary(report), report_to)
    shutil.rmtree(run.work, ignore_errors=True)  # ciphertext only: the pulled and re-encrypted copies
    return report


def _gone_check(inc: KeyIncident, j: journal.Journal) -> None:
    """Artifacts that went missing before they were re-encrypted stop the disable step unless
    the operator accepts them as deleted: a share that is only unreachable would otherwise
    come back with artifacts nothing opens any more."""
    pending = [r["ref"] for r in j.items.values() if r.get("state") in journal.PENDING]
    if pending:
        raise IncidentError(f"disable: {len(pending)} artifact(s) are not done yet (e.g. {pending[0]}): run again")
    gone = [r["ref"] for _, r in sorted(j.items.items()) if r.get("state") == "gone"]
    if gone and not inc.accept_gone:
        raise IncidentError(
            f"disable: {len(gone)} artifact(s) went missing before they were re-encrypted (e.g. {gone[0]}): if they "
            "were deleted, run again with --accept-gone; if they are only unreachable, make them reachable and run "
            "again"
        )


def _verify(run: steps.Run, item: dict[str, Any], rl: RevocationList | None) -> None:
    if item.get("verified"):
        return
    try:
        if item["kind"] == "registry":
            _verify_registry(run, item, rl)
        else:
            path = Path(str(item["location"]))
            verify.header(path, run.svc, run.canon, run.compromised, str(item["old_id"]))
            verify.contents(path, run.svc)
            _verify_signatures(run, item, path, rl)
    except IncidentError:
        raise
    except Exception as e:
        run.emit("incident-verify", type(e).__name__, str(item.get("new_id")))
        raise IncidentError(f"verify: {item['ref']}: {str(e)[:300] or type(e).__name__}") from None
    item["verified"] = True
    run.journal.save_item(item)
    run.emit("incident-verify", "ok", str(item.get("new_id")), run.new_version)


def _verify_signatures(run: steps.Run, item: dict[str, Any], path: Path, rl: RevocationList | None) -> None:
    if not item.get("signed"):
        return
    assert run.policy is not None and rl is not None
    signing.check_new(path, run.policy, [str(sid) for sid in item.get("new_signatures", [])])
    old = [str(s["id"]) for s in item.get("old_signatures", [])]
    left = signing.unrevoked(rl, old)
    if left:
        raise IncidentError(f"verify: {item['ref']}: superseded signature(s) {', '.join(s[:16] for s in left)} "
                            "are not revoked")  # fmt: skip


def _verify_registry(run: steps.Run, item: dict[str, Any], rl: RevocationList | None) -> None:
    session = run.session(item)
    path = reg.work_path(run.work, item)
    if item.get("new_digest"):
        verify.header(path, run.svc, run.canon, run.compromised, str(item["old_id"]))
        verify.contents(path, run.svc)
        _verify_signatures(run, item, path, rl)
        wrong = {t: d for t, d in reg.tag_digests(session, item, item.get("tags_moved", [])).items()
                 if d != item["new_digest"]}  # fmt: skip
        if wrong:
            raise IncidentError(f"verify: {item['ref']}: tag(s) {', '.join(wrong)} do not name the new manifest")
    if reg.present(session, item):
        raise IncidentError(f"verify: {item['ref']}: the old manifest is still in the registry")


__all__ = ["HOLD_WHY", "KeyIncident", "Plan", "connect", "execute", "plan"]
