"""The encryption standards as Cedar decisions over the facts of one artifact.

``ArtifactFacts`` is what a standard can judge: the environment the check is made for and
the one the artifact was sealed for, its recipients (schemes, key ids, versions), the age
of its oldest KEK version (when known), its valid signatures against the trust policy's
threshold (when a trust policy is in force). Facts come from a sealed header the server
received (``facts_from_header``: no key, no signature file), from a sealed file or folder
on disk (``facts_of``: signatures verified keylessly under the trust policy, KEK ages from
``KeyService.info`` for the keys config.toml lists), or from the keys about to be used
(``facts_for_keys``, at seal time). ``check`` asks the engine about ``artifact.*`` on the
artifact and returns a ``Report``: one ``Finding`` per standard. Recipient key ids read
from an artifact are data: they are only compared with the operator's own keys, never
used to choose one.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from modelseal.errors import DecryptionError, FormatError, ModelsealError, StandardViolation, VerificationError
from modelseal.format.envelope import artifact_id
from modelseal.format.file import read_raw
from modelseal.format.folder import MANIFEST_NAME
from modelseal.format.header import KIND_BLOB, CoreHeader, Recipient, parse_core, parse_slot
from modelseal.format.source import FdSource
from modelseal.governance.cedar import Engine, PolicySet
from modelseal.governance.model import Decision, Principal, Request, Resource
from modelseal.keys.providers import parse_key_uri
from modelseal.keys.service import KeyService
from modelseal.signing.trust import TrustPolicy
from modelseal.signing.verification import verify_artifact
from modelseal.util.files import open_regular

DAY = 86400.0
LOCAL_IDENTITY = "spiffe://local/{env}/user/modelseal"  # the caller of a check made on this host
KekCreated = Callable[[Recipient], float | None]


@dataclass(frozen=True)
class ArtifactFacts:
    env: str  # the environment the check is made for (the server's, or the artifact's own)
    artifact_env: str  # the ``env`` of the artifact's encryption context
    recipients: tuple[str, ...]  # "scheme:key_id#version", for reports
    schemes: frozenset[str]
    kek_age_days: int | None = None  # the oldest KEK version's age; None: unknown
    signatures: int = 0  # distinct valid signers (of the rule with the largest shortfall)
    threshold: int = 0  # what the trust policy requires of that rule
    has_trust: bool = False  # a trust policy is in force: the signature standard applies
    artifact_id: str = ""
    name: str | None = None  # the signed name, when verified
    signature_problem: str = ""  # why verification refused the artifact, one line

    @property
    def has_local(self) -> bool:
        return "local" in self.schemes

    def attrs(self) -> dict[str, object]:
        """The Cedar attributes of the ``Artifact`` resource."""
        out: dict[str, object] = {
            "env": self.env,
            "artifact_env": self.artifact_env,
            "recipients": list(self.recipients),
            "schemes": sorted(self.schemes),
            "has_local": self.has_local,
            "signatures": self.signatures,
            "threshold": self.threshold,
            "has_trust": self.has_trust,
            "artifact_id": self.artifact_id,
        }
        if self.kek_age_days is not None:
            out["kek_age_days"] = self.kek_age_days
        if self.name is not None:
            out["name"] = self.name
        return out


def _age_days(created: Iterable[float | None], now: float) -> int | None:
    known = [c for c in created if c]
    return max(int((now - c) // DAY) for c in known) if known else None


def _recipients(slots: Sequence[bytes]) -> list[Recipient]:
    """Every recipient of either slot that parses: a slot's MAC needs the data key, so an
    unverified slot counts too (after a completed rewrap the old slot is zeroed; two live
    slots both open the artifact)."""
    seen: dict[tuple[str, str, int], Recipient] = {}
    for raw in slots:
        try:
            slot = parse_slot(raw)
        except DecryptionError:
            continue
        for r in slot.recipients if slot is not None else ():
            seen.setdefault((r.scheme, r.key_id, r.key_version), r)
    return list(seen.values())


def _facts(
    core: CoreHeader,
    slots: Sequence[bytes],
    env: str | None,
    kek_created: KekCreated | None,
    now: float,
) -> ArtifactFacts:
    if core.kind == KIND_BLOB:
        raise FormatError("a blob header has no recipients: check the sealed file's or the manifest's header")
    recipients = _recipients(slots)
    sealed_env = dict(core.context).get("env", "")
    created = [kek_created(r) for r in recipients] if kek_created is not None else []
    return ArtifactFacts(
        env=env or sealed_env,
        artifact_env=sealed_env,
        recipients=tuple(sorted(f"{r.scheme}:{r.key_id}#{r.key_version}" for r in recipients)),
        schemes=frozenset(r.scheme for r in recipients),
        kek_age_days=_age_days(created, now),
        artifact_id=artifact_id(core.binding),
    )


def facts_from_header(
    raw: bytes,
    env: str,
    *,
    kek_created: KekCreated | None = None,
    signatures: int | None = None,
    threshold: int | None = None,
    now: float | None = None,
) -> ArtifactFacts:
    """Server side: the facts of a pushed sealed file (or folder manifest) from the first
    bytes of its blob, the core header and both slots (``FormatError`` when truncated).
    ``env`` is the server's environment: a prod registry judges what it holds by the prod
    rules, whatever environment the artifact claims. ``kek_created`` gives the creation
    time of a recipient's KEK version when the server knows it (the broker's own keys);
    ``signatures`` and ``threshold`` when the server has verified the signatures."""
    core = parse_core(raw)
    if core.kind == KIND_BLOB:
        raise FormatError("a blob header has no recipients: check the sealed file's or the manifest's header")
    n, start = core.slot_size, core.slots_offset
    if len(raw) < start + 2 * n:
        raise FormatError("the header's recipient slots are missing (send the first bytes through both slots)")
    slots = (raw[start : start + n], raw[start + n : start + 2 * n])
    facts = _facts(core, slots, env, kek_created, time.time() if now is None else now)
    if signatures is None or threshold is None:
        return facts
    return _with(facts, signatures=signatures, threshold=threshold, has_trust=True)


def _with(f: ArtifactFacts, **changes: object) -> ArtifactFacts:
    return replace(f, **changes)  # type: ignore[arg-type]


def configured_keys(svc: KeyService) -> list[str]:
    cfg = svc.config
    keys = [k for ks in cfg.environments.values() for k in ks]
    keys += [k for per_env in cfg.projects.values() for ks in per_env.values() for k in ks]
    return list(dict.fromkeys(keys))


def kek_lookup(svc: KeyService, keys: Iterable[str] | None = None) -> KekCreated:
    """The creation time of a recipient's KEK version, asked of the provider only for a
    key the operator names (``keys``, default config.toml's) whose identity is the
    recipient's; anything else, or any failure, is unknown."""
    canon: dict[str, str] | None = None

    def created(r: Recipient) -> float | None:
        nonlocal canon
        if canon is None:
            canon = {}
            for k in configured_keys(svc) if keys is None else keys:
                try:
                    canon.setdefault(svc.canonical(k), k)
                except (ModelsealError, ValueError):
                    continue
        try:
            uri = canon.get(svc.recipient_identity(r))
            if uri is None:
                return None
            info = svc.info(uri)
        except (ModelsealError, ValueError):
            return None
        return next((v.created for v in info.versions if v.version == r.key_version), None)

    return created


def _primary(root: Path) -> Path:
    if not root.exists():
        raise FormatError(f"{root} does not exist")
    return root / MANIFEST_NAME if root.is_dir() else root


def _signature_facts(root: Path, policy: TrustPolicy, sealed_env: str) -> dict[str, object]:
    """Distinct valid signers against the threshold of the trust policy's rules, from a
    keyless, deep verification (``signing.verification``: every chunk hashed). A refused
    verification is a shortfall, with the verifier's reason."""
    try:
        v = verify_artifact(root, policy, deep=True)
    except VerificationError as e:
        needed = [
            r.threshold
            for p in policy.chain()
            for r in p.rules
            if any(fnmatch.fnmatchcase(sealed_env, e) for e in r.environments)
        ]
        why = " ".join(str(e).split())[:300]
        return {"signatures": 0, "threshold": max([1, *needed]), "has_trust": True, "signature_problem": why}
    if not v.signed or v.name is None:
        return {"signatures": 0, "threshold": 0, "has_trust": True}
    rules = [r for p in policy.chain() for r in p.rules_for(v.name, v.env)]
    worst = max(rules, key=lambda r: r.threshold - len(set(v.signers) & set(r.signers)), default=None)
    have = len(set(v.signers) & set(worst.signers)) if worst is not None else len(v.signers)
    return {"signatures": have, "threshold": worst.threshold if worst else 0, "has_trust": True, "name": v.name}


def facts_of(
    path: str | Path,
    svc: KeyService,
    policy: TrustPolicy | None,
    env: str | None = None,
    *,
    now: float | None = None,
) -> ArtifactFacts:
    """Client side: the facts of the sealed file or folder at ``path``, for ``env``
    (default: the environment it was sealed for)."""
    root = Path(path)
    src = FdSource(open_regular(_primary(root)))
    try:
        raw = read_raw(src)
    except (DecryptionError, FormatError):
        raise FormatError(f"{root}: not a sealed artifact, or its header is damaged") from None
    finally:
        src.close()
    facts = _facts(raw.core, raw.slots, env, kek_lookup(svc), time.time() if now is None else now)
    if policy is None:
        return facts
    return _with(facts, **_signature_facts(root, policy, facts.artifact_env))


def facts_for_keys(svc: KeyService, key_uris: Sequence[str], env: str, *, now: float | None = None) -> ArtifactFacts:
    """Seal time: the artifact about to be sealed for ``env`` to ``key_uris`` (each KEK's
    latest version, whose age the provider reports where it can). Signatures come later,
    so the signature standard is not judged here."""
    t = time.time() if now is None else now
    created: list[float | None] = []
    for k in key_uris:
        try:
            info = svc.info(k)
            created.append(max(info.versions, key=lambda v: v.version).created)
        except (ModelsealError, ValueError):
            created.append(None)
    schemes = frozenset(parse_key_uri(k).scheme for k in key_uris)
    return ArtifactFacts(env, env, tuple(key_uris), schemes, kek_age_days=_age_days(created, t))


# -- the check -------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    standard: str  # a standard's name, or the id of another policy that denied
    status: str  # "ok", "violation", "waived", "denied"
    reason: str = ""
    detail: str = ""

    def line(self) -> str:
        text = f"{self.status} {self.standard}"
        if self.reason:
            text += f": {self.reason}"
        return text + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class Report:
    decision: Decision
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.decision.allowed

    def summary(self) -> str:
        bad = [f.line() for f in self.findings if f.status in ("violation", "denied")]
        return "; ".join(bad) or self.decision.reason


def _detail(standard: str, f: ArtifactFacts, context: Mapping[str, object]) -> str:
    if standard == "std-prod-kms":
        return f"sealed for {f.artifact_env or '?'} to {', '.join(f.recipients) or 'no recipient'}"
    if standard == "std-cryptoperiod":
        return "KEK age unknown" if f.kek_age_days is None else f"oldest KEK version {f.kek_age_days} days old"
    if standard == "std-signatures":
        base = f"{f.signatures} of {f.threshold} required signers" if f.has_trust else "no trust policy in force"
        return base + (f": {f.signature_problem}" if f.signature_problem else "")
    if standard == "std-tls13":
        return f"TLS {context.get('tls_version') or 'not in use'}"
    return ""


def check(
    facts: ArtifactFacts,
    engine: Engine,
    action: str = "artifact.check",
    context: Mapping[str, object] | None = None,
) -> Report:
    """Decide ``action`` on the artifact, by a caller on this host, and report each standard."""
    ctx = dict(context or {})
    who = Principal(LOCAL_IDENTITY.format(env=facts.env), facts.env, "user", "local")
    resource = Resource("Artifact", facts.artifact_id or "artifact", facts.attrs())
    req = Request(who, action, resource, ctx)
    decision = engine.decide(req)
    base = decision
    if decision.exception is not None:  # what the standards alone say, before the exception
        base = Engine(engine.policies.main_only()).decide(req)
    return Report(decision, tuple(_findings(engine.policies, decision, base, facts, ctx)))


def _findings(
    ps: PolicySet, final: Decision, base: Decision, facts: ArtifactFacts, ctx: Mapping[str, object]
) -> list[Finding]:
    out: list[Finding] = []
    fired = set(base.policies) if not base.allowed else set()
    waived = next((e.waives for e in ps.exceptions if e.id == final.exception), frozenset())
    for std in sorted(ps.standards):
        ids = ps.standards[std]
        hit = [i for i in ids if i in fired]
        reason = "; ".join(ps.policies[i].reason for i in hit)
        detail = _detail(std, facts, ctx)
        if not hit:
            out.append(Finding(std, "ok", "", detail))
        elif final.allowed and std in waived:
            out.append(Finding(std, "waived", f"by exception {final.exception}", detail))
        else:
            out.append(Finding(std, "violation", reason, detail))
    for pid in sorted(fired - {i for ids in ps.standards.values() for i in ids}):
        out.append(Finding(pid, "denied", ps.policies[pid].reason if pid in ps.policies else ""))
    if not final.allowed and not base.policies:
        out.append(Finding("default-deny", "denied", final.reason))
    for exc_id in final.expired:
        exc = next(e for e in ps.exceptions if e.id == exc_id)
        out.append(Finding(exc_id, "expired", f"exception expired at {exc.expires_text}"))
    return out


def enforce(report: Report, what: str) -> None:
    """Raise ``StandardViolation`` (exit 8) unless the report allows."""
    if not report.ok:
        raise StandardViolation(f"{what} breaks the encryption standards: {report.summary()}")


__all__ = [
    "ArtifactFacts",
    "Finding",
    "KekCreated",
    "Report",
    "check",
    "configured_keys",
    "enforce",
    "facts_for_keys",
    "facts_from_header",
    "facts_of",
    "kek_lookup",
]
