"""Alerts and where they go (docs/monitoring.md, "Alerts").

``Alert`` is what a detection (``telemetry.monitor``) or ``modelseal alerts test`` sends:
one line of summary, the subject (identity, key, source, artifact), the audit entries that
are its evidence, and the response configured for it. A sink (``AlertSink``) takes it:

- ``StdoutSink``: one JSON line on standard output (journald, a container's log);
- ``SyslogSink``: one RFC 5424 message with the JSON (``telemetry.syslogout``);
- ``WebhookSink``: a signed POST from a background thread (``telemetry.webhook``; the
  receiver checks it with ``verify_webhook``, ``telemetry.alertsign``).

No sink ever raises into its caller or waits on the network. ``sinks_from_config`` builds
them from config.toml's ``[monitor.alerts]``. The summary and subject values may quote
audit rows: they are cut, and the summary kept to one line, so a sink receives bounded
data; nothing in an alert is used as a path, URL or setting.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from modelseal.keys.config import ConfigError
from modelseal.telemetry.alertsign import ALERT_SCHEMA, verify_webhook
from modelseal.telemetry.logthrottle import ThrottledLog
from modelseal.telemetry.syslogout import SyslogWriter, check_facility, parse_address
from modelseal.telemetry.webhook import WebhookSink, webhook_from_config

log = logging.getLogger("modelseal.telemetry")

SEVERITIES = ("warning", "critical")
ACTIONS = ("alert", "suspend-identity", "hold-key", "refuse-source")
SUBJECT_KEYS = ("identity", "key", "source", "artifact")
MAX_SUMMARY = 300
MAX_VALUE = 512
MAX_EVIDENCE = 100
_DETECTOR = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str, limit: int) -> str:
    """``text`` with every control character (a newline too) as a space, cut to ``limit``."""
    return _CONTROL.sub(" ", text)[:limit]


@dataclass(frozen=True)
class Alert:
    """One alert. ``severity``: ``warning`` or ``critical``; ``subject``: any of
    ``SUBJECT_KEYS``; ``evidence``: audit log entries; ``action``: the response that was
    configured (``alert`` only, or a hold placed: ``suspend-identity``, ``hold-key``,
    ``refuse-source``). A bad severity, action, detector name or subject key is a
    programming error (``ValueError``); long or multi-line text is cut and flattened."""

    id: str
    time: float
    detector: str
    severity: str
    summary: str
    subject: dict[str, str] = field(default_factory=dict)
    evidence: tuple[int, ...] = ()
    action: str = "alert"

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"alert severity must be one of {', '.join(SEVERITIES)}")
        if self.action not in ACTIONS:
            raise ValueError(f"alert action must be one of {', '.join(ACTIONS)}")
        if not _DETECTOR.fullmatch(self.detector) or not _DETECTOR.fullmatch(self.id):
            raise ValueError("alert detector and id must be names of [a-z0-9._-], at most 64")
        if not set(self.subject) <= set(SUBJECT_KEYS) or not all(isinstance(v, str) for v in self.subject.values()):
            raise ValueError(f"alert subject keys must be among {', '.join(SUBJECT_KEYS)}, with string values")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in self.evidence):
            raise ValueError("alert evidence must be audit entry numbers")
        # Frozen: the normalised values replace the given ones once, here.
        object.__setattr__(self, "summary", one_line(self.summary, MAX_SUMMARY))
        object.__setattr__(self, "subject", {k: one_line(v, MAX_VALUE) for k, v in sorted(self.subject.items())})
        object.__setattr__(self, "evidence", tuple(self.evidence)[:MAX_EVIDENCE])
        object.__setattr__(self, "time", float(self.time))

    def to_dict(self) -> dict[str, Any]:
        """The documented shape (docs/schemas/security-event.schema.json), ``schema`` first."""
        return {
            "schema": ALERT_SCHEMA,
            "id": self.id,
            "time": self.time,
            "detector": self.detector,
            "severity": self.severity,
            "summary": self.summary,
            "subject": dict(self.subject),
            "evidence": list(self.evidence),
            "action": self.action,
        }

    def to_json(self) -> str:
        """Compact, key-sorted, ASCII JSON on one line: the webhook body and the line of every sink."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def new_alert(
    detector: str,
    severity: str,
    summary: str,
    subject: Mapping[str, str] | None = None,
    evidence: Iterable[int] = (),
    action: str = "alert",
    now: float | None = None,
) -> Alert:
    """An alert with a fresh random id (``al-`` and 16 hex digits)."""
    return Alert(
        id=f"al-{secrets.token_hex(8)}",
        time=time.time() if now is None else now,
        detector=detector,
        severity=severity,
        summary=summary,
        subject=dict(subject or {}),
        evidence=tuple(evidence),
        action=action,
    )


class AlertSink(Protocol):
    def send(self, alert: Alert) -> None: ...


class StdoutSink:
    """One JSON line per alert on ``stream`` (standard output by default, looked up at each send)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._failures = ThrottledLog(log)

    def send(self, alert: Alert) -> None:
        line = alert.to_json() + "\n"
        try:
            with self._lock:
                stream = self._stream or sys.stdout
                stream.write(line)
                stream.flush()
        except (OSError, ValueError) as e:  # a closed or broken stdout
            self._failures.note("%d alert(s) not written to standard output (latest: %s)", type(e).__name__)


class SyslogSink:
    """One syslog message per alert: MSGID ``alert``, priority warning or critical."""

    def __init__(self, address: str | tuple[str, int], facility: str = "auth") -> None:
        self.writer = SyslogWriter(address, facility)

    def send(self, alert: Alert) -> None:
        self.writer.send("alert", alert.severity, alert.to_json())

    def close(self) -> None:
        self.writer.close()


class MemoryAlertSink:
    """Keeps every alert in ``alerts`` (tests, and ``modelseal controls test``'s checks)."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self._lock = threading.Lock()

    def send(self, alert: Alert) -> None:
        with self._lock:
            self.alerts.append(alert)


_KEYS = {"stdout", "syslog", "webhook"}
_SYSLOG_KEYS = {"address", "facility"}


def _syslog_sink(spec: object) -> SyslogSink:
    where = "monitor.alerts.syslog"
    if isinstance(spec, str):
        spec = {"address": spec}
    if not isinstance(spec, dict) or set(spec) - _SYSLOG_KEYS:
        raise ConfigError(f'config: [{where}] takes address = "/dev/log" or "HOST:PORT", and facility')
    return SyslogSink(
        parse_address(spec.get("address"), f"{where}.address"), check_facility(spec.get("facility"), where)
    )


def sinks_from_config(table: Mapping[str, Any], home: Path | None = None) -> list[AlertSink]:
    """The sinks of ``[monitor.alerts]``: ``syslog`` (an address, or a table with ``address``
    and ``facility``), ``webhook`` (a table, or a list of them: ``[[monitor.alerts.webhook]]``)
    and ``stdout`` (a bool; on by default when neither of the others is configured)."""
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"config: [monitor.alerts] has unknown setting(s) {', '.join(unknown)}")
    sinks: list[AlertSink] = []
    if "syslog" in table:
        sinks.append(_syslog_sink(table["syslog"]))
    hooks = table.get("webhook", [])
    if isinstance(hooks, list):
        sinks.extend(webhook_from_config(spec, f"monitor.alerts.webhook[{i}]", home) for i, spec in enumerate(hooks))
    else:
        sinks.append(webhook_from_config(hooks, "monitor.alerts.webhook", home))
    stdout = table.get("stdout", not sinks)
    if not isinstance(stdout, bool):
        raise ConfigError("config: monitor.alerts.stdout must be true or false")
    if stdout:
        sinks.insert(0, StdoutSink())
    return sinks


def send_all(sinks: Iterable[AlertSink], alert: Alert) -> None:
    """``alert`` to every sink; a sink that raises (a bug: sinks do not) is logged and skipped."""
    for sink in sinks:
        try:
            sink.send(alert)
        except Exception as e:
            log.warning("an alert sink (%s) failed: %s", type(sink).__name__, type(e).__name__)


__all__ = [
    "ACTIONS",
    "SEVERITIES",
    "SUBJECT_KEYS",
    "Alert",
    "AlertSink",
    "MemoryAlertSink",
    "StdoutSink",
    "SyslogSink",
    "WebhookSink",
    "new_alert",
    "one_line",
    "send_all",
    "sinks_from_config",
    "verify_webhook",
]
