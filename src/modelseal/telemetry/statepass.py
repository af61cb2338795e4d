"""The periodic pass behind the metrics that cost too much for a scrape (docs/monitoring.md).

``StatePass`` computes gauge families from the stores, each part on its own interval, and
publishes the latest of every part as one snapshot (``collect.write_snapshot``), which every
scrape yields (``collect.ScrapeCollector``):

- ``keys`` (``[monitor] metrics_interval``, default 60 s): per key, the age of its newest
  active version and the cryptoperiod (``modelseal_key_version_age_seconds{key}``,
  ``modelseal_key_cryptoperiod_seconds{key}``). The keys are the operator's: config.toml's
  environment and project keys (labelled by the URI as written), the broker's catalog
  (``broker:NAME``) and, where asked (``local_keys``: ``modelseal metrics --textfile``), this
  host's keystore. Versions are read (``KeyService.info``/``list``), never used; a local
  keystore is opened with ``MODELSEAL_PASSPHRASE`` or the agent only, never a prompt. The
  cryptoperiod is ``[scan] cryptoperiod_days`` (default 365: the ``std-cryptoperiod``
  standard), the one ``modelseal scan`` judges versions by.
- ``holds`` (same interval): active holds by kind (``governance.holds``, when present).
- ``audit`` (``[monitor] verify_interval``, default 300 s): the audit log verified, the
  entries since the last pass only, whole at the first pass and every
  ``full_verify_interval`` (default 86400 s; ``telemetry.auditpass``):
  ``modelseal_audit_log_verified`` 1/0 (0 also when it cannot be checked), the time it last
  verified, and the last ``backup-create`` and ``backup-drill`` with result ``ok``.
- ``artifacts`` (``[monitor] scan_interval``, default 600 s): ``modelseal_artifacts{state}``
  from ``telemetry.scanregistry.protection_states`` over the registry (headers only).

A part that fails keeps no figures (its gauges vanish rather than go stale) and logs one
line; the others are unaffected; the audit part instead says the log is not verified (0)
and keeps the time it last was. Every part's own state is published too:
``modelseal_state_pass_success{part}`` (1 if it computed its figures the last time it ran,
else 0) and ``modelseal_state_pass_last_success_timestamp_seconds{part}`` (0: not yet), so
a part that fails or stops running is an alert, not a silence. The snapshot is published
after each part, so a long first verification holds back no other figure. In
``modelseal serve`` one worker runs the pass.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from modelseal.errors import KeystoreError, ModelsealError
from modelseal.keys.config import ConfigError, config_table
from modelseal.keys.keystore import PASSPHRASE_ENV
from modelseal.keys.providers.base import KeyInfo
from modelseal.keys.providers.local import LocalProvider
from modelseal.keys.service import KeyService, printable
from modelseal.telemetry.auditpass import FULL_VERIFY, AuditPass
from modelseal.telemetry.collect import Family, write_snapshot

log = logging.getLogger("modelseal.telemetry")

DAY = 86400.0
CRYPTOPERIOD_DAYS = 365  # governance/policies/default.cedar, std-cryptoperiod
INTERVALS = {"keys": 60.0, "holds": 60.0, "audit": 300.0, "artifacts": 600.0, "audit-full": FULL_VERIFY}
_CONFIG = {"keys": "metrics_interval", "holds": "metrics_interval", "audit": "verify_interval"}
_CONFIG |= {"artifacts": "scan_interval", "audit-full": "full_verify_interval"}
PARTS = ("keys", "holds", "audit", "artifacts")  # in the order they run ("audit-full": the audit part's)
ARTIFACT_STATES = ("sealed-signed", "sealed-unsigned", "revoked", "past-cryptoperiod", "plaintext")
HOLD_KINDS = ("identity", "key", "source")


def _seconds(table: dict[str, Any], name: str, default: float) -> float:
    value = table.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 1 <= value <= 7 * DAY:
        raise ConfigError(f"config: monitor.{name} must be a number of seconds from 1 to 604800")
    return float(value)


def intervals(monitor: dict[str, Any] | None = None) -> dict[str, float]:
    """Each part's interval from ``[monitor]`` (``monitor`` given, or config.toml's)."""
    table = config_table("monitor") if monitor is None else monitor
    return {part: _seconds(table, _CONFIG[part], default) for part, default in INTERVALS.items()}


def cryptoperiod_days() -> int:
    value = config_table("scan").get("cryptoperiod_days", CRYPTOPERIOD_DAYS)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 3650:
        raise ConfigError("config: scan.cryptoperiod_days must be a number of days from 1 to 3650")
    return value


def _env_passphrase() -> bytes:
    value = os.environ.get(PASSPHRASE_ENV)
    if not value:
        raise KeystoreError(f"no {PASSPHRASE_ENV} (metrics never prompt)")
    return value.encode()


def quiet_local() -> LocalProvider:
    """The local keystore, opened without a prompt (the environment or the agent)."""
    return LocalProvider(passphrase=_env_passphrase)


def newest_active_age(info: KeyInfo, now: float) -> float | None:
    active = [v for v in info.versions if v.state == "active" and v.created > 0]
    if not active:
        return None
    return max(0.0, now - max(active, key=lambda v: v.version).created)


@dataclass
class Sources:
    """What the pass reads; any of them may be absent. ``svc``: the key service (its
    providers and config.toml); ``catalog``: a callable listing the broker catalog as
    (name, backing URI); ``holds_target``: the governance database; ``audit``: the audit
    log (``verify_from``, else ``verified_events``); ``registry``: the registry for ``protection_states``."""

    svc: KeyService | None = None
    catalog: Callable[[], Iterable[tuple[str, str]]] | None = None
    local_keys: bool = False
    holds_target: str | None = None
    audit: Any = None
    registry: Any = None


def key_families(src: Sources, now: float) -> list[Family]:
    svc = src.svc
    ages: dict[str, float] = {}
    if svc is not None:
        local = KeyService(providers={"local": quiet_local()}, config=svc.config)

        def info(uri: str) -> KeyInfo:
            return (local if uri.startswith("local:") else svc).info(uri)

        wanted: dict[str, str] = {}  # label -> backing URI
        cfg = svc.config
        for keys in [*cfg.environments.values(), *(k for p in cfg.projects.values() for k in p.values())]:
            wanted.update({k: k for k in keys})
        for name, backing in src.catalog() if src.catalog else ():
            wanted[f"broker:{name}"] = backing
        if src.local_keys:
            try:
                ages.update({i.uri: a for i in local.list("local") if (a := newest_active_age(i, now)) is not None})
            except (ModelsealError, OSError) as e:
                log.info("metrics: local key versions unknown (%s)", printable(str(e))[:160])
        for label, uri in sorted(wanted.items()):
            try:
                age = newest_active_age(info(uri), now)
            except (ModelsealError, ValueError, OSError) as e:
                log.info("metrics: versions of %s unknown (%s)", printable(label), printable(str(e))[:160])
                continue
            if age is not None:
                ages[label] = age
    period = cryptoperiod_days() * DAY
    keyed = tuple(((k,), ages[k]) for k in sorted(ages))
    return [
        Family("modelseal_key_version_age_seconds", "Age of the newest active version of each key.", ("key",), keyed),
        Family(
            "modelseal_key_cryptoperiod_seconds",
            "The cryptoperiod a key version may be used for (scan.cryptoperiod_days).",
            ("key",),
            tuple(((k,), period) for k in sorted(ages)),
        ),
    ]


def hold_families(src: Sources, now: float) -> list[Family]:
    if src.holds_target is None:
        return []
    try:
        holds = importlib.import_module("modelseal.governance.holds")  # lazily: the holds helper's module
    except ImportError:
        return []
    store = holds.HoldStore.open(src.holds_target)
    try:
        counts = store.counts()  # active holds per kind, every kind present
    finally:
        store.close()
    samples = tuple(((k,), float(counts.get(k, 0))) for k in HOLD_KINDS)
    return [Family("modelseal_holds", "Active holds pending review, by kind.", ("kind",), samples)]


def artifact_families(src: Sources, now: float) -> list[Family]:
    if src.registry is None:
        return []
    try:
        scanregistry = importlib.import_module("modelseal.telemetry.scanregistry")  # the scan helper's
    except ImportError:
        return []
    states = scanregistry.protection_states(src.registry)
    counts = {s: float(states.get(s, 0)) for s in ARTIFACT_STATES}
    samples = tuple(((s,), n) for s, n in counts.items())
    return [Family("modelseal_artifacts", "Artifacts in the registry by protection state.", ("state",), samples)]


@dataclass
class StatePass:
    """Run each part when due (``run_due``) and publish them together to ``directory``
    (the multi-process directory, or None: this process's memory)."""

    sources: Sources
    directory: str | None = None
    every: dict[str, float] = field(default_factory=lambda: dict(INTERVALS))
    clock: Callable[[], float] = time.time
    _latest: dict[str, list[Family]] = field(default_factory=dict)
    _due: dict[str, float] = field(default_factory=dict)
    _ok: dict[str, bool] = field(default_factory=dict)
    _success: dict[str, float] = field(default_factory=dict)
    audit: AuditPass = field(default_factory=AuditPass)

    def __post_init__(self) -> None:
        self.audit.full_every = self.every.get("audit-full", FULL_VERIFY)
        self._parts: dict[str, Callable[[Sources, float], list[Family]]] = {
            "keys": key_families,
            "holds": hold_families,
            "audit": self.audit.families,
            "artifacts": artifact_families,
        }

    def run_due(self) -> float:
        """Run the parts that are due, publish, and return the seconds until the next one."""
        for part, fn in self._parts.items():
            now = self.clock()
            if self._due.get(part, 0.0) > now:
                continue
            self._due[part] = now + self.every.get(part, INTERVALS[part])
            try:
                self._latest[part] = fn(self.sources, now)
                self._ok[part], self._success[part] = True, now
            except Exception as e:  # one part failing stops nothing; its figures go away (audit: "not verified")
                self._ok[part] = False
                self._latest[part] = self.audit.figures() if part == "audit" else []
                log.warning("metrics: the %s figures failed (%s: %s)", part, type(e).__name__, printable(str(e))[:160])
            write_snapshot(self.families(), self.directory)
        return max(0.5, min(self._due.values()) - self.clock())

    def families(self) -> list[Family]:
        """The latest figures of every part, and each part's own state."""
        ran = [p for p in PARTS if p in self._ok]
        status = [
            Family(
                "modelseal_state_pass_success",
                "1 if the part of the background pass computed its figures the last time it ran, else 0.",
                ("part",),
                tuple(((p,), 1.0 if self._ok[p] else 0.0) for p in ran),
            ),
            Family(
                "modelseal_state_pass_last_success_timestamp_seconds",
                "Time each part of the background pass last computed its figures (0: not yet).",
                ("part",),
                tuple(((p,), self._success.get(p, 0.0)) for p in ran),
            ),
        ]
        return [f for part in PARTS for f in self._latest.get(part, [])] + status

    def run_all(self) -> list[Family]:
        """Every part now (``modelseal metrics --textfile``); the families are returned."""
        self._due.clear()
        self.run_due()
        return self.families()


__all__ = [
    "ARTIFACT_STATES",
    "CRYPTOPERIOD_DAYS",
    "INTERVALS",
    "PARTS",
    "Sources",
    "StatePass",
    "cryptoperiod_days",
    "intervals",
    "newest_active_age",
    "quiet_local",
]
