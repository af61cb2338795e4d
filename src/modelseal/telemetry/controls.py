"""``modelseal controls test``: simulated intrusion attempts against a running deployment, each
checked for its refusal AND its alert (docs/controls.md).

The attempts are ``telemetry.attempts_tls`` (a to e) and ``telemetry.attempts_api`` (f to i).
For each one this module knows the refusal expected, the counters the matching Prometheus
rules (deploy/prometheus/alerts.yml) watch and how far they must move, and the detector
alerts expected (``telemetry.probes`` and the detectors of ``telemetry.detectors``). It reads
the server's ``GET /metrics`` (role ``metrics``) before each attempt and until the counters
moved after it, and ``GET /modelseal/v1/alerts`` (role ``auditor``) until every expected
detector alert newer than its attempt is there, or ``timeout`` seconds after the last
attempt. Both reads go over the controls identity's pinned connection; an identity that
cannot read them makes no test at all (``AccessDenied``). The attempts run in the order
below: the denials of (g) to (i) stay under the server's per-identity denial limit.

The server's clock dates the alerts; this host's dates the attempts: keep both on NTP
(``CLOCK_SLACK`` is allowed either way). Another client's traffic can move a counter too,
so a delta is "at least": the detector alerts are what ties a row to its own attempt.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelseal.errors import AccessDenied, ModelsealError, RegistryError
from modelseal.keys.service import KeyService
from modelseal.pki.identity import Identity
from modelseal.pki.pins import PinMismatch
from modelseal.registry.apiclient import ApiClient
from modelseal.registry.tlsclient import client_context, held_issuers, pin_check
from modelseal.telemetry import attempts_api as api_attempts
from modelseal.telemetry import attempts_tls as tls_attempts
from modelseal.telemetry.attempts_tls import EventLog, Outcome, Target
from modelseal.telemetry.controlsrecord import MetricDelta, Report, Row

CLOCK_SLACK = 5.0
METRIC_WAIT = 15.0  # per attempt, for its counters (the audit writer is asynchronous)
POLL = 1.0
MAX_METRICS_REPLY = 8 << 20
FAILURES = "modelseal_tls_handshake_failures_total"
DENIES = "modelseal_authz_decisions_total"


def _delta(name: str, labels: dict[str, str], n: float, alert: str) -> MetricDelta:
    return MetricDelta(name, tuple(sorted(labels.items())), n, alert)


def _handshake(reason: str, alert: str = "ModelsealTLSHandshakeFailureBurst") -> MetricDelta:
    return _delta(FAILURES, {"reason": reason}, 1, alert)


@dataclass(frozen=True)
class Expect:
    """What one attempt should cause: a refusal (as a line), counter moves, detector alerts."""

    title: str
    refusal: str
    metrics: tuple[MetricDelta, ...] = ()
    detectors: tuple[str, ...] = ()


EXPECT: dict[str, Expect] = {
    "no-certificate": Expect("no client certificate", "handshake refused", (_handshake("no-certificate"),)),
    "other-ca": Expect("another CA's certificate", "handshake refused", (_handshake("unknown-ca"),)),
    "expired-certificate": Expect(
        "an expired certificate",
        "handshake refused",
        (
            _handshake("expired"),
            _delta(
                "modelseal_expired_credentials_total", {"kind": "certificate"}, 1, "ModelsealExpiredCredentialPresented"
            ),
        ),
    ),
    "tls-1.2": Expect(
        "a TLS 1.2 client", "handshake refused", (_handshake("protocol-version", "ModelsealTLSOldProtocolAttempts"),)
    ),
    "pin-mismatch": Expect("a pin mismatch", "PinMismatch, pin-mismatch audit event (ModelsealPinMismatch)"),
    "plaintext-push": Expect("a plaintext push", "403 content policy sealed-only", detectors=("content-refused",)),
    "reader-rotate": Expect(
        "a reader rotating a key",
        "403 key.rotate denied",
        (_delta(DENIES, {"result": "deny"}, 1, "ModelsealAuthzDenyBurst"),),
        ("privilege-probe",),
    ),
    "otp-replay": Expect(
        "a replayed OTP",
        "403 this code was already used",
        (_delta(DENIES, {"result": "deny"}, 2, "ModelsealAuthzDenyBurst"),),
        ("otp-replay",),
    ),
    "unwrap-burst": Expect("a burst of unwraps", "alert (and a hold where configured)", detectors=("unwrap-ceiling",)),
}


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a Prometheus text exposition: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    except ValueError:
        raise RegistryError("the server's /metrics is not the Prometheus text format") from None
    return out


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], d: MetricDelta) -> float:
    want = set(d.labels)
    return sum(v for (name, labels), v in samples.items() if name == d.name and want <= set(labels))


class Watch:
    """The controls identity's reads of the deployment: ``/metrics`` and the alerts."""

    def __init__(self, target: Target, api: ApiClient) -> None:
        self.target, self.api = target, api
        self._ctx = client_context(target.tls_dir)
        self._held = held_issuers(target.tls_dir)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """``GET /metrics`` over a pinned connection (``registry.tlsclient.pin_check``)."""
        ep = self.target.endpoint
        conn = http.client.HTTPSConnection(ep.host, ep.port, context=self._ctx, timeout=self.target.timeout)
        try:
            conn.connect()
            assert conn.sock is not None
            pin_check(conn.sock, self.target.pins, self._held)
            conn.request("GET", "/metrics", headers={"Accept": "text/plain", "User-Agent": "modelseal-controls"})
            resp = conn.getresponse()
            body = resp.read(MAX_METRICS_REPLY + 1)
        except PinMismatch:
            raise
        except (OSError, http.client.HTTPException) as e:
            raise RegistryError(f"cannot read /metrics of {ep} ({type(e).__name__})") from None
        finally:
            conn.close()
        if resp.status == 403:
            raise AccessDenied(f"GET /metrics of {ep} denied: bind the controls identity the metrics role")
        if resp.status != 200 or len(body) > MAX_METRICS_REPLY:
            raise RegistryError(f"GET /metrics of {ep} answered {resp.status}")
        return parse_metrics(body.decode("utf-8", "replace"))

    def alerts(self, since: float) -> list[dict[str, Any]]:
        """The anomaly alerts the server's audit log records at or after ``since``."""
        try:
            doc = self.api.call("GET", f"alerts?since={max(0.0, since):.3f}")
        except AccessDenied as e:
            raise AccessDenied(f"{e} (bind the controls identity the auditor role)") from None
        alerts = doc.get("alerts")
        return [a for a in alerts if isinstance(a, dict)] if isinstance(alerts, list) else []


def _wait_metrics(watch: Watch, row: Row, before: dict[Any, float], want: tuple[MetricDelta, ...]) -> None:
    deadline = time.monotonic() + METRIC_WAIT
    while True:
        try:
            now = watch.metrics()
        except ModelsealError:
            now = None
        if now is not None:
            row.metrics = [
                {
                    "metric": d.shown(),
                    "alert": d.alert,
                    "expected": d.at_least,
                    "delta": total(now, d) - total(before, d),
                }
                for d in want
            ]
            if all(m["delta"] >= m["expected"] for m in row.metrics) or time.monotonic() >= deadline:
                return
        elif time.monotonic() >= deadline:
            row.metrics = [{"metric": d.shown(), "alert": d.alert, "expected": d.at_least, "delta": None} for d in want]
            return
        time.sleep(POLL)


def _wait_alerts(watch: Watch, rows: list[Row], start: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            seen = watch.alerts(start - CLOCK_SLACK)
        except ModelsealError:
            seen = []
        waiting = False
        for row in rows:
            for d in row.detectors:
                if d["entry"] is None:
                    hit = next(
                        (
                            a
                            for a in seen
                            if a.get("detector") == d["detector"]
                            and isinstance(a.get("time"), int | float)
                            and a["time"] >= row.started - CLOCK_SLACK
                        ),
                        None,
                    )
                    if hit is not None:
                        entry = hit.get("entry")
                        d["entry"], d["time"] = (entry if isinstance(entry, int) else 0), hit["time"]
                    waiting = waiting or hit is None
        if not waiting or time.monotonic() >= deadline:
            return
        time.sleep(max(POLL, 2.0))


def _measured(out: Outcome) -> tuple[MetricDelta, ...]:
    """The counters a burst moves, by what it did: its unwraps, or its denials."""
    unwraps, denied = out.data.get("unwraps"), out.data.get("denied")
    if out.data.get("mode") == "allowed" and isinstance(unwraps, int) and unwraps:
        ops = {"op": "unwrap", "result": "ok"}
        return (_delta("modelseal_key_operations_total", ops, unwraps, "ModelsealAnomalyDetected (via the detector)"),)
    if out.data.get("mode") == "denied" and isinstance(denied, int) and denied:
        return (_delta(DENIES, {"result": "deny"}, denied, "ModelsealAuthzDenyBurst"),)
    return ()


@dataclass
class Plan:
    """One run's inputs: the target, this host's key service and audit log, the controls
    identity, the broker key and repository it uses, canary keys and the TOTP secret."""

    target: Target
    svc: KeyService
    log: EventLog
    identity: Identity
    repo: str = "modelseal-controls/probe"
    key: str | None = None
    canaries: list[dict[str, object]] | None = None
    totp_secret: str | None = None
    timeout: float = 120.0


def _key_name(api: ApiClient, plan: Plan) -> str:
    if plan.key:
        return plan.key
    if plan.canaries:
        return str(plan.canaries[0].get("key"))
    try:
        keys = api.call("GET", "keys").get("keys")
    except ModelsealError:
        keys = None
    rows = keys if isinstance(keys, list) else []
    names = [k["name"] for k in rows if isinstance(k, dict) and isinstance(k.get("name"), str)]
    return names[0] if names else "modelseal-controls-probe"


def attempts(plan: Plan, api: ApiClient) -> list[tuple[str, Callable[[], Outcome]]]:
    """The attempts in the order they run."""
    t, ident = plan.target, plan.identity
    key = _key_name(api, plan)
    return [
        ("no-certificate", lambda: tls_attempts.no_certificate(t)),
        ("other-ca", lambda: tls_attempts.other_ca(t, ident)),
        ("expired-certificate", lambda: tls_attempts.expired_certificate(t, plan.svc, ident)),
        ("tls-1.2", lambda: tls_attempts.tls12(t)),
        ("pin-mismatch", lambda: tls_attempts.pin_mismatch(t, plan.log)),
        ("plaintext-push", lambda: api_attempts.plaintext_push(api.transport, plan.repo)),
        ("reader-rotate", lambda: api_attempts.reader_rotate(api, key)),
        ("otp-replay", lambda: api_attempts.otp_replay(api, key, ident, plan.totp_secret)),
        ("unwrap-burst", lambda: api_attempts.unwrap_burst(api, key, ident.env, plan.canaries)),
    ]


def run(plan: Plan, only: tuple[str, ...] = ()) -> Report:
    """Every attempt (or those named in ``only``), each judged (``controlsrecord.Row.judge``)."""
    api = ApiClient(plan.target.transport())
    try:
        watch = Watch(plan.target, api)
        watch.metrics()  # before anything: an identity that cannot read both tests nothing
        watch.alerts(time.time())
        report = Report(str(plan.target.endpoint), plan.identity.uri, time.time(), [])
        for name, attempt in attempts(plan, api):
            if only and name not in only:
                continue
            e = EXPECT[name]
            row = Row(name, e.title, e.refusal)
            before = watch.metrics()
            row.started = time.time()
            out = attempt()
            row.refused, row.tested, row.detail = out.refused, out.tested, out.detail
            row.refusal_expected, row.local_alert = out.refusal_expected, out.alerted
            if out.tested and out.refused is not None:
                _wait_metrics(watch, row, before, e.metrics + _measured(out))
                row.detectors = [{"detector": d, "entry": None} for d in e.detectors]
            report.rows.append(row)
        _wait_alerts(watch, report.rows, report.started, plan.timeout)
        for row in report.rows:
            row.judge()
        report.finished = time.time()
        return report
    finally:
        api.close()


__all__ = ["CLOCK_SLACK", "EXPECT", "Expect", "Plan", "Watch", "attempts", "parse_metrics", "run", "total"]
