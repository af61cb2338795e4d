"""Revoked certificate serials: ``$MODELSEAL_HOME/ca/revoked.json``.

Short lifetimes are the main defence, so the list stays small: an entry whose certificate
has expired (its ``not_after`` is known from the CA's record) is dropped a day after that,
and the list refuses to grow past ``MAX_ENTRIES``. Written crash-safely under the CA's
record lock (``locked``: ``issued.json`` and ``revoked.json`` are read-modify-write, and
several server workers renew at once); adding a serial that is listed already changes
nothing. ``is_revoked`` / ``load`` are what the server uses.

Revocation follows renewals: the CA's records (``issued.json``) name, for a certificate
issued by renewal, the serial it was renewed from (``renewed_from``). ``descendants``
walks those links down (``cert revoke`` denies them all), ``revoked_lineage`` walks them
up (the renewal endpoint refuses a caller whose certificate or any ancestor is listed).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelseal.errors import CertificateError, CertificateRevoked
from modelseal.pki import store

FILE = "revoked.json"
MAX_ENTRIES = 10_000
GRACE = 86400.0
MAX_SERIAL_BITS = 160  # RFC 5280: at most 20 octets
LOCK_FILE = ".records.lock"
PARENT = "renewed_from"  # the key of an issued.json row naming the serial it was renewed from
_HEX = re.compile(r"[0-9a-f]{1,40}")


def parse_serial(text: str) -> int:
    """A serial as ``openssl x509 -serial`` prints it (``serial=`` optional), with or without
    colons or ``0x``; raises ValueError."""
    t = text.strip().lower()
    t = t.removeprefix("serial=").removeprefix("0x").replace(":", "")
    if not _HEX.fullmatch(t):
        raise ValueError(f"not a certificate serial (hex, up to 20 bytes): {text[:60]!r}")
    value = int(t, 16)
    if value <= 0:
        raise ValueError("a certificate serial is positive")
    return value


def serial_hex(serial: int) -> str:
    """The upper-case even-length hex spelling of ``openssl x509 -serial``."""
    h = f"{serial:X}"
    return h if len(h) % 2 == 0 else "0" + h


@dataclass(frozen=True)
class Entry:
    serial: int
    revoked_at: float
    reason: str
    not_after: float | None


class Denylist:
    """The revoked serials, read once; ``revoked(serial)`` is a set look-up."""

    def __init__(self, entries: Mapping[int, Entry]) -> None:
        self.entries = dict(entries)

    def revoked(self, serial: int) -> bool:
        return serial in self.entries


def _parse(doc: Any) -> dict[int, Entry]:
    if doc is None:
        return {}
    try:
        rows = doc["revoked"]
        out: dict[int, Entry] = {}
        for row in rows:
            serial = parse_serial(str(row["serial"]))
            na = row.get("not_after")
            out[serial] = Entry(
                serial, float(row["revoked_at"]), str(row.get("reason", ""))[:200], None if na is None else float(na)
            )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CertificateError(f"the denylist {FILE} is malformed") from None
    return out


def load(folder: Path | None = None) -> Denylist:
    """The denylist of the CA at ``folder`` (default ``$MODELSEAL_HOME/ca``). A missing file is
    an empty list; a malformed one raises ``CertificateError`` (never an empty list)."""
    return Denylist(_parse(store.read_json(folder or store.ca_dir(), FILE, max_values=8 * MAX_ENTRIES + 8)))


def is_revoked(serial: int, folder: Path | None = None) -> bool:
    return load(folder).revoked(serial)


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the CA folder's record lock (``flock`` on ``LOCK_FILE``) for a read-modify-write
    of ``issued.json`` or ``revoked.json``; other processes of the CA wait."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise CertificateError(f"cannot lock the CA records in {folder}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add(
    serial: int, reason: str, not_after: float | None, folder: Path | None = None, now: float | None = None
) -> bool:
    """Add ``serial``; False if it was listed already (nothing written)."""
    return bool(add_many([(serial, reason, not_after)], folder, now))


def add_many(
    rows: Sequence[tuple[int, str, float | None]], folder: Path | None = None, now: float | None = None
) -> list[int]:
    """Add each ``(serial, reason, not_after)`` in one write; the serials that were not listed yet."""
    folder = store.ensure_dir(folder or store.ca_dir())
    t = time.time() if now is None else now
    with locked(folder):
        entries = load(folder).entries
        fresh: dict[int, tuple[str, float | None]] = {}
        for serial, reason, not_after in rows:
            if serial not in entries:
                fresh.setdefault(serial, (reason, not_after))
        if not fresh:
            return []
        entries = {s: e for s, e in entries.items() if e.not_after is None or e.not_after + GRACE > t}
        if len(entries) + len(fresh) > MAX_ENTRIES:
            raise CertificateError(f"the denylist holds {MAX_ENTRIES} serials: lower the leaf lifetime instead")
        for serial, (reason, not_after) in fresh.items():
            entries[serial] = Entry(serial, t, reason[:200], not_after)
        out = [
            {"serial": serial_hex(e.serial), "revoked_at": e.revoked_at, "reason": e.reason, "not_after": e.not_after}
            for e in sorted(entries.values(), key=lambda e: e.revoked_at)
        ]
        store.write(folder, FILE, store.dump_json({"revoked": out}))
    return list(fresh)


def _parent(row: Mapping[str, object]) -> str | None:
    value = row.get(PARENT)
    return value if isinstance(value, str) else None


def descendants(rows: Sequence[Mapping[str, object]], serial: int) -> list[Mapping[str, object]]:
    """The records of every certificate renewed from ``serial``, transitively (breadth first)."""
    children: dict[str, list[Mapping[str, object]]] = {}
    for r in rows:
        parent = _parent(r)
        if parent is not None:
            children.setdefault(parent, []).append(r)
    seen = {serial_hex(serial)}
    frontier, out = [serial_hex(serial)], []
    while frontier:
        nxt = []
        for s in frontier:
            for child in children.get(s, []):
                hexed = str(child.get("serial"))
                if hexed not in seen:
                    seen.add(hexed)
                    out.append(child)
                    nxt.append(hexed)
        frontier = nxt
    return out


def revoked_lineage(rows: Sequence[Mapping[str, object]], serial: int, listed: Denylist) -> int | None:
    """``serial`` or the first of its ancestors (the serials it was renewed from, by the
    records ``rows``) that ``listed`` holds, or None."""
    parents = {str(r.get("serial")): _parent(r) for r in rows}
    current: str | None = serial_hex(serial)
    seen: set[str] = set()
    while current is not None and current not in seen:
        seen.add(current)
        try:
            value = parse_serial(current)
        except ValueError:
            return None
        if listed.revoked(value):
            return value
        current = parents.get(current)
    return None


def deny_lineage(
    serial: int, reason: str, records: Callable[[], Sequence[Mapping[str, object]]], folder: Path
) -> list[int]:
    """Add ``serial`` and every certificate renewed from it by the CA's ``records`` (a
    function: they are re-read after each write, so a renewal recorded meanwhile is caught);
    the serials newly listed."""
    hexed = serial_hex(serial)
    why = f"renewed from revoked certificate {hexed}" + (f" ({reason})" if reason else "")
    own = next((r.get("not_after") for r in records() if r.get("serial") == hexed), None)
    batch = [(serial, reason, float(own) if isinstance(own, int | float) else None)]
    seen, listed = {serial}, []
    while batch:
        listed += add_many(batch, folder)
        batch = []
        for r in descendants(records(), serial):
            try:
                child = parse_serial(str(r.get("serial")))
            except ValueError:
                continue  # not a serial: no certificate to deny
            na = r.get("not_after")
            if child not in seen:
                seen.add(child)
                batch.append((child, why, float(na) if isinstance(na, int | float) else None))
    return listed


def check_lineage(rows: Sequence[Mapping[str, object]], serial: int, folder: Path) -> None:
    """Raise ``CertificateRevoked`` if ``serial`` or an ancestor is on the list at ``folder``."""
    hit = revoked_lineage(rows, serial, load(folder))
    if hit is not None:
        why = "is revoked" if hit == serial else f"was renewed from revoked certificate {serial_hex(hit)}"
        raise CertificateRevoked(f"certificate {serial_hex(serial)} {why}")


__all__ = [
    "PARENT",
    "Denylist",
    "Entry",
    "add",
    "add_many",
    "check_lineage",
    "deny_lineage",
    "descendants",
    "is_revoked",
    "load",
    "locked",
    "parse_serial",
    "revoked_lineage",
    "serial_hex",
]
