"""Steps 3 and 4 of a key-compromise incident for one artifact: re-encrypt, re-sign and (for
a registry artifact) replace it, each state recorded in the journal before the next begins.

An artifact record goes ``planned`` -> ``started`` -> ``reencrypted`` -> ``signed`` ->
(registry: ``pushed`` ->) ``done``; ``gone`` when the artifact (a registry manifest, a file or
a folder) was deleted before the incident re-encrypted it: the report lists it, and the
disable step waits for ``--accept-gone``. A path counts as deleted only if the folder that
held it is still the one it was found in (same device and inode: an unmounted share shows
another, or none) and no interrupted folder swap holds it (``util.files.settle_replaced``
puts it back first). What makes each transition safe to repeat after a crash:

- ``started`` is written (with the superseded signatures, checked under the trust policy)
  before anything changes. The re-encryption itself (``recipes.rekey.reencrypt``) swaps the new
  artifact in atomically, with the old signatures moved to its history. Whether it happened is
  read from the artifact, not assumed: it is re-encrypted if and only if its artifact id is
  still the exposed one (an id changes only with a new data key, never with a rewrap), so a
  crash between the swap and the journal's write never re-encrypts twice, and one before the
  swap never skips it.
- the re-sign looks for the signer's own signature of that name and version first
  (``incident_signing.signed_by``), and the new signature is checked under the trust policy
  at once, before anything is revoked (a signing key the policy does not trust for the
  artifact stops the incident there, with the superseded signatures still valid); a ``done``
  record whose new signature no longer verifies is re-signed (``resign_again``).
- a registry artifact is pulled again by its old digest until it is re-encrypted (the old
  manifest is only deleted once the new one is pushed); pushing the same bytes again gives the
  same digest, and deleting a manifest already gone is a 404.

Recipients: the new data key goes to the same recipients, each one the operator vouches for
(``recipes.recipients``); the compromised key is vouched for by naming it on the command line,
and is wrapped to at its new primary version. Any failure stops the incident with
``IncidentError`` naming the step and the artifact; the record says ``failed`` and why, and the
next run retries it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.audit.events import AuditEvent
from modelseal.errors import IncidentError, ModelsealError, StorageError
from modelseal.format.envelope import artifact_id
from modelseal.keys.service import KeyService
from modelseal.recipes import rekey
from modelseal.recovery import incident_registry as reg
from modelseal.recovery import incident_signing as signing
from modelseal.recovery.incident_find import History, parent_id, read_header
from modelseal.recovery.incident_scope import Key, is_incidents_copy
from modelseal.recovery.journal import PENDING, Journal
from modelseal.signing.signers import Signer
from modelseal.signing.trust import TrustPolicy
from modelseal.util.files import settle_replaced


@dataclass
class Run:
    """What every artifact's steps need: the services, the key and the operator's choices."""

    svc: KeyService
    journal: Journal
    uri: str
    canon: str
    compromised: list[int]
    new_version: int
    policy: TrustPolicy | None
    signers: Sequence[Signer]
    keep: Sequence[str]
    sessions: dict[str, reg.Session]
    work: Path
    progress: Callable[[str], None] | None = None
    hist: History = field(default_factory=History)

    def emit(self, op: str, result: str, artifact: str | None, version: int | None = None) -> None:
        self.svc.sink.emit(AuditEvent(op, self.uri, result, version, artifact))

    def session(self, item: dict[str, Any]) -> reg.Session:
        host = reg.host_of(item)
        if host not in self.sessions:
            raise IncidentError(f"{item['ref']} is an artifact of {host}: give --registry {host}")
        return self.sessions[host]


def _save(run: Run, item: dict[str, Any], state: str) -> None:
    item["state"] = state
    item.pop("error", None)
    run.journal.save_item(item)


def _where(run: Run, item: dict[str, Any]) -> Path:
    if item["kind"] == "registry":
        return reg.work_path(run.work, item)
    return Path(str(item["location"]))


def _start(run: Run, item: dict[str, Any], path: Path) -> None:
    """Record what is superseded, after checking it, before anything changes."""
    if item.get("signed"):
        if run.policy is None:
            raise IncidentError("no trust policy to check the superseded signatures with (--trust)")
        with run.journal.clock("check-signatures"):
            sigs, name, version = signing.check_superseded(path, run.policy)
        item.update(old_signatures=sigs, name=name, sign_version=version)
    _save(run, item, "started")


def _reencrypt(run: Run, item: dict[str, Any], path: Path) -> None:
    raw, _ = read_header(path)
    if artifact_id(raw.core.binding) == item["old_id"]:
        with run.journal.clock("reencrypt"):
            rekey.reencrypt(path, keys=run.svc, keep_recipients=[*run.keep, run.uri])
        raw, _ = read_header(path)
    item["new_id"] = artifact_id(raw.core.binding)
    run.emit("incident-reencrypt", "ok", str(item["old_id"]), run.new_version)
    _save(run, item, "reencrypted")


def _resign(run: Run, item: dict[str, Any], path: Path) -> None:
    if item.get("signed"):
        if run.policy is None:
            raise IncidentError("no trust policy to check the new signatures with (--trust)")
        with run.journal.clock("resign"):
            name, version = str(item["name"]), int(item["sign_version"])
            new = [signing.resign(path, s, name, version, run.svc) for s in run.signers]
            signing.check_new(path, run.policy, new, deep=False)  # before any old signature is revoked
            item["new_signatures"] = new
        run.emit("incident-resign", "ok", str(item["new_id"]), version)
    _save(run, item, "signed" if item["kind"] == "registry" else "done")


def _replace(run: Run, item: dict[str, Any], path: Path) -> None:
    session = run.session(item)
    with run.journal.clock("push"):
        if item["state"] == "signed":
            new, moved, left = reg.replace_tags(session, item, path)
            item.update(new_digest=new or None, tags_moved=moved, tags_left=left)
            _save(run, item, "pushed")
        present, again = reg.find_one(run.svc, session, item, (run.canon, run.compromised, run.hist))
        if present and (again is None or again.artifact_id != item["old_id"]):
            raise IncidentError("the manifest of the old digest is not the exposed artifact this record names: "
                                "not deleted")  # fmt: skip
        item["deleted"] = reg.delete_old(session, item)
    run.emit("incident-registry-replace", "ok", str(item["new_id"]), run.new_version)
    _save(run, item, "done")


def _missing(item: dict[str, Any], path: Path) -> bool:
    """Whether a path artifact is gone: not there (after an interrupted folder swap is put
    right) while the folder that held it is the very one it was found in."""
    settle_replaced(path)
    if os.path.lexists(path):
        return False
    if item.get("parent") is None or parent_id(path) != item["parent"]:
        raise StorageError(
            f"{path} is missing and {path.parent} is not the folder it was found in (an unmounted share, a moved "
            "folder?): not treated as deleted; make it reachable and run again"
        )
    return True


def advance(run: Run, item: dict[str, Any]) -> None:
    """Drive one artifact record to ``done`` (or ``gone``) from whatever state it is in."""
    step = "reencrypt"
    try:
        path = _where(run, item)
        state = item.get("state", "planned")
        if state == "failed":
            state = item.get("failed_in", "planned")
        if item["kind"] == "registry":
            session = run.session(item)
            if state in ("reencrypted", "signed") and not path.exists():
                state = "planned"  # the work copy is gone: start again from the old manifest
            if state in ("planned", "started"):
                step = "pull"
                if not reg.present(session, item):
                    _save(run, item, "gone")
                    return
                with run.journal.clock("pull"):
                    reg.pull(session, item, path)
                state = "planned"
        elif state in ("planned", "started") and _missing(item, path):
            _save(run, item, "gone")  # deleted since it was found (the operator's remedy): nothing left to replace
            return
        item["state"] = state
        if state == "planned":
            step = "resign"
            _start(run, item, path)
        if item["state"] == "started":
            step = "reencrypt"
            _reencrypt(run, item, path)
        if item["state"] == "reencrypted":
            step = "resign"
            _resign(run, item, path)
        if item["state"] in ("signed", "pushed") and item["kind"] == "registry":
            step = "push"
            _replace(run, item, path)
    except (ModelsealError, OSError) as e:
        why = str(e) if isinstance(e, ModelsealError) else (e.strerror or type(e).__name__)
        item["failed_in"] = item.get("state") if item.get("state") not in (None, "failed") else "planned"
        item["state"], item["error"] = "failed", f"{step}: {type(e).__name__}: {why[:300]}"
        run.journal.save_item(item)
        run.emit(f"incident-{step}", type(e).__name__, str(item.get("old_id")))
        raise IncidentError(f"{step}: {item['ref']}: {why[:300]}") from None
    if run.progress is not None:
        run.progress(f"{item['state']}: {item['ref']}")


def resign_again(run: Run, item: dict[str, Any]) -> bool:
    """A ``done`` signed record whose new signature no longer verifies under the trust policy
    (it was made with a key the policy does not trust, or trusts no more) goes back to
    ``reencrypted`` to be re-signed with this run's signing keys. True if it did."""
    if item.get("state") != "done" or not item.get("signed") or item.get("verified") or run.policy is None:
        return False
    path = _where(run, item)
    if item["kind"] == "registry" and not path.exists():
        if not item.get("new_digest"):
            return False  # untagged: nothing was pushed, nothing to re-sign
        reg.pull(run.session(item), item, path, str(item["new_digest"]))
    key = Key(run.svc, run.canon, run.compromised, run.new_version, run.hist)
    if not is_incidents_copy(key, path, item, str(item.get("new_id") or "")):
        return False  # not this incident's copy: never signed here (its verification says why)
    try:
        signing.check_new(path, run.policy, [str(s) for s in item.get("new_signatures", [])], deep=False)
    except ModelsealError:
        item["state"] = "reencrypted"
        run.journal.save_item(item)
        return True
    return False


def pending(items: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [it for _, it in sorted(items.items()) if it.get("state", "planned") in PENDING]


__all__ = ["PENDING", "Run", "advance", "pending", "resign_again"]
