"""What a web console page costs against the JSON API route that serves the same data, on
the same server in the same run.

    python benchmarks/console.py [--samples 200] [--quick]

The server is the application ``modelseal serve --console`` builds (``tests.console_world``:
the real decider with its 2 s binding cache, Cedar's shipped policy, the governance APIs,
the key broker, the signed Merkle audit log at ``$MODELSEAL_HOME/audit.db`` and the
console), on 127.0.0.1 with its real TLS 1.3 context, in a thread of this process, under a
fresh ``MODELSEAL_HOME``. One auditor (``user/audra``, bound through the governance store as
``modelseal access bind`` would) holds every read. There are 20 broker keys, 300 wraps and
60 unwraps in the audit log, and 3 pending approvals. The auditor signs in through the real
link flow: ``POST /modelseal/v1/console/login`` over mutual TLS, then ``POST /ui/login``.

Each row is one GET, timed from connect to the last byte of the body, by one client for
both faces: console pages without a client certificate and with the session cookie, as a
browser sends them; API routes with the auditor's certificate, as the CLI sends them.
Requests are interleaved (every path once per round), so the audit log's growth during the
run (each decision is an event, and ``/ui/keys`` and ``/ui/`` read the log) falls on every
path alike. Each path is asked twice per round: on a new TLS connection (the server issues
no session tickets, so each is a full handshake), then on one kept-alive connection per face.
Then the pages that read the log are timed again with it topped up to 10,000 and 20,000
entries. The floors are ``GET /ui/static/console.css`` (no session lookup, no decision) and
``GET /v2/`` over mutual TLS (identity only). "over floor" is a row's median minus its
face's floor. Figures and ratios, not pass/fail (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sqlite3
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import Env
from tests.console_world import Browser, console_server
from tests.push_pull_helpers import TD, Pki, issue_dir, make_pki
from tests.test_access_cli import Clock

from modelseal.audit.events import AuditEvent, MemorySink
from modelseal.format.header import normalize_context
from modelseal.governance import brokerops as ops
from modelseal.governance.approvals import Approvals
from modelseal.governance.model import Binding, Resource
from modelseal.keys import keystore
from modelseal.keys.service import KeyService
from modelseal.registry.apiclient import ApiClient
from modelseal.registry.reference import Endpoint
from modelseal.registry.transport import Transport
from modelseal.server import app as app_mod
from modelseal.server import authz
from modelseal.server.console_login import COOKIE

USER = f"spiffe://{TD}/prod/user"
AUDITOR = f"{USER}/audra"
PROD = normalize_context({"env": "prod"})
KEYS, WRAPS, UNWRAPS, APPROVALS = 20, 300, 60, 3
# (console path, its API counterpart or None); the last two are the floors of each face.
ROWS: tuple[tuple[str, str | None], ...] = (
    ("/ui/keys", "/modelseal/v1/keys"),
    ("/ui/approvals", "/modelseal/v1/approvals"),
    ("/ui/policies", "/modelseal/v1/policy"),
    ("/ui/audit", None),  # no API reads the audit log's entries (``/modelseal/v1/alerts`` is the alerts)
    ("/ui/", None),
    ("/ui/certificates", None),  # no API lists certificates
)
CSS, BASE = "/ui/static/console.css", "/v2/"
# Audit log sizes of the scaling rows (0: as the run left it); the keys page reads at most 20,000.
SIZES = (0, 10_000, 20_000)


@dataclass
class Face:
    """GETs to the server as one kind of client: ``cert_dir`` presents a client certificate
    (the API's face), ``cookie`` sends the console session (the browser's face). The TLS
    context is built once, so the client's own set-up is not timed."""

    port: int
    ca: Path
    cert_dir: Path | None = None
    cookie: str | None = None
    keep: bool = False
    conn: http.client.HTTPSConnection | None = None
    connects: int = 0

    def __post_init__(self) -> None:
        self.ctx = ssl.create_default_context(cafile=str(self.ca))
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        if self.cert_dir is not None:
            self.ctx.load_cert_chain(self.cert_dir / "cert.pem", self.cert_dir / "key.pem")

    def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` (a new connection unless ``keep``); (status, body)."""
        conn = self.conn if self.keep else None
        if conn is None:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=60)
        headers = {"Host": f"127.0.0.1:{self.port}"}
        if self.cookie is not None:
            headers["Cookie"] = f"{COOKIE}={self.cookie}"
        self.connects += conn.sock is None
        try:
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            body = r.read()
        finally:
            if self.keep:
                self.conn = conn
            else:
                conn.close()
        return r.status, body

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def make_env(work: Path) -> Env:
    home = work / "home"
    (work / "work").mkdir(parents=True)
    os.environ.update(MODELSEAL_HOME=str(home), MODELSEAL_PASSPHRASE="benchmark")
    os.environ.pop("MODELSEAL_AGENT_SOCK", None)
    keystore.create(keystore.keystore_path(home), b"benchmark", scrypt_log2_n=14)
    sink = MemorySink()
    return Env(home, work / "work", KeyService(sink=sink), sink)


def seed(gov: app_mod.Governance) -> None:
    """Officers (as ``access bootstrap`` binds them), the auditor, keys, audit traffic and
    pending approvals: something on every page."""
    assert gov.svc is not None and gov.catalog is not None
    now, officer = time.time(), f"{USER}/officer1"
    for i in (1, 2):
        gov.store.bind(Binding("", f"{USER}/officer{i}", "security-officer", "prod", now + 30 * 86400), "bootstrap")
    gov.store.bind(Binding("", AUDITOR, "auditor", "prod", now + 30 * 86400), officer)
    keys = [
        ops.create_key(gov.svc, gov.catalog, f"team{i:02d}-weights", "prod", f"{USER}/officer1") for i in range(KEYS)
    ]
    wrapped = []
    for i in range(WRAPS):
        entry = keys[i % KEYS]
        wrapped.append((entry, ops.wrap_one(gov.svc, entry, os.urandom(32), PROD, f"{USER}/trainer{i % 3}")))
    for entry, w in wrapped[:UNWRAPS]:
        ops.unwrap_items(gov.svc, entry, [(w.key_version, w.wrapped, PROD)], f"{USER}/trainer0")
    approvals = Approvals.open(gov.target)
    try:
        for entry in keys[:APPROVALS]:
            res = Resource("Key", entry.name, {"env": "prod", "provider": "local"})
            approvals.request("key.destroy", res, {"name": entry.name, "version": 1}, f"{USER}/officer2")
    finally:
        approvals.close()


def sign_in(port: int, p: Pki, folder: Path) -> str:
    """The session cookie of the auditor, through the link flow of ``modelseal console login``."""
    with ApiClient(Transport([Endpoint("127.0.0.1", port)], folder, p.pins())) as api:
        url = str(api.call("POST", "console/login", {})["url"])
    browser = Browser(port, p.server_dir / "ca.pem")
    token = urlsplit(url).query.split("t=", 1)[1]
    done = browser.request("POST", "/ui/login", {"t": token})
    assert done.status == 303 and browser.cookie, (done.status, done.body[:200])
    return browser.cookie


def check_pages(ui: Face, api: Face) -> None:
    """The auditor's pages and API answers carry the seeded data (so no row times a refusal
    or an empty page)."""
    pages = {path: ui.get(path) for path in ("/ui/keys", "/ui/approvals")}
    answers = {path: api.get(path) for path in ("/modelseal/v1/keys", "/modelseal/v1/approvals")}
    assert pages["/ui/keys"][1].count(b'data-testid="key-row"') == KEYS, pages["/ui/keys"][1][:300]
    assert pages["/ui/approvals"][1].count(b"data-approval=") == APPROVALS
    assert len(json.loads(answers["/modelseal/v1/keys"][1])["keys"]) == KEYS
    assert len(json.loads(answers["/modelseal/v1/approvals"][1])["approvals"]) == APPROVALS


def log_size(home: Path) -> int:
    with sqlite3.connect(f"file:{home / 'audit.db'}?mode=ro", uri=True) as con:
        return int(con.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])


def plan() -> list[tuple[str, str]]:
    """(face, path): every console path, every API counterpart, then the two floors."""
    return [("ui", c) for c, _ in ROWS] + [("api", a) for _, a in ROWS if a] + [("ui", CSS), ("api", BASE)]


def measure(faces: dict[str, Face], steps: list[tuple[str, str]], rounds: int) -> dict[tuple[str, str], list[float]]:
    """Every (face, path) step once per round, ``rounds`` times; the times of each step."""
    for name, path in steps:  # warm: templates compiled, caches filled, statuses checked
        status, body = faces[name].get(path)
        assert status == 200 and body, (name, path, status)
    times: dict[tuple[str, str], list[float]] = {step: [] for step in steps}
    for _ in range(rounds):
        for name, path in steps:
            t = time.perf_counter()
            faces[name].get(path)
            times[name, path].append(time.perf_counter() - t)
    return times


def top_up(gov: app_mod.Governance, home: Path, size: int) -> None:
    """Unwrap events of the broker keys through the server's own audit writer until the log
    holds ``size`` entries: what a busier server's pages read."""
    assert gov.catalog is not None and gov.audit.flush(60)
    backings = [e.backing for e in gov.catalog.all()]
    now = time.time()
    for i in range(max(0, size - log_size(home))):
        actor = f"{USER}/trainer{i % 3}"
        gov.audit.emit(AuditEvent("unwrap", backings[i % len(backings)], "ok", 1, actor=actor, time=now - i))
    assert gov.audit.flush(600)


def scaling(gov: app_mod.Governance, home: Path, kept: dict[str, Face], rounds: int) -> None:
    """The pages that read the audit log, and the keys API, at larger logs (kept-alive);
    ``entries``: the log's size when a row starts (it grows by each request's decisions)."""
    steps = [("ui", "/ui/keys"), ("ui", "/ui/"), ("ui", "/ui/audit"), ("api", "/modelseal/v1/keys")]
    print(f"with a larger audit log (kept-alive, {rounds} samples per path; median ms):")
    print(f"  {'entries':>8} " + " ".join(f"{path:>20}" for _, path in steps) + "  keys ratio")
    for size in SIZES:
        top_up(gov, home, size)
        at = log_size(home)
        med = [p50_p95(ts)[0] for ts in measure(kept, steps, rounds).values()]
        print(f"  {at:8d} " + " ".join(f"{m:20.2f}" for m in med) + f"  {med[0] / med[3]:9.2f}x")


def p50_p95(ts: list[float]) -> tuple[float, float]:
    s = sorted(ts)
    return statistics.median(s) * 1e3, s[min(len(s) - 1, int(len(s) * 0.95))] * 1e3


def report(label: str, times: dict[str, list[float]]) -> None:
    fig = {path: p50_p95(ts) for path, ts in times.items()}
    ui_floor, api_floor = fig[CSS][0], fig[BASE][0]
    print(f"{label} ({len(times[CSS])} samples per path)")
    print(f"  {'path':28} {'median ms':>10} {'p95 ms':>8} {'over floor':>11}  ratio to the API")
    for console_path, api_path in ROWS:
        med, p95 = fig[console_path]
        ratio = f"{med / fig[api_path][0]:5.2f}x {api_path}" if api_path else "(no API counterpart)"
        print(f"  {console_path:28} {med:10.2f} {p95:8.2f} {med - ui_floor:11.2f}  {ratio}")
    for _, api_path in ROWS:
        if api_path:
            med, p95 = fig[api_path]
            print(f"  {api_path:28} {med:10.2f} {p95:8.2f} {med - api_floor:11.2f}")
    print(f"  {CSS + ' (floor)':28} {ui_floor:10.2f} {fig[CSS][1]:8.2f}")
    print(f"  {BASE + ' mTLS (floor)':28} {api_floor:10.2f} {fig[BASE][1]:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="30 samples per path")
    args = ap.parse_args()
    rounds = 30 if args.quick else args.samples
    work = Path(tempfile.mkdtemp(prefix="msconsole-"))
    try:
        env = make_env(work)
        p = make_pki(env)
        auditor = issue_dir(env, env.work / "user-audra", "user", "audra")
        with console_server(env, p, env.work / "data", Clock()) as (port, gov):
            gov.authz.cache_seconds = authz.CACHE_SECONDS  # as served (the test world turns the cache off)
            t = time.perf_counter()
            seed(gov)
            seeded = f"{KEYS} keys, {WRAPS} wraps, {UNWRAPS} unwraps, {APPROVALS} approvals"
            print(f"cores: {os.cpu_count()}; seeded {seeded} in {time.perf_counter() - t:.1f} s")
            cookie = sign_in(port, p, auditor)
            ca = p.server_dir / "ca.pem"
            new = {"ui": Face(port, ca, cookie=cookie), "api": Face(port, ca, cert_dir=auditor)}
            kept = {"ui": Face(port, ca, cookie=cookie, keep=True), "api": Face(port, ca, cert_dir=auditor, keep=True)}
            check_pages(new["ui"], new["api"])
            faces = {"ui": new["ui"], "api": new["api"], "ui+": kept["ui"], "api+": kept["api"]}
            # each path new, then kept alive, in the same round: both see the same log
            steps = [s for name, path in plan() for s in ((name, path), (name + "+", path))]
            assert gov.audit.flush(60)
            before, t = log_size(env.home), time.perf_counter()
            times = measure(faces, steps, rounds)
            assert gov.audit.flush(60)
            took, after = time.perf_counter() - t, log_size(env.home)
            report("new TLS connection per request", {path: times[name, path] for name, path in plan()})
            report("kept-alive connection per face", {path: times[name + "+", path] for name, path in plan()})
            conns = f"kept-alive: {kept['ui'].connects} console + {kept['api'].connects} API connections"
            print(f"audit log {before} -> {after} entries during the run ({took:.0f} s); {conns}")
            scaling(gov, env.home, kept, 10 if args.quick else 20)
            for f in kept.values():
                f.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
