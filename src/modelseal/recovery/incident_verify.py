"""Step 5 of a key-compromise incident: each re-encrypted artifact is checked for what the
incident promised (docs/recovery.md, "Incident: key compromise").

- It opens (through the key service: the new version's wrap) and every chunk authenticates:
  the whole plaintext is decrypted, in blocks, and its SHA-256 compared with the digest the
  sealed metadata records (per file for a folder). Nothing is written.
- Its header names no compromised version of the key in either slot, and its artifact id
  differs from the exposed one (a new data key, not a rewrap).
- Signatures (``incident_signing``): the new one verifies under the trust policy, the
  superseded ones are on the revocation list.
- Registry: each tag moved now names the new manifest, and the old manifest is gone.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection
from pathlib import Path

from modelseal.errors import DecryptionError, IncidentError
from modelseal.format.envelope import artifact_id
from modelseal.format.reader import SealedReader
from modelseal.keys.service import KeyService
from modelseal.recipes.opening import open as open_sealed
from modelseal.recipes.opening import open_folder
from modelseal.recovery.incident_find import compromised_in, read_header

BLOCK = 8 << 20


def _digest(r: SealedReader, buf: bytearray) -> str:
    h = hashlib.sha256()
    view = memoryview(buf)
    offset = 0
    while offset < r.size:
        n = r.preadinto(offset, view[: min(BLOCK, r.size - offset)], private=True)
        if n <= 0:
            raise DecryptionError()
        h.update(view[:n])
        offset += n
    return h.hexdigest()


def contents(path: Path, svc: KeyService) -> int:
    """Decrypt the whole artifact and check each file's plaintext digest; returns the bytes read."""
    buf = bytearray(BLOCK)
    try:
        if path.is_dir():
            total = 0
            with open_folder(path, keys=svc, verify=False) as folder:
                for e in folder.entries():
                    with folder.open(e.path) as r:
                        if not hmac.compare_digest(_digest(r, buf), e.sha256):
                            raise DecryptionError()
                        total += r.size
            return total
        with open_sealed(path, keys=svc, verify=False) as r:
            want = r.metadata().get("sha256")
            if not isinstance(want, str) or not hmac.compare_digest(_digest(r, buf), want):
                raise DecryptionError()
            return r.size
    finally:
        buf[:] = bytes(len(buf))


def header(path: Path, svc: KeyService, canon: str, versions: Collection[int], old_id: str) -> str:
    """The artifact's new id, after checking it names no compromised version and is not the old one."""
    raw, _ = read_header(path)
    left = compromised_in(svc, raw, canon, versions)
    if left:
        raise IncidentError(f"verify: {path} still names version(s) {left} of the compromised key")
    aid = artifact_id(raw.core.binding)
    if aid == old_id:
        raise IncidentError(f"verify: {path} still has the exposed data key (artifact {old_id[:16]})")
    return aid


__all__ = ["contents", "header"]
