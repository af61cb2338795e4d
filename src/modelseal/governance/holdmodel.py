"""What a hold is (``governance.holds`` stores and enforces them; docs/access.md, "Holds"):
the ``Hold`` record, its errors, the checks of its subject, reason and environment, the
matching of source holds by network containment (``SourceNets``) and its audit events.

Subjects are exact and canonical, one form per subject:

- ``identity``: an identity URI exactly as ``pki.identity.parse`` prints it (no ``*``);
  its environment is the URI's;
- ``key``: a broker key name (``governance.brokerkeys.check_name``);
- ``source``: an IPv4 address (``203.0.113.9``) or network from /16 to /31
  (``203.0.113.0/24``), or an IPv6 network from /32 to /64 (``2001:db8:1::/48``; the server
  records an IPv6 peer as its /64, ``server.hygiene.source_of``, so nothing narrower can
  be told apart). Host bits are zero; an IPv4-mapped form is written as IPv4. Anything
  else is refused with the form to use.

No I/O here; ``ipaddress`` only (no server import).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from modelseal.audit.events import AuditEvent
from modelseal.errors import GovernanceError, IdentityError
from modelseal.governance.brokerkeys import check_name
from modelseal.governance.store import shown
from modelseal.pki.identity import parse

HOLD_KINDS = ("identity", "key", "source")
MAX_REASON = 500
MAX_ACTOR = 2048
PREFIXES = {4: (16, 32), 6: (32, 64)}  # the networks a source hold may name, per IP version
_BITS = {4: 32, 6: 128}
_FULL = {4: 32, 6: 64}  # what the server records: an IPv4 address, an IPv6 /64
_ID = re.compile(r"[0-9a-f]{16}")
_SOURCES = "an IPv4 address or network (/16 to /32) or an IPv6 network (/32 to /64)"


@dataclass(frozen=True)
class Hold:
    """One hold; ``active`` until released (``released_*`` set). ``env``: the environment
    whose servers enforce it; ``backing``: a key hold's canonical backing key (every
    catalog name of that key is held); ``detections``/``last_seen``: how often the subject
    was held again while this hold stood, and when last."""

    id: str
    kind: str
    subject: str
    reason: str
    placed_by: str
    placed_at: float
    released_by: str | None = None
    released_at: float | None = None
    release_reason: str | None = None
    env: str = ""
    backing: str | None = None
    detections: int = 1
    last_seen: float | None = None

    @property
    def active(self) -> bool:
        return self.released_at is None

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "active": self.active}


class UnknownHold(GovernanceError):
    """No hold has this id, or not in this environment (404)."""


class HoldReleased(GovernanceError):
    """The hold was released already (409)."""


class HoldChanged(GovernanceError):
    """The subject was detected again since the hold was read: review it again (409)."""


class TooManyHolds(GovernanceError):
    """The environment has ``holds.MAX_ACTIVE`` active holds already (409)."""


class HoldsUnreadable(GovernanceError):
    """A hold row cannot be understood: the decider denies (503) until it is fixed."""


def check_hold_id(text: object) -> str:
    if not isinstance(text, str) or not _ID.fullmatch(text):
        raise GovernanceError("a hold id is 16 lowercase hex digits")
    return text


def _v4(net: ipaddress.IPv4Network) -> str | None:
    if net.prefixlen < PREFIXES[4][0]:
        return None
    return str(net.network_address) if net.prefixlen == 32 else str(net)


def source_form(text: str) -> str | None:
    """The one form a hold on the address or network ``text`` takes (what
    ``hygiene.source_of`` prints for an address), None if it cannot be held."""
    if "%" in text:
        return None  # a zone index is the local host's, never a peer's source
    try:
        if "/" not in text:
            ip = ipaddress.ip_address(text)
            if isinstance(ip, ipaddress.IPv4Address):
                return str(ip)
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    if isinstance(net, ipaddress.IPv4Network):
        return _v4(net)
    mapped = net.network_address.ipv4_mapped
    if mapped is not None and net.prefixlen >= 96:  # ::ffff:a.b.c.d/N is IPv4's a.b.c.d/(N-96)
        return _v4(ipaddress.IPv4Network((mapped, net.prefixlen - 96), strict=False))
    if net.prefixlen < PREFIXES[6][0]:
        return None
    return str(ipaddress.IPv6Network((net.network_address, min(net.prefixlen, 64)), strict=False))


def check_source(text: object) -> str:
    """A source in exactly its one form (``source_form``)."""
    if not isinstance(text, str) or len(text) > 64:
        raise GovernanceError(f"a held source is {_SOURCES}")
    canonical = source_form(text)
    if canonical is None:
        raise GovernanceError(f"invalid source {shown(text, 64)}: {_SOURCES}")
    if canonical != text:
        raise GovernanceError(f"source {shown(text, 64)} is not in its one form: hold {canonical!r}")
    return text


def check_subject(kind: object, subject: object) -> str:
    """``subject`` if it is a valid, exact subject of ``kind`` (module docstring), else GovernanceError."""
    if kind not in HOLD_KINDS:
        shown_kind = shown(kind, 40) if isinstance(kind, str) else type(kind).__name__
        raise GovernanceError(f"unknown hold kind {shown_kind}: one of {', '.join(HOLD_KINDS)}")
    if kind == "key":
        return check_name(subject)
    if kind == "source":
        return check_source(subject)
    if not isinstance(subject, str):
        raise GovernanceError("a held identity is an identity URI")
    try:
        uri = parse(subject).uri
    except IdentityError as e:
        raise GovernanceError(str(e)) from None
    if uri != subject:
        raise GovernanceError(f"held identity {shown(subject)} is not exact: hold {uri!r}")
    return subject


def check_line(text: object, what: str, limit: int = MAX_REASON) -> str:
    if not isinstance(text, str) or not text.strip() or len(text) > limit or not text.isprintable():
        raise GovernanceError(f"{what} is one printable line of 1-{limit} characters")
    return text


def hold_env(kind: str, subject: str, env: str | None) -> str:
    """The environment of a hold: an identity's own; a key's or a source's as given."""
    if kind == "identity":
        own = parse(subject).env
        if env is not None and env != own:
            raise GovernanceError(f"an identity hold is in the identity's environment ({own}), not {shown(env, 40)}")
        return own
    if not isinstance(env, str) or not env:
        raise GovernanceError("a key or source hold names its environment (env=)")
    return check_line(env, "a hold's environment", 64)


# -- sources by network --------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def network_of(source: str) -> tuple[int, int, int] | None:
    """(IP version, prefix length, network as an integer) of a source or held network."""
    try:
        net = ipaddress.ip_network(source)
    except ValueError:
        return None
    return net.version, net.prefixlen, int(net.network_address)


class SourceNets:
    """Source holds by (version, prefix length): a source matches a hold whose network
    contains it; a lookup costs one dict probe per prefix length in use."""

    def __init__(self, holds: Iterable[Hold]) -> None:
        self._by: dict[tuple[int, int], dict[int, Hold]] = {}
        for h in holds:
            got = network_of(h.subject)
            if got is None or source_form(h.subject) != h.subject:
                raise HoldsUnreadable(f"a hold row is malformed: {shown(h.id, 40)} (source)")
            version, length, value = got
            self._by.setdefault((version, length), {})[value >> (_BITS[version] - length)] = h
        self._lengths = {v: sorted(n for w, n in self._by if w == v) for v in _BITS}
        self.prefixes = any(n != _FULL[v] for v, n in self._by)  # any network wider than a source

    def match(self, source: str) -> Hold | None:
        got = network_of(source)
        if got is None:
            return None
        version, length, value = got
        for n in self._lengths[version]:
            if n > length:
                break
            h = self._by[(version, n)].get(value >> (_BITS[version] - n))
            if h is not None:
                return h
        return None


# -- audit events --------------------------------------------------------------------------


def place_event(h: Hold, source: str | None = None) -> AuditEvent:
    """Placing ``h``: actor who placed it; result ``ok:KIND:SUBJECT REASON`` (a subject has
    no space, so the reason is everything after the first one)."""
    result = f"ok:{h.kind}:{h.subject} {h.reason}"
    return AuditEvent("hold-place", f"hold:{h.id}", result, actor=h.placed_by, source=source)


def release_event(h: Hold, source: str | None = None) -> AuditEvent:
    """Releasing ``h``: actor who released it; result ``ok:KIND:SUBJECT REASON``."""
    result = f"ok:{h.kind}:{h.subject} {h.release_reason or ''}".rstrip()
    return AuditEvent("hold-release", f"hold:{h.id}", result, actor=h.released_by or "", source=source)


def deny_reason(h: Hold) -> str:
    """What the held party is told: the id only (the reason is the officers' and the log's)."""
    return f"held pending review (hold {h.id})"


def held_identities(holds: Iterable[Hold]) -> dict[str, Hold]:
    """The active identity holds by identity (the access review's flags)."""
    return {h.subject: h for h in holds if h.kind == "identity" and h.active}


__all__ = ["HOLD_KINDS", "MAX_ACTOR", "MAX_REASON", "PREFIXES", "Hold", "HoldChanged", "HoldReleased"]
__all__ += ["HoldsUnreadable", "SourceNets", "TooManyHolds", "UnknownHold", "check_hold_id", "check_line"]
__all__ += ["check_source", "check_subject", "deny_reason", "held_identities", "hold_env", "network_of"]
__all__ += ["place_event", "release_event", "source_form"]
