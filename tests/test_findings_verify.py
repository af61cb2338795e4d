"""Regressions for the outside review's verification findings: the gate's artifact kind and
plaintext revocations (finding 4), the environment pin (5), artifact rollback, verification
switched off from the environment, and verification work bounded by what a file holds.

Each test reproduces the reviewers' exploit and fails on 9c72615."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.cli import main
from modelseal.errors import PolicyDenied, VerificationError
from modelseal.format.header import parse_core
from modelseal.format.stream import ChunkLayout
from modelseal.keys.config import ConfigError
from modelseal.keys.service import KeyService
from modelseal.loaders.common import read_member
from modelseal.recipes.context import audit_verification_off
from modelseal.signing import commitment
from modelseal.signing.sigfile import SignatureFile, signature_path
from modelseal.signing.signers import ED25519, P256, PemSigner, VerifyKey, generate, private_pem
from modelseal.signing.trust import PolicyError, load_policy
from modelseal.signing.verification import verify_artifact

from .conftest import Env

KEY = "local:test-kek"
GATE = Path(__file__).resolve().parent.parent / "scripts" / "gate.sh"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, alg in (("release", P256), ("security", ED25519)):
        s = generate(alg)
        priv, pub = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub"
        priv.write_bytes(private_pem(s, None))
        pub.write_text(s.public.pem())
        out[name], out[name + ".pub"] = priv, pub
    return out


def policy(
    tmp_path: Path,
    keys: dict[str, Path],
    rules: str = "",
    *,
    extra: str = "",
    strict: bool = True,
    name: str = "trust.toml",
) -> Path:
    p = tmp_path / name
    p.write_text(
        f"version = 1\nstrict = {'true' if strict else 'false'}\n"
        f'[signers.release]\nkeys = ["{keys["release.pub"]}"]\n'
        f'[signers.security]\nkeys = ["{keys["security.pub"]}"]\n'
        + (rules or '[[rules]]\nsigners = ["release", "security"]\n')
        + extra
    )
    return p


def with_revocations(tmp_path: Path, keys: dict[str, Path], body: str = "") -> tuple[Path, Path]:
    lst = tmp_path / "revocations.json"
    pol = policy(tmp_path, keys, body, extra=f'[revocation]\nlist = "{lst}"\nsigners = ["security"]\n')
    assert revoke(lst, pol, keys, "--create") == 0
    return pol, lst


def revoke(lst: Path, pol: Path, keys: dict[str, Path], *extra: str) -> int:
    return main(["revoke", "--list", str(lst), "--sign-key", str(keys["security"]), "--trust", str(pol), *extra])


def model_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "bert"}')
    (root / "weights.bin").write_bytes(os.urandom(3000))
    return root


def seal_signed(e: Env, keys: dict[str, Path], dst: Path, /, *, signer: str = "release", **kw: object) -> Path:
    src = model_folder(Path(tempfile.mkdtemp(dir=e.work)) / "model")
    kw.setdefault("name", "llama-7b")
    modelseal.seal(src, dst, KEY, keys=e.svc, sign_key=PemSigner.from_file(keys[signer]), **kw)  # type: ignore[arg-type]
    return dst


def write_config(env: Env, text: str) -> KeyService:
    (env.home / "config.toml").write_text(text)
    return KeyService(sink=MemorySink())


# --- finding 4: the gate's artifact kind, and revocations of plaintext ------------------------


def test_gate_refuses_the_plaintext_of_a_revoked_artifact(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    """A revoked sealed model swapped for its own plaintext and the model.sig that unseal
    wrote passed `verify --strict` in plaintext-OMS mode, chosen from the content."""
    pol, lst = with_revocations(tmp_path, keys)
    sealed = seal_signed(env, keys, env.work / "llama-7b.sealed")
    digest = verify_artifact(sealed, load_policy(pol)).digest
    assert revoke(lst, pol, keys, "--artifact", digest) == 0
    assert main(["verify", str(sealed), "--trust", str(pol), "--strict"]) == 11
    plain = env.work / "plain"
    modelseal.unseal(sealed, plain, keys=env.svc, verify=False)
    assert (plain / "model.sig").is_file()  # a genuine model-signing signature by the release key
    shutil.rmtree(sealed)
    plain.rename(sealed)  # the exploit: the same path now holds the plaintext
    assert main(["verify", str(sealed), "--trust", str(pol), "--strict"]) == 4
    r = subprocess.run(
        [str(GATE), str(pol), str(sealed)],
        capture_output=True,
        text=True,
        env={**os.environ, "MODELSEAL": f"{sys.executable} -m modelseal.cli"},
        timeout=120,
    )
    assert r.returncode == 4 and "PASS" not in r.stdout


def test_plaintext_mode_is_asked_for_and_applies_every_revocation(
    env: Env, keys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pol, lst = with_revocations(tmp_path, keys)
    sealed = seal_signed(env, keys, env.work / "m.sealed")
    plain = env.work / "plain"
    modelseal.unseal(sealed, plain, keys=env.svc)
    assert main(["verify", "--plaintext", str(sealed), "--trust", str(pol)]) == 4  # sealed: not what was asked
    capsys.readouterr()
    assert main(["verify", "--plaintext", str(plain), "--trust", str(pol), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # --strict is strict here too: nothing outside the signature
    (plain / "extra.txt").write_text("smuggled")
    assert main(["verify", "--plaintext", str(plain), "--trust", str(pol), "--strict", "--allow-unlisted"]) == 2
    assert main(["verify", "--plaintext", str(plain), "--trust", str(pol), "--allow-unlisted"]) == 0
    (plain / "extra.txt").unlink()
    # the model digest revokes the plaintext as an artifact; the signature id revokes the signature
    assert revoke(lst, pol, keys, "--artifact", out["digest"]) == 0
    assert main(["verify", "--plaintext", str(plain), "--trust", str(pol)]) == 11
    lst.unlink()
    (env.home / "revocation-state.json").unlink()
    assert revoke(lst, pol, keys, "--create", "--signature", out["signature_id"]) == 0
    assert main(["verify", "--plaintext", str(plain), "--trust", str(pol)]) == 11
    # a plaintext model has no environment: an environment pin refuses it
    assert main(["verify", "--plaintext", str(plain), "--public-key", str(keys["release.pub"]), "--env", "prod"]) == 10


# --- finding 5: the environment pin -------------------------------------------------------------

PROD_TWO_SIGNERS = (
    '[[rules]]\nartifacts = ["llama-*"]\nenvironments = ["prod"]\nsigners = ["release", "security"]\nthreshold = 2\n'
    '[[rules]]\nartifacts = ["*"]\nenvironments = ["dev"]\nsigners = ["release"]\n'
)


def test_environment_pin_refuses_a_dev_build_in_prod(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only the name pinned, a one-signer dev build of llama-7b satisfied a prod host."""
    pol = policy(tmp_path, keys, PROD_TWO_SIGNERS)
    dev = seal_signed(env, keys, env.work / "llama-7b.sealed", env="dev")
    assert main(["verify", str(dev), "--trust", str(pol), "--name", "llama-7b"]) == 0
    assert main(["verify", str(dev), "--trust", str(pol), "--name", "llama-7b", "--env", "prod"]) == 10
    with pytest.raises(VerificationError, match="not the expected env 'prod'"):
        verify_artifact(dev, load_policy(pol), expect_name="llama-7b", expect_env="prod")
    monkeypatch.setenv("MODELSEAL_TRUST", str(pol))
    with pytest.raises(VerificationError, match="env 'prod'"):
        modelseal.open_folder(dev, keys=env.svc, expect_name="llama-7b", expect_env="prod")
    with modelseal.expecting("llama-7b", env="prod"), pytest.raises(VerificationError, match="env 'prod'"):
        modelseal.open(dev, "config.json", keys=env.svc)
    with pytest.raises(VerificationError, match="env 'prod'"):
        modelseal.unseal(dev, env.work / "out", keys=env.svc, expect_env="prod")
    assert not (env.work / "out").exists()
    with modelseal.expecting("llama-7b", env="dev"), modelseal.open(dev, "config.json", keys=env.svc) as r:
        assert r.verified


def test_host_env_refuses_other_environments_by_default(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    """config.toml's host_env: without any pin or trust policy, a prod host refuses dev artifacts."""
    src = model_folder(env.work / "src")
    dev = env.work / "dev.sealed"
    modelseal.seal(src, dev, KEY, keys=env.svc, env="dev")
    svc = write_config(env, 'host_env = "prod"\n')
    with pytest.raises(VerificationError, match="not the expected env 'prod'"):
        modelseal.open_folder(dev, keys=svc)
    with modelseal.open_folder(dev, keys=svc, expect_env="dev") as f:  # an explicit pin is the caller's choice
        assert f.read("config.json")
    # sealing defaults to the host's environment, and the loaders refuse the rest
    prod = env.work / "prod.sealed"
    modelseal.seal(src, prod, KEY, keys=svc)
    with modelseal.open_folder(prod, keys=svc) as f:
        assert f.read("config.json")
    with pytest.raises(VerificationError, match="env 'prod'"):
        read_member(dev, "config.json", keys=svc)
    with pytest.raises(VerificationError, match="env 'prod'"):
        read_member(src / "config.json", allow_plaintext=True, keys=svc)  # plaintext has no environment
    pol = policy(tmp_path, keys, '[[rules]]\nsigners = ["release"]\n')
    signed = seal_signed(env, keys, env.work / "s.sealed", env="dev")
    assert main(["verify", str(signed), "--trust", str(pol)]) == 10  # the CLI's own service reads config.toml
    assert main(["verify", str(signed), "--trust", str(pol), "--env", "dev"]) == 0


# --- rollback of artifacts ----------------------------------------------------------------------


def test_host_refuses_an_older_version_of_an_accepted_artifact(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry writer replaced llama-7b v2 by the older, validly signed v1."""
    pol = policy(tmp_path, keys)
    dst = seal_signed(env, keys, env.work / "llama-7b.sealed")
    v1 = env.work / "v1-copy"
    shutil.copytree(dst, v1)
    seal_signed(env, keys, dst, force=True)  # the signer's next version by default
    first = verify_artifact(v1, load_policy(pol))  # a fresh host takes v1 ...
    second = verify_artifact(dst, load_policy(pol))  # ... then accepts v2, and remembers it
    shutil.rmtree(dst)
    shutil.copytree(v1, dst)
    with pytest.raises(VerificationError, match="rolled back"):
        verify_artifact(dst, load_policy(pol))
    assert main(["verify", str(dst), "--trust", str(pol)]) == 10
    monkeypatch.setenv("MODELSEAL_TRUST", str(pol))
    with pytest.raises(VerificationError, match="rolled back"):
        modelseal.open_folder(dst, keys=env.svc)
    assert (first.version, second.version) == (1, 2)  # the signer's next version, by default
    # records are kept per trust policy: a key trusted elsewhere cannot raise this policy's floor
    vendor = seal_signed(env, keys, env.work / "vendor.sealed", signer="security", version=99)
    verify_artifact(vendor, modelseal.TrustPolicy.from_keys([VerifyKey.from_file(keys["security.pub"])]))
    v3 = seal_signed(env, keys, env.work / "v3.sealed")
    assert verify_artifact(v3, load_policy(pol)).version == 3


def test_policy_minimum_version_and_old_statements(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    pol = policy(tmp_path, keys, '[[rules]]\nsigners = ["release"]\nmin_version = 3\n')
    low = seal_signed(env, keys, env.work / "a.sealed", version=2)
    with pytest.raises(VerificationError, match="rolled back"):
        verify_artifact(low, load_policy(pol))  # on a host that has seen nothing
    assert verify_artifact(seal_signed(env, keys, env.work / "b.sealed", version=3), load_policy(pol)).version == 3
    # a statement of an older release carries no version: version 0, refused once a newer one is known
    vectors = Path(__file__).parent / "vectors"
    for name in ("signed-three-chunks.mseal", "signed-three-chunks.mseal.msig"):
        shutil.copy(vectors / name, tmp_path / name)
    gold = modelseal.TrustPolicy.from_keys([VerifyKey.from_file(vectors / "signing-ed25519.pub")])
    v = verify_artifact(tmp_path / "signed-three-chunks.mseal", gold)
    assert v.version == 0 and v.name == "vector-three-chunks"
    from modelseal.signing.rollback import remember_accepted  # new in this change

    remember_accepted(gold.identity(), v.env, v.name, 1)
    with pytest.raises(VerificationError, match="rolled back"):
        verify_artifact(tmp_path / "signed-three-chunks.mseal", gold)


def test_cosigners_agree_on_the_version(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    both = policy(tmp_path, keys, '[[rules]]\nsigners = ["release", "security"]\nthreshold = 2\n')
    one = policy(tmp_path, keys, '[[rules]]\nsigners = ["release", "security"]\n', name="one.toml")
    dst = seal_signed(env, keys, env.work / "m.sealed", version=5)
    security = PemSigner.from_file(keys["security"])
    # versions are never taken from other keys' entries: the co-signer says which one it vouches for
    with pytest.raises(ValueError, match="version 5"):
        modelseal.sign(dst, security, name="llama-7b")
    assert main(["sign", str(dst), "--sign-key", str(keys["security"]), "--name", "llama-7b", "--version", "5"]) == 0
    assert verify_artifact(dst, load_policy(both)).version == 5
    # a re-sign at another version supersedes the signatures at the old one
    modelseal.sign(dst, PemSigner.from_file(keys["release"]), version=6)
    sf = SignatureFile.load(signature_path(dst))
    assert sf is not None and [e.statement.version for e in sf.signatures] == [6]
    assert sorted(e.statement.version for e in sf.history) == [5, 5]
    assert verify_artifact(dst, load_policy(one)).version == 6


# --- verification switched off from the environment ---------------------------------------------


def test_environment_cannot_loosen_the_configured_policy(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    strict = policy(tmp_path, keys, '[[rules]]\nsigners = ["release"]\n')
    lenient = policy(tmp_path, keys, '[[rules]]\nsigners = ["security"]\n', strict=False, name="lenient.toml")
    unsigned = env.work / "u.sealed"
    modelseal.seal(model_folder(env.work / "src"), unsigned, KEY, keys=env.svc)
    write_config(env, f'trust_policy = "{strict}"\n')
    sink = MemorySink()
    svc = KeyService(sink=sink)
    with pytest.raises(VerificationError, match="not signed"):
        modelseal.open_folder(unsigned, keys=svc)
    monkeypatch.setenv("MODELSEAL_TRUST", "")  # the exploit: verification switched off
    with pytest.raises(PolicyDenied, match="cannot switch verification off"):
        modelseal.open_folder(unsigned, keys=svc)
    monkeypatch.setenv("MODELSEAL_TRUST", str(lenient))  # or a looser policy swapped in: both apply
    with pytest.raises(VerificationError, match="not signed"):
        modelseal.open_folder(unsigned, keys=svc)
    assert main(["verify", str(unsigned)]) == 10
    # loosening takes an explicit flag, and is logged and audited
    monkeypatch.setenv("MODELSEAL_TRUST_OVERRIDE", "1")
    with caplog.at_level(logging.WARNING, logger="modelseal"), modelseal.open_folder(unsigned, keys=svc) as f:
        assert f.read("config.json")
    assert "MODELSEAL_TRUST_OVERRIDE" in caplog.text
    assert [e.operation for e in sink.events].count("trust-override") == 1


def test_pull_no_verify_under_a_policy_is_audited(
    env: Env, keys: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # `modelseal pull --no-verify` is an explicit switch; with a trust policy in force it is
    # logged and audited like the environment override, never silent.
    sink = MemorySink()
    svc = KeyService(sink=sink)
    audit_verification_off(svc, "pull --no-verify")
    assert sink.events == []  # no policy in force: nothing is skipped
    write_config(env, f'trust_policy = "{policy(tmp_path, keys)}"\n')
    svc = KeyService(sink=sink)
    with caplog.at_level(logging.WARNING, logger="modelseal"):
        audit_verification_off(svc, "pull --no-verify")
    assert "skips the trust policy in force" in caplog.text
    assert [(e.operation, e.key) for e in sink.events] == [("trust-override", "trust:pull --no-verify")]


def test_writable_home_config_or_policy_is_refused(env: Env, keys: dict[str, Path], tmp_path: Path) -> None:
    pol = policy(tmp_path, keys)
    config = env.home / "config.toml"
    config.write_text(f'trust_policy = "{pol}"\n')
    assert KeyService().config.trust_policy == pol
    for target, mode in ((config, 0o664), (env.home, 0o775)):
        old = target.stat().st_mode & 0o777
        target.chmod(mode)
        with pytest.raises(ConfigError, match="writable by group or others"):
            KeyService().config
        target.chmod(old)
    for target, mode in ((pol, 0o666), (keys["release.pub"], 0o646), (tmp_path, 0o777)):
        old = target.stat().st_mode & 0o777
        target.chmod(mode)
        with pytest.raises(PolicyError, match="writable by group or others"):
            load_policy(pol)
        target.chmod(old)
    tmp_path.chmod(0o1777)  # a sticky folder (/tmp): only the owner can replace the file
    try:
        load_policy(pol)
    finally:
        tmp_path.chmod(0o700)


# --- bound verify's work ------------------------------------------------------------------------


def _no_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def refuse(ct: object) -> bytes:
        calls.append(1)
        raise AssertionError("a chunk was hashed")

    monkeypatch.setattr(commitment, "chunk_hash", refuse)
    return calls


def test_sparse_file_claiming_a_terabyte_fails_before_hashing(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = env.work / "small.sealed"
    src = env.work / "small.bin"
    src.write_bytes(os.urandom(5000))
    modelseal.seal(src, sealed, KEY, keys=env.svc)
    data = bytearray(sealed.read_bytes())
    core = parse_core(bytes(data))
    field = struct.pack(">BBQ", core.kind, core.chunk_log2, core.plaintext_length)
    at = bytes(data).index(field)
    huge = 1 << 40
    data[at : at + len(field)] = struct.pack(">BBQ", core.kind, core.chunk_log2, huge)
    sealed.write_bytes(bytes(data[: core.payload_offset]))
    os.truncate(sealed, ChunkLayout(core.chunk_size, huge, core.payload_offset).file_length)  # a 1 TiB hole
    calls = _no_hashing(monkeypatch)
    for strict in (True, False):
        with pytest.raises(VerificationError, match="sparse"):
            verify_artifact(
                sealed, modelseal.TrustPolicy.from_keys([PemSigner.from_file(keys["release"]).public], strict)
            )
    assert main(["verify", str(sealed), "--public-key", str(keys["release.pub"])]) == 10
    assert calls == []


def test_signed_artifact_that_cannot_pass_fails_before_hashing(
    env: Env, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pol = policy(tmp_path, keys)
    good = seal_signed(env, keys, env.work / "good.sealed")
    other = seal_signed(env, keys, env.work / "other.sealed", name="other")
    shutil.copy(signature_path(other), signature_path(good))  # a genuine signature of another artifact
    calls = _no_hashing(monkeypatch)
    with pytest.raises(VerificationError, match="does not match"):
        verify_artifact(good, load_policy(pol))
    with pytest.raises(VerificationError, match="not the expected 'llama-7b'"):
        verify_artifact(other, load_policy(pol), expect_name="llama-7b")
    assert calls == []


def test_version_vectors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/vectors/versions.json (generate_versions.py): the statement's version field."""
    monkeypatch.setenv("MODELSEAL_HOME", str(tmp_path / "no-home"))  # a host without records
    vectors = Path(__file__).parent / "vectors"
    index = json.loads((vectors / "versions.json").read_text())
    shutil.copy(vectors / index["artifact"], tmp_path / "a.mseal")
    gold = modelseal.TrustPolicy.from_keys([VerifyKey.from_file(vectors / "signing-ed25519.pub")])
    for vec in index["vectors"]:
        sig = vectors / vec["signature"]
        if vec["expect"] == "success":
            v = verify_artifact(tmp_path / "a.mseal", gold, signature=sig)
            assert v.version == vec["version"]
            assert "signature_id" not in vec or v.results[0].id == vec["signature_id"]
        else:
            with pytest.raises(VerificationError, match="malformed"):
                verify_artifact(tmp_path / "a.mseal", gold, signature=sig)
