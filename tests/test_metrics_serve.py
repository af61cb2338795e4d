"""Metrics of a running ``modelseal serve`` (docs/monitoring.md): two workers, scraped over
mutual TLS as an identity bound to role ``metrics`` and over the loopback listener of the
parent, before and after real operations: a signed push and pull, a broker wrap (a key
operation), refused handshakes (no client certificate, a TLS 1.2 client, an expired
certificate) and certificate refusals of the middleware (revoked, wrong environment). The
figures move by exactly what was done, whichever worker took each connection (the
multi-process aggregation); a reader without the role gets 403; ``promtool check metrics``
passes on the scrape; no label value is an identity, an artifact digest or an address.
A non-loopback ``--metrics-listen`` is refused at start. The run's multi-process directory
is under ``--data`` (0700, locked), and a killed worker's replacement counts on in the same
files: the totals keep the dead worker's counts and no file is added per death.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

import modelseal
from modelseal import registry
from modelseal.governance.holds import HoldStore
from modelseal.governance.model import Binding
from modelseal.governance.store import GovStore, open_target
from modelseal.pki import ca as pki_ca
from modelseal.pki import denylist
from modelseal.pki.identity import Identity
from modelseal.server import tls
from modelseal.signing.signers import P256, PemSigner, generate, private_pem
from modelseal.signing.trust import load_policy
from tests.conftest import Env
from tests.push_pull_helpers import TD, Pki, issue_dir, make_pki, modelseal_serve
from tests.services import free_port

PROMTOOL = "/usr/bin/promtool"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(ctx: ssl.SSLContext, port: int) -> tuple[int, str, str]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def handshake(ctx: ssl.SSLContext, port: int) -> str:
    """One TLS connection with ``ctx`` and a GET /v2/: the status, or the client's error."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
        ):
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return s.recv(64).decode(errors="replace")[:12] or "closed"
    except (OSError, ssl.SSLError) as e:
        return type(e).__name__


def bare(pki: Pki, low: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = low
    ctx.load_verify_locations(cafile=pki.server_dir / "ca.pem")
    return ctx


@dataclass
class Served:
    env: Env
    pki: Pki
    port: int
    metrics_port: int
    prom: ssl.SSLContext
    policy: Path
    signer: Path


@pytest.fixture
def served(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.setenv("MODELSEAL_CACHE", str(env.work / "cache"))
    env.svc.create("broker-kek")
    (env.home / "config.toml").write_text(
        '[broker.keys.tk]\nkey = "local:broker-kek"\nenv = "prod"\n'
        "[monitor]\nmetrics_interval = 1\nverify_interval = 1\nscan_interval = 1\n"
    )
    os.chmod(env.home / "config.toml", 0o600)
    pki = make_pki(env)
    prom_dir = issue_dir(env, env.work / "prom-tls", "service", "prometheus")
    data = env.work / "serve-data"
    store = GovStore.open(open_target(data, None))
    uri = Identity.of(TD, "prod", "service", "prometheus").uri
    store.bind(Binding("", uri, "metrics", "prod", time.time() + 86400), by="tests")
    store.close()
    s = generate(P256)
    signer = env.work / "release.pem"
    signer.write_bytes(private_pem(s, None))
    (env.work / "release.pub").write_text(s.public.pem())
    policy = env.work / "trust.toml"
    policy.write_text(
        'version = 1\nstrict = true\n[signers.release]\nkeys = ["' + str(env.work / "release.pub") + '"]\n'
        '[[rules]]\nartifacts = ["*"]\nenvironments = ["*"]\nsigners = ["release"]\n'
    )
    os.chmod(policy, 0o600)
    mport = free_port()
    args = ("--data", str(data), "--workers", "2", "--metrics-listen", f"127.0.0.1:{mport}")
    with modelseal_serve(env.work, pki.server_dir, pki.client_dir, *args) as port:
        yield Served(env, pki, port, mport, tls.client_context(prom_dir), policy, signer)


def wait_for(srv: Served, name: str) -> Samples:
    """Scrape until ``name`` appears (the background pass of worker 0 runs every second)."""
    deadline = time.monotonic() + 30
    while True:
        status, _, body = scrape(srv.prom, srv.port)
        assert status == 200, body[:300]
        got = parse(body)
        if any(k[0] == name for k in got):
            return got
        assert time.monotonic() < deadline, f"{name} never appeared:\n{body[-2000:]}"
        time.sleep(0.3)


def broker_wrap(srv: Served) -> int:
    body = json.dumps({"key": "tk", "dek": base64.b64encode(os.urandom(32)).decode(), "context": {"env": "prod"}})
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=tls.client_context(srv.pki.client_dir))
    try:
        conn.request("POST", "/modelseal/v1/keys/wrap", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_figures_move_with_real_operations(served: Served) -> None:
    srv, env = served, served.env
    before = wait_for(srv, "modelseal_audit_log_verified")
    assert value(before, "modelseal_build_info", version=modelseal.__version__) == 1
    assert value(before, "modelseal_audit_log_verified") == 1
    assert value(before, "modelseal_key_cryptoperiod_seconds", key="broker:tk") == 365 * 86400
    assert 0 <= value(before, "modelseal_key_version_age_seconds", key="broker:tk") < 3600
    for role in ("server", "ca"):
        expiry = value(before, "modelseal_certificate_expiry_timestamp_seconds", role=role)
        start = value(before, "modelseal_certificate_not_before_timestamp_seconds", role=role)
        assert start < time.time() < expiry, role

    # A signed push and pull (authorized decisions), a key operation through the broker.
    src = env.work / "w.bin"
    src.write_bytes(os.urandom(1 << 20))
    art = env.work / "w.sealed"
    modelseal.seal(src, art, "local:test-kek", keys=env.svc, sign_key=PemSigner.from_file(srv.signer), name="w")
    kw = {"tls_dir": srv.pki.client_dir, "pins": srv.pki.pins()}
    pushed = registry.push(art, f"127.0.0.1:{srv.port}/team/w:v1", **kw)  # type: ignore[arg-type]
    registry.pull(f"127.0.0.1:{srv.port}/team/w:v1", env.work / "p.sealed", verify=load_policy(srv.policy), **kw)  # type: ignore[arg-type]
    assert broker_wrap(srv) == 200
    # Refused handshakes, spread over both workers, and refusals of the middleware.
    for _ in range(5):
        assert "HTTP/1.1 200" not in handshake(bare(srv.pki), srv.port)  # no client certificate
    old = issue_dir(
        env, env.work / "old", "service", "old", now=pki_ca.utcnow() - dt.timedelta(hours=3), ttl=dt.timedelta(hours=1)
    )
    assert "HTTP/1.1 200" not in handshake(tls.client_context(old), srv.port)
    tls12 = bare(srv.pki, ssl.TLSVersion.TLSv1_2)
    tls12.load_cert_chain(srv.pki.client_dir / "cert.pem", srv.pki.client_dir / "key.pem")
    assert "HTTP/1.1 200" not in handshake(tls12, srv.port)
    fresh = issue_dir(env, env.work / "fresh", "service", "freshsvc")
    revoked = issue_dir(env, env.work / "revoked", "service", "gone")
    serial = x509.load_pem_x509_certificate((revoked / "cert.pem").read_bytes()).serial_number
    denylist.add(serial, "test", None)
    assert handshake(tls.client_context(revoked), srv.port).startswith("HTTP/1.1 403")
    wrong_env = issue_dir_env(env, "dev")
    assert handshake(tls.client_context(wrong_env), srv.port).startswith("HTTP/1.1 403")
    assert handshake(tls.client_context(fresh), srv.port).startswith("HTTP/1.1 200")

    holds = HoldStore.open(open_target(env.work / "serve-data", None))
    holds.place("identity", Identity.of(TD, "prod", "service", "suspect").uri, "tests", "tests")
    holds.close()
    assert value(before, "modelseal_holds", kind="identity") == 0
    deadline = time.monotonic() + 30  # the next passes (every second): the pushed artifact, the hold
    while True:
        status, content_type, body = scrape(srv.prom, srv.port)
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        after = parse(body)
        if (
            value(after, "modelseal_holds", kind="identity") == 1
            and value(after, "modelseal_artifacts", state="sealed-signed") == 1
        ):
            break
        assert time.monotonic() < deadline, body[-3000:]
        time.sleep(0.3)
    assert value(after, "modelseal_artifacts", state="plaintext") == 0

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("modelseal_tls_handshake_failures_total", reason="no-certificate") == 5
    assert moved("modelseal_tls_handshake_failures_total", reason="expired") == 1
    assert moved("modelseal_tls_handshake_failures_total", reason="protocol-version") == 1
    assert moved("modelseal_tls_handshake_failures_total", reason="revoked") == 1
    assert moved("modelseal_tls_handshake_failures_total", reason="wrong-environment") == 1
    assert moved("modelseal_expired_credentials_total", kind="certificate") == 1
    assert moved("modelseal_tls_handshakes_total", version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384") >= 4
    assert moved("modelseal_key_operations_total", op="wrap", result="ok") == 1
    assert moved("modelseal_kms_request_duration_seconds_count", provider="local") == 1
    assert moved("modelseal_authz_decisions_total", result="allow", policy="role-publisher") >= 2
    assert moved("modelseal_authz_decisions_total", result="allow", policy="role-reader") >= 2
    assert moved("modelseal_authz_decisions_total", result="allow", policy="role-metrics") >= 1  # the scrapes'

    # The loopback listener of the parent serves the same aggregated counters (plain HTTP).
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=20) as r:
        plain = parse(r.read().decode())
    for key in [k for k in after if k[0] == "modelseal_tls_handshake_failures_total"]:
        assert plain[key] == after[key], key
    assert value(plain, "modelseal_audit_log_verified") == 1

    # A reader without the metrics role is refused, and that is a counted decision too.
    status, _, body = scrape(tls.client_context(srv.pki.client_dir), srv.port)
    assert status == 403, body[:300]

    # Naming: promtool's lint passes on the scrape as served.
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=body_of(srv), capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    # No label value names an identity, an artifact or an address.
    forbidden = [
        "spiffe://",
        "trainer",
        "prometheus",
        "suspect",
        "freshsvc",
        "elsewhere",
        "127.0.0.1",
        pushed.digest,
        pushed.digest[7:],
    ]
    values = {v for (_, labels) in after for _, v in labels} | {v for (_, labels) in plain for _, v in labels}
    assert values, "no labels at all"
    assert not [v for v in values for f in forbidden if f in v], values


def issue_dir_env(env: Env, envname: str) -> Path:
    from modelseal.pki import issue

    issued = issue.issue(env.svc, Identity.of(TD, envname, "service", "elsewhere"))
    folder = env.work / f"env-{envname}"
    issue.write_dir(issued, folder, force=True)
    return folder


def body_of(srv: Served) -> str:
    status, _, body = scrape(srv.prom, srv.port)
    assert status == 200
    return body


def test_a_non_loopback_metrics_listener_is_refused_at_start(env: Env) -> None:
    pki = make_pki(env)
    cmd = [sys.executable, "-m", "modelseal.cli", "serve", "--listen", f"127.0.0.1:{free_port()}"]
    cmd += ["--tls-dir", str(pki.server_dir), "--data", str(env.work / "d"), "--metrics-listen", "0.0.0.0:9464"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a loopback address" in lines[0], done.stderr


def children(pid: int) -> list[int]:
    try:
        return sorted(int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except FileNotFoundError:
        return []


def no_certificate(srv: Served, at_least: float) -> float:
    """Scrape until the no-certificate failures reach ``at_least`` (the workers count them
    as the handshake fails, the client may see it first)."""
    deadline = time.monotonic() + 30
    while True:
        got = value(parse(body_of(srv)), "modelseal_tls_handshake_failures_total", reason="no-certificate")
        if got >= at_least:
            return got
        assert time.monotonic() < deadline, got
        time.sleep(0.2)


def test_a_replacement_worker_counts_on_in_its_predecessors_files(served: Served) -> None:
    srv = served
    root = srv.env.work / "serve-data" / "metrics-run"
    (run,) = [p for p in root.iterdir() if p.name.startswith("modelseal-metrics-")]
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and stat.S_IMODE(run.stat().st_mode) == 0o700
    assert (run / ".lock").is_file()
    parent = int(run.name.split("-")[2])
    workers = children(parent)
    assert len(workers) == 2, workers
    start = no_certificate(srv, 0)
    for _ in range(3):
        assert "HTTP/1.1 200" not in handshake(bare(srv.pki), srv.port)
    before = no_certificate(srv, start + 3)
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not (len(now := children(parent)) == 2 and workers[0] not in now):
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    for _ in range(3):
        assert "HTTP/1.1 200" not in handshake(bare(srv.pki), srv.port)
    assert no_certificate(srv, before + 3) == before + 3  # the dead worker's counts are still in the total
    names = sorted(p.name for p in run.iterdir() if p.suffix == ".db")
    expected = [f"counter_{parent}.db", "counter_w0.db", "counter_w1.db", "histogram_w0.db", "histogram_w1.db"]
    assert names == sorted(expected), names  # one pair per worker index, none per pid
