"""Backups in the clear, for ``modelseal scan`` (docs/scan.md, kind ``unencrypted-backup``).

A file is reported when its first bytes are one of:

- a modelseal backup part's plaintext: the header line ``recovery.partcodec`` writes first
  (``{"modelseal-backup-part":``), whatever the file is called;
- an OpenBao (or Vault) raft snapshot: a tar archive (gzip-compressed, as OpenBao writes it,
  or not) starting with the member ``meta.json`` holding raft's snapshot metadata (``Index``,
  ``Term``, ``Configuration``);
- a database dump: ``pg_dump``'s custom format (``PGDMP``), its plain format's banner or
  ``pg_dumpall``'s, or ``sqlite3 .dump``'s (or Python's ``iterdump``'s) opening lines;

after a UTF-8 byte order mark and leading blank lines are skipped and CRLF line ends read as
LF; and the same inside a gzip, xz or bzip2 stream (its first ``INFLATE`` bytes decompressed
only) and inside a tar archive's first member (a ``.tar``, a ``.tgz``, a tar of a compressed
dump), up to ``MAX_DEPTH`` such layers. A file of a backup folder (``.../parts/NAME.mseal``,
the layout of ``recovery.stores``) that is not modelseal ciphertext at all (no sealed magic) is
reported whatever it holds. A sealed part is ciphertext and is judged as any sealed file.
Decided from the prefix the scan read (no further read): a bzip2 stream whose first block is
longer than that prefix is not opened, nor is zstd (no decompressor in the standard library).
This module is pure and knows no key.
"""

from __future__ import annotations

import bz2
import json
import lzma
import re
import zlib
from collections.abc import Callable

from modelseal.telemetry.scanmodel import CRITICAL, UNENCRYPTED_BACKUP, Finding

PART_HEADER = b'{"modelseal-backup-part":'  # recovery.partcodec.HEADER_PREFIX (telemetry does not import recovery)
_PART_FILE = re.compile(r"(^|/)parts/[a-z][a-z0-9-]{0,31}\.mseal$")
_DUMPS = (
    (b"PGDMP", "a pg_dump archive (custom format)"),
    (b"--\n-- PostgreSQL database dump", "a pg_dump SQL dump"),
    (b"--\n-- PostgreSQL database cluster dump", "a pg_dumpall SQL dump"),
    (b"PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;", "a sqlite3 .dump SQL dump"),
    (b"BEGIN TRANSACTION;\nCREATE TABLE", "a SQLite SQL dump (iterdump)"),
)
_BOM = b"\xef\xbb\xbf"
INFLATE = 8192  # bytes of output taken from a compressed prefix: a tar header or two and a start
MAX_DEPTH = 3  # layers of compression and tar looked through (a .tar.gz of a .sql.xz)


def _inflate_gzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, INFLATE)


def _inflate_xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor().decompress(data, INFLATE)


def _inflate_bz2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data, INFLATE)


_COMPRESSED: tuple[tuple[bytes, str, Callable[[bytes], bytes]], ...] = (
    (b"\x1f\x8b\x08", "gzip", _inflate_gzip),
    (b"\xfd7zXZ\x00", "xz", _inflate_xz),
    (b"BZh", "bzip2", _inflate_bz2),
)


def _part_name(prefix: bytes) -> str:
    line = prefix.split(b"\n", 1)[0][:512]
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return "?"
    name = doc.get("name") if isinstance(doc, dict) else None
    return name if isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9-]{0,31}", name) else "?"


def _first_member(data: bytes) -> tuple[bytes, bytes] | None:
    """The name and the (prefix of the) data of a tar archive's first file member, or None.
    Extended headers before it (pax ``x``/``g``, GNU long names ``L``/``K``) are skipped."""
    offset = 0
    for _ in range(4):
        head = data[offset : offset + 512]
        if len(head) < 512 or head[257:262] != b"ustar":
            return None
        try:
            size = int(head[124:136].split(b"\x00", 1)[0].strip() or b"0", 8)
        except ValueError:
            return None
        body = offset + 512
        if head[156:157] in (b"x", b"g", b"L", b"K"):
            offset = body + -(-size // 512) * 512
            continue
        return head[:100].split(b"\x00", 1)[0], data[body : body + min(size, len(data))]
    return None


def _raft_meta(body: bytes) -> bool:
    line = body.split(b"\n", 1)[0]
    return line.startswith(b"{") and all(k in line for k in (b'"Index"', b'"Term"', b'"Configuration"'))


def _normal(data: bytes) -> bytes:
    """``data`` without a byte order mark and leading blank lines, CRLF read as LF."""
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    return data.lstrip(b" \t\r\n").replace(b"\r\n", b"\n")


def _what(data: bytes, depth: int = 0) -> tuple[str, str] | None:
    """(what the bytes are, the part name or "") for a backup in clear, else None."""
    text = _normal(data[:INFLATE])
    if text.startswith(PART_HEADER):
        return "part", _part_name(text)
    found = next((what for magic, what in _DUMPS if text.startswith(magic)), None)
    if found is not None:
        return found, ""
    if depth >= MAX_DEPTH:
        return None
    member = _first_member(data)
    if member is not None:
        name, body = member
        if name == b"meta.json" and _raft_meta(body):
            return "raft", ""
        return _what(body, depth + 1)
    for magic, _name, inflate in _COMPRESSED:
        if data.startswith(magic):
            try:
                inner = inflate(data)
            except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError):
                return None
            return _what(inner, depth + 1) if inner else None
    return None


def is_raft_snapshot(prefix: bytes) -> bool:
    """A tar archive, gzip-compressed or not, starting with raft's ``meta.json`` (module docstring)."""
    got = _what(prefix)
    return got is not None and got[0] == "raft"


def check(location: str, prefix: bytes, sealed: bool) -> Finding | None:
    """The ``unencrypted-backup`` finding for a file at ``location`` starting with ``prefix``
    (``sealed``: it starts with the sealed magic), or None."""
    if sealed:
        return None
    got = _what(prefix)
    if got is None:
        if not _PART_FILE.search(location):
            return None
        detail = "a backup folder's part file that is not modelseal ciphertext"
    elif got[0] == "part":
        detail = f"the plaintext of a modelseal backup part ({got[1]}), not sealed"
    elif got[0] == "raft":
        detail = "an OpenBao/Vault raft snapshot in clear: it holds every key and secret of the cluster"
    else:
        detail = f"{got[0]} in clear"
    return Finding(UNENCRYPTED_BACKUP, location, detail + ": seal it (modelseal backup create) and delete it", CRITICAL)


__all__ = ["INFLATE", "MAX_DEPTH", "PART_HEADER", "check", "is_raft_snapshot"]
