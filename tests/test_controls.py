"""``modelseal controls test`` against a real ``modelseal serve`` (docs/controls.md): the server
(tests/push_pull_helpers.py) with its monitor, a controls identity bound reader, metrics and
auditor (a user, enrolled for MFA), a policy that lets it push to ``modelseal-controls/*``,
canary keys a publisher wrapped, and this host's CA for the expired certificate.

Every attempt is refused and alerted (PASS), with ``--record``: the evidence file and its
``controls-test`` audit event carrying the file's SHA-256. A server started with ``--content
any`` accepts the plaintext push: that row FAILs and the command exits 21. The alerts API is
checked for its authorization and bounds. No stub: the monitor, the detectors and the
counters are the server's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyotp
import pytest

from modelseal.audit.events import MemorySink
from modelseal.audit.log import MerkleAuditLog
from modelseal.cli import main
from modelseal.errors import AccessDenied, GovernanceError
from modelseal.governance.approvals import Settings as GovSettings
from modelseal.governance.cedar import default_policy
from modelseal.governance.mfa import Mfa
from modelseal.governance.model import Binding
from modelseal.governance.store import GovStore, open_target
from modelseal.governance.versions import PolicyStore
from modelseal.keys import keystore
from modelseal.keys.service import KeyService
from modelseal.pki import ca as pki_ca
from modelseal.pki import issue, pins
from modelseal.pki.identity import Identity
from modelseal.recipes import context as recipes_context
from modelseal.registry.apiclient import ApiClient
from modelseal.registry.reference import Endpoint
from modelseal.registry.transport import Transport
from modelseal.telemetry import controls, controlsrecord, detectors, probes
from modelseal.telemetry.detectbase import Context, Detection, Params
from modelseal.telemetry.secevents import SecurityEvent, from_audit
from tests.push_pull_helpers import LOCAL_KEYS_EXCEPTION, modelseal_serve

TD = "example.org"
PASS = "controls-test-not-secret"
CONTROLS = Identity.of(TD, "prod", "user", "controls")
PUSH_PERMIT = f"""
@id("controls-push")
permit (principal == Principal::"{CONTROLS.uri}", action == Action::"push", resource is Repository)
when {{ resource.id like "modelseal-controls/*" }};
"""
CANARIES = 30
CEILING = 10  # [monitor.detectors.unwrap-ceiling] limit: the burst of CANARIES goes over it


@dataclass
class Site:
    work: Path
    home: Path
    dirs: dict[str, Path]
    pins: list[str]
    secret: str
    svc: KeyService

    def api(self, port: int, who: str = "controls") -> ApiClient:
        return ApiClient(Transport([Endpoint("127.0.0.1", port)], self.dirs[who], self.pins))

    def args(self, port: int, *more: str) -> list[str]:
        pin_args = [a for p in self.pins for a in ("--pin", p)]
        reg = ["--registry", f"127.0.0.1:{port}", "--tls-dir", str(self.dirs["controls"])]
        return [*reg, *pin_args, *more]


def _issue(svc: KeyService, folder: Path, kind: str, name: str, **kw: object) -> Path:
    issued = issue.issue(svc, Identity.of(TD, "prod", kind, name), **kw)  # type: ignore[arg-type]
    issue.write_dir(issued, folder, force=True)
    return folder


def _config(home: Path) -> None:
    text = '[broker.keys.controls-canary]\nkey = "local:controls-canary"\nenv = "prod"\n\n'
    text += "[monitor]\ninterval = 1\nsettle = 0.5\n"
    if "unwrap-ceiling" in detectors.NAMES:  # the probes registered beside the detectors
        text += f"\n[monitor.detectors.unwrap-ceiling]\nlimit = {CEILING}\n"
    (home / "config.toml").write_text(text)
    os.chmod(home / "config.toml", 0o600)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("controls")
    home = work / "home"
    mp = pytest.MonkeyPatch()
    mp.setenv("MODELSEAL_HOME", str(home))
    mp.setenv("MODELSEAL_PASSPHRASE", PASS)
    mp.delenv("MODELSEAL_AGENT_SOCK", raising=False)
    mp.delenv("MODELSEAL_CONTROLS_TOTP", raising=False)
    mp.setattr(recipes_context, "_service", None)
    keystore.clear_cache()
    keystore.create(keystore.keystore_path(home), PASS.encode(), scrypt_log2_n=14)
    _config(home)
    svc = KeyService(sink=MemorySink())
    svc.create("controls-canary")
    ca = pki_ca.init_ca(svc, TD)
    dirs = {
        "server": _issue(svc, work / "tls-server", "server", "registry", ips=["127.0.0.1"]),
        "controls": _issue(svc, work / "tls-controls", "user", "controls"),
        "publisher": _issue(svc, work / "tls-publisher", "service", "publisher"),
    }
    yield Site(work, home, dirs, [pins.pin_of(ca.issuing), pins.pin_of_key(ca.next_public)], "", svc)
    mp.undo()
    keystore.clear_cache()


def _govern(site: Site, data: Path) -> str:
    """Bind the controls identity, enrol its MFA, let it push to modelseal-controls/*: as an
    operator would, on the server's governance database (the server follows within 2 s)."""
    target = open_target(data, None)
    store = GovStore.open(target)
    try:
        if not any(b.pattern == CONTROLS.uri for b in store.bindings()):
            for role in ("reader", "metrics", "auditor"):
                store.bind(Binding("", CONTROLS.uri, role, "prod", time.time() + 30 * 86400), by="tests")
    finally:
        store.close()
    policies = PolicyStore.open(target)
    try:
        version = policies.propose(default_policy().text + LOCAL_KEYS_EXCEPTION + PUSH_PERMIT, "tests", "controls")
        if policies.active_digest() != version.digest:
            policies.activate(version.digest, "tests", ["officer-a", "officer-b"])
    finally:
        policies.close()
    mfa = Mfa.open(target, site.svc, GovSettings().key)
    try:
        if mfa.state(CONTROLS.uri) == "active":
            return site.secret
        secret = pyotp.parse_uri(mfa.enroll(CONTROLS.uri)).secret
        mfa.confirm(CONTROLS.uri, pyotp.TOTP(secret).at(time.time() - 30))  # the last step: this one stays fresh
    finally:
        mfa.close()
    site.secret = secret
    return secret


def _ready(site: Site, port: int) -> None:
    """Until the server sees the controls identity's bindings (its 2 s cache)."""
    deadline = time.monotonic() + 20
    with site.api(port) as api:
        while True:
            try:
                api.call("GET", "alerts")
                return
            except AccessDenied:
                assert time.monotonic() < deadline
                time.sleep(0.3)


def _serve(site: Site, data: Path, *args: str) -> Iterator[int]:
    with modelseal_serve(site.work, site.dirs["server"], site.dirs["publisher"], "--data", str(data), *args) as port:
        _govern(site, data)
        _ready(site, port)
        yield port


@pytest.fixture(scope="module")
def server(site: Site) -> Iterator[int]:
    yield from _serve(site, site.work / "data")


def _run(site: Site, port: int, *more: str, totp: bool = True) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    env = {"MODELSEAL_CONTROLS_TOTP": site.secret} if totp else {}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["controls", "test", *site.args(port, *more)])
    finally:
        mp.undo()
    return code, out.getvalue(), err.getvalue()


def _canaries(site: Site, port: int) -> None:
    pin_args = [a for p in site.pins for a in ("--pin", p)]
    base = ["controls", "canaries", "--registry", f"127.0.0.1:{port}", "--tls-dir", str(site.dirs["publisher"])]
    assert main([*base, *pin_args, "--key", "controls-canary", "--count", str(CANARIES)]) == 0


def test_every_attempt_is_refused_and_alerted_and_recorded(site: Site, server: int) -> None:
    _canaries(site, server)
    doc = json.loads((site.home / "controls" / "canaries.json").read_text())
    assert len(doc["items"]) == CANARIES and len({i["wrapped"] for i in doc["items"]}) == CANARIES
    # wrapped keys only: no field that could hold a data key (base64 may contain any letters)
    assert all(set(i) == {"context", "key", "version", "wrapped"} for i in doc["items"]), doc["items"][0]
    code, out, err = _run(site, server, "--json", "--record", "--timeout", "60")
    report = json.loads(out)
    rows = {r["attempt"]: r for r in report["attempts"]}
    assert list(rows) == list(controlsrecord.ATTEMPTS)
    verdicts = {name: r["verdict"] for name, r in rows.items()}
    assert verdicts == dict.fromkeys(controlsrecord.ATTEMPTS, controlsrecord.PASS), json.dumps(report, indent=1)
    assert code == 0 and report["result"] == "pass"
    assert rows["tls-1.2"]["metrics"][0]["delta"] >= 1
    assert rows["plaintext-push"]["detail"].startswith("403 content policy sealed-only")
    assert "already used" in rows["otp-replay"]["detail"]
    assert rows["pin-mismatch"]["local_alert"] is True
    # The record, and the audit event that vouches for it.
    records = sorted((site.home / "evidence" / "controls").glob("controls-*.json"))
    assert len(records) == 1 and oct(records[0].stat().st_mode & 0o777) == "0o600"
    data = records[0].read_bytes()
    assert json.loads(data)["result"] == "pass" and f"recorded {records[0]}" in err
    events, _ = MerkleAuditLog(site.home / "audit.db").verified_events()
    ours = [e for e in events if e.get("operation") == "controls-test"]
    assert len(ours) == 1 and ours[0]["artifact"] == hashlib.sha256(data).hexdigest()
    assert ours[0]["result"] == "pass" and ours[0]["key"].endswith(records[0].name)
    assert site.secret not in data.decode() and site.secret not in err
    # What the server itself audited for the probes (server.refusals), whoever detects them.
    refused = [e for e in events if e.get("operation") == "content-refused"]
    assert [(e["key"], e["result"], e["actor"]) for e in refused] == [
        ("push Repository:modelseal-controls/probe", "deny:sealed-only", CONTROLS.uri)
    ]
    replays = [e for e in events if e.get("operation") == "mfa-replay"]
    assert len(replays) == 1 and replays[0]["result"] == "deny:replay" and replays[0]["source"] == "127.0.0.1"


def test_the_alerts_api_is_for_auditors_and_bounded(site: Site, server: int) -> None:
    with site.api(server) as api:
        doc = api.call("GET", f"alerts?since={time.time() - 10 * 86400:.0f}")
        assert doc["since"] >= time.time() - 86400 - 60  # moved up to the 24 h window
        assert doc["verified"] is True, doc.get("problem")
        assert all(a["detector"] and a["time"] > 0 for a in doc["alerts"])
        with pytest.raises(GovernanceError, match="since must be"):
            api.call("GET", "alerts?since=nan")
    with site.api(server, "publisher") as api, pytest.raises(AccessDenied):
        api.call("GET", "alerts")  # a publisher is no auditor


def test_a_broken_control_is_a_failed_row_and_exit_21(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "audit").mkdir()  # its own audit log: its monitor must not re-detect the other server's events
    monkeypatch.setenv("MODELSEAL_AUDIT_URL", str(tmp_path / "audit" / "audit.db"))
    for port in _serve(site, tmp_path / "data-any", "--content", "any"):
        code, out, err = _run(site, port, "--only", "plaintext-push", "--timeout", "5", totp=False)
        assert code == 21, out + err
        assert "FAILED (plaintext-push)" in err
        line = next(line for line in out.splitlines() if line.startswith("plaintext-push"))
        assert " NO " in line and "FAIL" in line and "accepted (201)" in line


def _event(op: str, key: str, result: str, t: float, entry: int) -> SecurityEvent:
    doc = {"operation": op, "key": key, "result": result, "actor": CONTROLS.uri, "time": t, "entry": entry}
    return from_audit({**doc, "source": "10.0.0.9"})


def test_the_probe_detectors_fire_on_one_event_and_the_ceiling_on_a_burst() -> None:
    def one(cls: type, *events: SecurityEvent, **table: object) -> list[Detection]:
        d = cls(Params(cls.SPEC, table))
        return [x for ev in events for x in d.feed(ev, Context(0.0, 0.0))]

    assert [
        d.detector
        for d in one(probes.ContentRefused, _event("content-refused", "push Repository:r", "deny:sealed-only", 1, 1))
    ] == ["content-refused"]
    assert [
        d.detector for d in one(probes.OtpReplay, _event("mfa-replay", "mfa:totp key.rotate", "deny:replay", 1, 2))
    ] == ["otp-replay"]
    probe = one(probes.PrivilegeProbe, _event("authorize", "key.rotate Key:k", "deny:default", 1, 3))
    assert probe and probe[0].subject == {"identity": CONTROLS.uri, "source": "10.0.0.9", "key": "Key:k"}
    assert not one(probes.PrivilegeProbe, _event("authorize", "key.rotate Key:k", "deny:gov-step-up-mfa", 1, 4))
    assert not one(probes.PrivilegeProbe, _event("authorize", "pull Repository:r", "deny:default", 1, 5))
    unwraps = [_event("unwrap", "local:k", "ok", 100.0 + i, 10 + i) for i in range(12)]
    fired = one(probes.UnwrapCeiling, *unwraps, limit=10)
    assert len(fired) == 1 and fired[0].evidence[-1] == 20  # the 11th unwrap, once per window
    assert not one(probes.UnwrapCeiling, *unwraps[:10], limit=10)
    denied = [_event("authorize", "key.unwrap Key:k", "deny:default", 100.0 + i, i) for i in range(11)]
    assert len(one(probes.UnwrapCeiling, *denied)) == 1  # denied: 10 allowed per window by default


def test_expectations_name_every_attempt() -> None:
    assert set(controls.EXPECT) == set(controlsrecord.ATTEMPTS)
    row = controlsrecord.Row("x", "x", "x", refused=True, detail="d")
    row.metrics = [{"metric": "m", "alert": "A", "expected": 1, "delta": 0}]
    assert row.judge() == controlsrecord.FAIL and "m moved 0 < 1" in row.missing()
    row.metrics[0]["delta"] = 1
    assert row.judge() == controlsrecord.PASS
    assert controlsrecord.Row("y", "y", "y", tested=False).judge() == controlsrecord.NOT_TESTED
