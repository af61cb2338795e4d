"""``seal``: a file or a model folder into a sealed artifact, optionally signed in the same pass.

The output is built under a temporary name beside the destination and renamed into place;
signing happens before the rename, so a failed signing replaces nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelseal.errors import PolicyDenied, StorageError
from modelseal.format.envelope import attachment_key
from modelseal.format.file import canonical_json
from modelseal.format.header import (
    KIND_FILE,
    Recipient,
    normalize_context,
    parse_core,
)
from modelseal.format.stream import Progress, ReadAt, fd_reader
from modelseal.governance import localpolicy
from modelseal.keys.service import KeyService
from modelseal.recipes.context import (
    check_keys_apart,
    key_list,
    resolve_context,
    service,
)
from modelseal.recipes.writing import (
    Shard,
    check_sealable,
    new_data_key,
    seal_stream,
    wrap_all,
    write_folder,
)
from modelseal.signing import oms
from modelseal.signing.commitment import FILE_PATH, FileCommitment, commit_written
from modelseal.signing.sigfile import seal_attachment, signature_path, signed_output, supersede
from modelseal.signing.signers import Signer
from modelseal.signing.verification import add_signature
from modelseal.util.files import (
    FileId,
    atomic_output,
    is_within,
    open_regular,
    open_walked,
    walk_folder,
)
from modelseal.util.home import modelseal_home


@dataclass(frozen=True)
class SealResult:
    path: Path
    artifact_id: str
    files: int
    bytes: int
    recipients: tuple[str, ...]
    signature: str | None = None  # id of the signature made while sealing


def _sign_new(
    root: Path,
    signer: Signer,
    name: str,
    commits: list[FileCommitment],
    header: bytes,
    dek: bytes,
    bundle: Callable[[], bytes],
    version: int | None = None,
) -> str:
    """Sign a just-sealed artifact; with an ECDSA key also attach the OMS bundle, encrypted."""
    core = parse_core(header)

    def attach(entry: Any) -> None:
        if oms.supports(signer):
            key = attachment_key(dek, core.salt, core.binding)
            entry.oms = seal_attachment(key, entry.id, bundle())

    return add_signature(root, signer, name, commits, core, attach=attach, version=version).id


def seal(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    key: str | Sequence[str] | None = None,
    context: Mapping[str, str] | None = None,
    *,
    env: str | None = None,
    project: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    keys: KeyService | None = None,
    sign_key: Signer | None = None,
    name: str | None = None,
    version: int | None = None,
) -> SealResult:
    """Seal a file or a model folder at ``src`` into ``dst`` under one or more KEKs.

    The encryption context always carries ``env``. Without ``key``, the keys are
    those config.toml lists for the environment (and project). With
    ``sign_key`` the artifact is signed in the same pass (chunk hashes are taken
    as chunks are encrypted) under the artifact ``name`` (default: the source's
    file name) as ``version`` of it (default: one more than this signer's last);
    see docs/signing.md.
    """
    src_p, dst_p = Path(src), Path(dst)
    if version is not None and (sign_key is None or version < 1):
        raise ValueError("version is the artifact version a signature vouches for: 1 or more, with sign_key")
    svc = service(keys)
    full_ctx = resolve_context(svc, context, env, project)
    if key is None:
        key = svc.config.keys_for(full_ctx["env"], full_ctx.get("project"))
        if not key:
            raise ValueError(f"no key given, and config.toml lists no keys for env={full_ctx['env']}")
    key_uris, ctx = key_list(key), normalize_context(full_ctx)
    check_keys_apart(src_p, dst_p)
    if not src_p.exists():
        raise StorageError(f"{src_p} does not exist")
    if src_p.resolve() == dst_p.resolve() or is_within(dst_p, src_p):
        raise PolicyDenied("the destination must not be the source or lie inside it")
    # The encryption standards (docs/governance.md), before anything is wrapped or written:
    # a logged warning, or StandardViolation under [governance] standards = "enforce".
    localpolicy.check_seal(svc, key_uris, full_ctx["env"])
    dek, made = new_data_key(svc, key_uris, ctx)
    wrap = wrap_all(svc, key_uris, dek, ctx, made=made)
    name = name or src_p.resolve().name
    if src_p.is_dir():
        return _seal_folder(src_p, dst_p, key_uris, ctx, dek, wrap, force, progress, sign_key, name, version)
    fd = open_regular(src_p)
    sig_id = None
    try:
        length = os.fstat(fd).st_size
        # The new file and its signature file (the old one's signatures as history, plus
        # the new signature) are staged beside ``dst`` and move into place together: a
        # crash at any point leaves an artifact whose signatures agree with it.
        with signed_output(dst_p, force) as tmp:
            file_name = src_p.name

            def meta(digest: str) -> bytes:
                return canonical_json({"name": file_name, "sha256": digest, "size": length})

            w = seal_stream(
                fd_reader(fd),
                length,
                tmp,
                kind=KIND_FILE,
                dek=dek,
                context=ctx,
                metadata=meta,
                recipients=wrap,
                progress=progress,
                hash_chunks=sign_key is not None,
            )
            supersede(signature_path(dst_p), signature_path(tmp))
            # Signed before the sealed file is renamed into place: if signing fails (a
            # Transit server down, say), nothing is replaced and no unsigned output appears.
            if sign_key is not None and w.table is not None:
                commits = [commit_written(FILE_PATH, w.header, w.table)]
                bundle = lambda: oms.bundle_for_file(sign_key, name, w.sha256)  # noqa: E731
                sig_id = _sign_new(tmp, sign_key, name, commits, w.header, dek, bundle, version)
    finally:
        os.close(fd)
    return SealResult(dst_p, w.artifact_id, 1, length, tuple(key_uris), sig_id)


def _seal_folder(
    src: Path,
    dst: Path,
    key_uris: list[str],
    ctx: tuple[tuple[str, str], ...],
    dek: bytes,
    wrap: Callable[[str], tuple[Recipient, ...]],
    force: bool,
    progress: Progress | None,
    sign_key: Signer | None = None,
    name: str = "",
    version: int | None = None,
) -> SealResult:
    files = walk_folder(src, refuse=modelseal_home())  # not even through a bind mount inside
    check_sealable([rel for rel, _, _ in files])

    def opener(real: Path, file_id: FileId) -> Callable[[], AbstractContextManager[tuple[int, ReadAt]]]:
        @contextmanager
        def open_one() -> Iterator[tuple[int, ReadAt]]:
            fd = open_walked(real, file_id)
            try:
                yield os.fstat(fd).st_size, fd_reader(fd)
            finally:
                os.close(fd)

        return open_one

    shards = [Shard(rel, opener(real, file_id)) for rel, real, file_id in files]  # sealed in parallel
    sig_id = None
    with atomic_output(dst, force, is_dir=True) as tmp:
        f = write_folder(tmp, shards, dek, ctx, wrap, progress, hash_chunks=sign_key is not None)
        if dst.is_dir():  # replaced with --force: its signatures become history
            supersede(signature_path(dst), signature_path(tmp))
        if sign_key is not None:
            rows = [(e.path, e.sha256) for e in f.entries]
            bundle = lambda: oms.bundle_for_folder(sign_key, name, rows)  # noqa: E731
            sig_id = _sign_new(tmp, sign_key, name, f.commits, f.manifest_header, dek, bundle, version)
    return SealResult(dst, f.artifact_id, len(f.entries), sum(e.size for e in f.entries), tuple(key_uris), sig_id)
