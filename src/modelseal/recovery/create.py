"""``modelseal backup create`` (docs/recovery.md, "Backups"): collect the parts, seal each to the
environment's production keys and every configured recovery key, write them, then the signed
manifest chained to the previous backup, then this host's record of it.

Settings are config.toml's ``[backup]`` table::

    [backup]
    recovery_keys = ["recovery:offline-2026"]   # at least one (modelseal backup keygen)
    object_lock_mode = "COMPLIANCE"              # or GOVERNANCE; S3 buckets with Object Lock
    retain_days = 30                             # Object Lock retention (--retain overrides)

The manifest is signed by this host's backup signing key (``recovery.manifest.signing_key``,
made by the first backup; its public key is in the manifest, the record and ``backup create``'s
output, for verifiers elsewhere). On success: the audit event ``backup-create`` (result ``ok``,
key ``backup:<id>``, artifact the manifest's SHA-256) and a backup record under
``$MODELSEAL_HOME/evidence/backups/``, signed by the audit key as every record is, with its own
event (``backup-record``, key ``evidence:<path>``, artifact the record's SHA-256). On failure:
``backup-create`` with the error class name, and nothing in the store that lists. A backup
written whose host state or record then fails is reported as written but not recorded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelseal.audit.events import AuditEvent, AuditSink
from modelseal.audit.log import MerkleAuditLog, load_or_create_signing_key, public_key_hex
from modelseal.errors import BackupError, KeyNotFound, KeyProviderError
from modelseal.keys.config import ConfigError, config_table
from modelseal.keys.providers import parse_key_uri
from modelseal.keys.providers.recovery import load_public
from modelseal.keys.service import KeyService
from modelseal.recovery.chain import check_against_state, load_chain, record_seen
from modelseal.recovery.locations import Locations
from modelseal.recovery.manifest import (
    Manifest,
    PartEntry,
    body_of,
    new_chain_id,
    new_id,
    parse,
    part_file,
    sign,
    signing_key,
    trusted_signers,
)
from modelseal.recovery.parts import PART_NAMES, Part, collect
from modelseal.recovery.s3store import MODES
from modelseal.recovery.sealing import seal_part
from modelseal.recovery.stores import FolderStore, Retention, open_store
from modelseal.util.files import is_within, write_atomic

DEFAULT_RETAIN_DAYS = 30
RECORD_FORMAT = "modelseal-backup-record/v1"
RECORD_DOMAIN = b"modelseal-backup-record/v1\n"
RECORD_DIR = ("evidence", "backups")
AUDIT_KEY_NAME = "audit-signing.key"  # records are signed as recovery.records signs them
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdwy]?)")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0, "y": 365 * 86400.0, "": 86400.0}


@dataclass(frozen=True)
class BackupSettings:
    recovery_keys: tuple[str, ...]
    lock_mode: str
    retain_seconds: float


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``2w``, ``1y`` (a bare number is days) in seconds: 1 s to 100 years."""
    m = _DURATION.fullmatch(text.strip())
    seconds = float(m.group(1)) * _UNITS[m.group(2)] if m else math.nan
    if not 1 <= seconds <= 100 * 365 * 86400:
        raise BackupError(f"a retention is a duration like 30d, 12h or 2w (at most 100y), not {text[:40]!r}")
    return seconds


def settings(home: Path) -> BackupSettings:
    """config.toml's ``[backup]`` table, checked."""
    table = config_table("backup", home)
    keys = table.get("recovery_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ConfigError("config: [backup] recovery_keys must be a list of recovery:NAME key URIs")
    for k in keys:
        if parse_key_uri(k).scheme != "recovery":
            raise ConfigError(f"config: [backup] recovery_keys lists {k[:80]!r}, which is not a recovery:NAME key")
    mode = table.get("object_lock_mode", "COMPLIANCE")
    if mode not in MODES:
        raise ConfigError(f"config: [backup] object_lock_mode is one of {', '.join(MODES)}")
    days = table.get("retain_days", DEFAULT_RETAIN_DAYS)
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 36500:
        raise ConfigError("config: [backup] retain_days must be a number of days from 1 to 36500")
    return BackupSettings(tuple(dict.fromkeys(keys)), mode, days * 86400.0)


def recipients(svc: KeyService, key_env: str, cfg: BackupSettings) -> list[str]:
    """The environment's production keys, then every recovery key; refused without either."""
    prod = svc.config.keys_for(key_env)
    if not prod:
        raise BackupError(f"config.toml lists no keys for env={key_env}: a backup is sealed to the environment's keys")
    if not cfg.recovery_keys:
        raise BackupError(
            "config.toml names no recovery key: run 'modelseal backup keygen' and list it under"
            ' [backup] recovery_keys = ["recovery:NAME"]'
        )
    return list(dict.fromkeys([*prod, *cfg.recovery_keys]))


def _check_parts(parts: Sequence[Part]) -> None:
    names = [p.name for p in parts]
    if not parts or len(set(names)) != len(names) or not set(names) <= set(PART_NAMES):
        raise BackupError(f"a backup holds each of {', '.join(PART_NAMES)} at most once, and at least one")


def _record(home: Path, m: Manifest, url: str, sink: AuditSink) -> None:
    """The signed backup record (evidence) and its ``backup-record`` event."""
    body: dict[str, Any] = {
        "created": int(m.created),
        "destination": url,
        "env": m.env,
        "format": RECORD_FORMAT,
        "id": m.id,
        "manifest_sha256": m.digest,
        "parts": [{"name": p.name, "sha256": p.sha256, "size": p.size} for p in m.parts],
        "recipients": list(m.recipients),
        "result": "ok",
        "sequence": m.sequence,
        "signer_key": m.signer,  # the backup signing key (hex) that signed the manifest
    }
    key = sink.signing_key if isinstance(sink, MerkleAuditLog) else load_or_create_signing_key(home / AUDIT_KEY_NAME)
    signed = RECORD_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    doc = {"body": body, "signer": public_key_hex(key.public_key()), "signature": key.sign(signed).hex()}
    data = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    folder = home.joinpath(*RECORD_DIR)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = dt.datetime.fromtimestamp(m.created, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"backup-{stamp}-{secrets.token_hex(4)}.json"
    write_atomic(path, data, mode=0o600, exclusive=True)
    rel = "/".join((*RECORD_DIR, path.name))
    sink.emit(AuditEvent("backup-record", f"evidence:{rel}", "ok", artifact=hashlib.sha256(data).hexdigest()))


def create_backup(
    url: str,
    loc: Locations,
    env: str | None,
    svc: KeyService,
    *,
    sink: AuditSink | None = None,
    retain: float | None = None,
    parts: Sequence[Part] | None = None,
    now: Callable[[], float] = time.time,
) -> Manifest:
    """Back up this host's state (everything with ``env`` None, else only ``env``'s) into ``url``.

    ``retain`` (seconds) overrides ``[backup] retain_days`` for an S3 bucket with Object Lock
    (refused anywhere else). ``parts`` are used instead of collecting (a caller that collected
    already). Returns the manifest written."""
    sink = sink or svc.sink
    home = loc.home
    started = now()
    backup_id = new_id(started)
    unrecorded: Exception | None = None
    try:
        m = _create(url, loc, env, svc, backup_id, started, retain, parts)
    except _Unrecorded as u:  # in the store, complete: not a failed backup
        m, unrecorded = u.manifest, u.cause
    except Exception as e:  # the error class name only: messages may quote paths
        sink.emit(AuditEvent("backup-create", f"backup:{backup_id}", type(e).__name__))
        raise
    sink.emit(AuditEvent("backup-create", f"backup:{backup_id}", "ok", artifact=m.digest))
    try:
        _record(home, m, url, sink)
    except Exception as e:
        unrecorded = unrecorded or e
    if unrecorded is not None:
        raise BackupError(
            f"backup {m.id} (sequence {m.sequence}) was written to {url}, but not recorded on this host"
            f" ({type(unrecorded).__name__}: {str(unrecorded)[:200]}): fix that, then run 'backup verify'"
        )
    return m


class _Unrecorded(Exception):
    """The backup is complete in the store; what failed is this host's record of it."""

    def __init__(self, manifest: Manifest, cause: Exception) -> None:
        super().__init__(str(cause))
        self.manifest, self.cause = manifest, cause


def _fingerprints(home: Path, cfg: BackupSettings) -> dict[str, str]:
    out = {}
    for uri in cfg.recovery_keys:
        name = parse_key_uri(uri).name
        try:
            out[name] = load_public(name, home).fingerprint_hex
        except (KeyNotFound, KeyProviderError) as e:
            raise BackupError(str(e)) from None
    return out


def _create(
    url: str,
    loc: Locations,
    env: str | None,
    svc: KeyService,
    backup_id: str,
    started: float,
    retain: float | None,
    parts: Sequence[Part] | None,
) -> Manifest:
    home = loc.home
    cfg = settings(home)
    key_env = env or svc.config.host_env or svc.config.default_env
    key_uris = recipients(svc, key_env, cfg)
    fingerprints = _fingerprints(home, cfg)
    key = signing_key(home)
    store = open_store(url)
    if isinstance(store, FolderStore) and is_within(store.root, home):
        store.close()
        raise BackupError(f"{store.root} lies inside MODELSEAL_HOME: a backup there is lost with the host's state")
    try:
        with store.lock():
            chain = load_chain(store, trusted_signers(home))
            check_against_state(store, chain, home)
            previous = chain[-1] if chain else None
            retention = None
            if store.object_lock():
                retention = Retention(cfg.lock_mode, retain if retain is not None else cfg.retain_seconds)
            elif retain is not None:
                raise BackupError(f"--retain needs an S3 bucket with Object Lock; {store.url} has none")
            collected = list(parts) if parts is not None else collect(loc, env, svc)
            _check_parts(collected)
            writer = store.begin(backup_id, retention)
            try:
                entries = []
                for part in collected:
                    sealed = seal_part(
                        part.name, part.data, env=key_env, backup_id=backup_id, key_uris=key_uris, svc=svc
                    )
                    writer.put(part_file(part.name), sealed)
                    digest = hashlib.sha256(sealed).hexdigest()
                    entries.append(
                        PartEntry(part.name, part.kind, part_file(part.name), digest, len(sealed), part.meta)
                    )
                    del sealed
                body = body_of(
                    backup_id=backup_id,
                    sequence=previous.sequence + 1 if previous else 1,
                    previous=previous.digest if previous else None,
                    created=started,
                    env=env,
                    host=socket.gethostname()[:255] or "unknown",
                    recipients=key_uris,
                    recovery_keys=fingerprints,
                    parts=entries,
                    signer=public_key_hex(key.public_key()),
                    chain=previous.chain if previous else new_chain_id(),
                )
                data = sign(body, key)
                m = parse(data, backup_id, hashlib.sha256(data).hexdigest())  # what readers will check
                writer.commit(data)
            except BaseException as e:
                try:
                    writer.abort()
                except BackupError as left:  # say both: what failed, and what it left behind
                    if isinstance(e, Exception):
                        raise BackupError(f"{type(e).__name__}: {str(e)[:200]}; and {left}") from None
                raise
            try:
                record_seen(store, m, home)
            except Exception as e:
                raise _Unrecorded(m, e) from None
            return m
    finally:
        store.close()


__all__ = ["DEFAULT_RETAIN_DAYS", "BackupSettings", "create_backup", "parse_duration", "recipients", "settings"]
