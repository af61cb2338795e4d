"""Handshake observers: who hears about each TLS handshake of the server, and why one failed.

``server.hygiene.Listener`` calls every observer in ``app[OBSERVERS]`` once per connection:
with ``ok=True`` and the negotiated version and cipher when the handshake completed, with
``ok=False`` and a ``reason`` from ``REASONS`` when it failed. The identity middleware
(``server.identity``) calls them with ``ok=False`` for a request refused for its
certificate (revoked, wrong environment or trust domain, expired). The metrics observer
(``telemetry``, registered by ``server.app``) counts them; the monitor's network-path
detectors record them. ``notify`` is how callers call them: an observer must be cheap and
never raise, and one that does is logged (throttled) and skipped, never the connection's
problem.

``classify`` maps a handshake exception to a reason by OpenSSL's reason code and, for a
certificate that failed verification, its X.509 verify code. Found by experiment with real
clients against ``hygiene.Listener`` (OpenSSL 3, Python 3.11; tests/test_metrics_tls.py
makes each one): no client certificate is ``PEER_DID_NOT_RETURN_A_CERTIFICATE``; another
CA's certificate ``CERTIFICATE_VERIFY_FAILED`` with verify code 20 (unable to get local
issuer certificate); an expired one verify code 10; a TLS 1.2 client
``UNSUPPORTED_PROTOCOL``; a client that never finishes its handshake asyncio's
``ConnectionAbortedError`` ("SSL handshake is taking longer than N seconds"); plain HTTP on
the TLS port ``HTTP_REQUEST`` (``other``).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger("modelseal.server")

REASONS = (
    "no-certificate",
    "unknown-ca",
    "expired",
    "revoked",
    "wrong-environment",
    "wrong-trust-domain",
    "protocol-version",
    "timeout",
    "other",
)


@dataclass(frozen=True)
class Handshake:
    """One handshake, or one request refused for its certificate. ``source``: the peer
    address as ``hygiene.source_of`` prints it; ``version``/``cipher``: as negotiated (empty
    when it failed); ``reason``: one of ``REASONS`` when ``ok`` is False; ``actor``: the
    identity of the certificate when one was read (the middleware's refusals)."""

    time: float
    source: str
    ok: bool
    version: str
    cipher: str
    reason: str | None
    actor: str | None


Observer = Callable[[Handshake], None]
OBSERVERS: web.AppKey[list[Observer]] = web.AppKey("handshake_observers", list)

# X.509 verify codes (OpenSSL x509_vfy.h) a client certificate fails on.
_VERIFY_EXPIRED = {9, 10}  # not yet valid, has expired
_VERIFY_UNKNOWN_CA = {2, 18, 19, 20, 21, 24, 30, 31, 32}  # issuer unknown, self-signed, untrusted chain
_VERIFY_REVOKED = {23}
# OpenSSL reason codes (ssl.SSLError.reason) of a refused handshake.
_NO_CERT = {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"}
_PROTOCOL = {
    "UNSUPPORTED_PROTOCOL",
    "NO_PROTOCOLS_AVAILABLE",
    "WRONG_VERSION_NUMBER",
    "VERSION_TOO_LOW",
    "TLSV1_ALERT_PROTOCOL_VERSION",
    "NO_SHARED_CIPHER",
    "NO_CIPHERS_AVAILABLE",
}
_ALERT_EXPIRED = {"SSLV3_ALERT_CERTIFICATE_EXPIRED"}
_ALERT_UNKNOWN_CA = {"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"}
_ALERT_REVOKED = {"SSLV3_ALERT_CERTIFICATE_REVOKED"}


def classify(exc: BaseException) -> str:
    """The reason (one of ``REASONS``) a handshake failed with ``exc``; never raises (an
    error without OpenSSL's attributes, or with odd ones, is ``other``)."""
    try:
        return _classify(exc)
    except Exception:
        return "other"


def _classify(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionAbortedError) and "taking longer than" in str(exc):
        return "timeout"  # asyncio's ssl_handshake_timeout: "SSL handshake is taking longer than N seconds"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        if code in _VERIFY_EXPIRED:
            return "expired"
        if code in _VERIFY_REVOKED:
            return "revoked"
        if code in _VERIFY_UNKNOWN_CA:
            return "unknown-ca"
        return "other"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        for names, label in (
            (_NO_CERT, "no-certificate"),
            (_PROTOCOL, "protocol-version"),
            (_ALERT_EXPIRED, "expired"),
            (_ALERT_UNKNOWN_CA, "unknown-ca"),
            (_ALERT_REVOKED, "revoked"),
        ):
            if isinstance(reason, str) and reason in names:
                return label
    return "other"


def source_of(addr: object) -> str:
    """The source a handshake bound counts: the IPv4 address, or the IPv6 /64 (one host
    usually holds a whole /64); an IPv4-mapped IPv6 address is its IPv4 address."""
    host = addr[0] if isinstance(addr, tuple) and addr and isinstance(addr[0], str) else ""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return "?"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


_failed_at = 0.0
_failures = 0


def notify(observers: Sequence[Observer], event: Handshake) -> None:
    """Call each observer with ``event``; one that raises is logged (at most once a minute,
    with a count) and the others still run. Whatever it raises, but KeyboardInterrupt and
    SystemExit (the process is stopping), stops here: an observer never ends the
    connection's task (a CancelledError it raises is its bug: a synchronous call cannot be
    where the task is cancelled)."""
    global _failed_at, _failures
    for observer in observers:
        try:
            observer(event)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # an observer's bug must never cost a connection
            _failures += 1
            now = time.monotonic()
            if now - _failed_at >= 60.0:
                log.warning("a handshake observer failed %d time(s) (latest: %s)", _failures, type(e).__name__)
                _failed_at, _failures = now, 0


__all__ = ["OBSERVERS", "REASONS", "Handshake", "Observer", "classify", "notify", "source_of"]
