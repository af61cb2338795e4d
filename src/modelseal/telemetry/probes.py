"""Detectors of single intrusion attempts that need no baseline (docs/monitoring.md, "Anomaly
detection"; docs/controls.md): each fires on the first event of its kind, so a probe is an
alert even when it is alone. Same protocol as the other detectors (``detectbase.Detector``:
``SPEC``, ``feed(event, ctx) -> list[Detection]``, state in ``Table``s); configured in
``[monitor.detectors.NAME]``. ``dedupe`` (default 300 s, per principal) is shorter than any
sensible ``modelseal controls test`` schedule, so each run's probes alert again.

- ``content-refused``: a push the ``sealed-only`` content policy refused (the server's
  ``content-refused`` audit event, ``server.refusals``): plaintext or unknown content sent
  to the registry, by mistake or to plant it.
- ``privilege-probe``: a denied key-admin, governance or policy action (those that need
  step-up MFA, ``governance.model.MFA_REQUIRED``) whose deny is Cedar's default deny: no
  policy permits it for any role the principal holds, so it reached for a privilege it does
  not have (a key-admin without a fresh code is denied by ``gov-step-up-mfa``: not a probe).
- ``otp-replay``: a step-up code presented again (the server's ``mfa-replay`` event): the
  code was seen by someone else, or a client replays requests.
- ``unwrap-ceiling``: an absolute cap per principal: more than ``limit`` unwrap operations
  (the key service's ``unwrap`` events, any result), or more than ``denied`` denied
  ``key.unwrap`` decisions, within ``window`` seconds (a sliding estimate over two fixed
  windows). A Transit batch is one ``unwrap`` event for up to 100 keys (``brokerops``), so
  the cap counts provider calls there, not keys.

Pure: no I/O, no clock; the times are the events'.
"""

from __future__ import annotations

from modelseal.governance.model import MFA_REQUIRED
from modelseal.telemetry.detectbase import DAY, SEP, Context, Detection, Detector, Spec, add_evidence, principal
from modelseal.telemetry.secevents import SecurityEvent

PRIVILEGED = frozenset(MFA_REQUIRED)
DEDUPE = 300.0


def _subject(ev: SecurityEvent, who: str, **more: str) -> dict[str, str]:
    return {"identity": who, "source": ev.source or "", **more}


class ContentRefused(Detector):
    SPEC = Spec("content-refused", "warning", {"dedupe": DEDUPE}, {}, "a push the sealed-only content policy refused")

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        if ev.kind != "audit" or ev.operation != "content-refused":
            return []
        who = principal(ev) or "?"
        repo = (ev.key or "?").removeprefix("push ")
        summary = f"{who} pushed content the sealed-only policy refused ({repo})"
        return [self.found(ev, _subject(ev, who), summary, None, who)]


class PrivilegeProbe(Detector):
    SPEC = Spec(
        "privilege-probe", "warning", {"dedupe": DEDUPE}, {}, "a privileged action no role of the principal permits"
    )

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        if ev.kind != "audit" or ev.operation != "authorize" or ev.action not in PRIVILEGED:
            return []
        if ev.result != "deny:default":
            return []
        who = principal(ev) or "?"
        summary = f"{who} asked for {ev.action} on {ev.resource}, which no role it holds permits"
        return [self.found(ev, _subject(ev, who, key=ev.resource or ""), summary, None, who)]


class OtpReplay(Detector):
    SPEC = Spec("otp-replay", "critical", {"dedupe": DEDUPE}, {}, "a step-up code presented a second time")

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        if ev.kind != "audit" or ev.operation != "mfa-replay":
            return []
        who = principal(ev) or "?"
        summary = f"a step-up code of {who} was presented again ({ev.key or 'mfa:totp'})"
        return [self.found(ev, _subject(ev, who), summary, None, who)]


class UnwrapCeiling(Detector):
    SPEC = Spec(
        "unwrap-ceiling",
        "critical",
        {"limit": 1000, "denied": 10, "window": 60.0, "dedupe": DEDUPE},
        {"limit": (1.0, 1e9), "denied": (1.0, 1e9), "window": (1.0, DAY)},
        "more unwraps (or denied unwraps) of one principal within a window than an absolute cap",
    )

    def feed(self, ev: SecurityEvent, ctx: Context) -> list[Detection]:
        if ev.kind != "audit":
            return []
        if ev.operation == "unwrap":
            kind, what = "n", ev.key or ""
        elif ev.operation == "authorize" and ev.action == "key.unwrap" and ev.outcome == "denied":
            kind, what = "d", ev.resource or ""
        else:
            return []
        who = principal(ev)
        if who is None:
            return []
        window = self.p.num("window")
        b = int(ev.time // window)
        row = self.table.get(who) or {"b": b, "n": 0, "d": 0, "pn": 0, "pd": 0, "f": -1}
        if b != row["b"]:  # the current window becomes the previous one (or both empty after a gap)
            keep = b == row["b"] + 1
            row.update(b=b, pn=row["n"] if keep else 0, pd=row["d"] if keep else 0, n=0, d=0)
            row.pop("ev", None)
        row[kind] += 1
        add_evidence(row, ev.entry)
        self.table.touch(who, row)
        share = 1.0 - (ev.time % window) / window  # of the previous window still inside the sliding one
        count = row[kind] + row["p" + kind] * share
        limit = self.p.num("limit" if kind == "n" else "denied")
        if count <= limit or row["f"] == b:
            return []
        row["f"] = b
        what_ = "unwraps" if kind == "n" else "denied unwraps"
        summary = f"{who}: {count:.0f} {what_} within {window:g} s, above the ceiling of {limit:g} (latest: {what})"
        found = self.found(ev, _subject(ev, who, key=what), summary, row, f"{who}{SEP}{kind}")
        row.pop("ev", None)
        return [found]


PROBES: tuple[type[Detector], ...] = (ContentRefused, PrivilegeProbe, OtpReplay, UnwrapCeiling)
NAMES = tuple(p.SPEC.name for p in PROBES)

__all__ = ["NAMES", "PRIVILEGED", "PROBES", "ContentRefused", "OtpReplay", "PrivilegeProbe", "UnwrapCeiling"]
