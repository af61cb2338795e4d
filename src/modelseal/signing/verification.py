"""Keyless verification of sealed artifacts against a trust policy, and signing them.

``verify_artifact`` needs no decryption key: it hashes the sealed bytes (or,
for a loader, only the headers, leaving the chunks to be checked as they are
read) and has ``evaluation.evaluate`` decide: each signature's DSSE envelope,
that its statement commits to exactly these sealed files, the revocation list,
the name and environment pins, the policy's rules and thresholds, and the
rollback floor. A deep verification decides everything it can from the headers
first, so an artifact that cannot pass fails before its chunks are hashed. The
version of an accepted artifact is recorded for this host once every policy in
force has passed. ``add_signature`` appends a signature to an artifact's
signature file, moving signatures that no longer match (after an update, or at
another version) to history.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, ParamSpec

from modelseal.errors import DecryptionError, FormatError, RevocationListError, Revoked, VerificationError
from modelseal.format.file import RawArtifact, read_raw
from modelseal.format.header import KIND_FILE, CoreHeader
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
from modelseal.signing.evaluation import (
    BAD_SIGNATURE,
    MISMATCH,
    REVOKED,
    UNTRUSTED,
    VALID,
    SignatureResult,
    Verdict,
    check_env,
    check_name_pin,
    check_rules,
    env_of,
    evaluate,
    primary,
)
from modelseal.signing.rollback import default_version, remember_accepted, remember_signed
from modelseal.signing.sigfile import (
    Entry,
    SignatureFile,
    Statement,
    now_rfc3339,
    sign_statement,
    signature_path,
)
from modelseal.signing.signers import Signer
from modelseal.signing.trust import TrustPolicy
from modelseal.util import observe
from modelseal.util.files import open_regular

__all__ = [
    "BAD_SIGNATURE",
    "MISMATCH",
    "REVOKED",
    "UNTRUSTED",
    "VALID",
    "SignatureResult",
    "Verdict",
    "add_signature",
    "check_env",
    "check_rules",
    "evaluate",
    "reader_check",
    "verify_artifact",
    "verify_single",
]


P = ParamSpec("P")


def _result_of(e: BaseException) -> str:
    """The ``modelseal_signature_verifications_total`` result of a refused verification."""
    if isinstance(e, Revoked):
        return "revoked"
    if isinstance(e, RevocationListError) or not isinstance(e, VerificationError):
        return "error"  # the check could not be made: no list, an unreadable artifact
    text = str(e)
    if " is not signed, and " in text:
        return "missing"
    if text.startswith("no valid signature:") and text.split(", ", 1)[-1] == UNTRUSTED:
        return "untrusted"  # every signature sound, none by a trusted key
    if " of the signers " in text or text.startswith("no rule of the trust policy covers"):
        return "untrusted"
    return "invalid"


def _observed(fn: Callable[P, Verdict]) -> Callable[P, Verdict]:
    """Report each verification's result (``util.observe``, kind ``signature``)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> Verdict:
        try:
            verdict = fn(*args, **kwargs)
        except Exception as e:
            observe.note("signature", _result_of(e))
            raise
        observe.note("signature", "verified" if verdict.signed else "missing")
        return verdict

    return run


def _read_header(path: Path, rel: str) -> RawArtifact:
    src = FdSource(open_regular(path))
    try:
        return read_raw(src)
    except (DecryptionError, FormatError):
        raise VerificationError(f"{rel}: not a sealed file, or its header is damaged or truncated") from None
    finally:
        src.close()


def check_tables(sf: SignatureFile, commits: list[FileCommitment]) -> None:
    """The signature file's ``chunks`` (section 11.3) of a signed artifact: exactly one
    table per sealed file, each equal to the table of the chunks as stored. A deep
    verification hashed them all, so it can tell; a table that is missing or wrong would
    make every verified read of that file fail, so the artifact is refused now rather
    than passing ``verify`` and failing on load."""
    if set(sf.chunks) != {c.path for c in commits}:
        raise VerificationError("the signature file's chunk tables do not list exactly the artifact's sealed files")
    for c in commits:
        if not hmac.compare_digest(sf.chunks[c.path], c.table):
            raise VerificationError(f"the signature file's chunk table for {c.path} does not match the sealed file")


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


@_observed
def verify_artifact(
    path: str | Path,
    policy: TrustPolicy,
    *,
    signature: str | Path | None = None,
    strict: bool | None = None,
    deep: bool = True,
    expect_name: str | None = None,
    expect_env: str | None = None,
    now: datetime | None = None,
) -> Verdict:
    """Verify the sealed artifact at ``path`` keylessly. ``deep`` hashes every ciphertext
    chunk; otherwise the chunk tables are returned in the verdict for readers to check.
    ``expect_name`` and ``expect_env`` pin the signed name and the sealed environment.
    Every policy of ``policy.chain()`` must pass."""
    root = Path(path)
    if not root.exists():
        raise FormatError(f"{root} does not exist")
    sf = SignatureFile.load(Path(signature) if signature else signature_path(root))
    pins: dict[str, Any] = {"strict": strict, "expect_name": expect_name, "expect_env": expect_env, "now": now}
    policies = policy.chain()
    if sf is None or not sf.signatures:
        return _verify_unsigned(root, policies, sf, deep, pins)
    if deep:
        # Everything the headers can decide, before the work of hashing every chunk.
        heads = _headers_only(root)
        for p in policies:
            evaluate(root, p, sf, *heads, headers_only=True, **pins)
    commits, raws = hash_artifact(root) if deep else _lazy_commitments(root, sf)
    verdict = _decide(root, policies, sf, commits, raws, pins, tables=lambda: check_tables(sf, commits))
    verdict.tables = {c.path: c.table for c in commits}
    verdict.headers = {c.path: c.header for c in commits}
    return verdict


def _verify_unsigned(
    root: Path, policies: list[TrustPolicy], sf: SignatureFile | None, deep: bool, pins: dict[str, Any]
) -> Verdict:
    """An artifact without signatures. Whatever needs no hash is decided first, for every
    policy: the name pins, the environment pin, a revoked artifact id, and refusal as
    unsigned (strict, or a name expected). Chunks are hashed only where the digest can
    still matter: when a revocation list applies (it may revoke the digest: an allowed
    artifact is then refused, a refused one reported as revoked, exit 11, on a deep
    verification), or when a deep verification is to report the digest of an artifact
    it allows."""
    heads = _headers_only(root)
    for p in policies:
        check_name_pin(p, pins["expect_name"])
    check_env(env_of(primary(heads[1])), pins["expect_env"], str(root))
    listed = any(p.revocation is not None for p in policies)
    try:
        for p in policies:
            evaluate(root, p, sf, *heads, headers_only=True, **pins)
    except (Revoked, RevocationListError):
        raise
    except VerificationError:
        if not (deep and listed):
            raise
        full = True  # refused either way; hashed only to tell a revoked digest (exit 11)
    else:
        full = deep or listed
    commits, raws = hash_artifact(root) if full else heads
    return _decide(root, policies, sf, commits, raws, pins)


def _decide(
    root: Path,
    policies: list[TrustPolicy],
    sf: SignatureFile | None,
    commits: list[FileCommitment],
    raws: dict[str, RawArtifact],
    pins: dict[str, Any],
    tables: Callable[[], None] | None = None,
) -> Verdict:
    """Every policy decides on the same commitments; the first one's verdict is returned,
    and the accepted version is recorded only once all of them passed (and ``tables``,
    the check of the signature file's chunk tables, passed too)."""
    verdicts = [evaluate(root, p, sf, commits, raws, **pins) for p in policies]
    first = verdicts[0]
    if len({(v.name, v.version) for v in verdicts}) > 1:
        raise VerificationError("the trust policies in force accept this artifact under different names or versions")
    if tables is not None:
        tables()
    if first.signed and first.name is not None:
        for p in policies:
            remember_accepted(p.identity(), first.env, first.name, first.version)
    return first


@_observed
def verify_single(
    label: str,
    src: CipherSource,
    raw: RawArtifact,
    sf: SignatureFile | None,
    policy: TrustPolicy,
    *,
    expect_name: str | None = None,
    expect_env: str | None = None,
) -> Verdict:
    """Verify one sealed file read from anywhere (an fsspec backend): its header and
    the signature file's chunk table; the chunks are checked as they are read. An
    unsigned file that may still pass is hashed in full when revocations apply (as in
    ``verify_artifact``), so a revoked digest is recognised without its signature file."""
    pins: dict[str, Any] = {"expect_name": expect_name, "expect_env": expect_env}
    policies = policy.chain()
    if sf is None or not sf.signatures:
        check_env(dict(raw.core.context).get("env", ""), expect_env, label)  # before any hashing
        hashed = any(_hash_unsigned(p, None, expect_name) for p in policies)
        commits = [commit(FILE_PATH, raw, hash_chunks(src, raw) if hashed else b"")]
        return _decide(Path(label), policies, sf, commits, {FILE_PATH: raw}, pins)
    table = sf.chunks.get(FILE_PATH)
    if table is None or len(table) != CHUNK_HASH_LEN * raw.layout.count:
        raise VerificationError(f"the signature file of {label} has no chunk table for it")
    c = commit(FILE_PATH, raw, table)
    verdict = _decide(Path(label), policies, sf, [c], {FILE_PATH: raw}, pins, tables=lambda: check_tables(sf, [c]))
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
    """Whether an unsigned file must be hashed in full even on load: when it may still
    pass (a lenient policy) and revocations apply, so that a revoked artifact digest is
    recognised with the signature file deleted (the artifact id is checked either way)."""
    refused = (policy.strict if strict is None else strict) or expect_name is not None
    return policy.revocation is not None and not refused


def _headers_only(root: Path) -> tuple[list[FileCommitment], dict[str, RawArtifact]]:
    """Enough to name an artifact and match statements on headers (no chunk tables)."""
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
    version: int | None = None,
) -> Entry:
    """Sign the artifact whose sealed files have ``commits`` as ``version`` of ``name``
    (default: ``rollback.default_version``); append to its signature file.

    Existing signatures that no longer match the artifact (it was updated and is
    being re-signed), or that sign it under another version, move to ``history``
    with the time they were superseded. ``attach(entry)`` may add the encrypted OMS
    attachment before saving.
    """
    kind = "file" if core.kind == KIND_FILE else "folder"
    context = dict(core.context)
    env = context.get("env", "")
    path = signature_path(root)
    sf = SignatureFile.load(path) or SignatureFile()
    if version is None:
        version = default_version(sf, signer, name, env, commits)
    digest = artifact_digest(commits)
    statement = Statement.build(name, kind, context, commits, digest, version)
    entry = sign_statement(signer, statement)
    if attach is not None:
        attach(entry)
    keep: list[Entry] = []
    for old in sf.signatures:
        if old.statement.digest == digest and old.statement.matches(commits) and old.statement.version == version:
            keep.append(old)
        else:
            old.superseded_at = now_rfc3339()
            sf.history.append(old)
    sf.signatures = [*keep, entry]
    sf.chunks = {c.path: c.table for c in commits}
    sf.save(path)
    remember_signed(signer, env, name, version)
    return entry
