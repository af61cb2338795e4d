"""Where modelseal keeps its host state: ``$MODELSEAL_HOME`` (default ``~/.modelseal``), and
the rule that whatever configures trust on this host can be changed by its owner only.

Owns only the location, that ownership check (``check_private``), and the rule that a
home named by the environment must exist (``check_home``, applied wherever config.toml
is read): pointing ``MODELSEAL_HOME`` or ``HOME`` at a folder that is not there must not
make a host read as unconfigured.
The keystore, config.toml, the audit key and the host's rollback records live below it;
what each file holds is its owner's business.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from modelseal.errors import KeystoreError, ModelsealError

HOME_NAME = ".modelseal"


def modelseal_home() -> Path:
    return Path(os.environ.get("MODELSEAL_HOME") or Path.home() / HOME_NAME)


def own_default_home() -> Path | None:
    """``~/.modelseal`` of this user as the password database has it (not ``$HOME``)."""
    try:
        return Path(pwd.getpwuid(os.geteuid()).pw_dir) / HOME_NAME
    except KeyError:  # a uid without an entry (some containers): no default to fall back on
        return None


def check_home(home: Path, error: type[ModelsealError]) -> None:
    """Refuse ``home`` if others could change it (``check_private``, raising ``error``), or
    if it does not exist (``KeystoreError``, as for a missing keystore), unless it is this
    user's own default (``own_default_home``): a host that never ran ``modelseal init``
    keeps nothing there, so nothing is lost. A missing home reached through
    ``MODELSEAL_HOME`` or ``HOME`` would read as a host with no config.toml (no trust
    policy, no ``host_env``, no key bindings) and no rollback records; ``modelseal init``
    creates it, and an empty folder does for a host that keeps no keys."""
    try:
        st = os.stat(home)
    except FileNotFoundError:
        # Only a home that MODELSEAL_HOME names explicitly must exist: a missing ~/.modelseal
        # (under $HOME, which CI containers and `docker run --user` often point elsewhere)
        # is a host that keeps no state. A host that needs its policy whatever the
        # environment says declares it in /etc/modelseal/config.toml.
        default = own_default_home()
        if not os.environ.get("MODELSEAL_HOME") or (
            default is not None and os.path.abspath(home) == os.path.abspath(default)
        ):
            return
        raise KeystoreError(
            f"no modelseal home at {home} (MODELSEAL_HOME, else $HOME/{HOME_NAME}): run 'modelseal init' first"
            " (an empty folder of mode 700 does for a host that keeps no keys)"
        ) from None
    except OSError as e:
        raise error(f"cannot check MODELSEAL_HOME {home}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"MODELSEAL_HOME {home} is not a folder")
    check_private(home, "MODELSEAL_HOME", error)


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
    """``$MODELSEAL_HOME``, refused if someone else could change what it holds. It may be
    missing (the keyless signing layer then keeps no records); whatever loads config.toml
    has refused a missing home already (``check_home``)."""
    home = modelseal_home()
    check_private(home, "MODELSEAL_HOME", error)
    return home
