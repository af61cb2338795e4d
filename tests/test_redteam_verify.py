"""The red team's attacks on the verification fixes ("verify", /tmp/redteam-verify), one
test or more per flaw: a home switched by the environment, sparse plaintext, unsigned
and hard-linked artifacts hashed before a refusal, the public verify ignoring the pins,
the rollback record keyed by a path's spelling, plaintext under a name pin, untyped
parser exceptions."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.cli import main
from modelseal.errors import KeystoreError, Revoked, StorageError, VerificationError
from modelseal.keys import config as config_mod
from modelseal.keys.config import ConfigError
from modelseal.keys.service import KeyService
from modelseal.loaders.common import read_member
from modelseal.loaders.safetensors import SafetensorsError, parse_header
from modelseal.recipes import context
from modelseal.signing import commitment, oms
from modelseal.signing.revocation import RevocationList, new_revocation, seen_version, write_list
from modelseal.signing.signers import ED25519, P256, PemSigner, generate, private_pem
from modelseal.signing.trust import PolicyError, load_policy
from modelseal.signing.verification import verify_artifact
from modelseal.util import home as home_mod
from modelseal.util.bounded import toml_loads

from .conftest import Env
from .test_review_fixes import ToyProvider

KEY = "local:test-kek"


@pytest.fixture
def signer(tmp_path: Path) -> tuple[Path, Path]:
    s = generate(P256)
    priv, pub = tmp_path / "rel.pem", tmp_path / "rel.pub"
    priv.write_bytes(private_pem(s, None))
    priv.chmod(0o600)
    pub.write_text(s.public.pem())
    return priv, pub


def policy(path: Path, pub: Path, *, strict: bool = True, extra: str = "") -> Path:
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(
        f'version = 1\nstrict = {"true" if strict else "false"}\n[signers.rel]\nkeys = ["{pub}"]\n'
        '[[rules]]\nsigners = ["rel"]\n' + extra
    )
    return path


def write_config(home: Path, text: str) -> None:
    (home / "config.toml").write_text(text)
    (home / "config.toml").chmod(0o600)


def fresh_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context, "_service", None)


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"n": 0}
    real = commitment.hash_chunks

    def counting(*a: Any, **k: Any) -> bytes:
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(commitment, "hash_chunks", counting)
    return calls


# --- 1. a home switched by the environment ----------------------------------------------------


def test_missing_home_is_refused_not_read_as_unconfigured(
    env: Env, signer: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t7: with config.toml's strict policy and host_env, a remote key still unwrapped an
    unsigned dev artifact once MODELSEAL_HOME (or HOME) named a missing folder."""
    toy = ToyProvider()
    svc = KeyService(sink=MemorySink(), providers={"toy": toy})
    (env.work / "w.bin").write_bytes(b"attacker weights")
    sealed = env.work / "w.sealed"
    modelseal.seal(env.work / "w.bin", sealed, "toy:kek", env="dev", keys=svc)
    pol = policy(tmp_path / "pol" / "trust.toml", signer[1])
    write_config(env.home, f'host_env = "prod"\ntrust_policy = "{pol}"\n')
    with pytest.raises(VerificationError):  # the configured home: refused
        modelseal.open(sealed, keys=KeyService(sink=MemorySink(), providers={"toy": toy}))
    missing = tmp_path / "nonexistent"
    monkeypatch.setenv("MODELSEAL_HOME", str(missing))
    with pytest.raises(KeystoreError, match="modelseal init"):
        modelseal.open(sealed, keys=KeyService(sink=MemorySink(), providers={"toy": toy}))
    assert main(["verify", "--trust", str(pol), str(sealed)]) == 6
    assert not missing.exists()  # no fresh audit.db either
    # A missing ~/.modelseal under $HOME is a host that keeps no state (CI containers point
    # $HOME anywhere): the guarantee whatever the environment says is /etc/modelseal (below).


def test_own_default_home_may_be_missing_and_init_makes_any(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stateless CI runner has no ~/.modelseal, wherever $HOME points; a home that
    MODELSEAL_HOME names must exist; `init` creates one."""
    own = tmp_path / "runner" / ".modelseal"
    monkeypatch.setattr(home_mod, "own_default_home", lambda: own)
    monkeypatch.setenv("MODELSEAL_HOME", "")
    monkeypatch.setenv("HOME", str(own.parent))
    assert config_mod.load() == config_mod.Config()
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))  # a CI container's $HOME: stateless too
    assert config_mod.load() == config_mod.Config()
    target = tmp_path / "new-home"
    monkeypatch.setenv("MODELSEAL_HOME", str(target))
    assert main(["key", "list"]) == 6
    assert main(["init"]) == 0 and (target / "keystore.json").is_file()  # init creates the home
    assert config_mod.load(target) == config_mod.Config()
    (tmp_path / "file-home").write_text("")
    with pytest.raises(ConfigError, match="not a folder"):
        config_mod.load(tmp_path / "file-home")


@pytest.fixture
def system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    etc = tmp_path / "etc-modelseal"
    etc.mkdir(mode=0o755)
    path = etc / "config.toml"
    monkeypatch.setattr(config_mod, "SYSTEM_CONFIG", path)
    return path


def test_system_policy_applies_on_top_of_any_home(
    env: Env, signer: tuple[Path, Path], tmp_path: Path, system_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (env.work / "w.bin").write_bytes(b"unsigned")
    sealed = env.work / "w.sealed"
    modelseal.seal(env.work / "w.bin", sealed, KEY, keys=env.svc)
    policy(system_config.parent / "trust.toml", signer[1])
    system_config.write_text('trust_policy = "trust.toml"\n')  # relative to /etc/modelseal
    lenient = policy(tmp_path / "pol" / "lenient.toml", signer[1], strict=False)
    write_config(env.home, f'trust_policy = "{lenient}"\n')
    other = tmp_path / "other-home"
    other.mkdir(mode=0o700)
    for variables in ({}, {"MODELSEAL_TRUST_OVERRIDE": "1", "MODELSEAL_TRUST": ""}, {"MODELSEAL_HOME": str(other)}):
        for k, v in variables.items():
            monkeypatch.setenv(k, v)
        fresh_service(monkeypatch)
        with pytest.raises(VerificationError, match="strict"):
            modelseal.open(sealed)
    monkeypatch.setenv("MODELSEAL_HOME", str(env.home))
    fresh_service(monkeypatch)
    assert modelseal.open(sealed, verify=False).read() == b"unsigned"  # the caller's explicit choice


def test_system_host_env_cannot_be_changed_by_a_home(env: Env, system_config: Path) -> None:
    system_config.write_text('host_env = "prod"\n')
    write_config(env.home, 'host_env = "dev"\n')
    with pytest.raises(ConfigError, match="cannot change this host's environment"):
        config_mod.load()
    write_config(env.home, "")
    cfg = config_mod.load()
    assert (cfg.host_env, cfg.default_env) == ("prod", "prod")
    (env.work / "w.bin").write_bytes(b"dev")
    modelseal.seal(env.work / "w.bin", env.work / "w.sealed", KEY, env="dev", keys=env.svc)
    with pytest.raises(VerificationError, match="not the expected env 'prod'"):
        modelseal.open(env.work / "w.sealed", keys=KeyService(sink=MemorySink()))
    write_config(env.home, 'host_env = "prod"\n')  # repeating it is fine
    assert config_mod.load().host_env == "prod"


def test_system_config_is_private_and_holds_only_host_settings(env: Env, system_config: Path) -> None:
    system_config.write_text('environments.prod.keys = ["local:k"]\n')
    with pytest.raises(ConfigError, match="only host_env and trust_policy"):
        config_mod.load()
    system_config.write_text('host_env = "prod"\n')
    system_config.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by group or others"):
        config_mod.load()
    system_config.chmod(0o644)
    system_config.parent.chmod(0o777)
    with pytest.raises(ConfigError, match="the folder of the system configuration"):
        config_mod.load()
    system_config.parent.chmod(0o755)
    assert config_mod.load().host_env == "prod"


# --- 2. sparse plaintext ----------------------------------------------------------------------


def test_sparse_plaintext_is_refused_before_hashing(env: Env, signer: tuple[Path, Path], tmp_path: Path) -> None:
    """t3: a sparse file planted under a signed name was hashed hole by hole."""
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text("{}")
    (m / "weights.bin").write_bytes(os.urandom(4096))
    files = [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(m.iterdir())]
    (m / "model.sig").write_bytes(oms.bundle_for_folder(PemSigner.from_file(signer[0]), "llama-7b", files))
    pub = oms.load_public_key(signer[1])
    assert oms.verify_model(m, m / "model.sig", [pub]).files == 2
    with open(m / "weights.bin", "r+b") as f:
        f.truncate(1 << 36)  # 64 GiB in a few blocks (ext4 stops at 16 TiB)
    with pytest.raises(VerificationError, match="sparse"):
        oms.verify_model(m, m / "model.sig", [pub])
    pol = policy(tmp_path / "pol" / "trust.toml", signer[1])
    assert main(["verify", "--plaintext", "--trust", str(pol), str(m)]) == 10
    # A genuine file with a small hole (under 1 MiB) is still hashed.
    with open(m / "weights.bin", "wb") as f:
        f.seek(64 << 10)
        f.write(b"x")
    assert len(oms._hash_file(m / "weights.bin", "sha256")) == 64


def test_fifo_swapped_in_for_a_plaintext_file_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "weights.bin")
    with pytest.raises(StorageError, match="not a regular file"):
        oms._hash_file(tmp_path / "weights.bin", "sha256")


# --- 3. work before a refusal -----------------------------------------------------------------


def _unsigned(env: Env, size: int = 3 << 20) -> Path:
    (env.work / "big.bin").write_bytes(os.urandom(size))
    modelseal.seal(env.work / "big.bin", env.work / "big.sealed", KEY, keys=env.svc)
    return env.work / "big.sealed"


def test_unsigned_artifact_under_strict_policy_is_refused_before_hashing(
    env: Env, signer: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t1: a deep verify hashed every chunk of an unsigned artifact, then refused it."""
    sealed = _unsigned(env)
    calls = count_hashing(monkeypatch)
    pol = load_policy(policy(tmp_path / "pol" / "trust.toml", signer[1], strict=False))
    for kwargs in ({"strict": True}, {"expect_name": "llama-7b"}, {"expect_env": "prod"}):
        with pytest.raises(VerificationError):
            verify_artifact(sealed, pol, **kwargs)
    assert calls["n"] == 0
    v = verify_artifact(sealed, pol)  # allowed (lenient): a deep verify still reports the digest
    assert not v.signed and len(v.digest) == 64 and calls["n"] == 1


def test_revoked_digest_of_an_unsigned_artifact_still_reports_revoked(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a revocation list applies, the deep verify hashes so exit 11 stays exit 11."""
    sealed = _unsigned(env)
    sec = generate(ED25519)
    (tmp_path / "sec.pub").write_text(sec.public.pem())
    lst = tmp_path / "revocations.json"
    pol_path = policy(
        tmp_path / "pol" / "trust.toml",
        tmp_path / "sec.pub",
        extra=f'[revocation]\nlist = "{lst}"\nsigners = ["rel"]\n',
    )
    digest = commitment.artifact_digest(commitment.hash_artifact(sealed)[0])
    now = datetime.now(UTC)
    write_list(lst, RevocationList(1, now, now + timedelta(days=1), [new_revocation("artifact", digest, "")]), sec)
    with pytest.raises(Revoked):
        verify_artifact(sealed, load_policy(pol_path))
    assert main(["verify", "--trust", str(pol_path), "--strict", str(sealed)]) == 11
    calls = count_hashing(monkeypatch)
    with pytest.raises(VerificationError) as e:  # on load, not hashed: refused as unsigned
        verify_artifact(sealed, load_policy(pol_path), deep=False)
    assert not isinstance(e.value, Revoked) and calls["n"] == 0


def test_hard_links_inside_a_sealed_folder_are_refused(
    env: Env, signer: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t2: 32 links to one blob were hashed 32 times."""
    src = tmp_path / "m"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(2 << 20))
    sealed = env.work / "m.sealed"
    modelseal.seal(src, sealed, KEY, keys=env.svc, sign_key=PemSigner.from_file(signer[0]), name="m")
    pol = load_policy(policy(tmp_path / "pol" / "trust.toml", signer[1]))
    blobs = sealed / "blobs"
    big = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    os.link(big, tmp_path / "backup-of-blob")  # a link from outside the folder: harmless
    assert verify_artifact(sealed, pol).signed
    calls = count_hashing(monkeypatch)
    for i in range(4):
        os.link(big, blobs / f"{0xABC000 + i:032x}")
    with pytest.raises(VerificationError, match="hard link"):
        verify_artifact(sealed, pol, strict=True)
    for p in list(blobs.iterdir()):
        if p.name.startswith("00000000000000000000000000abc"):
            p.unlink()
    os.link(sealed / "manifest.mseal", blobs / f"{1:032x}")  # the manifest under a blob's name
    with pytest.raises(VerificationError, match="hard link"):
        verify_artifact(sealed, pol)
    assert calls["n"] == 0


# --- 4. the public verify_artifact and the pins in force --------------------------------------


def test_public_verify_artifact_applies_expecting_and_host_env(
    env: Env, signer: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t11: modelseal.verify_artifact ignored expecting() and config.toml's host_env."""
    (env.work / "w.bin").write_bytes(b"dev build")
    sealed = env.work / "dev.sealed"
    modelseal.seal(
        env.work / "w.bin", sealed, KEY, keys=env.svc, env="dev", sign_key=PemSigner.from_file(signer[0]), name="other"
    )
    pol = modelseal.load_policy(policy(tmp_path / "pol" / "trust.toml", signer[1]))
    assert modelseal.verify_artifact(sealed, pol).name == "other"
    with modelseal.expecting("llama-7b"), pytest.raises(VerificationError, match="not the expected 'llama-7b'"):
        modelseal.verify_artifact(sealed, pol)
    with modelseal.expecting(env="prod"), pytest.raises(VerificationError, match="expected env 'prod'"):
        modelseal.verify_artifact(sealed, pol)
    write_config(env.home, 'host_env = "prod"\n')
    monkeypatch.setattr(context, "_service", None)
    with pytest.raises(VerificationError, match="expected env 'prod'"):
        modelseal.verify_artifact(sealed, pol)
    assert modelseal.verify_artifact(sealed, pol, expect_env="dev").env == "dev"  # an explicit pin wins
    assert modelseal.verify_artifact is not verify_artifact


# --- 5. the rollback record and the policy's spelling ------------------------------------------


def test_rollback_floor_does_not_depend_on_the_policy_paths_spelling(
    env: Env, signer: tuple[Path, Path], tmp_path: Path
) -> None:
    """t9: `//abs/trust.toml` or a symlinked folder had a fresh record: v1 passed after v2."""
    pol = policy(tmp_path / "pol" / "trust.toml", signer[1])
    (env.work / "w.bin").write_bytes(b"weights")
    for version in (1, 2):
        modelseal.seal(
            env.work / "w.bin", env.work / f"v{version}.sealed", KEY, keys=env.svc,
            sign_key=PemSigner.from_file(signer[0]), name="llama-7b", version=version,
        )  # fmt: skip
    assert verify_artifact(env.work / "v2.sealed", load_policy(pol)).version == 2
    os.symlink(pol.parent, tmp_path / "pol-link")
    spellings = [
        "/" + str(pol),
        str(tmp_path / "pol-link" / "trust.toml"),
        f"{pol.parent}/./trust.toml",
        f"{tmp_path}/pol-link/../pol/trust.toml",
    ]
    for spelled in spellings:
        with pytest.raises(VerificationError, match="rolled back"):
            verify_artifact(env.work / "v1.sealed", load_policy(spelled))
    # A symlink swapped in at the policy's own name keeps the record of that name.
    elsewhere = policy(tmp_path / "elsewhere" / "trust.toml", signer[1])
    pol.unlink()
    os.symlink(elsewhere, pol)
    with pytest.raises(VerificationError, match="rolled back"):
        verify_artifact(env.work / "v1.sealed", load_policy(pol))
    assert verify_artifact(env.work / "v1.sealed", load_policy(elsewhere)).version == 1  # its own record


def test_revocation_record_does_not_depend_on_the_list_paths_spelling(env: Env, tmp_path: Path) -> None:
    from modelseal.signing.revocation import record_version

    folder = tmp_path / "lists"
    folder.mkdir()
    os.symlink(folder, tmp_path / "lists-link")
    record_version(folder / "revocations.json", 7)
    assert seen_version(Path("/" + str(folder / "revocations.json"))) == 7
    assert seen_version(tmp_path / "lists-link" / "revocations.json") == 7


# --- 6. plaintext under a name pin, require_name and revocations --------------------------------


def test_allow_plaintext_is_refused_under_every_pin_and_revocation_list(
    env: Env, signer: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """t8: allow_plaintext=True ignored the name pin, require_name and revocations."""
    plain = env.work / "w.bin"
    plain.write_bytes(b"planted plaintext")
    lenient = policy(tmp_path / "pol" / "lenient.toml", signer[1], strict=False)
    write_config(env.home, f'trust_policy = "{lenient}"\n')
    fresh_service(monkeypatch)
    assert bytes(read_member(plain, allow_plaintext=True)) == b"planted plaintext"
    with modelseal.expecting("llama-7b"), pytest.raises(VerificationError, match="signed 'llama-7b' is expected"):
        read_member(plain, allow_plaintext=True)
    named = policy(tmp_path / "pol" / "named.toml", signer[1], strict=False, extra="")
    named.write_text(named.read_text().replace("strict = false\n", "strict = false\nrequire_name = true\n"))
    revoking = policy(
        tmp_path / "pol" / "revoking.toml",
        signer[1],
        strict=False,
        extra=f'[revocation]\nlist = "{tmp_path / "none.json"}"\nsigners = ["rel"]\n',
    )
    for pol, why in ((named, "requires the artifact's signed name"), (revoking, "revocation list")):
        write_config(env.home, f'trust_policy = "{pol}"\n')
        fresh_service(monkeypatch)
        with pytest.raises(VerificationError, match=why):
            read_member(plain, allow_plaintext=True)


# --- 7. untyped parser exceptions -------------------------------------------------------------


def test_long_toml_integers_are_typed_errors(env: Env, signer: tuple[Path, Path], tmp_path: Path) -> None:
    """t6: a 5000-digit integer made tomllib raise a bare ValueError."""
    with pytest.raises(PolicyError, match="more than 40 digits"):
        toml_loads("x = " + "1" * 5000, max_depth=8, max_key_parts=8, max_values=100, error=PolicyError)
    with pytest.raises(PolicyError, match="more than 40 digits"):
        toml_loads("x = " + "1" * 41, max_depth=8, max_key_parts=8, max_values=100, error=PolicyError)
    doc = toml_loads(
        f'x = {"9" * 40}\ny = "{"1" * 5000}" # {"2" * 5000}\n', max_depth=8, max_key_parts=8, max_values=100,
        error=PolicyError,
    )  # fmt: skip
    assert doc["x"] == int("9" * 40) and len(doc["y"]) == 5000
    pol = policy(tmp_path / "pol" / "trust.toml", signer[1], extra=f"threshold = {'1' * 5000}\n")
    with pytest.raises(PolicyError, match="more than 40 digits"):
        load_policy(pol)
    write_config(env.home, f"rotate_after_days = {'9' * 5000}\n")
    with pytest.raises(ConfigError, match="more than 40 digits"):
        config_mod.load()


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def preadinto(self, offset: int, buf: bytearray | memoryview, *, private: bool = False) -> int:
        chunk = self.data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        pass


def _safetensors(shape: list[int]) -> _Bytes:
    header = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    return _Bytes(len(header).to_bytes(8, "little") + header)


def test_safetensors_with_more_than_64_dimensions_is_refused(env: Env) -> None:
    """t10: 100 zero dimensions passed parse_header, then numpy raised ValueError."""
    assert parse_header(_safetensors([0] * 64))[0]["t"].shape == (0,) * 64
    with pytest.raises(SafetensorsError, match="more than 64 dimensions"):
        parse_header(_safetensors([0] * 65))
    plain = env.work / "m.safetensors"
    data = _safetensors([0] * 100).data
    plain.write_bytes(data)
    modelseal.seal(plain, env.work / "m.sealed", KEY, keys=env.svc)
    import modelseal.safetensors as mst

    with pytest.raises(SafetensorsError):
        mst.load_file(env.work / "m.sealed", framework="np", keys=env.svc)
