"""The server renews its own certificate with no restart and no dropped connection
(issue 12, section 1; docs/serve.md, "Renewal").

A short-lived certificate is made with the ``now=`` that ``pki.issue.issue`` already takes:
issued 90 s in the past with the minimum lifetime (5 min, plus the CA's 5 min back-dating),
so two thirds of its lifetime fall about 10 s after the server starts. No test-only setting
reaches the server: it runs as ``modelseal serve`` with two workers.
"""

from __future__ import annotations

import datetime as dt
import http.client
import os
import socket
import ssl
import time
from pathlib import Path

from cryptography import x509

from modelseal.pki import ca as pki_ca
from modelseal.pki import issue
from modelseal.pki.identity import Identity
from modelseal.server import renewal
from tests.conftest import Env
from tests.test_serve_tls import TD, client, make_dir, request, running

SHORT = dt.timedelta(minutes=5)


def served_serial(ctx: ssl.SSLContext, port: int) -> int:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der).serial_number


def short_lived_server_dir(env: Env) -> Path:
    return make_dir(
        env,
        env.work / "server-tls",
        "server",
        "registry",
        ips=["127.0.0.1"],
        ttl=SHORT,
        now=pki_ca.utcnow() - dt.timedelta(seconds=90),
    )


def wait_for_new_serial(ctx: ssl.SSLContext, port: int, old: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (serial := served_serial(ctx, port)) == old:
        assert time.monotonic() < deadline, "the server certificate was not renewed"
        time.sleep(0.5)
    return serial


def test_due_at_two_thirds_of_the_lifetime(env: Env) -> None:
    pki_ca.init_ca(env.svc, TD)
    leaf = issue.read_chain(make_dir(env, env.work / "c", "service", "x", ttl=dt.timedelta(hours=3)))[0]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert renewal.due_at(leaf) == leaf.not_valid_before_utc + lifetime * 2 / 3
    assert leaf.not_valid_before_utc < renewal.due_at(leaf) < leaf.not_valid_after_utc


def test_server_renews_itself_through_the_local_ca_keeping_open_connections(env: Env) -> None:
    pki_ca.init_ca(env.svc, TD)
    tls_dir = short_lived_server_dir(env)
    first = issue.read_chain(tls_dir)[0]
    server_uri = Identity.of(TD, "prod", "server", "registry").uri
    with running(env, tls_dir) as server:
        ctx = client(env, "longlived")
        assert served_serial(ctx, server.port) == first.serial_number
        kept = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=10)
        kept.request("GET", "/v2/")
        assert kept.getresponse().read() == b"{}"
        new = wait_for_new_serial(ctx, server.port, first.serial_number, timeout=60)
        renewed = issue.read_chain(tls_dir)[0]
        assert renewed.serial_number == new  # what the folder holds is what is served
        assert renewed.not_valid_after_utc > first.not_valid_after_utc
        san = renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            Identity.of(TD, "prod", "server", "registry").uri
        ]
        assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        # The keep-alive connection made before the swap still works, on its old handshake.
        for _ in range(3):
            kept.request("GET", "/v2/")
            resp = kept.getresponse()
            assert (resp.status, resp.read()) == (200, b"{}")
        assert kept.sock is not None
        der = kept.sock.getpeercert(binary_form=True)
        assert der and x509.load_der_x509_certificate(der).serial_number == first.serial_number
        kept.close()
        assert all(request(ctx, server.port) == 200 for _ in range(4))  # both workers, new cert
        for _ in range(8):
            assert served_serial(ctx, server.port) == new
    log = (env.work / "serve.log").read_text()
    assert log.count("renewed the server certificate") == 1, log  # once, by the parent, not per worker
    assert [r["identity"] for r in issue.list_issued()].count(server_uri) == 2  # the first and one renewal
    assert "through the local CA" in log


def test_without_the_keystore_the_server_reloads_a_folder_renewed_by_someone_else(env: Env) -> None:
    pki_ca.init_ca(env.svc, TD)
    tls_dir = short_lived_server_dir(env)
    first = issue.read_chain(tls_dir)[0].serial_number
    passphrase = os.environ.pop("MODELSEAL_PASSPHRASE")  # the server cannot reach the CA key
    try:
        with running(env, tls_dir) as server:
            ctx = client(env, "watcher")
            assert served_serial(ctx, server.port) == first
            time.sleep(1.5)
            log = (env.work / "serve.log").read_text()
            assert "watching" in log and "MODELSEAL_PASSPHRASE" in log, log
            os.environ["MODELSEAL_PASSPHRASE"] = passphrase  # the external renewer has it
            renewed = issue.renew(env.svc, tls_dir)  # as 'modelseal cert renew DIR' does
            new = wait_for_new_serial(ctx, server.port, first, timeout=15)  # no SIGHUP sent
            assert new == renewed.cert.serial_number
            assert request(ctx, server.port) == 200
    finally:
        os.environ["MODELSEAL_PASSPHRASE"] = passphrase
    assert "renewed the server certificate" not in (env.work / "serve.log").read_text()


def test_a_broken_folder_is_reported_and_the_old_certificate_kept(env: Env) -> None:
    pki_ca.init_ca(env.svc, TD)
    tls_dir = make_dir(env, env.work / "server-tls", "server", "registry", ips=["127.0.0.1"])
    other_key = make_dir(env, env.work / "k", "server", "x") / "key.pem"
    with running(env, tls_dir) as server:
        ctx = client(env, "x")
        before = served_serial(ctx, server.port)
        tmp = tls_dir / ".key.new"
        tmp.write_bytes(other_key.read_bytes())
        os.chmod(tmp, 0o600)
        os.replace(tmp, tls_dir / "key.pem")  # a key that does not match cert.pem
        deadline = time.monotonic() + 10
        while "does not load" not in (env.work / "serve.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert served_serial(ctx, server.port) == before
        assert request(ctx, server.port) == 200
    assert "PRIVATE KEY" not in (env.work / "serve.log").read_text()
