"""The recipes: seal, unseal, open, inspect, rewrap, reencrypt.

Safe defaults and no algorithm knobs. This is the only layer that combines
files, keys and the format; the CLI is a thin shell over it. Outputs are
written to a temporary name beside the destination, fsynced and renamed, so a
failure at any point leaves the destination (and the source) as they were.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .artifact import (
    RawArtifact,
    SealedReader,
    canonical_json,
    open_keys,
    read_raw,
    write_sealed,
)
from .envelope import HeaderPlan, artifact_id, new_dek
from .errors import DecryptionError, FormatError, PolicyDenied, StorageError
from .folder import (
    BLOB_DIR,
    MANIFEST_NAME,
    MAX_ENTRIES,
    MAX_MANIFEST,
    Entry,
    SealedFolder,
    encode_manifest,
    is_safe_relpath,
    parse_manifest,
)
from .fsutil import atomic_output, fsync_dir, is_within, open_regular, open_walked, walk_folder
from .header import (
    DEFAULT_CHUNK_LOG2,
    DEFAULT_SLOT,
    KIND_BLOB,
    KIND_FILE,
    KIND_MANIFEST,
    Recipient,
    normalize_context,
)
from .keys import KeyService
from .keystore import modelseal_home
from .source import FdSource
from .stream import Progress, ReadAt, WritebackHint, fd_reader

_OUT_WINDOW = 16 << 20
_service: KeyService | None = None


def key_service() -> KeyService:
    global _service
    if _service is None:
        _service = KeyService()
    return _service


def _svc(keys: KeyService | None) -> KeyService:
    return keys or key_service()


@dataclass(frozen=True)
class SealResult:
    path: Path
    artifact_id: str
    files: int
    bytes: int
    recipients: tuple[str, ...]


def _check_keys_apart(*paths: Path) -> None:
    home = modelseal_home()
    for p in paths:
        if is_within(home, p):
            raise PolicyDenied(f"the keystore ({home}) lies inside {p}: keys must never be stored beside the data")


def _unwrapper(svc: KeyService, raw: RawArtifact, op: str = "unwrap") -> Callable[[Recipient], bytes]:
    aid = artifact_id(raw.core.binding)
    return lambda r: svc.unwrap(r, raw.core.context, aid, op=op)


def _seal_stream(
    read_at: ReadAt,
    length: int,
    dst: Path,
    *,
    kind: int,
    dek: bytes,
    context: tuple[tuple[str, str], ...],
    metadata: Callable[[str], bytes],
    recipients: Callable[[str], tuple[Recipient, ...]],
    progress: Progress | None,
) -> tuple[str, str, str]:
    """Seal one plaintext into a new file ``dst``. Returns (artifact id, sha256 hex, header MAC hex)."""
    plan = HeaderPlan(
        dek=dek,
        kind=kind,
        chunk_log2=DEFAULT_CHUNK_LOG2,
        plaintext_length=length,
        context=context,
        slot_size=DEFAULT_SLOT,
    )
    recips = recipients(plan.artifact_id) if kind != KIND_BLOB else ()
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        digest = write_sealed(read_at, fd, plan, metadata, len(metadata("0" * 64)), recips, progress)
    finally:
        os.close(fd)
    return plan.artifact_id, digest, plan.mac.hex()


FolderSource = Iterator[tuple[str, int, ReadAt]]


def _write_folder(
    tmp: Path,
    sources: FolderSource,
    dek: bytes,
    ctx: tuple[tuple[str, str], ...],
    recipients: Callable[[str], tuple[Recipient, ...]],
    progress: Progress | None,
) -> tuple[str, list[Entry]]:
    """Seal each (path, length, reader) as an opaque blob, then the manifest naming them."""
    (tmp / BLOB_DIR).mkdir(mode=0o700)
    entries: list[Entry] = []
    for rel, length, read_at in sources:
        blob = secrets.token_hex(16)
        _, digest, mac = _seal_stream(
            read_at,
            length,
            tmp / BLOB_DIR / blob,
            kind=KIND_BLOB,
            dek=dek,
            context=ctx,
            metadata=lambda _d: b"{}",
            recipients=lambda _a: (),
            progress=progress,
        )
        entries.append(Entry(rel, length, digest, blob, mac))
    fsync_dir(tmp / BLOB_DIR)
    manifest = encode_manifest(entries)
    aid, _, _ = _seal_stream(
        _bytes_reader(manifest),
        len(manifest),
        tmp / MANIFEST_NAME,
        kind=KIND_MANIFEST,
        dek=dek,
        context=ctx,
        metadata=lambda d: canonical_json({"files": len(entries), "sha256": d}),
        recipients=recipients,
        progress=None,
    )
    return aid, entries


def _new_data_key(
    svc: KeyService, key_uris: list[str], context: tuple[tuple[str, str], ...]
) -> tuple[bytes, tuple[Recipient, ...]]:
    """A fresh DEK: from the first recipient's provider if it makes data keys (AWS KMS
    GenerateDataKey), else from the OS CSPRNG. Returns it with that first wrap, if any."""
    made = svc.generate(key_uris[0], context)
    if made is None:
        return new_dek(), ()
    return made[0], (made[1],)


def _wrap_all(
    svc: KeyService,
    key_uris: Sequence[str],
    dek: bytes,
    context: tuple[tuple[str, str], ...],
    op: str = "wrap",
    made: tuple[Recipient, ...] = (),
) -> Callable[[str], tuple[Recipient, ...]]:
    """Wrap ``dek`` for every key, reusing the wraps already ``made`` (by GenerateDataKey)."""

    def wrap(aid: str) -> tuple[Recipient, ...]:
        return made + tuple(svc.wrap(k, dek, context, aid, op=op) for k in key_uris[len(made) :])

    return wrap


def _as_list(key: str | Sequence[str]) -> list[str]:
    keys = [key] if isinstance(key, str) else list(key)
    if not keys:
        raise ValueError("at least one key is needed")
    return keys


def resolve_context(
    svc: KeyService, context: Mapping[str, str] | None, env: str | None, project: str | None
) -> dict[str, str]:
    """The encryption context, which always carries ``env`` (the config's default if not given)."""
    ctx = dict(context or {})
    for name, value in (("env", env), ("project", project)):
        if value is not None:
            if ctx.get(name, value) != value:
                raise ValueError(f"{name}={value} disagrees with the context's {name}={ctx[name]}")
            ctx[name] = value
    ctx.setdefault("env", svc.config.default_env)
    return ctx


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
) -> SealResult:
    """Seal a file or a model folder at ``src`` into ``dst`` under one or more KEKs.

    The encryption context always carries ``env``. Without ``key``, the keys are
    those config.toml lists for the environment (and project).
    """
    src_p, dst_p = Path(src), Path(dst)
    svc = _svc(keys)
    full_ctx = resolve_context(svc, context, env, project)
    if key is None:
        key = svc.config.keys_for(full_ctx["env"], full_ctx.get("project"))
        if not key:
            raise ValueError(f"no key given, and config.toml lists no keys for env={full_ctx['env']}")
    key_uris, ctx = _as_list(key), normalize_context(full_ctx)
    _check_keys_apart(src_p, dst_p)
    if not src_p.exists():
        raise StorageError(f"{src_p} does not exist")
    if src_p.resolve() == dst_p.resolve() or is_within(dst_p, src_p):
        raise PolicyDenied("the destination must not be the source or lie inside it")
    dek, made = _new_data_key(svc, key_uris, ctx)
    wrap = _wrap_all(svc, key_uris, dek, ctx, made=made)
    if src_p.is_dir():
        return _seal_folder(src_p, dst_p, key_uris, ctx, dek, wrap, force, progress)
    fd = open_regular(src_p)
    try:
        length = os.fstat(fd).st_size
        with atomic_output(dst_p, force) as tmp:
            name = src_p.name

            def meta(digest: str) -> bytes:
                return canonical_json({"name": name, "sha256": digest, "size": length})

            aid, _, _ = _seal_stream(
                fd_reader(fd),
                length,
                tmp,
                kind=KIND_FILE,
                dek=dek,
                context=ctx,
                metadata=meta,
                recipients=wrap,
                progress=progress,
            )
    finally:
        os.close(fd)
    return SealResult(dst_p, aid, 1, length, tuple(key_uris))


def _check_sealable(paths: list[str]) -> None:
    """Refuse, before writing anything, a folder that readers would refuse to open."""
    for rel in paths:
        if not is_safe_relpath(rel):
            raise PolicyDenied(f"the file name {rel!r} cannot be sealed (backslash or not UTF-8)")
    if len(paths) > MAX_ENTRIES:
        raise PolicyDenied(f"a sealed folder holds at most {MAX_ENTRIES} files; this one has {len(paths)}")
    probe = encode_manifest([Entry(rel, 2**63, "0" * 64, "0" * 32, "0" * 64) for rel in paths])
    if len(probe) > MAX_MANIFEST:
        raise PolicyDenied("the folder's manifest would exceed 64 MiB; split it into several artifacts")


def _seal_folder(
    src: Path,
    dst: Path,
    key_uris: list[str],
    ctx: tuple[tuple[str, str], ...],
    dek: bytes,
    wrap: Callable[[str], tuple[Recipient, ...]],
    force: bool,
    progress: Progress | None,
) -> SealResult:
    files = walk_folder(src)
    _check_sealable([rel for rel, _, _ in files])

    def sources() -> FolderSource:
        for rel, real, file_id in files:
            fd = open_walked(real, file_id)
            try:
                yield rel, os.fstat(fd).st_size, fd_reader(fd)
            finally:
                os.close(fd)

    with atomic_output(dst, force, is_dir=True) as tmp:
        aid, entries = _write_folder(tmp, sources(), dek, ctx, wrap, progress)
    return SealResult(dst, aid, len(entries), sum(e.size for e in entries), tuple(key_uris))


def _bytes_reader(data: bytes) -> ReadAt:
    view = memoryview(data)

    def read_at(buf: memoryview, offset: int) -> None:
        buf[:] = view[offset : offset + len(buf)]

    return read_at


def _open_raw(path: Path, flags: int = os.O_RDONLY) -> tuple[FdSource, RawArtifact]:
    src = FdSource(open_regular(path, flags))
    try:
        return src, read_raw(src)
    except BaseException:
        src.close()
        raise


def open(path: str | os.PathLike[str], member: str | None = None, *, keys: KeyService | None = None) -> SealedReader:  # noqa: A001
    """Open a sealed file (or one ``member`` of a sealed folder) for random-access reading."""
    p = Path(path)
    if p.is_dir():
        if member is None:
            raise FormatError(f"{p} is a sealed folder: name a member, or use open_folder()")
        folder = open_folder(p, keys=keys)
        return folder.open(member)
    src, raw = _open_raw(p)
    try:
        if raw.core.kind != KIND_FILE:
            raise FormatError(f"{p} is part of a sealed folder, not a sealed file; open the folder")
        opened = open_keys(raw, _unwrapper(_svc(keys), raw), src)
        reader = SealedReader(src, raw, opened.keys, name=str(p))
        reader.recipients = opened.slot.recipients
        return reader
    except BaseException:
        src.close()
        raise


def open_folder(path: str | os.PathLike[str], *, keys: KeyService | None = None) -> SealedFolder:
    root = Path(path)
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise FormatError(f"{root} is not a sealed folder (no {MANIFEST_NAME})")
    src, raw = _open_raw(manifest)
    try:
        if raw.core.kind != KIND_MANIFEST or raw.core.plaintext_length > MAX_MANIFEST:
            raise DecryptionError()
        opened = open_keys(raw, _unwrapper(_svc(keys), raw), src)
        with SealedReader(src, raw, opened.keys, owns_src=False) as r:
            entries = parse_manifest(r.readall())
    finally:
        src.close()
    return SealedFolder(root, raw, opened, entries)


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
) -> Path:
    """Decrypt a sealed file or folder back to plaintext at ``dst`` (files mode 0600)."""
    src_p, dst_p = Path(src), Path(dst)
    _check_keys_apart(dst_p)
    if is_within(src_p, dst_p):
        raise PolicyDenied("the destination must not contain the source")
    if src_p.is_dir():
        with open_folder(src_p, keys=keys) as folder, atomic_output(dst_p, force, is_dir=True) as tmp:
            for e in folder.entries():
                out = tmp / e.path
                out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with folder.open(e.path) as r:
                    _write_plain(r, out, progress)
            for d in sorted({p for e in folder.entries() for p in (tmp / e.path).parents if is_within(p, tmp)}):
                fsync_dir(d)
        return dst_p
    with open(src_p, keys=keys) as r, atomic_output(dst_p, force) as tmp:
        _write_plain(r, tmp, progress)
    return dst_p


def _target(path: Path) -> Path:
    return path / MANIFEST_NAME if path.is_dir() else path
