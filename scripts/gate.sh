#!/usr/bin/env bash
# Pre-deploy gate: refuse to deploy any artifact that is tampered with, unsigned, or revoked.
#
#   scripts/gate.sh [--env ENV] TRUST.toml ARTIFACT...
#
# Needs no decryption key: it checks signatures over the ciphertext against the trust
# policy (with --strict, so unsigned artifacts fail whatever the policy says), and the
# policy's signed revocation list. Only sealed artifacts pass: a plaintext model (even
# one with a valid model-signing signature) is refused with exit 4. --env pins the
# environment every artifact must be sealed for. Exits 0 only if every artifact passes;
# otherwise with the first failure's exit code (docs/ci.md): 10 verification failed,
# 11 revoked, 12 revocation list missing/unsigned/expired, 2 bad policy, 4 not a sealed
# artifact.
set -uo pipefail
pin=()
if [ "${1:-}" = "--env" ] && [ $# -ge 2 ]; then
  pin=(--env "$2")
  shift 2
fi
if [ $# -lt 2 ]; then
  echo "usage: $0 [--env ENV] TRUST.toml ARTIFACT..." >&2
  exit 2
fi
trust=$1
shift
modelseal=${MODELSEAL:-modelseal}
status=0
for artifact in "$@"; do
  # "--": an artifact path is only ever a path, never an option (a file named --plaintext)
  err=$($modelseal verify --trust "$trust" --strict ${pin[@]+"${pin[@]}"} -- "$artifact" 2>&1 >/dev/null)
  rc=$?
  case $rc in
    0) echo "PASS    $artifact" ;;
    10) echo "REJECT  $artifact: ${err#modelseal: error: }" ;;
    11) echo "REVOKED $artifact: ${err#modelseal: error: }" ;;
    12) echo "ERROR   $artifact: revocation list: ${err#modelseal: error: }" ;;
    *) echo "ERROR   $artifact (exit $rc): ${err#modelseal: error: }" ;;
  esac
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then
    status=$rc
  fi
done
exit $status
