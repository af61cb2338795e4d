"""deploy/prometheus/alerts.yml: promtool checks the rules and runs their unit tests; every
alert fires in a test, has its runbook entry, and reads only metrics modelseal exports; the
runbook's commands exist."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelseal.cli import build_parser
from modelseal.telemetry import metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
needs_promtool = pytest.mark.skipif(
    not Path(PROMTOOL).is_file(),
    reason="promtool is not installed (Debian package prometheus; scripts/test.sh installs it)",
)

# The gauges computed at scrape time (docs/monitoring.md, "Metrics"): not objects of telemetry.metrics.
SCRAPE_GAUGES = {
    "modelseal_key_version_age_seconds",
    "modelseal_key_cryptoperiod_seconds",
    "modelseal_certificate_expiry_timestamp_seconds",
    "modelseal_certificate_not_before_timestamp_seconds",
    "modelseal_artifacts",
    "modelseal_scan_findings",
    "modelseal_scan_last_timestamp_seconds",
    "modelseal_scan_errors",
    "modelseal_holds",
    "modelseal_backup_last_success_timestamp_seconds",
    "modelseal_backup_drill_last_success_timestamp_seconds",
    "modelseal_backup_unencrypted",
    "modelseal_audit_log_verified",
    "modelseal_audit_log_last_verification_timestamp_seconds",
    "modelseal_state_pass_success",
    "modelseal_state_pass_last_success_timestamp_seconds",
    "modelseal_revocation_list_next_update_timestamp_seconds",
    "modelseal_build_info",
}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def unit_tests() -> list[dict[str, Any]]:
    return [t for f in TESTS for group in yaml.safe_load(f.read_text())["tests"] for t in group["alert_rule_test"]]


def exported_names() -> set[str]:
    """Every series name the objects of telemetry.metrics expose."""
    names = set(SCRAPE_GAUGES)
    for family in metrics.REGISTRY.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "count", "sum")}
        else:
            names.add(family.name)
    return names


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def anchors() -> set[str]:
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", RUNBOOK.read_text(), re.MULTILINE)}


@needs_promtool
def test_promtool_check_rules() -> None:
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    out = subprocess.run(
        [PROMTOOL, "test", "rules", *map(str, TESTS)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert out.stdout.count("SUCCESS") == len(TESTS)


@needs_promtool
def test_promtool_fails_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests can fail: the same test expecting another severity, or no alert, is refused."""
    text = (RULES.parent / "tests" / "tls_test.yml").read_text().replace("../alerts.yml", str(RULES))
    for wrong in (
        text.replace("severity: critical", "severity: warning", 1),
        text.replace("exp_alerts: []", "exp_alerts: [{exp_labels: {severity: warning}}]", 1),
    ):
        assert wrong != text
        path = tmp_path / "wrong_test.yml"
        path.write_text(wrong)
        out = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "FAILED" in out.stdout + out.stderr


def test_every_alert_fires_in_a_unit_test() -> None:
    names = {r["alert"] for r in rules()}
    tested = unit_tests()
    fired = {t["alertname"] for t in tested if t.get("exp_alerts")}
    quiet = {t["alertname"] for t in tested if not t.get("exp_alerts")}
    assert names - fired == set(), "alerts that no promtool test fires"
    assert {t["alertname"] for t in tested} <= names, "tests of alerts that do not exist"
    # Healthy series: most alerts are also shown NOT to fire (before, after, or on good data).
    assert len(quiet) >= len(names) * 2 // 3, sorted(names - quiet)


def test_every_alert_has_severity_annotations_and_a_runbook_entry() -> None:
    found = anchors()
    for r in rules():
        name = r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical"), name
        notes = r["annotations"]
        assert notes["summary"] and notes["description"], name
        assert notes["runbook_url"] == f"docs/runbook.md#{name.lower()}", name
        assert name.lower() in found, f"docs/runbook.md has no entry {name}"


def test_alerts_read_only_exported_metrics() -> None:
    known = exported_names()
    assert "modelseal_tls_handshakes_total" in known and "modelseal_anomaly_alerts_total" in known
    used: set[str] = set()
    for r in rules():
        tokens = set(re.findall(r"modelseal_[a-z_]+", r["expr"]))
        assert tokens or re.search(r"\bup\{job=", r["expr"]), r["alert"]  # or Prometheus's own up (scrape health)
        assert tokens <= known, f"{r['alert']}: {sorted(tokens - known)} are not exported"
        used |= tokens
    # The unit tests feed the same names (a typo there would test nothing).
    series = {m for f in TESTS for m in re.findall(r"series: '(modelseal_[a-z_]+)\{", f.read_text())}
    assert series <= known and used <= series, sorted(used - series)


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def test_runbook_commands_exist() -> None:
    """Every `modelseal ...` in the runbook names a real command, subcommand and options."""
    spans = [" ".join(s.split()) for s in re.findall(r"`(modelseal [^`]+)`", RUNBOOK.read_text())]
    assert len(spans) > 30
    top = _subparsers(build_parser())
    for span in spans:
        words = span.split()[1:]
        assert words[0] in top, span
        parser = top[words[0]]
        subs = _subparsers(parser)
        if subs and len(words) > 1 and re.fullmatch(r"[a-z][a-z-]*", words[1]):
            assert words[1] in subs, span
            parser = subs[words[1]]
        for flag in (w for w in words if w.startswith("--")):
            assert flag in _options(parser), span
    # The first steps the issue asks for are all there.
    for needed in (
        "cert revoke",
        "key rotate",
        "reencrypt",
        "verify",
        "access holds",
        "access release",
        "audit verify",
    ):
        assert any(s.startswith(f"modelseal {needed}") for s in spans), needed
