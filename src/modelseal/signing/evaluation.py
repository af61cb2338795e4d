"""The trust decision over an artifact's commitments: one pure-ish function, ``evaluate``.

Given the commitments of the sealed files actually present, their headers and the
signature file, ``evaluate`` applies one trust policy: revocations (by artifact digest,
artifact id, signature and signer, on every path), the environment pin, each
signature's envelope and statement, the name pin, agreement of the valid signatures on
name and version, the policy's rules and thresholds, and the rollback floor. It reads
no artifact bytes (``verification`` does) and records nothing (the caller records an
accepted version once every policy passed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from modelseal.errors import FormatError, Revoked, VerificationError
from modelseal.format.envelope import artifact_id
from modelseal.format.file import RawArtifact
from modelseal.format.folder import MANIFEST_NAME
from modelseal.format.header import KIND_FILE, KIND_MANIFEST
from modelseal.signing.commitment import FILE_PATH, FileCommitment, artifact_digest
from modelseal.signing.revocation import RevocationList
from modelseal.signing.rollback import accepted_version, check_version
from modelseal.signing.sigfile import PAYLOAD_TYPE, Entry, SignatureFile, Statement
from modelseal.signing.signers import verify_envelope
from modelseal.signing.trust import TrustPolicy

VALID = "valid"
UNTRUSTED = "untrusted key"
BAD_SIGNATURE = "bad signature"
MISMATCH = "does not match the artifact (tampered, or copied from another artifact)"
REVOKED = "revoked"


@dataclass
class SignatureResult:
    id: str
    keyid: str
    signer: str | None
    status: str
    signed_at: str
    name: str
    version: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "keyid": self.keyid,
            "name": self.name,
            "signed_at": self.signed_at,
            "signer": self.signer,
            "status": self.status,
            "version": self.version,
        }


@dataclass
class Verdict:
    path: Path
    digest: str
    env: str
    signed: bool
    name: str | None = None
    signers: list[str] = field(default_factory=list)
    results: list[SignatureResult] = field(default_factory=list)
    tables: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    valid_entries: list[Entry] = field(default_factory=list)
    artifact_id: str = ""
    version: int = 0  # the signed artifact version (0: unsigned, or signed by an older release)

    @classmethod
    def pinned(cls, root: Path, commits: list[FileCommitment]) -> Verdict:
        """Not a trust decision: pins readers (``reader_check``) to these exact sealed
        bytes, e.g. to read the plaintext digests of what is about to be signed."""
        return cls(
            root,
            artifact_digest(commits),
            "",
            signed=True,
            tables={c.path: c.table for c in commits},
            headers={c.path: c.header for c in commits},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "artifact": str(self.path),
            "artifact_id": self.artifact_id,
            "digest": self.digest,
            "env": self.env,
            "name": self.name,
            "signed": self.signed,
            "signatures": [r.to_json() for r in self.results],
            "trusted_signers": self.signers,
            "version": self.version,
        }


def primary(raws: dict[str, RawArtifact]) -> RawArtifact:
    raw = raws.get(FILE_PATH) or raws.get(MANIFEST_NAME)
    if raw is None or raw.core.kind not in (KIND_FILE, KIND_MANIFEST):
        raise FormatError("not a sealed artifact")
    return raw


def env_of(raw: RawArtifact) -> str:
    return dict(raw.core.context).get("env", "")


def check_env(actual: str, expected: str | None, what: str) -> None:
    """The environment pin: ``what`` must be sealed for ``expected`` (when one is expected)."""
    if expected is not None and actual != expected:
        raise VerificationError(f"{what} is sealed for env {actual!r}, not the expected env {expected!r}")


def check_name_pin(policy: TrustPolicy, expect_name: str | None) -> None:
    """A policy with ``require_name`` needs the caller to say which name it expects."""
    if policy.require_name and expect_name is None:
        raise VerificationError(
            "the trust policy requires the expected artifact name (verify --name, expect_name=, expecting())"
        )


def _same_headers(st: Statement, actual: list[FileCommitment]) -> bool:
    """Whether the statement lists exactly these sealed files with these headers and sizes
    (the cheap half of ``Statement.matches``: no chunk hashed yet)."""
    if set(st.files) != {c.path for c in actual}:
        return False
    for c in actual:
        want = c.to_json()
        got = st.files[c.path]
        if got.get("header") != want["header"] or got.get("size") != want["size"]:
            return False
    return True


def _check_entry(
    e: Entry,
    policy: TrustPolicy,
    commits: list[FileCommitment],
    digest: str | None,
    rl: RevocationList | None,
) -> SignatureResult:
    st = e.statement
    res = SignatureResult(e.id, e.keyid, None, VALID, st.signed_at, st.name, st.version)
    found = policy.signer_of(e.keyid)
    if found is None:
        res.status = UNTRUSTED
        return res
    res.signer = found[0]
    matches = _same_headers(st, commits) if digest is None else st.digest == digest and st.matches(commits)
    if not verify_envelope(PAYLOAD_TYPE, st.raw, e.sigs, {found[1].key_id: found[1]}):
        res.status = BAD_SIGNATURE
    elif not matches:
        res.status = MISMATCH
    elif rl is not None and (rl.revoked("signature", e.id) or rl.revoked("signer", e.keyid)):
        res.status = REVOKED
    return res


def _check_revoked(rl: RevocationList | None, values: list[str]) -> None:
    for value in values:
        hit = rl.revoked("artifact", value) if rl is not None else None
        if hit is not None:
            raise Revoked(f"the artifact {value[:16]}... is revoked" + (f" ({hit.reason[:200]})" if hit.reason else ""))


def evaluate(
    root: Path,
    policy: TrustPolicy,
    sf: SignatureFile | None,
    commits: list[FileCommitment],
    raws: dict[str, RawArtifact],
    *,
    strict: bool | None = None,
    expect_name: str | None = None,
    expect_env: str | None = None,
    now: datetime | None = None,
    headers_only: bool = False,
) -> Verdict:
    """Apply the policy to an artifact whose sealed files have ``commits``.

    Revocation by artifact is checked first and on every path, signed or not, by
    both the artifact digest and the artifact id (SHA-256 of the primary header's
    binding: it depends on nothing in the signature file, so deleting that file
    cannot dodge a revocation). ``expect_name`` pins the signed name and
    ``expect_env`` the environment: without them, any artifact that satisfies the
    rules for *its own* name and environment is accepted.

    ``headers_only`` is the cheap first pass of a deep verification: ``commits`` carry
    no chunk tables, so statements are matched on paths, headers and sizes only and
    the digest is not known yet. Everything else is decided, so that an artifact that
    cannot pass fails before a single chunk is hashed.
    """
    check_name_pin(policy, expect_name)
    digest = None if headers_only else artifact_digest(commits)
    first = primary(raws)
    aid = artifact_id(first.core.binding)
    env = env_of(first)
    strict = policy.strict if strict is None else strict
    rl = policy.revocations(now)
    _check_revoked(rl, [aid] if digest is None else [digest, aid])
    check_env(env, expect_env, str(root))
    verdict = Verdict(root, digest or "", env, signed=bool(sf and sf.signatures), artifact_id=aid)
    if not verdict.signed:
        if strict or expect_name is not None:
            why = "the trust policy is strict" if strict else f"a signed {expect_name!r} is expected"
            raise VerificationError(f"{root} is not signed, and {why}")
        return verdict
    assert sf is not None
    verdict.results = [_check_entry(e, policy, commits, digest, rl) for e in sf.signatures]
    good = [(r, e) for r, e in zip(verdict.results, sf.signatures, strict=True) if r.status == VALID]
    names = {r.name for r, _ in good}
    if len(names) > 1:
        raise VerificationError(f"valid signatures disagree on the artifact's name: {', '.join(sorted(names))}")
    versions = sorted({r.version for r, _ in good})
    if len(versions) > 1:
        raise VerificationError(f"valid signatures disagree on the artifact's version: {', '.join(map(str, versions))}")
    revoked = [r for r in verdict.results if r.status == REVOKED]
    if not good:
        raise _failure(verdict.results, revoked)
    verdict.name, verdict.version = names.pop(), versions[0]
    if expect_name is not None and verdict.name != expect_name:
        raise VerificationError(f"the artifact is signed as {verdict.name!r}, not the expected {expect_name!r}")
    verdict.signers = check_rules(policy, verdict.name, env, {r.signer for r, _ in good if r.signer}, len(revoked))
    floor = max(policy.min_version_for(verdict.name, env), accepted_version(policy.identity(), env, verdict.name))
    check_version(verdict.version, floor, verdict.name, env)
    verdict.valid_entries = [e for _, e in good]
    return verdict


def check_rules(policy: TrustPolicy, name: str, env: str, signers: set[str], revoked: int = 0) -> list[str]:
    """Every rule covering (name, env) must be met by distinct valid signers."""
    rules = policy.rules_for(name, env)
    if not rules:
        raise VerificationError(f"no rule of the trust policy covers artifact {name!r} in env {env!r}")
    for rule in rules:
        have = signers & set(rule.signers)
        if len(have) < rule.threshold:
            msg = (
                f"{name!r} needs {rule.threshold} of the signers {', '.join(rule.signers)};"
                f" valid signatures from {len(have)}"
            )
            if revoked:
                raise Revoked(msg + f" ({revoked} signature(s) revoked)")
            raise VerificationError(msg)
    return sorted(signers)


def _failure(results: list[SignatureResult], revoked: list[SignatureResult]) -> VerificationError:
    if revoked:
        return Revoked(f"every trusted signature on the artifact is revoked ({len(revoked)})")
    statuses = sorted({r.status for r in results})
    return VerificationError(f"no valid signature: {len(results)} signature(s), {'; '.join(statuses)}")
