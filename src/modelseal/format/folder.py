"""Sealed model folders: the encrypted manifest and opening its members.

Owns the manifest schema (docs/format.md, section 8), its strict validation
(no absolute or ``..`` paths, no duplicates, opaque blob names) and
``SealedFolder``, which unwraps the data key once and opens any member as a
``SealedReader``, checking that the blob is the one the manifest names.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from modelseal.errors import DecryptionError, FormatError
from modelseal.format.envelope import Opened, attachment_key, verify_with_dek
from modelseal.format.file import RawArtifact, SealedReader, canonical_json, parse_json_object, read_raw
from modelseal.format.header import KIND_BLOB
from modelseal.format.source import FdSource
from modelseal.util.files import open_regular

MANIFEST_NAME = "manifest.mseal"
BLOB_DIR = "blobs"
MANIFEST_FORMAT = "modelseal-manifest/1"
MAX_MANIFEST = 64 << 20
MAX_ENTRIES = 100_000
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


def is_safe_relpath(path: str) -> bool:
    if not path or "\x00" in path or "\\" in path or path.startswith("/"):
        return False
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a non-UTF-8 file name (surrogate-escaped by os.walk)
        return False
    parts = PurePosixPath(path).parts
    return all(p not in ("", ".", "..") for p in parts) and "/".join(parts) == path


def encode_manifest(entries: list[Entry]) -> bytes:
    return canonical_json({"format": MANIFEST_FORMAT, "files": [e.to_json() for e in entries]})


def parse_manifest(data: bytes) -> list[Entry]:
    """Strictly validate a decrypted manifest. Any defect is a DecryptionError: the
    manifest is authenticated, so a bad one means a bad (or malicious) sealer."""
    doc = parse_json_object(data)
    if set(doc) != {"files", "format"} or canonical_json(doc) != data:
        raise DecryptionError()  # only the one canonical encoding is accepted
    files = doc.get("files")
    if doc.get("format") != MANIFEST_FORMAT or not isinstance(files, list) or len(files) > MAX_ENTRIES:
        raise DecryptionError()
    out: list[Entry] = []
    seen_paths: set[str] = set()
    seen_blobs: set[str] = set()
    for f in files:
        if not isinstance(f, dict) or set(f) != {"blob", "header_mac", "path", "sha256", "size"}:
            raise DecryptionError()
        path, blob, mac, digest, size = f["path"], f["blob"], f["header_mac"], f["sha256"], f["size"]
        if not (isinstance(path, str) and is_safe_relpath(path)) or path in seen_paths:
            raise DecryptionError()
        if not (isinstance(blob, str) and _HEX32.fullmatch(blob)) or blob in seen_blobs:
            raise DecryptionError()
        if not (
            isinstance(mac, str) and _HEX64.fullmatch(mac) and isinstance(digest, str) and _HEX64.fullmatch(digest)
        ):
            raise DecryptionError()
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise DecryptionError()
        if out and path.encode() <= out[-1].path.encode():
            raise DecryptionError()  # entries must be sorted by path bytes
        seen_paths.add(path)
        seen_blobs.add(blob)
        out.append(Entry(path, size, digest, blob, mac))
    # A file and a folder of the same name cannot both exist.
    prefixes = {str(p) for e in out for p in PurePosixPath(e.path).parents}
    if prefixes & seen_paths:
        raise DecryptionError()
    return out


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
