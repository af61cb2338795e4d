"""``open`` and ``open_folder``: random-access readers over sealed files and folders, verified
against the trust policy when one is configured, and refused when sealed for another
environment than the one expected (``expect_env=``, ``expecting(env=)``, config.toml's
``host_env``), with or without a policy.

Nothing is decrypted here beyond the header and the manifest; readers decrypt the chunks
they are asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

from modelseal.errors import DecryptionError, FormatError
from modelseal.format.envelope import attachment_key
from modelseal.format.file import RawArtifact, open_keys, read_raw
from modelseal.format.folder import (
    MANIFEST_NAME,
    MAX_MANIFEST,
    SealedFolder,
    read_manifest,
    require_folder_layout,
)
from modelseal.format.header import (
    KIND_FILE,
    KIND_MANIFEST,
)
from modelseal.format.reader import SealedReader
from modelseal.format.source import FdSource
from modelseal.keys.service import KeyService
from modelseal.recipes.context import (
    Verify,
    expected_env,
    service,
    unwrapper,
    verdict_for,
)
from modelseal.signing.commitment import FILE_PATH
from modelseal.signing.verification import Verdict, check_env, reader_check
from modelseal.util.files import (
    open_regular,
)


def open_raw(path: Path, flags: int = os.O_RDONLY) -> tuple[FdSource, RawArtifact]:
    src = FdSource(open_regular(path, flags))
    try:
        return src, read_raw(src)
    except BaseException:
        src.close()
        raise


def open(  # noqa: A001
    path: str | os.PathLike[str],
    member: str | None = None,
    *,
    keys: KeyService | None = None,
    verify: Verify = None,
    expect_name: str | None = None,
    expect_env: str | None = None,
) -> SealedReader:
    """Open a sealed file (or one ``member`` of a sealed folder) for random-access reading.

    ``verify``: ``None`` verifies signatures when a trust policy is configured,
    ``True`` requires one, ``False`` skips, or pass a ``TrustPolicy``. Verified
    readers check every chunk they read against the signed chunk table.
    ``expect_name`` (or ``expecting()``) also requires the signed artifact name;
    ``expect_env`` (or ``expecting(env=)``, or config.toml's ``host_env``) the
    environment the artifact is sealed for, whether or not a policy is configured.
    """
    p = Path(path)
    if p.is_dir():
        if member is None:
            raise FormatError(f"{p} is a sealed folder: name a member, or use open_folder()")
        folder = open_folder(p, keys=keys, verify=verify, expect_name=expect_name, expect_env=expect_env)
        return folder.open(member)
    if member is not None:
        raise FormatError(f"{p} is not a sealed folder: it has no member {member!r}")
    owner = enclosing_folder(p)
    if owner is not None:  # members are found through the manifest only, never by their path on disk
        raise FormatError(f"{p} lies inside the sealed folder {owner}: open that folder and name the member")
    env = expected_env(keys, expect_env)
    return open_sealed_file(p, keys, verdict_for(p, verify, keys, expect_name, env), expect_env=env)


def enclosing_folder(path: Path) -> Path | None:
    """The sealed folder that ``path`` lies inside, if any (a file planted there is no member)."""
    for parent in path.absolute().parents:
        if (parent / MANIFEST_NAME).is_file():
            return parent
    return None


def open_sealed_file(
    p: Path, keys: KeyService | None, verdict: Verdict | None, *, expect_env: str | None = None
) -> SealedReader:
    """Open a sealed file; with a verdict, its header must be the verified one and every
    chunk read is checked against the verified chunk table. With ``expect_env``, a file
    sealed for another environment is refused before any key is asked for."""
    src, raw = open_raw(p)
    try:
        if raw.core.kind != KIND_FILE:
            raise FormatError(f"{p} is part of a sealed folder, not a sealed file; open the folder")
        check_env(dict(raw.core.context).get("env", ""), expect_env, str(p))
        table = reader_check(verdict)(FILE_PATH, raw)
        opened = open_keys(raw, unwrapper(service(keys), raw), src)
        reader = SealedReader(src, raw, opened.keys, name=str(p), chunk_hashes=table)
        reader.recipients = opened.slot.recipients
        reader.attachment_key = attachment_key(opened.dek, raw.core.salt, raw.core.binding)
        reader.verdict = verdict
        return reader
    except BaseException:
        src.close()
        raise


def open_folder(
    path: str | os.PathLike[str],
    *,
    keys: KeyService | None = None,
    verify: Verify = None,
    expect_name: str | None = None,
    expect_env: str | None = None,
) -> SealedFolder:
    """Open a sealed folder (``verify``, ``expect_name`` and ``expect_env`` as for ``open``)."""
    root = Path(path)
    require_folder_layout(root)
    owner = enclosing_folder(root)
    if owner is not None:  # a sealed folder planted inside another is none of its members
        raise FormatError(f"{root} lies inside the sealed folder {owner}: open that folder and name the member")
    env = expected_env(keys, expect_env)
    return open_sealed_folder(root, keys, verdict_for(root, verify, keys, expect_name, env), expect_env=env)


def open_sealed_folder(
    root: Path, keys: KeyService | None, verdict: Verdict | None, *, expect_env: str | None = None
) -> SealedFolder:
    """Open a sealed folder; with a verdict, as ``open_sealed_file`` for the manifest and blobs."""
    manifest = root / MANIFEST_NAME
    check = reader_check(verdict)
    src, raw = open_raw(manifest)
    try:
        if raw.core.kind != KIND_MANIFEST:  # an intact header of another kind: not a folder
            raise FormatError(f"{manifest} is not a sealed folder's manifest (kind {raw.core.kind})")
        if raw.core.plaintext_length > MAX_MANIFEST:
            raise DecryptionError()
        check_env(dict(raw.core.context).get("env", ""), expect_env, str(root))
        table = check(MANIFEST_NAME, raw)
        opened = open_keys(raw, unwrapper(service(keys), raw), src)
        with SealedReader(src, raw, opened.keys, owns_src=False, chunk_hashes=table) as r:
            entries = read_manifest(r)
    finally:
        src.close()
    folder = SealedFolder(root, raw, opened, entries, check if verdict is not None and verdict.signed else None)
    folder.verdict = verdict
    return folder


def primary_file(path: Path) -> Path:
    return path / MANIFEST_NAME if path.is_dir() else path
