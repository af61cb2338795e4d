#!/usr/bin/env bash
# One command: install modelseal into .venv and run a short demo on the embedded
# defaults (local keystore, local files). Everything it makes goes under ./demo-out.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
MS="$VENV/bin/modelseal"
OUT="$ROOT/demo-out"
rm -rf "$OUT"
mkdir -p "$OUT"
export MODELSEAL_HOME="$OUT/home"
# A throwaway passphrase for the demo, passed by environment (never on argv).
MODELSEAL_PASSPHRASE="$("$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')"
export MODELSEAL_PASSPHRASE

echo "== a sample Hugging Face-style model folder"
"$VENV/bin/python" - "$OUT/model" <<'PY'
import json, os, sys, pathlib
root = pathlib.Path(sys.argv[1]); (root / "tokenizer").mkdir(parents=True)
(root / "config.json").write_text(json.dumps({"model_type": "demo", "hidden_size": 64}))
(root / "model.safetensors").write_bytes(os.urandom(3 * 1024 * 1024))
(root / "tokenizer" / "tokenizer.json").write_text(json.dumps({"vocab": {"hello": 1}}))
PY
find "$OUT/model" -type f | sed "s|$OUT/||"

echo "== modelseal init; modelseal key create demo-kek"
"$MS" init
"$MS" key create demo-kek >/dev/null
echo "== modelseal signing-key: a P-256 key pair for signing (model-signing compatible)"
"$MS" signing-key "$OUT/release.pem" "$OUT/release.pub" --algorithm ecdsa-p256-sha256
echo "== modelseal seal model -> model.sealed, signed in the same pass (file names are not visible)"
"$MS" seal "$OUT/model" "$OUT/model.sealed" --key demo-kek --context artifact=demo --sign-key "$OUT/release.pem" --name demo-model
find "$OUT/model.sealed" -type f | sed "s|$OUT/||"
echo "== modelseal verify: keyless (no keystore, no passphrase needed; an empty home of mode 700)"
mkdir -p -m 700 "$OUT/verifier-home"
env -u MODELSEAL_PASSPHRASE MODELSEAL_HOME="$OUT/verifier-home" "$MS" verify "$OUT/model.sealed" --public-key "$OUT/release.pub"
echo "== modelseal inspect model.sealed"
"$MS" inspect "$OUT/model.sealed"
echo "== open it back: one member read straight into memory, then the whole folder"
"$VENV/bin/python" - "$OUT/model.sealed" <<'PY'
import sys, modelseal
with modelseal.open(sys.argv[1], member="config.json") as f:
    print("config.json ->", f.read().decode())
PY
"$MS" unseal "$OUT/model.sealed" "$OUT/restored"
diff -r --exclude=model.sig "$OUT/model" "$OUT/restored" && echo "restored folder is identical to the original"
echo "   ...and carries restored/model.sig, an OpenSSF model-signing signature over the plaintext"
echo "== rotate the key and rewrap (header only)"
"$MS" key rotate demo-kek >/dev/null
"$MS" rewrap "$OUT/model.sealed"
"$MS" verify "$OUT/model.sealed" --public-key "$OUT/release.pub" | tail -1
echo "== every key operation is in the tamper-evident audit log"
"$MS" audit log | tail -4
"$MS" audit verify
echo "demo OK (outputs in demo-out/)"
