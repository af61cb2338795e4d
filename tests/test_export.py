"""SIEM export: JSON lines (0600, appended, fsynced, rotated by size) that validate against
docs/schemas/security-event.schema.json, OTLP/JSON logs in the Collector's otlpjsonfile
shape, syslog to a real UDP socket, ``[monitor.export]``, and ``modelseal events export``
from a real audit log (the entries that verify, and only those)."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog
from modelseal.cli import main
from modelseal.errors import StorageError
from modelseal.keys.config import ConfigError
from modelseal.telemetry.alerting import new_alert
from modelseal.telemetry.export import Exporter, FileOutput, SyslogOutput, exporter_from_config
from modelseal.telemetry.secevents import SecurityEvent, from_audit, from_tls
from modelseal.telemetry.syslogout import SyslogWriter
from tests.conftest import Env

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "docs/schemas/security-event.schema.json").read_text())
TYPES: dict[str, Any] = {
    "string": str,
    "number": (int, float),
    "integer": int,
    "object": dict,
    "array": list,
    "null": type(None),
    "boolean": bool,
}


def problems(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """The JSON Schema keywords the schema file uses, checked by hand (no jsonschema here)."""
    out: list[str] = []
    if "$ref" in schema:
        target: Any = SCHEMA
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        out += problems(value, target, path)
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not problems(value, s, path)]
        if len(matching) != 1:
            out.append(f"{path}: matches {len(matching)} of oneOf")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(isinstance(value, TYPES[n]) and not (isinstance(value, bool) and n != "boolean") for n in names)
        if not ok:
            return [*out, f"{path}: {value!r} is not {names}"]
    if "const" in schema and value != schema["const"]:
        out.append(f"{path}: not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)) or len(value) < schema.get("minLength", 0):
            out.append(f"{path}: length {len(value)}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{path}: does not match {schema['pattern']}")
    if isinstance(value, int | float) and not isinstance(value, bool) and value < schema.get("minimum", value):
        out.append(f"{path}: below {schema['minimum']}")
    if isinstance(value, dict):
        out += [f"{path}: no {k}" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            out += [f"{path}: unexpected {k}" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                out += problems(v, props[k], f"{path}.{k}")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            out.append(f"{path}: too many items")
        out += [p for i, v in enumerate(value) for p in problems(v, schema.get("items", {}), f"{path}[{i}]")]
    return out


def events() -> list[SecurityEvent]:
    return [
        from_audit(
            {
                "operation": "authorize",
                "key": "key.unwrap Key:prod-llm",
                "result": "deny:gov-sod",
                "actor": "spiffe://ms/prod/service/a",
                "source": "10.1.2.3",
                "time": 1_800_000_000.25,
                "entry": 41,
            }
        ),
        from_audit(
            {"operation": "unwrap", "key": "broker:prod-llm", "result": "ok", "version": 3, "time": 1.8e9, "entry": 42}
        ),
        from_tls(1_800_000_001.5, "10.9.9.9", "unknown-ca"),
    ]


def alert() -> Any:
    return new_alert(
        "failed-handshakes", "critical", "42 failed handshakes from 10.9.9.9", {"source": "10.9.9.9"}, (41, 42)
    )


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_validator_can_fail() -> None:
    good = events()[0].to_dict()
    assert problems(good, SCHEMA) == [] and problems(alert().to_dict(), SCHEMA) == []
    for bad in (
        {**good, "outcome": "maybe"},
        {**good, "entry": "41"},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "source"},
        {**good, "schema": "modelseal.alert/v1"},
        {**alert().to_dict(), "evidence": ["x"]},
        {**alert().to_dict(), "subject": {"path": "/etc"}},
        {**good, "version": True},
    ):
        assert problems(bad, SCHEMA), bad


def test_jsonl_file_appends_validates_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    exporter = Exporter([FileOutput(path)])
    exporter.write(events())
    exporter.write_alert(alert())
    exporter.write(events()[:1])
    assert os.stat(path).st_mode & 0o777 == 0o600
    lines = read_lines(path)
    assert len(lines) == 5
    assert [r["schema"] for r in lines] == ["modelseal.security-event/v1"] * 3 + [
        "modelseal.alert/v1",
        "modelseal.security-event/v1",
    ]
    for record in lines:
        assert problems(record, SCHEMA) == [], record
    assert lines[0] == events()[0].to_dict() and lines[0]["action"] == "key.unwrap" and lines[0]["outcome"] == "denied"
    assert lines[2]["kind"] == "tls" and lines[2]["entry"] is None
    # A file others could read is tightened at the next write; a symlink is refused.
    os.chmod(path, 0o644)
    exporter.write(events())
    assert os.stat(path).st_mode & 0o777 == 0o600
    link = tmp_path / "link.jsonl"
    link.symlink_to(path)
    with pytest.raises(StorageError, match="cannot write"):
        FileOutput(link).write([events()[0].to_dict()])


def test_rotation_by_size_keeps_n_files(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    out = FileOutput(path, max_bytes=1000, keep=2)
    written = []
    for i in range(40):
        record = {**events()[1].to_dict(), "entry": i}
        written.append(record)
        out.write([record])
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    kept = (
        read_lines(path.with_name("events.jsonl.2")) + read_lines(path.with_name("events.jsonl.1")) + read_lines(path)
    )
    assert kept == written[-len(kept) :] and len(kept) < len(written)  # the newest, in order, oldest dropped
    assert all(p.stat().st_size <= 1000 for p in tmp_path.glob("events.jsonl*"))


def test_otlp_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.otlp.jsonl"
    Exporter([FileOutput(path, "otlp-json")]).write(events())
    Exporter([FileOutput(path, "otlp-json")]).write_alert(alert())
    requests = read_lines(path)
    assert len(requests) == 2  # one ExportLogsServiceRequest per batch, one per line
    resource = requests[0]["resourceLogs"][0]
    assert {"key": "service.name", "value": {"stringValue": "modelseal"}} in resource["resource"]["attributes"]
    scope = resource["scopeLogs"][0]
    assert scope["scope"]["name"] == "modelseal.telemetry.export"
    records = scope["logRecords"]
    assert len(records) == 3
    first = records[0]
    assert first["timeUnixNano"] == "1800000000250000000" and first["observedTimeUnixNano"].isdigit()
    assert (first["severityText"], first["severityNumber"]) == ("WARN", 13)
    assert first["body"] == {"stringValue": "authorize key.unwrap Key:prod-llm deny:gov-sod"}
    attrs = {a["key"]: a["value"] for a in first["attributes"]}
    assert attrs["event.name"] == {"stringValue": "modelseal.security_event"}
    assert attrs["modelseal.source"] == {"stringValue": "10.1.2.3"}
    assert attrs["modelseal.entry"] == {"intValue": "41"}
    assert attrs["modelseal.time"] == {"doubleValue": 1_800_000_000.25}
    assert "modelseal.version" not in attrs  # null fields are left out
    assert (records[1]["severityText"], records[1]["severityNumber"]) == ("INFO", 9)
    for record in records + requests[1]["resourceLogs"][0]["scopeLogs"][0]["logRecords"]:
        assert set(record) == {
            "timeUnixNano",
            "observedTimeUnixNano",
            "severityNumber",
            "severityText",
            "body",
            "attributes",
        }
        for a in record["attributes"]:
            assert set(a) == {"key", "value"} and len(a["value"]) == 1
            assert next(iter(a["value"])) in {
                "stringValue",
                "intValue",
                "doubleValue",
                "boolValue",
                "arrayValue",
                "kvlistValue",
            }
    alert_record = requests[1]["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]
    attrs = {a["key"]: a["value"] for a in alert_record["attributes"]}
    assert alert_record["severityText"] == "CRITICAL" and alert_record["body"]["stringValue"].startswith("42 failed")
    assert attrs["modelseal.evidence"] == {"arrayValue": {"values": [{"intValue": "41"}, {"intValue": "42"}]}}
    assert attrs["modelseal.subject"] == {
        "kvlistValue": {"values": [{"key": "source", "value": {"stringValue": "10.9.9.9"}}]}
    }


def test_syslog_export_one_json_event_per_message() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(10)
        exporter = Exporter([SyslogOutput(SyslogWriter(("127.0.0.1", udp.getsockname()[1])))])
        exporter.write(events())
        exporter.write_alert(alert())
        got = [udp.recv(65536) for _ in range(4)]
        exporter.close()
    parsed = [re.fullmatch(rb"<(\d+)>1 \S+ \S+ modelseal \d+ (event|alert) - (.*)", g) for g in got]
    assert all(parsed), got
    records = [json.loads(m[3]) for m in parsed if m]
    assert records[:3] == [e.to_dict() for e in events()] and records[3]["schema"] == "modelseal.alert/v1"
    # auth (4): denied and failed events are warnings (4), a success is info (6), the alert critical (2).
    assert [int(m[1]) for m in parsed if m] == [36, 38, 36, 34]
    for record in records:
        assert problems(record, SCHEMA) == []


def test_export_config(tmp_path: Path) -> None:
    exporter = exporter_from_config({"jsonl": "events.jsonl", "otlp_json": "events.otlp", "keep": 3}, home=tmp_path)
    files = [o for o in exporter.outputs if isinstance(o, FileOutput)]
    assert [(o.path, o.fmt, o.keep) for o in files] == [
        (tmp_path / "events.jsonl", "jsonl", 3),
        (tmp_path / "events.otlp", "otlp-json", 3),
    ]
    assert exporter_from_config({}).outputs == []
    Exporter().write(events())  # nothing configured: nothing written, no error
    for bad in (
        {"file": "x"},
        {"jsonl": "missing-folder/e.jsonl"},
        {"keep": 0},
        {"max_bytes": "big"},
        {"facility": "auth"},
        {"syslog": "nohostport"},
    ):
        with pytest.raises(ConfigError):
            exporter_from_config(bad, home=tmp_path)


def _audit_log(env: Env) -> MerkleAuditLog:
    log = MerkleAuditLog(env.home / "audit.db")
    day = 86400.0
    log.emit_many(
        [
            AuditEvent("unwrap", "local:test-kek", "ok", version=1, actor="alice", time=1_795_000_000.0),  # 2026-11-18
            AuditEvent(
                "authorize",
                "pull Repository:team/m",
                "deny:default",
                actor="spiffe://ms/prod/user/bob",
                time=1_795_000_000.0 + day,
                source="10.0.0.7",
            ),
            AuditEvent("rotate", "local:test-kek", "ok", actor="alice", time=1_795_000_000.0 + 2 * day),
        ]
    )
    return log


def test_cli_events_export_backfill(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    _audit_log(env)
    out = env.work / "backfill.jsonl"
    assert main(["events", "export", "--from", "2026-11-19", "--out", str(out)]) == 0
    lines = read_lines(out)
    assert [r["operation"] for r in lines] == ["authorize", "rotate"]
    assert (
        lines[0]["source"] == "10.0.0.7"
        and lines[0]["resource"] == "Repository:team/m"
        and lines[0]["entry"] is not None
    )
    assert all(problems(r, SCHEMA) == [] for r in lines)
    assert os.stat(out).st_mode & 0o777 == 0o600
    assert main(["events", "export", "--out", str(out)]) == 7  # exists
    assert main(["events", "export", "--to", "2026-11-19T12:00:00+00:00", "--format", "otlp-json", "--out", "-"]) == 0
    stdout = capsys.readouterr().out
    request = json.loads(stdout)
    ops = [
        a["value"]["stringValue"]
        for r in request["resourceLogs"][0]["scopeLogs"][0]["logRecords"]
        for a in r["attributes"]
        if a["key"] == "modelseal.operation"
    ]
    assert ops == ["unwrap", "authorize"]
    with pytest.raises(SystemExit) as usage:
        main(["events", "export", "--from", "yesterday", "--out", "-"])
    assert usage.value.code == 2 and "not an ISO date or time" in capsys.readouterr().err


def test_cli_events_export_stops_at_a_forged_entry(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    _audit_log(env)
    db = sqlite3.connect(env.home / "audit.db", isolation_level=None)
    db.execute("DROP TRIGGER IF EXISTS events_no_update")  # the attacker removes the guard rails
    (seq,) = db.execute("SELECT seq FROM events ORDER BY seq LIMIT 1 OFFSET 1").fetchone()
    db.execute("UPDATE events SET event = replace(event, 'deny:default', 'allow:role-reader') WHERE seq = ?", (seq,))
    db.close()
    out = env.work / "backfill.jsonl"
    assert main(["events", "export", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "does NOT verify" in err and f"entries from {seq} on were not exported" in err
    lines = read_lines(out)
    assert [r["operation"] for r in lines] == ["unwrap"]  # only what verifies: the forged allow is not exported
