"""The plaintext layout of a backup part (docs/recovery.md, "What a backup holds"), no I/O.

Every part of kind ``files`` or ``sql`` starts with one JSON line whose first member is
``"modelseal-backup-part"`` (``HEADER_PREFIX``), so that ``modelseal scan`` recognises a part
written in the clear by its first bytes. A ``files`` part is that line and one more: the files
as ``{"files": [{"name", "mode", "data" (base64)}]}``, sorted by name. An ``sql`` part is
``recovery.sqldump``'s. A ``bao-snapshot`` part is OpenBao's own snapshot (a gzip stream).

Parsing is bounded and strict: a part whose header names another part or kind, or whose
body is malformed, is ``BackupTampered``; a name is returned as data for the caller to
check against its allowlist, never joined to a path here.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from modelseal.errors import BackupTampered
from modelseal.util.bounded import json_loads

PART_VERSION = 1
HEADER_KEY = "modelseal-backup-part"
HEADER_PREFIX = b'{"' + HEADER_KEY.encode() + b'":'  # what the scan looks for
KINDS = ("files", "sql", "bao-snapshot")
MAX_HEADER = 4096
MAX_FILES = 4096


def header_line(name: str, kind: str, **extra: Any) -> bytes:
    """The first line of a part: ``HEADER_KEY`` first (the scan matches on it), then the rest."""
    doc: dict[str, Any] = {HEADER_KEY: PART_VERSION, "name": name, "kind": kind}
    doc.update(sorted(extra.items()))
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _bad(what: str) -> BackupTampered:
    return BackupTampered(f"backup part {what} is malformed")


def split_header(data: bytes, name: str, kind: str) -> tuple[dict[str, Any], bytes]:
    """The header of ``data`` (which must say part ``name`` of ``kind``) and the rest."""
    end = data.find(b"\n", 0, MAX_HEADER)
    if not data.startswith(HEADER_PREFIX) or end < 0:
        raise _bad(name)
    doc = json_loads(data[:end], max_depth=2, max_values=64, error=lambda _why: _bad(name))
    if not isinstance(doc, dict) or doc.get(HEADER_KEY) != PART_VERSION:
        raise _bad(name)
    if doc.get("name") != name or doc.get("kind") != kind:
        raise BackupTampered(f"backup part {name} holds another part ({str(doc.get('name'))[:40]!r})")
    return doc, data[end + 1 :]


def encode_files(name: str, files: dict[str, tuple[bytes, int]], **extra: Any) -> bytes:
    """A ``files`` part: ``files`` maps a name (relative, ``/``-separated) to (bytes, mode)."""
    listed = [
        {"data": base64.b64encode(data).decode(), "mode": mode & 0o777, "name": n}
        for n, (data, mode) in sorted(files.items())
    ]
    body = json.dumps({"files": listed}, separators=(",", ":"), sort_keys=True).encode()
    return header_line(name, "files", **extra) + body + b"\n"


def decode_files(data: bytes, name: str) -> tuple[dict[str, Any], dict[str, tuple[bytes, int]]]:
    """The header and the files of a ``files`` part (names unchecked: the caller's allowlist)."""
    header, body = split_header(data, name, "files")
    doc = json_loads(body, max_depth=4, max_values=8 * MAX_FILES, error=lambda _why: _bad(name))
    listed = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(listed, list) or len(listed) > MAX_FILES:
        raise _bad(name)
    out: dict[str, tuple[bytes, int]] = {}
    for f in listed:
        if not isinstance(f, dict) or set(f) != {"data", "mode", "name"}:
            raise _bad(name)
        n, mode, b64 = f["name"], f["mode"], f["data"]
        if not isinstance(n, str) or not isinstance(b64, str) or n in out:
            raise _bad(name)
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
            raise _bad(name)
        try:
            out[n] = (base64.b64decode(b64, validate=True), mode)
        except (binascii.Error, ValueError):
            raise _bad(name) from None
    return header, out


def encode_value(v: Any) -> Any:
    """One SQL value as JSON: bytes tagged ``{"b64": ...}``, the rest as they are."""
    if isinstance(v, bytes | bytearray | memoryview):
        return {"b64": base64.b64encode(bytes(v)).decode()}
    if v is None or isinstance(v, str | int | float):
        return v
    raise TypeError(f"unexpected SQL value of type {type(v).__name__}")


def decode_value(v: Any, name: str) -> Any:
    if isinstance(v, dict):
        if set(v) != {"b64"} or not isinstance(v["b64"], str):
            raise _bad(name)
        try:
            return base64.b64decode(v["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise _bad(name) from None
    if v is None or (isinstance(v, str | int | float) and not isinstance(v, bool)):
        return v
    raise _bad(name)


__all__ = ["HEADER_KEY", "HEADER_PREFIX", "KINDS", "decode_files", "encode_files", "header_line", "split_header"]
