#!/usr/bin/env bash
# One command: install modelseal with its test extras into .venv, lint, type-check, run every test.
set -euo pipefail
. "$(dirname "$0")/setup.sh" test
cd "$ROOT"
"$VENV/bin/ruff" check src tests benchmarks
"$VENV/bin/ruff" format --check src tests benchmarks
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest tests "$@"
