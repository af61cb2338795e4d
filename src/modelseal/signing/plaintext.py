"""A plaintext model's OpenSSF model-signing signature, held to the whole trust policy
(docs/signing.md, "OMS to modelseal").

Only ever on request (``verify --plaintext``): a caller that expects a sealed artifact
never ends up here because of what a path contains. ``oms`` checks the bundle and the
files; this module applies the policy: the verifying key must belong to a signer of
every policy in force, every revocation kind applies (the signer's key id; the
signature id, ``SHA-256(keyid || 0x00 || statement)`` as for sealed artifacts; and the
model digest, the bundle's subject digest, as an artifact), the rules for the signed
name (a plaintext model has no environment), the name pin, and ``strict``: no file the
signature leaves out. Model-signing statements carry no version, so rollback
protection needs sealed artifacts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from modelseal.errors import Revoked, VerificationError
from modelseal.signing import oms
from modelseal.signing.evaluation import check_rules
from modelseal.signing.signers import key_id_of
from modelseal.signing.trust import TrustPolicy


@dataclass(frozen=True)
class PlainVerdict:
    path: Path
    name: str
    files: int
    unlisted: list[str]
    digest: str  # the model digest (subject of the bundle): what `revoke --artifact` names
    keyid: str
    signature_id: str
    signers: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "files": self.files,
            "keyid": self.keyid,
            "model": str(self.path),
            "name": self.name,
            "signature_id": self.signature_id,
            "trusted_signers": self.signers,
            "unlisted": self.unlisted,
        }


def signature_id(keyid: str, statement: bytes) -> str:
    return hashlib.sha256(keyid.encode() + b"\x00" + statement).hexdigest()


def verify_plaintext(
    model: Path,
    bundle: Path,
    *,
    policy: TrustPolicy | None = None,
    keys: list[ec.EllipticCurvePublicKey] | None = None,
    strict: bool = False,
    allow_unlisted: bool = False,
    expect_name: str | None = None,
    expect_env: str | None = None,
    now: datetime | None = None,
) -> PlainVerdict:
    """Verify ``bundle`` over the plaintext ``model`` with ``keys`` (any of them, nothing
    else), or under ``policy`` (and every policy it also requires)."""
    if strict and allow_unlisted:
        raise ValueError("strict verification refuses files the signature does not list: drop --allow-unlisted")
    if expect_env is not None:
        raise VerificationError(
            f"{model} is a plaintext model: it has no environment, and env {expect_env!r} is expected"
        )
    policies = policy.chain() if policy is not None else []
    if expect_name is None and any(p.require_name for p in policies):
        raise VerificationError("the trust policy requires the expected artifact name: pass --name")
    if keys is None:
        keys = [
            k.key for p in policies for k in p.keys_by_id().values() if isinstance(k.key, ec.EllipticCurvePublicKey)
        ]
    lists = [p.revocations(now) for p in policies]  # a missing or stale list fails before any hashing
    res = oms.verify_model(model, bundle, keys, allow_unlisted=allow_unlisted)
    if expect_name is not None and res.name != expect_name:
        raise VerificationError(f"the model is signed as {res.name!r}, not the expected {expect_name!r}")
    kid = key_id_of(res.key)
    sid = signature_id(kid, res.payload)
    signers: set[str] = set()
    for p, rl in zip(policies, lists, strict=True):
        owner = p.signer_of(kid)
        if owner is None:
            raise VerificationError("model-signing signature: the verifying key belongs to no signer")
        for kind, value in (("artifact", res.digest), ("signature", sid), ("signer", kid)):
            if rl is not None and rl.revoked(kind, value):
                raise Revoked(f"model-signing signature: the {kind} {value[:16]} is revoked")
        check_rules(p, res.name, "", {owner[0]})
        signers.add(owner[0])
    return PlainVerdict(model, res.name, res.files, res.unlisted, res.digest, kid, sid, sorted(signers))
