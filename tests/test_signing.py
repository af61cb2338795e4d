"""Signatures: sign while sealing, keyless verify, trust policy, revocation, re-signing,
verify-on-load, and every bad input of the signing issue."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import modelseal
from modelseal.cli import main
from modelseal.errors import RevocationListError, Revoked, VerificationError
from modelseal.format.header import parse_core
from modelseal.recipes import seal as recipes_seal
from modelseal.recipes import sign as recipes_sign
from modelseal.signing.commitment import header_digest
from modelseal.signing.oms import bundle_for_folder, make_bundle
from modelseal.signing.revocation import RevocationList, new_revocation
from modelseal.signing.sigfile import SignatureFile, signature_path
from modelseal.signing.signers import ED25519, P256, PemSigner, generate, private_pem
from modelseal.signing.trust import TrustPolicy, load_policy
from modelseal.signing.verification import verify_artifact

from .conftest import Env, make_model_folder

KEY = "local:test-kek"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """PEM key pairs: release (P-256), security (Ed25519), other (untrusted Ed25519)."""
    out: dict[str, Path] = {}
    for name, alg in (("release", P256), ("security", ED25519), ("other", ED25519), ("release2", P256)):
        s = generate(alg)
        priv, pub = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub"
        priv.write_bytes(private_pem(s, None))
        pub.write_text(s.public.pem())
        out[name], out[name + ".pub"] = priv, pub
    return out


def policy_file(
    tmp_path: Path, keys: dict[str, Path], extra: str = "", rules: str | None = None, name: str = "trust.toml"
) -> Path:
    rules = rules or '[[rules]]\nartifacts = ["*"]\nenvironments = ["*"]\nsigners = ["release", "security"]\n'
    p = tmp_path / name
    p.write_text(
        "version = 1\nstrict = true\n"
        f'[signers.release]\nkeys = ["{keys["release.pub"]}", "{keys["release2.pub"]}"]\n'
        f'[signers.security]\nkeys = ["{keys["security.pub"]}"]\n' + rules + extra
    )
    return p


def signed_folder(env: Env, keys: dict[str, Path], name: str = "llama-7b", signer: str = "release") -> Path:
    src = make_model_folder(env.work / f"src-{name}")
    dst = env.work / f"{name}.sealed"
    res = modelseal.seal(src, dst, KEY, keys=env.svc, sign_key=PemSigner.from_file(keys[signer]), name=name)
    assert res.signature is not None
    return dst


def payload_offset(path: Path) -> int:
    core = parse_core(path.read_bytes()[: 160 * 1024])
    return core.payload_offset


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def big_blob(folder: Path) -> Path:
    return max((folder / "blobs").iterdir(), key=lambda p: p.stat().st_size)


# --- signing while sealing, keyless verification ------------------------------------------------


@pytest.mark.parametrize("alg", ["release", "security"])
def test_seal_signs_in_one_pass_and_verifies_without_keys(
    env: Env, keys: dict[str, Path], tmp_path: Path, alg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = signed_folder(env, keys, signer=alg)
    policy = load_policy(policy_file(tmp_path, keys))
    # No keystore at all: verification needs no decryption key and no passphrase.
    monkeypatch.setenv("MODELSEAL_HOME", str(tmp_path / "nowhere"))
    monkeypatch.delenv("MODELSEAL_PASSPHRASE")
    v = verify_artifact(sealed, policy)
    assert v.signed and v.name == "llama-7b" and v.signers == [alg] and v.env == "dev"
    assert [r.status for r in v.results] == ["valid"]
    # the chunk table in the signature file equals a fresh keyless hash of the ciphertext
    sf = SignatureFile.load(signature_path(sealed))
    assert sf is not None and set(sf.chunks) == set(v.tables)
    assert all(sf.chunks[k] == v.tables[k] for k in sf.chunks)


def test_sealed_file_signature_sits_beside_it(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    src = env.work / "w.bin"
    src.write_bytes(os.urandom(2 * (1 << 20) + 5))
    dst = env.work / "w.sealed"
    modelseal.seal(src, dst, KEY, keys=env.svc, sign_key=PemSigner.from_file(keys["security"]))
    assert (env.work / "w.sealed.msig").is_file()
    v = verify_artifact(dst, load_policy(policy_file(tmp_path, keys)))
    assert v.name == "w.bin" and v.signers == ["security"]


def test_rewrap_keeps_signatures_valid(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    sealed = signed_folder(env, keys)
    env.svc.rotate("test-kek")
    modelseal.rewrap(sealed, keys=env.svc)
    assert verify_artifact(sealed, load_policy(policy_file(tmp_path, keys))).signers == ["release"]


# --- bad input: each a test ---------------------------------------------------------------------


def test_tampered_ciphertext_chunk_is_refused(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    sealed = signed_folder(env, keys)
    blob = big_blob(sealed)
    flip(blob, payload_offset(blob) + (1 << 20) + 16 + 100)  # inside chunk 1
    with pytest.raises(VerificationError, match="does not match the artifact"):
        verify_artifact(sealed, load_policy(policy_file(tmp_path, keys)))
    assert main(["verify", str(sealed), "--trust", str(policy_file(tmp_path, keys))]) == 10


def test_tampered_header_is_refused(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    sealed = signed_folder(env, keys)
    flip(big_blob(sealed), 60)  # inside the core header (salt / context)
    with pytest.raises(VerificationError):
        verify_artifact(sealed, load_policy(policy_file(tmp_path, keys)))


def test_tampered_manifest_is_refused(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    sealed = signed_folder(env, keys)
    manifest = sealed / "manifest.mseal"
    flip(manifest, payload_offset(manifest) + 3)
    with pytest.raises(VerificationError, match="does not match"):
        verify_artifact(sealed, load_policy(policy_file(tmp_path, keys)))


def test_swapped_or_removed_or_extra_blob_is_refused(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    policy = load_policy(policy_file(tmp_path, keys))
    sealed = signed_folder(env, keys)
    blobs = sorted((sealed / "blobs").iterdir())
    blobs[0].unlink()
    with pytest.raises(VerificationError):
        verify_artifact(sealed, policy)
    sealed2 = signed_folder(env, keys, name="b")
    (sealed2 / "blobs" / ("0" * 32)).write_bytes(b"x")
    with pytest.raises(VerificationError):
        verify_artifact(sealed2, policy)


@pytest.mark.parametrize("where", ["sig", "payload"])
def test_tampered_signature_is_refused(env: Env, keys: dict[str, Path], tmp_path: Path, where: str) -> None:
    sealed = signed_folder(env, keys)
    path = signature_path(sealed)
    doc = json.loads(path.read_text())
    envelope = doc["signatures"][0]["envelope"]
    if where == "sig":
        sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
        sig[10] ^= 1
        envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    else:
        stmt = json.loads(base64.b64decode(envelope["payload"]))
        stmt["subject"][0]["name"] = "gpt-5"
        raw = json.dumps(stmt, sort_keys=True).encode()
        envelope["payload"] = base64.b64encode(raw).decode()
        path.write_text(json.dumps(doc))
        with pytest.raises(VerificationError, match="malformed"):  # the stored id no longer fits
            verify_artifact(sealed, load_policy(policy_file(tmp_path, keys)))
        keyid = envelope["signatures"][0]["keyid"]
        doc["signatures"][0]["id"] = hashlib.sha256(keyid.encode() + b"\x00" + raw).hexdigest()
    path.write_text(json.dumps(doc))
    with pytest.raises(VerificationError, match="bad signature"):
        verify_artifact(sealed, load_policy(policy_file(tmp_path, keys)))


def test_signature_copied_from_another_artifact_is_refused(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    a = signed_folder(env, keys, name="a")
    src = make_model_folder(env.work / "plain-b")
    b = env.work / "b.sealed"
    modelseal.seal(src, b, KEY, keys=env.svc)  # unsigned
    shutil.copy(signature_path(a), signature_path(b))
    with pytest.raises(VerificationError, match="does not match the artifact"):
        verify_artifact(b, load_policy(policy_file(tmp_path, keys)))


def test_valid_signature_by_untrusted_key_is_refused(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    sealed = signed_folder(env, keys, signer="other")
    with pytest.raises(VerificationError, match="untrusted key"):
        verify_artifact(sealed, load_policy(policy_file(tmp_path, keys)))
    assert main(["verify", str(sealed), "--public-key", str(keys["other.pub"])]) == 0


def test_truncated_signature_file_is_refused(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    sealed = signed_folder(env, keys)
    path = signature_path(sealed)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(VerificationError, match="malformed or truncated"):
        verify_artifact(sealed, load_policy(policy_file(tmp_path, keys)))


def test_symlink_or_stray_entry_in_sealed_folder_is_refused(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    sealed = signed_folder(env, keys)
    blob = big_blob(sealed)
    (sealed / "blobs" / ("f" * 32)).symlink_to(blob)
    with pytest.raises(VerificationError, match="unexpected entry"):
        verify_artifact(sealed, load_policy(policy_file(tmp_path, keys)))
    (sealed / "blobs" / ("f" * 32)).unlink()
    (sealed / "README").write_text("hi")
    with pytest.raises(VerificationError, match="unexpected entry"):
        verify_artifact(sealed, load_policy(policy_file(tmp_path, keys)))


# --- trust policy: names, environments, thresholds, strict --------------------------------------


def test_rules_match_names_and_environments(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    rules = '[[rules]]\nartifacts = ["llama-*"]\nenvironments = ["prod"]\nsigners = ["release"]\n'
    policy = load_policy(policy_file(tmp_path, keys, rules=rules))
    sealed = signed_folder(env, keys)  # llama-7b in env dev
    with pytest.raises(VerificationError, match=r"no rule .* covers artifact 'llama-7b' in env 'dev'"):
        verify_artifact(sealed, policy)
    src = make_model_folder(env.work / "p")
    prod = env.work / "prod.sealed"
    env.svc.create("prod-kek")
    modelseal.seal(src, prod, "local:prod-kek", env="prod", keys=env.svc, sign_key=PemSigner.from_file(keys["release"]))
    with pytest.raises(VerificationError, match="no rule"):
        verify_artifact(prod, policy)  # named "p": not llama-*
    modelseal.seal(
        src,
        prod,
        "local:prod-kek",
        env="prod",
        force=True,
        keys=env.svc,
        sign_key=PemSigner.from_file(keys["release"]),
        name="llama-3",
    )
    assert verify_artifact(prod, policy).env == "prod"


def test_threshold_counts_distinct_signers(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    rules = '[[rules]]\nsigners = ["release", "security"]\nthreshold = 2\n'
    policy = load_policy(policy_file(tmp_path, keys, rules=rules))
    sealed = signed_folder(env, keys)
    with pytest.raises(VerificationError, match="needs 2 of the signers"):
        verify_artifact(sealed, policy)
    modelseal.sign(sealed, PemSigner.from_file(keys["release2"]))  # same signer, second key: still one signer
    with pytest.raises(VerificationError, match="needs 2"):
        verify_artifact(sealed, policy)
    assert main(["sign", str(sealed), "--sign-key", str(keys["security"])]) == 0
    v = verify_artifact(sealed, policy)
    assert v.signers == ["release", "security"] and len(v.results) == 3


def test_strict_refuses_unsigned_and_lenient_reports_it(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    src = make_model_folder(env.work / "u")
    sealed = env.work / "u.sealed"
    modelseal.seal(src, sealed, KEY, keys=env.svc)
    strict = load_policy(policy_file(tmp_path, keys))
    with pytest.raises(VerificationError, match="not signed"):
        verify_artifact(sealed, strict)
    lenient = TrustPolicy(strict.signers, strict.rules, strict=False)
    assert verify_artifact(sealed, lenient).signed is False
    assert main(["verify", str(sealed), "--trust", str(policy_file(tmp_path, keys)), "--strict"]) == 10


# --- re-signing and history ---------------------------------------------------------------------


def test_resign_after_update_keeps_history(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    policy = load_policy(policy_file(tmp_path, keys))
    sealed = signed_folder(env, keys)
    first = SignatureFile.load(signature_path(sealed))
    assert first is not None
    modelseal.reencrypt(sealed, keys=env.svc)  # new ciphertext: the old signature no longer applies
    with pytest.raises(VerificationError, match="not signed"):
        verify_artifact(sealed, policy)
    sid = modelseal.sign(sealed, PemSigner.from_file(keys["release"]))
    sf = SignatureFile.load(signature_path(sealed))
    assert sf is not None and [e.id for e in sf.signatures] == [sid]
    assert [e.id for e in sf.history] == [first.signatures[0].id] and sf.history[0].superseded_at
    v = verify_artifact(sealed, policy)
    assert v.name == "llama-7b"  # the name carries over from the previous signature


# --- revocation ---------------------------------------------------------------------------------


def revoke(lst: Path, pol: Path, keys: dict[str, Path], *extra: str) -> int:
    """``modelseal revoke`` by the security signer, the existing list authenticated with ``pol``."""
    return main(["revoke", "--list", str(lst), "--sign-key", str(keys["security"]), "--trust", str(pol), *extra])


def revocation_setup(tmp_path: Path, keys: dict[str, Path]) -> tuple[Path, Path]:
    lst = tmp_path / "revocations.json"
    extra = f'[revocation]\nlist = "{lst}"\nsigners = ["security"]\n'
    pol = policy_file(tmp_path, keys, extra=extra)
    assert revoke(lst, pol, keys, "--create", "--expires-in", "7") == 0
    return pol, lst


def test_revoked_signature_signer_and_artifact(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    pol, lst = revocation_setup(tmp_path, keys)
    sealed = signed_folder(env, keys)
    v = verify_artifact(sealed, load_policy(pol))
    sid, keyid, digest = v.results[0].id, v.results[0].keyid, v.digest
    assert revoke(lst, pol, keys, "--signature", sid, "--reason", "leaked build") == 0
    with pytest.raises(Revoked):
        verify_artifact(sealed, load_policy(pol))
    assert main(["verify", str(sealed), "--trust", str(pol)]) == 11
    # a fresh signature by another trusted signer replaces the revoked one
    modelseal.sign(sealed, PemSigner.from_file(keys["security"]))
    assert verify_artifact(sealed, load_policy(pol)).signers == ["security"]
    # revoking the signer key, or the artifact itself
    sealed2 = signed_folder(env, keys, name="two")
    assert revoke(lst, pol, keys, "--signer", keyid) == 0
    with pytest.raises(Revoked):
        verify_artifact(sealed2, load_policy(pol))
    assert revoke(lst, pol, keys, "--artifact", digest) == 0
    with pytest.raises(Revoked, match="is revoked"):
        verify_artifact(sealed, load_policy(pol))
    doc = RevocationList.parse_payload(base64.b64decode(json.loads(lst.read_text())["payload"]))
    assert doc.version == 4 and [e.kind for e in doc.entries] == ["signature", "signer", "artifact"]


def test_revoked_artifact_is_refused_by_the_loader(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pol, lst = revocation_setup(tmp_path, keys)
    sealed = signed_folder(env, keys)
    monkeypatch.setenv("MODELSEAL_TRUST", str(pol))
    with modelseal.open(sealed, "config.json", keys=env.svc) as r:
        assert r.verified and b"bert" in r.readall()
    digest = verify_artifact(sealed, load_policy(pol)).digest
    assert revoke(lst, pol, keys, "--artifact", digest) == 0
    with pytest.raises(Revoked):
        modelseal.open(sealed, "config.json", keys=env.svc)


def test_stale_forged_unsigned_or_missing_revocation_list(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    pol, lst = revocation_setup(tmp_path, keys)
    sealed = signed_folder(env, keys)
    policy = load_policy(pol)
    later = datetime.now(UTC) + timedelta(days=8)
    with pytest.raises(RevocationListError, match="expired"):
        verify_artifact(sealed, policy, now=later)
    good = lst.read_bytes()
    # forged: signed by a key that is not a revocation signer (release is trusted for artifacts only)
    rl = RevocationList(9, datetime.now(UTC), datetime.now(UTC) + timedelta(days=1), [])
    lst.write_bytes(rl.sign(PemSigner.from_file(keys["release"])))
    with pytest.raises(RevocationListError, match="forged or unsigned"):
        verify_artifact(sealed, policy)
    assert main(["verify", str(sealed), "--trust", str(pol)]) == 12
    # unsigned: an edited payload under the old signature
    doc = json.loads(good)
    doc["payload"] = base64.b64encode(rl.payload()).decode()
    lst.write_text(json.dumps(doc))
    with pytest.raises(RevocationListError):
        verify_artifact(sealed, policy)
    lst.unlink()
    with pytest.raises(RevocationListError, match="missing"):
        verify_artifact(sealed, policy)
    lst.write_bytes(good[: len(good) // 2])
    with pytest.raises(RevocationListError):
        verify_artifact(sealed, policy)
    # extending a list that no longer authenticates is refused too
    r = revoke(lst, pol, keys)
    assert r == 12


def test_malleated_ecdsa_signature_keeps_its_revoked_id(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    """(r, s) -> (r, n - s) still verifies; the signature id must not change with it."""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

    pol, lst = revocation_setup(tmp_path, keys)
    sealed = signed_folder(env, keys)  # release: P-256
    sid = verify_artifact(sealed, load_policy(pol)).results[0].id
    assert revoke(lst, pol, keys, "--signature", sid) == 0
    path = signature_path(sealed)
    doc = json.loads(path.read_text())
    sig = doc["signatures"][0]["envelope"]["signatures"][0]
    r, s = decode_dss_signature(base64.b64decode(sig["sig"]))
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    sig["sig"] = base64.b64encode(encode_dss_signature(r, n - s)).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(Revoked):
        verify_artifact(sealed, load_policy(pol))


def test_revocation_entries_validated() -> None:
    with pytest.raises(ValueError):
        new_revocation("signature", "../etc", "x")
    with pytest.raises(ValueError):
        new_revocation("bogus", "a" * 64, "x")


# --- verify on load, lazily ---------------------------------------------------------------------


def test_loader_verifies_lazily_chunk_by_chunk(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = signed_folder(env, keys)
    monkeypatch.setenv("MODELSEAL_TRUST", str(policy_file(tmp_path, keys)))
    blob = big_blob(sealed)
    # Re-encrypting a chunk needs the data key; a key holder forging content is exactly
    # what signatures catch. Simulate with a flipped byte in chunk 2: GCM would also
    # fail, so check the signature check fires first (VerificationError, not DecryptionError).
    flip(blob, payload_offset(blob) + 2 * ((1 << 20) + 16) + 5)
    with modelseal.open(sealed, "model.safetensors", keys=env.svc) as r:
        assert r.verified
        assert len(r.pread(0, 1 << 20)) == 1 << 20  # chunk 0: untouched, verified, fine
        with pytest.raises(VerificationError, match="chunk 2 does not match"):
            r.pread(2 << 20, 100)
    # verify=False skips signatures (explicitly), and GCM still refuses the flipped chunk
    with modelseal.open(sealed, "model.safetensors", keys=env.svc, verify=False) as r:
        assert not r.verified
        from modelseal.errors import DecryptionError

        with pytest.raises(DecryptionError):
            r.pread(2 << 20, 100)


def test_loaders_refuse_unsigned_under_strict_policy(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save_file

    from modelseal import safetensors as mst

    plain = env.work / "st"
    plain.mkdir()
    save_file({"w": np.arange(12, dtype=np.float32)}, str(plain / "model.safetensors"))
    unsigned = env.work / "unsigned.sealed"
    modelseal.seal(plain, unsigned, KEY, keys=env.svc)
    signed = env.work / "signed.sealed"
    modelseal.seal(plain, signed, KEY, keys=env.svc, sign_key=PemSigner.from_file(keys["release"]))
    monkeypatch.setenv("MODELSEAL_TRUST", str(policy_file(tmp_path, keys)))
    assert mst.load_file(signed / "model.safetensors", keys=env.svc)["w"][11] == 11
    with pytest.raises(VerificationError, match="not signed"):
        mst.load_file(unsigned / "model.safetensors", keys=env.svc)
    monkeypatch.setenv("MODELSEAL_TRUST", "")
    assert mst.load_file(unsigned / "model.safetensors", keys=env.svc)["w"][3] == 3


def test_header_swapped_after_verification_is_caught(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    sealed = signed_folder(env, keys)
    v = verify_artifact(sealed, load_policy(policy_file(tmp_path, keys)), deep=False)
    from modelseal.signing.verification import reader_check

    manifest = sealed / "manifest.mseal"
    from modelseal.format.file import read_raw
    from modelseal.format.source import FdSource

    src = FdSource(os.open(manifest, os.O_RDONLY))
    raw = read_raw(src)
    src.close()
    assert reader_check(v)("manifest.mseal", raw) == v.tables["manifest.mseal"]
    v.headers["manifest.mseal"] = header_digest(raw)[::-1]
    with pytest.raises(VerificationError, match="changed after"):
        reader_check(v)("manifest.mseal", raw)


# --- keys ---------------------------------------------------------------------------------------


def test_passphrase_protected_sign_key(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSEAL_SIGN_PASSPHRASE", "sign-pass")
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    assert main(["signing-key", str(priv), str(pub), "--algorithm", P256, "--encrypt"]) == 0
    assert b"ENCRYPTED" in priv.read_bytes() and priv.stat().st_mode & 0o077 == 0
    src = make_model_folder(env.work / "m")
    assert main(["seal", str(src), str(env.work / "m.sealed"), "--key", KEY, "--sign-key", str(priv)]) == 0
    assert main(["verify", str(env.work / "m.sealed"), "--public-key", str(pub)]) == 0
    monkeypatch.setenv("MODELSEAL_SIGN_PASSPHRASE", "wrong")
    assert main(["seal", str(src), str(env.work / "m2.sealed"), "--key", KEY, "--sign-key", str(priv)]) == 2
    assert not (env.work / "m2.sealed").exists()
    # an RSA key is refused with a clear error
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "rsa.pem").write_bytes(rsa_pem)
    assert main(["sign", str(env.work / "m.sealed"), "--sign-key", str(tmp_path / "rsa.pem")]) == 2


def test_policy_errors_are_clear(tmp_path: Path, keys: dict[str, Path]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\n[signers.a]\nkeys = []\n[[rules]]\nsigners = ["a"]\n')
    assert main(["verify", str(tmp_path), "--trust", str(bad)]) == 2
    bad.write_text(f'version = 1\n[signers.a]\nkeys = ["{keys["release.pub"]}"]\n[[rules]]\nsigners = ["b"]\n')
    with pytest.raises(Exception, match="unknown signer"):
        load_policy(bad)


# --- OMS bundle edge cases (the real model-signing runs in test_oms_interop.py) -----------------


def test_oms_bundle_skips_git_paths_and_sorts_like_pathlib() -> None:
    s = generate(P256)
    bundle = json.loads(
        bundle_for_folder(s, "m", [("a-b", "00" * 32), ("a/b", "11" * 32), (".gitattributes", "22" * 32)])
    )
    stmt = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert [r["name"] for r in stmt["predicate"]["resources"]] == ["a/b", "a-b"]
    assert "model.sig" in stmt["predicate"]["serialization"]["ignore_paths"]
    with pytest.raises(Exception, match="ECDSA"):
        make_bundle(generate(ED25519), "m", [], [])


def test_predeploy_gate_script(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    """scripts/gate.sh (docs/ci.md): passes good artifacts, rejects tampered, unsigned and revoked."""
    import subprocess
    import sys

    pol, lst = revocation_setup(tmp_path, keys)
    good = signed_folder(env, keys, name="good")
    bad = signed_folder(env, keys, name="bad")
    flip(big_blob(bad), payload_offset(big_blob(bad)) + 7)
    unsigned = env.work / "unsigned.sealed"
    modelseal.seal(make_model_folder(env.work / "u"), unsigned, KEY, keys=env.svc)
    gate = Path(__file__).resolve().parent.parent / "scripts" / "gate.sh"
    exe = {"MODELSEAL": f"{sys.executable} -m modelseal.cli"}

    def run_gate(*artifacts: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(gate), str(pol), *map(str, artifacts)],
            capture_output=True,
            text=True,
            env={**os.environ, **exe},
            timeout=300,
        )

    r = run_gate(good)
    assert r.returncode == 0 and "PASS" in r.stdout
    r = run_gate(good, bad, unsigned)
    assert r.returncode == 10 and r.stdout.count("REJECT") == 2 and "not signed" in r.stdout
    digest = verify_artifact(good, load_policy(pol)).digest
    assert revoke(lst, pol, keys, "--artifact", digest) == 0
    r = run_gate(good)
    assert r.returncode == 11 and "REVOKED" in r.stdout


# --- regressions from the security review of the signing change ---------------------------------


def test_plaintext_oms_verification_applies_the_whole_policy(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    """A model-signing model.sig is held to the same rules, thresholds and revocations."""
    pol, lst = revocation_setup(tmp_path, keys)
    model = make_model_folder(env.work / "plain")
    signer = PemSigner.from_file(keys["release"])
    import hashlib as h

    rows = [
        (p.relative_to(model).as_posix(), h.sha256(p.read_bytes()).hexdigest()) for p in model.rglob("*") if p.is_file()
    ]
    (model / "model.sig").write_bytes(bundle_for_folder(signer, "llama-7b", rows))
    assert main(["verify", "--plaintext", str(model), "--trust", str(pol)]) == 0
    assert main(["verify", "--plaintext", str(model), "--trust", str(pol), "--name", "other"]) == 10
    two = policy_file(
        tmp_path, keys, rules='[[rules]]\nsigners = ["release", "security"]\nthreshold = 2\n', name="two.toml"
    )
    assert main(["verify", "--plaintext", str(model), "--trust", str(two)]) == 10
    keyid = signer.public.key_id
    assert revoke(lst, pol, keys, "--signer", keyid) == 0
    assert main(["verify", "--plaintext", str(model), "--trust", str(pol)]) == 11


def test_revoked_artifact_stays_revoked_without_its_signature_file(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pol, lst = revocation_setup(tmp_path, keys)
    lenient = tmp_path / "lenient.toml"
    lenient.write_text(pol.read_text().replace("strict = true", "strict = false"))
    sealed = signed_folder(env, keys)
    v = verify_artifact(sealed, load_policy(lenient))
    for value in (v.digest, v.artifact_id):
        lst.unlink()  # a fresh list for each case: forget the version this host saw
        (env.home / "revocation-state.json").unlink(missing_ok=True)
        revocation_setup(tmp_path, keys)
        assert revoke(lst, pol, keys, "--artifact", value) == 0
        saved = signature_path(sealed).read_bytes()
        signature_path(sealed).unlink()
        with pytest.raises(Revoked):
            verify_artifact(sealed, load_policy(lenient))
        monkeypatch.setenv("MODELSEAL_TRUST", str(lenient))
        with pytest.raises(Revoked):
            modelseal.open_folder(sealed, keys=env.svc)
        monkeypatch.delenv("MODELSEAL_TRUST")
        signature_path(sealed).write_bytes(saved)


def test_expected_name_pins_the_artifact(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pol = policy_file(tmp_path, keys)
    other = signed_folder(env, keys, name="test-x")
    target = env.work / "llama-7b.sealed"
    shutil.copytree(other, target)  # a validly signed artifact, swapped in under another path
    assert main(["verify", str(target), "--trust", str(pol)]) == 0
    assert main(["verify", str(target), "--trust", str(pol), "--name", "llama-7b"]) == 10
    monkeypatch.setenv("MODELSEAL_TRUST", str(pol))
    with pytest.raises(VerificationError, match="not the expected 'llama-7b'"):
        modelseal.open_folder(target, keys=env.svc, expect_name="llama-7b")
    with modelseal.expecting("llama-7b"), pytest.raises(VerificationError, match="signed as 'test-x'"):
        modelseal.open(target, "config.json", keys=env.svc)
    with modelseal.expecting("test-x"), modelseal.open(target, "config.json", keys=env.svc) as r:
        assert r.verified


def test_fsspec_verifies_on_load(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsspec = pytest.importorskip("fsspec")
    src = env.work / "data.csv"
    src.write_bytes(b"a,b\n" + b"1,2\n" * 400_000)
    signed, unsigned = env.work / "signed.csv.sealed", env.work / "unsigned.csv.sealed"
    modelseal.seal(src, signed, KEY, keys=env.svc, sign_key=PemSigner.from_file(keys["security"]))
    modelseal.seal(src, unsigned, KEY, keys=env.svc)
    monkeypatch.setenv("MODELSEAL_TRUST", str(policy_file(tmp_path, keys)))
    with fsspec.open(f"sealed::file://{signed}", "rb") as f:
        assert f.raw.verified and f.read(4) == b"a,b\n"
    with pytest.raises(VerificationError, match="not signed"):
        fsspec.open(f"sealed::file://{unsigned}", "rb").open()
    flip(signed, payload_offset(signed) + 10)
    with pytest.raises(VerificationError), fsspec.open(f"sealed::file://{signed}", "rb") as f:
        f.read()


def test_revocation_threshold_counts_signers_not_keys(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    lst = tmp_path / "rl.json"
    pol = policy_file(
        tmp_path, keys, extra=f'[revocation]\nlist = "{lst}"\nsigners = ["security", "release"]\nthreshold = 2\n'
    )
    sealed = signed_folder(env, keys)
    rl = RevocationList(1, datetime.now(UTC), datetime.now(UTC) + timedelta(days=1), [])
    lst.write_bytes(rl.sign(PemSigner.from_file(keys["release"]), PemSigner.from_file(keys["release2"])))
    with pytest.raises(RevocationListError, match="not signed by 2"):
        verify_artifact(sealed, load_policy(pol))
    lst.write_bytes(rl.sign(PemSigner.from_file(keys["release"]), PemSigner.from_file(keys["security"])))
    assert verify_artifact(sealed, load_policy(pol)).signed
    # the CLI signs with several keys for such a threshold
    r = main(
        [
            "revoke",
            "--list",
            str(lst),
            "--trust",
            str(pol),
            "--sign-key",
            str(keys["release"]),
            "--sign-key",
            str(keys["security"]),
        ]
    )
    assert r == 0 and verify_artifact(sealed, load_policy(pol)).signed


def test_revocation_list_rollback_is_refused(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    pol, lst = revocation_setup(tmp_path, keys)
    sealed = signed_folder(env, keys)
    policy = load_policy(pol)
    v1 = lst.read_bytes()
    sid = verify_artifact(sealed, policy).results[0].id
    assert revoke(lst, pol, keys, "--signature", sid) == 0
    with pytest.raises(Revoked):
        verify_artifact(sealed, policy)
    lst.write_bytes(v1)  # the older, still unexpired list that did not revoke it
    with pytest.raises(RevocationListError, match="rolled back"):
        verify_artifact(sealed, policy)
    r = revoke(lst, pol, keys)
    assert r == 12  # and it is not extended either
    # hosts without state: the policy's min_version
    floor = tmp_path / "floor.toml"
    floor.write_text(pol.read_text().replace('signers = ["security"]\n', 'signers = ["security"]\nmin_version = 2\n'))
    (env.home / "revocation-state.json").unlink()
    with pytest.raises(RevocationListError, match="rolled back"):
        verify_artifact(sealed, load_policy(floor))
    # an existing list is only extended once authenticated
    assert main(["revoke", "--list", str(lst), "--sign-key", str(keys["security"])]) == 2


def test_sign_without_name_ignores_names_of_other_signers(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    src = make_model_folder(env.work / "m")
    sealed = env.work / "m.sealed"
    modelseal.seal(src, sealed, KEY, keys=env.svc, sign_key=PemSigner.from_file(keys["other"]), name="llama-prod")
    modelseal.sign(sealed, PemSigner.from_file(keys["release"]))
    rel = [
        e
        for e in SignatureFile.load(signature_path(sealed)).signatures
        if e.keyid == PemSigner.from_file(keys["release"]).public.key_id
    ]  # type: ignore[union-attr]
    assert rel[0].statement.name == "m"
    modelseal.sign(sealed, PemSigner.from_file(keys["release"]), name="mine")
    modelseal.sign(sealed, PemSigner.from_file(keys["release"]))  # inherits its own previous name
    sf = SignatureFile.load(signature_path(sealed))
    assert sf is not None and sf.signatures[-1].statement.name == "mine"


def test_malformed_inputs_give_typed_errors(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    pol = policy_file(tmp_path, keys)
    sealed = signed_folder(env, keys)
    good = signature_path(sealed).read_bytes()
    signature_path(sealed).write_text("[" * 100_000 + "]" * 100_000)
    assert main(["verify", str(sealed), "--trust", str(pol)]) == 10
    signature_path(sealed).write_bytes(good)
    (sealed / "blobs" / ("Z" * 32)).write_bytes(b"x")
    assert main(["verify", str(sealed), "--trust", str(pol)]) == 10
    (sealed / "blobs" / ("Z" * 32)).unlink()
    # a model-signing bundle with a non-ASCII key hint
    model = env.work / "plain"
    model.mkdir()
    (model / "a").write_bytes(b"a")
    import hashlib as h

    b = json.loads(make_bundle(PemSigner.from_file(keys["release"]), "m", [("a", h.sha256(b"a").hexdigest())], []))
    b["verificationMaterial"]["publicKey"]["hint"] = "\u00e9" * 64
    (model / "model.sig").write_text(json.dumps(b))
    assert main(["verify", "--plaintext", str(model), "--public-key", str(keys["release.pub"])]) == 10
    # signing-key never overwrites a private key
    assert main(["signing-key", str(keys["release"]), str(tmp_path / "x.pub")]) == 7


def test_allow_plaintext_is_refused_under_a_strict_policy(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelseal.loaders.common import open_member

    plain = env.work / "w.bin"
    plain.write_bytes(b"weights")
    assert open_member(plain, allow_plaintext=True).read() == b"weights"
    monkeypatch.setenv("MODELSEAL_TRUST", str(policy_file(tmp_path, keys)))
    with pytest.raises(VerificationError, match="plaintext"):
        open_member(plain, allow_plaintext=True)


# --- regressions from the second review ---------------------------------------------------------


def test_sign_does_not_inherit_a_name_from_a_copied_genuine_signature(
    env: Env, keys: dict[str, Path], tmp_path: Path
) -> None:
    release = PemSigner.from_file(keys["release"])
    prod = signed_folder(env, keys, name="llama-prod")  # a genuine release signature
    dev = env.work / "dev.sealed"
    modelseal.seal(make_model_folder(env.work / "dev-src"), dev, KEY, keys=env.svc)
    shutil.copy(signature_path(prod), signature_path(dev))  # planted in the dev artifact
    modelseal.sign(dev, release)
    sf = SignatureFile.load(signature_path(dev))
    assert sf is not None and [e.statement.name for e in sf.signatures] == ["dev"]


def test_revoke_refuses_missing_expired_or_symlinked_lists(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    pol, lst = revocation_setup(tmp_path, keys)
    sealed = signed_folder(env, keys)
    policy = load_policy(pol)
    v1 = lst.read_bytes()
    sid = verify_artifact(sealed, policy).results[0].id
    assert revoke(lst, pol, keys, "--signature", sid) == 0  # version 2
    # an older list behind a symlink at the policy's path is still a rollback
    old = tmp_path / "old.json"
    old.write_bytes(v1)
    lst.unlink()
    lst.symlink_to(old)
    with pytest.raises(RevocationListError, match="rolled back"):
        verify_artifact(sealed, policy)
    lst.unlink()
    # a missing list is not silently restarted
    assert revoke(lst, pol, keys) == 2
    # an expired (genuine, newest) list is refreshed only on request, and versions only grow
    rl = RevocationList(5, datetime.now(UTC) - timedelta(days=9), datetime.now(UTC) - timedelta(days=1), [])
    lst.write_bytes(rl.sign(PemSigner.from_file(keys["security"])))
    assert revoke(lst, pol, keys) == 12
    assert revoke(lst, pol, keys, "--refresh-expired") == 0
    doc = RevocationList.parse_payload(base64.b64decode(json.loads(lst.read_text())["payload"]))
    assert doc.version == 6


def test_fsspec_recognises_a_revoked_digest_without_the_signature_file(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsspec = pytest.importorskip("fsspec")
    pol, lst = revocation_setup(tmp_path, keys)
    lenient = tmp_path / "lenient.toml"
    lenient.write_text(pol.read_text().replace("strict = true", "strict = false"))
    src = env.work / "d.bin"
    src.write_bytes(os.urandom(3 << 20))
    sealed = env.work / "d.sealed"
    modelseal.seal(src, sealed, KEY, keys=env.svc, sign_key=PemSigner.from_file(keys["security"]))
    digest = verify_artifact(sealed, load_policy(pol)).digest
    assert revoke(lst, pol, keys, "--artifact", digest) == 0
    signature_path(sealed).unlink()
    monkeypatch.setenv("MODELSEAL_TRUST", str(lenient))
    with pytest.raises(Revoked):
        fsspec.open(f"sealed::file://{sealed}", "rb").open()


def test_policy_can_require_pinned_names(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pol = tmp_path / "pinned.toml"
    pol.write_text(
        policy_file(tmp_path, keys).read_text().replace("strict = true", "strict = true\nrequire_name = true")
    )
    sealed = signed_folder(env, keys)
    assert main(["verify", str(sealed), "--trust", str(pol)]) == 10
    assert main(["verify", str(sealed), "--trust", str(pol), "--name", "llama-7b"]) == 0
    assert main(["unseal", str(sealed), str(env.work / "o1"), "--trust", str(pol)]) == 10
    assert main(["unseal", str(sealed), str(env.work / "o2"), "--trust", str(pol), "--name", "x"]) == 10
    assert main(["unseal", str(sealed), str(env.work / "o3"), "--trust", str(pol), "--name", "llama-7b"]) == 0
    assert not (env.work / "o1").exists() and not (env.work / "o2").exists()
    monkeypatch.setenv("MODELSEAL_TRUST", str(pol))
    with pytest.raises(VerificationError, match="requires the expected artifact name"):
        modelseal.open_folder(sealed, keys=env.svc)
    with modelseal.expecting("llama-7b"), modelseal.open_folder(sealed, keys=env.svc) as f:
        assert "config.json" in f


@pytest.mark.parametrize("evil", ["../escape.bin", "/tmp/abs.bin", "a/../../b"])
def test_signed_manifest_with_traversal_paths_is_refused(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evil: str
) -> None:
    """A key holder who is also a trusted signer (or a compromised build) seals a manifest
    naming ../ or absolute paths: the signature verifies (it covers ciphertext), but
    readers refuse the manifest and nothing is written outside the destination."""
    src = make_model_folder(env.work / "m")
    real = src / "config.json"
    st = real.stat()
    sealed = env.work / "evil.sealed"
    with monkeypatch.context() as m:  # a sealer without modelseal's own checks
        m.setattr(recipes_seal, "walk_folder", lambda _root, **_kw: [(evil, real, (st.st_dev, st.st_ino))])
        m.setattr(recipes_seal, "check_sealable", lambda _paths: None)
        modelseal.seal(src, sealed, KEY, keys=env.svc, sign_key=PemSigner.from_file(keys["release"]), name="evil")
    assert verify_artifact(sealed, load_policy(policy_file(tmp_path, keys))).name == "evil"
    out = env.work / "deep" / "out"
    out.parent.mkdir()
    assert main(["unseal", str(sealed), str(out)]) == 3
    assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == []
    assert not (env.work / "deep" / "escape.bin").exists() and not Path("/tmp/abs.bin").exists()


def test_inspect_lists_signatures_unverified(env: Env, keys: dict[str, Path]) -> None:
    sealed = signed_folder(env, keys)
    from modelseal import inspect

    sigs = inspect(sealed)["signatures"]
    assert [s["name"] for s in sigs] == ["llama-7b"] and sigs[0]["verified"] is False
    signature_path(sealed).write_text("{")
    assert str(inspect(sealed)["signatures"]).startswith("unreadable")


def test_sealed_file_takes_the_given_name_and_a_failed_signing_leaves_nothing(
    env: Env, keys: dict[str, Path], tmp_path: Path
) -> None:
    src = env.work / "w.bin"
    src.write_bytes(os.urandom(100_000))
    dst = env.work / "w.sealed"
    modelseal.seal(src, dst, KEY, keys=env.svc, sign_key=PemSigner.from_file(keys["security"]), name="weights-v2")
    assert verify_artifact(dst, load_policy(policy_file(tmp_path, keys))).name == "weights-v2"

    class Broken:
        public = PemSigner.from_file(keys["security"]).public

        def sign(self, data: bytes) -> bytes:
            raise modelseal_errors.KeyProviderError("signing service unreachable")

    from modelseal import errors as modelseal_errors

    before = (dst.read_bytes(), signature_path(dst).read_bytes())
    with pytest.raises(modelseal_errors.KeyProviderError):
        modelseal.seal(src, dst, KEY, keys=env.svc, sign_key=Broken(), force=True)
    assert (dst.read_bytes(), signature_path(dst).read_bytes()) == before
    fresh = env.work / "fresh.sealed"
    with pytest.raises(modelseal_errors.KeyProviderError):
        modelseal.seal(src, fresh, KEY, keys=env.svc, sign_key=Broken())
    assert not fresh.exists() and not signature_path(fresh).exists()
    assert sorted(p.name for p in env.work.iterdir()) == ["w.bin", "w.sealed", "w.sealed.msig"]
    folder = make_model_folder(tmp_path / "f")
    with pytest.raises(modelseal_errors.KeyProviderError):
        modelseal.seal(folder, env.work / "f.sealed", KEY, keys=env.svc, sign_key=Broken())
    assert sorted(p.name for p in env.work.iterdir()) == ["w.bin", "w.sealed", "w.sealed.msig"]


def test_sign_key_from_an_environment_variable(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI_SIGNING_KEY", keys["security"].read_text())
    sealed = signed_folder(env, keys, signer="release")
    assert main(["sign", str(sealed), "--sign-key", "env:CI_SIGNING_KEY"]) == 0
    assert verify_artifact(sealed, load_policy(policy_file(tmp_path, keys))).signers == ["release", "security"]
    assert main(["sign", str(sealed), "--sign-key", "env:NOT_SET_ANYWHERE"]) == 2


def test_sealing_over_a_signed_artifact_keeps_its_signatures_as_history(
    env: Env, keys: dict[str, Path], tmp_path: Path
) -> None:
    policy = load_policy(policy_file(tmp_path, keys))
    src = env.work / "w.bin"
    src.write_bytes(os.urandom(50_000))
    dst = env.work / "w.sealed"
    first = modelseal.seal(src, dst, KEY, keys=env.svc, sign_key=PemSigner.from_file(keys["security"])).signature
    modelseal.seal(src, dst, KEY, keys=env.svc, force=True)  # unsigned now, and says so
    with pytest.raises(VerificationError, match="not signed"):
        verify_artifact(dst, policy)
    sf = SignatureFile.load(signature_path(dst))
    assert sf is not None and not sf.signatures and [e.id for e in sf.history] == [first]
    # a re-encrypted file likewise
    second = modelseal.sign(dst, PemSigner.from_file(keys["security"]))
    modelseal.reencrypt(dst, keys=env.svc)
    sf = SignatureFile.load(signature_path(dst))
    assert sf is not None and not sf.signatures and [e.id for e in sf.history] == [first, second]
    # a folder sealed over with --force and a new signature
    folder = signed_folder(env, keys)
    old = SignatureFile.load(signature_path(folder))
    assert old is not None
    new = modelseal.seal(
        env.work / "src-llama-7b",
        folder,
        KEY,
        keys=env.svc,
        force=True,
        sign_key=PemSigner.from_file(keys["release"]),
        name="llama-7b",
    ).signature
    sf = SignatureFile.load(signature_path(folder))
    assert sf is not None and [e.id for e in sf.signatures] == [new]
    assert [e.id for e in sf.history] == [old.signatures[0].id]
    assert verify_artifact(folder, policy).name == "llama-7b"


def test_sign_oms_reads_digests_only_from_the_bytes_it_signs(
    env: Env, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest is swapped between hashing and reading: the OMS bundle must not take
    its plaintext digests from the swapped-in manifest."""
    from modelseal.signing.commitment import hash_artifact

    a = env.work / "a.sealed"
    b = env.work / "b.sealed"
    modelseal.seal(make_model_folder(env.work / "pa"), a, KEY, keys=env.svc)
    modelseal.seal(make_model_folder(env.work / "pb"), b, KEY, keys=env.svc)
    hashed_a = hash_artifact(a)
    monkeypatch.setattr(recipes_sign, "hash_artifact", lambda _root: hashed_a)  # b changed after a's bytes were hashed
    with pytest.raises(VerificationError, match="changed after"):
        modelseal.sign(b, PemSigner.from_file(keys["release"]), oms_bundle=True, keys=env.svc)
    monkeypatch.undo()
    assert not signature_path(b).exists()
