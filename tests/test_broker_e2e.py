"""The key broker end to end (docs/broker.md): a real ``modelseal serve`` subprocess with
bindings in its governance database, a real OpenBao behind it (the server holds the Transit
token; the clients hold none), and ``broker:`` clients over pinned mutual TLS.

Sealed with broker:, opened, 50 artifacts rotated in batches; a reader cannot rotate, a
key-admin cannot unwrap, a prod key never wraps a dev context, an inner recipient naming
another backing key is refused, an identity from another CA never reaches the API; destroy
waits for two officers; ``modelseal rewrap --key broker:NAME`` moves an artifact sealed to
transit: under the broker; and no data key is in the server's log, its audit log or its
governance database.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyotp
import pytest

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.errors import AccessDenied, ApprovalRequired, KeyDisabled, KeyProviderError, ModelsealError
from modelseal.format.header import Recipient, normalize_context
from modelseal.governance import brokerops
from modelseal.governance.approvals import Settings as GovSettings
from modelseal.governance.mfa import Mfa
from modelseal.governance.model import Binding
from modelseal.governance.store import GovStore, open_target
from modelseal.keys import keystore
from modelseal.keys.config import Config
from modelseal.keys.providers.transit import TransitProvider
from modelseal.keys.service import KeyService
from modelseal.pki import ca as pki_ca
from modelseal.pki import issue, pins
from modelseal.pki.identity import Identity
from modelseal.recipes import context as recipes_context
from modelseal.recipes import rotation
from modelseal.registry.apiclient import ApiClient
from modelseal.registry.broker import BrokerDenied, BrokerProvider
from tests.push_pull_helpers import stop, wait_tls
from tests.services import free_port, openbao_dev

TD = "example.org"
PASS = "broker-e2e-not-secret"
SERVE = [sys.executable, "-m", "modelseal.cli", "serve"]
PROD = normalize_context({"env": "prod", "model": "llama"})
SERVICES = {"writer": ("reader", "publisher"), "reader": ("reader",)}
USERS = {"admin1": "key-admin", "admin2": "key-admin", "admin3": "key-admin", "officer1": "security-officer"}
USERS["officer2"] = "security-officer"


class Totp:
    """A user's authenticator: each code is of a step after the last one used (the server
    accepts each step once, and one step either side of now)."""

    def __init__(self, secret: str) -> None:
        self.totp, self.last = pyotp.TOTP(secret), -(10**9)

    def __call__(self, *_what: str) -> str:
        t = time.time()
        lowest = int(t) // 30 - (1 if t % 30 < 25 else 0)  # the last step only while it stays valid a while
        step = max(self.last + 1, lowest)
        while step > int(time.time()) // 30 + 1:
            time.sleep(0.5)
        self.last = step
        return self.totp.at(step * 30)


@dataclass
class World:
    work: Path
    home: Path
    port: int
    dirs: dict[str, Path]
    pins: list[str]
    otps: dict[str, Totp]
    bao: tuple[str, str]
    log: Path
    data: Path
    deks: list[bytes] = field(default_factory=list)

    def provider(self, who: str, batch: int = 500) -> BrokerProvider:
        folder, server = self.dirs[who], f"127.0.0.1:{self.port}"
        otp = self.otps.get(who, lambda *_: "123456")
        return BrokerProvider(
            client_factory=lambda: ApiClient.from_settings(server, tls_dir=folder, pins=self.pins), otp=otp, batch=batch
        )

    def keys(self, who: str, batch: int = 500) -> KeyService:
        """A client's KeyService: the broker only, no other provider's credentials used."""
        return KeyService(sink=MemorySink(), providers={"broker": self.provider(who, batch)}, config=Config())

    def client_env(self, who: str) -> dict[str, str]:
        """A client process's environment: no OpenBao address or token, its own empty home."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_", "MODELSEAL_"))}
        home = self.work / f"home-{who}"
        home.mkdir(mode=0o700, exist_ok=True)
        env.update(
            MODELSEAL_HOME=str(home),
            MODELSEAL_BROKER=f"127.0.0.1:{self.port}",
            MODELSEAL_TLS_DIR=str(self.dirs[who]),
            MODELSEAL_REGISTRY_PINS=",".join(self.pins),
        )
        return env


def _issue(svc: KeyService, folder: Path, kind: str, name: str, ca: pki_ca.CA | None = None, **kw: object) -> Path:
    issued = issue.issue(svc, Identity.of(TD, "prod", kind, name), ca=ca, **kw)  # type: ignore[arg-type]
    issue.write_dir(issued, folder, force=True)
    return folder


def uri(kind: str, name: str) -> str:
    return Identity.of(TD, "prod", kind, name).uri


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("broker")
    home, data = work / "server-home", work / "data"
    mp = pytest.MonkeyPatch()
    mp.setenv("MODELSEAL_HOME", str(home))
    mp.setenv("MODELSEAL_PASSPHRASE", PASS)
    mp.delenv("MODELSEAL_AGENT_SOCK", raising=False)
    mp.setattr(recipes_context, "_service", None)
    keystore.clear_cache()
    keystore.create(keystore.keystore_path(home), PASS.encode(), scrypt_log2_n=14)
    (home / "config.toml").write_text('[broker]\ncreate = { prod = "transit" }\n')
    os.chmod(home / "config.toml", 0o600)
    svc = KeyService(sink=MemorySink())
    ca = pki_ca.init_ca(svc, TD)
    dirs = {"server": _issue(svc, work / "tls-server", "server", "broker", ips=["127.0.0.1"])}
    for name in SERVICES:
        dirs[name] = _issue(svc, work / f"tls-{name}", "service", name)
    for name in USERS:
        dirs[name] = _issue(svc, work / f"tls-{name}", "user", name)
    other = pki_ca.init_ca(svc, TD, folder=work / "other-ca")  # same trust domain, another CA
    dirs["intruder"] = _issue(svc, work / "tls-intruder", "service", "intruder", ca=other)
    shutil.copy(dirs["server"] / "ca.pem", dirs["intruder"] / "ca.pem")  # it trusts our server all the same
    target = open_target(data, None)
    store = GovStore.open(target)
    until = time.time() + 7 * 86400
    for name, roles in SERVICES.items():
        for role in roles:
            store.bind(Binding("", uri("service", name), role, "prod", until), by="test")
    mfa = Mfa.open(target, svc, GovSettings().key)
    otps = {}
    for name, role in USERS.items():
        store.bind(Binding("", uri("user", name), role, "prod", until), by="test")
        otps[name] = Totp(pyotp.parse_uri(mfa.enroll(uri("user", name))).secret)
        mfa.confirm(uri("user", name), otps[name]())
    store.close()
    mfa.close()
    with openbao_dev(work) as bao:
        mp.setenv("BAO_ADDR", bao[0])
        mp.setenv("BAO_TOKEN", bao[1])
        port, log_path = free_port(), work / "serve.log"
        cmd = [*SERVE, "--listen", f"127.0.0.1:{port}", "--tls-dir", str(dirs["server"]), "--data", str(data)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*cmd, "--workers", "1", "--renew", "watch"], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_tls(port, dirs["writer"], proc, log_path)
            w = World(
                work,
                home,
                port,
                dirs,
                [pins.pin_of(ca.issuing), pins.pin_of_key(ca.next_public)],
                otps,
                bao,
                log_path,
                data,
            )
            w.keys("admin1").create("broker:models")
            yield w
        finally:
            stop(proc)
    mp.undo()
    keystore.clear_cache()


def _seal(w: World, svc: KeyService, name: str, key: str = "broker:models") -> tuple[Path, bytes]:
    src = w.work / "plain" / name
    src.parent.mkdir(exist_ok=True)
    data = os.urandom(3000)
    src.write_bytes(data)
    dst = w.work / "sealed" / name
    dst.parent.mkdir(exist_ok=True)
    modelseal.seal(src, dst, key=key, context=dict(PROD), keys=svc, force=True)
    return dst, data


def test_seal_open_and_rotate_50_artifacts_in_batches(world: World) -> None:
    writer = world.keys("writer", batch=20)
    folder = world.work / "many"
    folder.mkdir()
    plain = {}
    for i in range(50):
        path, data = _seal(world, writer, f"m{i:02d}.sealed")
        shutil.move(path, folder / path.name)
        plain[path.name] = data
    with modelseal.open(folder / "m07.sealed", keys=world.keys("reader")) as f:
        assert f.read() == plain["m07.sealed"]
    assert world.keys("admin2").rotate("broker:models").latest == 2
    report = rotation.rotate("broker:models", [folder], keys=writer)
    assert not report.rotated and not report.failed and len(report.rewrapped) == 50
    reader = world.keys("reader")
    for name, data in plain.items():
        assert rotation._versions_of(reader, folder / name, "broker:models") == [2]
        with modelseal.open(folder / name, keys=reader) as f:
            assert f.read() == data
    log = world.log.read_text()
    assert log.count("key.rewrap of 20 keys") == 2 and log.count("key.rewrap of 10 keys") == 1
    assert len(rotation.rotate("broker:models", [folder], keys=writer).up_to_date) == 50  # resumable: nothing left


def test_a_reader_cannot_rotate_and_a_key_admin_cannot_unwrap(world: World) -> None:
    path, _ = _seal(world, world.keys("writer"), "roles.sealed")
    r = _slot_recipient(path)
    with pytest.raises(AccessDenied):
        world.keys("reader").rotate("broker:models")
    with pytest.raises(BrokerDenied):
        world.provider("reader").rewrap_many([r], PROD)
    with pytest.raises(BrokerDenied) as denied:
        world.provider("admin3").unwrap(r, PROD)
    assert isinstance(denied.value, AccessDenied) and isinstance(denied.value, KeyProviderError)
    assert "\n" not in str(denied.value)
    world.deks.append(world.provider("writer").unwrap(r, PROD))  # the writer is a reader too


def test_a_prod_key_never_wraps_a_dev_context_and_an_inner_recipient_never_chooses_the_key(world: World) -> None:
    with pytest.raises(AccessDenied, match="own environment"):
        world.provider("writer").wrap("models", os.urandom(32), normalize_context({"env": "dev"}))
    transit = TransitProvider()
    transit.create("legacy-kek")
    dek = os.urandom(32)
    other = transit.wrap("legacy-kek", dek, PROD)  # a real wrap under another key of the same OpenBao
    forged = brokerops.outer("models", other)
    with pytest.raises(modelseal.PolicyDenied, match="does not belong to broker key models"):
        world.provider("writer").unwrap(forged, PROD)
    world.deks.append(dek)


def test_an_identity_from_another_ca_never_reaches_the_api(world: World) -> None:
    r = _slot_recipient(_seal(world, world.keys("writer"), "foreign.sealed")[0])
    with pytest.raises(ModelsealError):
        world.provider("intruder").unwrap(r, PROD)
    everyone = {a for op in ("authorize", "unwrap", "wrap") for a in _audit_actors(world, op, uri("service", "writer"))}
    assert uri("service", "writer") in everyone and uri("service", "intruder") not in everyone


def test_destroy_is_queued_for_two_officers(world: World) -> None:
    admin = world.keys("admin3")
    admin.create("broker:doomed")
    writer = world.provider("writer")
    dek = os.urandom(32)
    wrapped = writer.wrap("doomed", dek, PROD)
    with pytest.raises(ApprovalRequired) as queued:
        admin.destroy("broker:doomed", None)
    m = re.search(r"request '?([0-9a-f]{16})", str(queued.value))
    assert m, str(queued.value)
    assert writer.unwrap(wrapped, PROD) == dek  # nothing ran yet
    for officer in ("officer1", "officer2"):
        api = ApiClient.from_settings(f"127.0.0.1:{world.port}", tls_dir=world.dirs[officer], pins=world.pins)
        done = api.call("POST", f"/modelseal/v1/approvals/{m.group(1)}/approve", {"otp": world.otps[officer]()})
        api.close()
    assert done.get("state") == "done", done
    with pytest.raises(KeyDisabled):
        writer.wrap("doomed", dek, PROD)
    with pytest.raises(ModelsealError) as gone:
        writer.unwrap(wrapped, PROD)
    assert "broker-prod-" not in str(gone.value)  # errors name the broker key, never its backing key
    world.deks.append(dek)


def test_rewrap_moves_an_artifact_sealed_to_transit_under_the_broker(world: World) -> None:
    transit = TransitProvider()
    if "legacy-kek" not in {k.uri.split("/")[-1] for k in transit.list()}:
        transit.create("legacy-kek")
    holder = KeyService(sink=MemorySink(), config=Config())  # holds the Transit token (this process's env)
    path, data = _seal(world, holder, "legacy.sealed", key="transit:legacy-kek")
    env = world.client_env("writer")
    env.update(BAO_ADDR=world.bao[0], BAO_TOKEN=world.bao[1])  # a holder of the Transit credentials moves it
    cli = [sys.executable, "-m", "modelseal.cli"]
    moved = subprocess.run(
        [*cli, "rewrap", "--key", "broker:models", str(path)], env=env, capture_output=True, text=True
    )
    assert moved.returncode == 0, moved.stderr
    assert "broker:models#2" in moved.stdout
    out = world.work / "legacy.out"
    opened = subprocess.run(
        [*cli, "unseal", str(path), str(out)], env=world.client_env("reader"), capture_output=True, text=True
    )
    assert opened.returncode == 0, opened.stderr  # no Transit credential in this process
    assert out.read_bytes() == data
    shown = subprocess.run([*cli, "inspect", str(path)], env=world.client_env("reader"), capture_output=True, text=True)
    assert "broker:models" in shown.stdout and "transit:" not in shown.stdout


def test_no_data_key_in_the_server_log_audit_log_or_database(world: World) -> None:
    assert len(world.deks) >= 3
    files = [world.log, *world.home.glob("audit*"), *world.data.glob("governance.db*")]
    blobs = [p.read_bytes() for p in files if p.is_file()]
    assert any(b"unwrap" in b for b in blobs)  # the audit log is among them
    for dek in world.deks:
        for form in (dek, dek.hex().encode(), base64.b64encode(dek), base64.b64encode(dek).rstrip(b"=")):
            assert not any(form in b for b in blobs)
    actors = _audit_actors(world, "unwrap", until=uri("service", "writer"))
    assert uri("service", "writer") in actors and uri("user", "admin3") not in actors


def _slot_recipient(path: Path) -> Recipient:
    from modelseal.format.envelope import parse_slots
    from modelseal.format.file import read_raw
    from modelseal.format.source import FdSource
    from modelseal.util.files import open_regular

    src = FdSource(open_regular(path))
    try:
        raw = read_raw(src)
    finally:
        src.close()
    return next(r for r in parse_slots(raw.slots)[0][1].recipients if r.scheme == "broker")


def _audit_actors(world: World, operation: str, until: str | None = None) -> set[str]:
    """The actors of ``operation`` events in the server's audit log; with ``until``, waited
    for a few seconds to include that actor (the server may queue its events)."""
    deadline = time.monotonic() + 10
    while True:
        with sqlite3.connect(world.home / "audit.db") as conn:
            rows = conn.execute("SELECT event FROM events").fetchall()
        events = [json.loads(body) for (body,) in rows]
        actors = {e.get("actor", "") for e in events if e.get("operation") == operation}
        if until is None or until in actors or time.monotonic() > deadline:
            return actors
        time.sleep(0.2)
