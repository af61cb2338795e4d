"""``modelseal scan``: what is still unprotected (docs/scan.md). The entry point over the targets:

- a local path (``scanlocal``), ``s3://BUCKET/PREFIX`` (``scans3``), ``oci://HOST[:PORT]/REPO``
  (``scanoci``): every file or object or layer by content (``sniff``), sealed ones by their
  header (``scanartifacts``): plaintext model files, and sealed artifacts that are unsigned,
  untrusted, revoked, wrapped only under disabled or too old KEK versions, or damaged;
- ``tls://HOST:PORT`` (``scantls``): the endpoint against Mozilla's modern profile (sslyze),
  its certificate's lifetime, and its pins.

Settings, besides the arguments (``ScanOptions``), come from ``[scan]`` in config.toml::

    [scan]
    sslyze_python = "/opt/sslyze/bin/python"   # MODELSEAL_SSLYZE_PYTHON; else sslyze on PATH
    cryptoperiod_days = 365                    # KEK versions older than this (std-cryptoperiod)
    keys = ["transit:prod-kek"]                # more keys whose versions to look up
    tls_dir = "/etc/modelseal/scan-tls"        # client certificate for tls:// (else [registry])

    [scan.pins]
    "registry.internal:5000" = ["<live pin>", "<backup pin>"]

Several targets make one report. Every target is checked first (a PATH, or one of the
schemes: ``ValueError`` otherwise, nothing scanned). A target failing as a whole (a bucket
that cannot be listed, a registry that cannot be reached or refusing its pins, a certificate
that cannot be parsed) is recorded in the report (``failed``, and an error) and the other
targets are still scanned: one target never hides the others' findings. A single file,
object or layer that cannot be read is an error of the report and the scan goes on. Either
way the report is incomplete (``ScanReport.incomplete``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelseal.errors import ModelsealError
from modelseal.keys.config import ConfigError, config_table
from modelseal.keys.service import KeyService
from modelseal.signing.trust import TrustPolicy
from modelseal.telemetry import scankeys
from modelseal.telemetry.scanartifacts import ScanContext
from modelseal.telemetry.scanmodel import ScanReport
from modelseal.telemetry.scansig import TrustCheck

_SCAN_KEYS = {"sslyze_python", "cryptoperiod_days", "keys", "tls_dir", "pins"}


@dataclass
class ScanOptions:
    policy: TrustPolicy | None = None  # the trust policy signatures are judged under
    svc: KeyService | None = None  # for key version states (None: unknown)
    now: float | None = None  # the clock (cryptoperiods, revocation list expiry)
    cryptoperiod_days: int | None = None  # default: [scan] cryptoperiod_days, else 365
    tls_dir: Path | None = None  # client certificate folder for oci:// and tls://
    pins: list[str] = field(default_factory=list)  # for oci:// and tls://: overrides the configured ones
    sslyze_python: str | None = None
    table: dict[str, Any] | None = None  # [scan] (None: read from config.toml)


def scan_table(home: Path | None = None) -> dict[str, Any]:
    """``[scan]`` of config.toml, checked."""
    table = config_table("scan", home)
    unknown = set(table) - _SCAN_KEYS
    if unknown:
        raise ConfigError(f"config: [scan] takes only {', '.join(sorted(_SCAN_KEYS))}")
    days = table.get("cryptoperiod_days", scankeys.CRYPTOPERIOD_DAYS)
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 3650:
        raise ConfigError("config: scan.cryptoperiod_days must be a number of days from 1 to 3650")
    keys = table.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise ConfigError("config: scan.keys must be a list of key URIs")
    for name in ("sslyze_python", "tls_dir"):
        if name in table and not (isinstance(table[name], str) and table[name]):
            raise ConfigError(f"config: scan.{name} must be a path")
    pins = table.get("pins", {})
    if not isinstance(pins, dict) or not all(
        isinstance(v, list) and all(isinstance(p, str) for p in v) for v in pins.values()
    ):
        raise ConfigError('config: [scan.pins] maps "HOST:PORT" to a list of pins')
    return table


def context(report: ScanReport, opts: ScanOptions, table: dict[str, Any]) -> ScanContext:
    now = time.time() if opts.now is None else opts.now
    days = opts.cryptoperiod_days or int(table.get("cryptoperiod_days", scankeys.CRYPTOPERIOD_DAYS))
    trust = TrustCheck(opts.policy, now=datetime.fromtimestamp(now, UTC), note=report.note)
    keys = scankeys.KeyStates(opts.svc, cryptoperiod_days=days, now=now, keys=table.get("keys", []), note=report.note)
    return ScanContext(report, trust, keys)


def scan(targets: list[str], opts: ScanOptions | None = None) -> ScanReport:
    """Scan every target into one report."""
    opts = opts or ScanOptions()
    table = opts.table if opts.table is not None else scan_table()
    for target in targets:
        check_target(target)
    report = ScanReport(" ".join(targets))
    start = time.monotonic()
    ctx = context(report, opts, table)
    for target in targets:
        try:
            scan_one(target, ctx, opts, table)
        except ModelsealError as e:
            report.failed.append(e)
            report.error(target, f"the scan of this target failed ({type(e).__name__}: {e})")
        except (ValueError, OSError) as e:  # what a target's parsers let through: never hide the rest
            report.error(target, f"the scan of this target failed ({type(e).__name__}: {str(e)[:200]})")
    report.elapsed = time.monotonic() - start
    return report


def check_target(target: str) -> None:
    """``ValueError`` for a target that is none of a PATH, s3://, oci://, tls://."""
    if "://" in target and not target.startswith(("s3://", "oci://", "tls://")):
        raise ValueError(f"scan takes a PATH, s3://BUCKET/PREFIX, oci://HOST/REPO or tls://HOST:PORT, not {target!r}")
    if not target:
        raise ValueError("scan takes a PATH, s3://BUCKET/PREFIX, oci://HOST/REPO or tls://HOST:PORT, not ''")
    if target.startswith("s3://"):
        from modelseal.telemetry.scans3 import parse_target

        parse_target(target)
    elif target.startswith("oci://"):
        from modelseal.registry.reference import parse_reference

        if parse_reference(target, default_tag="").endpoint is None:
            raise ValueError("oci:// needs HOST[:PORT]/REPO")
    elif target.startswith("tls://"):
        from modelseal.registry.reference import parse_endpoint

        parse_endpoint(target.removeprefix("tls://").rstrip("/"))


def scan_one(target: str, ctx: ScanContext, opts: ScanOptions, table: dict[str, Any]) -> None:
    if target.startswith("s3://"):
        from modelseal.telemetry import scans3

        scans3.scan_s3(target, ctx)
    elif target.startswith("oci://"):
        from modelseal.telemetry import scanoci

        scanoci.scan_oci(target, ctx, tls_dir=opts.tls_dir, pins=opts.pins or None)
    elif target.startswith("tls://"):
        from modelseal.telemetry import scantls

        scantls.scan_tls(target, ctx.report, scantls.TlsOptions.of(opts, table))
    else:
        from modelseal.telemetry import scanlocal

        scanlocal.scan_path(Path(target), ctx)


__all__ = ["ScanOptions", "check_target", "context", "scan", "scan_one", "scan_table"]
