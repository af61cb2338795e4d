"""Step-up MFA (governance.mfa): TOTP enrolment with the secret sealed under the governance
KEK, codes valid once and for one request, one step of skew, user identities only, lockout."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest

from modelseal.errors import DecryptionError, GovernanceError
from modelseal.governance.mfa import STEP, Mfa, request_digest
from modelseal.governance.store import open_target
from tests.conftest import Env

T0 = 1_800_000_000.0  # a multiple of 30: the start of a step
ALICE = "spiffe://example.org/prod/user/alice"
BOB = "spiffe://example.org/prod/user/bob"
TRAINER = "spiffe://example.org/prod/service/trainer"
KEK = "local:modelseal-governance"
D1 = request_digest("key.rotate", "prod-kek", {"key": "prod-kek"})
D2 = request_digest("key.destroy", "prod-kek", {"key": "prod-kek"})


@pytest.fixture
def mfa(env: Env, tmp_path: Path) -> Iterator[Mfa]:
    m = Mfa.open(open_target(tmp_path / "data", None), env.svc, KEK)
    yield m
    m.close()


def secret_of(uri: str) -> str:
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth" and parts.netloc == "totp"
    q = parse_qs(parts.query)
    assert q["issuer"] == ["modelseal"] and q.get("digits", ["6"]) == ["6"] and q.get("period", ["30"]) == ["30"]
    return q["secret"][0]


def code(secret: str, t: float) -> str:
    return pyotp.TOTP(secret).at(int(t))  # SHA-1, 6 digits, 30 s: an authenticator app's defaults


def enrolled(mfa: Mfa, who: str = ALICE, t: float = T0) -> str:
    secret = secret_of(mfa.enroll(who, now=t))
    mfa.confirm(who, code(secret, t), now=t)
    assert mfa.state(who) == "active"
    return secret


def test_request_digest_is_canonical() -> None:
    a = request_digest("key.rotate", "k", {"b": 1, "a": [1, 2]})
    assert a == request_digest("key.rotate", "k", {"a": [1, 2], "b": 1})
    assert a.startswith("sha256:") and len(a) == 71
    assert a != request_digest("key.rotate", "k2", {"b": 1, "a": [1, 2]})
    with pytest.raises(GovernanceError, match="plain JSON"):
        request_digest("key.rotate", "k", {"x": float("nan")})


def test_enrolment_seals_the_secret_and_needs_a_first_code(env: Env, mfa: Mfa, tmp_path: Path) -> None:
    uri = mfa.enroll(ALICE, now=T0)
    secret = secret_of(uri)
    assert len(secret) == 32 and unquote(urlsplit(uri).path) == f"/modelseal:{ALICE}"
    assert mfa.state(ALICE) == "pending"
    env.svc.info(KEK)  # the governance KEK was made on first use
    raw = (tmp_path / "data" / "governance.db").read_bytes()
    wal = tmp_path / "data" / "governance.db-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    assert secret.encode() not in raw  # sealed, never in the clear
    with pytest.raises(GovernanceError, match="not confirmed"):
        mfa.verify(ALICE, code(secret, T0), D1, now=T0)
    with pytest.raises(GovernanceError, match="wrong OTP code"):
        mfa.confirm(ALICE, "000000" if code(secret, T0) != "000000" else "111111", now=T0)
    mfa.confirm(ALICE, code(secret, T0), now=T0)
    assert mfa.state(ALICE) == "active"
    with pytest.raises(GovernanceError, match="used for another request"):  # the confirming code is used up
        mfa.verify(ALICE, code(secret, T0), D1, now=T0 + 1)
    with pytest.raises(GovernanceError, match="already enrolled"):  # a stolen certificate cannot re-enrol
        mfa.enroll(ALICE, now=T0 + 60)


def test_a_code_is_valid_once(mfa: Mfa) -> None:
    secret = enrolled(mfa)
    t = T0 + STEP
    assert mfa.verify(ALICE, code(secret, t), D1, now=t + 7) == 7
    with pytest.raises(GovernanceError, match="this code was already used"):
        mfa.verify(ALICE, code(secret, t), D1, now=t + 8)


def test_a_code_taken_from_another_request_is_refused(mfa: Mfa) -> None:
    secret = enrolled(mfa)
    t = T0 + STEP
    mfa.verify(ALICE, code(secret, t), D1, now=t)
    with pytest.raises(GovernanceError, match="this code was used for another request"):
        mfa.verify(ALICE, code(secret, t), D2, now=t + 1)


def test_one_step_of_skew_and_no_more(mfa: Mfa) -> None:
    secret = enrolled(mfa)
    t = T0 + 10 * STEP
    assert mfa.verify(ALICE, code(secret, t - STEP), D1, now=t) == STEP  # the previous step
    t += 2 * STEP
    mfa.verify(ALICE, code(secret, t + STEP), D1, now=t)  # the next step (a fast clock)
    t += 4 * STEP
    for off in (-2 * STEP, 2 * STEP):
        with pytest.raises(GovernanceError, match="wrong OTP code"):
            mfa.verify(ALICE, code(secret, t + off), D1, now=t)


def test_no_code_older_than_the_last_used_one(mfa: Mfa) -> None:
    secret = enrolled(mfa)
    t = T0 + 10 * STEP
    mfa.verify(ALICE, code(secret, t), D1, now=t)
    with pytest.raises(GovernanceError, match="older than one already used"):
        mfa.verify(ALICE, code(secret, t - STEP), D2, now=t)  # unused, in the window, but older
    mfa.verify(ALICE, code(secret, t + STEP), D2, now=t + STEP)


def test_a_service_identity_cannot_enrol_or_pass_mfa(mfa: Mfa) -> None:
    with pytest.raises(GovernanceError, match="service identities cannot use MFA"):
        mfa.enroll(TRAINER, now=T0)
    with pytest.raises(GovernanceError, match="service identities cannot use MFA"):
        mfa.verify(TRAINER, "123456", D1, now=T0)
    with pytest.raises(GovernanceError, match="server identities cannot"):
        mfa.verify("spiffe://example.org/prod/server/registry", "123456", D1, now=T0)
    with pytest.raises(GovernanceError, match="invalid identity"):
        mfa.verify("spiffe://example.org/prod/user", "123456", D1, now=T0)


@pytest.mark.parametrize("bad", ["12345", "1234567", "12345a", "١٢٣٤٥٦", "", " 12345"])
def test_a_code_is_six_ascii_digits(mfa: Mfa, bad: str) -> None:
    enrolled(mfa)
    with pytest.raises(GovernanceError, match="6 digits"):
        mfa.verify(ALICE, bad, D1, now=T0 + STEP)


def test_five_wrong_codes_lock_mfa_for_five_minutes(mfa: Mfa) -> None:
    secret = enrolled(mfa)
    t = T0 + 10 * STEP
    good = code(secret, t)
    wrong = [f"{n:06d}" for n in range(20) if f"{n:06d}" not in {good, code(secret, t - STEP), code(secret, t + STEP)}]
    for w in wrong[:5]:
        with pytest.raises(GovernanceError, match="wrong OTP code"):
            mfa.verify(ALICE, w, D1, now=t)
    with pytest.raises(GovernanceError, match="too many wrong codes"):
        mfa.verify(ALICE, good, D1, now=t + 1)  # even the right code, while locked
    t2 = t + 301
    mfa.verify(ALICE, code(secret, t2), D1, now=t2)


def test_unenrolled_identity(mfa: Mfa) -> None:
    with pytest.raises(GovernanceError, match="not enrolled"):
        mfa.verify(BOB, "123456", D1, now=T0)
    with pytest.raises(GovernanceError, match="not enrolled"):
        mfa.confirm(BOB, "123456", now=T0)


def test_a_sealed_secret_moved_to_another_identity_does_not_open(mfa: Mfa, tmp_path: Path) -> None:
    enrolled(mfa, ALICE)
    enrolled(mfa, BOB)
    db = sqlite3.connect(tmp_path / "data" / "governance.db")
    db.execute(
        "UPDATE gov_mfa SET sealed = (SELECT sealed FROM gov_mfa WHERE identity = ?) WHERE identity = ?", (ALICE, BOB)
    )
    db.commit()
    db.close()
    with pytest.raises(DecryptionError, match="does not open"):
        mfa.verify(BOB, "123456", D1, now=T0 + 5 * STEP)


def test_reset_and_reenrol(mfa: Mfa) -> None:
    enrolled(mfa)
    assert mfa.reset(ALICE) and mfa.state(ALICE) is None
    enrolled(mfa, t=T0 + 10 * STEP)


def test_used_codes_are_pruned(mfa: Mfa) -> None:
    secret = enrolled(mfa)
    t = T0 + 10 * STEP
    mfa.verify(ALICE, code(secret, t), D1, now=t)
    t2 = t + 7200
    mfa.verify(ALICE, code(secret, t2), D1, now=t2)
    rows = mfa.run(lambda q: q("SELECT step FROM gov_otp_used WHERE identity = ?", ALICE).fetchall(), write=False)
    assert [int(r[0]) for r in rows] == [int(t2 // STEP)]


def test_two_requests_racing_with_one_code_pass_once(env: Env, tmp_path: Path) -> None:
    target = open_target(tmp_path / "data", None)
    first = Mfa.open(target, env.svc, KEK)
    secret = enrolled(first)
    others = [Mfa.open(target, env.svc, KEK) for _ in range(4)]
    t = T0 + 10 * STEP
    barrier = threading.Barrier(len(others))
    results: list[str] = []

    def race(m: Mfa, digest: str) -> None:
        barrier.wait()
        try:
            m.verify(ALICE, code(secret, t), digest, now=t)
            results.append("ok")
        except GovernanceError as e:
            results.append(str(e))

    threads = [threading.Thread(target=race, args=(m, d)) for m, d in zip(others, [D1, D1, D2, D2], strict=True)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results.count("ok") == 1 and all(r == "ok" or "used" in r for r in results), results
    for m in [first, *others]:
        m.close()
