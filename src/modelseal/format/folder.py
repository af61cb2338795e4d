"""Sealed model folders: the encrypted manifest and opening its members.

Owns the manifest schema (docs/format.md, section 8), its strict validation
(bounded path length and depth, no absolute or ``..`` paths, no duplicates, opaque
blob names; bounds checked first and everything in linear time) and
``SealedFolder``, which unwraps the data key once and opens any member as a
``SealedReader``, checking that the blob is the one the manifest names.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelseal.errors import DecryptionError, FormatError
from modelseal.format.envelope import Opened, attachment_key, check_metadata, decrypt_metadata, verify_with_dek
from modelseal.format.file import RawArtifact, canonical_json, parse_json_object, read_raw
from modelseal.format.header import KIND_BLOB, KIND_MANIFEST
from modelseal.format.reader import SealedReader
from modelseal.format.source import FdSource
from modelseal.util.bounded import json_loads
from modelseal.util.files import open_regular

MANIFEST_NAME = "manifest.mseal"
BLOB_DIR = "blobs"
MANIFEST_FORMAT = "modelseal-manifest/1"
MAX_MANIFEST = 64 << 20
MAX_ENTRIES = 100_000
MAX_PATH_BYTES = 4096  # Linux PATH_MAX
MAX_PATH_DEPTH = 256  # segments
_MANIFEST_DEPTH = 3  # {"files": [{...}]}
_MANIFEST_VALUES = 6 * MAX_ENTRIES + 8  # five members and an object per entry, and the envelope
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    sha256: str
    blob: str
    header_mac: str

    def to_json(self) -> dict[str, Any]:
        return {
            "blob": self.blob,
            "header_mac": self.header_mac,
            "path": self.path,
            "sha256": self.sha256,
            "size": self.size,
        }


def relpath_problem(path: str) -> str | None:
    """Why ``path`` cannot be a member path (section 8), or ``None``. The bounds come
    first, so nothing after them is given more than 4096 bytes."""
    if len(path) > MAX_PATH_BYTES:  # every character takes at least one byte
        return f"is longer than {MAX_PATH_BYTES} bytes"
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:  # a non-UTF-8 file name (surrogate-escaped by os.walk)
        return "is not UTF-8"
    if size > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    if path.count("/") >= MAX_PATH_DEPTH:
        return f"is more than {MAX_PATH_DEPTH} levels deep"
    if not path or "\x00" in path or "\\" in path or path.startswith("/"):
        return "is empty or absolute, or holds a backslash or NUL"
    framed = f"/{path}/"
    if "//" in framed or "/./" in framed or "/../" in framed:
        return "has an empty, . or .. segment"
    return None


def is_safe_relpath(path: str) -> bool:
    return relpath_problem(path) is None


def encode_manifest(entries: list[Entry]) -> bytes:
    return canonical_json({"format": MANIFEST_FORMAT, "files": [e.to_json() for e in entries]})


def _refused(_detail: str) -> DecryptionError:
    return DecryptionError()  # a bad manifest says nothing about which rule it broke


def parse_manifest(data: bytes) -> list[Entry]:
    """Strictly validate a decrypted manifest. Any defect is a DecryptionError: the
    manifest is authenticated, so a bad one means a bad (or malicious) sealer.

    Bounds first (size, then nesting and the number of values before the JSON parser
    runs, then each path's length and depth before its segments are looked at), and
    every check in time linear in the manifest's size."""
    if len(data) > MAX_MANIFEST:
        raise DecryptionError()
    doc = json_loads(data, max_depth=_MANIFEST_DEPTH, max_values=_MANIFEST_VALUES, error=_refused)
    if not isinstance(doc, dict) or set(doc) != {"files", "format"} or doc["format"] != MANIFEST_FORMAT:
        raise DecryptionError()
    files = doc["files"]
    if not isinstance(files, list) or len(files) > MAX_ENTRIES:
        raise DecryptionError()
    out: list[Entry] = []
    encoded_paths: list[bytes] = []
    seen_blobs: set[str] = set()
    for f in files:
        if not isinstance(f, dict) or set(f) != {"blob", "header_mac", "path", "sha256", "size"}:
            raise DecryptionError()
        path, blob, mac, digest, size = f["path"], f["blob"], f["header_mac"], f["sha256"], f["size"]
        if not isinstance(path, str) or relpath_problem(path) is not None:
            raise DecryptionError()
        encoded = path.encode()
        if encoded_paths and encoded <= encoded_paths[-1]:
            raise DecryptionError()  # entries must be sorted by path bytes (so no duplicates)
        if not (isinstance(blob, str) and _HEX32.fullmatch(blob)) or blob in seen_blobs:
            raise DecryptionError()
        if not (
            isinstance(mac, str) and _HEX64.fullmatch(mac) and isinstance(digest, str) and _HEX64.fullmatch(digest)
        ):
            raise DecryptionError()
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 64:
            raise DecryptionError()
        encoded_paths.append(encoded)
        seen_blobs.add(blob)
        out.append(Entry(path, size, digest, blob, mac))
    if not _no_file_is_a_folder(encoded_paths):
        raise DecryptionError()
    # Last, when every string is known to be UTF-8: only the one canonical encoding is
    # accepted (which also rules out duplicate keys).
    try:
        canonical = canonical_json(doc)
    except ValueError:  # a lone surrogate or NaN somewhere: not canonical JSON
        raise DecryptionError() from None
    if canonical != data:
        raise DecryptionError()
    return out


def read_manifest(reader: SealedReader) -> list[Entry]:
    """Decrypt and validate a manifest, refusing one that claims more than 64 MiB before
    a buffer of that size is allocated (``readall`` allocates the claimed length). Its
    metadata must count the entries and hold the manifest plaintext's SHA-256 (the
    schema itself was checked when the envelope was opened)."""
    if reader.raw_artifact.core.kind != KIND_MANIFEST or reader.size > MAX_MANIFEST:
        raise DecryptionError()
    data = reader.readall()
    entries = parse_manifest(data)
    meta = reader.metadata()
    digest = meta.get("sha256")
    if meta.get("files") != len(entries) or not isinstance(digest, str):
        raise DecryptionError()
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest().encode(), digest.encode("utf-8", "replace")):
        raise DecryptionError()
    return entries


def _no_file_is_a_folder(paths: list[bytes]) -> bool:
    """Whether no path in this strictly ascending list is also a parent folder of another.
    The paths below ``p/`` are contiguous in byte order, so one binary search per path
    finds them: O(n log n) comparisons, where comparing every path with every parent
    of every other is quadratic in depth."""
    for i, p in enumerate(paths):
        folder = p + b"/"
        j = bisect.bisect_left(paths, folder, i + 1)
        if j < len(paths) and paths[j].startswith(folder):
            return False
    return True


class SealedFolder:
    """An opened sealed folder: the data key is unwrapped once for all members."""

    def __init__(
        self,
        root: Path,
        raw: RawArtifact,
        opened: Opened,
        entries: list[Entry],
        check: Callable[[str, RawArtifact], bytes | None] | None = None,
    ) -> None:
        self.root = root
        self._check = check  # signature verification: the signed chunk table of a member
        self.raw_artifact = raw
        self._opened = opened
        self._entries = {e.path: e for e in entries}
        self.context = dict(raw.core.context)
        self.recipients = opened.slot.recipients
        self.verdict: Any = None  # the signature verdict, when verified on open

    def attachment_key(self) -> bytes:
        core = self.raw_artifact.core
        return attachment_key(self._opened.dek, core.salt, core.binding)

    def __enter__(self) -> SealedFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._entries = {}

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    def entry(self, path: str) -> Entry:
        try:
            return self._entries[path]
        except KeyError:
            raise FileNotFoundError(f"{path} is not in the sealed folder") from None

    def open(self, path: str) -> SealedReader:
        e = self.entry(path)
        blob = self.root / BLOB_DIR / e.blob
        if not blob.exists():
            raise DecryptionError()  # the manifest names a blob that is gone
        fd = open_regular(blob)
        src = FdSource(fd)
        try:
            raw = read_raw(src)
            core = raw.core
            if core.kind != KIND_BLOB or core.context != self.raw_artifact.core.context:
                raise DecryptionError()
            keys = verify_with_dek(core, self._opened.dek)
            if not hmac.compare_digest(core.mac.hex(), e.header_mac) or core.plaintext_length != e.size:
                raise DecryptionError()  # a blob swapped in from elsewhere in the folder
            check_metadata(core, parse_json_object(decrypt_metadata(core, keys)))  # kind 3: exactly {}
            table = self._check(f"{BLOB_DIR}/{e.blob}", raw) if self._check else None
            return SealedReader(src, raw, keys, name=path, chunk_hashes=table)
        except BaseException:
            src.close()
            raise

    def read(self, path: str) -> bytes:
        with self.open(path) as r:
            return r.readall()


def require_folder_layout(root: Path) -> Path:
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise FormatError(f"{root} is not a sealed folder (no {MANIFEST_NAME})")
    return manifest
