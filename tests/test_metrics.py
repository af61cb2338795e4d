"""Metrics in one process (docs/monitoring.md): ``modelseal metrics --textfile`` from the
local state (parsed back, linted by promtool, written atomically, bad input refused in one
line), the counting of audit events with bounded labels (a forged audit row cannot mint a
label), the observation hooks (key provider durations, signature verification results),
the pass snapshot's liveness, and the loopback listener's address rule and HTTP answers.
The running server is tests/test_metrics_serve.py.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import modelseal
from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog
from modelseal.cli import main
from modelseal.errors import ModelsealError, VerificationError
from modelseal.keys.service import KeyService
from modelseal.server.metrics_listen import MetricsListener, loopback
from modelseal.signing.signers import P256, generate
from modelseal.signing.trust import TrustPolicy
from modelseal.telemetry import collect, feed, metrics
from tests.conftest import Env
from tests.push_pull_helpers import make_pki

PROMTOOL = "/usr/bin/promtool"


def families(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_textfile_reports_the_local_state_atomically(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    svc = KeyService(sink=MerkleAuditLog(env.home / "audit.db"))
    svc.create("local:prod-kek")
    svc.rotate("local:prod-kek")
    svc.sink.emit(AuditEvent("pin-mismatch", "registry:127.0.0.1:1", "PinMismatch", None, "ab" * 32))
    with pytest.raises(ModelsealError):
        svc.rotate("local:no-such-key")  # a failed key operation: counted by its error class
    pki = make_pki(env)
    out = env.work / "textfile" / "modelseal.prom"
    out.parent.mkdir()
    out.write_text("stale\n")
    stale = open(out)  # noqa: SIM115 - the old inode must keep its bytes: the file is replaced, not rewritten
    try:
        assert main(["metrics", "--textfile", str(out), "--tls-dir", str(pki.client_dir)]) == 0
        assert stale.read() == "stale\n"
    finally:
        stale.close()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert sorted(p.name for p in out.parent.iterdir()) == ["modelseal.prom"]  # no temporary left
    text = out.read_text()
    got = families(text)
    assert got[("modelseal_key_operations_total", (("op", "create"), ("result", "ok")))] == 1
    assert got[("modelseal_key_operations_total", (("op", "rotate"), ("result", "ok")))] == 1
    assert got[("modelseal_key_operations_total", (("op", "rotate"), ("result", "KeyNotFound")))] == 1
    assert got[("modelseal_pin_mismatches_total", ())] == 1
    assert got[("modelseal_audit_log_verified", ())] == 1
    assert got[("modelseal_key_cryptoperiod_seconds", (("key", "local:prod-kek"),))] == 365 * 86400
    assert 0 <= got[("modelseal_key_version_age_seconds", (("key", "local:prod-kek"),))] < 3600
    for role in ("client", "ca"):
        assert got[("modelseal_certificate_expiry_timestamp_seconds", (("role", role),))] > time.time()
    assert ("modelseal_certificate_expiry_timestamp_seconds", (("role", "server"),)) not in got
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # A second run counts the log again, not on top of the first (figures are the log's).
    assert main(["metrics", "--textfile", str(out), "--tls-dir", str(pki.client_dir)]) == 0
    assert families(out.read_text())[("modelseal_key_operations_total", (("op", "create"), ("result", "ok")))] == 1


@pytest.mark.parametrize(
    ("name", "why"), [("m.txt", "only *.prom"), ("missing/m.prom", "is not a folder"), ("dir.prom", "is a folder")]
)
def test_textfile_bad_input_is_one_line(env: Env, capsys: pytest.CaptureFixture[str], name: str, why: str) -> None:
    (env.work / "dir.prom").mkdir()
    assert main(["metrics", "--textfile", str(env.work / name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0], err


def test_a_forged_audit_row_mints_no_label() -> None:
    tally = feed.Tally()
    tally.add({"operation": "unwrap", "result": "spiffe://example.org/prod/user/mallory"})
    tally.add({"operation": "unwrap", "result": "NotAnErrorClass"})
    tally.add({"operation": "spiffe://x", "result": "ok"})  # not a key operation: nothing
    tally.add({"operation": "authorize", "result": "allow:role-reader,has space,x" + "y" * 100})
    tally.add({"operation": "authorize", "result": "deny:hold:3f2a9c1e"})
    tally.add({"operation": "authorize", "result": "allow-exception:tests-local-keys"})
    tally.add({"operation": "authorize", "result": "deny:default"})
    got = {(f.name, tuple(sorted(s.labels.items()))): s.value for f in tally.families() for s in f.samples}
    assert got == {
        ("modelseal_key_operations", (("op", "unwrap"), ("result", "other"))): 2,
        ("modelseal_authz_decisions", (("policy", "role-reader"), ("result", "allow"))): 1,
        ("modelseal_authz_decisions", (("policy", "other"), ("result", "allow"))): 2,
        ("modelseal_authz_decisions", (("policy", "hold"), ("result", "deny"))): 1,
        ("modelseal_authz_decisions", (("policy", "tests-local-keys"), ("result", "allow"))): 1,
        ("modelseal_authz_decisions", (("policy", "default"), ("result", "deny"))): 1,
    }


def test_counting_sink_counts_what_it_wrote_and_never_asks_a_store(env: Env) -> None:
    log = MerkleAuditLog(env.home / "audit.db")
    sink = feed.CountingSink(log)
    before = sample("modelseal_expired_credentials_total", kind="grant")
    glass = sample("modelseal_break_glass_uses_total")
    denied = sample("modelseal_authz_decisions_total", result="deny", policy="default")
    sink.emit_many(
        [
            AuditEvent("authorize", "pull Repository:a", "deny:default", actor="spiffe://e/prod/service/lapsed"),
            AuditEvent("authorize", "pull Repository:a", "deny:default", actor="spiffe://e/prod/service/other"),
            AuditEvent("break-glass-use", "pull Repository:a", "allow:b1", actor="spiffe://e/prod/user/x"),
        ]
    )
    assert sample("modelseal_authz_decisions_total", result="deny", policy="default") == denied + 2
    assert sample("modelseal_break_glass_uses_total") == glass + 1
    # An expired grant is the decider's to count (server.authz): the writer's thread asks no store.
    assert sample("modelseal_expired_credentials_total", kind="grant") == before
    assert len(log.events()) == 3 and sink.verify().ok  # the wrapped log, written and still whole


def test_key_provider_durations_and_signature_results(env: Env) -> None:
    feed.install_hooks()
    kms = sample("modelseal_kms_request_duration_seconds_count", provider="local")
    env.svc.wrap("local:test-kek", os.urandom(32), (("env", "dev"),))
    assert sample("modelseal_kms_request_duration_seconds_count", provider="local") == kms + 1
    signer, other = generate(P256), generate(P256)
    src = env.work / "w.bin"
    src.write_bytes(os.urandom(4096))
    signed, unsigned = env.work / "s.sealed", env.work / "u.sealed"
    modelseal.seal(src, signed, "local:test-kek", keys=env.svc, sign_key=signer, name="w")
    modelseal.seal(src, unsigned, "local:test-kek", keys=env.svc)
    trusted = TrustPolicy.from_keys([signer.public], strict=True)
    stranger = TrustPolicy.from_keys([other.public], strict=True)
    counts = {r: sample("modelseal_signature_verifications_total", result=r) for r in metrics.SIGNATURE_RESULTS}
    modelseal.verify_artifact(signed, trusted)
    for path, policy in ((signed, stranger), (unsigned, trusted)):
        with pytest.raises(VerificationError):
            modelseal.verify_artifact(path, policy)
    data = bytearray(signed.read_bytes())
    data[-100] ^= 1
    signed.write_bytes(bytes(data))
    with pytest.raises(VerificationError):
        modelseal.verify_artifact(signed, trusted)
    moved = {r: sample("modelseal_signature_verifications_total", result=r) - counts[r] for r in counts}
    assert moved == {"verified": 1, "untrusted": 1, "invalid": 1, "missing": 1, "revoked": 0, "error": 0}


def test_a_snapshot_of_a_dead_writer_is_ignored(tmp_path: Path) -> None:
    fam = collect.Family("modelseal_holds", "h", ("kind",), ((("key",), 2.0),))
    collect.write_snapshot([fam], str(tmp_path))
    assert collect.read_snapshot(str(tmp_path)) == [fam]
    child = subprocess.Popen(["true"])
    child.wait()  # a pid that is gone
    doc = (tmp_path / collect.SNAPSHOT).read_text().replace(f'"pid":{os.getpid()}', f'"pid":{child.pid}')
    (tmp_path / collect.SNAPSHOT).write_text(doc)
    assert collect.read_snapshot(str(tmp_path)) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_loopback_addresses_are_accepted(host: str) -> None:
    assert loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "192.168.0.1", "example.com", "::ffff:10.0.0.1"])
def test_other_addresses_are_refused(host: str) -> None:
    with pytest.raises(ModelsealError):
        loopback(host)


def _ask(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_loopback_listener_answers_get_metrics_only_and_a_silent_client_blocks_nothing() -> None:
    listener = MetricsListener("127.0.0.1", 0, collect.ScrapeCollector())
    port = int(listener.address.rsplit(":", 1)[1])
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            listener.poll(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    silent = socket.create_connection(("127.0.0.1", port))  # connects and never sends a byte
    try:
        host = f"Host: 127.0.0.1:{port}\r\n".encode()
        ok = _ask(port, b"GET /metrics HTTP/1.1\r\n" + host + b"\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK") and b"modelseal_build_info" in ok
        assert _ask(port, b"POST /metrics HTTP/1.1\r\n" + host + b"\r\n").startswith(b"HTTP/1.1 405")
        assert _ask(port, b"GET /v2/ HTTP/1.1\r\n" + host + b"\r\n").startswith(b"HTTP/1.1 404")
        assert _ask(port, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    finally:
        silent.close()
        stop.set()
        t.join()
        listener.close()
