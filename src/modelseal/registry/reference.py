"""Artifact references as the client takes them: ``HOST:PORT/REPO:TAG``, ``HOST:PORT/REPO@sha256:HEX``,
either with an ``oci://`` prefix (the loaders' form). Pure.

The host part is an endpoint the operator typed; the repository, tag and digest pass the OCI
grammar of ``registry.names`` before they are used in any URL. A reference without a
host takes the default registry (``MODELSEAL_REGISTRY`` or config.toml, see
``registry.settings``); ``HOST:PORT`` is told from a repository by its port.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from modelseal.errors import RegistryError, RegistryRefused
from modelseal.registry.names import Digest, check_name, check_tag, parse_digest, shown

OCI_SCHEME = "oci://"
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*")
_ENDPOINT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class Endpoint:
    """A registry endpoint: a DNS name or an IP address (``host``, without brackets), and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6), else ``RegistryError``."""
    m = _ENDPOINT.fullmatch(text.strip())
    if m is None:
        raise RegistryError(f"registry address {shown(text)} is not HOST:PORT")
    host, port = m["host"], int(m["port"])
    if host.startswith("["):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise RegistryError(f"registry address {shown(text)} has a bad IPv6 address") from None
    elif not _HOST.fullmatch(host) or len(host) > 253:
        raise RegistryError(f"registry host {shown(host)} is not a DNS name or IP address")
    if not 1 <= port <= 65535:
        raise RegistryError(f"registry port {port} is out of range")
    return Endpoint(host, port)


@dataclass(frozen=True)
class Reference:
    """``endpoint`` (None: the default registry), a checked repository ``name``, and a
    ``tag`` or a ``digest`` (exactly one)."""

    endpoint: Endpoint | None
    name: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def reference(self) -> str:
        """The manifest ``<reference>`` of the URL: the digest if given, else the tag."""
        return str(self.digest) if self.digest is not None else str(self.tag)

    def __str__(self) -> str:
        where = f"{self.endpoint}/" if self.endpoint is not None else ""
        return f"{where}{self.name}@{self.digest}" if self.digest is not None else f"{where}{self.name}:{self.tag}"


def _checked(check: object, what: str, text: str) -> None:
    try:
        check(text)  # type: ignore[operator]
    except RegistryRefused as e:
        raise RegistryError(f"{what}: {e}") from None


def parse_reference(text: str, *, default_tag: str | None = None) -> Reference:
    """Parse ``[oci://][HOST:PORT/]REPO(:TAG|@sha256:HEX)``; ``RegistryError`` on anything else.
    Without a tag or digest, ``default_tag`` is taken if given, else it is refused."""
    ref = text.removeprefix(OCI_SCHEME)
    if not ref or len(ref) > 1024 or any(c in ref for c in "\x00 \t\r\n?#\\"):
        raise RegistryError(f"{shown(text)} is not a registry reference (HOST:PORT/REPO:TAG)")
    endpoint: Endpoint | None = None
    first, sep, rest = ref.partition("/")
    if sep and _ENDPOINT.fullmatch(first):
        endpoint, ref = parse_endpoint(first), rest
    name, at, digest_text = ref.partition("@")
    tag: str | None = None
    digest: Digest | None = None
    if at:
        try:
            digest = parse_digest(digest_text)
        except RegistryRefused as e:
            raise RegistryError(f"{shown(text)}: {e}") from None
        if digest.algorithm != "sha256":
            raise RegistryError("only sha256 digests are supported in references")
    else:
        slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > slash:
            name, tag = name[:colon], name[colon + 1 :]
            _checked(check_tag, "tag", tag)
        elif default_tag is not None:
            tag = default_tag
        else:
            raise RegistryError(f"{shown(text)} names no tag or digest (REPO:TAG or REPO@sha256:...)")
    _checked(check_name, "repository", name)
    return Reference(endpoint, name, tag, digest)


__all__ = ["OCI_SCHEME", "Endpoint", "Reference", "parse_endpoint", "parse_reference"]
