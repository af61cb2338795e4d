"""Delivery of signed alerts to an operator's webhook (docs/monitoring.md, "Alerts").

``WebhookSink.send`` puts the alert's JSON on a bounded queue and returns: it never waits
for the network, so a receiver that is down or slow costs the detectors nothing. One
background thread per sink POSTs each body to the configured URL with the headers of
``telemetry.alertsign`` (signed again at each attempt), retries a network error, a timeout,
a 5xx, 408, 425 or 429 with exponential backoff and jitter, and gives up on any other
answer (a 4xx is the receiver refusing this alert; a 3xx is not followed). When the queue
is full the oldest alert is dropped and counted. Failures are logged throttled, with the
host, a count and an HTTP status or an error class: never the body, nor the URL's path or
query, which often carries the receiver's own token.

TLS: the receiver's certificate is verified (the system's CAs, or ``ca_bundle``) with its
host name, TLS 1.2 at least. ``http://`` is accepted for a loopback receiver only (a local
relay). No proxy is used.
"""

from __future__ import annotations

import http.client
import logging
import secrets
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelseal.keys.config import ConfigError
from modelseal.telemetry.alertsign import load_signing_key, signature_headers
from modelseal.telemetry.logthrottle import ThrottledLog
from modelseal.util.home import modelseal_home
from modelseal.util.net import is_loopback

log = logging.getLogger("modelseal.telemetry")

USER_AGENT = "modelseal-alerts/1"
_RETRY_STATUS = {408, 425, 429}
_jitter = secrets.SystemRandom()


class _Alert(Protocol):
    def to_json(self) -> str: ...


@dataclass(frozen=True)
class WebhookStats:
    """What the sink did so far: alerts delivered, given up on, dropped from a full queue,
    and the last failure (an HTTP status or an error class; empty if none)."""

    delivered: int
    failed: int
    dropped: int
    last_error: str


@dataclass(frozen=True)
class Target:
    """A parsed webhook URL: scheme, host, port and the request target (path and query)."""

    https: bool
    host: str
    port: int
    path: str


def parse_url(url: object, where: str = "monitor.alerts.webhook.url") -> Target:
    """An ``https://`` URL (``http://`` for a loopback host only), without credentials or a fragment."""
    if not isinstance(url, str) or len(url) > 2048 or not url.isascii() or any(c.isspace() for c in url):
        raise ConfigError(f"config: {where} must be an https:// URL")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"config: {where} has a bad port") from None
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigError(f"config: {where} must be an https:// URL")
    if parts.scheme == "http" and not is_loopback(host):
        raise ConfigError(f"config: {where}: http:// only to a loopback address; use https://")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"config: {where} must not carry credentials (user:password@)")
    if parts.fragment:
        raise ConfigError(f"config: {where} must not have a #fragment")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme == "https", host, port or (443 if parts.scheme == "https" else 80), path)


def tls_context(ca_bundle: Path | None = None) -> ssl.SSLContext:
    """Verify the receiver: its chain (the system's CAs, or only ``ca_bundle``'s) and host name."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle is not None else None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"alerts: cannot read the CA bundle {ca_bundle}: {getattr(e, 'strerror', None) or e}"
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class WebhookSink:
    """Signed, queued, retried delivery of alerts to one URL (see the module docstring)."""

    def __init__(
        self,
        url: str,
        signing_key: Ed25519PrivateKey,
        *,
        ca_bundle: Path | None = None,
        context: ssl.SSLContext | None = None,
        timeout: float = 5.0,
        retries: int = 4,
        queue_size: int = 1000,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = parse_url(url)
        self._key = signing_key
        self._ctx = context or (tls_context(ca_bundle) if self.target.https else None)
        self._timeout, self._retries, self._backoff, self._max_backoff = timeout, retries, backoff, max_backoff
        self._clock = clock
        self._queue: deque[bytes] = deque()
        self._size = queue_size
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._delivered = self._failed = self._dropped = 0
        self._last_error = ""
        self._drop_log = ThrottledLog(log)
        self._fail_log = ThrottledLog(log)

    def send(self, alert: _Alert) -> None:
        """Queue ``alert`` for delivery; returns at once."""
        body = alert.to_json().encode()
        with self._cond:
            if self._closed:
                self._dropped += 1
                return
            if len(self._queue) >= self._size:
                self._queue.popleft()
                self._dropped += 1
                self._drop_log.note(
                    "%d alert(s) dropped: the queue of the alert webhook to %s is full", self.target.host
                )
            self._queue.append(body)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="modelseal-alert-webhook", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued alert was delivered or given up on; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued for up to ``timeout`` seconds, then stop; the rest is dropped."""
        with self._cond:
            self._closed = True
        self.flush(timeout)
        self._stop.set()
        with self._cond:
            self._dropped += len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(self._timeout + 1.0)

    @property
    def stats(self) -> WebhookStats:
        with self._cond:
            return WebhookStats(self._delivered, self._failed, self._dropped, self._last_error)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait()
                if not self._queue:
                    return
                body = self._queue.popleft()
                self._busy = True
            try:
                ok, error = self._deliver(body)
            except Exception as e:  # a bug here must not kill delivery of the next alerts
                ok, error = False, type(e).__name__
            if not ok:  # logged before flush() can return
                self._fail_log.note(
                    "%d alert(s) not delivered to the alert webhook at %s (latest: %s)", self.target.host, error
                )
            with self._cond:
                self._busy = False
                if ok:
                    self._delivered += 1
                else:
                    self._failed += 1
                    self._last_error = error
                self._cond.notify_all()

    def _deliver(self, body: bytes) -> tuple[bool, str]:
        error = ""
        for attempt in range(self._retries + 1):
            if attempt:
                delay = min(self._max_backoff, self._backoff * 2 ** (attempt - 1)) * _jitter.uniform(0.5, 1.0)
                if self._stop.wait(delay):
                    return False, error or "stopped"
            ok, retry, error = self._attempt(body)
            if ok:
                return True, ""
            if not retry:
                break
        return False, error

    def _attempt(self, body: bytes) -> tuple[bool, bool, str]:
        """(delivered, worth retrying, the failure) of one POST."""
        t = self.target
        conn: http.client.HTTPConnection
        if t.https:
            conn = http.client.HTTPSConnection(t.host, t.port, timeout=self._timeout, context=self._ctx)
        else:
            conn = http.client.HTTPConnection(t.host, t.port, timeout=self._timeout)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            **signature_headers(self._key, body, self._clock()),
        }
        try:
            conn.request("POST", t.path, body=body, headers=headers)
            response = conn.getresponse()
            response.read(4096)  # the answer is drained, never logged
            status = response.status
        except (OSError, http.client.HTTPException) as e:  # ssl.SSLError and timeouts are OSErrors
            return False, True, type(e).__name__
        finally:
            conn.close()
        if 200 <= status < 300:
            return True, False, ""
        return False, status >= 500 or status in _RETRY_STATUS, f"HTTP {status}"


_KEYS = {"url", "signing_key", "ca_bundle", "timeout", "retries", "queue"}


def _path(value: object, where: str, home: Path | None) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config: {where} must be a file path")
    path = Path(value)
    return path if path.is_absolute() else (home or modelseal_home()) / path


def _number(
    spec: Mapping[str, Any], name: str, default: float, low: float, high: float, where: str, *, integer: bool = False
) -> float:
    value = spec.get(name, default)
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        raise ConfigError(
            f"config: {where}.{name} must be {'an integer' if integer else 'a number'} from {low:g} to {high:g}"
        )
    return float(value)


def webhook_from_config(spec: object, where: str = "monitor.alerts.webhook", home: Path | None = None) -> WebhookSink:
    """A sink from one ``[monitor.alerts.webhook]`` table (relative paths are under ``home``)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"config: [{where}] must be a table")
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise ConfigError(f"config: [{where}] has unknown setting(s) {', '.join(unknown)}")
    if "signing_key" not in spec:
        raise ConfigError(f"config: [{where}] needs signing_key = PATH (modelseal alerts keygen --out PATH)")
    target = parse_url(spec.get("url"), f"{where}.url")
    ca = _path(spec["ca_bundle"], f"{where}.ca_bundle", home) if "ca_bundle" in spec else None
    return WebhookSink(
        spec["url"],
        load_signing_key(_path(spec["signing_key"], f"{where}.signing_key", home)),
        ca_bundle=ca if target.https else None,
        timeout=_number(spec, "timeout", 5, 0.1, 120, where),
        retries=int(_number(spec, "retries", 4, 0, 20, where, integer=True)),
        queue_size=int(_number(spec, "queue", 1000, 1, 1_000_000, where, integer=True)),
    )


__all__ = ["USER_AGENT", "Target", "WebhookSink", "WebhookStats", "parse_url", "tls_context", "webhook_from_config"]
