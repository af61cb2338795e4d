"""The OCI distribution grammar (distribution-spec v1.1, "Pulling manifests"): repository
names, tags, digests and the ``<reference>`` that is one of the last two. Pure.

Untrusted text from a URL or a manifest passes here before it is used as anything; every
refusal is a ``RegistryRefused`` with the OCI error code and status the API answers, and a
message that quotes nothing but a bounded, escaped prefix of the input.

Beyond the spec's regular expressions: a name is at most 255 characters (clients limit
``host/name`` to 255), each path component at most 128, at most 16 components. The spec's
grammar already refuses ``..``, uppercase, NUL and every control character; they are named
in the messages because they are what an attack sends. Digests: ``sha256`` (64 lowercase
hex) and ``sha512`` (128); other algorithms are refused as unsupported (400), as the spec
allows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelseal.errors import RegistryRefused

MAX_NAME = 255
MAX_COMPONENT = 128
MAX_COMPONENTS = 16
MAX_TAG = 128

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")


def shown(text: str, limit: int = 80) -> str:
    """A bounded, escaped rendering of untrusted text for a one-line message."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _refuse(code: str, message: str, status: int = 400) -> RegistryRefused:
    return RegistryRefused(message, status=status, code=code)


def check_name(name: str) -> str:
    """``name`` if it is a valid repository name, else ``RegistryRefused`` (400 NAME_INVALID)."""
    if not name or len(name) > MAX_NAME:
        raise _refuse("NAME_INVALID", f"repository name must be 1 to {MAX_NAME} characters")
    if "\x00" in name:
        raise _refuse("NAME_INVALID", "repository name holds a NUL character")
    if any(part in ("..", ".") for part in name.split("/")):
        raise _refuse("NAME_INVALID", "repository name holds a '..' or '.' component")
    if name != name.lower():
        raise _refuse("NAME_INVALID", f"repository name {shown(name)} holds uppercase letters")
    if not NAME_RE.fullmatch(name):
        raise _refuse("NAME_INVALID", f"repository name {shown(name)} does not match the OCI name grammar")
    parts = name.split("/")
    if len(parts) > MAX_COMPONENTS or any(len(p) > MAX_COMPONENT for p in parts):
        raise _refuse("NAME_INVALID", f"repository name has over {MAX_COMPONENTS} parts or a part over {MAX_COMPONENT}")
    return name


def check_tag(tag: str) -> str:
    """``tag`` if it matches the OCI tag grammar (at most 128 characters), else 400 (MANIFEST_INVALID
    is what distribution answers; the spec has no TAG_INVALID in v1.1, so NAME_INVALID is not used)."""
    if not TAG_RE.fullmatch(tag):
        raise _refuse("MANIFEST_INVALID", f"tag {shown(tag)} does not match the OCI tag grammar")
    return tag


@dataclass(frozen=True)
class Digest:
    """A parsed, supported digest: ``algorithm`` (``sha256``/``sha512``) and lowercase ``hex``."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def parse_digest(text: str) -> Digest:
    """The ``Digest`` of ``text``, or ``RegistryRefused`` (400 DIGEST_INVALID): not the grammar,
    an algorithm other than sha256/sha512, or an encoded part of the wrong length or case."""
    if len(text) > 200 or not DIGEST_RE.fullmatch(text):
        raise _refuse("DIGEST_INVALID", f"digest {shown(text)} does not match the OCI digest grammar")
    algorithm, _, encoded = text.partition(":")
    want = HEX_LENGTHS.get(algorithm)
    if want is None:
        raise _refuse("DIGEST_INVALID", f"digest algorithm {shown(algorithm)} is not supported (sha256, sha512)")
    if len(encoded) != want or not _HEX.fullmatch(encoded):
        raise _refuse("DIGEST_INVALID", f"{algorithm} digest must be {want} lowercase hex digits")
    return Digest(algorithm, encoded)


def is_digest_like(reference: str) -> bool:
    """Whether a ``<reference>`` is meant as a digest (it holds ``:``, which no tag may)."""
    return ":" in reference


def parse_reference(reference: str) -> str | Digest:
    """A manifest ``<reference>``: a tag (str) or a ``Digest``; anything else is refused (400)."""
    if is_digest_like(reference):
        return parse_digest(reference)
    return check_tag(reference)


def lookup_reference(reference: str) -> str | Digest | None:
    """A manifest ``<reference>`` to look up (GET, HEAD, DELETE): as ``parse_reference``, but
    a tag outside the grammar is None, since no push could have stored it: the lookup answers
    404 MANIFEST_UNKNOWN, as docker's reference registry does (and the OCI conformance
    suite v1.1 expects), not 400. A malformed digest is still refused (400)."""
    if is_digest_like(reference):
        return parse_digest(reference)
    try:
        return check_tag(reference)
    except RegistryRefused:
        return None


__all__ = [
    "Digest",
    "check_name",
    "check_tag",
    "is_digest_like",
    "lookup_reference",
    "parse_digest",
    "parse_reference",
    "shown",
]
