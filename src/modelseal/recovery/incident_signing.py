"""Signatures in a key-compromise incident: what is superseded, the re-sign, the revocation.

Before an artifact is re-encrypted its current signatures are checked under the trust policy
(deep: every chunk hashed), so only an artifact whose signature vouches for exactly these
ciphertext bytes is re-signed: the re-encryption decrypts those very chunks (each
authenticated) and re-seals the same plaintext, and the new signature vouches for that. An
artifact whose signature does not verify stops the incident: re-signing it would launder it.

The new signature keeps the artifact's signed name and takes the next version (one more than
any superseded one), so a verifier's rollback floor accepts it and refuses the old copy. The
superseded signature ids go into the trust policy's revocation list in one new version of it,
signed by the revocation signers given (the list must be authentic and current first, as
``modelseal revoke`` requires: re-signing a list an attacker emptied would launder it).

The keys given are checked before anything is written: ``check_signers`` (in the plan) wants
every ``--sign-key`` to be a key of a signer the policy's rules accept, and the
``--revocation-key`` ones to be revocation signers meeting the list's threshold; ``extend``
builds the new list in memory and loads it back with the policy's keys before it replaces
the file, and only then records its version as seen. A list nobody accepts would fail every
verification under the policy (and the version recorded would refuse the old list back).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from modelseal.errors import IncidentError, RevocationListError, VerificationError
from modelseal.keys.service import KeyService
from modelseal.recipes.sign import sign
from modelseal.signing.revocation import REVOCATION_PAYLOAD_TYPE, RevocationList, new_revocation
from modelseal.signing.sigfile import SignatureFile, signature_path
from modelseal.signing.signers import Signer, parse_envelope, verify_envelope
from modelseal.signing.trust import TrustPolicy
from modelseal.signing.verification import VALID, verify_artifact
from modelseal.util.bounded import json_loads
from modelseal.util.files import write_atomic

DEFAULT_VALIDITY = timedelta(days=30)


def current(path: Path) -> list[dict[str, Any]]:
    """The artifact's current signatures: id, name, version, key id (no trust decision)."""
    sf = SignatureFile.load(signature_path(path))
    if sf is None:
        return []
    return [
        {"id": e.id, "name": e.statement.name, "version": e.statement.version, "keyid": e.keyid} for e in sf.signatures
    ]


def check_superseded(path: Path, policy: TrustPolicy) -> tuple[list[dict[str, Any]], str, int]:
    """Verify the artifact's signatures under ``policy`` before they are superseded; returns
    them, the signed name and the version the new signature takes."""
    sigs = current(path)
    if not sigs:
        raise VerificationError(f"{path} has no current signature to supersede")
    name = str(sigs[0]["name"])
    verdict = verify_artifact(path, policy, deep=True, expect_name=name)
    if not verdict.signed or verdict.name is None:
        raise VerificationError(f"{path}: its signatures do not verify under the trust policy")
    version = 1 + max(int(s["version"]) for s in sigs if s["name"] == verdict.name)
    return sigs, verdict.name, version


def signed_by(path: Path, signer: Signer, name: str, version: int) -> str | None:
    """The id of ``signer``'s current signature of ``name`` at ``version``, if a run that
    crashed made it already (so a resumed run does not sign twice)."""
    for s in current(path):
        if s["keyid"] == signer.public.key_id and s["name"] == name and s["version"] == version:
            return str(s["id"])
    return None


def resign(path: Path, signer: Signer, name: str, version: int, svc: KeyService) -> str:
    return signed_by(path, signer, name, version) or sign(path, signer, name=name, version=version, keys=svc)


def check_new(path: Path, policy: TrustPolicy, signatures: Sequence[str], *, deep: bool = True) -> None:
    """The artifact verifies under the policy (``deep``: every chunk hashed) and each new
    signature is one of the valid ones."""
    verdict = verify_artifact(path, policy, deep=deep)
    valid = {r.id for r in verdict.results if r.status == VALID}
    for signature in signatures:
        if signature not in valid:
            raise VerificationError(f"{path}: the new signature {signature[:16]} is not among the valid ones")


def check_signers(policy: TrustPolicy, sign_keys: Sequence[Signer], revocation_keys: Sequence[Signer]) -> list[str]:
    """Why these keys would not do (the plan's blockers): a signing key the policy's rules do
    not accept, a revocation key that is not a revocation signer, or too few of them."""
    out = []
    ruled = {name for r in policy.rules for name in r.signers}
    for s in sign_keys:
        owner = policy.signer_of(s.public.key_id)
        if owner is None:
            what = "is not a key of the trust policy's signers"
        elif owner[0] not in ruled:
            what = f"is of the signer {owner[0]}, which no rule of the trust policy accepts"
        else:
            continue
        out.append(f"resign: --sign-key {s.public.key_id[:16]} {what}: the new signatures would not verify")
    if policy.revocation is not None and revocation_keys:
        keys, owners = policy.revocation_keys()
        names = {owners[s.public.key_id] for s in revocation_keys if s.public.key_id in keys}
        for s in revocation_keys:
            if s.public.key_id not in keys:
                signers = ", ".join(policy.revocation.signers)
                out.append(f"revoke-signatures: --revocation-key {s.public.key_id[:16]} is not a key of the "
                           f"revocation list's signers ({signers}): nobody would accept the list")  # fmt: skip
        if len(names) < policy.revocation.threshold:
            out.append(f"revoke-signatures: the --revocation-key given are of {len(names)} revocation signer(s); the "
                       f"list needs {policy.revocation.threshold}")  # fmt: skip
    return out


def _accepted(policy: TrustPolicy, data: bytes, version: int) -> None:
    """The signed list ``data`` is one the policy accepts: its revocation signers' signatures
    reach the threshold and it is the version built (as ``RevocationList.load`` checks a file)."""
    assert policy.revocation is not None
    keys, owners = policy.revocation_keys()
    try:
        envelope = json_loads(data, max_depth=3, max_values=256, error=ValueError)
        payload, sigs = parse_envelope(envelope, REVOCATION_PAYLOAD_TYPE)
    except ValueError:
        raise IncidentError("revoke-signatures: the new revocation list is not a signed list") from None
    good = {owners.get(k.key_id, k.key_id) for k, _ in verify_envelope(REVOCATION_PAYLOAD_TYPE, payload, sigs, keys)}
    if len(good) < policy.revocation.threshold or RevocationList.parse_payload(payload).version != version:
        raise IncidentError(
            "revoke-signatures: the trust policy would not accept the list the --revocation-key given sign (signed by "
            f"{len(good)} of the {policy.revocation.threshold} revocation signer(s) it needs): the list is left as is"
        )


def revocation_list(policy: TrustPolicy) -> Path:
    if policy.revocation is None:
        raise IncidentError(
            "revoke-signatures: the trust policy has no [revocation] list, so superseded signatures cannot be "
            "revoked; add one (docs/signing.md) and run the incident again"
        )
    return policy.revocation.list_path


def extend(policy: TrustPolicy, signers: Sequence[Signer], ids: Sequence[str], reason: str) -> int | None:
    """Add every id of ``ids`` not listed yet to the policy's revocation list as one new
    version; returns that version (None: all were listed already, nothing written)."""
    path = revocation_list(policy)
    assert policy.revocation is not None
    if not signers:
        raise IncidentError("revoke-signatures: give the revocation list's signing key(s) with --revocation-key")
    old: RevocationList | None = None
    if path.exists() or path.is_symlink():
        keys, owners = policy.revocation_keys()
        old = RevocationList.load(path, keys, policy.revocation.threshold, owners=owners, check_time=False)
        policy.check_version(old)
        if old.expires_at <= datetime.now(UTC):
            raise RevocationListError(
                f"{path} has expired: check it is the newest list and refresh it (modelseal revoke "
                "--refresh-expired), then run the incident again"
            )
    entries = list(old.entries) if old else []
    listed = {e.value for e in entries if e.kind == "signature"}
    fresh = [i for i in dict.fromkeys(ids) if i not in listed]
    if not fresh:
        return None
    entries += [new_revocation("signature", i, reason) for i in fresh]
    now = datetime.now(UTC).replace(microsecond=0)
    validity = max(old.expires_at - old.issued_at, timedelta(days=1)) if old else DEFAULT_VALIDITY
    version = max((old.version + 1) if old else 1, policy.version_floor())
    rl = RevocationList(version, now, now + validity, entries)
    data = rl.sign(*signers)
    _accepted(policy, data, rl.version)  # before the file is replaced or the version recorded
    write_atomic(path, data, mode=0o644)  # as signing.revocation.write_list writes it
    policy.remember_version(rl.version)
    return rl.version


def current_list(policy: TrustPolicy) -> RevocationList:
    """The policy's revocation list, authenticated and fresh (read once for a whole step)."""
    revocation_list(policy)
    rl = policy.revocations()
    assert rl is not None
    return rl


def unrevoked(rl: RevocationList, ids: Sequence[str]) -> list[str]:
    """The ids of ``ids`` the revocation list ``rl`` does not revoke."""
    return [i for i in ids if rl.revoked("signature", i) is None]


__all__ = [
    "check_new",
    "check_signers",
    "check_superseded",
    "current",
    "current_list",
    "extend",
    "resign",
    "revocation_list",
    "signed_by",
    "unrevoked",
]
