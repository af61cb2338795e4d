"""Backup, drill, restore and controls-test records, and TLS scan reports, as evidence
(docs/evidence.md, "Recovery" and "TLS").

A record is a JSON file under ``$MODELSEAL_HOME/evidence/{backups,drills,restores,controls}/``
whose audit event (key ``evidence:<path from the home>``, artifact the SHA-256 of its bytes)
vouches for it. The bundle copies each record of the window byte for byte under
``records/<kind>/`` and cites its event, so an auditor re-hashes the copy against an event
proven into the signed tree head. A signed record (``{"body", "signer", "signature"}`` over a
domain prefix per format) is also checked against this host's trusted audit keys.

Whoever can write those folders chooses what lies there, so nothing there is followed or
trusted: ``evidence/`` and each kind's folder are opened with ``O_NOFOLLOW`` as folder
descriptors and each record relative to its folder with ``O_NOFOLLOW``; only a regular file
with one link is read (a symbolic or hard link to the audit key is refused, with a gap).
Bytes are copied only from a file that parses as its kind's record format and, when an
event vouches for it, hashes to the event's digest; any other file is listed (digest,
event, a note) and not copied. A folder holding more than ``MAX_RECORDS`` records is read
vouched-first and newest-first, with a gap naming how many were not read.

TLS reports are ``modelseal scan --json`` documents: the scans the CLI ran for ``--tls`` or
files given with ``--tls-report``. They are parsed bounded and only their known fields kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from modelseal.audit.hosts import key_id
from modelseal.audit.log import public_key_hex
from modelseal.errors import EvidenceError
from modelseal.evidence.controls import RECORD_ITEMS
from modelseal.evidence.model import RECORD_KINDS, RECORDS_DIR, SAFE_NAME, Section, Window, event_entry
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited

KINDS = RECORD_KINDS  # kind (folder under $MODELSEAL_HOME/evidence) -> item
# kind -> the format of its records (recovery.create, recovery.records, telemetry.controlsrecord)
FORMATS = {
    "backups": "modelseal-backup-record/v1",
    "drills": "modelseal-backup-drill/v1",
    "restores": "modelseal-backup-restore/v1",
    "controls": "modelseal-controls-test/v1",
}
UNSIGNED = frozenset({"modelseal-controls-test/v1"})  # vouched for by its event alone
# A signed record's body format -> its signature's domain prefix (recovery.records).
DOMAINS = {
    "modelseal-backup-drill/v1": b"modelseal-backup-drill-record/v1\n",
    "modelseal-backup-restore/v1": b"modelseal-backup-restore-record/v1\n",
    "modelseal-backup-record/v1": b"modelseal-backup-record/v1\n",
}
RECOVERY_PREFIXES = ("backup-", "incident-")
MAX_RECORD = 4 << 20
MAX_RECORDS = 10_000
MAX_REPORT = 16 << 20
_TIME_FIELDS = ("finished", "started", "created", "time")
_TLS_FIELDS = (
    "target",
    "started",
    "elapsed_seconds",
    "files",
    "findings",
    "findings_by_kind",
    "errors",
    "notes",
    "errors_total",
    "incomplete",
    "findings_not_listed",
)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK, O_NOCTTY: a FIFO or a terminal planted as a record never blocks nor becomes ours.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class RecordRefused(Exception):
    """A file or folder of the evidence folders that is not read: the one-line reason."""


@dataclass
class _Gathering:
    window: Window
    trusted: Mapping[str, Ed25519PublicKey]
    section: Section
    copies: dict[str, bytes]


def _bad(why: str) -> ValueError:
    return ValueError(why)


def _load(data: bytes) -> Any:
    try:
        return json_loads(data, max_depth=16, max_values=1_000_000, error=_bad)
    except ValueError:
        return None


def signature_state(doc: Any, trusted: Mapping[str, Ed25519PublicKey]) -> str:
    """``valid (key KEYID)``, ``invalid``, ``signer not trusted``, ``unsigned`` or ``unknown format``."""
    if not isinstance(doc, dict) or set(doc) != {"body", "signer", "signature"}:
        return "unsigned"
    body, signer, sig = doc["body"], doc["signer"], doc["signature"]
    domain = DOMAINS.get(str(body.get("format"))) if isinstance(body, dict) else None
    if domain is None or not isinstance(signer, str) or not isinstance(sig, str):
        return "unknown format"
    key = next((k for k in trusted.values() if public_key_hex(k) == signer), None)
    if key is None:
        return "signer not trusted"
    message = domain + json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    try:
        key.verify(bytes.fromhex(sig), message)
    except (InvalidSignature, ValueError):
        return "invalid"
    return f"valid (key {key_id(key)[:16]})"


def record_format(doc: Any, kind: str) -> str | None:
    """``kind``'s record format if ``doc`` has its shape, else None (not a record: never copied)."""
    fmt = FORMATS[kind]
    if not isinstance(doc, dict):
        return None
    if fmt in UNSIGNED:
        return fmt if doc.get("format") == fmt else None
    body = doc.get("body")
    if set(doc) == {"body", "signer", "signature"} and isinstance(body, dict) and body.get("format") == fmt:
        return fmt
    return None


def _summary(doc: Any) -> dict[str, Any]:
    body = doc.get("body", doc) if isinstance(doc, dict) else {}
    if not isinstance(body, dict):
        return {}
    out = {k: v for k, v in sorted(body.items()) if isinstance(v, str | int | float | bool) or v is None}
    return dict(list(out.items())[:30])


def _record_time(summary: Mapping[str, Any]) -> float | None:
    for name in _TIME_FIELDS:
        v = summary.get(name)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


def open_record_dir(name: str | Path, dir_fd: int | None = None) -> int | None:
    """A folder as a descriptor, never through a link; None when there is none."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise RecordRefused("a symbolic link or not a folder: not read") from None
        raise RecordRefused(f"cannot be opened: {e.strerror}") from None


def read_record(dir_fd: int, name: str) -> bytes:
    """Record ``name`` of the folder ``dir_fd``: a regular file of one link, never followed."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        raise RecordRefused(
            "a symbolic link: not read" if e.errno == errno.ELOOP else f"unreadable: {e.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RecordRefused("not a regular file: not read")
        if st.st_nlink != 1:
            raise RecordRefused(f"a file with {st.st_nlink} hard links (another file's contents): not read")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > MAX_RECORD:
                raise RecordRefused(f"larger than {MAX_RECORD} bytes: not read")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise RecordRefused(f"unreadable: {e.strerror}") from None
    finally:
        os.close(fd)


def _mtime(dir_fd: int, name: str) -> float:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _event_fields(event: Mapping[str, Any] | None) -> dict[str, Any]:
    keep = ("entry", "operation", "result", "artifact", "time")
    return {k: None if event is None else event.get(k) for k in keep}


def _one(fd: int, kind: str, name: str, event: Mapping[str, Any] | None, mtime: float, g: _Gathering) -> None:
    s = g.section
    item, path = KINDS[kind], f"evidence/{kind}/{name}"
    try:
        data = read_record(fd, name)
    except RecordRefused as e:
        s.gaps.append(f"record {path}: {e}")
        if event is not None:  # its event is cited: the record it vouches for is not here
            gone = {"path": path, "file": None, "sha256": None, "size": None, "format": None}
            s.add(item, {**gone, **_event_fields(event), "signature": "unreadable", "summary": {}})
            s.note(item, f"{name}: {e}")
        return
    digest = hashlib.sha256(data).hexdigest()
    doc = _load(data)
    fmt = record_format(doc, kind)
    summary = _summary(doc) if fmt else {}
    if event is None:
        when = _record_time(summary) if fmt else None
        if not g.window.contains(mtime if when is None else when):
            return  # no event vouches for it, and it is not of the window
    copied = fmt is not None and (event is None or event.get("artifact") == digest)
    entry: dict[str, Any] = {
        "path": path,
        "file": f"{RECORDS_DIR}/{kind}/{name}" if copied else None,
        "sha256": digest,
        "size": len(data),
        "format": fmt,
        **_event_fields(event),
        "signature": signature_state(doc, g.trusted) if fmt else ("unreadable" if doc is None else "unknown format"),
        "summary": summary,
    }
    s.add(item, entry)
    if copied:
        g.copies[entry["file"]] = data
    operation, success = RECORD_ITEMS[item]
    if fmt is None:
        s.note(item, f"{name}: not a {FORMATS[kind]} record: listed, not copied")
    if event is None:
        s.note(item, f"{name}: no audit event vouches for this record")
        return
    if event.get("artifact") != digest:
        s.note(item, f"{name}: differs from the digest its audit event (entry {event['entry']}) recorded: not copied")
    if event.get("operation") != operation:
        s.note(item, f"{name}: vouched for by a {str(event.get('operation'))[:40]} event, not {operation}")
    elif event.get("result") != success:
        s.note(item, f"{name}: {operation} -> {str(event.get('result'))[:100]}")
    if entry["signature"] in ("invalid", "signer not trusted"):
        s.note(item, f"{name}: signature {entry['signature']}")


def _kind(top: int, kind: str, vouching: Mapping[str, Mapping[str, Any]], g: _Gathering) -> None:
    s = g.section
    where = f"evidence/{kind}"
    try:
        fd = open_record_dir(kind, top)
    except RecordRefused as e:
        s.gaps.append(f"{where}: {e}")
        return
    if fd is None:
        return
    try:
        try:
            names = os.listdir(fd)
        except OSError as e:
            s.gaps.append(f"{where}: cannot be listed: {e.strerror}")
            return
        good = sorted(n for n in names if SAFE_NAME.fullmatch(n) and n.endswith(".json"))
        if len(good) < len(names):
            s.gaps.append(f"{where}: {len(names) - len(good)} entries not read (not named NAME.json)")
        picked: list[tuple[bool, float, str, Mapping[str, Any] | None]] = []
        for name in good:
            event = vouching.get(f"evidence:{where}/{name}")
            t = event.get("time") if event is not None else _mtime(fd, name)
            if not isinstance(t, int | float) or isinstance(t, bool):
                t = 0.0
            if event is None or g.window.contains(t):  # vouched outside the window: not of it
                picked.append((event is not None, float(t), name, event))
        if len(picked) > MAX_RECORDS:
            picked.sort(key=lambda p: (p[0], p[1], p[2]), reverse=True)
            s.gaps.append(
                f"{where}: {len(picked) - MAX_RECORDS} of {len(picked)} records not read (at most {MAX_RECORDS}: "
                "the vouched-for, then the newest were read)"
            )
            picked = picked[:MAX_RECORDS]
        for _, t, name, event in sorted(picked, key=lambda p: p[2]):
            _one(fd, kind, name, event, t, g)
    finally:
        os.close(fd)


def gather(
    home: Path,
    window: Window,
    events: list[dict[str, Any]],
    trusted: Mapping[str, Ed25519PublicKey],
    every: list[dict[str, Any]] | None = None,
) -> tuple[Section, dict[str, bytes]]:
    """The ``recovery`` section and the record files to copy (bundle name -> bytes). ``events``:
    those of the window; ``every``: all the log's (a record's event may lie outside the window)."""
    s = Section("recovery")
    copies: dict[str, bytes] = {}
    vouching = {
        str(e.get("key")): e
        for e in (events if every is None else every)
        if str(e.get("key", "")).startswith("evidence:evidence/")
    }
    g = _Gathering(window, trusted, s, copies)
    try:
        top = open_record_dir(home / "evidence")
    except RecordRefused as e:
        s.gaps.append(f"evidence/: {e}")
        top = None
    if top is not None:
        try:
            for kind in KINDS:
                _kind(top, kind, vouching, g)
        finally:
            os.close(top)
    for ev in events:
        op = str(ev.get("operation", ""))
        if op.startswith(RECOVERY_PREFIXES) or op == "controls-test":
            s.add("recovery.events", event_entry(ev))
    return s, copies


def parse_tls_report(data: bytes, source: str) -> dict[str, Any]:
    """One ``modelseal scan --json`` document, bounded, its known fields only."""
    doc = _load(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("target"), str) or not isinstance(doc.get("findings"), list):
        raise EvidenceError(f"{source[:200]} is not the JSON of modelseal scan --json")
    return {**{k: doc[k] for k in _TLS_FIELDS if k in doc}, "source": source}


def read_tls_report(path: Path) -> dict[str, Any]:
    try:
        data = read_limited(path, MAX_REPORT, EvidenceError, f"the TLS report {path}", regular=True)
    except FileNotFoundError:
        raise EvidenceError(f"no TLS report at {path}") from None
    return parse_tls_report(data, f"report file {path.name}")


def tls_section(reports: list[dict[str, Any]]) -> Section:
    s = Section("tls")
    for r in reports:
        s.add("tls.scans", dict(r))
        findings = r.get("findings") or []
        if findings:
            s.note("tls.scans", f"{r.get('target')}: {len(findings)} findings")
        if r.get("incomplete") or r.get("errors"):
            s.note(
                "tls.scans",
                f"{r.get('target')}: the scan is incomplete ({len(r.get('errors') or [])} errors): "
                "it does not count as evidence",
            )
    if not reports:
        s.gaps.append("no TLS scan: give --tls tls://HOST:PORT or --tls-report FILE")
    return s


__all__ = [
    "DOMAINS",
    "FORMATS",
    "KINDS",
    "RecordRefused",
    "gather",
    "open_record_dir",
    "parse_tls_report",
    "read_record",
    "read_tls_report",
    "record_format",
    "signature_state",
    "tls_section",
]
