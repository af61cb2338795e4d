"""Real restores and incidents against the real services (docs/recovery.md, "Restores",
"Incident: key compromise", "Incident: cert compromise"): the registry's metadata and the
governance tables in PostgreSQL 15, blobs and backups in SeaweedFS (S3), the artifacts' key a
``transit:`` key in OpenBao on integrated (raft) storage, all through the CLI (``cli.main``
in this process; ``modelseal serve`` a subprocess).

One backup goes to S3 and comes back for real: the registry and governance components into
a PostgreSQL database whose tables were all dropped (``--replace``), and the OpenBao
snapshot into the live raft cluster after the artifacts' transit key was deleted there (the
key is back, and opens an artifact sealed before). Then the two incident commands run
against a ``modelseal serve --db postgresql://... --blobs s3://...``: a key compromise of its
transit key re-encrypts the registry's exposed artifact, and a cert compromise of the client
gets that client refused. The services are shared by the module (two PostgreSQL databases
of one role), started on 127.0.0.1 and stopped by PID."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

import modelseal
from modelseal import registry as oci
from modelseal.audit.events import MemorySink
from modelseal.audit.log import MerkleAuditLog
from modelseal.errors import BackupError, KeyDisabled, KeyNotFound, ModelsealError
from modelseal.format.envelope import artifact_id, parse_slots
from modelseal.governance.store import GovStore, open_target
from modelseal.governance.versions import PolicyStore
from modelseal.keys.service import KeyService
from modelseal.recovery import reckey
from modelseal.recovery.incident_find import read_header
from modelseal.recovery.sealing import load_verified
from modelseal.registry.client import Repository
from modelseal.registry.s3blobs import S3Blobs
from tests.conftest import Env
from tests.drill_helpers import push, registry, release, sealed_file, secret_file
from tests.incident_helpers import cli, make_trust, plaintext, seal_signed
from tests.push_pull_helpers import bind_all, make_pki, modelseal_serve, transport
from tests.services import bao_binary, openbao_raft, postgres, seaweedfs, weed_binary

pytestmark = pytest.mark.skipif(bao_binary() is None or weed_binary() is None, reason="needs the bao and weed binaries")
BUCKET = "recovery"


def _bare(url: str, db: str | None = None) -> str:
    """The URL without its password (argv is public), of database ``db`` if given."""
    p = urlsplit(url)
    return urlunsplit(p._replace(netloc=f"{p.username}@{p.hostname}:{p.port}", path=f"/{db or p.path[1:]}"))


@contextmanager
def _second_database(url: str) -> Iterator[str]:
    """Another database of the role of ``url`` (so one PGPASSWORD opens both): ``postgres()``
    cannot be entered twice in one process (its users' lock), and ``serve`` needs its own."""
    role = urlsplit(url).username
    name = f"{role}_b"

    def psql(sql: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-q", "-c", sql], check=True, capture_output=True)

    psql(f"CREATE DATABASE {name} OWNER {role}")
    try:
        yield name
    finally:
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # before postgres() drops the role


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import boto3

    work = tmp_path_factory.mktemp("recovery-scaleout")
    mp = pytest.MonkeyPatch()
    try:
        with (
            postgres() as db,
            _second_database(db) as other,
            seaweedfs(work / "s3", volumes=8) as s3,
            openbao_raft(work / "bao") as (addr, token, _keys),
        ):
            for k, v in {
                "PGPASSWORD": urlsplit(db).password or "",  # libpq's: never in a URL or argv
                "AWS_ENDPOINT_URL": s3,  # set only now: SeaweedFS started with AWS_* would demand them
                "AWS_ACCESS_KEY_ID": "recovery-access-key",
                "AWS_SECRET_ACCESS_KEY": "recovery-secret-not-secret",
                "AWS_REGION": "us-east-1",
                "BAO_ADDR": addr,
                "BAO_TOKEN": token,
            }.items():
                mp.setenv(k, v)
            mp.delenv("MODELSEAL_AUDIT_URL", raising=False)
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield {"restore_db": _bare(db), "serve_db": _bare(db, other), "bao": addr, "token": token}
    finally:
        mp.undo()


def _bao(services: dict[str, Any], method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(
        services["bao"] + path, data=None if body is None else json.dumps(body).encode(), method=method
    )
    req.add_header("X-Vault-Token", services["token"])
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
        raw = r.read()
        return json.loads(raw) if raw.strip() else {}


def _drop_every_table(db: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(db, autocommit=True) as c:
        names = [r[0] for r in c.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]
        assert names  # the registry's and governance's tables were there
        for n in names:
            c.execute(sql.SQL("DROP TABLE {} CASCADE").format(sql.Identifier(n)))
        assert not c.execute("SELECT 1 FROM pg_tables WHERE schemaname = current_schema()").fetchone()


def _governance(data: Path, db: str) -> tuple[list[tuple[str, str, str]], str, int]:
    target = open_target(data, db)
    store = GovStore.open(target)
    try:
        bindings = sorted((b.pattern, b.role, b.env) for b in store.bindings())
    finally:
        store.close()
    policies = PolicyStore.open(target)
    try:
        return bindings, policies.active_digest(), len(policies.versions())
    finally:
        policies.close()


def test_a_backup_on_s3_restores_postgresql_and_the_raft_openbao(env: Env, services: dict[str, Any]) -> None:
    key, db = "transit:restore-kek", services["restore_db"]
    svc = KeyService(sink=MerkleAuditLog(env.home / "audit.db"))
    svc.create(key)
    signer = release(env, key=key)  # config.toml: the dev environment's key is the transit key
    shares = reckey.generate("offline", 2, 2, env.home)
    data = env.work / "registry"
    bind_all(data, db)  # the governance tables, in PostgreSQL beside the registry's
    reg = registry(data, db=db, blobs=f"s3://{BUCKET}/host-blobs")
    art = sealed_file(env, "a", signer, key=key, svc=svc)
    digests = {"team/a": push(reg, "team/a", "v1", art), "team/b": push(reg, "team/b", "v2", art)}
    bodies = {r: reg.get_manifest(r, d).body for r, d in digests.items()}
    reg.close()
    governance = _governance(data, db)
    token_file = secret_file(env.work / "bao-token", [services["token"]])
    where = ["--bao-token-file", str(token_file)]

    rc, out, err = cli("backup", "create", "--to", f"s3://{BUCKET}/backups", "--registry-data", str(data),
                       "--registry-db", db, *where, "--json")  # fmt: skip
    assert rc == 0, out + err
    made = json.loads(out)
    assert {"keystore", "config", "governance", "registry", "audit", "openbao"} <= set(made["parts"])
    assert made["recipients"] == [key, "recovery:offline"]
    _, manifest = load_verified(f"s3://{BUCKET}/backups", home=env.home)
    assert manifest.id == made["id"]
    parts = {e.name: e for e in manifest.parts}
    assert parts["registry"].meta["tables"]["reg_tags"] == 2 and parts["governance"].meta["rows"] > 0

    # Disaster: the registry's and governance's tables are gone, and the transit key too.
    _drop_every_table(db)
    _bao(services, "POST", "/v1/transit/keys/restore-kek/config", {"deletion_allowed": True})
    _bao(services, "DELETE", "/v1/transit/keys/restore-kek")
    with pytest.raises(urllib.error.HTTPError, match="404"):
        _bao(services, "GET", "/v1/transit/keys/restore-kek")
    svc.forget_unwrapped()
    with pytest.raises(KeyNotFound):  # the artifact no longer opens: its key is gone
        modelseal.open(art, keys=KeyService(sink=MemorySink()), verify=False)

    # The production key is gone with it: the parts open with the offline recovery key.
    shares_file = secret_file(env.work / "shares.txt", shares)
    restore = ["backup", "restore", "--from", f"s3://{BUCKET}/backups", "--recovery-shares", str(shares_file)]
    rc, out, err = cli(*restore, "--component", "registry", "--component", "governance", "--data", str(data),
                       "--db", db, "--replace", "--json")  # fmt: skip
    assert rc == 0, out + err
    report = json.loads(out)
    assert report["keys"] == "recovery:offline" and report["selected"] == ["governance", "registry"]
    assert report["parts"]["registry"]["rows"] == parts["registry"].meta["rows"]
    assert report["parts"]["governance"]["rows"] == parts["governance"].meta["rows"]
    reg = registry(data, db=db, blobs=f"s3://{BUCKET}/host-blobs")
    try:
        for repo, digest in digests.items():
            got = reg.get_manifest(repo, "v1" if repo == "team/a" else "v2")
            assert got is not None and got.digest == digest and got.body == bodies[repo]
        layer = json.loads(bodies["team/a"] or b"{}")["layers"][0]["digest"].removeprefix("sha256:")
        assert hashlib.sha256(b"".join(reg.blobs.read(layer))).hexdigest() == layer  # the blobs S3 kept
    finally:
        reg.close()
    assert _governance(data, db) == governance

    rc, out, err = cli(*restore, "--component", "openbao", "--json")
    assert rc == BackupError.exit_code, out + err  # a snapshot-force replaces the cluster's state: --replace
    assert "--replace" in err and len(err.strip().splitlines()) == 1
    rc, out, err = cli(*restore, "--component", "openbao", *where, "--replace", "--json")
    assert rc == 0, out + err
    assert json.loads(out)["parts"]["openbao"]["bytes"] > 0
    keys = _bao(services, "GET", "/v1/transit/keys/restore-kek")["data"]["keys"]
    assert set(keys) == {"1"}
    fresh = KeyService(sink=MemorySink())  # no cached data key: OpenBao unwraps it
    assert plaintext(fresh, art) == (env.work / "a.src").read_bytes()
    events = [(e["operation"], e["result"]) for e in MerkleAuditLog(env.home / "audit.db").events()]
    assert events.count(("backup-restore", "ok")) == 2 and ("backup-create", "ok") in events


def test_incidents_against_a_serve_on_postgresql_and_s3(env: Env, services: dict[str, Any]) -> None:
    key, db = "transit:incident-kek", services["serve_db"]
    env.svc.create(key)
    pki = make_pki(env)
    trust = make_trust(env.work / "trust")
    src = env.work / "m.bin"
    src.write_bytes(os.urandom(200_000))
    art = seal_signed(env.svc, src, env.work / "m.sealed", key, trust, "m")
    data = env.work / "serve-data"
    serve = ["--data", str(data), "--db", db, "--blobs", f"s3://{BUCKET}/serve-blobs"]
    tls: dict[str, Any] = {"tls_dir": pki.client_dir, "pins": pki.pins()}
    with modelseal_serve(env.work, pki.server_dir, pki.client_dir, *serve) as port:
        host = f"127.0.0.1:{port}"
        old = oci.push(art, f"{host}/models/m:v1", **tls).digest
        reach = ["--registry", host, "--tls-dir", str(pki.client_dir), *(a for p in pki.pins() for a in ("--pin", p))]
        catalog = ["--registry-data", str(data), "--registry-db", db]

        rc, out, err = cli("incident", "key-compromise", key, *reach, *catalog, *trust.args(), "--execute")
        assert rc == 0, out + err
        info = env.svc.info(key)
        assert info.latest == 2 and info.min_decryption_version == 2
        repo = Repository(transport(pki, port), "models/m")
        got = repo.get_manifest("v1")
        assert got is not None and got[1] != old
        assert repo.get_manifest(old) is None  # the exposed manifest is gone
        pulled = env.work / "m-new.sealed"
        verdict = oci.pull(f"{host}/models/m:v1", pulled, verify=trust.load(), **tls).verdict
        assert verdict is not None and verdict.signed
        raw, _ = read_header(pulled)
        named = {(r.scheme, r.key_id, r.key_version) for _, s in parse_slots(raw.slots) for r in s.recipients}
        assert named == {("transit", "incident-kek", 2)}
        assert artifact_id(raw.core.binding) != artifact_id(read_header(art)[0].core.binding)  # re-encrypted
        blobs = S3Blobs(BUCKET, "serve-blobs", check=False)  # what serve --blobs s3://... holds
        try:
            new_layer = hashlib.sha256(pulled.read_bytes()).hexdigest()
            assert blobs.size(new_layer) == pulled.stat().st_size
        finally:
            blobs.close()
        fresh = KeyService(sink=MemorySink())
        assert plaintext(fresh, pulled) == src.read_bytes()
        with pytest.raises(KeyDisabled):  # the copy sealed before no longer opens: version 1 is below the floor
            modelseal.open(art, keys=fresh, verify=False)

        trainer = "spiffe://example.org/prod/service/trainer"
        rc, out, err = cli("incident", "cert-compromise", trainer, "--execute", "--json")
        assert rc == 0, out + err
        serials = json.loads(out)["serials"]
        assert serials and all(s["result"].startswith("revoked") for s in serials)
        with pytest.raises(ModelsealError, match="revoked"):
            oci.pull(f"{host}/models/m:v1", env.work / "m-after.sealed", verify=False, **tls)
