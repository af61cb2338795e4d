"""Artifact versions against rollback (docs/signing.md, "Versions and rollback").

A statement carries a monotonic version per artifact name (``sigfile.Statement.version``;
0 for statements of older releases). This module owns the host's record of the highest
version it accepted per (trust policy, environment, name), the floor a verification must
meet (that record, or a policy rule's ``min_version``, whichever is higher), and the
version a signer gives a new signature when none is given. The records themselves are
``util.versions``'; what a policy says is ``trust``'s.
"""

from __future__ import annotations

import json

from modelseal.errors import VerificationError
from modelseal.signing.commitment import FileCommitment, artifact_digest
from modelseal.signing.sigfile import PAYLOAD_TYPE, Entry, SignatureFile
from modelseal.signing.signers import Signer, verify_envelope
from modelseal.util.versions import VersionRecord

_ACCEPTED = VersionRecord("artifact-state.json")
_SIGNED = VersionRecord("signing-state.json")


def _key(*parts: str) -> str:
    return json.dumps(list(parts), separators=(",", ":"))


def accepted_version(policy: str, env: str, name: str) -> int:
    """The highest version of ``name`` in ``env`` this host has accepted under the trust
    policy whose identity is ``policy`` (``TrustPolicy.identity``)."""
    return _ACCEPTED.seen(_key(policy, env, name))


def check_version(version: int, floor: int, name: str, env: str) -> None:
    if version < floor:
        raise VerificationError(
            f"{name!r} (env {env!r}) is signed as version {version}, older than version {floor}"
            " this host requires or has accepted: rolled back"
        )


def remember_accepted(policy: str, env: str, name: str, version: int) -> None:
    _ACCEPTED.record(_key(policy, env, name), version)


def remember_signed(signer: Signer, env: str, name: str, version: int) -> None:
    _SIGNED.record(_key(signer.public.key_id, env, name), version)


def _own(entries: list[Entry], signer: Signer) -> list[Entry]:
    """This signer's own entries whose signature verifies (never someone else's claims)."""
    mine = {signer.public.key_id: signer.public}
    return [
        e
        for e in entries
        if e.keyid == signer.public.key_id and verify_envelope(PAYLOAD_TYPE, e.statement.raw, e.sigs, mine)
    ]


def default_version(sf: SignatureFile, signer: Signer, name: str, env: str, commits: list[FileCommitment]) -> int:
    """The version a new signature gets when the caller names none.

    Re-signing the very same files keeps this signer's version for them. Otherwise it is
    one more than the highest version this signer gave ``name`` in ``env``, in this
    artifact's signature file (current and history) or on this host. Versions are never
    taken from other keys' entries (anyone can write those); where such entries sign
    these files under another version, the signer must say which version it vouches for.
    """
    digest = artifact_digest(commits)

    def same_files(e: Entry) -> bool:
        return e.statement.name == name and e.statement.digest == digest and e.statement.matches(commits)

    current = [e for e in _own(sf.signatures, signer) if same_files(e)]
    if current:
        return max(e.statement.version for e in current)
    mine = [e for e in _own([*sf.signatures, *sf.history], signer) if e.statement.name == name]
    same_env = [e.statement.version for e in mine if e.statement.context.get("env", "") == env]
    version = 1 + max([*same_env, _SIGNED.seen(_key(signer.public.key_id, env, name))])
    claimed = sorted({e.statement.version for e in sf.signatures if e.keyid != signer.public.key_id and same_files(e)})
    if claimed and claimed != [version]:
        raise ValueError(
            f"other keys sign these files as version {', '.join(map(str, claimed))} of {name!r}, and this key"
            f" would sign version {version}: pass the version explicitly (--version N) to co-sign"
        )
    return version
