# Sourced by demo.sh and test.sh: make .venv and install modelseal into it.
# Usage: . scripts/setup.sh [EXTRAS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
fi
VENV="$ROOT/.venv"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
if [ "${1:-}" = "test" ] || [ "${1:-}" = "ml" ]; then
  # torch==2.13.0 is a local CPU wheel on this machine image; any other spec downloads
  # several GB of CUDA build. Installed first, it satisfies the extras' ranges.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT${1:+[$1]}"
