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
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import oms
from .artifact import (
    RawArtifact,
    SealedReader,
    canonical_json,
    open_keys,
    read_raw,
    write_sealed,
)
from .commitment import FILE_PATH, FileCommitment, artifact_digest, commit_written, hash_artifact
from .envelope import HeaderPlan, artifact_id, attachment_key, new_dek
from .errors import DecryptionError, FormatError, PolicyDenied, StorageError, VerificationError
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
from .fsutil import atomic_output, fsync_dir, is_within, open_regular, open_walked, walk_folder, write_atomic
from .header import (
    DEFAULT_CHUNK_LOG2,
    DEFAULT_SLOT,
    KIND_BLOB,
    KIND_FILE,
    KIND_MANIFEST,
    Recipient,
    normalize_context,
    parse_core,
)
from .keys import KeyService
from .keystore import modelseal_home
from .sigfile import PAYLOAD_TYPE as SIG_PAYLOAD_TYPE
from .sigfile import SignatureFile, open_attachment, seal_attachment, signature_path, supersede
from .signing import Signer, verify_envelope
from .source import FdSource
from .stream import Progress, ReadAt, WritebackHint, fd_reader
from .trust import TrustPolicy, load_policy
from .verification import Verdict, add_signature, reader_check, verify_artifact

TRUST_ENV = "MODELSEAL_TRUST"
Verify = bool | TrustPolicy | None
_EXPECTED_NAME: ContextVar[str | None] = ContextVar("modelseal_expected_name", default=None)


@contextmanager
def expecting(name: str) -> Iterator[None]:
    """Within the block, verify-on-load also requires artifacts to be signed as ``name``.

    Without it, any artifact that satisfies the policy's rules for *its own* signed
    name is accepted, so a differently named artifact could be swapped in::

        with modelseal.expecting("llama-7b"):
            weights = modelseal.safetensors.load_file("models/llama-7b.sealed")
    """
    token = _EXPECTED_NAME.set(name)
    try:
        yield
    finally:
        _EXPECTED_NAME.reset(token)


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
    signature: str | None = None  # id of the signature made while sealing


def trust_policy(keys: KeyService | None = None) -> TrustPolicy | None:
    """The configured trust policy: ``$MODELSEAL_TRUST`` (empty: none), else config.toml's."""
    env = os.environ.get(TRUST_ENV)
    if env is not None:
        return load_policy(env) if env else None
    path = _svc(keys).config.trust_policy
    return load_policy(path) if path else None


def _policy(verify: Verify, keys: KeyService | None) -> TrustPolicy | None:
    if isinstance(verify, TrustPolicy):
        return verify
    if verify is False:
        return None
    policy = trust_policy(keys)
    if verify is True and policy is None:
        raise ValueError(f"verify=True, but no trust policy is configured ({TRUST_ENV} or trust_policy in config.toml)")
    return policy


def _verdict(path: Path, verify: Verify, keys: KeyService | None, expect_name: str | None = None) -> Verdict | None:
    """Verify-on-load: signatures, policy and revocations now; chunks as they are read."""
    policy = _policy(verify, keys)
    name = expect_name or _EXPECTED_NAME.get()
    return None if policy is None else verify_artifact(path, policy, deep=False, expect_name=name)


def _sign_new(
    root: Path,
    signer: Signer,
    name: str,
    commits: list[FileCommitment],
    header: bytes,
    dek: bytes,
    bundle: Callable[[], bytes],
) -> str:
    """Sign a just-sealed artifact; with an ECDSA key also attach the OMS bundle, encrypted."""
    core = parse_core(header)

    def attach(entry: Any) -> None:
        if oms.supports(signer):
            key = attachment_key(dek, core.salt, core.binding)
            entry.oms = seal_attachment(key, entry.id, bundle())

    return add_signature(root, signer, name, commits, core, attach=attach).id


def _check_keys_apart(*paths: Path) -> None:
    home = modelseal_home()
    for p in paths:
        if is_within(home, p):
            raise PolicyDenied(f"the keystore ({home}) lies inside {p}: keys must never be stored beside the data")


def _unwrapper(svc: KeyService, raw: RawArtifact, op: str = "unwrap") -> Callable[[Recipient], bytes]:
    aid = artifact_id(raw.core.binding)
    return lambda r: svc.unwrap(r, raw.core.context, aid, op=op)


@dataclass(frozen=True)
class _Written:
    artifact_id: str
    sha256: str
    mac: str
    header: bytes
    table: bytes | None  # BLAKE3 per ciphertext chunk, when signing


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
    hash_chunks: bool = False,
) -> _Written:
    """Seal one plaintext into a new file ``dst`` (collecting chunk hashes if signing)."""
    plan = HeaderPlan(
        dek=dek,
        kind=kind,
        chunk_log2=DEFAULT_CHUNK_LOG2,
        plaintext_length=length,
        context=context,
        slot_size=DEFAULT_SLOT,
    )
    recips = recipients(plan.artifact_id) if kind != KIND_BLOB else ()
    table: list[bytes] | None = None
    if hash_chunks:
        table = [b""] * max(1, -(-length // plan.chunk_size))
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        digest, header = write_sealed(
            read_at, fd, plan, metadata, len(metadata("0" * 64)), recips, progress, chunk_hashes=table
        )
    finally:
        os.close(fd)
    return _Written(plan.artifact_id, digest, plan.mac.hex(), header, b"".join(table) if table is not None else None)


FolderSource = Iterator[tuple[str, int, ReadAt]]


@dataclass
class _Folder:
    artifact_id: str
    entries: list[Entry]
    commits: list[FileCommitment]
    manifest_header: bytes


def _write_folder(
    tmp: Path,
    sources: FolderSource,
    dek: bytes,
    ctx: tuple[tuple[str, str], ...],
    recipients: Callable[[str], tuple[Recipient, ...]],
    progress: Progress | None,
    hash_chunks: bool = False,
) -> _Folder:
    """Seal each (path, length, reader) as an opaque blob, then the manifest naming them."""
    (tmp / BLOB_DIR).mkdir(mode=0o700)
    entries: list[Entry] = []
    commits: list[FileCommitment] = []
    for rel, length, read_at in sources:
        blob = secrets.token_hex(16)
        w = _seal_stream(
            read_at,
            length,
            tmp / BLOB_DIR / blob,
            kind=KIND_BLOB,
            dek=dek,
            context=ctx,
            metadata=lambda _d: b"{}",
            recipients=lambda _a: (),
            progress=progress,
            hash_chunks=hash_chunks,
        )
        entries.append(Entry(rel, length, w.sha256, blob, w.mac))
        if w.table is not None:
            commits.append(commit_written(f"{BLOB_DIR}/{blob}", w.header, w.table))
    fsync_dir(tmp / BLOB_DIR)
    manifest = encode_manifest(entries)
    w = _seal_stream(
        _bytes_reader(manifest),
        len(manifest),
        tmp / MANIFEST_NAME,
        kind=KIND_MANIFEST,
        dek=dek,
        context=ctx,
        metadata=lambda d: canonical_json({"files": len(entries), "sha256": d}),
        recipients=recipients,
        progress=None,
        hash_chunks=hash_chunks,
    )
    if w.table is not None:
        commits.append(commit_written(MANIFEST_NAME, w.header, w.table))
    return _Folder(w.artifact_id, entries, commits, w.header)


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
    sign_key: Signer | None = None,
    name: str | None = None,
) -> SealResult:
    """Seal a file or a model folder at ``src`` into ``dst`` under one or more KEKs.

    The encryption context always carries ``env``. Without ``key``, the keys are
    those config.toml lists for the environment (and project). With
    ``sign_key`` the artifact is signed in the same pass (chunk hashes are taken
    as chunks are encrypted) under the artifact ``name`` (default: the source's
    file name); see docs/signing.md.
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
    name = name or src_p.resolve().name
    if src_p.is_dir():
        return _seal_folder(src_p, dst_p, key_uris, ctx, dek, wrap, force, progress, sign_key, name)
    fd = open_regular(src_p)
    sig_id = None
    try:
        length = os.fstat(fd).st_size
        with atomic_output(dst_p, force) as tmp:
            file_name = src_p.name

            def meta(digest: str) -> bytes:
                return canonical_json({"name": file_name, "sha256": digest, "size": length})

            w = _seal_stream(
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
            # Signed before the sealed file is renamed into place: if signing fails (a
            # Transit server down, say), nothing is replaced and no unsigned output appears.
            if sign_key is not None and w.table is not None:
                commits = [commit_written(FILE_PATH, w.header, w.table)]
                bundle = lambda: oms.bundle_for_file(sign_key, name, w.sha256)  # noqa: E731
                sig_id = _sign_new(dst_p, sign_key, name, commits, w.header, dek, bundle)
    finally:
        os.close(fd)
    if sign_key is None:  # replaced with --force: signatures of the old file become history
        supersede(signature_path(dst_p), signature_path(dst_p))
    return SealResult(dst_p, w.artifact_id, 1, length, tuple(key_uris), sig_id)


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
    sign_key: Signer | None = None,
    name: str = "",
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

    sig_id = None
    with atomic_output(dst, force, is_dir=True) as tmp:
        f = _write_folder(tmp, sources(), dek, ctx, wrap, progress, hash_chunks=sign_key is not None)
        if dst.is_dir():  # replaced with --force: its signatures become history
            supersede(signature_path(dst), signature_path(tmp))
        if sign_key is not None:
            rows = [(e.path, e.sha256) for e in f.entries]
            bundle = lambda: oms.bundle_for_folder(sign_key, name, rows)  # noqa: E731
            sig_id = _sign_new(tmp, sign_key, name, f.commits, f.manifest_header, dek, bundle)
    return SealResult(dst, f.artifact_id, len(f.entries), sum(e.size for e in f.entries), tuple(key_uris), sig_id)


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


def open(  # noqa: A001
    path: str | os.PathLike[str],
    member: str | None = None,
    *,
    keys: KeyService | None = None,
    verify: Verify = None,
    expect_name: str | None = None,
) -> SealedReader:
    """Open a sealed file (or one ``member`` of a sealed folder) for random-access reading.

    ``verify``: ``None`` verifies signatures when a trust policy is configured,
    ``True`` requires one, ``False`` skips, or pass a ``TrustPolicy``. Verified
    readers check every chunk they read against the signed chunk table.
    ``expect_name`` (or ``expecting()``) also requires the signed artifact name.
    """
    p = Path(path)
    if p.is_dir():
        if member is None:
            raise FormatError(f"{p} is a sealed folder: name a member, or use open_folder()")
        folder = open_folder(p, keys=keys, verify=verify, expect_name=expect_name)
        return folder.open(member)
    return _open_file(p, keys, _verdict(p, verify, keys, expect_name))


def _open_file(p: Path, keys: KeyService | None, verdict: Verdict | None) -> SealedReader:
    """Open a sealed file; with a verdict, its header must be the verified one and every
    chunk read is checked against the verified chunk table."""
    src, raw = _open_raw(p)
    try:
        if raw.core.kind != KIND_FILE:
            raise FormatError(f"{p} is part of a sealed folder, not a sealed file; open the folder")
        table = reader_check(verdict)(FILE_PATH, raw)
        opened = open_keys(raw, _unwrapper(_svc(keys), raw), src)
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
) -> SealedFolder:
    """Open a sealed folder (``verify`` as for ``open``)."""
    root = Path(path)
    if not (root / MANIFEST_NAME).is_file():
        raise FormatError(f"{root} is not a sealed folder (no {MANIFEST_NAME})")
    return _open_folder(root, keys, _verdict(root, verify, keys, expect_name))


def _open_folder(root: Path, keys: KeyService | None, verdict: Verdict | None) -> SealedFolder:
    """Open a sealed folder; with a verdict, as ``_open_file`` for the manifest and blobs."""
    manifest = root / MANIFEST_NAME
    check = reader_check(verdict)
    src, raw = _open_raw(manifest)
    try:
        if raw.core.kind != KIND_MANIFEST or raw.core.plaintext_length > MAX_MANIFEST:
            raise DecryptionError()
        table = check(MANIFEST_NAME, raw)
        opened = open_keys(raw, _unwrapper(_svc(keys), raw), src)
        with SealedReader(src, raw, opened.keys, owns_src=False, chunk_hashes=table) as r:
            entries = parse_manifest(r.readall())
    finally:
        src.close()
    folder = SealedFolder(root, raw, opened, entries, check if verdict is not None and verdict.signed else None)
    folder.verdict = verdict
    return folder


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
    _check_keys_apart(dst_p)
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
    with open(src_p, keys=keys, verify=verify, expect_name=expect_name) as r, atomic_output(dst_p, force) as tmp:
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


def _target(path: Path) -> Path:
    return path / MANIFEST_NAME if path.is_dir() else path


def sign(
    path: str | os.PathLike[str],
    sign_key: Signer,
    *,
    name: str | None = None,
    oms_bundle: bool = False,
    keys: KeyService | None = None,
) -> str:
    """Add a signature to an existing sealed artifact (a second signer, or a re-sign
    after an update); returns its id. Needs no decryption key unless ``oms_bundle``,
    which opens the artifact to sign its plaintext digests for model-signing too.
    Signatures that no longer match the artifact move to the signature history."""
    root = Path(path)
    commits, raws = hash_artifact(root)
    primary = raws.get(FILE_PATH) or raws.get(MANIFEST_NAME)
    if primary is None:
        raise FormatError(f"{root} is not a sealed artifact")
    name = name or _previous_name(root, sign_key, commits) or _default_name(root)
    attach: Callable[[Any], None] | None = None
    if oms_bundle:
        if not oms.supports(sign_key):
            raise ValueError("model-signing verifies ECDSA signatures only: sign with a P-256 key for --oms")
        # The plaintext digests must come from the very bytes just hashed and about to be
        # signed: the reader is pinned to those headers and chunks, so a manifest swapped
        # in meanwhile cannot put its digests into this signer's model-signing bundle.
        pinned = Verdict.pinned(root, commits)
        if root.is_dir():
            with _open_folder(root, keys, pinned) as folder:
                rows = [(e.path, e.sha256) for e in folder.entries()]
                key = folder.attachment_key()
            bundle = oms.bundle_for_folder(sign_key, name, rows)
        else:
            with _open_file(root, keys, pinned) as r:
                digest = r.metadata().get("sha256")
                key = r.attachment_key
            if not isinstance(digest, str):
                raise DecryptionError()
            bundle = oms.bundle_for_file(sign_key, name, digest)

        def attach(entry: Any) -> None:
            entry.oms = seal_attachment(key, entry.id, bundle)

    return add_signature(root, sign_key, name, commits, primary.core, attach=attach).id


def _previous_name(root: Path, signer: Signer, commits: list[FileCommitment]) -> str | None:
    """The name this signer already gave *this* artifact: its own signature that verifies
    and commits to these very files. Never a name from someone else's entry, nor from a
    genuine signature of another artifact copied into the file."""
    sf = SignatureFile.load(signature_path(root))
    if sf is None:
        return None
    mine = {signer.public.key_id: signer.public}
    digest = artifact_digest(commits)
    for e in reversed(sf.signatures):
        if (
            e.keyid == signer.public.key_id
            and e.statement.digest == digest
            and e.statement.matches(commits)
            and verify_envelope(SIG_PAYLOAD_TYPE, e.statement.raw, e.sigs, mine)
        ):
            return e.statement.name
    return None


def _default_name(root: Path) -> str:
    name = root.resolve().name
    for suffix in (".msealed", ".sealed", ".mseal"):
        name = name.removesuffix(suffix)
    return name
