"""Backups on S3 against a real SeaweedFS (docs/recovery.md, "Backups"): parts first, manifest
last, nothing left that lists after a failure, no plaintext in any object version, and Object
Lock: retention set on every object, read back, and what SeaweedFS does with it."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from modelseal.errors import BackupError, BackupTampered
from modelseal.keys.providers import recovery as provider
from modelseal.keys.service import KeyService
from modelseal.recovery import create, reckey
from modelseal.recovery.locations import Locations
from modelseal.recovery.parts import Part
from modelseal.recovery.sealing import load_verified, unseal_part
from modelseal.recovery.stores import open_store
from tests.conftest import Env
from tests.services import seaweedfs

MARK = b"PLAINTEXT-MARKER-s3-55e1"
PLAIN, LOCKED = "backups-plain", "backups-locked"
CONFIG = """
[environments.prod]
keys = ["local:prod-kek"]
[backup]
recovery_keys = ["recovery:offline"]
object_lock_mode = "{mode}"
retain_days = 30
"""


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with seaweedfs(tmp_path_factory.mktemp("s3"), volumes=16) as endpoint:  # AWS_* set only once it runs
        yield endpoint


@pytest.fixture
def client(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key-not-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    c = boto3.session.Session().client("s3")
    for bucket, lock in ((PLAIN, False), (LOCKED, True)):
        try:
            c.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=lock)
        except c.exceptions.ClientError as e:
            if "BucketAlready" not in str(e):
                raise
    return c


def _setup(env: Env, mode: str = "COMPLIANCE") -> KeyService:
    provider.forget()
    (env.home / "config.toml").write_text(CONFIG.format(mode=mode))
    env.svc.create("prod-kek")
    reckey.generate("offline", 2, 2, env.home)
    return KeyService(sink=env.sink)


def _parts(tag: bytes) -> list[Part]:
    return [
        Part("keystore", "files", MARK + b"-keystore-" + tag + os.urandom(2000), {"files": 1}),
        Part("registry", "sql", MARK + b"-registry-" + tag, {"tables": 2}),
    ]


def _backup(env: Env, svc: KeyService, url: str, tag: bytes, **kw: Any) -> Any:
    return create.create_backup(url, Locations.from_args(env.home), "prod", svc, parts=_parts(tag), **kw)


def _versions(c: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    return list(c.list_object_versions(Bucket=bucket, Prefix=prefix).get("Versions", []))


def test_round_trip_on_s3_and_never_plaintext(env: Env, client: Any) -> None:
    svc = _setup(env)
    prefix = f"t/{secrets.token_hex(4)}"
    url = f"s3://{PLAIN}/{prefix}"
    first = _backup(env, svc, url, b"1")
    second = _backup(env, svc, url, b"2")
    store, m = load_verified(url, home=env.home)
    try:
        assert (m.id, m.sequence, m.previous) == (second.id, 2, first.digest)
        assert unseal_part(store, m, m.part("registry"), svc) == MARK + b"-registry-2"
        assert store.object_lock() is False
    finally:
        store.close()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=PLAIN, Prefix=prefix)["Contents"]]
    assert len(keys) == 6 and sum(k.endswith("/manifest.json") for k in keys) == 2
    for v in _versions(client, PLAIN, prefix):
        body = client.get_object(Bucket=PLAIN, Key=v["Key"], VersionId=v["VersionId"])["Body"].read()
        assert MARK not in body, v["Key"]
    with pytest.raises(BackupError, match="Object Lock"):
        _backup(env, svc, url, b"3", retain=3600.0)


def test_failure_midway_on_s3_leaves_nothing_that_lists(env: Env, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = _setup(env)
    prefix = f"t/{secrets.token_hex(4)}"
    url = f"s3://{PLAIN}/{prefix}"
    real, calls = create.seal_part, []

    def failing(*a: Any, **k: Any) -> bytes:
        calls.append(1)
        if len(calls) == 2:
            raise BackupError("injected failure")
        return real(*a, **k)

    monkeypatch.setattr(create, "seal_part", failing)
    with pytest.raises(BackupError, match="injected"):
        _backup(env, svc, url, b"x")
    assert open_store(url).list_ids() == []
    assert client.list_objects_v2(Bucket=PLAIN, Prefix=prefix).get("KeyCount", 0) == 0  # the part was deleted


def test_object_lock_retention_is_set_read_back_and_enforced(env: Env, client: Any) -> None:
    svc = _setup(env)
    prefix = f"t/{secrets.token_hex(4)}"
    url = f"s3://{LOCKED}/{prefix}"
    m = _backup(env, svc, url, b"L")
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=29)
    objects = _versions(client, LOCKED, prefix)
    assert len(objects) == 3
    for v in objects:
        head = client.head_object(Bucket=LOCKED, Key=v["Key"], VersionId=v["VersionId"])
        assert head["ObjectLockMode"] == "COMPLIANCE" and head["ObjectLockRetainUntilDate"] > soon
    # What SeaweedFS does (docs/recovery.md): deleting a retained version is refused...
    manifest = next(v for v in objects if v["Key"].endswith("/manifest.json"))
    with pytest.raises(client.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=LOCKED, Key=manifest["Key"], VersionId=manifest["VersionId"])
    # ... but the key can be overwritten with a new version, which the chain and signature catch ...
    client.put_object(Bucket=LOCKED, Key=manifest["Key"], Body=b'{"manifest":{},"signature":""}')
    with pytest.raises(BackupTampered):
        load_verified(url, home=env.home)
    # ... and hidden behind a delete marker, which this host's record of the chain catches.
    client.delete_object(Bucket=LOCKED, Key=manifest["Key"])
    assert open_store(url).list_ids() == []
    with pytest.raises(BackupTampered, match="has seen sequence 1"):
        load_verified(url, home=env.home)
    locked = client.get_object(Bucket=LOCKED, Key=manifest["Key"], VersionId=manifest["VersionId"])
    assert m.id.encode() in locked["Body"].read()  # the retained original is still there


def test_retention_mode_from_config_and_retain_override(env: Env, client: Any) -> None:
    svc = _setup(env, mode="GOVERNANCE")
    prefix = f"t/{secrets.token_hex(4)}"
    _backup(env, svc, f"s3://{LOCKED}/{prefix}", b"G", retain=2 * 3600.0)
    now = dt.datetime.now(dt.UTC)
    for v in _versions(client, LOCKED, prefix):
        r = client.get_object_retention(Bucket=LOCKED, Key=v["Key"], VersionId=v["VersionId"])["Retention"]
        assert r["Mode"] == "GOVERNANCE"
        assert now + dt.timedelta(minutes=110) < r["RetainUntilDate"] < now + dt.timedelta(minutes=130)


def test_a_retention_that_did_not_stick_is_refused(env: Env, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that takes the headers but keeps no retention: here the real SeaweedFS answer is
    dropped on the way back (the refusal path; SeaweedFS itself keeps it)."""
    svc = _setup(env)
    prefix = f"t/{secrets.token_hex(4)}"
    url = f"s3://{LOCKED}/{prefix}"
    from modelseal.recovery import s3store

    real_init = s3store.S3Store.__init__

    def forgetful(self: Any, bucket: str, pfx: str) -> None:
        real_init(self, bucket, pfx)
        real = self.client.get_object_retention
        self.client.get_object_retention = lambda **kw: {**real(**kw), "Retention": {}}

    monkeypatch.setattr(s3store.S3Store, "__init__", forgetful)
    with pytest.raises(BackupError, match="did not keep it"):
        _backup(env, svc, url, b"R")
    assert open_store(url).list_ids() == []


def test_what_seaweedfs_does_with_object_lock(client: Any) -> None:
    """The claims of docs/recovery.md about SeaweedFS, each checked against the running store."""
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    lock = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until}
    key = f"probe/{secrets.token_hex(4)}"
    assert client.get_object_lock_configuration(Bucket=LOCKED)["ObjectLockConfiguration"]["ObjectLockEnabled"] == (
        "Enabled"
    )
    with pytest.raises(client.exceptions.ClientError, match="InvalidRequest"):
        client.put_object(Bucket=PLAIN, Key=key, Body=b"x", **lock)  # no Object Lock: the headers are refused
    v = client.put_object(Bucket=LOCKED, Key=key, Body=b"x", **lock)["VersionId"]
    shorter = {"Mode": "COMPLIANCE", "RetainUntilDate": dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)}
    with pytest.raises(client.exceptions.ClientError, match="AccessDenied"):
        client.put_object_retention(Bucket=LOCKED, Key=key, VersionId=v, Retention=shorter)
    g = client.put_object(
        Bucket=LOCKED, Key=key + "g", Body=b"g", ObjectLockMode="GOVERNANCE", ObjectLockRetainUntilDate=until
    )["VersionId"]
    with pytest.raises(client.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=LOCKED, Key=key + "g", VersionId=g, BypassGovernanceRetention=True)
    assert client.delete_object(Bucket=LOCKED, Key=key)["DeleteMarker"] is True  # a key can still be hidden
    assert client.get_object(Bucket=LOCKED, Key=key, VersionId=v)["Body"].read() == b"x"  # the version stays


def test_a_cleanup_the_store_refused_is_reported(env: Env, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 13: the per-key ``Errors`` of a ``DeleteObjects`` answer are not ignored: a failed
    backup whose objects were not all removed says so, with the first key left. The real answer
    gets one error added on the way back (SeaweedFS deletes whatever it is asked to here)."""
    svc = _setup(env)
    prefix = f"t/{secrets.token_hex(4)}"
    url = f"s3://{PLAIN}/{prefix}"
    from modelseal.recovery import s3store

    real_init, real_seal, calls = s3store.S3Store.__init__, create.seal_part, []

    def refusing(self: Any, bucket: str, pfx: str) -> None:
        real_init(self, bucket, pfx)
        real = self.client.delete_objects

        def delete_objects(**kw: Any) -> Any:
            answer = real(**kw)
            first = kw["Delete"]["Objects"][0]["Key"]
            return {**answer, "Errors": [{"Key": first, "Code": "AccessDenied", "Message": "Access Denied."}]}

        self.client.delete_objects = delete_objects

    def failing(*a: Any, **k: Any) -> bytes:
        calls.append(1)
        if len(calls) == 2:
            raise BackupError("injected failure")
        return real_seal(*a, **k)

    monkeypatch.setattr(s3store.S3Store, "__init__", refusing)
    monkeypatch.setattr(create, "seal_part", failing)
    with pytest.raises(BackupError, match=r"injected failure; and 1 of the objects .* not removed \(first: t/"):
        _backup(env, svc, url, b"x")
    assert open_store(url).list_ids() == []


def _filer_port(s3_endpoint: str) -> int:
    """The filer port of the SeaweedFS serving ``s3_endpoint`` (from its command line)."""
    want = f"-s3.port={s3_endpoint.rsplit(':', 1)[1]}".encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if want in args:
            return int(next(a for a in args if a.startswith(b"-filer.port=")).split(b"=", 1)[1])
    raise AssertionError("no SeaweedFS process found")


def test_what_bypasses_seaweedfs_object_lock(s3_endpoint: str, client: Any) -> None:
    """Finding 7, the claims of docs/recovery.md: SeaweedFS enforces the lock at the S3 API only
    (a batch delete of a retained version is refused per key), checks no credentials without
    ``-s3.config``, and its filer's own HTTP API deletes a retained version."""
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    lock = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until}
    folder = f"probe/{secrets.token_hex(4)}"
    v = client.put_object(Bucket=LOCKED, Key=f"{folder}/a", Body=b"ORIGINAL", **lock)["VersionId"]
    answer = client.delete_objects(Bucket=LOCKED, Delete={"Objects": [{"Key": f"{folder}/a", "VersionId": v}]})
    assert [e["Code"] for e in answer.get("Errors", [])] == ["AccessDenied"] and not answer.get("Deleted")
    assert client.get_object(Bucket=LOCKED, Key=f"{folder}/a", VersionId=v)["Body"].read() == b"ORIGINAL"
    anyone = boto3.session.Session(aws_access_key_id="nobody", aws_secret_access_key="wrong")
    stranger = anyone.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    stranger.put_object(Bucket=LOCKED, Key=f"{folder}/b", Body=b"by anyone")  # no -s3.config: no authentication
    filer = f"http://127.0.0.1:{_filer_port(s3_endpoint)}/buckets/{LOCKED}/{folder}/?recursive=true"
    with urllib.request.urlopen(urllib.request.Request(filer, method="DELETE"), timeout=10) as r:
        assert r.status in (200, 202, 204)
    with pytest.raises(client.exceptions.ClientError, match="NoSuch"):
        client.get_object(Bucket=LOCKED, Key=f"{folder}/a", VersionId=v)  # the retained version is gone
