"""The request-level intrusion attempts of ``modelseal controls test`` (docs/controls.md): a
plaintext push under ``sealed-only``, a reader asking to rotate a key, a replayed step-up
code and a burst of unwraps, each as the controls identity over its pinned connection.

- **Plaintext push** (f): a plain safetensors file (random weights, so a new digest each
  run) uploaded as one blob to ``REPO``; refused when the answer is the content policy's
  403. A refusal by Cedar (no permit to push to ``REPO``) never reached the content policy:
  not tested. An accepted blob is deleted again where the identity may, and said.
- **Reader rotates** (g): ``POST keys/NAME/rotate`` without a code; refused with a 403.
- **Replayed code** (h): only with the controls identity's enrolled TOTP secret in
  ``MODELSEAL_CONTROLS_TOTP`` (never argv) and a ``user`` identity (only users have MFA):
  one code sent twice on the same step-up route; the second must be refused as already used.
- **Burst of unwraps** (i): with canary wrapped keys (``controls.canaries``: worthless data
  keys a publisher wrapped once, each under its own ``artifact`` context), one unwrap request
  per canary; the data keys returned are dropped unread. An identity without ``key.unwrap``
  sends a burst of denied unwraps instead (``DENIED_BURST`` requests: below the server's
  per-identity denial limit, so each is decided and audited).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import time

import pyotp

from modelseal.errors import AccessDenied, GovernanceError, ModelsealError, RegistryError
from modelseal.keys.service import printable
from modelseal.pki.identity import Identity
from modelseal.registry.apiclient import ApiClient
from modelseal.registry.names import check_name
from modelseal.registry.transport import Transport
from modelseal.telemetry.attempts_tls import Outcome, not_tested

TOTP_ENV = "MODELSEAL_CONTROLS_TOTP"
DENIED_BURST = 15  # the server turns an identity's 21st denial within 10 s into 429, undecided
_SEALED_ONLY = "content policy sealed-only"
Item = dict[str, object]


def shown(text: str, limit: int = 200) -> str:
    """Server text as one escaped line of at most ``limit`` characters."""
    one = printable(" ".join(text.split()))
    return one[:limit] + ("..." if len(one) > limit else "")


def _message(body: bytes) -> str:
    try:
        doc = json.loads(body[:65536])
        message = doc["errors"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    return shown(message, 200) if isinstance(message, str) else ""


def plaintext_safetensors() -> bytes:
    """A valid safetensors file: one F32 tensor of four random values."""
    header = json.dumps({"weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + os.urandom(16)


def plaintext_push(transport: Transport, repo: str) -> Outcome:
    """(f) One plaintext safetensors blob pushed to ``repo`` as the controls identity."""
    try:
        check_name(repo)
    except RegistryError:
        return not_tested(f"not tested: {shown(repo, 80)} is not a repository name")
    body = plaintext_safetensors()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    try:
        reply = transport.request(
            "POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", body=body, retry=False,
            headers={"Content-Type": "application/octet-stream"},
        )  # fmt: skip
    except ModelsealError as e:
        return Outcome(None, f"the push did not complete ({type(e).__name__})")
    message = _message(reply.body)
    if reply.status == 403 and message.startswith(_SEALED_ONLY):
        return Outcome(True, f"403 {message}", data={"status": 403})
    if reply.status == 403:
        return not_tested(f"not tested: the controls identity may not push to {repo} ({message or 'denied'})")
    if 200 <= reply.status < 300:
        gone = ""
        try:
            gone = str(transport.request("DELETE", f"/v2/{repo}/blobs/{digest}", retry=False).status)
        except ModelsealError:
            gone = "failed"
        what = f"accepted ({reply.status}): plaintext blob {digest[:19]}... stored in {repo} (delete: {gone})"
        return Outcome(False, what, data={"status": reply.status, "digest": digest})
    return Outcome(None, f"the push was answered {reply.status} {message}".strip(), data={"status": reply.status})


def reader_rotate(api: ApiClient, key: str) -> Outcome:
    """(g) The controls identity asks the broker to rotate ``key``."""
    try:
        api.call("POST", f"keys/{key}/rotate", {})
    except AccessDenied as e:
        note = "; the controls identity holds key-admin: bind it reader only" if "step-up" in str(e) else ""
        return Outcome(True, f"403 {shown(str(e), 200)}{note}", data={"status": 403})
    except GovernanceError as e:  # a 4xx past the decision: it was allowed
        return Outcome(False, f"the rotate got past the decision: {shown(str(e), 200)}")
    except ModelsealError as e:
        return Outcome(None, f"the rotate could not be asked ({type(e).__name__})")
    return Outcome(False, f"broker key {key} was rotated by the controls identity")


def _ask(api: ApiClient, key: str, code: str) -> str:
    """The refusal text of one rotate with ``code`` ("" when it was not refused)."""
    try:
        api.call("POST", f"keys/{key}/rotate", {"otp": code})
    except AccessDenied as e:
        return str(e) or "denied"
    except GovernanceError as e:
        return f"not refused: {e}"
    return "not refused: rotated"


def _used(refusal: str) -> bool:
    return any(w in refusal for w in ("already used", "used for another request", "older than one already used"))


def otp_replay(api: ApiClient, key: str, identity: Identity, secret: str | None) -> Outcome:
    """(h) One TOTP code of the controls identity, sent twice on the rotate route."""
    if not secret:
        return not_tested(f"not tested: no TOTP secret of the controls identity in {TOTP_ENV}")
    if identity.kind != "user":
        return not_tested(f"not tested: {identity.kind} identities have no MFA (issue the controls identity as a user)")
    try:
        totp = pyotp.TOTP(secret.strip().replace(" ", "").upper())
        totp.at(0)
    except (ValueError, TypeError):
        return not_tested(f"not tested: {TOTP_ENV} is not a base32 TOTP secret")
    try:
        code = totp.now()
        first = _ask(api, key, code)
        if _used(first):  # a code of this step was used before this run: the next step's is fresh
            time.sleep(30 - time.time() % 30 + 0.5)
            code = totp.now()
            first = _ask(api, key, code)
        if "wrong OTP code" in first:
            return not_tested(f"not tested: the code from {TOTP_ENV} is wrong for the controls identity")
        if _used(first):
            return Outcome(None, f"the first use was refused as used already: {shown(first, 160)}")
        second = _ask(api, key, code)
    except ModelsealError as e:
        return Outcome(None, f"the code could not be sent ({type(e).__name__})")
    if "already used" in second or "used for another request" in second:
        return Outcome(True, f"second use refused: {shown(second, 200)}")
    return Outcome(False, f"the second use was not refused as a replay: {shown(second, 200)}")


def _fake_items(key: str, env: str, n: int) -> list[Item]:
    return [
        {
            "key": key,
            "version": 1,
            "wrapped": base64.b64encode(os.urandom(64)).decode(),
            "context": {"env": env, "artifact": f"modelseal-controls-probe-{i:04d}"},
        }
        for i in range(n)
    ]


def _unwrap(api: ApiClient, item: Item) -> bool:
    """Whether one unwrap returned a data key (dropped unread)."""
    doc = api.call("POST", "keys/unwrap", {"items": [item]})
    results = doc.get("results")
    got = isinstance(results, list) and len(results) == 1 and isinstance(results[0], dict) and "dek" in results[0]
    del doc, results
    return got


def unwrap_burst(api: ApiClient, key: str, env: str, canaries: list[Item] | None) -> Outcome:
    """(i) One unwrap request per canary key; or, without ``key.unwrap``, denied unwraps."""
    items = canaries or _fake_items(key, env, DENIED_BURST)
    started = time.monotonic()
    try:
        _unwrap(api, items[0])
    except AccessDenied as e:  # no key.unwrap: the burst is of denied requests
        denied = 1
        for item in items[1:DENIED_BURST]:
            try:
                _unwrap(api, item)
            except AccessDenied:
                denied += 1
        n = min(len(items), DENIED_BURST)
        why = shown(str(e), 160)
        return Outcome(True, f"{denied} of {n} unwraps denied ({why})", data={"mode": "denied", "denied": denied})
    except ModelsealError as e:
        return Outcome(None, f"the first unwrap failed ({type(e).__name__}: {shown(str(e), 120)})")
    if not canaries:
        return not_tested("not tested: the controls identity may unwrap, but has no canary keys (controls canaries)")
    ok, refused, why = 1, 0, ""
    for item in items[1:]:
        try:
            ok += _unwrap(api, item)
        except AccessDenied as e:  # a detector's response (a hold) may stop the burst
            refused, why = refused + 1, shown(str(e), 160)
        except ModelsealError as e:
            return Outcome(None, f"the burst stopped after {ok} unwraps ({type(e).__name__})")
    took = time.monotonic() - started
    data: dict[str, object] = {"mode": "allowed", "unwraps": ok, "refused": refused, "seconds": round(took, 2)}
    if refused:
        return Outcome(True, f"{ok} unwraps, then {refused} refused ({why})", data=data)
    what = f"{ok} of {len(items)} canary keys unwrapped in {took:.1f} s (allowed: a reader)"
    return Outcome(False, what, refusal_expected=False, data=data)


__all__ = ["DENIED_BURST", "TOTP_ENV", "otp_replay", "plaintext_push", "plaintext_safetensors", "reader_rotate"]
__all__ += ["unwrap_burst"]
