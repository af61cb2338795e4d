"""Walking a plaintext folder to be sealed, and containment checks.

Owns ``walk_folder`` (symlinks that leave the folder, symlinked folders and special
files are refused; a folder or entry that cannot be read is an error, never skipped)
and ``is_within``, which sees through symlinks and bind mounts. Opens nothing for
reading (``util.files.open_walked`` does) and knows nothing of the sealed format.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from modelseal.errors import PolicyDenied, StorageError


def is_within(child: Path, parent: Path) -> bool:
    """Whether ``child`` is ``parent`` or lies below it, after resolving symlinks, and
    also through another name for the same folder (a bind mount, a case-insensitive
    name): every existing folder above ``child`` is compared with ``parent`` by
    (device, inode)."""
    c, p = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    if c == p or p in c.parents:
        return True
    try:
        want = os.stat(p)
    except OSError:
        return False
    for above in (c, *c.parents):
        try:
            st = os.stat(above)
        except OSError:
            continue  # not created yet
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            return True
    return False


FileId = tuple[int, int]  # (st_dev, st_ino)


def walk_folder(root: Path, *, refuse: Path | None = None) -> list[tuple[str, Path, FileId]]:
    """List the regular files under ``root`` as (POSIX relative path, real path, file id), sorted.

    Symlinks are followed only when they stay inside ``root``; one that leaves
    it (or dangles) is refused, as are symlinked folders and special files. A
    folder or entry that cannot be read is a ``StorageError``, never skipped: the
    sealed output is all that is left once the plaintext is deleted. ``refuse`` (the
    keystore's folder) may not be any folder of the tree, under any name (a bind mount).

    Each sub-folder is listed through a descriptor opened without following a symlink
    and must be the very folder (device, inode) its parent's listing named: a folder
    swapped for a symlink while the walk runs cannot bring files from elsewhere in.
    """
    root_real = Path(os.path.realpath(root))
    banned = _id_of(refuse) if refuse is not None else None
    banned_files = _file_ids(refuse) if refuse is not None else set()  # a hard link of keystore.json
    out: list[tuple[str, Path, FileId]] = []
    seen: set[FileId] = set()
    stack: list[tuple[Path, FileId | None]] = [(root, None)]
    while stack:  # iterative: no recursion limit on deep trees
        folder, want = stack.pop()
        fst, entries = _list(folder, follow=want is None)
        fid = (fst.st_dev, fst.st_ino)
        if want is not None and fid != want:
            raise PolicyDenied(f"{folder} changed while it was being walked; nothing was sealed")
        if fid == banned:
            raise PolicyDenied(f"{folder} is the keystore's folder: keys must never be sealed beside the data")
        if fid in seen:  # a bind mount of a folder above: the walk would never end
            raise PolicyDenied(f"{folder} is a second name for a folder already walked (a bind mount?)")
        seen.add(fid)
        for name, st in entries:
            p = folder / name
            rel = p.relative_to(root).as_posix()
            if stat.S_ISDIR(st.st_mode):
                stack.append((p, (st.st_dev, st.st_ino)))
                continue
            real = p
            if stat.S_ISLNK(st.st_mode):
                st, real = _link_target(p, rel, root_real)
            if not stat.S_ISREG(st.st_mode):
                raise PolicyDenied(f"{rel} is not a regular file")
            if (st.st_dev, st.st_ino) in banned_files:
                raise PolicyDenied(
                    f"{rel} is a file of the keystore's folder: keys must never be sealed beside the data"
                )
            out.append((rel, real, (st.st_dev, st.st_ino)))
    out.sort(key=lambda item: os.fsencode(item[0]))  # a name that is not UTF-8 is refused later, typed
    return out


def _list(folder: Path, *, follow: bool) -> tuple[os.stat_result, list[tuple[str, os.stat_result]]]:
    """The folder's identity and its entries with their own (not followed) status, read
    through one descriptor (the root may be a symlink the operator named; a sub-folder
    may not)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(folder, flags)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and not follow:
            raise PolicyDenied(f"{folder} changed while it was being walked; nothing was sealed") from None
        raise StorageError(f"cannot list the folder {folder}: {e.strerror}; nothing was sealed") from None
    try:
        try:
            fst = os.fstat(fd)
            with os.scandir(fd) as it:
                names = [entry.name for entry in it]
        except OSError as e:
            raise StorageError(f"cannot list the folder {folder}: {e.strerror}; nothing was sealed") from None
        entries = []
        for name in names:
            try:
                entries.append((name, os.stat(name, dir_fd=fd, follow_symlinks=False)))
            except OSError as e:
                raise StorageError(f"cannot read {folder / name}: {e.strerror}; nothing was sealed") from None
        return fst, entries
    finally:
        os.close(fd)


def _file_ids(folder: Path) -> set[FileId]:
    """The (device, inode) of the regular files directly in ``folder`` (none if unreadable)."""
    try:
        with os.scandir(folder) as it:
            stats = [e.stat(follow_symlinks=False) for e in it]
    except OSError:
        return set()
    return {(s.st_dev, s.st_ino) for s in stats if stat.S_ISREG(s.st_mode)}


def _id_of(path: Path) -> FileId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _link_target(link: Path, rel: str, root_real: Path) -> tuple[os.stat_result, Path]:
    try:
        st = os.stat(link)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise PolicyDenied(f"symlink {rel} points outside the folder being sealed") from None
        raise StorageError(f"cannot read {link}: {e.strerror}; nothing was sealed") from None
    if stat.S_ISDIR(st.st_mode):
        # A linked folder is refused outright: following it could loop or escape.
        raise PolicyDenied(f"symlinked folder {rel} is not allowed in a sealed folder")
    real = Path(os.path.realpath(link))
    if not is_within(real, root_real):
        raise PolicyDenied(f"symlink {rel} points outside the folder being sealed")
    return st, real
