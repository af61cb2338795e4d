"""Signed revocation lists, and the highest list version this host has seen (docs/signing.md).

A revocation list is a DSSE envelope over a JSON document with a version, an issue and
an expiry time, and entries revoking a signature id, a signer key id or an artifact
digest. A missing, unsigned, forged, malformed or expired list is a
``RevocationListError``: never a silent pass. Which keys may sign it, and how many, is
the trust policy's (``trust``); this module knows no policy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from modelseal.errors import RevocationListError
from modelseal.format.file import canonical_json
from modelseal.signing.signers import Signer, VerifyKey, parse_envelope, sign_envelope, verify_envelope
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited, write_atomic
from modelseal.util.versions import VersionRecord, record_path

REVOCATION_PAYLOAD_TYPE = "application/vnd.modelseal.revocations+json"
REVOCATION_FORMAT = "modelseal-revocations/v1"
REVOCATION_KINDS = ("signature", "signer", "artifact")
MAX_REVOCATIONS = 8 << 20
# Bounds checked before the JSON parser runs (util.bounded): what each document can hold.
_ENVELOPE_DEPTH, _ENVELOPE_VALUES = 3, 256  # {"signatures": [{...}]}: 16 signatures at most
_PAYLOAD_DEPTH = 3  # {"entries": [{...}]}
_PAYLOAD_VALUES = MAX_REVOCATIONS // 16  # an entry takes five values and well over 80 bytes
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _ts(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_ts(text: Any, what: str) -> datetime:
    try:
        return datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise RevocationListError(f"the revocation list's {what} is not a UTC timestamp") from None


@dataclass(frozen=True)
class Revocation:
    kind: str  # signature | signer | artifact
    value: str  # signature id, signer key id, or artifact digest (64 hex)
    reason: str
    revoked_at: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "reason": self.reason, "revoked_at": self.revoked_at, "value": self.value}


@dataclass
class RevocationList:
    version: int
    issued_at: datetime
    expires_at: datetime
    entries: list[Revocation]
    _index: dict[tuple[str, str], Revocation] | None = field(default=None, init=False, repr=False, compare=False)

    def revoked(self, kind: str, value: str) -> Revocation | None:
        # An index, not a scan: a verification looks up every signature, and a list may
        # hold many thousand entries.
        if self._index is None:
            self._index = {}
            for e in self.entries:
                self._index.setdefault((e.kind, e.value), e)
        return self._index.get((kind, value))

    def payload(self) -> bytes:
        return canonical_json(
            {
                "entries": [e.to_json() for e in self.entries],
                "expires_at": _ts(self.expires_at),
                "format": REVOCATION_FORMAT,
                "issued_at": _ts(self.issued_at),
                "version": self.version,
            }
        )

    @classmethod
    def parse_payload(cls, payload: bytes) -> RevocationList:
        try:
            doc = json_loads(payload, max_depth=_PAYLOAD_DEPTH, max_values=_PAYLOAD_VALUES, error=ValueError)
            if doc["format"] != REVOCATION_FORMAT or set(doc) != {
                "entries",
                "expires_at",
                "format",
                "issued_at",
                "version",
            }:
                raise ValueError
            version = doc["version"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError
            entries = []
            for e in doc["entries"]:
                if set(e) != {"kind", "reason", "revoked_at", "value"} or e["kind"] not in REVOCATION_KINDS:
                    raise ValueError
                if not isinstance(e["value"], str) or not _HEX64.fullmatch(e["value"]):
                    raise ValueError
                if not isinstance(e["reason"], str):
                    raise ValueError
                _parse_ts(e["revoked_at"], "revoked_at")
                entries.append(Revocation(e["kind"], e["value"], e["reason"], e["revoked_at"]))
        except (ValueError, KeyError, TypeError):
            raise RevocationListError("the revocation list is malformed") from None
        issued, expires = _parse_ts(doc["issued_at"], "issued_at"), _parse_ts(doc["expires_at"], "expires_at")
        return cls(version, issued, expires, entries)

    @classmethod
    def load(
        cls,
        path: Path,
        keys: dict[str, VerifyKey],
        threshold: int = 1,
        now: datetime | None = None,
        owners: dict[str, str] | None = None,
        check_time: bool = True,
    ) -> RevocationList:
        """Read, authenticate and check the freshness of a revocation list. ``owners``
        maps key ids to signer names: the threshold counts distinct signers."""
        try:
            data = read_limited(path, MAX_REVOCATIONS, RevocationListError, f"the revocation list {path}")
        except FileNotFoundError:
            raise RevocationListError(f"the revocation list {path} is missing") from None
        try:
            envelope = json_loads(data, max_depth=_ENVELOPE_DEPTH, max_values=_ENVELOPE_VALUES, error=ValueError)
            payload, sigs = parse_envelope(envelope, REVOCATION_PAYLOAD_TYPE)
        except ValueError:
            raise RevocationListError("the revocation list is not a signed list (DSSE envelope)") from None
        good_keys = {k.key_id for k, _ in verify_envelope(REVOCATION_PAYLOAD_TYPE, payload, sigs, keys)}
        good = {(owners or {}).get(kid, kid) for kid in good_keys}
        if len(good) < threshold:
            raise RevocationListError(
                f"the revocation list is not signed by {threshold} trusted revocation signer(s): forged or unsigned"
            )
        rl = cls.parse_payload(payload)
        if not check_time:
            return rl
        now = now or datetime.now(UTC)
        if rl.expires_at <= now:
            raise RevocationListError(f"the revocation list expired at {_ts(rl.expires_at)}: refresh and re-sign it")
        if rl.issued_at > now + timedelta(minutes=5):
            raise RevocationListError("the revocation list is issued in the future")
        return rl

    def sign(self, *signers: Signer) -> bytes:
        """The list as a DSSE envelope signed by every signer (for a threshold above 1)."""
        payload = self.payload()
        env = sign_envelope(signers[0], REVOCATION_PAYLOAD_TYPE, payload)
        for extra in signers[1:]:
            env["signatures"] += sign_envelope(extra, REVOCATION_PAYLOAD_TYPE, payload)["signatures"]
        return json.dumps(env, indent=1, sort_keys=True).encode() + b"\n"


def write_list(path: Path, rl: RevocationList, *signers: Signer) -> None:
    write_atomic(path, rl.sign(*signers), mode=0o644)


# The highest list version this host has seen, per list path (util.versions).
_SEEN = VersionRecord("revocation-state.json")


def _state_key(list_path: Path) -> str:
    # One key however the folder is spelled; the list's own name is not resolved, so a
    # symlink swapped in at that name does not get a fresh, empty record.
    return record_path(list_path)


def seen_version(list_path: Path) -> int:
    return _SEEN.seen(_state_key(list_path))


def record_version(list_path: Path, version: int) -> None:
    """Remember the highest version seen, where this host keeps state (best effort:
    a host without $MODELSEAL_HOME relies on the policy's min_version)."""
    _SEEN.record(_state_key(list_path), version)


def new_revocation(kind: str, value: str, reason: str) -> Revocation:
    if kind not in REVOCATION_KINDS:
        raise ValueError(f"revocation kind must be one of {', '.join(REVOCATION_KINDS)}")
    if not _HEX64.fullmatch(value):
        raise ValueError(f"a revoked {kind} is named by 64 lowercase hex digits")
    return Revocation(kind, value, reason, _ts(datetime.now(UTC)))
