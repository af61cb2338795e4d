"""The plan of a key-compromise incident: the operator's arguments (``KeyIncident``), what
the run would do (``Plan``: the steps, every exposed artifact, the journal's records and
what becomes of them) and what stops ``--execute`` before anything changes (``check``).

The checks run in the dry run as well, so a mistake shows there rather than half-way:
the signing keys must be keys of signers the trust policy's rules accept, the revocation
keys revocation signers meeting the list's threshold (``incident_signing.check_signers``),
``--destroy-after`` a waiting period from 0 to 366 days, every pending record inside this
run's paths and registries (``incident_scope``), and no exposed artifact sealed to a
``broker:NAME`` key backed by the compromised one (that incident is ``broker:NAME``'s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelseal.errors import ModelsealError
from modelseal.keys.providers import parse_key_uri
from modelseal.keys.service import KeyService
from modelseal.recipes.context import trust_policy
from modelseal.recovery import incident_keys as keys
from modelseal.recovery import incident_registry as reg
from modelseal.recovery import incident_signing as signing
from modelseal.recovery.incident_find import Found, History
from modelseal.recovery.incident_scope import Decision
from modelseal.recovery.journal import PENDING
from modelseal.signing.load import load_signer
from modelseal.signing.signers import Signer
from modelseal.signing.trust import TrustPolicy, load_policy


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
    registries: tuple[reg.RegistryTarget, ...] = ()  # more registries in the same run
    accept_gone: bool = False  # disable even though artifacts went missing before they were re-encrypted

    def __post_init__(self) -> None:
        hosts = [t.host for t in self.targets()]
        if len(set(hosts)) != len(hosts):
            raise ValueError("a registry is given twice: one --registry per HOST:PORT")

    def targets(self) -> tuple[reg.RegistryTarget, ...]:
        return (*self.registries, *((self.registry,) if self.registry is not None else ()))


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
    decision: Decision = field(default_factory=Decision)
    problems: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # refs of artifacts whose origin the audit log cannot tell
    history: str = ""
    steps: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    signers: list[Signer] = field(default_factory=list)
    list_signers: list[Signer] = field(default_factory=list)
    audit: History = field(default_factory=History)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "resuming": self.resuming,
            "key": self.key,
            "versions": self.versions,
            "steps": [{"step": s, "does": d} for s, d in self.steps],
            "found": [f.to_json() for f in self.found],
            "journaled": self.records,
            "left_alone": self.decision.left,
            "found_again": sorted(self.decision.reset),
            "origin_unknown": self.unknown,
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
            untagged = " untagged (deleted, not pushed again)" if f.digest else ""
            tags = f" tags {','.join(f.tags)}" if f.tags else untagged
            sig = "signed" if f.signed else "unsigned"
            out.append(f"  exposed ({f.why}): {f.ref}{tags} artifact {f.artifact_id[:16]} {sig}, {f.size} bytes")
        for r in self.records:
            out.append(f"  journaled: {r.get('ref')}: {r.get('state')}")
        out += [f"  left alone: {ref}: {why}" for ref, why in sorted(self.decision.left.items())]
        out += [f"  found again: {ref}" for ref in sorted(self.decision.reset)]
        out += [f"  origin unknown: {ref}: the audit log shows it only rewrapped (sealed elsewhere): check the log "
                "of the host that sealed it, or name the key without @VERSION" for ref in self.unknown]  # fmt: skip
        out += [f"  cannot read: {p}" for p in self.problems]
        out += [f"  blocks --execute: {b}" for b in self.blockers]
        out += [f"  note: {n}" for n in self.notes]
        out.append(f"  audit history: {self.history}")
        return out


def policy_of(inc: KeyIncident, svc: KeyService) -> TrustPolicy | None:
    return load_policy(inc.trust) if inc.trust else trust_policy(svc)


def describe(uri: str, versions: dict[str, Any], inc: KeyIncident) -> list[tuple[str, str]]:
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
        ("resign", "each signed artifact re-signed with --sign-key under its name, next version, checked at once"),
        ("revoke-signatures", "the superseded signature ids added to the trust policy's revocation list"),
        ("verify", "each result opens and authenticates, names no compromised version, its new signature "
         "verifies and the old ones are revoked; registry tags name the new manifests"),
        ("disable", f"version(s) {', '.join(map(str, c))}: {disable} (an artifact gone missing needs --accept-gone)"),
        ("report", "the journal is closed; JSON and a summary in the incident folder (and --report FILE)"),
    ]  # fmt: skip


def _load(specs: tuple[str, ...], flag: str, blockers: list[str]) -> list[Signer]:
    out = []
    for spec in specs:
        try:
            out.append(load_signer(spec))
        except (ModelsealError, OSError, ValueError) as e:
            blockers.append(f"{flag} {spec}: cannot be loaded ({str(e)[:200] or type(e).__name__})")
    return out


def _signing(inc: KeyIncident, svc: KeyService, p: Plan, signed: int) -> None:
    p.signers = _load(inc.sign_keys, "resign: --sign-key", p.blockers)
    p.list_signers = _load(inc.revocation_keys, "revoke-signatures: --revocation-key", p.blockers)
    if not signed:
        return
    if not inc.sign_keys:
        p.blockers.append(f"resign: {signed} exposed artifact(s) are signed: give --sign-key")
    policy = policy_of(inc, svc)
    if policy is None:
        p.blockers.append("resign: no trust policy to check the superseded signatures with: give --trust")
        return
    if policy.revocation is None:
        p.blockers.append("revoke-signatures: the trust policy has no [revocation] list to revoke them in")
    if not inc.revocation_keys:
        p.blockers.append("revoke-signatures: give the revocation list's signing key(s) with --revocation-key")
    p.blockers += signing.check_signers(policy, p.signers, p.list_signers)


def check(inc: KeyIncident, svc: KeyService, p: Plan, broker: list[str]) -> None:
    """The plan's blockers and notes (see the module doc)."""
    p.blockers += [f"find: cannot read {x} (it may hold exposed artifacts)" for x in p.problems]
    if not inc.paths and not inc.targets():
        p.blockers.append(
            "find: name where the artifacts are (--path, --registry): with neither, nothing would be re-encrypted "
            "and the disable step would leave every artifact under the version unreadable"
        )
    p.blockers += p.decision.blockers
    p.blockers += [f"find: {b}" for b in dict.fromkeys(broker)]
    acted = {*p.decision.act, *p.decision.reset}
    records = [r for r in p.records if r["ref"] in acted]
    resign = [r for r in p.records if r["ref"] in p.decision.recheck]
    signed = sum(1 for f in p.found if f.signed) + sum(1 for r in records + resign if r.get("signed"))
    _signing(inc, svc, p, signed)
    why = keys.destroy_after_problem(inc.destroy_after)
    if why is not None:
        p.blockers.append(why)
    gone = [r["ref"] for r in p.records if r.get("state") == "gone" and r["ref"] not in p.decision.reset]
    if gone and not inc.accept_gone:
        p.notes.append(f"{len(gone)} artifact(s) went missing before they were re-encrypted (gone): the disable "
                       "step waits for --accept-gone (give it once they are known deleted)")  # fmt: skip
    for v, state in sorted(p.versions.get("states", {}).items()):
        if state != "active":
            p.notes.append(f"version {v} is {state}: artifacts wrapped only under it open through another recipient "
                           "or not at all")  # fmt: skip
    if parse_key_uri(p.key).scheme == "local":
        p.notes.append("backups made before this incident hold the keystore with the compromised version: make a "
                       "new backup (modelseal backup create) and retire the older ones")  # fmt: skip
    p.notes.append("copies outside the paths and registry given (offline disks, caches, pulled copies) are not "
                   "reached; they stop opening once the disable step has run")  # fmt: skip


def pending_refs(p: Plan) -> set[str]:
    """The journaled records this run drives on."""
    return {r["ref"] for r in p.records if r.get("state") in PENDING and r["ref"] in p.decision.act}


__all__ = ["KeyIncident", "Plan", "check", "describe", "pending_refs", "policy_of"]
