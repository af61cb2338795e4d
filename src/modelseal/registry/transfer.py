"""``push`` and ``pull``: a sealed file or folder to and from an OCI registry (docs/push-pull.md).

``push`` hashes every sealed file of the artifact, uploads the blobs the registry lacks (a
few at once, big ones in resumable chunks), then the manifest under the tag, then the
signature file as a referrer (``registry.layout``), listed under the ``sha256-<hex>`` tag too
when the registry does not index referrers itself (no ``OCI-Subject`` in its answer).

``pull`` fetches into a partial folder beside ``DST`` (``download``): every blob's SHA-256
checked, each file's sealed header kind checked, then the signatures verified under the trust
policy (``recipes.verify``) on the assembled artifact, and only then is it renamed into
``DST``: a folder in one swap, a file together with its ``.msig`` (``signing.sigfile``). A
refused artifact (a digest, header, signature or policy failure, a registry refusal) leaves
nothing behind; an interrupted pull leaves its hidden partial folder, and the next pull of
the same manifest resumes from it. Only ciphertext is ever written.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from modelseal.audit.events import AuditSink
from modelseal.errors import FormatError, ModelsealError, RegistryError, RegistryRefused, StorageError
from modelseal.format.file import read_raw
from modelseal.format.header import KIND_BLOB, KIND_FILE, KIND_MANIFEST
from modelseal.format.source import FdSource
from modelseal.recipes import verify as recipes_verify
from modelseal.recipes.context import Verify, policy_for
from modelseal.registry import download, layout, renewing, settings, upload
from modelseal.registry.client import Repository, sha256_file
from modelseal.registry.layout import Descriptor
from modelseal.registry.progress import Progress, ProgressCallback
from modelseal.registry.reference import Reference, parse_reference
from modelseal.registry.transport import RegistryUnavailable, Transport
from modelseal.signing import pending
from modelseal.signing.commitment import sealed_members
from modelseal.signing.evaluation import Verdict
from modelseal.signing.sigfile import MAX_SIGFILE, SignatureFile, now_rfc3339, signature_path, signed_output
from modelseal.util.files import check_destination, open_regular, read_limited, remove_path, replace

MAX_SIGNATURE_CANDIDATES = 8
_KINDS = {layout.FILE_PATH: KIND_FILE, layout.MANIFEST_PATH: KIND_MANIFEST}


@dataclass(frozen=True)
class Pushed:
    reference: str
    digest: str  # of the artifact's manifest
    size: int  # bytes of sealed files
    sent: int  # bytes uploaded in this run
    signatures: str | None  # digest of the signature referrer, if one was attached


@dataclass(frozen=True)
class Pulled:
    path: Path
    digest: str
    size: int
    verdict: Verdict | None  # None: no trust policy in force


def open_repository(
    ref: Reference,
    *,
    tls_dir: str | os.PathLike[str] | None = None,
    pins: Sequence[str] | None = None,
    endpoints: Sequence[str] | None = None,
    sink: AuditSink | None = None,
    transport: Transport | None = None,
) -> Repository:
    """The repository of ``ref`` over ``transport`` or a new one from the settings in force."""
    if transport is None:
        s = settings.load(endpoints=endpoints, tls_dir=tls_dir, pins=pins)
        transport = Transport(settings.endpoints_for(ref, s), settings.require_tls_dir(s), s.pins, sink=sink)
        renewing.renew_if_due(transport)
    return Repository(transport, ref.name)


def _check_kind(path: Path, rel: str) -> None:
    fd = open_regular(path)
    try:
        kind = read_raw(FdSource(fd)).core.kind
    finally:
        os.close(fd)
    if kind != _KINDS.get(rel, KIND_BLOB):
        raise FormatError("a layer of the artifact is not the kind of sealed file its place needs")


def _signature_bytes(root: Path) -> bytes | None:
    sigpath = signature_path(root)
    data = pending.journaled(sigpath, MAX_SIGFILE)
    if data is None:
        try:
            data = read_limited(sigpath, MAX_SIGFILE, StorageError, str(sigpath), regular=True)
        except FileNotFoundError:
            return None
    SignatureFile.parse(data)  # never publish a malformed one
    return data


def push(
    sealed_path: str | os.PathLike[str],
    ref: str,
    *,
    tls_dir: str | os.PathLike[str] | None = None,
    pins: Sequence[str] | None = None,
    endpoints: Sequence[str] | None = None,
    jobs: int = 4,
    chunk: int = upload.CHUNK,
    mount_from: str | None = None,
    progress: ProgressCallback | None = None,
    sink: AuditSink | None = None,
    transport: Transport | None = None,
) -> Pushed:
    """Push the sealed file or folder at ``sealed_path`` to ``HOST:PORT/REPO:TAG``."""
    root = Path(sealed_path)
    r = parse_reference(ref)
    if r.tag is None:
        raise RegistryError("push needs a tag (HOST:PORT/REPO:TAG)")
    if not root.exists():
        raise StorageError(f"{root} does not exist")
    members = sealed_members(root)
    for rel in members:
        _check_kind(root if rel == layout.FILE_PATH else root / rel, rel)
    sig = _signature_bytes(root)
    repo = open_repository(r, tls_dir=tls_dir, pins=pins, endpoints=endpoints, sink=sink, transport=transport)
    paths = {rel: root if rel == layout.FILE_PATH else root / rel for rel in members}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        hashed = dict(zip(members, pool.map(lambda rel: sha256_file(paths[rel]), members), strict=True))
        layers = [layout.layer_for(rel, *hashed[rel]) for rel in members]
        manifest = layout.artifact_manifest(layers)
        total = sum(size for _, size in hashed.values())
        bar = Progress(f"push {r.name}:{r.tag}", total, progress)
        state_dir = settings.cache_dir(settings.load()) / "uploads" if transport is None else None
        futures = [
            pool.submit(
                upload.upload_blob,
                repo,
                paths[layer.path],
                layer.descriptor.digest,
                layer.descriptor.size,
                bar,
                chunk=chunk,
                state_dir=state_dir,
                mount_from=mount_from,
            )
            for layer in layers
        ]
        sent = sum(f.result() for f in futures)
    bar.finish()
    repo.put_blob_bytes(layout.EMPTY_BYTES)
    digest, _ = repo.put_manifest(r.tag, manifest, layout.IMAGE_MANIFEST)
    subject = Descriptor(layout.IMAGE_MANIFEST, digest, len(manifest))
    attached = attach_signatures(repo, subject, sig) if sig is not None else None
    return Pushed(str(r), digest, total, sent, attached)


def _referrers(repo: Repository, digest: str) -> tuple[list[Descriptor], bool]:
    """The signature referrers of ``digest`` (newest first), and whether the API listed them."""
    found = repo.referrers(digest, layout.SIGNATURES)
    if found is not None:
        return layout.newest_signatures(found), True
    index = repo.get_manifest(layout.fallback_tag(digest))
    return (layout.newest_signatures(layout.parse_index(index[0])) if index else []), False


def attach_signatures(repo: Repository, subject: Descriptor, data: bytes) -> str:
    """Attach the signature file ``data`` to the artifact ``subject`` as a referrer (once: an
    identical signature file already attached is reused); returns the referrer's digest."""
    sig_digest = layout.sha256_digest(data)
    existing, _ = _referrers(repo, subject.digest)
    for d in existing[:MAX_SIGNATURE_CANDIDATES]:
        got = repo.get_manifest(d.digest)
        if got is not None and layout.parse_signature_manifest(got[0], subject.digest).digest == sig_digest:
            return d.digest
    repo.put_blob_bytes(data)
    created = now_rfc3339()
    body = layout.signature_manifest(Descriptor(layout.SIGNATURES, sig_digest, len(data)), subject, created)
    digest, indexed = repo.put_manifest(layout.sha256_digest(body), body, layout.IMAGE_MANIFEST)
    if not indexed:  # no referrers API: the tag-scheme fallback (read, add, write back)
        tag = layout.fallback_tag(subject.digest)
        index = repo.get_manifest(tag)
        listed = layout.parse_index(index[0]) if index else []
        entry = Descriptor(layout.IMAGE_MANIFEST, digest, len(body), {layout.CREATED_ANNOTATION: created})
        entry = Descriptor(entry.media_type, entry.digest, entry.size, entry.annotations, layout.SIGNATURES)
        if all(d.digest != digest for d in listed):
            repo.put_manifest(tag, layout.referrers_index([*listed, entry]), layout.IMAGE_INDEX)
    return digest


def fetch_signatures(repo: Repository, digest: str) -> bytes | None:
    """The newest signature file attached to the artifact ``digest``, digest-checked (None: unsigned)."""
    found, _ = _referrers(repo, digest)
    if not found:
        return None
    got = repo.get_manifest(found[0].digest)
    if got is None:
        raise RegistryError("the registry lists a signature manifest it does not have")
    layer = layout.parse_signature_manifest(got[0], digest)
    if layer.size > MAX_SIGFILE:
        raise RegistryError("the registry's signature file is larger than any modelseal writes")
    with repo.blob(layer.digest) as resp:
        data = resp.read(MAX_SIGFILE + 1)
    if layout.sha256_digest(data) != layer.digest:
        raise RegistryError("the signature file does not hash to its digest: refused")
    return data


def _assemble(partial: Path, layers: list[layout.Layer], files: dict[str, Path], sig: bytes | None) -> Path:
    if [x.path for x in layers] == [layout.FILE_PATH]:
        out = partial / "artifact"
        os.replace(files[layers[0].descriptor.digest], out)
        _check_kind(out, layout.FILE_PATH)
        if sig is not None:
            (partial / "artifact.msig").write_bytes(sig)
        return out
    out = partial / "out"
    remove_path(out)
    (out / "blobs").mkdir(mode=0o700, parents=True)
    for x in layers:
        os.replace(files[x.descriptor.digest], out / x.path)
        _check_kind(out / x.path, x.path)
    if sig is not None:
        (out / "signatures.msig").write_bytes(sig)
    return out


def _lock(partial: Path) -> int:
    fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StorageError(f"another pull into {partial.parent} of this artifact is running") from None
    return fd


def pull(
    ref: str,
    dst: str | os.PathLike[str],
    *,
    tls_dir: str | os.PathLike[str] | None = None,
    pins: Sequence[str] | None = None,
    endpoints: Sequence[str] | None = None,
    verify: Verify = None,
    strict: bool | None = None,
    expect_name: str | None = None,
    expect_env: str | None = None,
    force: bool = False,
    jobs: int = 4,
    part: int = download.PART,
    progress: ProgressCallback | None = None,
    sink: AuditSink | None = None,
    transport: Transport | None = None,
) -> Pulled:
    """Pull ``HOST:PORT/REPO:TAG`` (or ``@sha256:...``) into ``dst``, verified first (module doc).
    ``verify``: None takes the trust policy in force, if any; True requires one; False skips
    signatures (digests and headers are checked all the same); or a ``TrustPolicy``."""
    r = parse_reference(ref)
    out_path = Path(dst)
    check_destination(out_path, force)
    policy = policy_for(verify, None)
    if strict and policy is None:
        raise ValueError("strict verification needs a trust policy (verify=, MODELSEAL_TRUST or config.toml)")
    repo = open_repository(r, tls_dir=tls_dir, pins=pins, endpoints=endpoints, sink=sink, transport=transport)
    got = repo.get_manifest(r.reference)
    if got is None:
        raise RegistryRefused(f"the registry has no artifact {r} (404 MANIFEST_UNKNOWN)", 404, "MANIFEST_UNKNOWN")
    manifest, digest = got
    layers = layout.parse_artifact(manifest)
    if len({x.descriptor.digest for x in layers}) != len(layers):
        raise RegistryError("the artifact names one blob twice: refused")
    partial = download.partial_folder(out_path.parent / f".{out_path.name}.pull-{digest[7:23]}")
    lock = _lock(partial)
    try:
        total = sum(x.descriptor.size for x in layers)
        bar = Progress(f"pull {r.name}", total, progress)
        files = download.fetch_all(repo, [x.descriptor for x in layers], partial, bar, jobs=jobs, part=part)
        bar.finish()
        sig = fetch_signatures(repo, digest)
        out = _assemble(partial, layers, files, sig)
        verdict = None
        if policy is not None:
            verdict = recipes_verify.verify_artifact(
                out, policy, strict=strict, deep=True, expect_name=expect_name, expect_env=expect_env
            )
        _move(out, out_path, force, sig is not None)
    except RegistryUnavailable:
        raise  # interrupted, not refused: the partial folder stays for the next pull to resume
    except ModelsealError:
        remove_path(partial)
        raise
    finally:
        os.close(lock)
    remove_path(partial)
    return Pulled(out_path, digest, total, verdict)


def _move(out: Path, dst: Path, force: bool, signed: bool) -> None:
    if out.is_dir():
        replace(out, dst, force)
        return
    with signed_output(dst, force) as tmp:
        os.replace(out, tmp)
        if signed:
            os.replace(out.with_name(out.name + ".msig"), pending.file_signature_path(tmp))


def resolve(ref: str, **kw: object) -> tuple[Reference, str]:
    """``ref`` and the digest of the manifest it names now (a tag resolved once)."""
    r = parse_reference(ref)
    repo = open_repository(r, **kw)  # type: ignore[arg-type]
    got = repo.get_manifest(r.reference)
    if got is None:
        raise RegistryRefused(f"the registry has no artifact {r} (404 MANIFEST_UNKNOWN)", 404, "MANIFEST_UNKNOWN")
    return r, got[1]


__all__ = ["Pulled", "Pushed", "attach_signatures", "fetch_signatures", "pull", "push", "resolve"]
