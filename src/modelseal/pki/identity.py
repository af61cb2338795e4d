"""SPIFFE-style workload identities: ``spiffe://DOMAIN/ENV/KIND/NAME``.

Owns the one strict grammar of an identity, its parsing and formatting. A parsed
``Identity`` is data: its parts are checked against small character sets (no empty
segment, no ``.``/``..``, no percent-escapes, no query, fragment, port or user info),
and they are never used as a path or a setting. The trust domain is a lowercase
DNS-style name; ENV is lowercase; NAME keeps case (``[A-Za-z0-9._-]``, starting with a
letter or digit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelseal.errors import IdentityError

SCHEME = "spiffe://"
KINDS = ("server", "service", "user")
MAX_URI = 2048  # the SPIFFE limit of an ID

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_ENV = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _shown(text: str) -> str:
    """A refused value for a one-line message: cut, and escaped by ``repr``."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def check_trust_domain(domain: str) -> str:
    if len(domain) > 253 or not _DOMAIN.fullmatch(domain):
        raise IdentityError(f"invalid trust domain {_shown(domain)}: lowercase DNS labels (a-z, 0-9, -) joined by dots")
    return domain


def check_env(env: str) -> str:
    if not _ENV.fullmatch(env):
        raise IdentityError(f"invalid environment {_shown(env)}: 1-63 of a-z, 0-9, _ and -, starting alphanumeric")
    return env


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise IdentityError(f"invalid kind {_shown(kind)}: one of {', '.join(KINDS)}")
    return kind


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise IdentityError(
            f"invalid name {_shown(name)}: 1-128 of A-Z, a-z, 0-9, '.', '_' and '-', starting alphanumeric, no '..'"
        )
    return name


@dataclass(frozen=True)
class Identity:
    """Who a certificate names. Construct through ``Identity.of`` or ``parse``: both check."""

    trust_domain: str
    env: str
    kind: str
    name: str

    @classmethod
    def of(cls, trust_domain: str, env: str, kind: str, name: str) -> Identity:
        return cls(check_trust_domain(trust_domain), check_env(env), check_kind(kind), check_name(name))

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/{self.env}/{self.kind}/{self.name}"

    def __str__(self) -> str:
        return self.uri


def parse(uri: str) -> Identity:
    """The identity ``uri`` names, or ``IdentityError``. Exactly four parts; nothing else."""
    if not isinstance(uri, str) or len(uri) > MAX_URI:
        raise IdentityError("invalid identity: not a string of at most 2048 characters")
    if not uri.startswith(SCHEME):
        raise IdentityError(f"invalid identity {_shown(uri)}: it must start with {SCHEME}")
    parts = uri[len(SCHEME) :].split("/")
    if len(parts) != 4:
        raise IdentityError(f"invalid identity {_shown(uri)}: expected {SCHEME}DOMAIN/ENV/KIND/NAME")
    domain, env, kind, name = parts
    try:
        return Identity.of(domain, env, kind, name)
    except IdentityError as e:
        raise IdentityError(f"invalid identity {_shown(uri)}: {e}") from None


__all__ = ["KINDS", "Identity", "check_env", "check_kind", "check_name", "check_trust_domain", "parse"]
