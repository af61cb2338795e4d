"""The chain of backups in one store, and this host's memory of it (docs/recovery.md, "Backups").

Every manifest in a store is read and its signature checked; sorted by ``sequence`` they must
follow each other without a gap, each ``previous`` the SHA-256 of the manifest before it, back
to the oldest backup the store holds (older ones may have been pruned), all with the same
``chain`` id. This host keeps, per destination (keyed by the path or URL as given, never a
resolved one: a symlink swapped in must not start a fresh record), the highest sequence, its
digest, the chain id and the signer it has seen (``$MODELSEAL_HOME/backup-state.json``,
written atomically, never lowered): a store whose newest backup is older than that, that
holds another manifest under that sequence, or whose chain is another one (another host's or
destination's, with the sequences this host saw pruned away) had a backup deleted, an older
one swapped in or its content replaced. Every failure is ``BackupTampered``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import itertools
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from modelseal.errors import BackupError, BackupTampered
from modelseal.governance.approvals import parse_duration
from modelseal.keys.config import ConfigError, config_table
from modelseal.recovery.manifest import MANIFEST_NAME, MAX_MANIFEST, Manifest, check_signature, parse
from modelseal.recovery.manifest import trusted_signers as trusted_signers
from modelseal.recovery.stores import BackupStore, open_store
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited, write_atomic
from modelseal.util.home import check_private, modelseal_home

STATE_NAME = "backup-state.json"
STATE_FORMAT = "modelseal-backup-state/1"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def read_manifest(store: BackupStore, backup_id: str) -> Manifest:
    data = store.read(backup_id, MANIFEST_NAME, MAX_MANIFEST)
    return parse(data, backup_id, hashlib.sha256(data).hexdigest())


def load_chain(store: BackupStore, trusted: dict[str, Ed25519PublicKey]) -> list[Manifest]:
    """Every backup in ``store``, signatures checked and chained, oldest first."""
    chain = sorted((read_manifest(store, i) for i in store.list_ids()), key=lambda m: m.sequence)
    for m in chain:
        check_signature(m, trusted)
    for before, after in itertools.pairwise(chain):
        if after.sequence == before.sequence:
            raise BackupTampered(f"backups {before.id} and {after.id} claim the same sequence {after.sequence}")
        if after.sequence != before.sequence + 1:
            raise BackupTampered(
                f"the chain in {store.url} has a gap between sequence {before.sequence} ({before.id}) and"
                f" {after.sequence} ({after.id}): a backup was deleted"
            )
        if after.previous is None or not hmac.compare_digest(after.previous, before.digest):
            raise BackupTampered(f"backup {after.id} does not chain to {before.id}: a backup was swapped or replaced")
        if after.chain != before.chain:
            raise BackupTampered(f"backups {before.id} and {after.id} belong to different chains: mixed stores")
    return chain


# -- this host's record of the newest backup seen per destination -------------


def _state_path(home: Path) -> Path:
    return home / STATE_NAME


def read_state(home: Path) -> dict[str, dict[str, Any]]:
    path = _state_path(home)
    check_private(path, "the backup state", BackupError)
    try:
        raw = read_limited(path, 1 << 20, BackupError, str(path), regular=True)
    except FileNotFoundError:
        return {}
    doc = json_loads(raw, max_depth=4, max_values=100_000, error=lambda why: BackupError(f"{path}: {why}"))
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or not isinstance(doc.get("stores"), dict):
        raise BackupError(f"{path} is not a backup state file")
    stores: dict[str, dict[str, Any]] = doc["stores"]
    for entry in stores.values():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sequence"), int)
            or not isinstance(entry.get("digest"), str)
        ):
            raise BackupError(f"{path} is not a backup state file")
    return stores


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    fd = os.open(home / f".{STATE_NAME}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_against_state(store: BackupStore, chain: Sequence[Manifest], home: Path) -> None:
    """Refuse a store that is behind, or different from, what this host saw of it last."""
    seen = read_state(home).get(store.state_key)
    if seen is None:
        return
    seq, digest = int(seen["sequence"]), str(seen["digest"])
    newest = chain[-1].sequence if chain else 0
    chain_id, signer = seen.get("chain"), seen.get("signer")
    if chain and isinstance(chain_id, str) and not hmac.compare_digest(chain[0].chain, chain_id):
        raise BackupTampered(
            f"the backups in {store.url} are another chain than the one this host wrote or read there"
            f" ({seen.get('id', '?')}): another host's or destination's backups put in their place"
        )
    if newest < seq:
        raise BackupTampered(
            f"the newest backup in {store.url} is sequence {newest}, but this host has seen sequence {seq}"
            f" ({seen.get('id', '?')}): a backup was deleted or an older one swapped in"
        )
    same = [m for m in chain if m.sequence == seq]
    if same and not hmac.compare_digest(same[0].digest, digest):
        raise BackupTampered(
            f"backup sequence {seq} in {store.url} is not the one this host saw ({seen.get('id', '?')}): swapped"
        )
    if not same and chain:  # pruned past what this host saw: only the chain id and signer vouch
        if not isinstance(chain_id, str) or not isinstance(signer, str):
            raise BackupTampered(
                f"the backup sequence {seq} this host saw in {store.url} was pruned, and this host's older"
                " record of it names no chain: this chain cannot be told from another one"
            )
        if any(not hmac.compare_digest(m.signer, signer) for m in chain):
            raise BackupTampered(f"the backups in {store.url} are signed by another key than the one this host saw")


def record_seen(store: BackupStore, newest: Manifest, home: Path) -> None:
    """Remember ``newest`` as the highest backup of ``store`` (a lower one never replaces it)."""
    with _locked(home):
        stores = read_state(home)
        old = stores.get(store.state_key)
        if (
            old is not None
            and int(old["sequence"]) >= newest.sequence
            and (int(old["sequence"]) > newest.sequence or "chain" in old)
        ):
            return
        stores[store.state_key] = {
            "chain": newest.chain,
            "digest": newest.digest,
            "id": newest.id,
            "sequence": newest.sequence,
            "signer": newest.signer,
        }
        doc = {"format": STATE_FORMAT, "stores": stores}
        write_atomic(_state_path(home), json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n", mode=0o600)


def verify_parts(store: BackupStore, m: Manifest) -> None:
    """Every part file of ``m`` present, of its size and digest."""
    for entry in m.parts:
        data = store.read(m.id, entry.file, entry.size)
        if len(data) != entry.size or not hmac.compare_digest(hashlib.sha256(data).hexdigest(), entry.sha256):
            raise BackupTampered(f"part {entry.name} of backup {m.id} does not match its manifest: tampered")


def check_expected(
    store: BackupStore, chain: Sequence[Manifest], expect_sequence: int | None, expect_manifest: str | None
) -> None:
    """What the operator knows out of band about the newest backup (a fresh host has no
    record of its own): ``expect_sequence`` (the newest is at least that far along) and
    ``expect_manifest`` (the SHA-256 hex of a ``manifest.json`` the chain must hold)."""
    newest = chain[-1].sequence if chain else 0
    if expect_sequence is not None and newest < expect_sequence:
        raise BackupTampered(
            f"the newest backup in {store.url} is sequence {newest}, but sequence {expect_sequence} was expected:"
            " backups were deleted or the store rolled back"
        )
    if expect_manifest is not None:
        want = expect_manifest.lower()
        if not _HEX64.fullmatch(want):
            raise BackupError("--expect-manifest takes the 64 hex digits of a manifest's SHA-256")
        if not any(hmac.compare_digest(m.digest, want) for m in chain):
            raise BackupTampered(
                f"no backup in {store.url} has the manifest {want[:16]}... that was expected: truncated or replaced"
            )


def load_verified(
    url: str,
    backup_id: str | None = None,
    *,
    signer_keys: Sequence[str] = (),
    home: Path | None = None,
    expect_sequence: int | None = None,
    expect_manifest: str | None = None,
) -> tuple[BackupStore, Manifest]:
    """The newest (or the named) backup in ``url``, checked: every manifest's signature under a
    key trusted here (``signer_keys`` hex, else this host's backup signing key), the chain back
    to the oldest backup in the store, never behind what this host saw last (nor what the
    caller expects: ``check_expected``), and every part file of the backup present with its
    digest. The caller closes the store."""
    home = home or modelseal_home()
    store = open_store(url)
    try:
        chain = load_chain(store, trusted_signers(home, signer_keys))
        check_against_state(store, chain, home)  # first: an emptied store is a deletion, not "nothing"
        check_expected(store, chain, expect_sequence, expect_manifest)
        if not chain:
            raise BackupError(f"no backup in {store.url}")
        if backup_id is None:
            chosen = chain[-1]
        else:
            found = [m for m in chain if m.id == backup_id]
            if not found:
                raise BackupError(f"no backup {backup_id[:40]} in {store.url}")
            chosen = found[0]
        verify_parts(store, chosen)
        if home.is_dir():
            record_seen(store, chain[-1], home)
    except BaseException:
        store.close()
        raise
    return store, chosen


def rpo_warning(newest: Manifest, home: Path, now: float | None = None) -> str | None:
    """A line when ``newest`` is older than config.toml's ``[backup] rpo``, else None."""
    raw = config_table("backup", home).get("rpo")
    if raw is None:
        return None
    try:
        rpo = parse_duration(str(raw), "[backup] rpo")
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None
    age = (time.time() if now is None else now) - newest.created
    if age <= rpo:
        return None
    return f"the newest backup ({newest.id}) is {age / 3600:.1f} h old, older than [backup] rpo ({rpo / 3600:.1f} h)"


def list_backups(url: str, *, signer_keys: Sequence[str] = (), home: Path | None = None) -> list[Manifest]:
    """Every backup in ``url``, oldest first, checked as ``load_verified`` checks the chain (the
    part files are not read)."""
    home = home or modelseal_home()
    store = open_store(url)
    try:
        chain = load_chain(store, trusted_signers(home, signer_keys))
        check_against_state(store, chain, home)
        return chain
    finally:
        store.close()


__all__ = [
    "STATE_NAME",
    "check_against_state",
    "check_expected",
    "list_backups",
    "load_chain",
    "load_verified",
    "read_manifest",
    "read_state",
    "record_seen",
    "rpo_warning",
    "verify_parts",
]
