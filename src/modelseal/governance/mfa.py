"""Step-up MFA: TOTP (RFC 6238) per user identity, each code valid once and for one request.

TOTP is HMAC-SHA-1, 6 digits, 30-second steps (``pyotp``), the parameters every
authenticator app assumes. A secret (160 bits) is made at enrolment, shown once as an
``otpauth://`` URI, and stored only sealed: AES-256-GCM under a fresh data key that the
server's ``KeyService`` wraps under ``[governance] key`` (``local:modelseal-governance`` by
default, made on first use; ``pki.store.ensure_kek``), with the identity in the wrap context
and the AEAD's associated data, so a sealed secret cannot be moved to another identity. It
stays pending until confirmed with a first valid code.

``verify`` accepts a code of the current step or one step either side, compared in constant
time, and only from ``user`` identities (a service identity can never pass MFA). A code is
bound to the request it authorizes: the replay cache (``gov_otp_used``) keeps the step each
identity used and the digest of that request (``request_digest``), so a code is refused the
second time ("already used") and for any other request ("used for another request"); no
code at or before an identity's last used step is accepted. Five wrong codes in a row lock
the identity's MFA for five minutes (an online guess costs 1 in 333,333 per try).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelseal.errors import DecryptionError, GovernanceError, IdentityError
from modelseal.format.header import Recipient
from modelseal.governance.store import dialect_of
from modelseal.keys.service import KeyService
from modelseal.pki.identity import Identity, parse
from modelseal.pki.store import ensure_kek
from modelseal.util import bounded
from modelseal.util.sqldb import Q, SqlDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gov_mfa (
    identity TEXT PRIMARY KEY, sealed TEXT NOT NULL, state TEXT NOT NULL, created {REAL} NOT NULL,
    confirmed {REAL}, last_step BIGINT NOT NULL, failures INTEGER NOT NULL, locked_until {REAL} NOT NULL);
CREATE TABLE IF NOT EXISTS gov_otp_used (
    identity TEXT NOT NULL, step BIGINT NOT NULL, digest TEXT NOT NULL, used {REAL} NOT NULL,
    PRIMARY KEY (identity, step));
CREATE INDEX IF NOT EXISTS gov_otp_used_used ON gov_otp_used (used);
"""
STEP = 30
DIGITS = 6
SKEW = 1  # steps either side
MAX_FAILURES = 5
LOCKOUT = 300.0
KEEP_USED = 3600.0  # replay rows older than this are pruned (far past any valid step)
ISSUER = "modelseal"
PURPOSE = "modelseal-governance"
SEALED_FORMAT = "modelseal-totp-v1"


def request_digest(action: str, resource_id: str, params: Mapping[str, Any]) -> str:
    """``sha256:HEX`` over the canonical JSON (sorted keys, no spaces) of the request."""
    try:
        doc = json.dumps(
            {"action": action, "params": params, "resource": resource_id},
            sort_keys=True,
            separators=(",", ":"),
            allow_nan=False,
        )
    except (TypeError, ValueError):
        raise GovernanceError("the request's parameters are not plain JSON") from None
    return "sha256:" + hashlib.sha256(doc.encode()).hexdigest()


def user_identity(identity: str) -> Identity:
    """``identity`` parsed; only ``user`` identities can enrol or pass MFA."""
    try:
        ident = parse(identity)
    except IdentityError as e:
        raise GovernanceError(str(e)) from None
    if ident.kind != "user":
        raise GovernanceError(f"{ident.kind} identities cannot use MFA: only user identities can")
    return ident


def _context(ident: Identity) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"purpose": PURPOSE, "secret": "totp", "identity": ident.uri, "env": ident.env}.items()))


def _aad(context: tuple[tuple[str, str], ...]) -> bytes:
    return json.dumps([SEALED_FORMAT, list(context)], separators=(",", ":")).encode()


def _check_code(code: str) -> str:
    if not isinstance(code, str) or len(code) != DIGITS or not code.isascii() or not code.isdigit():
        raise GovernanceError(f"an OTP code is {DIGITS} digits")
    return code


# ``_record`` answers these instead of raising, so that the failure count it wrote commits.
_REFUSED = {
    -1: "wrong OTP code",
    -2: "this code was already used",
    -3: "this code was used for another request",
    -4: "this code is older than one already used; wait for the next code",
}
# A code presented again (the same step, for this or another request): server.refusals audits it.
REPLAYED = frozenset({_REFUSED[-2], _REFUSED[-3]})


class Mfa(SqlDatabase):
    """The enrolled TOTP secrets and the replay cache of one server."""

    SCHEMA = _SCHEMA
    ERROR = GovernanceError
    LABEL = "the governance database"
    LOCK = 7369240

    def __init__(self, dialect: str, target: str, svc: KeyService, kek: str) -> None:
        super().__init__(dialect, target)
        self._svc, self._kek_spec = svc, kek
        self._kek: str | None = None

    @classmethod
    def open(cls, target: str, svc: KeyService, kek: str) -> Mfa:
        """On the same target as ``store.GovStore.open``."""
        return cls(*dialect_of(target), svc, kek)

    # -- the sealed secret ----------------------------------------------------------------

    def _seal(self, ident: Identity, secret: str) -> str:
        if self._kek is None:
            self._kek = ensure_kek(self._svc, self._kek_spec)
        context = _context(ident)
        dek = AESGCM.generate_key(bit_length=256)
        r = self._svc.wrap(self._kek, dek, context)
        nonce = os.urandom(12)
        ct = AESGCM(dek).encrypt(nonce, secret.encode(), _aad(context))
        del dek
        doc = {
            "format": SEALED_FORMAT,
            "recipient": [r.scheme, r.key_id, r.key_version, base64.b64encode(r.wrapped).decode()],
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(ct).decode(),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    def _unseal(self, ident: Identity, sealed: str) -> str:
        doc = bounded.json_loads(
            sealed.encode(), max_depth=3, max_values=32, error=GovernanceError, what="a sealed MFA secret"
        )
        try:
            scheme, key_id, version, wrapped = doc["recipient"]
            recipient = Recipient(str(scheme), str(key_id), int(version), base64.b64decode(wrapped, validate=True))
            nonce = base64.b64decode(doc["nonce"], validate=True)
            ct = base64.b64decode(doc["ciphertext"], validate=True)
            if doc["format"] != SEALED_FORMAT:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise GovernanceError(f"the MFA secret of {ident} is damaged") from None
        context = _context(ident)
        try:
            dek = self._svc.unwrap(recipient, context)
            return AESGCM(dek).decrypt(nonce, ct, _aad(context)).decode()
        except (DecryptionError, InvalidTag, UnicodeDecodeError):
            raise DecryptionError(
                f"the MFA secret of {ident} does not open: tampered, or of another identity"
            ) from None

    # -- enrolment --------------------------------------------------------------------

    def enroll(self, identity: str, now: float | None = None) -> str:
        """A new secret for ``identity`` (pending until ``confirm``): its ``otpauth://`` URI,
        to be shown once. An identity with a confirmed secret is refused: replacing it would
        let whoever holds the certificate replace the second factor too."""
        ident = user_identity(identity)
        t = time.time() if now is None else now
        secret = pyotp.random_base32(32)
        sealed = self._seal(ident, secret)

        def tx(q: Q) -> None:
            row = q("SELECT state FROM gov_mfa WHERE identity = ?", ident.uri).fetchone()
            if row is not None and row[0] == "active":
                raise GovernanceError(f"{ident} is already enrolled; a security officer must reset it first")
            q("DELETE FROM gov_mfa WHERE identity = ?", ident.uri)
            q(
                "INSERT INTO gov_mfa (identity, sealed, state, created, confirmed, last_step, failures, locked_until)"
                " VALUES (?, ?, 'pending', ?, NULL, -1, 0, 0)",
                ident.uri,
                sealed,
                t,
            )

        self.run(tx)
        return pyotp.TOTP(secret, digits=DIGITS, interval=STEP).provisioning_uri(name=ident.uri, issuer_name=ISSUER)

    def confirm(self, identity: str, code: str, now: float | None = None) -> None:
        """Activate a pending enrolment with its first valid code (which is then used up)."""
        self._verify(identity, code, "sha256:" + "0" * 64, time.time() if now is None else now, confirming=True)

    def state(self, identity: str) -> str | None:
        """``pending``, ``active`` or None (not enrolled)."""
        row = self.run(lambda q: q("SELECT state FROM gov_mfa WHERE identity = ?", identity).fetchone(), write=False)
        return None if row is None else str(row[0])

    def reset(self, identity: str) -> bool:
        """Forget ``identity``'s secret (an officer's act: the caller authorizes and audits)."""
        return bool(self.run(lambda q: q("DELETE FROM gov_mfa WHERE identity = ?", identity).rowcount))

    # -- verification -----------------------------------------------------------------

    def verify(self, identity: str, code: str, digest: str, now: float | None = None) -> int:
        """Accept ``code`` from ``identity`` for the request of ``digest`` (``request_digest``)
        once, or raise GovernanceError with a one-line reason. Returns the code's age in
        seconds (from the start of its step)."""
        return self._verify(identity, code, digest, time.time() if now is None else now, confirming=False)

    def _verify(self, identity: str, code: str, digest: str, now: float, confirming: bool) -> int:
        ident = user_identity(identity)
        _check_code(code)
        row = self.run(
            lambda q: q("SELECT sealed, state, locked_until FROM gov_mfa WHERE identity = ?", ident.uri).fetchone(),
            write=False,
        )
        if row is None:
            raise GovernanceError(f"{ident} is not enrolled for MFA (modelseal mfa enroll)")
        sealed, state, locked_until = str(row[0]), str(row[1]), float(row[2])
        if confirming and state != "pending":
            raise GovernanceError(f"{ident} has no pending MFA enrolment")
        if not confirming and state != "active":
            raise GovernanceError("the MFA enrolment is not confirmed yet (modelseal mfa confirm)")
        if now < locked_until:
            raise GovernanceError(f"too many wrong codes: MFA is locked for {int(locked_until - now) + 1} s")
        totp = pyotp.TOTP(self._unseal(ident, sealed), digits=DIGITS, interval=STEP)
        step = int(now // STEP)
        matched = [s for s in range(step - SKEW, step + SKEW + 1) if hmac.compare_digest(totp.at(s * STEP), code)]
        age = self.run(lambda q: self._record(q, ident.uri, matched, digest, now, confirming))
        if age < 0:
            raise GovernanceError(_REFUSED[age])
        return age

    def _record(self, q: Q, identity: str, matched: list[int], digest: str, now: float, confirming: bool) -> int:
        row = q("SELECT last_step, failures, state, locked_until FROM gov_mfa WHERE identity = ?", identity).fetchone()
        if row is None or (row[2] == "pending") != confirming:
            raise GovernanceError("the MFA enrolment changed meanwhile; try again")
        if now < float(row[3]):  # locked by a guess that raced this one: decided inside the transaction
            raise GovernanceError(f"too many wrong codes: MFA is locked for {int(float(row[3]) - now) + 1} s")
        last, failures = int(row[0]), int(row[1])
        q("DELETE FROM gov_otp_used WHERE used < ?", now - KEEP_USED)
        if not matched:
            failures += 1
            locked = now + LOCKOUT if failures >= MAX_FAILURES else 0.0
            q(
                "UPDATE gov_mfa SET failures = ?, locked_until = ? WHERE identity = ?",
                0 if locked else failures,
                locked,
                identity,
            )
            return -1
        for s in matched:
            used = q("SELECT digest FROM gov_otp_used WHERE identity = ? AND step = ?", identity, s).fetchone()
            if used is not None:
                same = hmac.compare_digest(str(used[0]), digest)
                return -2 if same else -3
        s = max(matched)
        if s <= last:
            return -4
        q("INSERT INTO gov_otp_used (identity, step, digest, used) VALUES (?, ?, ?, ?)", identity, s, digest, now)
        if confirming:
            q(
                "UPDATE gov_mfa SET state = 'active', confirmed = ?, last_step = ?, failures = 0 WHERE identity = ?",
                now,
                s,
                identity,
            )
        else:
            q("UPDATE gov_mfa SET last_step = ?, failures = 0 WHERE identity = ?", s, identity)
        return max(0, int(now - s * STEP))


__all__ = ["DIGITS", "REPLAYED", "STEP", "Mfa", "request_digest", "user_identity"]
