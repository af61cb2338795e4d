"""What a compromised key version protected: headers only, no key used (docs/recovery.md).

An artifact is exposed when any slot of its header (both A/B slots: a crash between a
rewrap's two writes leaves the old one readable) has a recipient of the compromised key at a
compromised version. The header shows only the current wraps, though: an artifact sealed
under version 1 and rewrapped to version 2 since keeps the data key version 1 protected.
``history`` finds those in the audit log: every ``wrap``, ``generate``, ``unwrap``,
``rewrap`` or ``rewrap-from`` (a batch rewrap's old version, ``recipes.rotation``) event of
the key at a compromised version names the artifact id (an id survives rewraps), so an
artifact whose id is there is exposed whatever its header says now. An artifact the log
shows only rewrapped (sealed on another host) has an origin this log cannot tell: it is
listed as "origin unknown".

A ``broker:NAME`` recipient carries its backing key's recipient inside (``governance.brokerops``):
one whose backing recipient is the compromised key at a compromised version is listed
apart (``Findings.broker``): it must be handled by an incident on ``broker:NAME``, since
re-encrypting here would wrap to the broker again and the disable step would make it
unreadable.

Paths are walked as ``modelseal rotate`` walks them (``recipes.rotation.find_artifacts``: no
symlink followed, only regular files opened); one that cannot be read is reported, never
skipped. The temporary names of an atomic write are skipped, and the old copy a folder swap
keeps under ``.NAME.replaced-by-modelseal`` (``util.files``) stands for ``NAME`` when a crash
left ``NAME`` missing. The registry side (``incident_registry``) reads headers over ranged GETs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.errors import DecryptionError, ModelsealError, VerificationError
from modelseal.format.envelope import artifact_id, parse_slots
from modelseal.format.file import RawArtifact, read_raw
from modelseal.format.folder import MANIFEST_NAME
from modelseal.format.source import CipherSource, FdSource
from modelseal.governance.brokerops import decode_inner
from modelseal.keys.providers import parse_key_uri
from modelseal.keys.service import KeyService
from modelseal.recipes.recipients import same_key
from modelseal.recipes.rotation import find_artifacts
from modelseal.signing.sigfile import SignatureFile, signature_path
from modelseal.util.files import open_regular, replaced_name
from modelseal.util.home import modelseal_home

KEY_OPS = ("wrap", "generate", "unwrap", "rewrap", "rewrap-from")
ORIGIN_OPS = ("wrap", "generate")  # the events of the host that sealed the artifact
REPLACED = ".replaced-by-modelseal"
_TEMP = re.compile(r"\..+\.[a-z]+-[0-9a-f]{12}")  # util.files.temp_sibling


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
    parent: list[int] | None = None  # st_dev, st_ino of the folder holding it, when found

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
            "parent": self.parent,
        }


@dataclass
class Findings:
    found: list[Found] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # paths or repositories that could not be read
    history: str = ""  # what the audit-history search covered, or why it could not run
    unknown: list[str] = field(default_factory=list)  # refs the audit log shows only rewrapped
    broker: list[str] = field(default_factory=list)  # refs sealed to a broker key backed by this one
    notes: list[str] = field(default_factory=list)


@dataclass
class History:
    """What the audit log says: ids exposed, ids seen only rewrapped, what was searched."""

    exposed: set[str] = field(default_factory=set)
    rewrapped_only: set[str] = field(default_factory=set)
    note: str = ""


def compromised_in(svc: KeyService, raw: RawArtifact, canon: str, versions: Collection[int]) -> list[int]:
    """The compromised versions of the key ``canon`` that any slot of ``raw`` names."""
    out = {
        r.key_version
        for _, slot in parse_slots(raw.slots)
        for r in slot.recipients
        if r.key_version in versions and same_key(svc, r, canon)
    }
    return sorted(out)


def via_broker(svc: KeyService, raw: RawArtifact, canon: str, versions: Collection[int]) -> list[str]:
    """The ``broker:NAME`` recipients of ``raw`` whose backing recipient is the key ``canon``
    at a compromised version (none when the incident is on a broker key itself)."""
    if parse_key_uri(canon).scheme == "broker":
        return []
    names = set()
    for _, slot in parse_slots(raw.slots):
        for r in slot.recipients:
            if r.scheme != "broker":
                continue
            try:
                inner = decode_inner(r.wrapped)
            except DecryptionError:
                continue  # not a backing recipient this could be: the broker refuses it too
            if inner.key_version in versions and same_key(svc, inner, canon):
                names.add(r.key_id)
    return sorted(names)


def parent_id(path: Path) -> list[int] | None:
    """The folder holding ``path``, as (st_dev, st_ino): a share unmounted since shows another."""
    try:
        st = os.stat(path.parent)
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


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


def judge(
    svc: KeyService, raw: RawArtifact, canon: str, versions: Collection[int], hist: History, ref: str, out: Findings
) -> tuple[str, list[int]] | None:
    """(artifact id, compromised versions in the header) when ``raw`` is exposed, else None;
    an artifact sealed to a broker key backed by this one, or of unknown origin, is noted in ``out``."""
    aid = artifact_id(raw.core.binding)
    for name in via_broker(svc, raw, canon, versions):
        out.broker.append(f"{ref}: sealed to broker:{name}, whose backing key this is: run the incident on "
                          f"broker:{name}")  # fmt: skip
    hit = compromised_in(svc, raw, canon, versions)
    if hit or aid in hist.exposed:
        return aid, hit
    if aid in hist.rewrapped_only:
        out.unknown.append(ref)
    return None


def _stands_for(artifact: Path) -> Path | None:
    """The artifact a walked name stands for: itself; ``NAME`` for the old copy of an interrupted
    folder swap when ``NAME`` is missing; None for a temporary name or a stale old copy."""
    name = artifact.name
    if name.startswith(".") and name.endswith(REPLACED) and len(name) > len(REPLACED) + 1:
        original = artifact.with_name(name[1 : -len(REPLACED)])
        return original if replaced_name(original) == artifact and not os.path.lexists(original) else None
    if _TEMP.fullmatch(name):
        return None
    return artifact


def in_paths(
    svc: KeyService, paths: Sequence[Path], canon: str, versions: Collection[int], hist: History | None = None
) -> Findings:
    """Every sealed file and folder under ``paths`` a compromised version protects."""
    out = Findings()
    hist = hist or History()

    def unreadable(p: Path, e: OSError) -> None:
        out.problems.append(f"{p}: cannot read or list it ({e.strerror or type(e).__name__})")

    for artifact in find_artifacts(paths, on_error=unreadable):
        stands = _stands_for(artifact)
        if stands is None:
            continue
        try:
            raw, size = read_header(artifact)
        except (ModelsealError, OSError) as e:
            out.problems.append(f"{artifact}: its header cannot be read ({type(e).__name__})")
            continue
        p = stands.absolute()
        got = judge(svc, raw, canon, versions, hist, f"path:{p}", out)
        if got is None:
            continue
        aid, hit = got
        folder = artifact.is_dir()
        out.found.append(Found(f"path:{p}", "path", str(p), aid, hit, is_signed(artifact), size, folder=folder,
                               parent=parent_id(p)))  # fmt: skip
    return out


def history(svc: KeyService, canon: str, versions: Collection[int]) -> History:
    """Artifact ids the audit log shows under a compromised version of ``canon`` (only
    entries that verify), the ids it shows only rewrapped, and a line saying what was searched."""
    from modelseal.audit.log import MerkleAuditLog

    url = os.environ.get("MODELSEAL_AUDIT_URL")
    target: str | Path = url or modelseal_home() / "audit.db"
    if isinstance(target, Path) and not target.exists():
        return History(note="no audit log on this host: artifacts were found by their headers only")
    try:
        events, v = MerkleAuditLog(target).verified_events()
    except ModelsealError as e:
        return History(note=f"the audit log could not be read ({type(e).__name__}): headers only")
    spellings: dict[str, bool] = {}
    out = History()
    origin: set[str] = set()
    rewrapped: set[str] = set()
    for ev in events:
        key, version, aid, op = ev.get("key"), ev.get("version"), ev.get("artifact"), ev.get("operation")
        if op not in KEY_OPS or ev.get("result") != "ok":
            continue
        if not isinstance(key, str) or not isinstance(aid, str):
            continue
        if key not in spellings:
            try:  # only this key's scheme is resolved: no other provider is asked about anything
                same = parse_key_uri(key).scheme == parse_key_uri(canon).scheme
                spellings[key] = same and svc.canonical(key) == canon
            except (ModelsealError, ValueError):
                spellings[key] = False
        if not spellings[key]:
            continue
        if version in versions:
            out.exposed.add(aid)
        if op in ORIGIN_OPS:
            origin.add(aid)
        elif op in ("rewrap", "rewrap-from"):
            rewrapped.add(aid)
    out.rewrapped_only = rewrapped - origin - out.exposed
    out.note = (
        f"{len(events)} verified audit entries searched, {len(out.exposed)} artifact id(s) under the versions, "
        f"{len(out.rewrapped_only)} only rewrapped here (origin unknown)"
    )
    if not v.ok:
        out.note += f"; the log does not verify past entry {v.first_bad} ({v.reason}): later entries not used"
    return out


__all__ = [
    "Findings",
    "Found",
    "History",
    "compromised_in",
    "header_of",
    "history",
    "in_paths",
    "is_signed",
    "judge",
    "parent_id",
    "read_header",
    "via_broker",
]
