"""The console's Evidence page (issue 16, helper E): the window, what a bundle holds, where
the server's own state is found, and a real bundle built over a home with keys, an audit log
and a governance database, packed as a gzip tar whose members are checked and which, once
unpacked, verifies with ``evidence.verify.check`` as ``modelseal evidence verify`` does."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import ssl
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest

from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog, public_key_hex
from modelseal.errors import EvidenceError
from modelseal.evidence import verify
from modelseal.evidence.bundle import Sources
from modelseal.evidence.model import (
    ITEMS,
    MANIFEST,
    RECORD_KINDS,
    REPORT,
    SIGNATURE,
    Window,
    fixed_files,
)
from modelseal.governance.cedar import default_policy
from modelseal.governance.exceptions import utc_text
from modelseal.governance.model import Binding
from modelseal.governance.store import GovStore
from modelseal.governance.versions import PolicyStore
from modelseal.keys import keystore
from modelseal.keys.service import KeyService
from modelseal.recipes import context as recipes_context
from modelseal.server import console_evidence as ce
from modelseal.server.console_login import COOKIE
from modelseal.server.console_page import _ENV, ConsoleDeps
from modelseal.telemetry.feed import CountingSink
from tests.conftest import PASSPHRASE, Env
from tests.console_world import Browser, World, console_world
from tests.test_access_cli import USER
from tests.test_console_policies import exception

ALICE = "spiffe://example.org/prod/user/alice"
BOB = "spiffe://example.org/prod/user/bob"
DAY = 86400.0


@dataclass
class Server:
    home: Path
    data: Path
    log: MerkleAuditLog
    svc: KeyService
    deps: ConsoleDeps
    digest: str  # the active policy version


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir(mode=0o700)
    data.mkdir(mode=0o700)
    monkeypatch.setenv("MODELSEAL_HOME", str(home))
    monkeypatch.setenv("MODELSEAL_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("MODELSEAL_AGENT_SOCK", raising=False)
    monkeypatch.delenv("MODELSEAL_AUDIT_URL", raising=False)
    monkeypatch.setattr(recipes_context, "_service", None)
    keystore.clear_cache()
    keystore.create(keystore.keystore_path(home), PASSPHRASE.encode(), scrypt_log2_n=14)
    log = MerkleAuditLog(home / "audit.db")
    svc = KeyService(sink=log)
    svc.create("local:prod-kek")
    svc.rotate("local:prod-kek")
    now = time.time()
    target = str(data / "governance.db")
    store = GovStore.open(target)
    store.bind(Binding("", BOB, "auditor", "prod", now + 90 * DAY), "boot", now)
    policies = PolicyStore.open(target)
    v = policies.propose(default_policy().text + exception("EXC-9", now + 3 * DAY), ALICE, "with EXC-9", now=now)
    policies.activate(v.digest, ALICE, [BOB], now=now)
    log.emit(AuditEvent("anomaly", "local:prod-kek", "alert", actor=ALICE, time=now))
    deps = ConsoleDeps(home=home, store=store, policies=policies, svc=svc, audit=CountingSink(log), target=target)
    yield Server(home, data, log, svc, deps, v.digest)
    store.close()
    policies.close()
    keystore.clear_cache()


def test_what_a_bundle_holds() -> None:
    listed = [c.name for c in ce.contents()]
    assert listed[: len(fixed_files())] == fixed_files()
    assert listed[len(fixed_files()) :] == [f"records/{k}/" for k in RECORD_KINDS] + [REPORT, MANIFEST, SIGNATURE]
    items = [i for c in ce.contents() for i, _, _ in c.items]
    assert sorted(items) == sorted(ITEMS)
    state = {i for c in ce.contents() for i, _, s in c.items if s}
    assert state == {"keys.inventory", "certificates.authority", "changes.policy_versions", "changes.exceptions"}


def test_the_window_and_the_file_name() -> None:
    w = ce.parse_window("2026-01-01", "2026-01-31")
    assert (w.start, w.end) == (Window.parse("2026-01-01", "2026-01-31").start, w.start + 31 * DAY)
    assert ce.file_name(w) == "evidence-20260101-20260131.tar.gz"
    assert ce.file_name(ce.parse_window("2026-03-05", "2026-03-05")) == "evidence-20260305-20260305.tar.gz"
    since, until = ce.default_window(Window.parse("2026-02-10", "2026-02-10").start + 3600)
    assert (since, until) == ("2026-01-12", "2026-02-10")
    assert ce.parse_window(since, until).end - ce.parse_window(since, until).start == ce.DEFAULT_DAYS * DAY
    assert ce.parse_window("2025-01-01", "2026-01-01").end - ce.parse_window("2025-01-01", "2026-01-01").start == (
        366 * DAY
    )
    for since, until, why in [
        ("2025-01-01", "2026-01-02", "at most 366 days"),
        ("2026-02-01", "2026-01-01", "the window is empty"),
        ("2026-01-01T00:00:00Z", "2026-01-02", "two dates"),
        ("../etc", "2026-01-02", "two dates"),
        ("2026-02-30", "2026-03-01", "not a date"),
    ]:
        with pytest.raises(EvidenceError, match=why):
            ce.parse_window(since, until)


def test_the_servers_own_state_is_the_source(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    src = ce.sources(server.deps)
    assert src.home == server.home and src.audit == server.home / "audit.db"
    assert src.governance == str(server.data / "governance.db") and src.tls_reports == () and src.witness is None
    given = ConsoleDeps(home=server.home, store=server.deps.store, target="postgresql://db/x")
    assert ce.governance_target(given) == "postgresql://db/x"
    bare = ConsoleDeps(home=server.home)
    assert ce.audit_target(bare) == server.home / "audit.db" and ce.governance_target(bare) is None
    monkeypatch.setenv("MODELSEAL_AUDIT_URL", "postgresql://audit.example/log")
    assert ce.audit_target(bare) == "postgresql://audit.example/log"
    assert ce.describe_target(ce.audit_target(bare)) == "PostgreSQL"
    assert ce.describe_target(src.governance) == "a SQLite file on this server"


def _members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive, "r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def test_a_real_bundle_packed_and_verified(server: Server, tmp_path: Path) -> None:
    now = time.time()
    window = ce.parse_window(*ce.default_window(now))
    built = ce.build(ce.sources(server.deps), server.svc, window)
    try:
        assert built.spool.parent == server.home / ce.SPOOL and (built.spool.stat().st_mode & 0o777) == 0o700
        assert sorted(p.name for p in built.spool.iterdir()) == [built.filename]  # the folder itself is gone
        assert built.filename == ce.file_name(window) and built.size == built.archive.stat().st_size
        assert built.sha256 == hashlib.sha256(built.archive.read_bytes()).hexdigest()
        top = built.filename.removesuffix(".tar.gz")
        members = _members(built.archive)
        assert all(n == top or n.startswith(top + "/") for n in members)
        assert all((m.isfile() and m.mode == 0o600) or (m.isdir() and m.mode == 0o700) for m in members.values())
        assert all(m.uname == "" and m.gname == "" for m in members.values())
        out = tmp_path / "unpacked"
        with tarfile.open(built.archive, "r:gz") as tar:
            tar.extractall(out, filter="data")
        folder = out / top
        manifest = json.loads((folder / MANIFEST).read_text())
        listed = {f["name"] for f in manifest["files"]}
        files = {n.removeprefix(top + "/") for n, m in members.items() if m.isfile()}
        assert files == listed | {MANIFEST, SIGNATURE}
        assert built.manifest_sha256 == hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
        assert manifest["signer"] == public_key_hex(server.log.signing_key.public_key())
        assert manifest["window"]["start"] == window.start and manifest["window"]["end"] == window.end
        checked = verify.check(folder, verify.trusted_keys([], server.home / "audit.db"), window)
        assert checked.problems == () and checked.files == len(listed) and checked.proofs >= 1
        changes = json.loads((folder / "changes.json").read_text())
        assert [v["digest"] for v in changes["items"]["changes.policy_versions"]] == [server.digest]
        assert any(e.get("id") == "EXC-9" for e in changes["items"]["changes.exceptions"])
        keys = json.loads((folder / "keys.json").read_text())
        assert any("prod-kek" in str(k.get("key", k)) for k in keys["items"]["keys.inventory"])
        assert built.exported.audit_ok and built.exported.files == len(listed)
        (folder / "keys.json").write_bytes(b"{}\n")  # the check that build relies on does fail on an edit
        assert verify.check(folder, verify.trusted_keys([], server.home / "audit.db"), window).problems
    finally:
        shutil.rmtree(built.spool)


def test_a_bundle_that_cannot_be_written_leaves_nothing(server: Server) -> None:
    (server.home / ce.SPOOL).mkdir(mode=0o700)
    old = server.home / ce.SPOOL / "evidence-dead"
    old.mkdir()
    os.utime(old, (time.time() - 2 * ce.STALE_SECONDS,) * 2)
    young = server.home / ce.SPOOL / "evidence-running"
    young.mkdir()
    keep = server.home / ce.SPOOL / "unrelated"
    keep.mkdir()
    window = ce.parse_window("2026-01-01", "2026-01-02")
    src = ce.sources(server.deps)
    broken = Sources(home=src.home, audit=src.audit, governance=src.governance, witness=server.home / "nope")
    with pytest.raises(EvidenceError, match="--witness"):
        ce.build(broken, server.svc, window)
    assert sorted(p.name for p in (server.home / ce.SPOOL).iterdir()) == ["evidence-running", "unrelated"]


def test_pack_takes_regular_files_and_folders_only(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    (folder / "records" / "drills").mkdir(parents=True)
    (folder / "index.json").write_text("{}")
    (folder / "records" / "drills" / "d.json").write_text("[]")
    digest = ce.pack(folder, tmp_path / "ok.tar.gz", "top")
    assert digest == hashlib.sha256((tmp_path / "ok.tar.gz").read_bytes()).hexdigest()
    assert sorted(_members(tmp_path / "ok.tar.gz")) == [
        "top",
        "top/index.json",
        "top/records",
        "top/records/drills",
        "top/records/drills/d.json",
    ]
    os.symlink("/etc/passwd", folder / "records" / "link.json")
    with pytest.raises(EvidenceError, match="link"):
        ce.pack(folder, tmp_path / "bad.tar.gz", "top")
    with pytest.raises(FileExistsError):
        ce.pack(folder, tmp_path / "ok.tar.gz", "top")  # never over an archive


def test_the_page_lists_the_contents_and_escapes_recent_exports(server: Server) -> None:
    recent = ce.Recent(utc_text(time.time()), "spiffe://x/<script>", "w", "a" * 64, "b" * 64, 12, 3, False, 2)
    page = _ENV.get_template("evidence.html").render(
        title="Evidence",
        identity=ALICE,
        csrf="tok-123",
        expires=0,
        nav=[],
        here="/ui/evidence",
        configured=True,
        contents=ce.contents(),
        since="2026-01-01",
        until="2026-01-30",
        max_days=ce.MAX_DAYS,
        audit_where="a SQLite file on this server",
        governance_where="PostgreSQL",
        recent=[recent],
    )
    assert '<input type="hidden" name="csrf" value="tok-123">' in page
    assert 'name="since" type="date" value="2026-01-01"' in page and 'value="2026-01-30"' in page
    assert page.count('data-testid="evidence-file"') == len(ce.contents())
    assert page.count('data-state-at-export="yes"') == 4 and page.count("data-item=") == len(ITEMS)
    assert "spiffe://x/&lt;script&gt;" in page and "<script>" not in page and "does NOT verify" in page


# -- through the real server (tests.console_world) ------------------------------------------


@pytest.fixture
def world(env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[World]:
    monkeypatch.delenv("MODELSEAL_AUDIT_URL", raising=False)
    with console_world(env, monkeypatch, capsys) as w:
        yield w


@dataclass
class Download:
    status: int
    headers: dict[str, str]
    body: bytes


def _post_raw(world: World, b: Browser, fields: dict[str, str]) -> Download:
    """The POST as ``Browser.post`` sends it, the answer's bytes kept (a download is binary)."""
    ctx = ssl.create_default_context(cafile=str(world.pki.server_dir / "ca.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", world.port, context=ctx, timeout=120)
    try:
        body = urlencode({"csrf": b.csrf, **fields}).encode()
        conn.request(
            "POST",
            "/ui/evidence",
            body=body,
            headers={
                "Host": f"127.0.0.1:{world.port}",
                "Origin": f"https://127.0.0.1:{world.port}",
                "Cookie": f"{COOKIE}={b.cookie}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        r = conn.getresponse()
        return Download(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def test_an_auditor_exports_a_bundle_that_verifies(world: World, env: Env, tmp_path: Path) -> None:
    world.enrol("officer1")
    world.bind("alice", "auditor")
    alice = world.sign_in("alice")
    page = alice.get("/ui/evidence")
    assert page.status == 200 and 'data-testid="evidence-form"' in page.body
    assert page.body.count('data-testid="evidence-file"') == len(ce.contents())
    assert 'data-testid="evidence-recent-none"' in page.body
    since, until = ce.default_window(world.clock.time())
    assert f'name="since" type="date" value="{since}"' in page.body
    got = _post_raw(world, alice, {"since": since, "until": until})
    name = ce.file_name(ce.parse_window(since, until))
    assert got.status == 200, got.body[:300]
    assert got.headers["content-type"] == "application/gzip"
    assert got.headers["content-disposition"] == f'attachment; filename="{name}"'
    digest = hashlib.sha256(got.body).hexdigest()
    assert got.headers["x-modelseal-evidence-sha256"] == digest
    assert "default-src 'none'" in got.headers["content-security-policy"]
    archive = tmp_path / name
    archive.write_bytes(got.body)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(tmp_path / "out", filter="data")
    folder = tmp_path / "out" / name.removesuffix(".tar.gz")
    checked = verify.check(folder, verify.trusted_keys([], env.home / "audit.db"), ce.parse_window(since, until))
    assert checked.problems == () and checked.files > 8
    manifest = (folder / MANIFEST).read_bytes()
    assert got.headers["x-modelseal-evidence-manifest-sha256"] == hashlib.sha256(manifest).hexdigest()
    index = json.loads((folder / "index.json").read_text())
    assert index["window"]["from"] == f"{since}T00:00:00Z"
    access = json.loads((folder / "access.json").read_text())  # the server's governance database was read
    assert any(f"{USER}/alice" in json.dumps(b) for b in access["items"]["access.bindings"])
    assert not any((env.home / ce.SPOOL).iterdir())  # nothing left behind
    exported = world.audit_events("evidence-export")
    assert [(e.get("actor"), e.get("artifact")) for e in exported] == [(f"{USER}/alice", digest)]
    after = alice.get("/ui/evidence")
    assert f'data-testid="evidence-recent-row" data-sha256="{digest}"' in after.body


def test_forms_and_roles_are_checked(world: World, env: Env) -> None:
    world.enrol("officer1")
    world.bind("alice", "auditor")
    alice = world.sign_in("alice")
    since, until = ce.default_window(world.clock.time())
    forged = alice.post("/ui/evidence", {"since": since, "until": until}, csrf="forged")
    assert forged.status == 403 and "CSRF" in forged.body
    long = alice.post("/ui/evidence", {"since": "2020-01-01", "until": until})
    assert long.status == 400 and "at most 366 days" in long.body
    path = alice.post("/ui/evidence", {"since": "/etc/passwd", "until": until})
    assert path.status == 400 and "two dates" in path.body
    officer = world.sign_in("officer2")  # a security officer: evidence.read is the auditor's
    assert officer.get("/ui/evidence").status == 403
    refused = officer.post("/ui/evidence", {"since": since, "until": until})
    assert refused.status == 403 and refused.header("Content-Type").startswith("text/html")
    assert not (env.home / ce.SPOOL).exists() or not any((env.home / ce.SPOOL).iterdir())
    assert not [e for e in env.sink.events if e.operation == "evidence-export"]


def test_a_server_without_a_key_service_shows_no_form() -> None:
    page = _ENV.get_template("evidence.html").render(
        title="Evidence",
        identity=ALICE,
        csrf="tok",
        expires=0,
        nav=[],
        here="/ui/evidence",
        configured=False,
        contents=ce.contents(),
        since="2026-01-01",
        until="2026-01-30",
        max_days=ce.MAX_DAYS,
        audit_where="none on this server",
        governance_where="none on this server",
        recent=[],
    )
    assert 'data-testid="evidence-not-configured"' in page and 'data-testid="evidence-form"' not in page
    assert page.count('data-testid="evidence-file"') == len(ce.contents())


def test_a_build_nobody_waits_for_leaves_no_spool(tmp_path: Path) -> None:
    """A request cancelled while its bundle is built (a shutdown): the build's spool goes as
    soon as the build is done, not at a later export."""
    import asyncio

    spool = tmp_path / "console-exports" / "evidence-x"
    spool.mkdir(parents=True)
    (spool / "evidence.tar.gz").write_bytes(b"archive")

    async def go() -> None:
        fut: asyncio.Future[ce.Built] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(ce._discard)
        built = ce.Built(spool, spool / "evidence.tar.gz", "evidence.tar.gz", "", "", 7, None)  # type: ignore[arg-type]
        fut.set_result(built)
        await asyncio.sleep(0)  # the callback runs

    asyncio.run(go())
    assert not spool.exists()
