"""What a signature commits to: sealed bytes, hashed without any key (docs/format.md, 10.2).

For each sealed file of an artifact (a sealed file alone, or a folder's
manifest and blobs): BLAKE3 of its core header (magic through header MAC;
the recipient slots are left out so rewrap and rotation keep signatures
valid; the key commitment inside the core still pins the data key) and
BLAKE3 over the table of per-chunk BLAKE3 hashes of the ciphertext. The
artifact digest hashes the sorted (path, header, chunks) triples. Reading is
parallel, one chunk at a time per thread, in constant memory, and bounded by what the
file actually holds (``check_holds``): a sparse file is refused before any hashing.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blake3 import blake3

from modelseal.errors import DecryptionError, FormatError, StorageError, VerificationError
from modelseal.format.file import RawArtifact, canonical_json, read_raw
from modelseal.format.folder import BLOB_DIR, MANIFEST_NAME
from modelseal.format.header import TAG_LEN, parse_core
from modelseal.format.source import CipherSource, FdSource
from modelseal.format.stream import CHUNK_HASH_LEN, ChunkLayout, chunk_hash, run_parallel
from modelseal.util.files import open_regular

FILE_PATH = "."  # the path of a lone sealed file inside its own artifact
SIGNATURES_NAME = "signatures.msig"
_BLOB_NAME = re.compile(r"[0-9a-f]{32}")
_HEADER_LABEL = b"modelseal/v1/header\x00"
_CHUNKS_LABEL = b"modelseal/v1/chunks\x00"
_ARTIFACT_LABEL = b"modelseal/v1/artifact\x00"


def header_digest(raw: RawArtifact) -> str:
    return blake3(_HEADER_LABEL + raw.core.raw).hexdigest()


def chunks_digest(table: bytes) -> str:
    if len(table) % CHUNK_HASH_LEN:
        raise VerificationError("a chunk table's length is not a multiple of 32")
    count = len(table) // CHUNK_HASH_LEN
    return blake3(_CHUNKS_LABEL + count.to_bytes(8, "big") + table).hexdigest()


@dataclass(frozen=True)
class FileCommitment:
    path: str  # inside the artifact: "." for a lone file, else "manifest.mseal" or "blobs/<id>"
    header: str
    chunks: str
    size: int  # ciphertext file length
    table: bytes  # 32-byte BLAKE3 per ciphertext chunk, in order

    def to_json(self) -> dict[str, Any]:
        return {
            "chunks": {"blake3": self.chunks},
            "header": {"blake3": self.header},
            "path": self.path,
            "size": self.size,
        }


def commit(path: str, raw: RawArtifact, table: bytes) -> FileCommitment:
    return FileCommitment(path, header_digest(raw), chunks_digest(table), raw.layout.file_length, table)


def check_holds(src: CipherSource, raw: RawArtifact, rel: str) -> None:
    """Refuse, before any hashing, a sealed file whose payload the file does not actually
    hold: a sparse file can claim 2^50 bytes of "ciphertext" in a few blocks, and hashing
    its holes would take days. Genuine ciphertext has no holes (a 4 KiB run of zeros
    occurs with probability 2^-32768); a hole in the header's zeroed slot, as a sparse
    copy makes, is not looked at. Where the file system cannot tell (no ``SEEK_HOLE``),
    or for a remote source, the work is bounded by the bytes a read actually returns."""
    start, end = raw.core.payload_offset, raw.layout.file_length
    if not isinstance(src, FdSource) or start >= end:
        return
    try:
        hole = os.lseek(src.fd, start, os.SEEK_HOLE)
    except OSError:
        return
    if hole < end:
        raise VerificationError(f"{rel}: the sealed file is sparse (no data at byte {hole}): not genuine ciphertext")


def hash_chunks(src: CipherSource, raw: RawArtifact, rel: str = FILE_PATH) -> bytes:
    """The chunk table of a sealed file, read and hashed in parallel (after ``check_holds``)."""
    check_holds(src, raw, rel)
    layout = raw.layout
    hashes: list[bytes] = [b""] * layout.count

    def job(run: range) -> None:
        buf = memoryview(bytearray(layout.chunk_size + TAG_LEN))
        for i in run:
            ct = buf[: layout.plain_len(i) + TAG_LEN]
            if src.readinto_at(ct, layout.offset(i)) != len(ct):
                raise VerificationError("the sealed file is truncated")
            hashes[i] = chunk_hash(ct)

    run_parallel(job, 0, layout.count)
    return b"".join(hashes)


def hash_sealed_file(path: Path, rel: str) -> tuple[RawArtifact, FileCommitment]:
    src = FdSource(open_regular(path))
    try:
        try:
            raw = read_raw(src)
        except (DecryptionError, FormatError):
            raise VerificationError(f"{rel}: not a sealed file, or its header is damaged or truncated") from None
        return raw, commit(rel, raw, hash_chunks(src, raw, rel))
    finally:
        src.close()


def artifact_digest(files: Iterable[FileCommitment]) -> str:
    rows = sorted([f.path, f.header, f.chunks] for f in files)
    return blake3(_ARTIFACT_LABEL + canonical_json(rows)).hexdigest()


def sealed_members(root: Path) -> list[str]:
    """The sealed files of an artifact, as artifact paths; refuses unexpected entries.

    A sealed folder holds exactly ``manifest.mseal``, ``blobs/<32 hex>`` files and
    optionally ``signatures.msig``. Anything else (an extra file, a symlink, a
    subfolder) is refused: it is not covered by any signature. So are two names for
    one file (hard links inside the folder): every name is hashed, and 32 links to one
    big blob would cost 32 times the work of what the disk holds. A sealed file never
    has a second name in its own folder (each is encrypted under its own salt), while
    links from elsewhere (``cp -al`` or ``rsync --link-dest`` backups) cost nothing more.
    """
    if not root.is_dir():
        return [FILE_PATH]
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    try:
        listing = sorted(os.listdir(root))
        blobs = sorted(os.listdir(root / BLOB_DIR)) if (root / BLOB_DIR).is_dir() else []
    except OSError as e:
        raise StorageError(f"cannot list {root}: {e.strerror}") from None
    for entry in listing:
        p = root / entry
        if entry == SIGNATURES_NAME and not p.is_symlink() and p.is_file():
            continue
        if entry == MANIFEST_NAME and _regular_once(p, seen):
            out.append(entry)
        elif entry == BLOB_DIR and not p.is_symlink() and p.is_dir():
            for blob in blobs:
                if not _BLOB_NAME.fullmatch(blob) or not _regular_once(p / blob, seen):
                    raise VerificationError(f"unexpected entry in the sealed folder: {BLOB_DIR}/{blob[:80]!r}")
                out.append(f"{BLOB_DIR}/{blob}")
        else:
            raise VerificationError(f"unexpected entry in the sealed folder: {entry[:80]!r}")
    if MANIFEST_NAME not in out:
        raise FormatError(f"{root} is not a sealed folder (no {MANIFEST_NAME})")
    return out


def _regular_once(path: Path, seen: set[tuple[int, int]]) -> bool:
    """Whether ``path`` is a regular file (not a symlink); refuses a file already seen
    under another name of the folder."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        return False
    if (st.st_dev, st.st_ino) in seen:
        raise VerificationError(f"{path.name[:80]!r} is a second name (hard link) of a file of the sealed folder")
    seen.add((st.st_dev, st.st_ino))
    return True


def member_path(root: Path, rel: str) -> Path:
    return root if rel == FILE_PATH else root / rel


def hash_artifact(root: Path) -> tuple[list[FileCommitment], dict[str, RawArtifact]]:
    """Commitments of every sealed file of the artifact at ``root`` (keyless)."""
    commits: list[FileCommitment] = []
    raws: dict[str, RawArtifact] = {}
    for rel in sealed_members(root):
        raw, c = hash_sealed_file(member_path(root, rel), rel)
        commits.append(c)
        raws[rel] = raw
    return commits, raws


def commit_written(rel: str, header: bytes, table: bytes) -> FileCommitment:
    """The commitment of a sealed file just written, from its header and the chunk
    hashes the encrypting threads collected (no re-read)."""
    core = parse_core(header)
    layout = ChunkLayout(core.chunk_size, core.plaintext_length, core.payload_offset)
    raw = RawArtifact(core, (b"", b""), layout)
    return commit(rel, raw, table)
