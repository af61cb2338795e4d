"""One scale-out restore drill against the real services (docs/recovery.md, "Restore drills"):
the registry's metadata and the audit log in PostgreSQL 15, its blobs and the backups in
SeaweedFS (S3), the artifacts' key a ``transit:`` key in OpenBao on integrated (raft)
storage. The drill restores the PostgreSQL parts into a throwaway SQLite home, the OpenBao
snapshot into a temporary raft OpenBao it points the restored environment at, opens every
artifact with the restored transit key, and records the result in the live PostgreSQL log.
Services are shared by the module, started on 127.0.0.1 and stopped by PID."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from modelseal.audit.log import MerkleAuditLog
from modelseal.keys.providers import recovery as provider
from modelseal.keys.service import KeyService
from modelseal.recovery import reckey, records
from modelseal.recovery.create import create_backup
from modelseal.recovery.drill import DrillRequest, run_drill
from modelseal.recovery.locations import Locations
from tests.conftest import Env
from tests.drill_helpers import push, registry, release, sealed_file, sealed_folder, secret_file
from tests.services import bao_binary, openbao_raft, postgres, seaweedfs, weed_binary

pytestmark = pytest.mark.skipif(bao_binary() is None or weed_binary() is None, reason="needs the bao and weed binaries")
KEY = "transit:drill-kek"


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("scale")
    with postgres() as url, seaweedfs(work / "s3", volumes=16) as s3, openbao_raft(work / "bao") as (addr, token, keys):
        parts = urlsplit(url)
        bare = urlunsplit(parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}"))
        yield {"pg": bare, "pgpass": parts.password, "s3": s3, "bao": addr, "token": token, "keys": keys}


def _bao(services: dict[str, Any], method: str, path: str, body: dict[str, Any] | None = None) -> None:
    req = urllib.request.Request(
        services["bao"] + path, data=None if body is None else json.dumps(body).encode(), method=method
    )
    req.add_header("X-Vault-Token", services["token"])
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
        assert r.status in (200, 204)


def test_a_drill_against_postgres_seaweedfs_and_openbao_raft(
    env: Env, services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    for k, v in {
        "PGPASSWORD": services["pgpass"],
        "AWS_ENDPOINT_URL": services["s3"],
        "AWS_ACCESS_KEY_ID": "test-access-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret-key-not-secret",
        "AWS_REGION": "us-east-1",
        "BAO_ADDR": services["bao"],
        "BAO_TOKEN": services["token"],
        "MODELSEAL_AUDIT_URL": services["pg"],
    }.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3")
    for bucket in ("registry", "backups"):
        s3.create_bucket(Bucket=bucket)
    log = MerkleAuditLog(services["pg"])
    svc = KeyService(sink=log)
    svc.create(KEY)
    signer = release(env, key=KEY)
    shares = reckey.generate("offline", 2, 2, env.home)
    data = env.work / "registry"
    reg = registry(data, db=services["pg"], blobs="s3://registry/blobs")
    digests = {
        "team/a": push(reg, "team/a", "v1", sealed_file(env, "a", signer, key=KEY, svc=svc)),
        "team/b": push(reg, "team/b", "v1", sealed_folder(env, "b", signer, key=KEY, svc=svc)),
    }
    reg.close()
    token_file = secret_file(env.work / "bao-token", [services["token"]])
    loc = Locations.from_args(
        env.home, registry_data=data, registry_db=services["pg"], bao_addr=services["bao"], bao_token_file=token_file
    )
    m = create_backup("s3://backups/host1", loc, None, svc, sink=log)
    assert {e.name for e in m.parts} >= {"keystore", "config", "registry", "audit", "openbao"}
    # The live cluster loses the key: only the snapshot in the backup still holds it, so the
    # parts open with the recovery key and the artifacts only through the temporary OpenBao.
    _bao(services, "POST", "/v1/transit/keys/drill-kek/config", {"deletion_allowed": True})
    _bao(services, "DELETE", "/v1/transit/keys/drill-kek")
    svc.forget_unwrapped()
    req = DrillRequest(
        source="s3://backups/host1",
        registry_blobs="s3://registry/blobs",
        bao_unseal_keys=secret_file(env.work / "unseal.txt", services["keys"]),
        bao_token_file=token_file,
        recovery_shares=(secret_file(env.work / "shares.txt", shares),),
    )
    report = run_drill(req, Locations.from_args(env.home), svc, log, check=False)
    report.raise_if_failed()
    assert {c.subject for c in report.findings.checked} == {f"{r}@{d}" for r, d in digests.items()}
    assert report.keys == "recovery:offline" and provider.installed("offline") is None
    audit = next(e for e in m.parts if e.name == "audit")
    assert report.audit is not None and report.audit.restored_size == audit.meta["size"] > 0
    event = log.events()[-1]
    assert event["operation"] == "backup-drill" and event["result"] == "ok"
    assert records.read_record(
        env.home / event["key"].removeprefix("evidence:"), records.DRILL, [records.host_key(env.home)]
    )
    print("\n".join(f"drill step {s.name}: {s.seconds:.3f} s" for s in report.steps), f"RTO {report.rto['seconds']} s")
