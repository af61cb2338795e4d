"""The isolated environment a restore drill runs in, and the keys it recovers
(docs/recovery.md, "Restore drills").

Secrets (recovery shares, keystore shares, OpenBao unseal keys and token) come from files
only: regular, this user's, readable by it alone (mode 600), small; never from argv. A
file of shares or keys holds one per line (blank lines and ``#`` comments are skipped).

The parts of a backup open with the production key where this host can reach it, else with
the offline recovery key, whose shares unlock it in this process only (``recovery.reckey``).
The restored keystore opens with ``$MODELSEAL_PASSPHRASE``, or with its k-of-n shares: the
root they rebuild re-wraps the *restored copy* under a random passphrase held in memory (the
live keystore and its passphrase are never touched).

``isolated(home, bao, token)`` points this process at the temporary home for the checks:
``MODELSEAL_HOME`` set to it, the live audit URL, agent socket and trust variables unset,
``BAO_ADDR``/``BAO_TOKEN`` set to the temporary OpenBao (or unset; ``BAO_TOKEN_FILE`` unset:
the token is this process's, in memory), everything put back on exit. The drill is one
thread of a CLI process; nothing else runs meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from modelseal.audit.events import MemorySink
from modelseal.errors import BackupError, KeystoreError, ModelsealError
from modelseal.keys import keystore
from modelseal.keys.config import load as load_config
from modelseal.keys.providers.local import LocalProvider
from modelseal.keys.service import KeyService
from modelseal.recovery.locations import BaoTarget

MAX_SECRET_FILE = 64 << 10
_SCRUBBED = (
    "MODELSEAL_AUDIT_URL",
    "MODELSEAL_AGENT_SOCK",
    "MODELSEAL_TRUST",
    "MODELSEAL_TRUST_OVERRIDE",
    "VAULT_ADDR",
    "VAULT_TOKEN",
    "BAO_ADDR",
    "BAO_TOKEN",
    "BAO_TOKEN_FILE",
    "VAULT_TOKEN_FILE",
)


def read_secret_file(path: Path, what: str) -> bytes:
    """The bytes of a secret file: a regular file of this user's, mode 600 or stricter."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise BackupError(f"cannot open the {what} file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BackupError(f"the {what} file {path} is not a regular file")
        if st.st_mode & 0o077 or st.st_uid != os.getuid():
            raise BackupError(f"the {what} file {path} must be this user's and readable by it only (chmod 600)")
        data = os.read(fd, MAX_SECRET_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE:
        raise BackupError(f"the {what} file {path} is over {MAX_SECRET_FILE >> 10} KiB")
    return data


def secret_lines(paths: Sequence[Path], what: str) -> list[str]:
    """The non-empty, non-comment lines of ``paths``, in order (shares, unseal keys)."""
    out: list[str] = []
    for path in paths:
        try:
            text = read_secret_file(path, what).decode("utf-8")
        except UnicodeDecodeError:
            raise BackupError(f"the {what} file {path} is not UTF-8 text") from None
        out += [s for line in text.splitlines() if (s := " ".join(line.split())) and not s.startswith("#")]
    if paths and not out:
        raise BackupError(f"the {what} files hold nothing")
    return out


def read_token(path: Path | None) -> str | None:
    """The OpenBao token: from ``path``, else ``$BAO_TOKEN``/``$VAULT_TOKEN`` (None without one)."""
    if path is not None:
        lines = secret_lines([path], "OpenBao token")
        if len(lines) != 1:
            raise BackupError(f"the OpenBao token file {path} must hold one line")
        return lines[0]
    return os.environ.get("BAO_TOKEN") or os.environ.get("VAULT_TOKEN") or None


def unlock_recovery(manifest: Any, mnemonics: list[str]) -> list[str]:
    """Unlock, in this process, the recovery key of the backup that ``mnemonics`` rebuild,
    checked against the fingerprint its signed manifest names (so a host that lost its
    ``recovery/NAME.pub`` can still use it); the names unlocked (``BackupError`` if none)."""
    from modelseal.recovery import reckey

    keys = list(manifest.recovery_keys)
    if not keys:
        raise BackupError("the backup is sealed to no recovery key: recovery shares cannot open it")
    done: list[str] = []
    why = ""
    for name, fingerprint in keys:
        try:
            reckey.unlock(name, mnemonics, expect_fingerprint=fingerprint)
        except ModelsealError as e:
            why = str(e)[:200]
            continue
        done.append(name)
    if not done:
        raise BackupError(f"the recovery shares open none of the backup's recovery keys ({why})")
    return done


def unseal_parts(
    store: Any, manifest: Any, entries: Sequence[Any], svc: KeyService, shares: Sequence[Path], unlocked: list[str]
) -> tuple[dict[str, bytes], str]:
    """Every part of ``entries`` unsealed into memory, and which key opened them: the
    production key (``svc``) where it is reachable, else the recovery key the ``shares``
    unlock (appended to ``unlocked``: the caller forgets them). ``BackupError`` if neither."""
    from modelseal.recovery.sealing import unseal_part

    try:
        return {e.name: unseal_part(store, manifest, e, svc) for e in entries}, "production"
    except BackupError:
        if not shares:
            raise
    names = unlock_recovery(manifest, secret_lines(shares, "recovery share"))
    unlocked += names
    return {e.name: unseal_part(store, manifest, e, svc) for e in entries}, "recovery:" + ",".join(names)


def forget_recovery(names: Sequence[str], svc: KeyService) -> None:
    """Drop the recovery keys ``names`` from this process, and the data keys ``svc`` cached
    while they were there (they opened with a key that is no longer here)."""
    from modelseal.keys.providers import recovery as provider

    for name in names:
        provider.forget(name)
    if names:
        svc.forget_unwrapped()


def open_keystore(path: Path, shares: Sequence[Path]) -> tuple[Callable[[], bytes], str]:
    """A passphrase source that opens the restored keystore at ``path``, checked now, and how
    it was opened (``passphrase`` or ``shares``)."""
    if shares:
        mnemonics = secret_lines(shares, "keystore share")
        temporary = secrets.token_hex(32).encode()
        try:
            keystore.recover_root(mnemonics, temporary, path, scrypt_log2_n=keystore.MIN_SCRYPT_LOG2_N)
        except KeystoreError as e:
            raise BackupError(f"the keystore shares do not open the restored keystore: {e}") from None

        def source() -> bytes:
            return temporary

        how = "shares"
    else:
        if not os.environ.get(keystore.PASSPHRASE_ENV):
            raise BackupError(
                f"the restored keystore needs {keystore.PASSPHRASE_ENV} or its shares (--keystore-shares FILE)"
            )
        source, how = keystore.read_passphrase, "passphrase"
    try:
        keystore.unlock_uncached(path, source())
    except KeystoreError as e:
        raise BackupError(f"the restored keystore does not open: {e}") from None
    return source, how


def restored_service(home: Path, passphrase: Callable[[], bytes] | None) -> KeyService:
    """The key service of the temporary home (call inside ``isolated``): its own keystore and
    config, events kept in memory (they are the throwaway environment's)."""
    providers = {}
    if passphrase is not None:
        providers["local"] = LocalProvider(keystore.keystore_path(home), passphrase)
    return KeyService(sink=MemorySink(), providers=dict(providers), config=load_config(home))


@contextlib.contextmanager
def isolated(home: Path, bao: BaoTarget | None, token: str | None) -> Iterator[None]:
    """This process pointed at the temporary ``home`` (module docstring)."""
    saved = {name: os.environ.get(name) for name in ("MODELSEAL_HOME", *_SCRUBBED)}
    try:
        for name in _SCRUBBED:
            os.environ.pop(name, None)
        os.environ["MODELSEAL_HOME"] = str(home)
        if bao is not None:
            os.environ["BAO_ADDR"] = bao.addr
            if token:
                os.environ["BAO_TOKEN"] = token
        keystore.clear_cache()
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        keystore.clear_cache()


__all__ = [
    "forget_recovery",
    "isolated",
    "open_keystore",
    "read_secret_file",
    "read_token",
    "restored_service",
    "secret_lines",
    "unlock_recovery",
    "unseal_parts",
]
