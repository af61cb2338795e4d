#!/usr/bin/env bash
# One command: install modelseal with its test extras into .venv, lint, type-check, run every test.
set -euo pipefail
# SoftHSM2 for the pkcs11: provider tests (a Debian package; OpenBao and SeaweedFS come from PyPI).
if ! command -v softhsm2-util >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq softhsm2 >/dev/null
fi
. "$(dirname "$0")/setup.sh" test
cd "$ROOT"
"$VENV/bin/ruff" check src tests benchmarks
"$VENV/bin/ruff" format --check src tests benchmarks
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest tests "$@"
