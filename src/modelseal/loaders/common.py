"""Shared plumbing of the ML loaders: finding the artifact, reading it into memory.

Owns: resolving a path to a sealed file, a sealed folder, or a member of a
sealed folder (``model.sealed/config.json``), or of an ``oci://`` reference (pulled into the
ciphertext cache, ``registry.cache``); the explicit plaintext escape
hatch (``allow_plaintext=True``, for migrations); reading a whole member into
memory; and ``memfd_view``, which shows a sealed folder to libraries that
insist on a directory path as a folder of symlinks to anonymous in-memory
files (``memfd_create``, all under one opaque name), so plaintext never
reaches a disk. Every entry point first switches core dumps off for the
process (``util.hardening.harden_loader``; opt out with
``MODELSEAL_ALLOW_CORE_DUMPS=1``), and buffers of decrypted bytes are kept
out of any dump that still happens.

A path below a sealed folder is always a member of it, looked up in its
manifest: a real file planted at ``model.sealed/config.json`` is never read.

The framework modules (``modelseal.safetensors``, ``.torch``, ``.onnx``,
``.hf``, ``.fs``) sit on top of this one; none of them writes a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import mmap
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from modelseal.errors import FormatError, StorageError, VerificationError
from modelseal.format.folder import MANIFEST_NAME, SealedFolder
from modelseal.format.header import MAGIC
from modelseal.format.source import FdSource
from modelseal.keys.service import KeyService
from modelseal.recipes.context import EXPECTED_NAME, expected_env, trust_policy
from modelseal.recipes.opening import open as open_sealed
from modelseal.recipes.opening import open_folder
from modelseal.signing.trust import TrustPolicy
from modelseal.util.files import open_regular
from modelseal.util.hardening import dont_dump, harden_loader

# The name every memfd gets: /proc/PID/fd and /proc/PID/maps show "/memfd:NAME (deleted)",
# so a member path there would tell any reader of /proc what the process loaded.
MEMFD_NAME = "modelseal"


class RandomAccess(Protocol):
    """What loaders need: a size, positioned reads into a buffer, close."""

    size: int

    def preadinto(self, offset: int, buf: memoryview | bytearray, *, private: bool = False) -> int: ...

    def close(self) -> None: ...


class PlainReader(io.RawIOBase):
    """A plaintext file behind the same interface, for ``allow_plaintext=True``."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._src = FdSource(open_regular(path))
        self.size = self._src.size
        self.name = str(path)
        self._pos = 0

    def preadinto(self, offset: int, buf: memoryview | bytearray, *, private: bool = False) -> int:
        view = memoryview(buf).cast("B")
        return self._src.readinto_at(view[: max(0, min(len(view), self.size - offset))], offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf: Any) -> int:
        n = self.preadinto(self._pos, buf)
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._src.close()
        super().close()


def is_sealed_file(path: Path) -> bool:
    """Whether ``path`` starts with the sealed magic. A FIFO or device there is refused
    (StorageError) instead of blocking: the open never waits and checks for a regular file."""
    fd = open_regular(path)
    try:
        head = os.pread(fd, len(MAGIC), 0)
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return head == MAGIC


def is_sealed_folder(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


def split_member(path: Path) -> tuple[Path, str | None]:
    """``x.sealed/sub/config.json`` -> (``x.sealed``, ``sub/config.json``).

    Whatever is on disk below a sealed folder: a file planted at that path is never
    preferred to the manifest's member. A sealed folder below another one (planted, since
    a sealed folder holds only its manifest and blobs) is refused as ambiguous, and so is
    a member path that climbs out with ``..``.
    """
    absolute = path.absolute()
    sealed = [p for p in (absolute, *absolute.parents) if is_sealed_folder(p)]
    if not sealed:
        return path, None
    if len(sealed) > 1:
        raise FormatError(f"{sealed[0]} is inside the sealed folder {sealed[-1]}: refusing to guess which one is meant")
    root = sealed[0]
    if root == absolute:
        return path, None
    rel = absolute.relative_to(root)
    if ".." in rel.parts:
        raise FormatError(f"{path} goes through the sealed folder {root}: name a member of it")
    return root, rel.as_posix()


def local_path(path: str | os.PathLike[str]) -> Path:
    """``path``, or for ``oci://...`` the artifact's copy in the registry cache (``registry.cache``)."""
    if isinstance(path, str) and path.startswith("oci://"):
        from modelseal.registry import cache

        return cache.fetch(path)
    return Path(path)


def resolve_member(path: str | os.PathLike[str], member: str | None) -> tuple[Path, str | None]:
    """The artifact and the member a loader was asked for: ``member=`` is relative to the
    member the path already names, if any (``x.sealed/sub`` with ``member="a.bin"``).
    ``oci://HOST:PORT/REPO:TAG`` is pulled, verified, into the ciphertext cache first."""
    p, implied = split_member(local_path(path))
    if implied is not None and member is not None:
        return p, f"{implied}/{member}"
    return p, member if member is not None else implied


def _whole_folder(path: Path) -> Path:
    """``path`` as a folder to load whole: never a folder below a sealed one (planted there,
    or a member's prefix), which would be read from disk instead of through the manifest."""
    root, inner = split_member(path)
    if inner is not None:
        raise FormatError(f"{path} is inside the sealed folder {root}: load the sealed folder itself")
    return path


def plaintext_ok(path: Path, allow_plaintext: bool, keys: KeyService | None) -> bool:
    """``allow_plaintext`` (for migrations), unless a trust policy or a pin would refuse
    an unsigned sealed artifact (strict, ``require_name``, a name or environment
    expected), or a revocation list applies: it could revoke a sealed artifact's digest,
    but plaintext has nothing it could check."""
    if not allow_plaintext:
        return False
    policy = trust_policy(keys)
    why = _plaintext_refusal(policy.chain() if policy is not None else [])
    if why is not None:
        raise VerificationError(f"{path} is plaintext, and {why}: refusing to load it")
    env = expected_env(keys)
    if env is not None:  # plaintext has no environment, so it cannot be the one expected
        raise VerificationError(f"{path} is plaintext, and artifacts sealed for env {env!r} are expected")
    return True


def _plaintext_refusal(chain: list[TrustPolicy]) -> str | None:
    """Why plaintext is refused under these policies and the name pin (None: it is not)."""
    if any(p.strict for p in chain):
        return "the trust policy is strict"
    if any(p.require_name for p in chain):
        return "the trust policy requires the artifact's signed name"
    if any(p.revocation is not None for p in chain):
        return "the trust policy has a revocation list (plaintext has no digest it could revoke)"
    name = EXPECTED_NAME.get()
    if name is not None:
        return f"a signed {name!r} is expected"
    return None


def refuse_plaintext(path: Path) -> FormatError:
    return FormatError(
        f"{path} is not sealed; refusing to load plaintext (pass allow_plaintext=True to migrate from plain files)"
    )


def open_member(
    path: str | os.PathLike[str],
    member: str | None = None,
    *,
    allow_plaintext: bool = False,
    keys: KeyService | None = None,
) -> RandomAccess:
    """Open one sealed file, one member of a sealed folder, or (if allowed) a plain file."""
    harden_loader()
    p, member = resolve_member(path, member)
    if is_sealed_folder(p):
        if member is None:
            raise FormatError(f"{p} is a sealed folder: name the member to load")
        with open_folder(p, keys=keys) as folder:
            if member not in folder:
                raise StorageError(f"the sealed folder {p} has no member {member!r}")
            return folder.open(member)
    if p.is_dir():
        if not plaintext_ok(p, allow_plaintext, keys):
            raise refuse_plaintext(p)
        if member is None:
            raise FormatError(f"{p} is a folder: name the member to load")
        return PlainReader(p / member)
    if member is not None:
        raise FormatError(f"{p} is a single sealed file; it has no member {member!r}")
    if not is_sealed_file(p):
        if not plaintext_ok(p, allow_plaintext, keys):
            raise refuse_plaintext(p)
        return PlainReader(p)
    return open_sealed(p, keys=keys)


def read_into_memory(reader: RandomAccess) -> bytearray:
    """The whole plaintext in one fresh buffer (kept out of core dumps), decrypted straight into it."""
    buf = bytearray(reader.size)
    dont_dump(buf)
    reader.preadinto(0, buf, private=True)
    return buf


def read_member(
    path: str | os.PathLike[str],
    member: str | None = None,
    *,
    allow_plaintext: bool = False,
    keys: KeyService | None = None,
) -> bytearray:
    reader = open_member(path, member, allow_plaintext=allow_plaintext, keys=keys)
    try:
        return read_into_memory(reader)
    finally:
        reader.close()


_ZEROS = bytes(1 << 20)


def wipe(buf: bytearray) -> None:
    """Overwrite a plaintext buffer we own once it has been handed on, 1 MiB at a time
    (a zero copy of the whole buffer would allocate, and first-touch, as much again)."""
    view = memoryview(buf)
    step = len(_ZEROS)
    for at in range(0, len(view), step):
        n = min(step, len(view) - at)
        view[at : at + n] = _ZEROS[:n]


def _memfd_from(reader: RandomAccess) -> int:
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        if reader.size:
            os.ftruncate(fd, reader.size)
            with mmap.mmap(fd, reader.size) as mm:
                dont_dump(mm)
                reader.preadinto(0, memoryview(mm), private=True)
        # Freeze the content: nobody can change what the library then reads.
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def memfd_view(
    path: str | os.PathLike[str], *, keys: KeyService | None = None, allow_plaintext: bool = False
) -> Iterator[Path]:
    """Show a sealed folder as a real directory for the duration of the block.

    The directory (0700, under the system temp folder) holds only symlinks to
    ``/proc/self/fd/N``, each N an in-memory file (``memfd_create``) holding one
    decrypted member, sealed read-only. No plaintext byte is written to any
    file system. On exit the links are removed and the descriptors closed;
    memory that a library still maps (e.g. safetensors weights) stays valid
    until it lets go of it.
    """
    harden_loader()
    p = _whole_folder(local_path(path))
    if not is_sealed_folder(p):
        if p.is_dir() and plaintext_ok(p, allow_plaintext, keys):
            _refuse_special_files(p)
            yield p
            return
        raise refuse_plaintext(p) if p.is_dir() else FormatError(f"{p} is not a sealed folder")
    view = Path(tempfile.mkdtemp(prefix="modelseal-view-"))
    fds: list[int] = []
    try:
        with open_folder(p, keys=keys) as folder:
            for rel in folder:
                with folder.open(rel) as r:
                    fd = _memfd_from(r)
                fds.append(fd)
                link = view / rel
                link.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.symlink(f"/proc/self/fd/{fd}", link)
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)
        for fd in fds:
            os.close(fd)


def _refuse_special_files(root: Path) -> None:
    """A plain folder handed to a library as it is: refuse a FIFO or device in it, which
    the library's own open would block on (it is not ours to make non-blocking)."""
    for dirpath, _dirs, files in os.walk(root, onerror=_raise_storage):
        for name in files:
            p = Path(dirpath) / name
            try:
                mode = p.stat().st_mode
            except OSError as e:
                raise StorageError(f"cannot read {p}: {e.strerror}") from None
            if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
                raise StorageError(f"{p} is not a regular file")


def _raise_storage(e: OSError) -> None:
    raise StorageError(f"cannot list {e.filename}: {e.strerror}")


class PlainFolder:
    """A plain folder with the reading interface of ``SealedFolder`` (migrations only)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def __enter__(self) -> PlainFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __contains__(self, path: object) -> bool:
        return path in self._files

    def open(self, path: str) -> PlainReader:
        return PlainReader(self.root / path)

    def read(self, path: str) -> bytes:
        with self.open(path) as r:
            return r.readall()


def open_folder_any(
    path: Path, *, allow_plaintext: bool = False, keys: KeyService | None = None
) -> SealedFolder | PlainFolder:
    harden_loader()
    path = _whole_folder(path)
    if is_sealed_folder(path):
        return open_folder(path, keys=keys)
    if path.is_dir() and plaintext_ok(path, allow_plaintext, keys):
        return PlainFolder(path)
    raise refuse_plaintext(path)
