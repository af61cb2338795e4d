"""The monitor's settings: config.toml's ``[monitor]`` (the keys the monitor reads),
``[monitor.detectors.NAME]`` and ``[monitor.respond]`` (docs/monitoring.md, "Anomaly
detection").

``[monitor]``: ``interval`` (seconds between passes, default 5), ``lease`` (seconds a holder
keeps the lease without renewing it, default 30), ``batch`` (audit entries and netevents
read per pass, default 5000), ``settle`` (seconds an event waits before it is read, default
3), ``backlog`` (detections older than this many seconds are not alerted, default 86400),
``enabled`` (default true). Other ``[monitor]`` keys are other readers' (the metrics pass,
``[monitor.alerts]``, ``[monitor.export]``) and are left to them.

``[monitor.respond]``: ``DETECTOR = "alert" | "suspend-identity" | "hold-key" |
"refuse-source"``; every detector alerts only by default. Each detector's own table is
checked by ``telemetry.detectbase.Params`` when the pipeline is built (``check``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modelseal.keys.config import ConfigError, config_table
from modelseal.telemetry.correlate import Pipeline
from modelseal.telemetry.detectors import CORRELATED, NAMES

HOLD_OF = {"suspend-identity": "identity", "hold-key": "key", "refuse-source": "source"}
RESPONSES = ("alert", *HOLD_OF)
_NUMBERS = {
    "interval": (5.0, 0.5, 3600.0),
    "lease": (30.0, 2.0, 3600.0),
    "batch": (5000, 10, 1_000_000),
    "settle": (3.0, 0.0, 600.0),
    "backlog": (86400.0, 0.0, 365 * 86400.0),
}


@dataclass(frozen=True)
class MonitorConfig:
    interval: float = 5.0
    lease: float = 30.0
    batch: int = 5000
    settle: float = 3.0
    backlog: float = 86400.0
    enabled: bool = True
    detectors: dict[str, Any] = field(default_factory=dict)
    respond: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> MonitorConfig:
        """From a ``[monitor]`` table; a ConfigError names the first bad setting."""
        values: dict[str, Any] = {}
        for name, (default, low, high) in _NUMBERS.items():
            value = table.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"config: monitor.{name} must be a number")
            if not low <= value <= high:
                raise ConfigError(f"config: monitor.{name} must be from {low:g} to {high:g}")
            values[name] = int(value) if isinstance(default, int) else float(value)
        if values["lease"] < 2 * values["interval"]:
            raise ConfigError("config: monitor.lease must be at least twice monitor.interval")
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError("config: monitor.enabled must be true or false")
        detectors = table.get("detectors", {})
        if not isinstance(detectors, dict):
            raise ConfigError("config: [monitor.detectors] must be a table")
        respond = table.get("respond", {})
        if not isinstance(respond, dict):
            raise ConfigError("config: [monitor.respond] must be a table")
        for name, action in respond.items():
            if name not in (*NAMES, CORRELATED):
                raise ConfigError(f"config: [monitor.respond] names an unknown detector {str(name)[:64]!r}")
            if action not in RESPONSES:
                raise ConfigError(f"config: monitor.respond.{name} must be one of {', '.join(RESPONSES)}")
        config = cls(**values, enabled=enabled, detectors=dict(detectors), respond=dict(respond))
        config.check()
        return config

    def check(self) -> None:
        """Build the pipeline once: every detector's table is checked (ConfigError)."""
        Pipeline(self.detectors)


def load(home: Any = None) -> MonitorConfig:
    """``[monitor]`` of config.toml (``$MODELSEAL_HOME``, or ``home``)."""
    return MonitorConfig.from_table(config_table("monitor", home))


__all__ = ["HOLD_OF", "RESPONSES", "MonitorConfig", "load"]
