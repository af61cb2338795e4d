"""Pushing one blob: skipped if the repository has it, mounted from another repository if asked,
else uploaded whole (small blobs) or in chunks that resume.

A chunked upload records its location in ``CACHE/uploads/<key>.json`` after every chunk, so
a ``push`` that was interrupted and is run again asks the registry where the upload stands
(``GET`` on the location) and continues from there. Within one run, a chunk whose connection
broke is resumed the same way, on the next endpoint if the first one is gone. A registry that
lost the upload (distribution 2.8 cancels one whose stored size disagrees with its state
token) gets a fresh one. The location is a capability of the registry, not a secret of ours;
the file is 0600 all the same. Memory stays constant: bodies are streamed from the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

from modelseal.errors import RegistryError, RegistryRefused
from modelseal.registry.client import Repository
from modelseal.registry.progress import Progress
from modelseal.registry.transport import RegistryUnavailable
from modelseal.util.files import write_atomic

CHUNK = 32 << 20
MAX_FAILURES = 6


def _state_path(state_dir: Path | None, repo: Repository, digest: str) -> Path | None:
    if state_dir is None:
        return None
    key = hashlib.sha256(f"{repo.transport.endpoints[0]}|{repo.name}|{digest}".encode()).hexdigest()
    return state_dir / f"{key}.json"


def _load(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        doc = json.loads(path.read_bytes()[:65536])
        location = doc.get("location") if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None
    return location if isinstance(location, str) and location.startswith("/v2/") else None


def _save(path: Path | None, location: str) -> None:
    if path is None:
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"location": location}).encode(), mode=0o600)


def _clear(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _resume(repo: Repository, location: str | None) -> tuple[str, int] | None:
    if location is None:
        return None
    try:
        return repo.upload_status(location)
    except RegistryRefused:
        return None


def upload_blob(
    repo: Repository,
    path: Path,
    digest: str,
    size: int,
    progress: Progress,
    *,
    chunk: int = CHUNK,
    state_dir: Path | None = None,
    mount_from: str | None = None,
) -> int:
    """Make ``digest`` (the file at ``path``, ``size`` bytes) a blob of ``repo``; returns the
    number of bytes sent in this run."""
    if repo.blob_size(digest) == size:
        progress.add(size)
        return 0
    state = _state_path(state_dir, repo, digest)
    location: str | None = None
    offset = 0
    if mount_from is not None:
        location, _ = repo.start_upload(mount=digest, mount_from=mount_from)
        if location is None:
            progress.add(size)
            return 0
    else:
        found = _resume(repo, _load(state))
        if found is not None and found[1] <= size:
            location, offset = found
    minimum = 0
    if location is None:
        location, minimum = repo.start_upload()
        assert location is not None
    step = max(chunk, minimum)
    if offset == 0 and size <= step:
        repo.finish_upload(location, digest, path, 0, size)
        progress.add(size)
        _clear(state)
        return size
    progress.add(offset)
    sent, failures = 0, 0
    while offset < size:
        n = min(step, size - offset)
        try:
            location, nxt = repo.upload_chunk(location, path, offset, n)
        except (RegistryUnavailable, RegistryRefused) as e:
            failures += 1
            lost = isinstance(e, RegistryRefused)
            if failures > MAX_FAILURES or (isinstance(e, RegistryRefused) and e.status not in (400, 404, 416)):
                raise
            time.sleep(min(2.0, 0.1 * 2**failures))
            found = None if lost else _resume(repo, location)
            if found is None:  # the registry dropped it (or refuses the rest): start again
                location, _ = repo.start_upload()
                assert location is not None
                progress.add(-offset)
                offset = 0
                continue
            location, nxt = found
        if not 0 <= nxt <= offset + n:
            raise RegistryError("the registry reports more of the upload than was sent")
        _save(state, location)  # first: distribution's location token must match what it holds
        progress.add(nxt - offset)
        sent += max(0, nxt - offset)
        offset = nxt
    try:
        repo.finish_upload(location, digest)
    finally:
        _clear(state)
    return sent


__all__ = ["CHUNK", "upload_blob"]
