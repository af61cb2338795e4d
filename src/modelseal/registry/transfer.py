"""``push`` and ``pull``: a sealed file or folder to and from an OCI registry (docs/push-pull.md).

``push`` hashes every sealed file of the artifact, uploads the blobs the registry lacks (a
few at once, big ones in resumable chunks), then the manifest under the tag, then the
signature file as a referrer (``registry.layout``), listed under the ``sha256-<hex>`` tag too
when the registry does not index referrers itself (no ``OCI-Subject`` in its answer).

``pull`` fetches into a partial folder beside ``DST`` (``download``): sizes bounded (1 TiB,
``layout.check_sizes``) and checked against the free space first, every blob's SHA-256
checked, each file's sealed header kind checked, then the signatures verified under the trust
policy (``recipes.verify``) on the assembled artifact, and only then is it renamed into
``DST``: a folder in one swap, a file together with its ``.msig`` (``signing.sigfile``).

Signatures: the newest ``MAX_SIGNATURE_CANDIDATES`` signature referrers are fetched (each
bounded, digest-checked, parsed; junk skipped), and only signature files whose statements
commit to this artifact's sealed files count (``download.fits``). Under a trust policy the
first of them that verifies is kept, and if none does the pull is refused, naming how many
were tried; with none at all the policy judges the artifact unsigned. Without a policy the
newest of them is written beside the artifact, unverified.

A refused artifact (a size, space, digest, header, signature or policy failure, a registry
refusal, any local file failure: ``StorageError``, never a raw ``OSError``) leaves nothing
behind; an interrupted pull (the network lost, Ctrl-C) leaves only its hidden partial folder,
and the next pull of the same manifest resumes from it. Only ciphertext is ever written.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelseal.audit.events import AuditSink
from modelseal.errors import (
    FormatError,
    ModelsealError,
    RegistryError,
    RegistryRefused,
    Revoked,
    StorageError,
    VerificationError,
)
from modelseal.format.file import RawArtifact, read_raw
from modelseal.format.header import KIND_BLOB, KIND_FILE, KIND_MANIFEST
from modelseal.format.source import FdSource
from modelseal.recipes import verify as recipes_verify
from modelseal.recipes.context import Verify, policy_for
from modelseal.registry import download, layout, renewing, settings, upload
from modelseal.registry.client import Repository, sha256_file
from modelseal.registry.layout import Descriptor
from modelseal.registry.names import shown
from modelseal.registry.progress import Progress, ProgressCallback
from modelseal.registry.reference import Reference, parse_reference
from modelseal.registry.transport import RegistryUnavailable, Transport
from modelseal.signing import pending
from modelseal.signing.commitment import sealed_members
from modelseal.signing.evaluation import Verdict
from modelseal.signing.sigfile import (
    SignatureFile,
    now_rfc3339,
    read_signature_bytes,
    signature_path,
    signed_output,
)
from modelseal.signing.trust import TrustPolicy
from modelseal.util.files import check_destination, open_regular, remove_path, replace

_log = logging.getLogger("modelseal")
MAX_SIGNATURE_CANDIDATES = 8  # signature referrers a pull tries, newest first
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


def _check_kind(path: Path, rel: str) -> RawArtifact:
    """Check the sealed header kind of the file at artifact path ``rel``; its header."""
    fd = open_regular(path)
    try:
        raw = read_raw(FdSource(fd))
    finally:
        os.close(fd)
    if raw.core.kind != _KINDS.get(rel, KIND_BLOB):
        raise FormatError("a layer of the artifact is not the kind of sealed file its place needs")
    return raw


def _signature_bytes(root: Path) -> bytes | None:
    data = read_signature_bytes(signature_path(root), StorageError)
    if data is None:
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
        try:
            got = repo.get_manifest(d.digest)
            same = got is not None and layout.parse_signature_manifest(got[0], subject.digest).digest == sig_digest
        except RegistryUnavailable:
            raise
        except RegistryError:  # a junk referrer: not ours, not in the way
            continue
        if same:
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


def fetch_signatures(repo: Repository, digest: str) -> tuple[list[bytes], int]:
    """The distinct signature files attached to the artifact ``digest``, newest first, from at
    most ``MAX_SIGNATURE_CANDIDATES`` referrers, each bounded, digest-checked and parsed (junk
    is skipped); and how many referrers were tried."""
    found, _ = _referrers(repo, digest)
    tried = found[:MAX_SIGNATURE_CANDIDATES]
    return download.signature_files(repo, tried, digest), len(tried)


def _choose(
    out: Path, sigs: list[bytes], tried: int, policy: TrustPolicy | None, checks: dict[str, Any]
) -> Verdict | None:
    """Put the signature file chosen among ``sigs`` (newest first, each one of this artifact)
    beside ``out``: under a policy the first that verifies (refused if none does); without one
    the newest. No signature file at all: the policy decides on the unsigned artifact."""
    target = signature_path(out)
    if policy is None:
        if sigs:
            target.write_bytes(sigs[0])
        return None
    if not sigs:
        return recipes_verify.verify_artifact(out, policy, deep=True, **checks)
    failures: list[VerificationError] = []
    for data in sigs:
        target.write_bytes(data)
        try:
            return recipes_verify.verify_artifact(out, policy, deep=True, **checks)
        except VerificationError as e:
            failures.append(e)
    target.unlink()
    kind = next((type(e) for e in failures if isinstance(e, Revoked)), type(failures[0]))
    raise kind(
        f"none of the {len(sigs)} signature files attached to the artifact verifies under the trust policy"
        f" ({tried} referrers tried, newest first; the newest: {failures[0]})"
    )


def _assemble(partial: Path, layers: list[layout.Layer], files: dict[str, Path]) -> tuple[Path, dict[str, RawArtifact]]:
    """The artifact put together in ``partial``, and the header of each of its sealed files."""
    if [x.path for x in layers] == [layout.FILE_PATH]:
        out = partial / "artifact"
        os.replace(files[layers[0].descriptor.digest], out)
        return out, {layout.FILE_PATH: _check_kind(out, layout.FILE_PATH)}
    out = partial / "out"
    remove_path(out)
    (out / "blobs").mkdir(mode=0o700, parents=True)
    raws: dict[str, RawArtifact] = {}
    for x in layers:
        os.replace(files[x.descriptor.digest], out / x.path)
        raws[x.path] = _check_kind(out / x.path, x.path)
    return out, raws


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
    signatures (digests and headers are checked all the same); or a ``TrustPolicy``. A local
    file failure is a ``StorageError``, never a raw ``OSError``."""
    r = parse_reference(ref)
    out_path = Path(dst)
    try:
        check_destination(out_path, force)
        policy = policy_for(verify, None)
        if strict and policy is None:
            raise ValueError("strict verification needs a trust policy (verify=, MODELSEAL_TRUST or config.toml)")
        repo = open_repository(r, tls_dir=tls_dir, pins=pins, endpoints=endpoints, sink=sink, transport=transport)
        got = repo.get_manifest(r.reference)
        if got is None:
            raise RegistryRefused(f"the registry has no artifact {r} (404 MANIFEST_UNKNOWN)", 404, "MANIFEST_UNKNOWN")
        manifest, digest = got
        layers = layout.parse_artifact(manifest)  # sizes bounded (layout.MAX_ARTIFACT_SIZE)
        if len({x.descriptor.digest for x in layers}) != len(layers):
            raise RegistryError("the artifact names one blob twice: refused")
        partial = download.partial_folder(out_path.parent / f".{out_path.name}.pull-{digest[7:23]}")
        lock = _lock(partial)
        try:
            total = sum(x.descriptor.size for x in layers)
            bar = Progress(f"pull {r.name}", total, progress)
            files = download.fetch_all(repo, [x.descriptor for x in layers], partial, bar, jobs=jobs, part=part)
            bar.finish()
            out, raws = _assemble(partial, layers, files)
            sigs, tried = fetch_signatures(repo, digest)
            fitting = [data for data in sigs if download.fits(data, raws)]
            if len(fitting) < tried:
                _log.info("pull %s: %d of %d signature referrers are junk", r, tried - len(fitting), tried)
            checks = {"strict": strict, "expect_name": expect_name, "expect_env": expect_env}
            verdict = _choose(out, fitting, tried, policy, checks)
            _move(out, out_path, force, signature_path(out).exists())
        except RegistryUnavailable:
            raise  # interrupted, not refused: the partial folder stays for the next pull to resume
        except (ModelsealError, OSError):
            remove_path(partial)
            raise
        finally:
            os.close(lock)
    except OSError as e:
        raise StorageError(f"the pull into {out_path.parent} failed on a local file: {_why(e)}") from None
    remove_path(partial)
    return Pulled(out_path, digest, total, verdict)


def _why(e: OSError) -> str:
    return shown(e.strerror or type(e).__name__, 120)


def _move(out: Path, dst: Path, force: bool, signed: bool) -> None:
    """Move the verified artifact into ``dst``, a lone file together with its signature file."""
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
