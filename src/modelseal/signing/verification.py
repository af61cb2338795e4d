"""Keyless verification of sealed artifacts against a trust policy, and signing them.

``verify_artifact`` needs no decryption key: it hashes the sealed bytes (or,
for a loader, only the headers, leaving the chunks to be checked as they are
read), checks each signature's DSSE envelope, that its statement commits to
exactly these sealed files, the revocation list, and the policy's rules and
thresholds. ``add_signature`` appends a signature to an artifact's signature
file, moving signatures that no longer match (after an update) to history.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from modelseal.errors import DecryptionError, FormatError, Revoked, VerificationError
from modelseal.format.envelope import artifact_id
from modelseal.format.file import RawArtifact, read_raw
from modelseal.format.folder import MANIFEST_NAME
from modelseal.format.header import KIND_FILE, KIND_MANIFEST, CoreHeader
from modelseal.format.source import CipherSource, FdSource
from modelseal.format.stream import CHUNK_HASH_LEN
from modelseal.signing.commitment import (
    FILE_PATH,
    FileCommitment,
    artifact_digest,
    commit,
    hash_artifact,
    hash_chunks,
    header_digest,
    member_path,
    sealed_members,
)
from modelseal.signing.revocation import RevocationList
from modelseal.signing.sigfile import (
    PAYLOAD_TYPE,
    Entry,
    SignatureFile,
    Statement,
    now_rfc3339,
    sign_statement,
    signature_path,
)
from modelseal.signing.signers import Signer, verify_envelope
from modelseal.signing.trust import TrustPolicy
from modelseal.util.files import open_regular

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

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "keyid": self.keyid,
            "name": self.name,
            "signed_at": self.signed_at,
            "signer": self.signer,
            "status": self.status,
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
        }


def _read_header(path: Path, rel: str) -> RawArtifact:
    src = FdSource(open_regular(path))
    try:
        return read_raw(src)
    except (DecryptionError, FormatError):
        raise VerificationError(f"{rel}: not a sealed file, or its header is damaged or truncated") from None
    finally:
        src.close()


def _lazy_commitments(root: Path, sf: SignatureFile) -> tuple[list[FileCommitment], dict[str, RawArtifact]]:
    """Commitments from the real headers and the signature file's chunk tables; the
    chunks themselves are checked later, as readers read them."""
    commits: list[FileCommitment] = []
    raws: dict[str, RawArtifact] = {}
    for rel in sealed_members(root):
        raw = _read_header(member_path(root, rel), rel)
        table = sf.chunks.get(rel)
        if table is None or len(table) != CHUNK_HASH_LEN * raw.layout.count:
            raise VerificationError(f"the signature file has no chunk table for {rel}")
        commits.append(commit(rel, raw, table))
        raws[rel] = raw
    return commits, raws


def _primary(raws: dict[str, RawArtifact]) -> RawArtifact:
    raw = raws.get(FILE_PATH) or raws.get(MANIFEST_NAME)
    if raw is None or raw.core.kind not in (KIND_FILE, KIND_MANIFEST):
        raise FormatError("not a sealed artifact")
    return raw


def _check_entry(
    e: Entry, policy: TrustPolicy, commits: list[FileCommitment], digest: str, rl: RevocationList | None
) -> SignatureResult:
    res = SignatureResult(e.id, e.keyid, None, VALID, e.statement.signed_at, e.statement.name)
    found = policy.signer_of(e.keyid)
    if found is None:
        res.status = UNTRUSTED
        return res
    res.signer = found[0]
    if not verify_envelope(PAYLOAD_TYPE, e.statement.raw, e.sigs, {found[1].key_id: found[1]}):
        res.status = BAD_SIGNATURE
    elif e.statement.digest != digest or not e.statement.matches(commits):
        res.status = MISMATCH
    elif rl is not None and (rl.revoked("signature", e.id) or rl.revoked("signer", e.keyid)):
        res.status = REVOKED
    return res


def evaluate(
    root: Path,
    policy: TrustPolicy,
    sf: SignatureFile | None,
    commits: list[FileCommitment],
    raws: dict[str, RawArtifact],
    *,
    strict: bool | None = None,
    expect_name: str | None = None,
    now: datetime | None = None,
) -> Verdict:
    """Apply the policy to an artifact whose sealed files have ``commits``.

    Revocation by artifact is checked first and on every path, signed or not, by
    both the artifact digest and the artifact id (SHA-256 of the primary header's
    binding: it depends on nothing in the signature file, so deleting that file
    cannot dodge a revocation). ``expect_name`` pins the signed name: without it,
    any artifact that satisfies the rules for *its own* name is accepted.
    """
    if policy.require_name and expect_name is None:
        raise VerificationError(
            "the trust policy requires the expected artifact name (verify --name, expect_name=, expecting())"
        )
    digest = artifact_digest(commits)
    primary = _primary(raws)
    aid = artifact_id(primary.core.binding)
    env = dict(primary.core.context).get("env", "")
    strict = policy.strict if strict is None else strict
    rl = policy.revocations(now)
    for value in (digest, aid):
        hit = rl.revoked("artifact", value) if rl is not None else None
        if hit is not None:
            raise Revoked(f"the artifact {value[:16]}... is revoked" + (f" ({hit.reason[:200]})" if hit.reason else ""))
    verdict = Verdict(root, digest, env, signed=bool(sf and sf.signatures), artifact_id=aid)
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
    revoked = [r for r in verdict.results if r.status == REVOKED]
    if not good:
        raise _failure(verdict.results, revoked)
    verdict.name = names.pop()
    if expect_name is not None and verdict.name != expect_name:
        raise VerificationError(f"the artifact is signed as {verdict.name!r}, not the expected {expect_name!r}")
    verdict.signers = check_rules(policy, verdict.name, env, {r.signer for r, _ in good if r.signer}, len(revoked))
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


def verify_artifact(
    path: str | Path,
    policy: TrustPolicy,
    *,
    signature: str | Path | None = None,
    strict: bool | None = None,
    deep: bool = True,
    expect_name: str | None = None,
    now: datetime | None = None,
) -> Verdict:
    """Verify the sealed artifact at ``path`` keylessly. ``deep`` hashes every ciphertext
    chunk; otherwise the chunk tables are returned in the verdict for readers to check."""
    root = Path(path)
    if not root.exists():
        raise FormatError(f"{root} does not exist")
    sf = SignatureFile.load(Path(signature) if signature else signature_path(root))
    if sf is None or not sf.signatures:
        full = deep or _hash_unsigned(policy, strict, expect_name)
        commits, raws = hash_artifact(root) if full else _headers_only(root)
        return evaluate(root, policy, sf, commits, raws, strict=strict, expect_name=expect_name, now=now)
    commits, raws = hash_artifact(root) if deep else _lazy_commitments(root, sf)
    verdict = evaluate(root, policy, sf, commits, raws, strict=strict, expect_name=expect_name, now=now)
    verdict.tables = {c.path: c.table for c in commits}
    verdict.headers = {c.path: c.header for c in commits}
    return verdict


def verify_single(
    label: str,
    src: CipherSource,
    raw: RawArtifact,
    sf: SignatureFile | None,
    policy: TrustPolicy,
    *,
    expect_name: str | None = None,
) -> Verdict:
    """Verify one sealed file read from anywhere (an fsspec backend): its header and
    the signature file's chunk table; the chunks are checked as they are read. An
    unsigned file that may still pass is hashed in full when revocations apply (as in
    ``verify_artifact``), so a revoked digest is recognised without its signature file."""
    if sf is None or not sf.signatures:
        full = hash_chunks(src, raw) if _hash_unsigned(policy, None, expect_name) else b""
        commits = [commit(FILE_PATH, raw, full)]
        return evaluate(Path(label), policy, sf, commits, {FILE_PATH: raw}, expect_name=expect_name)
    table = sf.chunks.get(FILE_PATH)
    if table is None or len(table) != CHUNK_HASH_LEN * raw.layout.count:
        raise VerificationError(f"the signature file of {label} has no chunk table for it")
    c = commit(FILE_PATH, raw, table)
    verdict = evaluate(Path(label), policy, sf, [c], {FILE_PATH: raw}, expect_name=expect_name)
    verdict.tables, verdict.headers = {FILE_PATH: table}, {FILE_PATH: c.header}
    return verdict


def reader_check(verdict: Verdict | None) -> Callable[[str, RawArtifact], bytes | None]:
    """For a reader opening sealed file ``rel``: check that its header is the one that
    was verified (it may have been swapped since) and return its signed chunk table."""

    def check(rel: str, raw: RawArtifact) -> bytes | None:
        if verdict is None or not verdict.signed:
            return None
        want = verdict.headers.get(rel)
        if want is None or not hmac.compare_digest(header_digest(raw), want):
            raise VerificationError(f"{rel} changed after it was verified")
        return verdict.tables[rel]

    return check


def _hash_unsigned(policy: TrustPolicy, strict: bool | None, expect_name: str | None) -> bool:
    """Whether an unsigned artifact must be hashed in full even on load: when it may still
    pass (a lenient policy) and revocations apply, so that a revoked artifact digest is
    recognised with the signature file deleted (the artifact id is checked either way)."""
    refused = (policy.strict if strict is None else strict) or expect_name is not None
    return policy.revocation is not None and not refused


def _headers_only(root: Path) -> tuple[list[FileCommitment], dict[str, RawArtifact]]:
    """For an unsigned artifact: enough to name it (digest over headers, no chunk tables)."""
    raws = {rel: _read_header(member_path(root, rel), rel) for rel in sealed_members(root)}
    return [commit(rel, raw, b"") for rel, raw in raws.items()], raws


def add_signature(
    root: Path,
    signer: Signer,
    name: str,
    commits: list[FileCommitment],
    core: CoreHeader,
    *,
    attach: Any = None,
) -> Entry:
    """Sign the artifact whose sealed files have ``commits``; append to its signature file.

    Existing signatures that no longer match the artifact (it was updated and is
    being re-signed) move to ``history`` with the time they were superseded.
    ``attach(entry)`` may add the encrypted OMS attachment before saving.
    """
    kind = "file" if core.kind == KIND_FILE else "folder"
    statement = Statement.build(name, kind, dict(core.context), commits, artifact_digest(commits))
    entry = sign_statement(signer, statement)
    if attach is not None:
        attach(entry)
    path = signature_path(root)
    sf = SignatureFile.load(path) or SignatureFile()
    digest = artifact_digest(commits)
    keep: list[Entry] = []
    for old in sf.signatures:
        if old.statement.digest == digest and old.statement.matches(commits):
            keep.append(old)
        else:
            old.superseded_at = now_rfc3339()
            sf.history.append(old)
    sf.signatures = [*keep, entry]
    sf.chunks = {c.path: c.table for c in commits}
    sf.save(path)
    return entry
