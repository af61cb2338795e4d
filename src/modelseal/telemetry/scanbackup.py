"""Backups in the clear, for ``modelseal scan`` (docs/scan.md, kind ``unencrypted-backup``).

A file is reported when its first bytes are one of:

- a modelseal backup part's plaintext: the header line ``recovery.partcodec`` writes first
  (``{"modelseal-backup-part":``), whatever the file is called;
- an OpenBao (or Vault) raft snapshot: a gzip stream whose tar archive starts with the member
  ``meta.json`` holding raft's snapshot metadata (``Index``, ``Term``, ``Configuration``),
  the first bytes decompressed only (at most ``_INFLATE`` bytes of output);
- a database dump: ``pg_dump``'s custom format (``PGDMP``), its plain format's banner, or
  ``sqlite3 .dump``'s (or Python's ``iterdump``'s) opening lines;

and also a file of a backup folder (``.../parts/NAME.mseal``, the layout of
``recovery.stores``) that is not modelseal ciphertext at all (no sealed magic), whatever it
holds. A sealed part is ciphertext and is judged as any sealed file. Decided from the prefix
the scan read (no further read); this module is pure and knows no key.
"""

from __future__ import annotations

import json
import re
import zlib

from modelseal.telemetry.scanmodel import CRITICAL, UNENCRYPTED_BACKUP, Finding

PART_HEADER = b'{"modelseal-backup-part":'  # recovery.partcodec.HEADER_PREFIX (telemetry does not import recovery)
_PART_FILE = re.compile(r"(^|/)parts/[a-z][a-z0-9-]{0,31}\.mseal$")
_DUMPS = (
    (b"PGDMP", "a pg_dump archive (custom format)"),
    (b"--\n-- PostgreSQL database dump", "a pg_dump SQL dump"),
    (b"PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;", "a sqlite3 .dump SQL dump"),
    (b"BEGIN TRANSACTION;\nCREATE TABLE", "a SQLite SQL dump (iterdump)"),
)
_GZIP = b"\x1f\x8b\x08"
_INFLATE = 2048  # a tar header (512 bytes) and the start of meta.json


def _part_name(prefix: bytes) -> str:
    line = prefix.split(b"\n", 1)[0][:512]
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return "?"
    name = doc.get("name") if isinstance(doc, dict) else None
    return name if isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9-]{0,31}", name) else "?"


def is_raft_snapshot(prefix: bytes) -> bool:
    """A gzip stream whose tar archive starts with raft's ``meta.json`` (module docstring)."""
    if not prefix.startswith(_GZIP):
        return False
    try:
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(prefix, _INFLATE)
    except zlib.error:
        return False
    if len(head) < 520 or head[:10] != b"meta.json\x00" or head[257:262] != b"ustar":
        return False
    body = head[512:].split(b"\n", 1)[0]
    return body.startswith(b"{") and all(k in body for k in (b'"Index"', b'"Term"', b'"Configuration"'))


def check(location: str, prefix: bytes, sealed: bool) -> Finding | None:
    """The ``unencrypted-backup`` finding for a file at ``location`` starting with ``prefix``
    (``sealed``: it starts with the sealed magic), or None."""
    if sealed:
        return None
    if prefix.startswith(PART_HEADER):
        detail = f"the plaintext of a modelseal backup part ({_part_name(prefix)}), not sealed"
    elif is_raft_snapshot(prefix):
        detail = "an OpenBao/Vault raft snapshot in clear: it holds every key and secret of the cluster"
    elif found := next((what for magic, what in _DUMPS if prefix.startswith(magic)), None):
        detail = f"{found} in clear"
    elif _PART_FILE.search(location):
        detail = "a backup folder's part file that is not modelseal ciphertext"
    else:
        return None
    return Finding(UNENCRYPTED_BACKUP, location, detail + ": seal it (modelseal backup create) and delete it", CRITICAL)


__all__ = ["PART_HEADER", "check", "is_raft_snapshot"]
