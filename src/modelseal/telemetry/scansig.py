"""Whether a sealed artifact's signatures hold, from its primary header alone (``modelseal
scan``): signed, unsigned, signed but not as the trust policy requires, or revoked.

What a signature commits to (``signing.commitment``): for each sealed file the BLAKE3 of its
core header (which pins the data key through the key commitment) and of its chunk table. A
scan reads headers only, so it decides what the headers decide, with the very evaluation
``modelseal verify`` runs before it hashes a chunk (``signing.evaluation.evaluate``,
``headers_only``): revocations (artifact id, signature, signer), each envelope under the
policy's keys, the statement naming this header and file length at the artifact's primary
path (``.`` for a lone file, ``manifest.mseal`` for a folder, whose encrypted manifest pins
every blob; the folder's other files are taken as the statement lists them), agreement of the
valid signatures on name and version, the rules (signers, threshold), ``min_version`` and
this host's rollback floor, for every policy of the chain. What it leaves out is the chunk
tables (``modelseal verify`` hashes them; every verified read checks them again). Under a
policy with ``require_name`` the scan has no expected name to give: each artifact is judged
under the name its signatures agree on (a note says so).

Without a trust policy a signature still has to verify against the public key it carries:
a forged or damaged one is untrusted; one that verifies is counted as present, unverified.
A revocation list that cannot be used (missing, expired, forged, rolled back) fails closed:
every artifact judged under it is untrusted, as ``verify`` refuses it.

Each signature file is parsed once per scan (by its digest), and each verdict kept for the
same header and signature files (a registry's manifests repeat layers).
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from modelseal.errors import ModelsealError, Revoked, VerificationError
from modelseal.format.envelope import artifact_id
from modelseal.format.file import RawArtifact
from modelseal.keys.service import printable
from modelseal.signing.commitment import FileCommitment, header_digest
from modelseal.signing.evaluation import evaluate
from modelseal.signing.revocation import RevocationList
from modelseal.signing.sigfile import PAYLOAD_TYPE, Entry, SignatureFile
from modelseal.signing.signers import VerifyKey, verify_envelope
from modelseal.signing.trust import TrustPolicy

SIGNED, UNVERIFIED, UNSIGNED, UNTRUSTED, REVOKED = "signed", "unverified", "unsigned", "untrusted", "revoked"
_CACHE = 4096  # verdicts and parsed signature files kept
_VARIANTS = 4  # distinct lists of a folder's other files tried among the signatures


@dataclass(frozen=True)
class SignatureVerdict:
    status: str  # SIGNED, UNVERIFIED (no trust policy), UNSIGNED, UNTRUSTED or REVOKED
    detail: str


class TrustCheck:
    """Judges artifacts under ``policy`` (None: no trust policy in force), each revocation
    list loaded once per scan."""

    def __init__(
        self,
        policy: TrustPolicy | None,
        *,
        now: datetime | None = None,
        note: Callable[[str], None] = lambda _text: None,
    ) -> None:
        self.policy = policy
        self.now = now
        self._note = note
        self._pinned: dict[int, TrustPolicy | str] = {}  # policy -> a copy with its list loaded, or why not
        self._parsed: OrderedDict[bytes, SignatureFile | str] = OrderedDict()
        self._verdicts: OrderedDict[tuple[str, str, tuple[bytes, ...]], SignatureVerdict] = OrderedDict()

    def _policy(self, p: TrustPolicy) -> TrustPolicy | str:
        """``p`` with its revocation list loaded once (evaluate asks for it per artifact), or
        why the list cannot be used."""
        key = id(p)
        if key not in self._pinned:
            try:
                rl = p.revocations(self.now)
            except (ModelsealError, ValueError, OSError) as e:  # RevocationListError: missing, expired, forged
                why = f"the revocation list cannot be used ({printable(str(e))[:200]}): verify refuses every artifact"
                self._note(why)
                self._pinned[key] = why
            else:
                pinned = copy.copy(p)

                def loaded(now: datetime | None = None, rl: RevocationList | None = rl) -> RevocationList | None:
                    del now
                    return rl

                setattr(pinned, "revocations", loaded)  # noqa: B010 (a method replaced on this copy only)
                self._pinned[key] = pinned
            if p.require_name:
                self._note("the trust policy requires an expected name: each artifact is judged under its signed name")
        return self._pinned[key]

    def parse(self, data: bytes) -> SignatureFile | str:
        """The signature file ``data`` (parsed once per scan), or why it does not parse."""
        key = hashlib.sha256(data).digest()
        found = self._parsed.get(key)
        if found is None:
            try:
                found = SignatureFile.parse(data)
            except VerificationError as err:
                found = f"the signature file is unreadable ({printable(str(err))[:160]})"
            _remember(self._parsed, key, found)
        return found

    def judge_any(self, raw: RawArtifact, rel: str, sigfiles: list[bytes]) -> SignatureVerdict:
        """The best verdict among the signature files ``sigfiles`` (as a pull chooses: the
        first that verifies; else revoked if any is; else the newest's reason)."""
        key = (header_digest(raw), rel, tuple(hashlib.sha256(d).digest() for d in sigfiles))
        found = self._verdicts.get(key)
        if found is not None:
            return found
        verdicts = [self.judge(raw, rel, data) for data in sigfiles] or [self.judge(raw, rel, None)]
        best = next(
            (v for status in (SIGNED, UNVERIFIED, REVOKED, UNTRUSTED) for v in verdicts if v.status == status),
            verdicts[0],
        )
        _remember(self._verdicts, key, best)
        return best

    def judge(self, raw: RawArtifact, rel: str, sigfile: bytes | None) -> SignatureVerdict:
        """The verdict on the artifact whose primary sealed file (at artifact path ``rel``)
        has the header ``raw``, with the signature file ``sigfile`` (None: there is none)."""
        policies: list[TrustPolicy] = []
        for p in self.policy.chain() if self.policy is not None else []:
            pinned = self._policy(p)
            if isinstance(pinned, str):
                return SignatureVerdict(UNTRUSTED, pinned)
            policies.append(pinned)
        entries, why, status = self._entries(sigfile, raw, rel)
        if not entries:
            aid = artifact_id(raw.core.binding)
            for p in policies:  # revoked by its id: on every path, signed or not
                rl = p.revocations(self.now)
                hit = rl.revoked("artifact", aid) if rl is not None else None
                if hit is not None:
                    return SignatureVerdict(REVOKED, f"the artifact id {aid[:16]}... is revoked{_why(hit.reason)}")
            return SignatureVerdict(status, why)
        if not policies:
            return _self_verified(entries)
        best: SignatureVerdict | None = None
        for commits in _variants(entries, raw, rel):
            verdict = _evaluate(policies, entries, commits, raw, rel, self.now)
            if verdict.status == SIGNED:
                return verdict
            if best is None or (verdict.status == REVOKED and best.status != REVOKED):
                best = verdict
        assert best is not None
        return best

    def _entries(self, sigfile: bytes | None, raw: RawArtifact, rel: str) -> tuple[list[Entry], str, str]:
        """The signatures of ``sigfile`` whose statement names the header ``raw`` at ``rel``;
        when there are none, why, and whether that is UNSIGNED (no signature at all) or
        UNTRUSTED (signature material that does not hold for these bytes)."""
        if sigfile is None:
            return [], "no signature file", UNSIGNED
        sf = self.parse(sigfile)
        if isinstance(sf, str):
            return [], sf, UNTRUSTED
        if not sf.signatures:
            return [], "the signature file holds no current signature", UNSIGNED
        digest, size = header_digest(raw), raw.layout.file_length
        out = []
        for e in sf.signatures:
            f = e.statement.files.get(rel)
            header = f.get("header") if isinstance(f, dict) else None
            if isinstance(header, dict) and header.get("blake3") == digest and f is not None and f.get("size") == size:
                out.append(e)
        if not out:
            why = f"its {len(sf.signatures)} signature(s) sign other bytes (re-encrypted, replaced or tampered since)"
            return [], why, UNTRUSTED
        return out, "", UNTRUSTED


def _remember(cache: OrderedDict, key: object, value: object) -> None:  # type: ignore[type-arg]
    cache[key] = value
    if len(cache) > _CACHE:
        cache.popitem(last=False)


def _why(reason: str) -> str:
    return f" ({printable(reason)[:160]})" if reason else ""


def _self_verified(entries: list[Entry]) -> SignatureVerdict:
    """Without a trust policy: the signatures that verify against the public key they carry."""
    good = 0
    for e in entries:
        try:
            key = VerifyKey.from_pem(e.public_key.encode()) if e.public_key else None
        except ModelsealError:
            key = None
        if key is not None and key.key_id == e.keyid:
            good += bool(verify_envelope(PAYLOAD_TYPE, e.statement.raw, e.sigs, {key.key_id: key}))
    if not good:
        return SignatureVerdict(
            UNTRUSTED, f"{len(entries)} signature(s) that do not verify even against the keys they carry (forged?)"
        )
    return SignatureVerdict(UNVERIFIED, f"{good} signature(s) verify against the keys they carry; no trust policy")


def _variants(entries: list[Entry], raw: RawArtifact, rel: str) -> list[list[FileCommitment]]:
    """The commitments to judge against: the primary header's, with a folder's other files
    as the signatures list them (a few distinct lists at most)."""
    primary = FileCommitment(rel, header_digest(raw), "", raw.layout.file_length, b"")
    out: list[list[FileCommitment]] = []
    seen: set[tuple[tuple[str, str, int], ...]] = set()
    for e in entries:
        others = _others(e, rel)
        if others is None or others in seen:
            continue
        seen.add(others)
        out.append([primary, *(FileCommitment(path, header, "", size, b"") for path, header, size in others)])
        if len(out) >= _VARIANTS:
            break
    return out or [[primary]]


def _others(e: Entry, rel: str) -> tuple[tuple[str, str, int], ...] | None:
    """(path, header digest, size) of the files the statement lists besides ``rel``."""
    out = []
    for path, f in e.statement.files.items():
        if path == rel:
            continue
        header, size = f.get("header"), f.get("size")
        digest = header.get("blake3") if isinstance(header, dict) else None
        if not isinstance(digest, str) or not isinstance(size, int):
            return None
        out.append((path, digest, size))
    return tuple(sorted(out))


def _evaluate(
    policies: list[TrustPolicy],
    entries: list[Entry],
    commits: list[FileCommitment],
    raw: RawArtifact,
    rel: str,
    now: datetime | None,
) -> SignatureVerdict:
    sf = SignatureFile(signatures=entries)
    names = {e.statement.name for e in entries}
    for p in policies:
        # require_name: a scan has no expected name; the one the signatures agree on stands in
        expect = names.copy().pop() if p.require_name and len(names) == 1 else None
        try:
            evaluate(Path(rel), p, sf, commits, {rel: raw}, expect_name=expect, now=now, headers_only=True)
        except Revoked as e:
            return SignatureVerdict(REVOKED, printable(str(e))[:240])
        except VerificationError as e:
            return SignatureVerdict(UNTRUSTED, printable(str(e))[:240])
        except ModelsealError as e:  # a policy file that cannot be read now
            return SignatureVerdict(UNTRUSTED, f"not verifiable: {printable(str(e))[:200]}")
    return SignatureVerdict(SIGNED, f"signed as {printable(', '.join(sorted(names)))[:120]}")


__all__ = ["REVOKED", "SIGNED", "UNSIGNED", "UNTRUSTED", "UNVERIFIED", "SignatureVerdict", "TrustCheck"]
