"""The monitor inside a running ``modelseal serve`` (server.monitor_task), end to end: a burst of
failed handshakes from the test's own address goes through the workers' handshake recorder to
the shared ``netevents`` table, the monitor (one worker under the lease) reports it as an
``anomaly`` audit event and a stdout alert and, as configured, places a ``source`` hold, which
the decider then enforces: the next request from that address is refused."""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path

from modelseal.audit.log import MerkleAuditLog
from modelseal.governance.holds import CACHE_SECONDS, HoldStore
from modelseal.server import tls
from tests.conftest import Env
from tests.oci_helpers import Client
from tests.push_pull_helpers import make_pki, modelseal_serve

CONFIG = """
[monitor]
interval = 0.5
lease = 5
settle = 0.5
[monitor.detectors.correlated-intrusion]
hold = 0
[monitor.respond]
handshake-burst = "refuse-source"
"""


def _no_certificate(port: int, ca: Path) -> None:
    """One TLS connection without a client certificate: the server refuses its handshake."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(64)
    except (OSError, ssl.SSLError):
        pass
    finally:
        raw.close()


def _pull(client_dir: Path, port: int) -> tuple[int, str, str]:
    c = Client(tls.client_context(client_dir), port)  # a fresh connection: any worker
    try:
        r = c.request("GET", "/v2/models/llama/tags/list")
        return r.status, r.code(), r.body.decode(errors="replace")
    finally:
        c.close()


def test_a_burst_of_failed_handshakes_alerts_and_holds_the_source(env: Env) -> None:
    (env.home / "config.toml").write_text(CONFIG)
    os.chmod(env.home / "config.toml", 0o600)
    p = make_pki(env)
    data = env.work / "data"
    with modelseal_serve(env.work, p.server_dir, p.client_dir, "--data", str(data), "--workers", "2") as port:
        assert _pull(p.client_dir, port)[:2] == (404, "NAME_UNKNOWN")  # served: a reader, no such repository
        for _ in range(12):
            _no_certificate(port, p.server_dir / "ca.pem")
        holds = HoldStore.open(data / "governance.db")
        try:
            deadline = time.monotonic() + 60
            while not holds.active():
                assert time.monotonic() < deadline, (env.work / "serve.log").read_text()[-3000:]
                time.sleep(0.3)
            [hold] = holds.active()
        finally:
            holds.close()
        assert (hold.kind, hold.subject, hold.placed_by) == ("source", "127.0.0.1", "modelseal-monitor")
        assert hold.reason.startswith("handshake-burst: 10 failed handshakes from 127.0.0.1")
        time.sleep(CACHE_SECONDS + 0.5)  # every worker's view of the holds is re-read within the window
        status, code, body = _pull(p.client_dir, port)
        assert (status, code) == (403, "DENIED") and f"hold {hold.id}" in body
    events = MerkleAuditLog(env.home / "audit.db").events()
    mine = [e for e in events if e.get("actor") == "modelseal-monitor"]
    assert [(e["operation"], e["key"]) for e in mine] == [
        ("hold-place", f"hold:{hold.id}"),
        ("anomaly", "anomaly:handshake-burst"),
    ]
    assert mine[0]["result"].startswith("ok:source:127.0.0.1") and mine[1]["result"] == "alert:warning"
    anomaly = next(e for e in events if e["operation"] == "anomaly")
    assert anomaly["source"] == "127.0.0.1"
    denied = [e for e in events if e["operation"] == "authorize" and e["result"] == f"deny:hold:{hold.id}"]
    assert denied and denied[-1]["source"] == "127.0.0.1"
    log = (env.work / "serve.log").read_text()
    assert '"detector":"handshake-burst"' in log and '"action":"refuse-source"' in log  # the stdout alert
