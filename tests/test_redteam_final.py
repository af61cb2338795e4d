"""The last red-team pass over the second round of fixes: a genuine sparse copy still
verifies, a Transit outage does not multiply a rotation's requests, the system config
never blocks on a FIFO, a hard link of a keystore file is never sealed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import modelseal
from modelseal.errors import DecryptionError, PolicyDenied, ProviderUnavailable
from modelseal.format.header import Recipient
from modelseal.signing import oms

from .conftest import Env


def test_a_genuine_sparse_copy_still_hashes(tmp_path: Path) -> None:
    """An untrained LoRA matrix: megabytes of zeros, copied with cp --sparse=always."""
    p = tmp_path / "adapter.bin"
    with open(p, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.seek(5 << 20)  # a 4 MiB hole, more than the old 1 MiB limit
        f.write(os.urandom(1 << 20))
    assert len(oms._hash_file(p, "sha256")) == 64
    with open(p, "r+b") as f:
        f.truncate(1 << 36)  # 64 GiB of holes over 2 MiB stored: still refused
    with pytest.raises(modelseal.VerificationError, match="sparse"):
        oms._hash_file(p, "sha256")


class _Down:
    """A Transit provider whose server is unreachable: every request fails alike."""

    def __init__(self) -> None:
        self.requests = 0

    def unwrap_many(self, *_a: Any, **_k: Any) -> list[bytes]:
        self.requests += 1
        raise ProviderUnavailable("transit: the server is unreachable during decrypt")

    rewrap_many = unwrap_many


class _OneBad(_Down):
    """A reachable server; one ciphertext of the batch is corrupted."""

    def unwrap_many(self, ours: list[Recipient], *_a: Any, **_k: Any) -> list[bytes]:
        self.requests += 1
        if any(r.key_id == "bad" for r in ours):
            raise DecryptionError()
        return [b"k" * 32 for _ in ours]

    def rewrap_many(self, ours: list[Recipient], *_a: Any, **_k: Any) -> list[Recipient]:
        return list(ours)


class _Svc:
    def check_environment(self, *_a: Any) -> None:
        return None


def test_a_transit_outage_is_not_retried_item_by_item() -> None:
    from modelseal.recipes.rotation import _transit_keys

    ours = [Recipient("transit", f"k{i}", 1, b"x") for i in range(100)]
    ctx = [(("env", "dev"),)] * 100
    down = _Down()
    out = _transit_keys(_Svc(), down, "transit:k", ours, ctx)  # type: ignore[arg-type]
    assert down.requests == 1 and len(out) == 100 and all(isinstance(e, ProviderUnavailable) for e in out)
    bad = _OneBad()
    mixed = [*ours[:5], Recipient("transit", "bad", 1, b"x")]
    out = _transit_keys(_Svc(), bad, "transit:k", mixed, ctx[:6])  # type: ignore[arg-type]
    assert [isinstance(o, DecryptionError) for o in out] == [False] * 5 + [True]  # the bad one fails alone


def test_the_system_config_never_blocks_on_a_fifo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelseal.keys import config as config_mod

    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    os.mkfifo(etc / "config.toml", 0o644)
    monkeypatch.setattr(config_mod, "SYSTEM_CONFIG", etc / "config.toml")
    with pytest.raises(config_mod.ConfigError, match="not a regular file"):
        config_mod.load(tmp_path / "home-does-not-matter")


def test_a_hard_link_of_a_keystore_file_is_never_sealed(env: Env) -> None:
    src = env.work / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    os.link(env.home / "keystore.json", src / "weights.bin")
    with pytest.raises(PolicyDenied, match="keystore"):
        modelseal.seal(src, env.work / "m.sealed", "test-kek", keys=env.svc)
    assert not (env.work / "m.sealed").exists()


def test_init_into_a_dangling_symlink_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelseal.cli import main

    home = tmp_path / "home"
    home.symlink_to(tmp_path / "gone")
    monkeypatch.setenv("MODELSEAL_HOME", str(home))
    monkeypatch.setenv("MODELSEAL_PASSPHRASE", "a passphrase for the test")
    assert main(["init"]) == 6  # KeystoreError, not "internal error (FileExistsError)"


def test_the_audit_hosts_file_follows_the_ownership_rule(tmp_path: Path) -> None:
    from modelseal.audit.hosts import AuditConfigError, load_hosts

    hosts = tmp_path / "audit-hosts.toml"
    hosts.write_text("[hosts]\n")
    hosts.chmod(0o600)
    assert load_hosts(hosts) == {}
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file to another user")
    os.chown(hosts, 65534, 65534)  # which audit keys are trusted: nobody else's to decide
    with pytest.raises(AuditConfigError, match="another user"):
        load_hosts(hosts)
    os.unlink(hosts)
    os.mkfifo(hosts, 0o600)
    with pytest.raises(AuditConfigError, match="not a regular file"):
        load_hosts(hosts)


def test_a_checkpoint_chains_to_the_bytes_it_was_verified_against(env: Env) -> None:
    import hashlib

    from modelseal.audit.log import MerkleAuditLog

    log = MerkleAuditLog(env.home / "audit.db")
    from modelseal.audit.events import AuditEvent

    log.emit(AuditEvent("wrap", "local:k", "ok", 1, None, "t", 1.0))
    witness = env.work / "witness"
    log.checkpoint(witness)
    first = (witness / "latest.json").read_bytes()
    log.emit(AuditEvent("wrap", "local:k", "ok", 1, None, "t", 2.0))
    cp = log.checkpoint(witness)
    assert cp["previous"] == hashlib.sha256(first).hexdigest()
