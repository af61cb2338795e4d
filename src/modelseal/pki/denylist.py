"""Revoked certificate serials: ``$MODELSEAL_HOME/ca/revoked.json``.

Short lifetimes are the main defence, so the list stays small: an entry whose certificate
has expired (its ``not_after`` is known from the CA's record) is dropped a day after that,
and the list refuses to grow past ``MAX_ENTRIES``. Written crash-safely; adding a serial
that is listed already changes nothing. ``is_revoked`` / ``load`` are what the server uses.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelseal.errors import CertificateError
from modelseal.pki import store

FILE = "revoked.json"
MAX_ENTRIES = 10_000
GRACE = 86400.0
MAX_SERIAL_BITS = 160  # RFC 5280: at most 20 octets
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


def add(
    serial: int, reason: str, not_after: float | None, folder: Path | None = None, now: float | None = None
) -> bool:
    """Add ``serial``; False if it was listed already (nothing written)."""
    folder = store.ensure_dir(folder or store.ca_dir())
    t = time.time() if now is None else now
    entries = load(folder).entries
    if serial in entries:
        return False
    entries = {s: e for s, e in entries.items() if e.not_after is None or e.not_after + GRACE > t}
    if len(entries) >= MAX_ENTRIES:
        raise CertificateError(f"the denylist holds {MAX_ENTRIES} serials: lower the leaf lifetime instead")
    entries[serial] = Entry(serial, t, reason, not_after)
    rows = [
        {"serial": serial_hex(e.serial), "revoked_at": e.revoked_at, "reason": e.reason, "not_after": e.not_after}
        for e in sorted(entries.values(), key=lambda e: e.revoked_at)
    ]
    store.write(folder, FILE, store.dump_json({"revoked": rows}))
    return True


__all__ = ["Denylist", "Entry", "add", "is_revoked", "load", "parse_serial", "serial_hex"]
