"""Alert sinks: a signed webhook to a real local HTTPS receiver, verified with verify_webhook
(tampered, wrong-key, replayed and malformed deliveries refused), retries, a receiver that is
down or hangs never blocking send(), syslog to real UDP and unix sockets, the CLI."""

from __future__ import annotations

import datetime as dt
import http.server
import io
import ipaddress
import json
import logging
import os
import queue
import re
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from modelseal.cli import main
from modelseal.errors import WebhookSignatureError
from modelseal.keys.config import ConfigError
from modelseal.telemetry import alertsign
from modelseal.telemetry.alerting import (
    Alert,
    StdoutSink,
    SyslogSink,
    WebhookSink,
    new_alert,
    sinks_from_config,
    verify_webhook,
)
from modelseal.telemetry.webhook import parse_url
from tests.conftest import Env


def _cert(subject: str, issuer_key: ec.EllipticCurvePrivateKey | None, issuer: x509.Name | None, ca: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
    return key, b.sign(issuer_key or key, hashes.SHA256())


def _pem(obj: object) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    assert isinstance(obj, ec.EllipticCurvePrivateKey)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Receiver:
    url: str
    ca: Path
    got: queue.Queue[tuple[dict[str, str], bytes]]
    statuses: list[int] = field(default_factory=list)  # answered in turn; then 200


def _tls_dir(tmp: Path, tag: str) -> tuple[Path, Path, Path]:
    ca_key, ca = _cert(f"test receiver CA {tag}", None, None, True)
    key, cert = _cert("127.0.0.1", ca_key, ca.subject, False)
    paths = (tmp / f"ca-{tag}.pem", tmp / f"cert-{tag}.pem", tmp / f"key-{tag}.pem")
    for path, obj in zip(paths, (ca, cert, key), strict=True):
        path.write_bytes(_pem(obj))
    return paths


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A real HTTPS server on 127.0.0.1 with its own CA, recording every POST."""
    ca, cert, key = _tls_dir(tmp_path, "a")
    got: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
    state = Receiver("", ca, got)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.put((dict(self.headers.items()), body))
            self.send_response(state.statuses.pop(0) if state.statuses else 200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"https://127.0.0.1:{server.server_address[1]}/hooks/SECRET-TOKEN-123?x=1"
    yield state
    server.shutdown()
    server.server_close()


def _alert(**kw: object) -> Alert:
    base: dict[str, object] = {
        "detector": "unwrap-rate",
        "severity": "critical",
        "summary": "svc-a unwrapped 4000 data keys of prod-llm",
        "subject": {"identity": "spiffe://ms/prod/service/svc-a", "key": "prod-llm"},
        "evidence": (17, 18),
    }
    base.update(kw)
    return new_alert(**base)  # type: ignore[arg-type]


def _sink(url: str, key: Ed25519PrivateKey, **kw: object) -> WebhookSink:
    return WebhookSink(url, key, backoff=0.01, **kw)  # type: ignore[arg-type]


def test_webhook_delivery_is_signed_and_verifies(receiver: Receiver) -> None:
    key = Ed25519PrivateKey.generate()
    sink = _sink(receiver.url, key, ca_bundle=receiver.ca)
    alert = _alert()
    sink.send(alert)
    assert sink.flush(20)
    headers, body = receiver.got.get(timeout=5)
    assert sink.stats.delivered == 1 and sink.stats.failed == 0
    assert headers["Modelseal-Key-Id"] == alertsign.key_id(key.public_key())
    assert re.fullmatch(r"t=\d+,ed25519=[A-Za-z0-9+/]+=*", headers["Modelseal-Signature"])
    assert headers["Content-Type"] == "application/json"
    doc = verify_webhook(headers, body, key.public_key())
    assert doc == alert.to_dict() and doc["schema"] == "modelseal.alert/v1"
    # A receiver that trusts two keys (during a change) accepts it too.
    assert verify_webhook(headers, body, [Ed25519PrivateKey.generate().public_key(), key.public_key()]) == doc
    sink.close()


def test_verify_webhook_refuses_tampered_wrong_key_and_replayed() -> None:
    key = Ed25519PrivateKey.generate()
    body = _alert().to_json().encode()
    now = 1_800_000_000.0
    headers = alertsign.signature_headers(key, body, now)
    assert verify_webhook(headers, body, key.public_key(), now=now + 299)["detector"] == "unwrap-rate"
    tampered = body.replace(b"4000", b"4001")
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify_webhook(headers, tampered, key.public_key(), now=now)
    other = Ed25519PrivateKey.generate()
    with pytest.raises(WebhookSignatureError, match="not a trusted key"):
        verify_webhook(headers, body, other.public_key(), now=now)
    # An old delivery replayed, and one from a clock far ahead.
    with pytest.raises(WebhookSignatureError, match="ago, outside the 300 s window"):
        verify_webhook(headers, body, key.public_key(), now=now + 301)
    with pytest.raises(WebhookSignatureError, match="ahead"):
        verify_webhook(headers, body, key.public_key(), now=now - 400)
    # The timestamp is signed: moving it forward breaks the signature.
    t, _ = alertsign.parse_signature(headers["Modelseal-Signature"])
    moved = {**headers, "Modelseal-Signature": headers["Modelseal-Signature"].replace(f"t={t}", f"t={t + 300}")}
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify_webhook(moved, body, key.public_key(), now=now + 300)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "t=1",
        "ed25519=AAAA",
        "t=abc,ed25519=" + "A" * 88,
        "t=1,t=2,ed25519=" + "A" * 86 + "==",
        "t=1,v1=x",
        "x" * 2000,
    ],
)
def test_verify_webhook_refuses_malformed_headers(value: str) -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(WebhookSignatureError):
        verify_webhook({"Modelseal-Signature": value}, b"{}", key.public_key(), now=1.0)


def test_verify_webhook_refuses_missing_duplicate_headers_and_non_alerts() -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(WebhookSignatureError, match="no Modelseal-Signature"):
        verify_webhook({}, b"{}", key.public_key())
    body = _alert().to_json().encode()
    h = alertsign.signature_headers(key, body)
    with pytest.raises(WebhookSignatureError, match="more than once"):
        verify_webhook({**h, "modelseal-signature": h["Modelseal-Signature"]}, body, key.public_key())
    # Signed by the key, but not an alert: refused after the signature checks out.
    for other in (b'{"schema":"something/v1"}', b"[1,2]", b"not json"):
        with pytest.raises(WebhookSignatureError, match=r"not a modelseal\.alert|not valid JSON"):
            verify_webhook(alertsign.signature_headers(key, other), other, key.public_key())
    with pytest.raises(WebhookSignatureError, match="no trusted public key"):
        verify_webhook(h, body, [])


def test_webhook_retries_a_5xx_with_a_fresh_signature_and_gives_up_on_a_4xx(receiver: Receiver) -> None:
    key = Ed25519PrivateKey.generate()
    clock = iter(range(1_800_000_000, 1_800_001_000, 10))
    sink = _sink(receiver.url, key, ca_bundle=receiver.ca, clock=lambda: float(next(clock)))
    receiver.statuses[:] = [503, 429]
    sink.send(_alert())
    assert sink.flush(20)
    attempts = [receiver.got.get(timeout=5) for _ in range(3)]
    assert sink.stats.delivered == 1
    stamps = [alertsign.parse_signature(h["Modelseal-Signature"])[0] for h, _ in attempts]
    assert len(set(stamps)) == 3 and len({b for _, b in attempts}) == 1  # same body, signed again each time
    for (h, b), t in zip(attempts, stamps, strict=True):
        verify_webhook(h, b, key.public_key(), now=t)
    receiver.statuses[:] = [400]
    sink.send(_alert())
    assert sink.flush(20)
    receiver.got.get(timeout=5)
    assert sink.stats.failed == 1 and sink.stats.last_error == "HTTP 400"
    assert receiver.got.empty()  # a 4xx is not retried
    sink.close()


def test_a_receiver_that_is_down_fails_without_blocking_or_leaking(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    sink = _sink(f"http://127.0.0.1:{port}/hooks/SECRET-TOKEN-123", Ed25519PrivateKey.generate(), retries=2)
    alert = _alert()
    with caplog.at_level(logging.WARNING, logger="modelseal.telemetry"):
        sink.send(alert)
        assert sink.flush(20)
    assert sink.stats.failed == 1 and sink.stats.delivered == 0
    assert sink.stats.last_error == "ConnectionRefusedError"
    assert "not delivered to the alert webhook at 127.0.0.1" in caplog.text
    assert "SECRET-TOKEN" not in caplog.text and alert.summary not in caplog.text and "unwrap" not in caplog.text
    sink.close()


def test_a_hanging_receiver_never_blocks_send_and_the_full_queue_drops_oldest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The receiver accepts the connection and never answers: the worker waits in the TLS
    handshake while ten sends return; a queue of three keeps the newest and counts the rest."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    try:
        sink = _sink(
            f"https://127.0.0.1:{hung.getsockname()[1]}/",
            Ed25519PrivateKey.generate(),
            timeout=1.0,
            retries=0,
            queue_size=3,
        )
        with caplog.at_level(logging.WARNING, logger="modelseal.telemetry"):
            for i in range(10):
                sink.send(_alert(summary=f"alert {i}"))
            stats = sink.stats
        assert stats.delivered == 0 and stats.dropped >= 6  # ten sent: at most 3 queued and 1 in flight
        assert caplog.text.count("dropped: the queue of the alert webhook to 127.0.0.1 is full") == 1  # throttled
        sink.close(timeout=0)
        assert sink._thread is not None
        sink._thread.join(30)  # the attempt in flight ends at its 1 s timeout
        assert sink.stats.delivered == 0
        assert sink.stats.dropped + sink.stats.failed == 10
    finally:
        hung.close()


def test_webhook_tls_is_verified(receiver: Receiver, tmp_path: Path) -> None:
    other_ca, _, _ = _tls_dir(tmp_path, "other")
    for sink in (
        _sink(receiver.url, Ed25519PrivateKey.generate(), ca_bundle=other_ca, retries=0),
        _sink(receiver.url, Ed25519PrivateKey.generate(), retries=0),  # the system's CAs
    ):
        sink.send(_alert())
        assert sink.flush(20)
        assert sink.stats.failed == 1 and sink.stats.last_error == "SSLCertVerificationError"
        sink.close()
    assert receiver.got.empty()


@pytest.mark.parametrize(
    "url",
    ["http://example.com/hook", "https://user:pw@example.com/", "ftp://example.com/", "https://", "https://h/#f", 7],
)
def test_webhook_urls_refused(url: object) -> None:
    with pytest.raises(ConfigError):
        parse_url(url)


def test_webhook_urls_accepted() -> None:
    assert parse_url("http://127.0.0.1:8080/relay").https is False
    t = parse_url("https://soc.example.com/hooks/abc?token=1")
    assert (t.host, t.port, t.path) == ("soc.example.com", 443, "/hooks/abc?token=1")
    assert parse_url("http://[::1]:9/").host == "::1"


def test_signing_key_file_rules(tmp_path: Path) -> None:
    path = tmp_path / "alert.pem"
    key = alertsign.generate_signing_key(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert alertsign.key_id(alertsign.load_signing_key(path).public_key()) == alertsign.key_id(key.public_key())
    with pytest.raises(ConfigError, match="already exists"):
        alertsign.generate_signing_key(path)
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        alertsign.load_signing_key(path)
    os.chmod(path, 0o600)
    link = tmp_path / "link.pem"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match="cannot open"):
        alertsign.load_signing_key(link)
    ec_path = tmp_path / "ec.pem"
    ec_path.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    os.chmod(ec_path, 0o600)
    with pytest.raises(ConfigError, match="not an unencrypted Ed25519"):
        alertsign.load_signing_key(ec_path)


def _syslog_line(data: bytes) -> tuple[int, str, dict[str, object]]:
    m = re.fullmatch(rb"<(\d+)>1 (\S+) (\S+) modelseal (\d+) (\S+) - (.*)", data)
    assert m, data
    return int(m[1]), m[5].decode(), json.loads(m[6])


def test_syslog_sink_udp_and_unix_socket(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(10)
        sink = SyslogSink(("127.0.0.1", udp.getsockname()[1]), "local3")
        warning, critical = _alert(severity="warning"), _alert()
        sink.send(warning)
        sink.send(critical)
        got = [_syslog_line(udp.recv(65536)) for _ in range(2)]
        sink.close()
    # PRI = facility * 8 + severity: local3 is 19, warning 4, critical 2.
    assert got == [(19 * 8 + 4, "alert", warning.to_dict()), (19 * 8 + 2, "alert", critical.to_dict())]
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix:
        unix.bind(str(path))
        unix.settimeout(10)
        sink = SyslogSink(str(path))
        sink.send(warning)
        assert _syslog_line(unix.recv(65536)) == (4 * 8 + 4, "alert", warning.to_dict())  # auth, the default
        sink.close()
    # No receiver (the daemon restarting): as the stdlib's openlog, sending is retried at
    # each message, and a message that cannot go is counted and logged, never raised.
    sink = SyslogSink(str(tmp_path / "nothing.sock"))
    with caplog.at_level(logging.WARNING, logger="modelseal.telemetry"):
        sink.send(warning)
        sink.send(warning)
    assert sink.writer.failures.total == 2
    assert caplog.text.count("syslog: 1 message(s) not sent (latest: FileNotFoundError)") == 1
    assert "unwrap" not in caplog.text


def test_alert_fields_are_checked_and_bounded() -> None:
    a = _alert(summary="line one\nline two\x1b[31m" + "x" * 1000, subject={"source": "10.0.0.1\r\nX-Injected: 1"})
    assert "\n" not in a.summary and "\x1b" not in a.summary and len(a.summary) == 300
    assert a.subject == {"source": "10.0.0.1  X-Injected: 1"}
    line = a.to_json()
    assert "\n" not in line and json.loads(line)["evidence"] == [17, 18]
    for bad in (
        {"severity": "info"},
        {"action": "delete-everything"},
        {"subject": {"path": "/etc"}},
        {"detector": "Bad Name"},
    ):
        with pytest.raises(ValueError):
            _alert(**bad)


def test_stdout_sink_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sinks = sinks_from_config({})
    assert [type(s) for s in sinks] == [StdoutSink]
    a = _alert()
    sinks[0].send(a)
    assert json.loads(capsys.readouterr().out) == a.to_dict()
    key = tmp_path / "k.pem"
    alertsign.generate_signing_key(key)
    both = sinks_from_config(
        {"syslog": "127.0.0.1:5514", "webhook": [{"url": "https://soc.example.com/h", "signing_key": "k.pem"}]},
        home=tmp_path,
    )
    assert [type(s) for s in both] == [SyslogSink, WebhookSink]  # stdout off unless asked for
    assert [type(s) for s in sinks_from_config({"stdout": True, "syslog": {"address": "127.0.0.1:5514"}})] == [
        StdoutSink,
        SyslogSink,
    ]
    for bad in (
        {"webhok": {}},
        {"stdout": "yes"},
        {"webhook": {"url": "https://x.example/"}},
        {"webhook": {"url": "https://x.example/", "signing_key": "k.pem", "retries": 99}},
        {"syslog": {"address": "localhost"}},
        {"syslog": {"address": "/dev/log", "facility": "nope"}},
    ):
        with pytest.raises(ConfigError):
            sinks_from_config(bad, home=tmp_path)


def test_cli_keygen_verify_and_test(
    env: Env, receiver: Receiver, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key_path = env.home / "alert-signing.pem"
    assert main(["alerts", "keygen", "--out", str(key_path)]) == 0
    out = capsys.readouterr()
    public = env.work / "alerts.pub"
    public.write_text(out.out)
    key = alertsign.load_signing_key(key_path)
    assert alertsign.public_pem(key) == out.out and alertsign.key_id(key.public_key()) in out.err
    assert main(["alerts", "keygen", "--out", str(key_path)]) == 2  # exists: one line, not replaced
    assert "already exists" in capsys.readouterr().err

    body = _alert().to_json().encode()
    header = alertsign.signature_headers(key, body)["Modelseal-Signature"]
    for data, code in ((body, 0), (body + b" ", 20)):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        assert main(["alerts", "verify", "--public-key", str(public), "--signature-header", header]) == code
    out = capsys.readouterr()
    assert json.loads(out.out.splitlines()[0])["detector"] == "unwrap-rate"
    assert out.err.count("\n") == 1 and "does not match" in out.err

    config = env.home / "config.toml"
    config.write_text(
        f'[monitor.alerts]\nstdout = true\n[monitor.alerts.webhook]\nurl = "{receiver.url}"\n'
        f'signing_key = "alert-signing.pem"\nca_bundle = "{receiver.ca}"\n'
    )
    config.chmod(0o600)
    assert main(["alerts", "test"]) == 0
    out = capsys.readouterr().out
    assert "webhook 127.0.0.1: delivered" in out and "stdout: written" in out
    headers, got = receiver.got.get(timeout=5)
    assert verify_webhook(headers, got, alertsign.load_public_key(public.read_bytes()))["detector"] == "test"
    config.write_text(
        f'[monitor.alerts.webhook]\nurl = "{receiver.url}"\nsigning_key = "alert-signing.pem"\nretries = 0\n'
    )
    assert main(["alerts", "test"]) == 1  # the system's CAs do not know the receiver's
    assert "NOT delivered (SSLCertVerificationError)" in capsys.readouterr().out
