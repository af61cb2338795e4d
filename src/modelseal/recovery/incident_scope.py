"""Which journaled records a resumed key-compromise run acts on (docs/recovery.md, "Resuming").

A record in the incident's journal is a note of what an earlier run found, never an
instruction: a record planted in (or left over in) the incident folder must not make a run
rewrite a file outside the paths given, or delete a manifest of another repository or
registry. So each pending record is checked against what this run itself can see:

- it must be inside this run's scope: a path record under one of the ``--path`` roots, a
  registry record of one of the ``--registry`` hosts and of a repository this run covers
  (its ``--repo`` ones, or every one of its catalog). A pending record outside the scope
  blocks ``--execute``: the disable step would leave that artifact unreadable, so the
  operator gives its path or registry again (or removes a record that is not theirs);
- before re-encryption, the artifact must still be exposed with the record's artifact id:
  this run's discovery found it again (header or audit history), or a registry manifest
  read again by its digest is; a path that is missing is left to the gone check of
  ``incident_artifacts``. An artifact at that path that is exposed under another id
  replaces the record (a new finding); one that is not exposed any more is ``left`` alone
  with the reason, unless a run that crashed re-encrypted it (``started``: its header
  names the key at the incident's new version only, and its signature history holds the
  superseded signatures the record names);
- after re-encryption, the copy must be the incident's: its artifact id is the record's
  new one, its header names the key at the new version and no compromised one (a ``done``
  signed record inside the scope is only re-signed on the same condition:
  ``incident_artifacts.resign_again``).

Gone and left records come back to life when discovery finds the artifact exposed again.
Nothing here writes: ``Decision`` says what ``keycompromise`` applies once the run holds
the journal's lock.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.errors import ModelsealError, VerificationError
from modelseal.format.envelope import artifact_id, parse_slots
from modelseal.keys.service import KeyService
from modelseal.recipes.recipients import same_key
from modelseal.recovery import incident_registry as reg
from modelseal.recovery.incident_find import Found, History, compromised_in, read_header
from modelseal.recovery.journal import PENDING
from modelseal.signing.sigfile import SignatureFile, signature_path
from modelseal.util.files import replaced_name

BEFORE = ("planned", "started")  # states in which the artifact is not re-encrypted yet
MAX_LISTED = 5


@dataclass(frozen=True)
class Scope:
    """What this run covers: its path roots, and per registry host its repositories (None:
    every repository of its catalog)."""

    roots: tuple[Path, ...]
    registries: dict[str, tuple[str, ...] | None]

    def why_not(self, item: dict[str, Any]) -> str | None:
        """None if the record is inside the scope, else what to give to bring it in."""
        loc = str(item["location"])
        if item["kind"] == "path":
            p = Path(loc)
            if any(p == r or r in p.parents for r in self.roots):
                return None
            return "outside the --path given: give its --path again"
        host, repo = loc.split("/", 1)
        if host not in self.registries:
            return f"of the registry {host}: give --registry {host} again (never applied to another registry)"
        repos = self.registries[host]
        if repos is not None and repo not in repos:
            return f"of the repository {repo}: give --repo {repo} again"
        return None


@dataclass
class Decision:
    act: list[str] = field(default_factory=list)  # refs of records to drive on
    reset: dict[str, dict[str, Any]] = field(default_factory=dict)  # ref -> a new record from a fresh finding
    left: dict[str, str] = field(default_factory=dict)  # ref -> why it is not acted on
    recheck: list[str] = field(default_factory=list)  # done signed records whose new signature is checked again
    blockers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Key:
    """The key and versions of the incident, to judge an artifact by."""

    svc: KeyService
    canon: str
    compromised: Collection[int]
    new: int | None
    hist: History


def is_incidents_copy(key: Key, path: Path, item: dict[str, Any], want_id: str | None) -> bool:
    """Whether the artifact at ``path`` is this incident's re-encrypted copy of ``item``: the key at
    the new version only, no compromised version, the id ``want_id`` (if given) other than the
    old one, and for a signed one the superseded signatures the record names in its history."""
    if key.new is None:
        return False  # nothing is re-encrypted before the rotation
    try:
        raw, _ = read_header(path)
        aid = artifact_id(raw.core.binding)
        mine = {
            r.key_version for _, slot in parse_slots(raw.slots) for r in slot.recipients
            if same_key(key.svc, r, key.canon)
        }  # fmt: skip
        if compromised_in(key.svc, raw, key.canon, key.compromised) or mine != {key.new}:
            return False
        if aid == item["old_id"] or (want_id is not None and aid != want_id):
            return False
        if item.get("signed"):
            sf = SignatureFile.load(signature_path(path))
            history = {e.id for e in sf.history} if sf is not None else set()
            if not {str(s["id"]) for s in item.get("old_signatures", [])} <= history:
                return False
    except (ModelsealError, OSError, VerificationError):
        return False
    return True


def _path(key: Key, item: dict[str, Any], state: str, found: Found | None, out: Decision) -> None:
    ref = str(item["ref"])
    if state in BEFORE:
        if found is not None:
            if found.artifact_id == item["old_id"]:
                out.act.append(ref)
            else:
                out.reset[ref] = {**found.to_json(), "state": "planned"}
            return
        path = Path(str(item["location"]))
        if not (os.path.lexists(path) or os.path.lexists(replaced_name(path))):
            out.act.append(ref)  # missing: the gone check decides (incident_artifacts)
        elif state == "started" and is_incidents_copy(key, path, item, None):
            out.act.append(ref)  # re-encrypted by a run that crashed before its journal write
        else:
            out.left[ref] = "not exposed any more: the artifact there is not the one found (replaced or re-encrypted)"
        return
    path = Path(str(item["location"]))
    if is_incidents_copy(key, path, item, str(item.get("new_id") or "")):
        out.act.append(ref)
    else:
        out.left[ref] = "changed since this incident re-encrypted it: the artifact there is not the incident's copy"


def _registry(
    key: Key, item: dict[str, Any], state: str, found: Found | None, sessions: dict[str, reg.Session], work: Path,
    out: Decision,
) -> None:  # fmt: skip
    ref = str(item["ref"])
    if state in BEFORE:
        if found is not None:  # a manifest is its digest's: the same artifact
            out.act.append(ref)
            return
        present, again = reg.find_one(key.svc, sessions[reg.host_of(item)], item, (key.canon, key.compromised,
                                                                                    key.hist))  # fmt: skip
        if not present or (again is not None and again.artifact_id == item["old_id"]):
            out.act.append(ref)  # missing: the gone check decides
        else:
            out.left[ref] = "not an exposed artifact: the manifest of that digest names no compromised version"
        return
    copy = reg.work_path(work, item)
    if not (copy.exists() or copy.is_symlink()) or is_incidents_copy(key, copy, item, str(item.get("new_id") or "")):
        out.act.append(ref)  # a missing work copy is pulled again; the old manifest is checked before its deletion
    else:
        out.left[ref] = "its work copy is not this incident's re-encrypted artifact"


def reconcile(
    key: Key,
    records: dict[str, dict[str, Any]],
    found: list[Found],
    scope: Scope,
    sessions: dict[str, reg.Session],
    work: Path,
) -> Decision:
    """What to do with each journaled record (see the module doc); reads, never writes."""
    out = Decision()
    by_ref = {f.ref: f for f in found}
    outside: list[str] = []
    for ref, item in sorted(records.items()):
        state = str(item.get("state", "planned"))
        f = by_ref.get(ref)
        if state in ("gone", "left"):
            if f is not None:
                out.reset[ref] = {**f.to_json(), "state": "planned"}  # exposed again: found anew
            continue
        if state == "done" and item.get("signed") and not item.get("verified") and scope.why_not(item) is None:
            out.recheck.append(ref)
        if state not in PENDING:
            continue
        if state == "failed":
            state = str(item.get("failed_in", "planned"))
        why = scope.why_not(item)
        if why is not None:
            outside.append(f"{ref} ({why})")
            continue
        if item["kind"] == "path":
            _path(key, item, state, f, out)
        else:
            _registry(key, item, state, f, sessions, work, out)
    if outside:
        more = f" and {len(outside) - MAX_LISTED} more" if len(outside) > MAX_LISTED else ""
        out.blockers.append(
            f"artifacts: the journal has {len(outside)} artifact(s) still to do that this run does not cover: "
            f"{'; '.join(outside[:MAX_LISTED])}{more}; the disable step would leave them unreadable (a record that is "
            "not this incident's can be removed from the incident folder)"
        )
    return out


__all__ = ["BEFORE", "Decision", "Key", "Scope", "is_incidents_copy", "reconcile"]
