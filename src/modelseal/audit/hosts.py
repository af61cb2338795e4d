"""The audit keys a host accepts in its log: its own, and those listed in ``audit-hosts.toml``.

Several hosts may append to one log (one PostgreSQL database). Each entry is signed by
the audit key of the host that wrote it and names that key's id (``signer`` in the
event: lowercase hex SHA-256 of the raw 32-byte Ed25519 public key), so a verifier
checks every entry against a configured set of host keys instead of one key. The set
lives beside the host's audit key, ``$MODELSEAL_HOME/audit-hosts.toml``::

    [hosts]
    build-01 = "ed25519:3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
    build-02 = "ed25519:..."

``modelseal audit key`` prints a host's line. The file is trust configuration: it is
refused if group or others may write it. Owns only this file; verification is
``audit.log``'s.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from modelseal.errors import ModelsealError
from modelseal.util.bounded import toml_loads
from modelseal.util.files import read_limited
from modelseal.util.home import check_private

HOSTS_NAME = "audit-hosts.toml"
MAX_HOSTS_FILE = 64 * 1024
MAX_HOSTS = 256
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY = re.compile(r"ed25519:([0-9a-f]{64})")


class AuditConfigError(ModelsealError):
    """The audit hosts file is unreadable, invalid or writable by others."""

    exit_code = 2


@dataclass(frozen=True)
class HostKey:
    name: str
    key: Ed25519PublicKey

    @property
    def key_id(self) -> str:
        return key_id(self.key)


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """The id an entry names its signer by: hex SHA-256 of the raw public key."""
    return hashlib.sha256(raw_public(key)).hexdigest()


def host_line(name: str, key: Ed25519PublicKey) -> str:
    """This host's line for the other hosts' ``audit-hosts.toml``."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", name)[:64].lstrip("._-") or "host"
    return f'{safe} = "ed25519:{raw_public(key).hex()}"'


def parse_hosts(text: str, where: str = HOSTS_NAME) -> dict[str, HostKey]:
    """The ``[hosts]`` table, keyed by key id. Unknown tables, bad names, bad keys, a key
    listed twice or more than ``MAX_HOSTS`` hosts are refused, never skipped."""
    doc = toml_loads(
        text,
        max_depth=4,
        max_key_parts=4,
        max_values=4 * MAX_HOSTS,
        error=lambda why: AuditConfigError(f"{where}: {why}"),
    )
    if set(doc) - {"hosts"}:
        raise AuditConfigError(f"{where}: only a [hosts] table is allowed")
    hosts = doc.get("hosts", {})
    if not isinstance(hosts, dict) or len(hosts) > MAX_HOSTS:
        raise AuditConfigError(f"{where}: [hosts] must be a table of at most {MAX_HOSTS} names")
    out: dict[str, HostKey] = {}
    for name, value in hosts.items():
        match = _KEY.fullmatch(value) if isinstance(value, str) else None
        if not _HOST.fullmatch(name) or match is None:
            raise AuditConfigError(
                f'{where}: each host is NAME = "ed25519:<64 lowercase hex>" (NAME of [A-Za-z0-9._-])'
            )
        try:
            host = HostKey(name, Ed25519PublicKey.from_public_bytes(bytes.fromhex(match.group(1))))
        except ValueError:
            raise AuditConfigError(f"{where}: the key of {name} is not an Ed25519 public key") from None
        if host.key_id in out:
            raise AuditConfigError(f"{where}: {name} and {out[host.key_id].name} have the same key")
        out[host.key_id] = host
    return out


def load_hosts(path: Path) -> dict[str, HostKey]:
    """The hosts configured in ``path`` (none if it does not exist), keyed by key id."""
    try:  # trust configuration: a FIFO never blocks, and only its owner may change it
        raw = read_limited(path, MAX_HOSTS_FILE, AuditConfigError, str(path), regular=True)
    except FileNotFoundError:
        return {}
    check_private(path, HOSTS_NAME, AuditConfigError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AuditConfigError(f"{path} is not UTF-8") from None
    return parse_hosts(text, str(path))
