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


def walk_folder(root: Path) -> list[tuple[str, Path, FileId]]:
    """List the regular files under ``root`` as (POSIX relative path, real path, file id), sorted.

    Symlinks are followed only when they stay inside ``root``; one that leaves
    it (or dangles) is refused, as are symlinked folders and special files. A
    folder or entry that cannot be read is a ``StorageError``, never skipped: the
    sealed output is all that is left once the plaintext is deleted.
    """
    root_real = Path(os.path.realpath(root))
    out: list[tuple[str, Path, FileId]] = []
    seen: set[FileId] = set()
    stack = [root]
    while stack:  # iterative: no recursion limit on deep trees
        folder = stack.pop()
        try:
            fst = os.stat(folder)
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            raise StorageError(f"cannot list the folder {folder}: {e.strerror}; nothing was sealed") from None
        if (fst.st_dev, fst.st_ino) in seen:  # a bind mount of a folder above: the walk would never end
            raise PolicyDenied(f"{folder} is a second name for a folder already walked (a bind mount?)")
        seen.add((fst.st_dev, fst.st_ino))
        for entry in entries:
            p = Path(entry.path)
            rel = p.relative_to(root).as_posix()
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:
                raise StorageError(f"cannot read {p}: {e.strerror}; nothing was sealed") from None
            if stat.S_ISDIR(st.st_mode):
                stack.append(p)
                continue
            real = p
            if stat.S_ISLNK(st.st_mode):
                st, real = _link_target(p, rel, root_real)
            if not stat.S_ISREG(st.st_mode):
                raise PolicyDenied(f"{rel} is not a regular file")
            out.append((rel, real, (st.st_dev, st.st_ino)))
    out.sort(key=lambda item: item[0].encode())
    return out


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
