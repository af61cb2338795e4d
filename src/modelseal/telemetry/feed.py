"""What moves the counters of ``telemetry.metrics``: audit events, and the observation hooks.

``CountingSink`` wraps an audit sink (the server's, ``server.app.open_governance``): every
event it writes also counts, once written (``count_event``): key operations by op and
result, authorization decisions by result and policy id (one sample per id), an expired
exception, break-glass uses and pin mismatches. It never queries a store: it runs in the
audit writer's thread, ahead of the next write (an expired grant presented is counted by
the decider, ``server.authz``, which has the bindings at hand).
``Tally`` counts events read back from an audit log (``modelseal metrics --textfile``),
apart from the process's counters: there a row may come from anyone who can write the
database, so every label value is checked against a bounded set (an unknown operation counts nothing; an
unknown result or policy id is ``other``). No event field but those ever becomes a label.

``install_hooks`` connects ``util.observe``: key provider request durations
(``modelseal_kms_request_duration_seconds{provider}``, from ``keys.service``) and
signature verification results (from ``signing.verification``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily

from modelseal.audit.events import AuditEvent, AuditSink
from modelseal.errors import ModelsealError
from modelseal.keys.service import LIFECYCLE_OPS
from modelseal.telemetry import metrics as m
from modelseal.util import observe

# The KeyService operations (keys.service and the broker's batched calls).
KEY_OPS = frozenset(LIFECYCLE_OPS | {"wrap", "unwrap", "rewrap", "generate", "cert-renew"})
KMS_PROVIDERS = ("local", "transit", "pkcs11", "awskms", "broker")
_POLICY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ERROR_NAME = re.compile(r"[A-Z][A-Za-z0-9]{0,63}")
_known_errors: set[str] = set()


def _error_names() -> set[str]:
    out, todo = {"ModelsealError"}, list(ModelsealError.__subclasses__())
    while todo:
        cls = todo.pop()
        out.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return out


def result_label(result: object) -> str:
    """``ok``, the name of a modelseal error class, or ``other``."""
    if result == "ok":
        return "ok"
    if not isinstance(result, str) or not _ERROR_NAME.fullmatch(result):
        return "other"
    if result not in _known_errors:
        _known_errors.update(_error_names())  # classes imported since the last look
    return result if result in _known_errors else "other"


def policy_label(policy: str) -> str:
    return policy if _POLICY_ID.fullmatch(policy) else "other"


def decisions(result: object) -> list[tuple[str, str]]:
    """The (result, policy) samples of an ``authorize`` event's result: ``allow:a,b`` is two,
    ``deny:default`` one, ``allow-exception:ID`` an allow by the exception, ``deny:hold:ID``
    a deny by ``hold`` (a hold id is not a bounded label)."""
    if not isinstance(result, str):
        return []
    verdict, _, ids = result.partition(":")
    if verdict == "allow-exception":
        return [("allow", policy_label(ids))]
    if verdict not in ("allow", "deny"):
        return []
    if ids.startswith("hold:"):
        return [(verdict, "hold")]
    names = [i for i in ids.split(",") if i][:16]
    return [(verdict, policy_label(i)) for i in names] or [(verdict, "default")]


Increment = tuple[Counter, tuple[str, ...]]  # a counter and its label values


def increments(operation: object, result: object) -> list[Increment]:
    """What one audit event (its operation and result) counts."""
    if operation in KEY_OPS:
        return [(m.KEY_OPERATIONS, (str(operation), result_label(result)))]
    if operation == "authorize":
        return [(m.AUTHZ_DECISIONS, sample) for sample in decisions(result)]
    single: dict[object, Increment] = {
        "exception-expired": (m.EXPIRED_CREDENTIALS, ("exception",)),
        "break-glass-use": (m.BREAK_GLASS, ()),
        "pin-mismatch": (m.PIN_MISMATCHES, ()),
    }
    hit = single.get(operation) if isinstance(operation, str) else None
    return [hit] if hit is not None else []


def count_event(operation: object, result: object) -> None:
    """Count one audit event in this process's counters."""
    for counter, labels in increments(operation, result):
        (counter.labels(*labels) if labels else counter).inc()


def _name(counter: Counter) -> str:
    return next(iter(counter.describe())).name


class Tally:
    """Counts of audit events read back from a log, apart from this process's counters
    (``modelseal metrics --textfile``: the figures are the log's, however often it runs)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, tuple[str, ...]], float] = {}
        self._meta: dict[str, tuple[str, tuple[str, ...]]] = {}

    def add(self, doc: Mapping[str, Any]) -> None:
        """One event as read from an audit log (``MerkleAuditLog.verified_events``)."""
        for counter, labels in increments(doc.get("operation"), doc.get("result")):
            name = _name(counter)
            self._meta[name] = (counter._documentation, tuple(counter._labelnames))
            self.counts[(name, labels)] = self.counts.get((name, labels), 0.0) + 1.0

    def families(self, always: Sequence[Counter] = ()) -> list[CounterMetricFamily]:
        """A counter family per counted metric (and per ``always``, at 0 when unlabelled)."""
        for counter in always:
            name = _name(counter)
            self._meta.setdefault(name, (counter._documentation, tuple(counter._labelnames)))
            if not counter._labelnames:
                self.counts.setdefault((name, ()), 0.0)
        out = []
        for name in sorted(self._meta):
            doc, labelnames = self._meta[name]
            fam = CounterMetricFamily(name, doc, labels=list(labelnames))
            for (n, labels), value in sorted(self.counts.items()):
                if n == name:
                    fam.add_metric(list(labels), value)
            out.append(fam)
        return out


class CountingSink:
    """An ``AuditSink`` that writes to ``sink`` and counts what was written. Every other
    attribute (``ready``, ``verify``, ``events``...) is the wrapped sink's, so it stands in
    for it anywhere; ``emit_many`` exists only where the wrapped sink has it."""

    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink
        if hasattr(sink, "emit_many"):
            self.emit_many = self._emit_many

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)

    def emit(self, event: AuditEvent) -> None:
        self.sink.emit(event)
        self._count(event)

    def _emit_many(self, events: Sequence[AuditEvent]) -> None:
        self.sink.emit_many(events)  # type: ignore[attr-defined]
        for event in events:
            self._count(event)

    def _count(self, event: AuditEvent) -> None:
        with contextlib.suppress(Exception):  # a metric must never fail an audited operation
            count_event(event.operation, event.result)


def _kms(provider: str, seconds: float) -> None:
    m.KMS_DURATION.labels(provider=provider if provider in KMS_PROVIDERS else "other").observe(seconds)


def _signature(result: str, _value: float) -> None:
    m.SIGNATURE_VERIFICATIONS.labels(result=result if result in m.SIGNATURE_RESULTS else "error").inc()


def install_hooks() -> None:
    """Count key provider durations and signature verifications in this process."""
    observe.install("kms", _kms)
    observe.install("signature", _signature)


__all__ = [
    "KEY_OPS",
    "CountingSink",
    "Tally",
    "count_event",
    "decisions",
    "increments",
    "install_hooks",
    "policy_label",
    "result_label",
]
