"""What a compromised key version protected: headers only, no key used (docs/recovery.md).

An artifact is exposed when any slot of its header (both A/B slots: a crash between a
rewrap's two writes leaves the old one readable) has a recipient of the compromised key at a
compromised version. The header shows only the current wraps, though: an artifact sealed
under version 1 and rewrapped to version 2 since keeps the data key version 1 protected.
``history`` finds those in the audit log: every ``wrap``, ``rewrap`` or ``generate`` event of
the key at a compromised version names the artifact id (an id survives rewraps), so an
artifact whose id is there is exposed whatever its header says now.

Paths are walked as ``modelseal rotate`` walks them (``recipes.rotation.find_artifacts``: no
symlink followed, only regular files opened); one that cannot be read is reported, never
skipped. The registry side (``incident_registry``) reads headers over ranged GETs.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.errors import ModelsealError, VerificationError
from modelseal.format.envelope import artifact_id, parse_slots
from modelseal.format.file import RawArtifact, read_raw
from modelseal.format.folder import MANIFEST_NAME
from modelseal.format.source import CipherSource, FdSource
from modelseal.keys.providers import parse_key_uri
from modelseal.keys.service import KeyService
from modelseal.recipes.recipients import same_key
from modelseal.recipes.rotation import find_artifacts
from modelseal.signing.sigfile import SignatureFile, signature_path
from modelseal.util.files import open_regular
from modelseal.util.home import modelseal_home

KEY_OPS = ("wrap", "rewrap", "generate")


@dataclass
class Found:
    """One exposed artifact. ``ref`` names it for the journal: ``path:<absolute path>`` or
    ``oci://HOST:PORT/REPO@sha256:...``."""

    ref: str
    kind: str  # "path" | "registry"
    location: str  # the path, or HOST:PORT/REPO
    artifact_id: str
    versions: list[int]  # the compromised versions its header names (empty: found by history)
    signed: bool
    size: int = 0
    digest: str | None = None  # the registry manifest's
    tags: list[str] = field(default_factory=list)
    folder: bool = False

    @property
    def why(self) -> str:
        return "header" if self.versions else "audit history"

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "kind": self.kind,
            "location": self.location,
            "old_id": self.artifact_id,
            "versions": self.versions,
            "why": self.why,
            "signed": self.signed,
            "size": self.size,
            "digest": self.digest,
            "tags": self.tags,
            "folder": self.folder,
        }


@dataclass
class Findings:
    found: list[Found] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # paths or repositories that could not be read
    history: str = ""  # what the audit-history search covered, or why it could not run


def compromised_in(svc: KeyService, raw: RawArtifact, canon: str, versions: Collection[int]) -> list[int]:
    """The compromised versions of the key ``canon`` that any slot of ``raw`` names."""
    out = {
        r.key_version
        for _, slot in parse_slots(raw.slots)
        for r in slot.recipients
        if r.key_version in versions and same_key(svc, r, canon)
    }
    return sorted(out)


def read_header(path: Path) -> tuple[RawArtifact, int]:
    """The header of the sealed file or folder at ``path`` (its manifest's), and its size in bytes."""
    primary = path / MANIFEST_NAME if path.is_dir() else path
    src = FdSource(open_regular(primary))
    try:
        raw = read_raw(src)
    finally:
        src.close()
    if path.is_dir():
        size = sum(p.stat().st_size for p in (path / "blobs").iterdir()) if (path / "blobs").is_dir() else 0
        return raw, size + primary.stat().st_size
    return raw, os.stat(primary).st_size


def header_of(src: CipherSource) -> RawArtifact:
    return read_raw(src)


def is_signed(path: Path) -> bool:
    """Whether the artifact has current signatures (a damaged signature file counts: it is
    refused at the re-sign step, not silently treated as unsigned)."""
    try:
        sf = SignatureFile.load(signature_path(path))
    except VerificationError:
        return True
    return sf is not None and bool(sf.signatures)


def in_paths(
    svc: KeyService, paths: Sequence[Path], canon: str, versions: Collection[int], exposed_ids: Collection[str]
) -> Findings:
    """Every sealed file and folder under ``paths`` a compromised version protects."""
    out = Findings()

    def unreadable(p: Path, e: OSError) -> None:
        out.problems.append(f"{p}: cannot read or list it ({e.strerror or type(e).__name__})")

    for artifact in find_artifacts(paths, on_error=unreadable):
        try:
            raw, size = read_header(artifact)
        except (ModelsealError, OSError) as e:
            out.problems.append(f"{artifact}: its header cannot be read ({type(e).__name__})")
            continue
        aid = artifact_id(raw.core.binding)
        hit = compromised_in(svc, raw, canon, versions)
        if not hit and aid not in exposed_ids:
            continue
        p = artifact.absolute()
        out.found.append(Found(f"path:{p}", "path", str(p), aid, hit, is_signed(artifact), size, folder=p.is_dir()))
    return out


def history(svc: KeyService, canon: str, versions: Collection[int]) -> tuple[set[str], str]:
    """Artifact ids the audit log shows wrapped under a compromised version of ``canon``
    (only entries that verify), and a line saying what was searched."""
    from modelseal.audit.log import MerkleAuditLog

    url = os.environ.get("MODELSEAL_AUDIT_URL")
    target: str | Path = url or modelseal_home() / "audit.db"
    if isinstance(target, Path) and not target.exists():
        return set(), "no audit log on this host: artifacts were found by their headers only"
    try:
        events, v = MerkleAuditLog(target).verified_events()
    except ModelsealError as e:
        return set(), f"the audit log could not be read ({type(e).__name__}): headers only"
    spellings: dict[str, bool] = {}
    ids: set[str] = set()
    for ev in events:
        key, version, aid = ev.get("key"), ev.get("version"), ev.get("artifact")
        if ev.get("operation") not in KEY_OPS or ev.get("result") != "ok" or version not in versions:
            continue
        if not isinstance(key, str) or not isinstance(aid, str):
            continue
        if key not in spellings:
            try:  # only this key's scheme is resolved: no other provider is asked about anything
                same = parse_key_uri(key).scheme == parse_key_uri(canon).scheme
                spellings[key] = same and svc.canonical(key) == canon
            except (ModelsealError, ValueError):
                spellings[key] = False
        if spellings[key]:
            ids.add(aid)
    note = f"{len(events)} verified audit entries searched, {len(ids)} artifact id(s) wrapped under the versions"
    if not v.ok:
        note += f"; the log does not verify past entry {v.first_bad} ({v.reason}): later entries not used"
    return ids, note


__all__ = ["Findings", "Found", "compromised_in", "header_of", "history", "in_paths", "is_signed", "read_header"]
