"""Rotation at scale: rotate a KEK when it is due, then re-wrap every affected artifact.

Owns ``rotate``: decide whether the key's newest version is older than the
policy, rotate it, find the sealed files and folders under the given paths
whose recipients use an older version of that key, and rewrap each one (header
only, atomic per artifact through the A/B slots). It is resumable by design:
an artifact already on the newest version is skipped, so re-running after a
crash or an outage finishes the job; an artifact is never left half-rewrapped.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from modelseal.audit.events import AuditEvent
from modelseal.errors import ArtifactError, KeyNotFound, ModelsealError
from modelseal.format.envelope import artifact_id, open_envelope, parse_slots
from modelseal.format.file import RawArtifact, read_raw, write_slot_in_place
from modelseal.format.folder import MANIFEST_NAME
from modelseal.format.header import MAGIC, Recipient
from modelseal.format.source import FdSource
from modelseal.keys.providers import canonical_key, parse_key_uri
from modelseal.keys.providers.transit import TransitProvider
from modelseal.keys.service import KeyService
from modelseal.recipes import rekey
from modelseal.recipes.context import key_service

TRANSIT_BATCH = 100  # two Transit requests rewrap this many artifacts


@dataclass
class RotationReport:
    key: str
    rotated: bool
    latest_version: int
    rewrapped: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    not_using_key: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def _is_sealed_regular(p: Path) -> bool:
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # a symlink, or unreadable
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, len(MAGIC), 0) == MAGIC
    finally:
        os.close(fd)


def find_artifacts(paths: list[Path]) -> Iterator[Path]:
    """Sealed files and sealed folders under ``paths`` (blobs inside folders are not listed).

    Symlinks are never followed (a link could lead rotation to rewrite artifacts
    outside the paths given), and only regular files are opened (no FIFO hangs).
    """
    for root in paths:
        if root.is_symlink():
            continue
        if root.is_dir() and _is_sealed_regular(root / MANIFEST_NAME):
            yield root
            continue
        if not root.is_dir():
            if _is_sealed_regular(root):
                yield root
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            d = Path(dirpath)
            for name in list(dirnames):
                sub = d / name
                if sub.is_symlink():
                    dirnames.remove(name)
                elif _is_sealed_regular(sub / MANIFEST_NAME):
                    yield sub
                    dirnames.remove(name)
            for name in sorted(filenames):
                if _is_sealed_regular(d / name):
                    yield d / name


def _versions_of(path: Path, key: str) -> list[int]:
    """Versions of ``key`` in the artifact's newest slot (unauthenticated: only used to pick work)."""
    target = path / MANIFEST_NAME if path.is_dir() else path
    src = FdSource(os.open(target, os.O_RDONLY | os.O_CLOEXEC))
    try:
        raw = read_raw(src)
    finally:
        src.close()
    slots = parse_slots(raw.slots)
    if not slots:
        return []
    return [r.key_version for r in slots[0][1].recipients if canonical_key(f"{r.scheme}:{r.key_id}") == key]


def rotate(
    key: str,
    paths: list[Path],
    *,
    older_than_days: float | None = None,
    force: bool = False,
    keys: KeyService | None = None,
    now: Callable[[], float] = time.time,
    progress: Callable[[str], None] | None = None,
) -> RotationReport:
    """Rotate ``key`` if its newest version is older than the policy (or ``force``), then
    rewrap every artifact under ``paths`` that uses an older version of it."""
    svc = keys or key_service()
    uri = parse_key_uri(key).uri
    canon = canonical_key(uri)
    info = svc.info(uri)
    newest = max(info.versions, key=lambda v: v.version)
    if older_than_days is None:
        envs = svc.config.environments_of(uri)
        older_than_days = min((svc.config.rotation_days(e) for e in envs), default=svc.config.rotate_after_days)
    rotated = False
    if force or (newest.created and now() - newest.created > older_than_days * 86400):
        info = svc.rotate(uri)
        rotated = True
    report = RotationReport(uri, rotated, info.latest)
    scheme_provider = svc.provider(parse_key_uri(uri).scheme)
    provider = scheme_provider if isinstance(scheme_provider, TransitProvider) else None
    batched = provider is not None
    pending: list[Path] = []
    for artifact in find_artifacts(paths):
        name = str(artifact)
        try:
            versions = _versions_of(artifact, canon)
            if not versions:
                report.not_using_key += 1
                continue
            if min(versions) >= info.latest:
                report.up_to_date.append(name)
                continue
            if batched:
                pending.append(artifact)
                if len(pending) == TRANSIT_BATCH and provider is not None:
                    _rewrap_transit_batch(svc, provider, canon, pending, report, progress)
                    pending = []
                continue
            rekey.rewrap(artifact, keys=svc)
            report.rewrapped.append(name)
            if progress is not None:
                progress(name)
        except (ModelsealError, OSError) as e:
            _record_failure(report, name, e)
    if pending and provider is not None:
        _rewrap_transit_batch(svc, provider, canon, pending, report, progress)
    return report


def _record_failure(report: RotationReport, name: str, e: Exception) -> None:
    if isinstance(e, ArtifactError | OSError):
        report.failed.append((name, type(e).__name__))
    else:
        report.failed.append((name, str(e)[:200]))


def _rewrap_transit_batch(
    svc: KeyService,
    provider: TransitProvider,
    canon: str,
    artifacts: list[Path],
    report: RotationReport,
    progress: Callable[[str], None] | None,
) -> None:
    """Rewrap up to 100 artifacts with two Transit requests in all: one batch decrypt (the
    DEKs, to verify each artifact and MAC its new slot) and one server-side batch rewrap
    (the new wraps; no DEK is sent back to the server). Each artifact is held under its
    update lock and gets its new slot atomically; other recipients stay as they were."""
    held: list[tuple[Path, FdSource, RawArtifact, Recipient]] = []
    try:
        for path in artifacts:
            try:
                src, raw = rekey.open_locked(path / MANIFEST_NAME if path.is_dir() else path)
            except (ModelsealError, OSError) as e:
                _record_failure(report, str(path), e)
                continue
            slots = parse_slots(raw.slots)
            mine = [
                r for r in (slots[0][1].recipients if slots else ()) if canonical_key(f"{r.scheme}:{r.key_id}") == canon
            ]
            if not mine:
                src.close()
                report.not_using_key += 1
                continue
            held.append((path, src, raw, mine[0]))
        if not held:
            return
        name = held[0][3].key_id
        contexts = [raw.core.context for _, _, raw, _ in held]
        try:
            for _, _, raw, _ in held:
                svc.check_environment(f"transit:{name}", raw.core.context)
            deks = provider.unwrap_many([r for *_, r in held], (), contexts=contexts)
            fresh = provider.rewrap_many([r for *_, r in held], (), contexts=contexts)
        except ModelsealError as e:
            for path, *_ in held:
                _record_failure(report, str(path), e)
            return
        for (path, src, raw, old), dek, new in zip(held, deks, fresh, strict=True):
            try:
                opened = open_envelope(raw.core, raw.slots, _only(old, dek))
                recipients = tuple(new if r == old else r for r in opened.slot.recipients)
                write_slot_in_place(src.fd, raw, opened, recipients)
                svc.sink.emit(
                    AuditEvent("rewrap", f"transit:{name}", "ok", new.key_version, artifact_id(raw.core.binding))
                )
                report.rewrapped.append(str(path))
                if progress is not None:
                    progress(str(path))
            except (ModelsealError, OSError) as e:
                svc.sink.emit(
                    AuditEvent("rewrap", f"transit:{name}", type(e).__name__, None, artifact_id(raw.core.binding))
                )
                _record_failure(report, str(path), e)
    finally:
        for _, src, _, _ in held:
            src.close()


def _only(recipient: Recipient, dek: bytes) -> Callable[[Recipient], bytes]:
    """An unwrap that knows one recipient's DEK (fetched in the batch) and no other."""

    def unwrap(r: Recipient) -> bytes:
        if r != recipient:
            raise KeyNotFound("not part of this batch")
        return dek

    return unwrap
