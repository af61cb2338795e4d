"""The governance vocabulary every other governance module and the server share: the
actions, the default roles, bindings, an authorization request and its decision.

Pure data: no I/O, no Cedar. ``governance.cedar`` turns a ``Request`` into Cedar's
principal, action, resource and context; ``governance.store`` keeps ``Binding`` rows; the
server builds a ``Request`` per call and acts on the ``Decision`` (docs/governance.md).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from modelseal.errors import GovernanceError

# -- actions (Cedar ``Action::"..."``) -------------------------------------------------
REGISTRY_ACTIONS = ("pull", "push", "delete")
KEY_USE_ACTIONS = ("key.wrap", "key.unwrap", "key.rewrap", "key.list")
KEY_ADMIN_ACTIONS = ("key.create", "key.rotate", "key.disable", "key.enable", "key.destroy")
ACCESS_ACTIONS = (
    "access.bind",
    "access.unbind",
    "access.grant",
    "access.list",
    "access.review",
    "access.attest",
    "access.break-glass",
)
APPROVAL_ACTIONS = ("approval.list", "approval.decide")
POLICY_ACTIONS = ("policy.read", "policy.propose", "policy.activate")
AUDIT_ACTIONS = ("audit.read", "evidence.read")
CA_ACTIONS = ("cert.renew", "cert.revoke", "cert.list")
MFA_ACTIONS = ("mfa.enroll",)
# The web console (issue 16): opening a session; every page is decided by the action it shows.
CONSOLE_ACTIONS = ("console.login",)
# Monitoring (issue 14): the scrape, and the holds a detector's response puts in place.
MONITOR_ACTIONS = ("metrics.read", "hold.list", "hold.release")
# Encryption standards: resource is an ``Artifact``.
STANDARD_ACTIONS = ("artifact.seal", "artifact.push", "artifact.pull", "artifact.deploy", "artifact.check")
ACTIONS = (
    REGISTRY_ACTIONS
    + KEY_USE_ACTIONS
    + KEY_ADMIN_ACTIONS
    + ACCESS_ACTIONS
    + APPROVAL_ACTIONS
    + POLICY_ACTIONS
    + AUDIT_ACTIONS
    + CA_ACTIONS
    + MFA_ACTIONS
    + MONITOR_ACTIONS
    + STANDARD_ACTIONS
    + CONSOLE_ACTIONS
)

# Step-up MFA (a fresh TOTP code bound to this request) and the two-person rule.
MFA_REQUIRED = (
    *KEY_ADMIN_ACTIONS,
    "access.bind",
    "access.unbind",
    "access.grant",
    "access.break-glass",
    "policy.propose",
    "policy.activate",
    "approval.decide",
    "cert.revoke",
    "hold.release",
)
TWO_PERSON = ("key.destroy", "cert.revoke", "policy.activate", "access.break-glass")
# What ``[governance] two_person`` of config.toml may add to the two-person rule on one
# server (``governance.approvals.Settings``): the key lifecycle changes the broker runs
# once approved (``server.keys_api``'s executors). Cedar sees it as ``context.two_person``,
# a fact the decider sets (``server.authz``), and ``gov-two-person-configured`` forbids it.
TWO_PERSON_CONFIGURABLE = ("key.rotate", "key.disable", "key.enable")

# -- roles -----------------------------------------------------------------------------
ROLES = ("reader", "publisher", "key-admin", "security-officer", "auditor", "break-glass", "metrics")
DATA_ROLES = ("reader", "publisher")  # separation of duties: never with key-admin in one environment
KEY_ROLES = ("key-admin",)

# -- resources -------------------------------------------------------------------------
RESOURCE_TYPES = ("Repository", "Key", "Artifact", "Governance", "Approval", "Audit", "Certificate")

KINDS = ("binding", "grant", "break-glass")
_PATTERN = re.compile(r"spiffe://[a-z0-9.-]+(/[A-Za-z0-9._*-]+)+")
MAX_GRANT = 7 * 86400.0  # a grant or break-glass window is never longer than this
MAX_BINDING = 366 * 86400.0


def check_pattern(pattern: str) -> str:
    """A binding's identity: an exact SPIFFE id, or one whose path segments may be ``*``
    (a whole segment) or end in ``*``. Anything else (``**``, ``?``, ``[``) is refused."""
    if not _PATTERN.fullmatch(pattern) or "**" in pattern:
        raise GovernanceError(
            f"binding identity {pattern[:200]!r} is not spiffe://DOMAIN/ENV/KIND/NAME (with * segments)"
        )
    return pattern


def identity_matches(pattern: str, identity: str) -> bool:
    """``*`` matches within one path segment, never across ``/``."""
    if "*" not in pattern:
        return pattern == identity
    p, i = pattern.split("/"), identity.split("/")
    return len(p) == len(i) and all(fnmatch.fnmatchcase(b, a) and ("/" not in b) for a, b in zip(p, i, strict=True))


@dataclass(frozen=True)
class Binding:
    """An identity pattern bound to a role in an environment until ``expires`` (epoch s).

    ``kind`` is ``binding`` (reviewed, up to a year), ``grant`` (temporary, ``access
    grant``) or ``break-glass`` (approved by two officers; every use alerts).
    """

    id: str
    pattern: str
    role: str
    env: str
    expires: float
    kind: str = "binding"
    reason: str = ""
    created_by: str = ""
    created: float = 0.0
    last_used: float | None = None

    def matches(self, identity: str) -> bool:
        return identity_matches(self.pattern, identity)

    def active(self, now: float) -> bool:
        return now < self.expires


@dataclass(frozen=True)
class Principal:
    """The caller, from the verified client certificate only, with its active bindings."""

    identity: str
    env: str
    kind: str  # server, service or user
    trust_domain: str
    bindings: tuple[Binding, ...] = ()


@dataclass(frozen=True)
class Resource:
    """What is acted on: ``type`` is one of ``RESOURCE_TYPES``; ``attrs`` always has ``env``."""

    type: str
    id: str
    attrs: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """One authorization question. ``context`` carries: ``now`` (int epoch s), ``mfa``
    (bool: a valid code bound to this request), ``mfa_age`` (int s, -1 when none),
    ``approved`` (bool: the two-person rule met), ``approvals`` (int), ``two_person`` (bool:
    this server's ``[governance] two_person`` names the action), ``tls_version``
    (str), ``anomaly`` (int, 0 until the monitoring issue), and per action extras such as
    ``artifact_env`` for a wrap."""

    principal: Principal
    action: str
    resource: Resource
    context: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """``policies`` are the ids that decided (the permits when allowed, the forbids when
    denied; empty for the default deny). ``reason`` is one line. ``exception`` is the id
    of the exception that turned a standard's deny into an allow; ``expired`` lists
    exceptions that would have applied but have expired (an event for monitoring)."""

    allowed: bool
    policies: tuple[str, ...]
    reason: str
    exception: str | None = None
    expired: tuple[str, ...] = ()
    break_glass: bool = False


__all__ = [
    "ACTIONS",
    "DATA_ROLES",
    "KEY_ROLES",
    "KINDS",
    "MAX_BINDING",
    "MAX_GRANT",
    "MFA_REQUIRED",
    "RESOURCE_TYPES",
    "ROLES",
    "TWO_PERSON",
    "TWO_PERSON_CONFIGURABLE",
    "Binding",
    "Decision",
    "Principal",
    "Request",
    "Resource",
    "check_pattern",
    "identity_matches",
]
