"""The pending signature file: replacing a sealed file ``X`` together with ``X.msig`` as one
crash-safe step.

Two files cannot be renamed at once. So before a new ``X`` is renamed into place, its
signature file is written to ``.X.msig.pending`` with the header digest (docs/format.md,
11.1) of that new ``X``. A reader takes the pending file instead of ``X.msig`` exactly
when the artifact now at ``X`` has that header, so after a crash at any point the
artifact and the signatures a reader sees agree; the next writer of ``X`` rolls forward
or back (``settle``). The pending file grants nothing: whoever can write it can write
``X.msig``, and what it holds is verified like any signature file.

Owns the pending file's name and layout and the order of the renames; knows nothing of
what a signature file holds. A sealed folder needs none of this: its ``signatures.msig``
is inside it and the folder is swapped in one step (``util.files.replace``).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import re
from collections.abc import Iterator
from pathlib import Path

from modelseal.errors import DestinationExists, ModelsealError, StorageError
from modelseal.format.file import read_raw
from modelseal.format.folder import MANIFEST_NAME
from modelseal.format.source import FdSource
from modelseal.signing.commitment import SIGNATURES_NAME, header_digest
from modelseal.util.files import atomic_output, fsync_dir, open_regular, read_limited, replace, write_atomic

_MAGIC = b"modelseal/v1/pending-signatures\n"
_DIGEST = re.compile(rb"[0-9a-f]{64}\n")
_HEAD = len(_MAGIC) + 65


def file_signature_path(artifact: Path) -> Path:
    """The signature file of a sealed *file* (``X.msig`` beside ``X``)."""
    return artifact.with_name(artifact.name + ".msig")


def journal_path(sigpath: Path) -> Path:
    return sigpath.with_name(f".{sigpath.name}.pending")


def _header_of(path: Path) -> str | None:
    """The header digest of the sealed file at ``path``; None if it is not one."""
    try:
        src = FdSource(open_regular(path))
    except ModelsealError:
        return None
    try:
        return header_digest(read_raw(src))
    except (ModelsealError, OSError):
        return None
    finally:
        src.close()


def _read_journal(sigpath: Path, limit: int) -> tuple[bytes, bytes] | None:
    """(header digest, signature file bytes) of the pending file; None if there is none
    or it is not one (a damaged or foreign file is ignored, as if absent)."""
    try:
        raw = read_limited(journal_path(sigpath), _HEAD + limit, StorageError, "a pending signature file", regular=True)
    except (FileNotFoundError, StorageError):
        return None
    if not raw.startswith(_MAGIC) or not _DIGEST.fullmatch(raw, len(_MAGIC), _HEAD):
        return None
    return raw[len(_MAGIC) : _HEAD - 1], raw[_HEAD:]


def _in_force(sigpath: Path, limit: int) -> tuple[bytes, bytes] | None:
    """The pending file, if it belongs to the artifact now at the place ``sigpath`` signs."""
    if not os.path.lexists(journal_path(sigpath)) or not sigpath.name.endswith(".msig"):
        return None  # the common case costs one lstat
    artifact = sigpath.with_name(sigpath.name.removesuffix(".msig"))
    try:
        # Written by whoever wrote the artifact: in a shared sticky folder (/tmp) another
        # user could create this name, though not replace the signature file itself.
        if os.lstat(journal_path(sigpath)).st_uid != os.stat(artifact).st_uid:
            return None
    except OSError:
        return None
    entry = _read_journal(sigpath, limit)
    if entry is None:
        return None
    have = _header_of(artifact)
    return entry if have is not None and hmac.compare_digest(have.encode(), entry[0]) else None


def journaled(sigpath: Path, limit: int) -> bytes | None:
    """What a reader must take instead of ``sigpath``: the pending signature file of an
    interrupted replacement whose new artifact is in place. None otherwise."""
    entry = _in_force(sigpath, limit)
    return None if entry is None else entry[1]


def _drop(journal: Path) -> None:
    try:
        journal.unlink()
        fsync_dir(journal.parent)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"cannot remove {journal}: {e.strerror}") from None


def write_signatures(sigpath: Path, data: bytes, limit: int) -> None:
    """Save a signature file. If a pending file is in force it is updated first, so a
    crash before it is dropped cannot bring back the signatures it held."""
    journal = journal_path(sigpath)
    entry = _in_force(sigpath, limit)
    if entry is not None:
        write_atomic(journal, _MAGIC + entry[0] + b"\n" + data, mode=0o644)
    # Inside a sealed folder any other name makes it unverifiable: stage the temp file
    # beside the folder, so a crash cannot leave one inside.
    inside = sigpath.name == SIGNATURES_NAME and (sigpath.parent / MANIFEST_NAME).is_file()
    write_atomic(sigpath, data, mode=0o644, staging=sigpath.parent.parent if inside else None)
    if os.path.lexists(journal) and _read_journal(sigpath, limit) is not None:
        _drop(journal)


def settle(artifact: Path, limit: int) -> None:
    """Finish a replacement of the sealed file ``artifact`` that a crash interrupted:
    roll the pending signature file forward if its artifact is in place, else drop it."""
    sigpath = file_signature_path(artifact)
    journal = journal_path(sigpath)
    if not os.path.lexists(journal) or _read_journal(sigpath, limit) is None:
        return  # none, or not one of ours: readers ignore it, and so do writers
    data = journaled(sigpath, limit)
    if data is not None:
        write_atomic(sigpath, data, mode=0o644)
    _drop(journal)


def _commit(tmp: Path, dst: Path, force: bool, limit: int) -> None:
    """Move the sealed file ``tmp`` and its signature file (if the caller wrote one at
    ``file_signature_path(tmp)``) into place at ``dst``: first the pending file, then
    the artifact (the commit point), then its signature file."""
    staged, sigpath = file_signature_path(tmp), file_signature_path(dst)
    if not os.path.lexists(staged):
        replace(tmp, dst, force)
        return
    try:
        data = read_limited(staged, limit, StorageError, str(staged), regular=True)
    except FileNotFoundError:
        raise StorageError(f"{staged} disappeared") from None
    digest = _header_of(tmp)
    if digest is None:
        raise StorageError(f"{tmp} is not a complete sealed file")
    journal = journal_path(sigpath)
    write_atomic(journal, _MAGIC + digest.encode() + b"\n" + data, mode=0o644)
    try:
        replace(tmp, dst, force)
    except BaseException:
        if _header_of(dst) != digest:  # not committed: the old artifact keeps its signatures
            _drop(journal)
        raise
    try:
        os.replace(staged, sigpath)
        fsync_dir(sigpath.parent)
    except OSError as e:
        raise StorageError(f"cannot move {sigpath} into place ({e.strerror}); it stays in {journal}") from None
    _drop(journal)


@contextlib.contextmanager
def signed_output(dst: Path, force: bool, limit: int) -> Iterator[Path]:
    """``atomic_output`` for a sealed file and its signature file.

    The caller writes the new artifact at the yielded temp path and, if it has any
    signatures (new ones, or the old ones as history), their file at
    ``file_signature_path(tmp)``. Without ``force`` an existing signature file is not
    replaced either.
    """
    settle(dst, limit)
    sigpath = file_signature_path(dst)
    if not force and os.path.lexists(sigpath):
        raise DestinationExists(f"{sigpath} already exists (use --force to replace it)")
    staged: Path | None = None
    try:
        with atomic_output(dst, force, commit=lambda t, d, f: _commit(t, d, f, limit)) as tmp:
            staged = file_signature_path(tmp)
            yield tmp
    finally:
        if staged is not None:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
