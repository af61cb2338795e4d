"""Network names, standard library only: whether a host name is this host."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` names this host (``localhost``, 127.0.0.0/8, ``::1``): a token or a
    secret sent to it over plain HTTP crosses no network. A name that is not an address
    (other than ``localhost``) is not loopback: resolving it could say anything."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


__all__ = ["is_loopback"]
