"""Putting one backup part back (docs/recovery.md, "What a backup holds"): the inverse of
``recovery.parts.collect``, for one part at a time.

Destinations come from ``Locations`` and a fixed allowlist, never from the part: a
``keystore`` part may hold ``keystore.json`` only; a ``config`` part the names of
``parts.CONFIG_FILES``, ``audit/`` + ``parts.AUDIT_FILES`` (beside the audit log's key) and
the files its own config.toml names inside the home by the rule ``parts.config_names``
applies when collecting (a relative name of plain segments, never absolute, never
leaving the home); a ``ca`` part the names ``parts.CA_FILE`` matches. Any other name
refuses the whole part before anything is written (``BackupTampered``).

Atomic and re-runnable: every file is written temp + fsync + rename (mode 0600, or 0644
where the part says it was readable; never executable); config.toml last, so a crash
midway leaves the old configuration in force and a re-run finishes the job; the
version records (rollback floors) are merged, each record the higher of the two; ``ca/``
is built beside the old one and swapped in whole (``util.files.replace``). A file or folder
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
from modelseal.recovery import baosnap, sqldump
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


def _mode(mode: int) -> int:
    return 0o644 if mode & 0o044 else 0o600


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


def _restore_keystore(data: bytes, loc: Locations, replace: bool) -> dict[str, Any]:
    _, files = decode_files(data, "keystore")
    for n in files:
        if n != "keystore.json":
            raise _refuse("keystore", n)
    if "keystore.json" not in files:
        raise BackupTampered("backup part keystore holds no keystore.json")
    home = _home(loc)
    return _write_files([(home / "keystore.json", files["keystore.json"][0], 0o600, home, False)], replace, "keystore")


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
    for n, (content, mode) in sorted(files.items(), key=lambda kv: (kv[0] == "config.toml", kv[0])):  # config last
        if n.startswith("audit/"):
            audit_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            key_mode = 0o600 if n.endswith(".key") else _mode(mode)
            plan.append((audit_dir / n.removeprefix("audit/"), content, key_mode, audit_dir, False))
        elif n in VERSION_RECORDS:
            plan.append((home / n, _merge_records(home / n, content, "config"), 0o600, home, True))
        else:
            plan.append((home / n, content, _mode(mode), home, False))
    return _write_files(plan, replace, "config")


def _same_folder(folder: Path, files: dict[str, tuple[bytes, int]]) -> bool:
    if not folder.is_dir():
        return False
    present = {p.name for p in folder.iterdir() if CA_FILE.fullmatch(p.name)}
    return present == set(files) and not any(_differs(folder / n, d) for n, (d, _) in files.items())


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
    if _same_folder(dest, files):
        return {"files": len(files), "written": 0}
    if (dest.exists() or dest.is_symlink()) and not replace:
        raise BackupError(f"{dest} exists and differs from the backup's ca part: restore with replace")
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
    return {"files": len(files), "written": len(files)}


def _restore_sql(name: str, data: bytes, loc: Locations, replace: bool) -> dict[str, Any]:
    target = {"governance": loc.governance_target, "registry": loc.registry_target}.get(name, loc.audit_target)()
    if target is None:
        raise BackupError(f"no {name} database to restore into: give the registry's --data or --db")
    return sqldump.load(data, name, target[0], target[1], name=name, replace=replace)


def restore_part(part_name: str, kind: str, data: bytes, loc: Locations, *, replace: bool) -> dict[str, Any]:
    """Put part ``part_name`` (of ``kind``, plaintext ``data``) back where ``loc`` says; returns
    counts. Allowlisted destinations only, atomic, re-runnable (module docstring)."""
    if part_name not in PART_NAMES or KIND_OF[part_name] != kind:
        raise BackupTampered(f"unknown backup part {part_name[:40]!r} of kind {kind[:20]!r}")
    if part_name == "keystore":
        return _restore_keystore(data, loc, replace)
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
    return _restore_sql(part_name, data, loc, replace)


__all__ = ["KIND_OF", "restore_part"]
