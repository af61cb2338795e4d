"""Security events and alerts as OpenTelemetry logs: OTLP/JSON ``ExportLogsServiceRequest``.

The shape the OpenTelemetry Collector's ``otlpjsonfile`` receiver reads, one request per
line (the protobuf JSON mapping of opentelemetry-proto ``logs/v1``): ``resourceLogs`` ->
``scopeLogs`` -> ``logRecords``. Each record has ``timeUnixNano`` (the event's time) and
``observedTimeUnixNano`` (when it was exported), both as decimal strings as the mapping
writes 64-bit integers; a severity; a one-line ``body``; and every non-null field of the
documented record (docs/monitoring.md, "Events") as an attribute ``modelseal.<field>`` in
``AnyValue`` form, plus ``event.name`` (``modelseal.security_event`` or ``modelseal.alert``).
Pure: no I/O.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

SCOPE = {"name": "modelseal.telemetry.export", "version": "1"}
# OpenTelemetry SeverityNumber: INFO 9, WARN 13, ERROR 17.
_EVENT_SEVERITY = {"success": ("INFO", 9), "failure": ("WARN", 13), "denied": ("WARN", 13)}
_ALERT_SEVERITY = {"warning": ("WARN", 13), "critical": ("CRITICAL", 17)}


def any_value(value: object) -> dict[str, Any]:
    """``value`` as an OTLP ``AnyValue`` (a 64-bit integer as a decimal string)."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, Mapping):
        return {"kvlistValue": {"values": [{"key": str(k), "value": any_value(v)} for k, v in value.items()]}}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [any_value(v) for v in value]}}
    return {"stringValue": str(value)}


def _nanos(t: float) -> str:
    # Microseconds first: a float holds them exactly for today's times; nanoseconds it would round.
    return str(max(0, round(t * 1_000_000)) * 1000)


def log_record(record: Mapping[str, Any], observed: float) -> dict[str, Any]:
    """One ``LogRecord`` of an event's or an alert's ``to_dict()``."""
    alert = str(record.get("schema", "")).startswith("modelseal.alert/")
    if alert:
        text, number = _ALERT_SEVERITY.get(str(record.get("severity")), ("WARN", 13))
        body = str(record.get("summary", ""))
    else:
        text, number = _EVENT_SEVERITY.get(str(record.get("outcome")), ("INFO", 9))
        body = " ".join(str(record[k]) for k in ("operation", "key", "result") if record.get(k) is not None)
    attributes = [
        {"key": "event.name", "value": {"stringValue": "modelseal.alert" if alert else "modelseal.security_event"}}
    ]
    attributes += [{"key": f"modelseal.{k}", "value": any_value(v)} for k, v in sorted(record.items()) if v is not None]
    time_value = record.get("time")
    return {
        "timeUnixNano": _nanos(float(time_value) if isinstance(time_value, int | float) else 0.0),
        "observedTimeUnixNano": _nanos(observed),
        "severityNumber": number,
        "severityText": text,
        "body": {"stringValue": body},
        "attributes": attributes,
    }


def logs_request(records: Sequence[Mapping[str, Any]], now: float | None = None) -> dict[str, Any]:
    """One ``ExportLogsServiceRequest`` holding ``records``."""
    observed = time.time() if now is None else now
    resource = {
        "attributes": [
            {"key": "service.name", "value": {"stringValue": "modelseal"}},
            {"key": "host.name", "value": {"stringValue": socket.gethostname()}},
        ]
    }
    return {
        "resourceLogs": [
            {
                "resource": resource,
                "scopeLogs": [{"scope": dict(SCOPE), "logRecords": [log_record(r, observed) for r in records]}],
            }
        ]
    }


__all__ = ["SCOPE", "any_value", "log_record", "logs_request"]
