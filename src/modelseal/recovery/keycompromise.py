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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.audit.events import AuditEvent
from modelseal.errors import IncidentError
from modelseal.keys.providers import parse_key_uri
from modelseal.keys.service import KeyService
from modelseal.recipes.context import check_keys_apart, trust_policy
from modelseal.recovery import incident_artifacts as steps
from modelseal.recovery import incident_keys as keys
from modelseal.recovery import incident_registry as reg
from modelseal.recovery import incident_report, journal
from modelseal.recovery import incident_signing as signing
from modelseal.recovery import incident_verify as verify
from modelseal.recovery.incident_find import Findings, Found, history, in_paths
from modelseal.registry import settings
from modelseal.signing.load import load_signer
from modelseal.signing.revocation import RevocationList
from modelseal.signing.signers import Signer
from modelseal.signing.trust import TrustPolicy, load_policy

KIND = "key"
HOLD_WHY = (
    "no governance key hold: a hold stops key.unwrap and key.rewrap of every version of the backing key at the "
    "broker, so it would stop this re-encryption (which unwraps under the compromised version once more) and "
    "every reader of the re-encrypted artifacts (new version). The version-precise control is the disable step, "
    "at the provider, which covers every path to the key (broker, Transit, local), not the broker's alone. Hold "
    "or revoke the identity suspected of the leak instead (modelseal incident cert-compromise, modelseal access hold)"
)


@dataclass(frozen=True)
class KeyIncident:
    """The operator's arguments of one key-compromise incident."""

    key: str  # KEY[@VERSION]
    paths: tuple[str, ...] = ()
    registry: reg.RegistryTarget | None = None
    sign_keys: tuple[str, ...] = ()  # as modelseal sign --sign-key takes them
    trust: str | None = None  # the trust policy file (default: the one in force)
    revocation_keys: tuple[str, ...] = ()  # signers of the revocation list
    keep_recipients: tuple[str, ...] = ()
    destroy_after: float = keys.DEFAULT_DESTROY_AFTER
    new_incident: bool = False
    work: str | None = None  # registry work copies (default: the ciphertext cache)
    reason: str = "key compromise"


@dataclass
class Plan:
    id: str
    resuming: bool
    key: str
    canonical: str
    target: str
    versions: dict[str, Any]
    found: list[Found] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # the journal's, when resuming
    problems: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    history: str = ""
    steps: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "resuming": self.resuming,
            "key": self.key,
            "versions": self.versions,
            "steps": [{"step": s, "does": d} for s, d in self.steps],
            "found": [f.to_json() for f in self.found],
            "journaled": self.records,
            "problems": self.problems,
            "blockers": self.blockers,
            "notes": self.notes,
            "history": self.history,
            "seconds": self.seconds,
        }

    def lines(self) -> list[str]:
        v = self.versions
        what = "resuming" if self.resuming else "new"
        out = [
            f"incident {self.id} ({what}): key compromise of {self.key}, version(s) "
            f"{', '.join(map(str, v['compromised']))} (newest at the start: {v['before']})",
            *[f"  {i}. {s}: {d}" for i, (s, d) in enumerate(self.steps, 1)],
        ]
        for f in self.found:
            tags = f" tags {','.join(f.tags)}" if f.tags else ""
            sig = "signed" if f.signed else "unsigned"
            out.append(f"  exposed ({f.why}): {f.ref}{tags} artifact {f.artifact_id[:16]} {sig}, {f.size} bytes")
        for r in self.records:
            out.append(f"  journaled: {r.get('ref')}: {r.get('state')}")
        out += [f"  cannot read: {p}" for p in self.problems]
        out += [f"  blocks --execute: {b}" for b in self.blockers]
        out += [f"  note: {n}" for n in self.notes]
        out.append(f"  audit history: {self.history}")
        return out


def _policy(inc: KeyIncident, svc: KeyService) -> TrustPolicy | None:
    return load_policy(inc.trust) if inc.trust else trust_policy(svc)


def _discover(
    inc: KeyIncident, svc: KeyService, canon: str, versions: list[int], session: reg.Session | None
) -> tuple[Findings, str]:
    ids, note = history(svc, canon, versions)
    found = in_paths(svc, [Path(p) for p in inc.paths], canon, versions, ids)
    if session is not None:
        remote = reg.in_registry(svc, session, canon, versions, ids)
        found.found += remote.found
        found.problems += remote.problems
    return found, note


def _describe(uri: str, versions: dict[str, Any], inc: KeyIncident) -> list[tuple[str, str]]:
    scheme = parse_key_uri(uri).scheme
    c = versions["compromised"]
    disable = {
        "transit": f"min_decryption_version set to {max(c) + 1}",
        "local": "destruction scheduled (stops decrypting now; erased after the wait)"
        if inc.destroy_after > 0
        else "destroyed now",
    }.get(scheme, "each version disabled")
    return [
        ("find", "headers of the artifacts under the paths and in the registry, the audit log's wraps (no key used)"),
        ("rotate", f"a new version of {uri} becomes primary (once, even across crashes)"),
        ("hold", "none placed (see the journal's hold note)"),
        ("artifacts", "each exposed artifact re-encrypted under a fresh data key, atomically, recipients kept as "
         "vouched; registry: pulled by digest, pushed under the same tags, the old manifest deleted for the GC"),
        ("resign", "each signed artifact re-signed with --sign-key under its name, next version"),
        ("revoke-signatures", "the superseded signature ids added to the trust policy's revocation list"),
        ("verify", "each result opens and authenticates, names no compromised version, its new signature "
         "verifies and the old ones are revoked; registry tags name the new manifests"),
        ("disable", f"version(s) {', '.join(map(str, c))}: {disable}"),
        ("report", "the journal is closed; JSON and a summary in the incident folder (and --report FILE)"),
    ]  # fmt: skip


def plan(inc: KeyIncident, svc: KeyService, session: reg.Session | None = None) -> Plan:
    """What ``execute`` would do, changing nothing (no journal is created either)."""
    t = time.monotonic()
    uri, version = keys.parse_target(inc.key)
    canon = svc.canonical(uri)
    target = f"{canon}@{version if version is not None else 'all'}"
    found_j = journal.peek(KIND, target, new=inc.new_incident)
    if isinstance(found_j, journal.Journal):
        versions, records, iid = found_j.doc["versions"], list(found_j.items.values()), found_j.id
    else:
        versions, records, iid = keys.decide_versions(svc, uri, version), [], found_j
    p = Plan(iid, isinstance(found_j, journal.Journal), uri, canon, target, versions, records=records)
    own = session is None and inc.registry is not None
    if own:
        assert inc.registry is not None
        session = reg.connect(inc.registry, svc, renew=False)  # a dry run changes nothing
    try:
        found, p.history = _discover(inc, svc, canon, versions["compromised"], session)
    finally:
        if own and session is not None:
            session.close()
    known = {r["ref"] for r in records}
    p.found = [f for f in found.found if f.ref not in known]
    p.problems = found.problems
    p.steps = _describe(uri, versions, inc)
    _check(inc, svc, p)
    p.seconds = time.monotonic() - t
    return p


def _check(inc: KeyIncident, svc: KeyService, p: Plan) -> None:
    p.blockers += [f"find: cannot read {x} (it may hold exposed artifacts)" for x in p.problems]
    if not inc.paths and inc.registry is None:
        p.blockers.append(
            "find: name where the artifacts are (--path, --registry): with neither, nothing would be re-encrypted "
            "and the disable step would leave every artifact under the version unreadable"
        )
    open_records = [r for r in p.records if r.get("state") in steps.PENDING]
    signed = sum(1 for f in p.found if f.signed) + sum(1 for r in open_records if r.get("signed"))
    if signed:
        if not inc.sign_keys:
            p.blockers.append(f"resign: {signed} exposed artifact(s) are signed: give --sign-key")
        policy = _policy(inc, svc)
        if policy is None:
            p.blockers.append("resign: no trust policy to check the superseded signatures with: give --trust")
        elif policy.revocation is None:
            p.blockers.append("revoke-signatures: the trust policy has no [revocation] list to revoke them in")
        if not inc.revocation_keys:
            p.blockers.append("revoke-signatures: give the revocation list's signing key(s) with --revocation-key")
    if inc.registry is None and any(r.get("kind") == "registry" for r in open_records):
        p.blockers.append("artifacts: the journal has registry artifacts still to do: give --registry again")
    for v, state in sorted(p.versions.get("states", {}).items()):
        if state != "active":
            p.notes.append(f"version {v} is {state}: artifacts wrapped only under it open through another recipient "
                           "or not at all")  # fmt: skip
    if parse_key_uri(p.key).scheme == "local":
        p.notes.append("backups made before this incident hold the keystore with the compromised version: make a "
                       "new backup (modelseal backup create) and retire the older ones")  # fmt: skip
    p.notes.append("copies outside the paths and registry given (offline disks, caches, pulled copies) are not "
                   "reached; they stop opening once the disable step has run")  # fmt: skip


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
    session = reg.connect(inc.registry, svc) if inc.registry is not None else None
    try:
        p = plan(inc, svc, session)
        if p.blockers:
            raise IncidentError("plan: " + "; ".join(p.blockers))
        policy = _policy(inc, svc)
        signers = [load_signer(k) for k in inc.sign_keys]
        list_signers = [load_signer(k) for k in inc.revocation_keys]
        fields = {"key": p.key, "canonical": p.canonical, "versions": p.versions, "hold": HOLD_WHY}
        with journal.opened(KIND, p.target, fields, new=inc.new_incident) as j:
            return _run(inc, svc, p, j, session, (policy, signers, list_signers), progress, report_to)
    finally:
        if session is not None:
            session.close()


def _run(
    inc: KeyIncident,
    svc: KeyService,
    p: Plan,
    j: journal.Journal,
    session: reg.Session | None,
    trust: tuple[TrustPolicy | None, list[Signer], list[Signer]],
    progress: Callable[[str], None] | None,
    report_to: Path | None,
) -> dict[str, Any]:
    uri, iid = p.key, j.id
    policy, signers, list_signers = trust

    def emit(op: str, version: int | None = None, artifact: str | None = iid) -> None:
        svc.sink.emit(AuditEvent(op, uri, "ok", version, artifact))

    if not j.doc.get("opened"):
        j.doc["opened"] = time.time()
        emit("incident-open")
    given = [str(Path(x).absolute()) for x in inc.paths]
    j.doc["inputs"] = {"paths": sorted({*j.doc.get("inputs", {}).get("paths", []), *given})}
    if inc.registry is not None:
        j.doc["inputs"]["registry"] = inc.registry.to_json()
    j.doc["notes"] = p.notes
    for f in p.found:
        j.save_item({**f.to_json(), "state": "planned"})
    find = j.step("find")
    find.update(status="done", runs=int(find.get("runs", 0)) + 1, seconds=float(find.get("seconds", 0)) + p.seconds)
    compromised = [int(v) for v in j.doc["versions"]["compromised"]]
    with j.timed("rotate"):
        new = keys.rotate_once(j, svc, uri)
        emit("incident-rotate", new)
    j.step("hold").update(status="skipped", why=HOLD_WHY)
    run = steps.Run(svc, j, uri, p.canonical, compromised, new, policy, signers, inc.keep_recipients, session,
                    _work(inc, iid), progress)  # fmt: skip
    with j.timed("artifacts"):
        for item in steps.pending(j.items):
            steps.advance(run, item)
    done = [i for _, i in sorted(j.items.items()) if i.get("state") == "done"]
    with j.timed("revoke-signatures"):
        ids = [str(s["id"]) for i in done for s in i.get("old_signatures", [])]
        if ids:
            assert policy is not None
            version = signing.extend(policy, list_signers, ids, f"{inc.reason}: incident {iid}")
            if version is not None:
                j.doc["revocation_list_version"] = version
                for sid in dict.fromkeys(ids):
                    emit("incident-revoke-signature", version, sid)
    with j.timed("verify"):
        rl = signing.current_list(policy) if policy is not None and any(i.get("signed") for i in done) else None
        for item in done:
            _verify(run, item, rl)
    with j.timed("disable"):
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
    for sid in item.get("new_signatures", []):
        signing.check_new(path, run.policy, str(sid))
    old = [str(s["id"]) for s in item.get("old_signatures", [])]
    left = signing.unrevoked(rl, old)
    if left:
        raise IncidentError(f"verify: {item['ref']}: superseded signature(s) {', '.join(s[:16] for s in left)} "
                            "are not revoked")  # fmt: skip


def _verify_registry(run: steps.Run, item: dict[str, Any], rl: RevocationList | None) -> None:
    assert run.session is not None
    path = reg.work_path(run.work, item)
    if item.get("new_digest"):
        verify.header(path, run.svc, run.canon, run.compromised, str(item["old_id"]))
        verify.contents(path, run.svc)
        _verify_signatures(run, item, path, rl)
        wrong = {t: d for t, d in reg.tag_digests(run.session, item, item.get("tags_moved", [])).items()
                 if d != item["new_digest"]}  # fmt: skip
        if wrong:
            raise IncidentError(f"verify: {item['ref']}: tag(s) {', '.join(wrong)} do not name the new manifest")
    if reg.present(run.session, item):
        raise IncidentError(f"verify: {item['ref']}: the old manifest is still in the registry")


__all__ = ["HOLD_WHY", "KeyIncident", "Plan", "execute", "plan"]
