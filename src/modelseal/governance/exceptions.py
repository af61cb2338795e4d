"""Exceptions to the encryption standards: justified, owned, approved, expiring waivers.

An exception is a Cedar ``permit`` in the policy text that carries ``@exception("ID")``
and the annotations ``@waives("std-a[,std-b]")``, ``@justification``, ``@owner``,
``@approved_by`` and ``@expires`` (RFC 3339, UTC). It is kept out of the main policy set:
``governance.cedar.Engine`` consults it only for a request that the main set denied and
whose every deciding forbid is a ``@standard`` one waived by the exception; a waiver of
anything else (separation of duties, the environment boundary, MFA, two-person) is refused
when the policy is parsed. This module parses and evaluates exceptions; it never decides
a request alone and keeps no state.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import cedarpy

from modelseal.errors import GovernanceError

REQUIRED = ("waives", "justification", "owner", "approved_by", "expires")
MAX_ANNOTATION = 400
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)")


def check_id(value: str, what: str) -> str:
    if not _ID.fullmatch(value):
        raise GovernanceError(f"{what} {value[:80]!r} is not 1-128 of A-Z, a-z, 0-9, '.', '_', ':' and '-'")
    return value


def check_text(value: str, what: str) -> str:
    """An annotation that reaches a one-line reason or an audit record: printable, short."""
    if not value.strip() or len(value) > MAX_ANNOTATION or not value.isprintable():
        raise GovernanceError(f"{what} must be 1-{MAX_ANNOTATION} printable characters on one line")
    return value


def parse_expiry(text: str, what: str) -> float:
    """``2027-01-31T00:00:00Z`` (or ``+00:00``) as POSIX seconds; any other zone is refused,
    so that no reader has to guess which local time an expiry meant."""
    if not _RFC3339_UTC.fullmatch(text):
        raise GovernanceError(f"{what}: @expires {text[:40]!r} is not RFC 3339 in UTC (2027-01-31T00:00:00Z)")
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise GovernanceError(f"{what}: @expires {text[:40]!r} is not a valid date and time") from None


def utc_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class PolicyException:
    """One parsed exception. ``handle`` holds its permit alone, evaluated over the very
    request and entities the main set denied."""

    id: str
    policy_id: str
    waives: frozenset[str]
    justification: str
    owner: str
    approved_by: str
    expires: float
    handle: Any  # cedarpy.PolicySet (untyped extension object)

    @property
    def expires_text(self) -> str:
        return utc_text(self.expires)

    def expired(self, now: float) -> bool:
        return now >= self.expires

    def covers(self, standards: frozenset[str]) -> bool:
        return bool(standards) and standards <= self.waives

    def matches(self, request: Mapping[str, Any], entities: Any) -> bool:
        """Whether the exception's permit matches. An evaluation error is no match (an
        exception that cannot be evaluated waives nothing)."""
        r = cedarpy.is_authorized(dict(request), self.handle, entities)  # a permit alone: allowed = matched
        return bool(r.allowed) and not r.diagnostics.errors

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "policy": self.policy_id,
            "waives": sorted(self.waives),
            "justification": self.justification,
            "owner": self.owner,
            "approved_by": self.approved_by,
            "expires": self.expires_text,
        }


def parse_exception(policy_id: str, body: Mapping[str, Any], standards: Mapping[str, object]) -> PolicyException:
    """Build the exception from the policy ``policy_id`` (its Cedar JSON ``body``);
    ``standards`` are the standard names the main set's ``@standard`` forbids carry."""
    ann: Mapping[str, str] = body.get("annotations", {})
    where = f"exception policy {policy_id!r}"
    exc_id = check_id(ann.get("exception", ""), f"{where}: @exception")
    if body.get("effect") != "permit":
        raise GovernanceError(f"{where}: an exception must be a permit (it waives a standard's forbid)")
    missing = [k for k in REQUIRED if not ann.get(k, "").strip()]
    if missing:
        raise GovernanceError(f"{where}: missing {', '.join('@' + k for k in missing)}")
    for k in ("justification", "owner", "approved_by"):
        check_text(ann[k], f"{where}: @{k}")
    waives = frozenset(w.strip() for w in ann["waives"].split(","))
    for w in sorted(waives):
        if w not in standards:
            raise GovernanceError(
                f"{where} waives {w[:80]!r}, which is not a @standard forbid of this policy set:"
                " only encryption standards can be waived (never separation of duties, environments, MFA, two-person)"
            )
    one = {"staticPolicies": {policy_id: dict(body)}, "templates": {}, "templateLinks": []}
    try:
        handle = cedarpy.PolicySet.from_json_str(json.dumps(one))
    except ValueError as e:
        raise GovernanceError(f"{where} does not parse: {str(e).splitlines()[0][:200]}") from None
    return PolicyException(
        id=exc_id,
        policy_id=policy_id,
        waives=waives,
        justification=ann["justification"],
        owner=ann["owner"],
        approved_by=ann["approved_by"],
        expires=parse_expiry(ann["expires"], where),
        handle=handle,
    )


@dataclass(frozen=True)
class Waived:
    """What the exceptions say about one denial: the live exception that applies (if any)
    and the expired ones that would have applied."""

    live: PolicyException | None
    expired: tuple[PolicyException, ...]


def consult(
    exceptions: tuple[PolicyException, ...],
    standards: frozenset[str],
    request: Mapping[str, Any],
    entities: Any,
    now: float,
) -> Waived:
    """The exceptions waiving every one of ``standards`` whose permit matches the request,
    split into the first live one (by id) and every expired one."""
    live: PolicyException | None = None
    expired: list[PolicyException] = []
    for exc in sorted(exceptions, key=lambda e: e.id):
        if not exc.covers(standards):
            continue
        if exc.expired(now):
            if exc.matches(request, entities):
                expired.append(exc)
        elif live is None and exc.matches(request, entities):
            live = exc
    return Waived(live, tuple(expired))


__all__ = [
    "REQUIRED",
    "PolicyException",
    "Waived",
    "check_id",
    "check_text",
    "consult",
    "parse_exception",
    "parse_expiry",
    "utc_text",
]
