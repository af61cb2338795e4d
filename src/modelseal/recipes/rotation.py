"""Rotation at scale: rotate a KEK when it is due, then re-wrap every affected artifact.

Owns ``rotate``: decide whether the key's newest version is older than the
policy, rotate it, find the sealed files and folders under the given paths
whose recipients use an older version of that key, and rewrap that key's
recipients in each one (header only, atomic per artifact through the A/B slots).
Every other recipient must be one the operator vouches for (``recipients``), or
the artifact is reported as failed. It is resumable by design: an artifact
already on the newest version is skipped, so re-running after a crash or an
outage finishes the job; an artifact is never left half-rewrapped. Nothing is
skipped silently: a path that cannot be read or listed is a reported failure.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from modelseal.audit.events import AuditEvent
from modelseal.errors import ArtifactError, KeyNotFound, ModelsealError, ProviderUnavailable, StorageError
from modelseal.format.envelope import artifact_id, open_envelope, parse_slots
from modelseal.format.file import RawArtifact, read_raw, write_slot_in_place
from modelseal.format.folder import MANIFEST_NAME
from modelseal.format.header import MAGIC, Recipient
from modelseal.format.source import FdSource
from modelseal.keys.providers import parse_key_uri
from modelseal.keys.service import KeyService
from modelseal.recipes import rekey
from modelseal.recipes.context import key_service
from modelseal.recipes.recipients import keys_to_write, same_key
from modelseal.util.files import open_regular

TRANSIT_BATCH = 100  # two Transit requests rewrap this many artifacts
BATCHES = {"transit": TRANSIT_BATCH, "broker": 500}  # the key broker takes up to 1000 per request
Context = tuple[tuple[str, str], ...]


@runtime_checkable
class BatchRewrapper(Protocol):
    """A provider that unwraps and rewraps many wrapped keys of one key per request (Transit,
    the key broker). The broker also answers per item (``unwrap_each``, ``rewrap_each``)."""

    def unwrap_many(
        self, recipients: Sequence[Recipient], context: Context, contexts: Sequence[Context] | None = None
    ) -> list[bytes]: ...

    def rewrap_many(
        self, recipients: Sequence[Recipient], context: Context, contexts: Sequence[Context] | None = None
    ) -> list[Recipient]: ...


@dataclass
class RotationReport:
    key: str
    rotated: bool
    latest_version: int
    rewrapped: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    not_using_key: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


OnError = Callable[[Path, OSError], None]


def _probe(p: Path, failed: OnError) -> bool | None:
    """Whether ``p`` is a sealed regular file (None: it could not be read; reported).

    Only regular files are opened (no FIFO hangs, no device side effects), never through
    a symlink; a file gone meanwhile is simply not there.
    """
    try:
        if not stat.S_ISREG(os.lstat(p).st_mode):
            return False
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP):
            return False
        failed(p, e)
        return None
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, len(MAGIC), 0) == MAGIC
    except OSError as e:
        failed(p, e)
        return None
    finally:
        os.close(fd)


def find_artifacts(paths: Sequence[Path], on_error: OnError | None = None) -> Iterator[Path]:
    """Sealed files and sealed folders under ``paths`` (blobs inside folders are not listed).

    Symlinks are never followed (a link could lead rotation to rewrite artifacts
    outside the paths given), and only regular files are opened (no FIFO hangs).
    A path that cannot be read, and a folder that cannot be listed (it may hold
    artifacts), goes to ``on_error``; without one it raises ``StorageError``.
    """

    def failed(path: Path, e: OSError) -> None:
        if on_error is None:
            raise StorageError(f"cannot read {path}: {e.strerror or type(e).__name__}")
        on_error(path, e)

    for root in paths:
        try:
            mode = os.lstat(root).st_mode
        except OSError as e:
            failed(root, e)  # a path given that does not exist is an error, not an empty result
            continue
        if stat.S_ISLNK(mode):
            failed(root, OSError(errno.ELOOP, "a symlink, which rotation never follows", str(root)))
            continue
        if not stat.S_ISDIR(mode):
            if _probe(root, failed):
                yield root
            continue
        found = _probe(root / MANIFEST_NAME, failed)
        if found is None:
            continue
        if found:
            yield root
            continue

        def walk_failed(e: OSError, top: Path = root) -> None:
            failed(Path(e.filename) if e.filename else top, e)

        for dirpath, dirnames, filenames in os.walk(root, onerror=walk_failed, followlinks=False):
            d = Path(dirpath)
            for name in list(dirnames):
                sub = d / name
                found = False if sub.is_symlink() else _probe(sub / MANIFEST_NAME, failed)
                if found is None or found or sub.is_symlink():
                    dirnames.remove(name)  # a sealed folder, a link, or reported already
                if found:
                    yield sub
            for name in sorted(filenames):
                if _probe(d / name, failed):
                    yield d / name


def _versions_of(svc: KeyService, path: Path, canon: str) -> list[int]:
    """Versions of the key ``canon`` in the artifact's newest slot (unauthenticated: only used to pick work)."""
    target = path / MANIFEST_NAME if path.is_dir() else path
    src = FdSource(open_regular(target))
    try:
        raw = read_raw(src)
    finally:
        src.close()
    slots = parse_slots(raw.slots)
    if not slots:
        return []
    return [r.key_version for r in slots[0][1].recipients if same_key(svc, r, canon)]


def rotate(
    key: str,
    paths: Sequence[str | os.PathLike[str]],
    *,
    older_than_days: float | None = None,
    force: bool = False,
    keys: KeyService | None = None,
    now: Callable[[], float] = time.time,
    progress: Callable[[str], None] | None = None,
    keep_recipients: Sequence[str] = (),
) -> RotationReport:
    """Rotate ``key`` if its newest version is older than the policy (or ``force``), then
    rewrap ``key``'s recipients in every artifact under ``paths`` that uses an older version
    of it. An artifact with a recipient the operator does not vouch for (``recipients``;
    ``keep_recipients`` confirms one) is not rewrapped but reported as failed."""
    roots = [Path(p) for p in paths]  # str paths too
    svc = keys or key_service()
    uri = parse_key_uri(key).uri
    canon = svc.canonical(uri)
    info = svc.info(uri)
    newest = max(info.versions, key=lambda v: v.version)
    if older_than_days is None:
        envs = svc.environments_of(uri)
        older_than_days = min((svc.config.rotation_days(e) for e in envs), default=svc.config.rotate_after_days)
    rotated = False
    if force or (newest.created and now() - newest.created > older_than_days * 86400):
        info = svc.rotate(uri)
        rotated = True
    report = RotationReport(uri, rotated, info.latest)
    scheme = parse_key_uri(uri).scheme
    scheme_provider = svc.provider(scheme) if scheme in BATCHES else None
    provider = scheme_provider if isinstance(scheme_provider, BatchRewrapper) else None
    pending: list[Path] = []

    def unreadable(path: Path, e: OSError) -> None:
        report.failed.append((str(path), f"cannot read or list it ({e.strerror or type(e).__name__})"))

    for artifact in find_artifacts(roots, on_error=unreadable):
        name = str(artifact)
        try:
            versions = _versions_of(svc, artifact, canon)
            if not versions:
                report.not_using_key += 1
                continue
            if min(versions) >= info.latest:
                report.up_to_date.append(name)
                continue
            if provider is not None:
                pending.append(artifact)
                if len(pending) == BATCHES[scheme]:
                    _rewrap_batch(svc, provider, canon, pending, report, progress, uri, keep_recipients)
                    pending = []
                continue
            rekey.rewrap_key(artifact, uri, keys=svc, keep_recipients=keep_recipients)
            report.rewrapped.append(name)
            if progress is not None:
                progress(name)
        except (ModelsealError, OSError) as e:
            _record_failure(report, name, e)
    if pending and provider is not None:
        _rewrap_batch(svc, provider, canon, pending, report, progress, uri, keep_recipients)
    return report


def _record_failure(report: RotationReport, name: str, e: Exception) -> None:
    if isinstance(e, ArtifactError | OSError):
        report.failed.append((name, type(e).__name__))
    else:
        report.failed.append((name, str(e)[:200]))


def _rewrap_batch(
    svc: KeyService,
    provider: BatchRewrapper,
    canon: str,
    artifacts: list[Path],
    report: RotationReport,
    progress: Callable[[str], None] | None,
    key: str | None = None,
    keep: Sequence[str] = (),
) -> None:
    """Rewrap a batch of artifacts with two requests in all (Transit, or the key broker): one
    batch decrypt (the DEKs, to verify each artifact and MAC its new slot) and one
    server-side batch rewrap (the new wraps; no DEK is sent back to the server). Each artifact is held under its
    update lock and gets its new slot atomically; other recipients stay as they were, and
    must be vouched for. Requests name the operator's key ``key`` (default: ``canon``),
    never the spelling an artifact recorded."""
    key = key or canon
    ref = parse_key_uri(key)
    held: list[tuple[Path, FdSource, RawArtifact, Recipient]] = []
    try:
        for path in artifacts:
            try:
                src, raw = rekey.open_locked(path / MANIFEST_NAME if path.is_dir() else path)
            except (ModelsealError, OSError) as e:
                _record_failure(report, str(path), e)
                continue
            slots = parse_slots(raw.slots)
            mine = [r for r in (slots[0][1].recipients if slots else ()) if same_key(svc, r, canon)]
            if not mine:
                src.close()
                report.not_using_key += 1
                continue
            held.append((path, src, raw, mine[0]))
        if not held:
            return
        contexts = [raw.core.context for _, _, raw, _ in held]
        ours = [Recipient(ref.scheme, ref.name, r.key_version, r.wrapped) for *_, r in held]
        results = _batch_keys(svc, provider, key, ours, contexts)
        for (path, src, raw, old), got in zip(held, results, strict=True):
            if isinstance(got, ModelsealError):
                _record_failure(report, str(path), got)
                continue
            dek, new = got
            try:
                opened = open_envelope(raw.core, raw.slots, _only(old, dek))
                keys_to_write(svc, path, opened.slot.recipients, raw.core.context, named=[key], keep=keep)
                recipients = tuple(new if r == old else r for r in opened.slot.recipients)
                write_slot_in_place(src.fd, raw, opened, recipients)
                aid = artifact_id(raw.core.binding)
                # The version the data key was wrapped under until now (rewrap_key's unwrap event
                # says it; the batch's decrypt is one provider call): an incident on that version
                # finds the artifact by it (recovery.incident_find).
                svc.sink.emit(AuditEvent("rewrap-from", key, "ok", old.key_version, aid))
                svc.sink.emit(AuditEvent("rewrap", key, "ok", new.key_version, aid))
                report.rewrapped.append(str(path))
                if progress is not None:
                    progress(str(path))
            except (ModelsealError, OSError) as e:
                svc.sink.emit(AuditEvent("rewrap", key, type(e).__name__, None, artifact_id(raw.core.binding)))
                _record_failure(report, str(path), e)
    finally:
        for _, src, _, _ in held:
            src.close()


def _batch_keys(
    svc: KeyService,
    provider: BatchRewrapper,
    key: str,
    ours: list[Recipient],
    contexts: list[tuple[tuple[str, str], ...]],
) -> list[tuple[bytes, Recipient] | ModelsealError]:
    """Each item's DEK and new wrap, or the error of that item alone.

    Transit fails a whole batch request on its first bad item, so after a failed batch
    every item is tried on its own: one corrupted artifact (anyone with write access can
    make one) must not stop the rotation of the up to 99 others beside it, on every run.
    The key broker answers per item already.
    """
    each_unwrap, each_rewrap = getattr(provider, "unwrap_each", None), getattr(provider, "rewrap_each", None)
    try:
        for c in contexts:
            svc.check_environment(key, c)
        if callable(each_unwrap) and callable(each_rewrap):
            got = zip(each_unwrap(ours, contexts), each_rewrap(ours, contexts), strict=True)
            return [
                d if isinstance(d, ModelsealError) else n if isinstance(n, ModelsealError) else (d, n) for d, n in got
            ]
        deks = provider.unwrap_many(ours, (), contexts=contexts)
        fresh = provider.rewrap_many(ours, (), contexts=contexts)
        return list(zip(deks, fresh, strict=True))
    except ModelsealError as e:
        if len(ours) == 1 or isinstance(e, ProviderUnavailable):
            # The server itself failed (unreachable, no permission): every item would fail
            # the same way, each after its own retries; trying them one by one would only
            # multiply the outage's cost by the batch size.
            return [e] * len(ours)
    out: list[tuple[bytes, Recipient] | ModelsealError] = []
    for i, (r, c) in enumerate(zip(ours, contexts, strict=True)):
        one = _batch_keys(svc, provider, key, [r], [c])
        out += one
        if isinstance(one[0], ProviderUnavailable):  # the server went away meanwhile: stop here
            out += [one[0]] * (len(ours) - i - 1)
            break
    return out


def _only(recipient: Recipient, dek: bytes) -> Callable[[Recipient], bytes]:
    """An unwrap that knows one recipient's DEK (fetched in the batch) and no other."""

    def unwrap(r: Recipient) -> bytes:
        if r != recipient:
            raise KeyNotFound("not part of this batch")
        return dek

    return unwrap


_transit_keys = _batch_keys  # the names of issue 11, which tests still use
_rewrap_transit_batch = _rewrap_batch
