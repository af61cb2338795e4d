"""k-of-n recovery of the local keystore's root key (SLIP-0039 Shamir shares)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import shamir_mnemonic

import modelseal
from modelseal.errors import KeystoreError
from modelseal.keys import keystore
from modelseal.keys.service import KeyService

from .conftest import Env

# SLIP-0039 published test vectors (passphrase "TREZOR"): the library we rely on must
# reproduce them. (mnemonics, master secret hex, or "" where combining must fail.)
SLIP39 = [
    (
        [
            "duckling enlarge academic academic agency result length solution fridge kidney coal piece deal husband erode "
            "duke ajar critical decision keyboard"
        ],
        "bb54aac4b89dc868ba37d9cc21b2cece",
    ),
    (
        [
            "duckling enlarge academic academic agency result length solution fridge kidney coal piece deal husband erode "
            "duke ajar critical decision kidney"
        ],
        "",
    ),
    (
        [
            "shadow pistol academic always adequate wildlife fancy gross oasis cylinder mustang wrist rescue view short owner "
            "flip making coding armed",
            "shadow pistol academic acid actress prayer class unknown daughter sweater depict flip twice unkind craft early "
            "superior advocate guest smoking",
        ],
        "b43ceb7e57a0ea8766221624d01b0864",
    ),
    (
        [
            "shadow pistol academic always adequate wildlife fancy gross oasis cylinder mustang wrist rescue view short owner "
            "flip making coding armed"
        ],
        "",
    ),
    (
        [
            "theory painting academic academic armed sweater year military elder discuss acne wildlife boring employer fused "
            "large satoshi bundle carbon diagnose anatomy hamster leaves tracks paces beyond phantom capital marvel lips "
            "brave detect luck"
        ],
        "989baf9dcaad5b10ca33dfd8cc75e42477025dce88ae83e75a230086a0e00e92",
    ),
]


@pytest.mark.parametrize(("mnemonics", "secret"), SLIP39)
def test_slip39_vectors(mnemonics: list[str], secret: str) -> None:
    if secret:
        assert shamir_mnemonic.combine_mnemonics(mnemonics, b"TREZOR").hex() == secret
    else:
        with pytest.raises(shamir_mnemonic.MnemonicError):
            shamir_mnemonic.combine_mnemonics(mnemonics, b"TREZOR")


def _artifact(env: Env) -> os.PathLike[str]:
    src = env.work / "m.bin"
    src.write_bytes(b"model weights")
    modelseal.seal(src, env.work / "m.sealed", key="test-kek", keys=env.svc)
    return env.work / "m.sealed"


def test_any_k_of_n_restore_and_k_minus_1_do_not(env: Env) -> None:
    sealed = _artifact(env)
    shares = keystore.split_root(5, 3)
    assert len(shares) == 5 and len(set(shares)) == 5
    root = keystore.unlock().root_key
    for combo in itertools.combinations(shares, 3):
        assert shamir_mnemonic.combine_mnemonics(list(combo)) == root
    for combo in itertools.combinations(shares, 2):
        with pytest.raises(KeystoreError, match="do not combine"):
            keystore.recover_root(list(combo), b"new passphrase", scrypt_log2_n=14)
    # The passphrase is lost; three custodians restore access with a new one.
    keystore.recover_root([shares[4], shares[0], shares[2]], b"new passphrase", scrypt_log2_n=14)
    keystore.clear_cache()
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        keystore.unlock(passphrase=lambda: b"test-passphrase-not-secret")
    keystore.clear_cache()
    svc = KeyService()
    os.environ["MODELSEAL_PASSPHRASE"] = "new passphrase"
    assert modelseal.open(sealed, keys=svc).read() == b"model weights"


def test_corrupted_duplicated_and_foreign_shares(env: Env, tmp_path_factory: pytest.TempPathFactory) -> None:
    shares = keystore.split_root(3, 2)
    words = shares[0].split()
    words[5] = "academic" if words[5] != "academic" else "acid"
    with pytest.raises(KeystoreError, match="do not combine"):
        keystore.recover_root([" ".join(words), shares[1]], b"x", scrypt_log2_n=14)
    with pytest.raises(KeystoreError, match="twice"):
        keystore.recover_root([shares[1], shares[1]], b"x", scrypt_log2_n=14)
    foreign = shamir_mnemonic.generate_mnemonics(1, [(2, 3)], os.urandom(32))[0]
    with pytest.raises(KeystoreError, match="not to this keystore"):
        keystore.recover_root(foreign[:2], b"x", scrypt_log2_n=14)


def test_cli_split_and_combine(env: Env) -> None:
    out = env.work.parent / "shares"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelseal.cli",
            "recovery",
            "split",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    files = sorted(out.iterdir())
    assert len(files) == 3 and all((f.stat().st_mode & 0o777) == 0o600 for f in files)
    assert "share" not in r.stdout.split("shares to")[0]  # nothing secret printed
    r = subprocess.run(
        [sys.executable, "-m", "modelseal.cli", "recovery", "combine", str(files[0]), str(files[2])],
        capture_output=True,
        text=True,
        env={**os.environ, "MODELSEAL_PASSPHRASE": "after recovery"},
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "modelseal.cli", "recovery", "combine", str(files[1])], capture_output=True, text=True
    )
    assert r.returncode == 6 and r.stderr.count("\n") == 1
    from modelseal.audit.log import MerkleAuditLog

    ops = [(e["operation"], e["result"]) for e in MerkleAuditLog(env.home / "audit.db").events()]
    assert ("recovery-split", "ok") in ops and ("recovery-combine", "ok") in ops
    assert ("recovery-combine", "KeystoreError") in ops
    assert all("academic" not in json.dumps(e) for e in MerkleAuditLog(env.home / "audit.db").events())
