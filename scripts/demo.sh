#!/usr/bin/env bash
# One command: install modelseal into .venv and run a short demo on the embedded
# defaults (local keystore, local files, a registry on SQLite and a folder on 127.0.0.1).
# Everything it makes goes under ./demo-out.
set -euo pipefail
. "$(dirname "$0")/setup.sh" server
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
echo "== the registry: an internal CA, a server and a client certificate (24 h, P-256, SPIFFE identities)"
# The dev environment: its artifacts may be sealed to local: keys (in prod, the standards
# require a Transit, PKCS#11, AWS KMS or broker key).
"$MS" ca init --trust-domain demo.example >/dev/null
"$MS" cert issue demo-registry --kind server --env dev --ip 127.0.0.1 --out "$OUT/server-tls" >/dev/null
"$MS" cert issue demo-trainer --kind service --env dev --out "$OUT/client-tls" >/dev/null
echo "== governance: every request is decided by Cedar, default deny; a first security officer"
"$MS" cert issue demo-officer --kind user --env dev --out "$OUT/officer-tls" >/dev/null
"$MS" key create modelseal-governance >/dev/null  # the KEK that seals the officers' TOTP secrets
"$MS" access bootstrap --data "$OUT/registry" --officer spiffe://demo.example/dev/user/demo-officer
PORT="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
echo "== modelseal serve on 127.0.0.1:$PORT (TLS 1.3, client certificates required, ciphertext only)"
MPORT="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$MS" serve --listen "127.0.0.1:$PORT" --tls-dir "$OUT/server-tls" --data "$OUT/registry" --workers 1 \
  --metrics-listen "127.0.0.1:$MPORT" --console 2>"$OUT/serve.log" &
SERVE_PID=$!
trap 'kill "$SERVE_PID" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  grep -q "listening" "$OUT/serve.log" 2>/dev/null && break
  kill -0 "$SERVE_PID" 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 0.1
done
PINS="$("$MS" ca pins --json | "$VENV/bin/python" -c 'import json, sys; d = json.load(sys.stdin); print("--pin", d["live"], "--pin", d["backup"])')"
MODELSEAL_REGISTRY_PINS="$("$MS" ca pins --json | "$VENV/bin/python" -c 'import json, sys; d = json.load(sys.stdin); print(d["live"] + "," + d["backup"])')"
export MODELSEAL_REGISTRY_PINS
officer() { MODELSEAL_TLS_DIR="$OUT/officer-tls" "$MS" "$@" --server "127.0.0.1:$PORT"; }
echo "== the officer enrols TOTP (step-up MFA), then binds the trainer as publisher for a day"
TOTP_URI="$(officer mfa enroll 2>/dev/null)"  # the secret is shown once; here it stays in this shell
# An authenticator app's code, now and for the next 30 s step (each code is accepted once).
# The secret goes through the environment of that one command, never argv (other users can read argv).
otp() { TOTP_URI="$TOTP_URI" "$VENV/bin/python" -c 'import os, sys, time, pyotp; print(pyotp.parse_uri(os.environ["TOTP_URI"]).at(time.time() + 30 * int(sys.argv[1])))' "$1"; }
otp 0 | officer mfa confirm
otp 1 | officer access bind spiffe://demo.example/dev/service/demo-trainer --role publisher --expires 1d --reason "the demo's trainer"
echo "== an identity without a role is refused, in one line naming why"
# shellcheck disable=SC2086
"$MS" pull "127.0.0.1:$PORT/demo/model:v1" "$OUT/refused.sealed" --tls-dir "$OUT/officer-tls" $PINS || true
echo "== modelseal push (the signature travels as an OCI referrer), then pull into a new place"
# shellcheck disable=SC2086  # PINS is two flags with their values
"$MS" push "$OUT/model.sealed" "127.0.0.1:$PORT/demo/model:v1" --tls-dir "$OUT/client-tls" $PINS
# A trust policy: pull verifies the signature under it before anything lands in the destination.
cat >"$OUT/trust.toml" <<TOML
version = 1
strict = true
[signers.release]
keys = ["$OUT/release.pub"]
[[rules]]
artifacts = ["*"]
environments = ["*"]
signers = ["release"]
TOML
chmod 600 "$OUT/trust.toml"
# shellcheck disable=SC2086
MODELSEAL_TRUST="$OUT/trust.toml" "$MS" pull "127.0.0.1:$PORT/demo/model:v1" "$OUT/pulled.sealed" --tls-dir "$OUT/client-tls" $PINS
echo "== the web console (--console): a one-time sign-in link for the officer's certificate, redeemed once"
# What a browser does with the link: show it, sign in (a Secure, HttpOnly, SameSite=Strict cookie),
# then read the pages. The link is a secret for 60 s: it goes through the environment, never argv.
CONSOLE_LINK="$(officer console login --json | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["url"])')" \
  "$VENV/bin/python" - "$OUT/server-tls/ca.pem" <<'PY'
import http.client, os, re, ssl, sys
from urllib.parse import urlencode, urlsplit
link = urlsplit(os.environ["CONSOLE_LINK"])
ctx = ssl.create_default_context(cafile=sys.argv[1])
def ask(method, path, body=None, cookie=""):
    c = http.client.HTTPSConnection(link.hostname, link.port, context=ctx, timeout=30)
    h = {"Origin": f"https://{link.netloc}", "Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"}
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    return r.status, r.getheader("Set-Cookie", ""), r.read().decode()
_, _, shown = ask("GET", f"{link.path}?{link.query}")
print(" ", re.search(r"signs you in as <code[^>]*>([^<]+)", shown).group(1))
status, cookie, _ = ask("POST", "/ui/login", urlencode({"t": link.query.split("t=", 1)[1]}))
jar = cookie.split(";", 1)[0]
print("  signed in:", status, "; cookie:", "; ".join(a.strip() for a in cookie.split(";")[1:] if "=" not in a or "SameSite" in a))
for page in ("/ui/", "/ui/approvals", "/ui/certificates", "/ui/audit"):
    status, _, body = ask("GET", page, cookie=jar)
    print(f"  {page:<17} {status}  {re.search(r'<h1>([^<]+)</h1>', body).group(1)}")
print("  (the same Cedar decisions as the API: reading the audit log is the auditor's role, not the officer's)")
again, _, _ = ask("POST", "/ui/login", urlencode({"t": link.query.split("t=", 1)[1]}))
print("  the same link again:", again)
PY
echo "== Prometheus figures on the loopback listener (also GET /metrics over mTLS for role metrics)"
"$VENV/bin/python" -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
  "http://127.0.0.1:$MPORT/metrics" | grep -E '^modelseal_(authz_decisions_total|tls_handshakes_total|key_version_age_seconds)' | head -6
kill -TERM "$SERVE_PID" && wait "$SERVE_PID" || true
trap - EXIT
echo "== modelseal scan: what is still unprotected, found by content whatever the name (exit 19 above --fail-on)"
"$VENV/bin/python" - "$OUT/stray/notes.txt" <<'PY'  # a real safetensors file under a harmless name
import json, pathlib, struct, sys
header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
path = pathlib.Path(sys.argv[1])
path.parent.mkdir(parents=True, exist_ok=True)
path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
PY
MODELSEAL_TRUST="$OUT/trust.toml" "$MS" scan "$OUT/model.sealed" "$OUT/pulled.sealed" "$OUT/stray" --fail-on 1 | tail -4
echo "== backup: an offline recovery key split 2-of-3, a sealed, signed and chained backup, a restore drill"
cp "$OUT/trust.toml" "$MODELSEAL_HOME/trust.toml"
cat >"$MODELSEAL_HOME/config.toml" <<TOML
trust_policy = "trust.toml"
[environments.dev]
keys = ["local:demo-kek"]
[backup]
recovery_keys = ["recovery:offline"]
TOML
chmod 600 "$MODELSEAL_HOME/config.toml"
"$MS" backup keygen --name offline --shares 3 --threshold 2 --out "$OUT/recovery-shares" | tail -1
"$MS" backup create --to "$OUT/backups" --registry-data "$OUT/registry"
# In an isolated home: the parts unsealed, the keystore reopened, every artifact in the registry
# opened and checked against its signature, the audit log against the backup's tree head.
"$MS" backup drill --from "$OUT/backups" --registry-data "$OUT/registry" --rto 1h --rpo 1d | tail -5
echo "== the signed compliance evidence bundle (JSON + a self-contained HTML report) and its check"
"$MS" evidence export --from "$(date -u -d '-1 day' +%Y-%m-%d)" --to "$(date -u -d '+1 day' +%Y-%m-%d)" --out "$OUT/evidence" | tail -2
"$MS" evidence verify "$OUT/evidence" | tail -2
echo "== every key operation and every authorization decision is in the tamper-evident audit log"
"$MS" audit log | tail -4
"$MS" audit verify
echo "demo OK (outputs in demo-out/)"
