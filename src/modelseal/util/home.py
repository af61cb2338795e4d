"""Where modelseal keeps its host state: ``$MODELSEAL_HOME`` (default ``~/.modelseal``), and
the rule that whatever configures trust on this host can be changed by its owner only.

Owns only the location and that ownership check (``check_private``). The keystore,
config.toml, the audit key and the host's rollback records live below it; what each
file holds is its owner's business.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from modelseal.errors import ModelsealError


def modelseal_home() -> Path:
    return Path(os.environ.get("MODELSEAL_HOME") or Path.home() / ".modelseal")


def check_private(path: Path, what: str, error: type[ModelsealError], *, parent: bool = False) -> None:
    """Refuse ``path`` if anyone but its owner could change it: writable by group or others,
    or owned by another user than this one or root (as ssh's StrictModes does for
    ``authorized_keys``). With ``parent``, its folder must not let others replace it
    either (a group- or world-writable folder without the sticky bit). A path that does
    not exist is left to the caller. Symlinks are followed: the target is what is read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise error(f"cannot check {what} {path}: {e.strerror}") from None
    _check(st, path, what, error)
    if not parent:
        return
    # The folder of the name given (a symlink there could be swapped) and of its target.
    for folder in dict.fromkeys((Path(os.path.abspath(path)).parent, Path(os.path.realpath(path)).parent)):
        try:
            pst = os.stat(folder)
        except OSError as e:
            raise error(f"cannot check the folder of {what} {path}: {e.strerror}") from None
        if not pst.st_mode & stat.S_ISVTX:  # sticky (/tmp): only a file's owner may replace it
            _check(pst, folder, f"the folder of {what}", error)


def _check(st: os.stat_result, path: Path, what: str, error: type[ModelsealError]) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise error(f"{what} {path} is writable by group or others (mode {mode:o}); run: chmod go-w {path}")
    if st.st_uid not in (os.geteuid(), 0):
        raise error(f"{what} {path} belongs to another user (uid {st.st_uid}): only this user or root may own it")


def checked_home(error: type[ModelsealError]) -> Path:
    """``$MODELSEAL_HOME``, refused if someone else could change what it holds."""
    home = modelseal_home()
    check_private(home, "MODELSEAL_HOME", error)
    return home
