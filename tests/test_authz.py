"""The server's one decider (``server.authz``): Cedar decisions over real bindings in a real
``GovStore`` (SQLite), their audit events, the 2 s caching window, the denial rate limit and
the tampered-policy refusal, and the same through a real ``modelseal serve`` subprocess on
127.0.0.1 (a flood of denials from one identity, another CA's certificate, a key-admin
pulling, a tampered active policy)."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import sqlite3
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from modelseal.audit.events import AuditEvent, JsonLinesSink, MemorySink
from modelseal.audit.log import MerkleAuditLog
from modelseal.errors import GovernanceError, StorageError
from modelseal.governance.cedar import PolicySet, default_policy
from modelseal.governance.model import Binding, Resource
from modelseal.governance.standards import ArtifactFacts
from modelseal.governance.store import GovStore
from modelseal.governance.versions import PolicyStore
from modelseal.pki import ca as pki_ca
from modelseal.pki.identity import Identity
from modelseal.server import authz
from modelseal.server import tls as server_tls
from modelseal.server.auditwriter import AuditWriter
from tests.conftest import Env
from tests.oci_helpers import SERVE, TD, Client, Server, make_dir
from tests.services import free_port

T0 = 1_800_000_000.0
DAY = 86400.0
TRAINER = Identity.of(TD, "prod", "service", "trainer")
INTRUDER = Identity.of(TD, "prod", "service", "intruder")
ADMIN = Identity.of(TD, "prod", "service", "keyadmin")
REPO = Resource("Repository", "models/llama", {"env": "prod"})


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def bind(store: GovStore, pattern: str, role: str, *, kind: str = "binding", expires: float = T0 + 30 * DAY) -> str:
    reason = "" if kind == "binding" else "maintenance window"
    return store.bind(Binding("", pattern, role, "prod", expires, kind=kind, reason=reason), by="test", now=T0).id


@pytest.fixture
def store(tmp_path: Path) -> GovStore:
    return GovStore.open(tmp_path / "gov" / "governance.db")


def decider(store: GovStore, clock: Clock, sink: MemorySink, **kw: object) -> authz.Authz:
    return authz.Authz(store, None, "prod", TD, sink, now=clock, **kw)  # type: ignore[arg-type]


# -- decisions, in process ---------------------------------------------------------------


def test_decisions_name_their_policies_and_are_audited(store: GovStore) -> None:
    bid = bind(store, TRAINER.uri, "reader")
    sink, clock = MemorySink(), Clock()
    a = decider(store, clock, sink)
    pull = a.decide(TRAINER, "pull", REPO)
    assert pull.allowed and pull.policies == ("role-reader",)
    push = a.decide(TRAINER, "push", REPO)
    assert not push.allowed and push.policies == ()
    assert "no policy permits push" in push.reason
    nobody = a.decide(INTRUDER, "pull", REPO)
    assert not nobody.allowed and "no role" in nobody.reason
    events = [(e.operation, e.actor, e.key, e.result) for e in sink.events]
    assert events == [
        ("authorize", TRAINER.uri, "pull Repository:models/llama", "allow:role-reader"),
        ("authorize", TRAINER.uri, "push Repository:models/llama", "deny:default"),
        ("authorize", INTRUDER.uri, "pull Repository:models/llama", "deny:default"),
    ]
    # the allowing binding's last use is recorded, the others' not
    assert store.get(bid) is not None and store.get(bid).last_used == T0  # type: ignore[union-attr]


def test_a_key_admin_never_pulls_and_a_reader_never_rotates(store: GovStore) -> None:
    bind(store, ADMIN.uri, "key-admin")
    bind(store, TRAINER.uri, "reader")
    a = decider(store, Clock(), MemorySink())
    assert not a.decide(ADMIN, "pull", REPO).allowed
    key = Resource("Key", "llama-prod", {"env": "prod"})
    assert not a.decide(ADMIN, "key.unwrap", key, {"artifact_env": "prod"}).allowed
    assert not a.decide(TRAINER, "key.rotate", key, {"mfa": True}).allowed
    assert a.decide(TRAINER, "key.unwrap", key, {"artifact_env": "prod"}).allowed


def test_the_server_facts_are_its_own(store: GovStore) -> None:
    """A handler's context cannot move the clock back over an expired grant."""
    bind(store, TRAINER.uri, "reader", kind="grant", expires=T0 + 3600)
    clock = Clock(T0 + 7200)
    a = decider(store, clock, MemorySink())
    assert not a.decide(TRAINER, "pull", REPO, {"now": int(T0)}).allowed


def test_an_expired_grant_is_refused_at_once(store: GovStore) -> None:
    bind(store, TRAINER.uri, "reader", kind="grant", expires=T0 + 3600)
    clock, sink = Clock(T0 + 3599), MemorySink()
    a = decider(store, clock, sink)
    assert a.decide(TRAINER, "pull", REPO).allowed
    clock.t = T0 + 3600  # within the cache window: expiry needs no re-read
    d = a.decide(TRAINER, "pull", REPO)
    assert not d.allowed and "no role" in d.reason
    assert sink.events[-1].result == "deny:default"


def test_a_forbid_names_itself(store: GovStore, tmp_path: Path) -> None:
    """Separation of duties met through bindings made before it was checked (the decision
    repeats the rule): the forbid's id and reason are the denial."""
    bind(store, TRAINER.uri, "reader")
    with sqlite3.connect(tmp_path / "gov" / "governance.db") as conn:  # a key-admin row behind the store's checks
        conn.execute(
            "INSERT INTO gov_bindings VALUES ('sneaky', ?, 'key-admin', 'prod', ?, 'binding', '', 'x', ?, NULL)",
            (TRAINER.uri, T0 + DAY, T0),
        )
        conn.execute("UPDATE gov_generation SET value = value + 1")
    sink = MemorySink()
    d = decider(store, Clock(), sink).decide(TRAINER, "pull", REPO)
    assert not d.allowed and "gov-sod" in d.policies and "separation of duties" in d.reason
    assert sink.events[-1].result.startswith("deny:") and "gov-sod" in sink.events[-1].result


def test_break_glass_use_is_a_warning_and_its_own_event(store: GovStore, caplog: pytest.LogCaptureFixture) -> None:
    glass = bind(store, INTRUDER.uri, "break-glass", kind="break-glass", expires=T0 + 4 * 3600)
    sink = MemorySink()
    with caplog.at_level("WARNING", "modelseal.server"):
        d = decider(store, Clock(), sink).decide(INTRUDER, "pull", REPO)
    assert d.allowed and d.break_glass
    assert [e.operation for e in sink.events] == ["authorize", "break-glass-use"]
    assert sink.events[1].result == f"allow:{glass}" and sink.events[1].actor == INTRUDER.uri
    assert any("BREAK-GLASS" in r.getMessage() for r in caplog.records)


def test_bindings_are_cached_at_most_two_seconds_across_instances(tmp_path: Path) -> None:
    """Two servers on one database: a binding made through one is in force on the other
    within the window, and not re-read before it."""
    target = tmp_path / "governance.db"
    mine, theirs = GovStore.open(target), GovStore.open(target)
    clock = Clock(time.time())
    a = authz.Authz(theirs, None, "prod", TD, MemorySink(), now=clock)
    assert a.cache_seconds == authz.CACHE_SECONDS == 2.0
    assert not a.decide(TRAINER, "pull", REPO).allowed
    started = time.monotonic()
    mine.bind(Binding("", TRAINER.uri, "reader", "prod", clock.t + DAY), by="test", now=clock.t)
    if time.monotonic() - started < 1.5:  # still within the window of the first read
        assert not a.decide(TRAINER, "pull", REPO).allowed
    time.sleep(max(0.0, started + authz.CACHE_SECONDS + 0.1 - time.monotonic()))
    assert a.decide(TRAINER, "pull", REPO).allowed


def test_a_tampered_active_policy_refuses_every_decision(tmp_path: Path) -> None:
    target = tmp_path / "governance.db"
    gov, policies = GovStore.open(target), PolicyStore.open(target)
    bind(gov, TRAINER.uri, "reader")
    text = (Path(authz.__file__).parent.parent / "governance" / "policies" / "default.cedar").read_text()
    v = policies.propose(text + "\n// reviewed\n", "spiffe://example.org/prod/user/alice")
    policies.activate(v.digest, "spiffe://example.org/prod/user/alice", ["bob", "carol"])
    sink = MemorySink()
    a = authz.Authz(gov, policies, "prod", TD, sink, now=Clock(), cache_seconds=0.0)
    assert a.decide(TRAINER, "pull", REPO).allowed
    with sqlite3.connect(target) as db:  # a permit slipped into the stored text
        db.execute("UPDATE gov_policy_versions SET body = body || ? WHERE digest = ?", ("\n// x", v.digest))
    with pytest.raises(GovernanceError, match=authz.TAMPERED):
        a.decide(TRAINER, "pull", REPO)
    assert sink.events[-1].result == "deny:unavailable"


def _exception_policy(expires: str) -> PolicySet:
    waiver = f"""
@id("legacy-local")
@exception("legacy-local")
@waives("std-prod-kms")
@justification("the legacy model is re-sealed under transit in Q1")
@owner("ml-platform@example.org")
@approved_by("ciso@example.org")
@expires("{expires}")
permit (principal, action == Action::"artifact.push", resource is Artifact);
"""
    return PolicySet.parse(default_policy().text + waiver, "test.cedar")


def test_an_exception_allows_and_is_audited_as_such_until_it_expires(store: GovStore) -> None:
    facts = ArtifactFacts("prod", "prod", ("local:legacy#1",), frozenset({"local"}))
    artifact = Resource("Artifact", "sha256:" + "ab" * 32, facts.attrs())
    sink, clock = MemorySink(), Clock()
    live = authz.Authz(store, _exception_policy("2027-01-31T00:00:00Z"), "prod", TD, sink, now=clock)
    d = live.decide(TRAINER, "artifact.push", artifact, {"tls_version": "TLSv1.3"})
    assert d.allowed and d.exception == "legacy-local"
    assert sink.events[-1].result == "allow-exception:legacy-local"
    clock.t = 1_801_000_000.0  # 2027-01-26: still live
    assert live.decide(TRAINER, "artifact.push", artifact, {"tls_version": "TLSv1.3"}).allowed
    clock.t = 1_802_000_000.0  # 2027-02-06: expired, the standard applies at once
    d = live.decide(TRAINER, "artifact.push", artifact, {"tls_version": "TLSv1.3"})
    assert not d.allowed and "std-prod-kms" in d.policies and d.expired == ("legacy-local",)
    assert [(e.operation, e.result) for e in sink.events[-2:]] == [
        ("authorize", "deny:std-prod-kms"),
        ("exception-expired", "expired:legacy-local"),
    ]


def test_the_denial_bucket_refills() -> None:
    lim = authz.DenialLimiter(burst=3, window=3.0)
    for _ in range(3):
        assert lim.retry_after("a", 100.0) == 0
        lim.denied("a", 100.0)
    assert lim.retry_after("a", 100.0) == 1
    assert lim.retry_after("b", 100.0) == 0  # another identity has its own bucket
    assert lim.retry_after("a", 101.0) == 0  # one denial refilled per second


def test_the_audit_writer_keeps_order_refuses_while_failing_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "not-yet" / "audit.jsonl"
    w = AuditWriter(JsonLinesSink(path))
    w.emit(AuditEvent("authorize", "pull Repository:a", "allow:role-reader", actor=TRAINER.uri, time=T0))
    deadline = time.monotonic() + 10
    while True:  # the folder is missing: the write fails, and decisions are then refused
        try:
            w.emit(AuditEvent("authorize", "pull Repository:b", "deny:default", actor=INTRUDER.uri))
        except StorageError as e:
            assert "cannot be written" in str(e)
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    path.parent.mkdir()
    assert w.flush(10)  # the failed batch is retried and written
    w.emit(AuditEvent("authorize", "pull Repository:c", "allow:role-reader", actor=TRAINER.uri))
    w.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    keys = [e["key"] for e in lines]
    assert keys[0] == "pull Repository:a" and keys[-1] == "pull Repository:c"
    assert lines[0]["time"] == T0 and all(e["time"] > 0 for e in lines)
    with pytest.raises(StorageError):
        w.emit(AuditEvent("authorize", "x", "deny:default"))  # closed


def test_audit_results() -> None:
    from modelseal.governance.model import Decision

    assert authz.audit_result(Decision(True, ("role-reader", "x"), "")) == "allow:role-reader,x"
    assert authz.audit_result(Decision(False, ("gov-sod",), "")) == "deny:gov-sod"
    assert authz.audit_result(Decision(True, ("p", "exc-1"), "", exception="exc-1")) == "allow-exception:exc-1"


# -- through a real server ----------------------------------------------------------------


def start_server(env: Env, *flags: str) -> Server:
    if not (env.home / "ca").exists():
        pki_ca.init_ca(env.svc, TD)
    tls_dir = make_dir(env, env.work / "server-tls", "server", "registry", ips=["127.0.0.1"])
    client_dir = make_dir(env, env.work / "client-trainer", "service", "trainer")
    data = env.work / "data"
    gov = GovStore.open(data / "governance.db")
    gov.bind(Binding("", TRAINER.uri, "reader", "prod", time.time() + DAY), by="test")
    gov.bind(Binding("", ADMIN.uri, "key-admin", "prod", time.time() + DAY), by="test")
    gov.close()
    port = free_port()
    args = [*SERVE, "--listen", f"127.0.0.1:{port}", "--tls-dir", str(tls_dir), "--data", str(data), *flags]
    server = Server(port, data, None, env, env.work / "serve.log", client_dir, args)  # type: ignore[arg-type]
    server.start()
    return server


def client_as(env: Env, server: Server, name: str) -> Client:
    folder = make_dir(env, env.work / f"client-{name}", "service", name)
    return Client(server_tls.client_context(folder), server.port)


def test_a_flood_of_denials_is_rate_limited_and_others_are_served(env: Env) -> None:
    server = start_server(env, "--workers", "1")
    try:
        intruder, trainer = client_as(env, server, "intruder"), client_as(env, server, "trainer")
        statuses = []
        for _ in range(authz.DENIAL_BURST + 10):
            r = intruder.request("GET", "/v2/models/llama/tags/list")
            statuses.append(r.status)
            if r.status == 429:
                assert r.code() == "TOOMANYREQUESTS"
                after = r.header("Retry-After")
                assert after is not None and after.isdigit() and int(after) >= 1
            else:
                assert r.code() == "DENIED" and "no policy permits pull" in r.json()["errors"][0]["message"]  # type: ignore[index]
        # the burst, then 429s (a denial refilled now and then, at DENIAL_BURST per DENIAL_WINDOW)
        assert statuses[: authz.DENIAL_BURST] == [403] * authz.DENIAL_BURST and statuses.count(429) >= 5
        # the trainer is decided as before: allowed (the repository is just unknown)
        r = trainer.request("GET", "/v2/models/llama/tags/list")
        assert r.status == 404 and r.code() == "NAME_UNKNOWN"
        r = trainer.request("HEAD", "/v2/models/llama/manifests/latest")
        assert r.status == 404
        # a denial closes nothing: the same connection answers the next request
        assert intruder.conn is not None
        assert intruder.request("GET", "/v2/").status == 200
    finally:
        server.stop()
    # every decision is in the server's audit log (written out at shutdown), a 429 is not
    events = [e for e in MerkleAuditLog(env.home / "audit.db").events() if e["operation"] == "authorize"]
    denied = [e for e in events if e["actor"] == INTRUDER.uri]
    assert len(denied) == statuses.count(403)
    assert {(e["key"], e["result"]) for e in denied} == {("pull Repository:models/llama", "deny:default")}
    allowed = [e for e in events if e["actor"] == TRAINER.uri]
    assert [e["result"] for e in allowed] == ["allow:role-reader"] * 2


def test_a_key_admin_pulling_and_a_publisher_action_by_a_reader_are_refused(env: Env) -> None:
    server = start_server(env, "--workers", "1")
    try:
        admin, trainer = client_as(env, server, "keyadmin"), client_as(env, server, "trainer")
        r = admin.request("GET", "/v2/models/llama/manifests/latest")
        assert r.status == 403 and r.code() == "DENIED"
        r = admin.request("HEAD", "/v2/models/llama/manifests/latest")
        assert r.status == 403 and r.body == b""
        r = trainer.request("POST", "/v2/models/llama/blobs/uploads/")
        assert r.status == 403 and "push" in r.json()["errors"][0]["message"]  # type: ignore[index]
    finally:
        server.stop()


def _foreign_identity(env: Env) -> Path:
    """A CA of its own (not this server's) issuing a leaf that claims the trainer's identity."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example.org CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(TRAINER.uri)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    folder = env.work / "foreign"
    folder.mkdir()
    chain = [leaf, ca]  # the whole foreign chain is presented
    (folder / "cert.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (folder / "key.pem").chmod(0o600)
    return folder


def test_a_certificate_from_another_ca_claiming_an_identity_is_refused(env: Env) -> None:
    server = start_server(env, "--workers", "1")
    try:
        foreign = _foreign_identity(env)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server.client_dir / "ca.pem"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_cert_chain(foreign / "cert.pem", foreign / "key.pem")
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=10)
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            conn.request("GET", "/v2/models/llama/tags/list")
            conn.getresponse().read()
        conn.close()
        # the real trainer, same identity, is served
        assert client_as(env, server, "trainer").request("GET", "/v2/models/llama/tags/list").status == 404
    finally:
        server.stop()


def test_a_tampered_active_policy_answers_503_for_everyone(env: Env) -> None:
    server = start_server(env, "--workers", "1")
    try:
        trainer = client_as(env, server, "trainer")
        assert trainer.request("GET", "/v2/models/llama/tags/list").status == 404
        target = server.data / "governance.db"
        policies = PolicyStore.open(target)
        text = (Path(authz.__file__).parent.parent / "governance" / "policies" / "default.cedar").read_text()
        v = policies.propose(text + "\n// v2\n", "spiffe://example.org/prod/user/alice")
        policies.activate(v.digest, "spiffe://example.org/prod/user/alice", ["bob", "carol"])
        policies.close()
        with sqlite3.connect(target) as db:
            db.execute("UPDATE gov_policy_versions SET body = body || ? WHERE digest = ?", ("\n// y", v.digest))
        deadline = time.monotonic() + authz.CACHE_SECONDS + 10
        while True:  # in force within the cache window
            r = trainer.request("GET", "/v2/models/llama/tags/list")
            if r.status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status == 503, r.body
        assert r.json()["errors"][0]["message"] == authz.TAMPERED  # type: ignore[index]
        assert trainer.request("GET", "/v2/").status == 200  # the base endpoint asks no policy
    finally:
        server.stop()
