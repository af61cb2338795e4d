"""Environments and projects from $MODELSEAL_HOME/config.toml; keys never cross environments."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.errors import PolicyDenied
from modelseal.keys.config import ConfigError, load
from modelseal.keys.providers.local import LocalProvider
from modelseal.keys.service import KeyService

from .conftest import Env

CONFIG = """
default_env = "dev"
rotate_after_days = 90

[environments.dev]
keys = ["local:dev-kek"]

[environments.prod]
keys = ["local:prod-kek", "recovery-kek"]
rotate_after_days = 30

[projects.llama-ft]
prod = ["local:llama-prod"]
"""


@pytest.fixture
def configured(env: Env) -> Env:
    (env.home / "config.toml").write_text(CONFIG)
    for k in ("dev-kek", "prod-kek", "recovery-kek", "llama-prod"):
        env.svc.create(k)
    return env


def _svc() -> KeyService:
    return KeyService(sink=MemorySink())


def test_context_always_carries_env(configured: Env) -> None:
    src = configured.work / "a.bin"
    src.write_bytes(b"x")
    modelseal.seal(src, configured.work / "a.sealed", key="dev-kek", keys=_svc())
    assert modelseal.inspect(configured.work / "a.sealed")["context"] == {"env": "dev"}
    with pytest.raises(ValueError, match="disagrees"):
        modelseal.seal(
            src, configured.work / "b.sealed", key="dev-kek", context={"env": "dev"}, env="prod", keys=_svc()
        )


def test_keys_come_from_the_config(configured: Env) -> None:
    src = configured.work / "a.bin"
    src.write_bytes(b"weights")
    modelseal.seal(src, configured.work / "p.sealed", env="prod", keys=_svc())
    info = modelseal.inspect(configured.work / "p.sealed")
    assert [r["key"] for r in info["recipients"]] == ["local:prod-kek", "local:recovery-kek"]
    modelseal.seal(src, configured.work / "l.sealed", env="prod", project="llama-ft", keys=_svc())
    info = modelseal.inspect(configured.work / "l.sealed")
    assert info["context"] == {"env": "prod", "project": "llama-ft"}
    assert [r["key"] for r in info["recipients"]] == ["local:llama-prod"]
    with pytest.raises(ValueError, match="lists no keys for env=staging"):
        modelseal.seal(src, configured.work / "s.sealed", env="staging", keys=_svc())


def test_a_key_of_one_environment_refuses_another(configured: Env) -> None:
    src = configured.work / "a.bin"
    src.write_bytes(b"weights")
    sink = MemorySink()
    with pytest.raises(PolicyDenied, match="belongs to environment prod"):
        modelseal.seal(src, configured.work / "x.sealed", key="prod-kek", env="dev", keys=KeyService(sink=sink))
    assert sink.events[-1].result == "PolicyDenied"
    assert not (configured.work / "x.sealed").exists()
    # An artifact sealed for dev with an unbound key; once the key is bound to prod it
    # no longer opens for that dev context.
    configured.svc.create("loose-kek")
    modelseal.seal(src, configured.work / "d.sealed", key="loose-kek", env="dev", keys=_svc())
    (configured.home / "config.toml").write_text(CONFIG + '\n[environments.staging]\nkeys = ["local:loose-kek"]\n')
    with pytest.raises(PolicyDenied):
        modelseal.open(configured.work / "d.sealed", keys=_svc())


def test_invalid_config_is_a_clear_error(configured: Env) -> None:
    (configured.home / "config.toml").write_text("[environments.prod]\nkeys = 'not-a-list'\n")
    with pytest.raises(ConfigError, match="must be a list"):
        load(configured.home)
    (configured.home / "config.toml").write_text("default_env = [")
    r = subprocess.run([sys.executable, "-m", "modelseal.cli", "seal", "a", "b"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not valid TOML" in r.stderr


def test_cli_key_list_shows_environment_and_rotation_due(configured: Env) -> None:
    LocalProvider(now=lambda: 1_700_000_000.0).create("ancient-kek")  # created long ago
    with open(configured.home / "config.toml", "a") as f:
        f.write('\n[environments.staging]\nkeys = ["local:ancient-kek"]\n')
    r = subprocess.run([sys.executable, "-m", "modelseal.cli", "key", "list", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = {row["key"]: row for row in json.loads(r.stdout)}
    assert rows["local:prod-kek"]["environments"] == ["prod"] and rows["local:prod-kek"]["rotate_after_days"] == 30
    assert rows["local:prod-kek"]["rotation_due"] is False
    assert rows["local:ancient-kek"]["rotation_due"] is True and rows["local:ancient-kek"]["rotate_after_days"] == 90
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelseal.cli",
            "seal",
            str(configured.work),
            str(configured.work.parent / "o.sealed"),
            "--env",
            "prod",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


def test_binding_compares_canonical_key_identities(env: Env) -> None:
    from modelseal.format.header import normalize_context
    from modelseal.keys.config import parse

    cfg = parse(
        {
            "environments": {
                "prod": {"keys": ["transit:transit/prod-kek", "pkcs11:token=HSM;object=k?module-path=/x.so"]}
            }
        }
    )
    svc = KeyService(sink=MemorySink(), config=cfg)
    dev = normalize_context({"env": "dev"})
    for spelling in (
        "transit:prod-kek",
        "transit:transit/prod-kek",
        "pkcs11:token=HSM;object=k",
        "pkcs11:object=k;token=HSM",
    ):
        with pytest.raises(PolicyDenied):
            svc.check_environment(spelling, dev)
        svc.check_environment(spelling, normalize_context({"env": "prod"}))


def test_reserved_context_key() -> None:
    from modelseal.format.header import normalize_context

    with pytest.raises(ValueError, match="reserved"):
        normalize_context({"modelseal": "v1"})
