"""Putting one backup part back (docs/recovery.md, "What a backup holds"): the inverse of
``recovery.parts.collect``, for one part at a time.

Destinations come from ``Locations`` and a fixed allowlist, never from the part: a
``keystore`` part may hold ``keystore.json`` only; a ``config`` part the names of
``parts.CONFIG_FILES``, ``audit/audit-hosts.toml`` (beside the audit log) and the files its own
config.toml names inside the home by the rule ``parts.config_names`` applies when collecting,
each of the fixed forms ``parts.config_file_allowed`` accepts (a policy, key or revocation-list
suffix, plain segments, never absolute, never leaving the home, never a name other state owns:
the keystore, the backup state and signing key, the audit key, ``recovery/``, ``ca/``...); a
``ca`` part the names ``parts.CA_FILE`` matches. Any other name refuses the whole part before
anything is written (``BackupTampered``), and so does a destination whose folder leads out of
the home (every destination is checked before the first write).

For an environment's restore (``env``): the keystore part is merged into the live keystore
(``keys.keystore_export.merge_export``: that environment's keys added, or replaced with
``replace``; the others untouched; needs the passphrase), the governance part replaces only
that environment's rows (``sqldump.load(env=...)``), and the parts of the whole host
(``HOST_WIDE``) are refused: they are restored only when the operator names them, without
``env``.

Atomic and re-runnable: every file is written temp + fsync + rename (mode 0600, whatever
the part says; a key file keeps no wider mode from a backup); config.toml last, so a crash
midway leaves the old configuration in force and a re-run finishes the job; the
version records (rollback floors) are merged, each record the higher of the two; ``ca/``
is built beside the old one, with the live CA's later revocations and certificates merged
in (``recovery.camerge``), and swapped in whole (``util.files.replace``). A file or folder
already holding exactly the part's bytes is left as it is; one holding other bytes is
replaced only with ``replace``. SQL parts load in one transaction (``recovery.sqldump``);
the OpenBao part is a ``snapshot-force``, which always replaces the cluster's state, so it
needs ``replace``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from modelseal.errors import BackupError, BackupTampered
from modelseal.keys.keystore_export import merge_export
from modelseal.recovery import baosnap, camerge, sqldump
from modelseal.recovery.locations import Locations
from modelseal.recovery.partcodec import decode_files
from modelseal.recovery.parts import (
    AUDIT_FILES,
    CA_FILE,
    CONFIG_FILES,
    PART_NAMES,
    VERSION_RECORDS,
    audit_key_folder,
    config_names,
)
from modelseal.util.bounded import json_loads
from modelseal.util.files import fsync_dir, is_within, remove_path, write_atomic, write_new
from modelseal.util.files import replace as replace_path

KIND_OF = {
    "keystore": "files",
    "config": "files",
    "ca": "files",
    "governance": "sql",
    "registry": "sql",
    "audit": "sql",
    "openbao": "bao-snapshot",
}
_CA_STAGING = ".ca.restore-"
HOST_WIDE = ("config", "registry", "audit")  # the host's, not one environment's: restored only by name


def _refuse(part: str, name: str) -> BackupTampered:
    return BackupTampered(f"backup part {part} holds {name[:80]!r}, which is not a file it may restore")


def _home(loc: Locations) -> Path:
    loc.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return loc.home


def _differs(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() != data
    except FileNotFoundError:
        return True
    except OSError as e:
        raise BackupError(f"cannot read {path}: {e.strerror}") from None


def _place(home: Path, dest: Path) -> None:
    """Make ``dest``'s folder (0700) and check it is inside ``home`` once symlinks are resolved."""
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not is_within(dest.parent.resolve(), home.resolve()):
        raise BackupError(f"{dest.parent} leads out of {home}: not restoring into it")


def _check_place(home: Path, dest: Path) -> None:
    """Before anything is written: ``dest``'s nearest existing folder is a folder inside
    ``home`` once symlinks are resolved (or above ``home``, which is then made fresh), and
    ``dest`` is not a folder."""
    folder = dest.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or (dest.is_dir() and not dest.is_symlink()):
        raise BackupError(f"{folder if not folder.is_dir() else dest} is in the way of {dest}: not restoring")
    if home.is_relative_to(folder) and folder != home:
        return  # home itself is yet to be made (an audit folder elsewhere): nothing to follow
    if not is_within(folder.resolve(), home.resolve()):
        raise BackupError(f"{folder} leads out of {home}: not restoring into it")


Plan = list[tuple[Path, bytes, int, Path, bool]]  # destination, bytes, mode, folder it stays in, merged


def _write_files(plan: Plan, replace: bool, part: str) -> dict[str, Any]:
    """Write ``plan`` in order, after checking every entry: an existing file with other bytes
    needs ``replace``, except a merged version record (never lower than what is there)."""
    todo = []
    for dest, data, mode, root, merged in plan:
        if not _differs(dest, data):
            continue
        if (dest.exists() or dest.is_symlink()) and not replace and not merged:
            raise BackupError(f"{dest} exists and differs from the backup's {part} part: restore with replace")
        todo.append((dest, data, mode, root))
    for dest, _data, _mode, root in todo:  # the whole plan checked before its first write
        _check_place(root, dest)
    for dest, data, mode, root in todo:
        _place(root, dest)
        write_atomic(dest, data, mode=mode)
    return {"files": len(plan), "written": len(todo)}


def _merge_records(dest: Path, data: bytes, part: str) -> bytes:
    """The version record ``data`` merged with the one at ``dest``: each key's higher version."""

    def bad(_why: str) -> BackupTampered:
        return BackupTampered(f"backup part {part} holds a damaged {dest.name}")

    new = json_loads(data, max_depth=2, max_values=1_000_000, error=bad)
    if not isinstance(new, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in new.values()):
        raise bad("")
    with contextlib.suppress(OSError, ValueError, BackupTampered):
        old = json_loads(dest.read_bytes(), max_depth=2, max_values=1_000_000, error=bad)
        if isinstance(old, dict):
            for k, v in old.items():
                if isinstance(v, int) and not isinstance(v, bool) and v > new.get(k, 0):
                    new[k] = v
    return json.dumps(new, sort_keys=True).encode()


def _restore_keystore(data: bytes, loc: Locations, replace: bool, env: str | None) -> dict[str, Any]:
    header, files = decode_files(data, "keystore")
    for n in files:
        if n != "keystore.json":
            raise _refuse("keystore", n)
    if "keystore.json" not in files:
        raise BackupTampered("backup part keystore holds no keystore.json")
    if env is not None and header.get("env") != env:
        raise BackupError(f"the keystore part is not environment {env}'s alone: restore it by name, or its own backup")
    home = _home(loc)
    path = home / "keystore.json"
    if env is not None and os.path.lexists(path):  # merged: the other environments' keys stay
        _check_place(home, path)
        return {"files": 1, **merge_export(path, files["keystore.json"][0], replace=replace)}
    return _write_files([(path, files["keystore.json"][0], 0o600, home, False)], replace, "keystore")


def _restore_config(data: bytes, loc: Locations, replace: bool) -> dict[str, Any]:
    _, files = decode_files(data, "config")
    allowed = set(CONFIG_FILES) | {f"audit/{n}" for n in AUDIT_FILES}
    if "config.toml" in files:
        allowed |= config_names(files["config.toml"][0], lambda n: files[n][0] if n in files else None)
    for n in files:
        if n not in allowed:
            raise _refuse("config", n)
    home = _home(loc)
    audit_dir = audit_key_folder(loc)
    plan: Plan = []
    for n, (content, _bits) in sorted(files.items(), key=lambda kv: (kv[0] == "config.toml", kv[0])):  # config last
        if n.startswith("audit/"):
            plan.append((audit_dir / n.removeprefix("audit/"), content, 0o600, audit_dir, False))
        elif n in VERSION_RECORDS:
            plan.append((home / n, _merge_records(home / n, content, "config"), 0o600, home, True))
        else:
            plan.append((home / n, content, 0o600, home, False))
    return _write_files(plan, replace, "config")


def _restore_ca(data: bytes, loc: Locations, replace: bool) -> dict[str, Any]:
    _, files = decode_files(data, "ca")
    for n in files:
        if not CA_FILE.fullmatch(n):
            raise _refuse("ca", n)
    if "ca.json" not in files:
        raise BackupTampered("backup part ca holds no ca.json")
    home = _home(loc)
    dest = home / "ca"
    for leftover in home.glob(_CA_STAGING + "*"):  # a restore killed midway
        remove_path(leftover)
    # The live CA's later revocations and certificates are kept (recovery.camerge), under
    # its record lock, so a revocation made meanwhile is not lost by the swap.
    with camerge.live_records_locked(dest):
        if camerge.holds(dest, files):
            return {"files": len(files), "written": 0, "live": "held"}
        if (dest.exists() or dest.is_symlink()) and not replace:
            raise BackupError(f"{dest} exists and differs from the backup's ca part: restore with replace")
        files, found = camerge.merged(dest, files)
        staging = home / f"{_CA_STAGING}{os.urandom(6).hex()}"
        staging.mkdir(mode=0o700)
        try:
            for n, (content, _mode_bits) in sorted(files.items()):
                write_new(staging / n, content, 0o600)
            fsync_dir(staging)
            replace_path(staging, dest, force=True)
        finally:
            if staging.exists():
                remove_path(staging)
    return {"files": len(files), "written": len(files), **found}


def _restore_sql(name: str, data: bytes, loc: Locations, replace: bool, env: str | None) -> dict[str, Any]:
    target = {"governance": loc.governance_target, "registry": loc.registry_target}.get(name, loc.audit_target)()
    if target is None:
        raise BackupError(f"no {name} database to restore into: give the registry's --data or --db")
    return sqldump.load(data, name, target[0], target[1], name=name, replace=replace, env=env)


def restore_part(
    part_name: str, kind: str, data: bytes, loc: Locations, *, replace: bool, env: str | None = None
) -> dict[str, Any]:
    """Put part ``part_name`` (of ``kind``, plaintext ``data``) back where ``loc`` says; returns
    counts. Allowlisted destinations only, atomic, re-runnable; ``env`` for an environment's
    restore: merged, that environment's keys and rows only, ``HOST_WIDE`` parts refused
    (module docstring)."""
    if part_name not in PART_NAMES or KIND_OF[part_name] != kind:
        raise BackupTampered(f"unknown backup part {part_name[:40]!r} of kind {kind[:20]!r}")
    if env is not None and part_name in HOST_WIDE:
        raise BackupError(
            f"part {part_name} is the whole host's, not environment {env}'s: restore it only by naming it"
            f" (--component {part_name})"
        )
    if part_name == "keystore":
        return _restore_keystore(data, loc, replace, env)
    if part_name == "config":
        return _restore_config(data, loc, replace)
    if part_name == "ca":
        return _restore_ca(data, loc, replace)
    if part_name == "openbao":
        if loc.bao is None:
            raise BackupError("no OpenBao to restore into: give its address (--bao-addr or BAO_ADDR)")
        if not replace:
            raise BackupError("restoring OpenBao replaces the cluster's whole state: restore with replace")
        baosnap.restore_snapshot(loc.bao, data)
        if baosnap.settle(loc.bao.addr) == "sealed":
            raise BackupError(
                "OpenBao took the snapshot and sealed itself (another cluster's keyring):"
                " unseal it with that cluster's unseal keys"
            )
        return {"bytes": len(data)}
    return _restore_sql(part_name, data, loc, replace, env if part_name == "governance" else None)


__all__ = ["HOST_WIDE", "KIND_OF", "restore_part"]
