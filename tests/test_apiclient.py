"""``registry.apiclient.ApiClient`` against a real ``modelseal serve`` on 127.0.0.1 (pinned
mutual TLS): JSON answers, and each refusal as its typed, one-line error: 403
``AccessDenied`` with the server's reason, 429 ``AccessDenied`` rate-limited, another 4xx
``GovernanceError``, 503 and an unreachable server ``RegistryError``; the settings it is
built from; and the mapping of answers the live server gives only in later flows (202 with
an approval) on the reply data itself, escaped."""

from __future__ import annotations

import email.message
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from modelseal.errors import AccessDenied, ApprovalRequired, CertificateError, GovernanceError, RegistryError
from modelseal.governance.versions import PolicyStore
from modelseal.pki import ca as pki_ca
from modelseal.pki import pins
from modelseal.registry import apiclient
from modelseal.registry.apiclient import ApiClient
from modelseal.registry.reference import Endpoint
from modelseal.registry.transport import Reply
from modelseal.server import authz
from tests.conftest import Env
from tests.oci_helpers import Server, make_dir
from tests.services import free_port
from tests.test_authz import start_server


def live_pins() -> list[str]:
    ca = pki_ca.load_ca()
    return [pins.pin_of(ca.issuing), pins.pin_of_key(ca.next_public)]


def client(env: Env, server: Server, name: str) -> ApiClient:
    folder = make_dir(env, env.work / f"api-{name}", "service", name)
    return ApiClient.from_settings(f"127.0.0.1:{server.port}", tls_dir=folder, pins=live_pins())


@pytest.fixture
def server(env: Env) -> Server:
    s = start_server(env, "--workers", "1")
    yield s  # type: ignore[misc]
    s.stop()


def test_answers_and_refusals_of_a_live_server(env: Env, server: Server) -> None:
    with client(env, server, "trainer") as trainer, client(env, server, "intruder") as intruder:
        assert trainer.call("GET", "keys") == {"keys": []}
        assert trainer.call("GET", "/modelseal/v1/keys") == {"keys": []}  # the prefix may be given
        with pytest.raises(GovernanceError) as missing:  # 404: decided first, then unknown
            trainer.call("GET", "keys/llama-prod")
        assert type(missing.value) is GovernanceError and "404" in str(missing.value)
        with pytest.raises(AccessDenied) as denied:
            intruder.call("GET", "keys/llama-prod")
        text = str(denied.value)
        assert text.startswith("GET /keys/llama-prod denied: ") and "no policy permits key.list" in text
        assert "\n" not in text
        for _ in range(authz.DENIAL_BURST + 2):
            try:
                intruder.call("GET", "keys/llama-prod")
            except AccessDenied as e:
                last = str(e)
        assert "rate-limited, retry after" in last and last.endswith(" s")
        assert trainer.call("GET", "keys") == {"keys": []}  # the other identity is served


def test_a_tampered_policy_is_a_server_failure(env: Env, server: Server) -> None:
    target = server.data / "governance.db"
    policies = PolicyStore.open(target)
    text = (Path(authz.__file__).parent.parent / "governance" / "policies" / "default.cedar").read_text()
    v = policies.propose(text + "\n// v2\n", "spiffe://example.org/prod/user/alice")
    policies.activate(v.digest, "spiffe://example.org/prod/user/alice", ["bob", "carol"])
    policies.close()
    with sqlite3.connect(target) as db:
        db.execute("UPDATE gov_policy_versions SET body = body || ? WHERE digest = ?", ("\n// y", v.digest))
    time.sleep(authz.CACHE_SECONDS + 0.2)
    with client(env, server, "trainer") as trainer, pytest.raises(RegistryError) as failed:
        trainer.call("GET", "keys/llama-prod")
    assert "503" in str(failed.value) and authz.TAMPERED in str(failed.value)


def test_wrong_pins_and_no_server(env: Env, server: Server) -> None:
    folder = make_dir(env, env.work / "api-t", "service", "trainer")
    other = [pins.pin_of_key(ec.generate_private_key(ec.SECP256R1()).public_key()) for _ in range(2)]
    wrong = ApiClient.from_settings(f"127.0.0.1:{server.port}", tls_dir=folder, pins=other)
    with pytest.raises(CertificateError):
        wrong.call("GET", "keys")
    gone = ApiClient.from_settings(f"127.0.0.1:{free_port()}", tls_dir=folder, pins=live_pins())
    with pytest.raises(RegistryError, match=r"cannot reach the (registry|server)"):
        gone.call("GET", "keys")


def test_settings_from_config_and_environment(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    pki_ca.init_ca(env.svc, "example.org")
    folder = make_dir(env, env.work / "api-cfg", "service", "trainer")
    p = live_pins()
    cfg = env.home / "config.toml"
    cfg.write_text(f'[broker]\nserver = ["broker-a.internal:5000", "broker-b.internal:5001"]\ntls_dir = "{folder}"\n'
                   f'pins = ["{p[0]}", "{p[1]}"]\n')  # fmt: skip
    cfg.chmod(0o600)
    for var in ("MODELSEAL_BROKER", "MODELSEAL_TLS_DIR", "MODELSEAL_REGISTRY_PINS", "MODELSEAL_REGISTRY"):
        monkeypatch.delenv(var, raising=False)
    c = ApiClient.from_settings()
    assert c.transport.endpoints == [Endpoint("broker-a.internal", 5000), Endpoint("broker-b.internal", 5001)]
    assert c.transport.tls_dir == folder and c.transport.pins == p
    monkeypatch.setenv("MODELSEAL_BROKER", "127.0.0.1:7000")
    assert ApiClient.from_settings().transport.endpoints == [Endpoint("127.0.0.1", 7000)]
    assert ApiClient.from_settings("10.0.0.1:7001").transport.endpoints == [Endpoint("10.0.0.1", 7001)]
    cfg.write_text("[broker]\n")
    monkeypatch.delenv("MODELSEAL_BROKER")
    with pytest.raises(RegistryError, match="no server configured"):
        ApiClient.from_settings()


def test_paths_are_checked_before_anything_is_sent() -> None:
    assert apiclient.check_path("keys/llama/rotate") == "/modelseal/v1/keys/llama/rotate"
    assert apiclient.check_path("access/review?json=1") == "/modelseal/v1/access/review?json=1"
    for bad in ("../v2/x", "keys/../../etc", "/keys", "keys x", "keys\r\nHost: evil", "keys#frag", ""):
        with pytest.raises(GovernanceError, match="refusing the API path"):
            apiclient.check_path(bad)


def reply(status: int, body: bytes, **headers: str) -> Reply:
    msg = email.message.Message()
    for k, v in headers.items():
        msg[k.replace("_", "-")] = v
    return Reply(status, msg, body, Endpoint("127.0.0.1", 1))


def test_the_mapping_of_answers() -> None:
    answer = apiclient._answer
    assert answer(reply(200, b'{"ok": true}'), "GET /x") == {"ok": True}
    assert answer(reply(204, b""), "DELETE /x") == {}
    assert answer(reply(202, b'{"queued": 1}'), "POST /x") == {"queued": 1}
    with pytest.raises(ApprovalRequired) as queued:
        answer(reply(202, b'{"approval": "ap-1f2e", "digest": "sha256:00", "needs": 2}'), "POST /keys/k/destroy")
    assert "ap-1f2e" in str(queued.value) and "modelseal approvals list" in str(queued.value)
    assert "2 security officers" in str(queued.value)
    forged = b'{"errors":[{"code":"DENIED","message":"no\\n\\u001b[31mOK: access granted\\u202e"}]}'
    with pytest.raises(AccessDenied) as denied:
        answer(reply(403, forged), "GET /x")
    text = str(denied.value)
    assert "\n" not in text and "\x1b" not in text and "\u202e" not in text and "\\x1b" in text
    with pytest.raises(AccessDenied, match="rate-limited, retry after 7 s"):
        answer(reply(429, b"{}", Retry_After="7"), "GET /x")
    with pytest.raises(AccessDenied, match="retry after 1 s"):
        answer(reply(429, b"{}", Retry_After="soon\r\n"), "GET /x")
    with pytest.raises(GovernanceError) as bad:
        answer(reply(400, b'{"errors":[{"code":"BAD","message":"otp must be 6 digits"}]}'), "POST /x")
    assert type(bad.value) is GovernanceError and "otp must be 6 digits" in str(bad.value)
    with pytest.raises(RegistryError, match="the server failed"):
        answer(reply(502, b"<html>"), "GET /x")
    with pytest.raises(RegistryError, match="not a JSON object"):
        answer(reply(200, b"[1]"), "GET /x")
