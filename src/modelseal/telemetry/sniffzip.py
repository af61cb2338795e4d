"""Zip archives for ``sniff``: a torch checkpoint (an entry ``data.pkl``, ``*/data.pkl`` or
``*/.data/version``), a NumPy ``.npz`` (any entry ``*.npy``: ``np.load`` opens it whatever
else it holds) or a Keras v3 ``.keras`` file (``model.weights.h5``), from the entry names of
the central directory. Pure: bounded reads through a callback.

The end-of-central-directory record is looked for in the last 64 KiB as the zip readers do:
the last candidate whose comment runs exactly to the end of the file first (a comment may
itself hold the record's signature: miniz, torch's reader, skips such a candidate), then the
other candidates; the first whose directory parses wins. Zip64 records are followed. The
whole central directory is read (at most ``CD_MAX`` bytes, ``MAX_ENTRIES`` entries) and every
name is matched as bytes, without decoding.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

Read = Callable[[int, int], bytes]
TORCH, NPZ, KERAS = "torch", "npz", "keras"
CD_MAX = 16 << 20  # bytes of central directory read at most
MAX_ENTRIES = 400_000  # entries of it looked at
_EOCD, _LOC64, _END64, _CENTRAL = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06", b"PK\x01\x02"


def name_format(name: bytes) -> str | None:
    """The format one entry name says the archive is, if any."""
    if name == b"data.pkl" or name.endswith((b"/data.pkl", b"/.data/version")):
        return TORCH
    if name.endswith(b".npy"):
        return NPZ
    if name == b"model.weights.h5":
        return KERAS
    return None


def first_name(prefix: bytes) -> bytes:
    """The name of the first local file header at the start of ``prefix``."""
    if len(prefix) < 30:
        return b""
    (n,) = struct.unpack("<H", prefix[26:28])
    return prefix[30 : 30 + n]


def zip_format(read: Read, size: int) -> str | None:
    """``torch``, ``npz`` or ``keras`` for the zip archive of ``size`` bytes read by ``read``
    (a torch entry anywhere wins); None for any other archive, or an end that does not parse."""
    tail_len = min(size, 65535 + 22)
    tail = read(size - tail_len, tail_len)
    candidates: list[int] = []
    end = len(tail)
    while len(candidates) < 64:
        at = tail.rfind(_EOCD, 0, end)
        if at < 0:
            break
        if at + 22 <= len(tail):
            candidates.append(at)
        end = at
    exact = [a for a in candidates if a + 22 + struct.unpack("<H", tail[a + 20 : a + 22])[0] == len(tail)]
    for at in exact + [a for a in candidates if a not in exact]:
        found = _directory(read, size, tail, at, size - tail_len + at)
        if found is not None:
            return found or None
    return None


def _directory(read: Read, size: int, tail: bytes, at: int, eocd_offset: int) -> str | None:
    """The format of the directory the record at ``tail[at]`` points to: "" for none, None
    when the record does not lead to a central directory."""
    entries, cd_size, cd_offset = struct.unpack("<xxxxxxxxxxHII", tail[at : at + 20])
    if cd_offset == 0xFFFFFFFF or entries == 0xFFFF or cd_size == 0xFFFFFFFF:
        loc = tail[at - 20 : at] if at >= 20 else read(eocd_offset - 20, 20) if eocd_offset >= 20 else b""
        if not loc.startswith(_LOC64):
            return None
        (end64,) = struct.unpack("<Q", loc[8:16])
        rec = read(end64, 56) if 0 <= end64 < size else b""
        if len(rec) < 56 or not rec.startswith(_END64):
            return None
        cd_size, cd_offset = struct.unpack("<QQ", rec[40:56])
    if not 0 <= cd_offset < size:
        return None
    cd = read(cd_offset, min(cd_size, CD_MAX, size - cd_offset))
    if not cd.startswith(_CENTRAL):
        return None
    found = ""
    pos, seen = 0, 0
    while seen < MAX_ENTRIES and pos + 46 <= len(cd) and cd[pos : pos + 4] == _CENTRAL:
        n, extra, comment = struct.unpack("<HHH", cd[pos + 28 : pos + 34])
        fmt = name_format(cd[pos + 46 : pos + 46 + n])
        if fmt == TORCH:
            return TORCH
        if fmt is not None and not found:
            found = fmt
        pos += 46 + n + extra + comment
        seen += 1
    return found


__all__ = ["CD_MAX", "KERAS", "MAX_ENTRIES", "NPZ", "TORCH", "first_name", "name_format", "zip_format"]
