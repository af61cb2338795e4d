"""``unseal``: a sealed file or folder back to plaintext files (mode 0600), with the
model-signing bundle of a verified signature written beside them.

Nothing is replaced without ``force``, the bundle ``OUT.sig`` beside a file included, and
a bundle present beside an output always belongs to it, whenever a crash happens.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path, PurePosixPath

from modelseal.errors import DecryptionError, DestinationExists, PolicyDenied, StorageError, VerificationError
from modelseal.format.reader import SealedReader
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
    remove_path,
    replace,
    temp_sibling,
    write_atomic,
    write_new,
)
from modelseal.util.hardening import secret_buffer

_OUT_WINDOW = 16 << 20


def _write_plain(reader: SealedReader, dst: Path, progress: Progress | None) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    buf = secret_buffer(min(_OUT_WINDOW, max(reader.size, 1)))  # plaintext: out of core dumps
    try:
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
        buf[:] = bytes(len(buf))  # no plaintext left behind in this process either


def unseal(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: Progress | None = None,
    keys: KeyService | None = None,
    verify: Verify = None,
    expect_name: str | None = None,
    expect_env: str | None = None,
) -> Path:
    """Decrypt a sealed file or folder back to plaintext at ``dst`` (files mode 0600).

    If the artifact carries a signature with an OpenSSF model-signing bundle,
    it is written as ``dst/model.sig`` (a folder) or ``dst.sig`` (a file), for
    ``model_signing verify key``. With a trust policy only a verified
    signature's bundle is used. ``expect_name`` and ``expect_env`` pin the signed name
    and the environment, as for ``open``.
    """
    src_p, dst_p = Path(src), Path(dst)
    check_keys_apart(dst_p)
    if is_within(src_p, dst_p):
        raise PolicyDenied("the destination must not contain the source")
    if src_p.is_dir():
        with (
            open_folder(src_p, keys=keys, verify=verify, expect_name=expect_name, expect_env=expect_env) as folder,
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
            for d in sorted({tmp / parent for e in folder.entries() for parent in PurePosixPath(e.path).parents}):
                fsync_dir(d)
        return dst_p
    opened = open_sealed(src_p, keys=keys, verify=verify, expect_name=expect_name, expect_env=expect_env)
    sig_p = dst_p.with_name(dst_p.name + ".sig")
    with opened as r:
        bundle = _oms_bundle(src_p, r.verdict, r.attachment_key)
        if not force and os.path.lexists(sig_p):
            raise DestinationExists(f"{sig_p} already exists (use --force to replace it)")
        staged = temp_sibling(sig_p) if bundle is not None else None
        try:
            if staged is not None and bundle is not None:
                _write_new(staged, bundle)

            def commit(tmp: Path, dst: Path, force: bool) -> None:
                _place_with_bundle(tmp, dst, force, staged, sig_p)

            with atomic_output(dst_p, force, commit=commit) as tmp:
                _write_plain(r, tmp, progress)
        finally:
            if staged is not None:
                remove_path(staged)
    return dst_p


def _write_new(path: Path, data: bytes) -> None:
    try:
        write_new(path, data, mode=0o644)
    except OSError as e:
        if not isinstance(e, FileExistsError):  # ours, half written
            remove_path(path)
        raise StorageError(f"cannot write {path}: {e.strerror}") from None


def _place_with_bundle(tmp: Path, dst: Path, force: bool, staged: Path | None, sig: Path) -> None:
    """Move the plaintext file and its bundle (if any) into place. The old bundle is moved
    away first and the new one comes last, so a crash leaves at worst no bundle, never one
    that belongs to the other file; a failure puts the old bundle back."""
    aside = temp_sibling(sig, "old") if force and os.path.lexists(sig) else None
    try:
        if aside is not None:
            os.rename(sig, aside)
        try:
            replace(tmp, dst, force)
        except BaseException:
            if aside is not None:
                back, aside = aside, None
                os.rename(back, sig)
            raise
        if staged is not None:
            if force:
                os.replace(staged, sig)
            else:
                _link_or_undo(staged, sig, dst)
        fsync_dir(sig.parent)
    except OSError as e:
        raise StorageError(f"cannot move {sig} into place: {e.strerror}") from None
    finally:
        if aside is not None:
            remove_path(aside)


def _link_or_undo(staged: Path, sig: Path, dst: Path) -> None:
    """Without --force a bundle created meanwhile is kept, and the output just linked
    into place (ours) is taken back rather than left beside a bundle of another file."""
    try:
        os.link(staged, sig)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()
        raise DestinationExists(f"{sig} already exists (use --force to replace it)") from None


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
