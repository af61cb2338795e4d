"""Where backups are kept (docs/recovery.md, "Backups"): a local folder or ``s3://BUCKET/PREFIX``
(``recovery.s3store``), behind one small interface (``recovery.storebase``), chosen by
``open_store``.

Layout, the same in both: ``<id>/parts/<name>.mseal`` and ``<id>/manifest.json``, the
manifest written last. Only a backup whose ``manifest.json`` exists lists (``list_ids``), so a
failed backup never looks complete. In a folder, a backup is written into a hidden
``.partial-<id>-<random>`` folder and renamed to ``<id>`` only once complete (one rename; an
exception removes the partial folder, a killed process leaves one that never lists and the
next ``create`` removes under the folder's lock). Names read back are checked against fixed
patterns (``manifest.ID``, ``REL``) before they become a path or an object key.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from modelseal.errors import BackupError, BackupTampered, DestinationExists, StorageError
from modelseal.recovery.manifest import ID, MANIFEST_NAME
from modelseal.recovery.storebase import REL as REL
from modelseal.recovery.storebase import BackupStore, BackupWriter, Retention, check_id, check_rel
from modelseal.util.files import fsync_dir, remove_path, replace, write_new

PARTIAL_PREFIX = ".partial-"
LOCK_NAME = ".modelseal-backup.lock"


class _FolderWriter:
    def __init__(self, store: FolderStore, backup_id: str) -> None:
        self._dst = store.root / backup_id
        if os.path.lexists(self._dst):
            raise DestinationExists(f"backup {backup_id} exists already in {store.root}")
        self._stage = store.root / f"{PARTIAL_PREFIX}{backup_id}-{secrets.token_hex(4)}"
        self._stage.mkdir(mode=0o700)
        (self._stage / "parts").mkdir(mode=0o700)
        self._done = False

    def put(self, rel: str, data: bytes) -> None:
        try:
            write_new(self._stage / check_rel(rel), data, mode=0o600)
        except OSError as e:
            raise StorageError(f"cannot write {rel} of the backup: {e.strerror}") from None

    def commit(self, manifest: bytes) -> None:
        try:
            fsync_dir(self._stage / "parts")
            write_new(self._stage / MANIFEST_NAME, manifest, mode=0o600)
            fsync_dir(self._stage)
        except OSError as e:
            raise StorageError(f"cannot write the backup's manifest: {e.strerror}") from None
        replace(self._stage, self._dst, force=False)  # one rename: the backup is there whole, or not
        self._done = True

    def abort(self) -> None:
        if not self._done:
            remove_path(self._stage)


class FolderStore:
    """Backups in a local folder (another disk, a mounted share)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self.url = str(self.root)
        # The path as given, never resolved: a symlink put in its place later must not get a
        # fresh (empty) record of what this host saw, and reads refuse a symlinked root anyway.
        self.state_key = f"file://{self.root}"

    def _no_symlink(self) -> None:
        if self.root.is_symlink():
            raise BackupError(f"{self.root} is a symbolic link: give the folder it points to")

    def _ensure(self) -> None:
        if not self.root.parent.is_dir():
            raise BackupError(f"folder {self.root.parent} does not exist")
        with contextlib.suppress(FileExistsError):
            self.root.mkdir(mode=0o700)
        if not self.root.is_dir() or self.root.is_symlink():
            raise BackupError(f"{self.root} is not a folder")

    def list_ids(self) -> list[str]:
        self._no_symlink()
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise BackupError(f"cannot list {self.root}: {e.strerror}") from None
        ids = [
            e.name
            for e in entries
            if ID.fullmatch(e.name)
            and e.is_dir(follow_symlinks=False)
            and os.path.isfile(os.path.join(e.path, MANIFEST_NAME))
        ]
        return sorted(ids)

    def read(self, backup_id: str, rel: str, limit: int) -> bytes:
        path = self.root / check_id(backup_id) / check_rel(rel)
        self._no_symlink()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise BackupTampered(f"backup {backup_id} has no {rel}: deleted") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise BackupTampered(f"{rel} of backup {backup_id} is a symlink") from None
            raise BackupError(f"cannot read {rel} of backup {backup_id}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BackupTampered(f"{rel} of backup {backup_id} is not a regular file")
            if st.st_size > limit:
                raise BackupTampered(f"{rel} of backup {backup_id} is larger than it may be")
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(limit + 1)
        except OSError as e:
            raise BackupError(f"cannot read {rel} of backup {backup_id}: {e.strerror}") from None
        finally:
            os.close(fd)
        if len(data) > limit:
            raise BackupTampered(f"{rel} of backup {backup_id} is larger than it may be")
        return data

    def object_lock(self) -> bool:
        return False

    def begin(self, backup_id: str, retention: Retention | None) -> BackupWriter:
        if retention is not None:
            raise BackupError("--retain applies to s3:// destinations whose bucket has Object Lock")
        self._ensure()
        return _FolderWriter(self, check_id(backup_id))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self._ensure()
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BackupError(f"another backup into {self.root} is running") from None
            self._sweep_partials()
            yield
        finally:
            os.close(fd)

    def _sweep_partials(self) -> None:
        """Partial folders of killed runs (under the lock nobody else is writing one)."""
        for e in os.scandir(self.root):
            if e.name.startswith(PARTIAL_PREFIX) and e.is_dir(follow_symlinks=False):
                remove_path(Path(e.path))

    def close(self) -> None:
        return None


def open_store(url: str) -> BackupStore:
    """The store for ``--to``/``--from``: ``s3://BUCKET/PREFIX`` (endpoint and credentials from the
    standard AWS settings), else a local folder path."""
    if url.startswith("s3://"):
        from modelseal.recovery.s3store import S3Store

        bucket, _, prefix = url[len("s3://") :].partition("/")
        return S3Store(bucket, prefix)
    if "://" in url:
        raise BackupError("a backup destination is a folder path or s3://BUCKET/PREFIX")
    return FolderStore(Path(url))


__all__ = [
    "REL",
    "BackupStore",
    "BackupWriter",
    "FolderStore",
    "Retention",
    "check_id",
    "check_rel",
    "open_store",
]
