"""The Prometheus metrics the code moves: counters and the one histogram (docs/monitoring.md, "Metrics").

Every module that counts something imports its object from here (``KEY_OPERATIONS``,
``TLS_FAILURES``, ``ANOMALY_ALERTS``...); the figures read at scrape time (key ages,
certificate dates, audit-log state, artifacts by protection state) belong to
``telemetry.collect``, not here. Label values are bounded sets (an operation, a result
class, a policy id, a URI scheme): never a principal, an artifact id or an address.

All objects live in ``REGISTRY``, this package's own registry (not prometheus_client's
global one, so the exposition carries our figures only, identically in one process and in
``modelseal serve``'s several). Multi-process mode: prometheus_client picks its value
class when ``prometheus_client.values`` is first imported, from ``PROMETHEUS_MULTIPROC_DIR``
in the environment; ``modelseal serve`` decides on it later than that, so
``enable_multiprocess`` switches the value class and re-creates the unlabelled values
(labelled children are created on first ``labels()``, under whatever class is current).
It must run before the workers fork and before any label child exists.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, values

from modelseal.errors import StorageError
from modelseal.telemetry import mpfiles

# No ``_created`` series: multi-process mode has none, and one exposition should not depend on the mode.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)

KEY_OPERATIONS = Counter(
    "modelseal_key_operations",
    "Key service operations by operation and result (ok or the error class).",
    ["op", "result"],
    registry=REGISTRY,
)
KMS_DURATION = Histogram(
    "modelseal_kms_request_duration_seconds",
    "Duration of key provider (KMS, HSM, broker) requests by provider URI scheme.",
    ["provider"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
TLS_HANDSHAKES = Counter(
    "modelseal_tls_handshakes",
    "Completed TLS handshakes by protocol version and cipher suite.",
    ["version", "cipher"],
    registry=REGISTRY,
)
TLS_FAILURES = Counter(
    "modelseal_tls_handshake_failures",
    "Failed TLS handshakes and requests refused for their certificate, by reason.",
    ["reason"],
    registry=REGISTRY,
)
PIN_MISMATCHES = Counter(
    "modelseal_pin_mismatches",
    "Certificate pin mismatches reported by clients (pin-mismatch audit events).",
    registry=REGISTRY,
)
SIGNATURE_VERIFICATIONS = Counter(
    "modelseal_signature_verifications",
    "Artifact signature verifications by result.",
    ["result"],
    registry=REGISTRY,
)
AUTHZ_DECISIONS = Counter(
    "modelseal_authz_decisions",
    "Authorization decisions by result (allow, deny) and deciding policy id (one per id).",
    ["result", "policy"],
    registry=REGISTRY,
)
EXPIRED_CREDENTIALS = Counter(
    "modelseal_expired_credentials",
    "Expired credentials presented, by kind (certificate, grant, exception).",
    ["kind"],
    registry=REGISTRY,
)
BREAK_GLASS = Counter(
    "modelseal_break_glass_uses",
    "Break-glass exception uses.",
    registry=REGISTRY,
)
ANOMALY_ALERTS = Counter(
    "modelseal_anomaly_alerts",
    "Anomaly detections by detector.",
    ["detector"],
    registry=REGISTRY,
)

SIGNATURE_RESULTS = ("verified", "untrusted", "invalid", "missing", "revoked", "error")
CREDENTIAL_KINDS = ("certificate", "grant", "exception")
_UNLABELLED = (PIN_MISMATCHES, BREAK_GLASS)
_MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The multi-process directory in force, or None in single-process mode."""
    return os.environ.get(_MULTIPROC) or None


def enable_multiprocess(path: str) -> None:
    """Count into per-process files under ``path`` from now on (and in forked children).

    ``path`` is a directory the caller made (private, empty). Idempotent for one path. The
    files are named by ``mpfiles.identifier`` (a worker's index once it ``claim``-s one) and
    their blocks reserved before they are mapped (``mpfiles.AllocatedDict``)."""
    os.environ[_MULTIPROC] = path
    values.MmapedDict = mpfiles.AllocatedDict  # type: ignore[attr-defined]  # what MultiProcessValue opens
    if getattr(values.ValueClass, "_multiprocess", False):
        return
    values.ValueClass = values.MultiProcessValue(mpfiles.identifier)  # type: ignore[no-untyped-call]
    for metric in _UNLABELLED:
        metric._metric_init()  # the unlabelled value was made under the old class


def worker(index: int) -> None:
    """This process is worker ``index`` of ``modelseal serve``: it counts into that index's
    files (its predecessor's, after a restart), allocated now; ``StorageError`` if they
    cannot be (a full filesystem: the worker does not start)."""
    directory = multiprocess_dir()
    if directory is None:
        return
    try:
        mpfiles.prepare(directory, f"w{index}")
    except OSError as e:
        raise StorageError(f"cannot allocate the metrics files in {directory}: {e.strerror}") from None
