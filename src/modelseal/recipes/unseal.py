"""``unseal``: a sealed file or folder back to plaintext files (mode 0600), with the
model-signing bundle of a verified signature written beside them.
"""

from __future__ import annotations

import os
from pathlib import Path

from modelseal.errors import DecryptionError, PolicyDenied, StorageError, VerificationError
from modelseal.format.file import SealedReader
from modelseal.format.stream import Progress, WritebackHint
from modelseal.keys.service import KeyService
from modelseal.recipes.context import (
    Verify,
    check_keys_apart,
)
from modelseal.recipes.opening import open as open_sealed
from modelseal.recipes.opening import open_folder
from modelseal.signing import oms
from modelseal.signing.sigfile import SignatureFile, open_attachment, signature_path
from modelseal.signing.verification import Verdict
from modelseal.util.files import (
    atomic_output,
    fsync_dir,
    is_within,
    write_atomic,
)

_OUT_WINDOW = 16 << 20


def _write_plain(reader: SealedReader, dst: Path, progress: Progress | None) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        buf = memoryview(bytearray(min(_OUT_WINDOW, max(reader.size, 1))))
        off = 0
        writeback = WritebackHint(fd)
        while off < reader.size:
            n = reader.preadinto(off, buf)
            view = buf[:n]
            while view:
                view = view[os.write(fd, view) :]
            off += n
            writeback.advance(off)
            if progress is not None:
                progress(n)
        os.fsync(fd)
    except OSError as e:
        raise StorageError(f"write failed: {e.strerror}") from None
    finally:
        os.close(fd)


def unseal(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: Progress | None = None,
    keys: KeyService | None = None,
    verify: Verify = None,
    expect_name: str | None = None,
) -> Path:
    """Decrypt a sealed file or folder back to plaintext at ``dst`` (files mode 0600).

    If the artifact carries a signature with an OpenSSF model-signing bundle,
    it is written as ``dst/model.sig`` (a folder) or ``dst.sig`` (a file), for
    ``model_signing verify key``. With a trust policy only a verified
    signature's bundle is used.
    """
    src_p, dst_p = Path(src), Path(dst)
    check_keys_apart(dst_p)
    if is_within(src_p, dst_p):
        raise PolicyDenied("the destination must not contain the source")
    if src_p.is_dir():
        with (
            open_folder(src_p, keys=keys, verify=verify, expect_name=expect_name) as folder,
            atomic_output(dst_p, force, is_dir=True) as tmp,
        ):
            for e in folder.entries():
                out = tmp / e.path
                out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with folder.open(e.path) as r:
                    _write_plain(r, out, progress)
            bundle = _oms_bundle(src_p, folder.verdict, folder.attachment_key())
            if bundle is not None and oms.SIGNATURE_NAME not in folder:
                write_atomic(tmp / oms.SIGNATURE_NAME, bundle, mode=0o644)
            for d in sorted({p for e in folder.entries() for p in (tmp / e.path).parents if is_within(p, tmp)}):
                fsync_dir(d)
        return dst_p
    with open_sealed(src_p, keys=keys, verify=verify, expect_name=expect_name) as r, atomic_output(dst_p, force) as tmp:
        _write_plain(r, tmp, progress)
        bundle = _oms_bundle(src_p, r.verdict, r.attachment_key)
    if bundle is not None:
        write_atomic(dst_p.with_name(dst_p.name + ".sig"), bundle, mode=0o644)
    return dst_p


def _oms_bundle(src: Path, verdict: Verdict | None, key: bytes) -> bytes | None:
    """The newest OMS bundle attached to a signature (a verified one, under a policy)."""
    if verdict is not None:
        entries = verdict.valid_entries
    else:
        try:
            sf = SignatureFile.load(signature_path(src))
        except VerificationError:
            return None  # unverified unseal: a damaged signature file only costs the bundle
        entries = sf.signatures if sf else []
    for entry in reversed(entries):
        if entry.oms:
            try:
                return open_attachment(key, entry)
            except DecryptionError:
                continue  # an attachment from another artifact, or damaged: not ours to write
    return None
