"""Steps 3 and 4 of a key-compromise incident for one artifact: re-encrypt, re-sign and (for
a registry artifact) replace it, each state recorded in the journal before the next begins.

An artifact record goes ``planned`` -> ``started`` -> ``reencrypted`` -> ``signed`` ->
(registry: ``pushed`` ->) ``done``; ``gone`` when the artifact (a registry manifest, a file or
a folder) was deleted before the incident re-encrypted it: the report lists it, nothing is left
to replace. What makes each transition safe to repeat after a crash:

- ``started`` is written (with the superseded signatures, checked under the trust policy)
  before anything changes. The re-encryption itself (``recipes.rekey.reencrypt``) swaps the new
  artifact in atomically, with the old signatures moved to its history. Whether it happened is
  read from the artifact, not assumed: it is re-encrypted if and only if its artifact id is
  still the exposed one (an id changes only with a new data key, never with a rewrap), so a
  crash between the swap and the journal's write never re-encrypts twice, and one before the
  swap never skips it.
- the re-sign looks for the signer's own signature of that name and version first
  (``incident_signing.signed_by``).
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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelseal.audit.events import AuditEvent
from modelseal.errors import IncidentError, ModelsealError
from modelseal.format.envelope import artifact_id
from modelseal.keys.service import KeyService
from modelseal.recipes import rekey
from modelseal.recovery import incident_registry as reg
from modelseal.recovery import incident_signing as signing
from modelseal.recovery.incident_find import read_header
from modelseal.recovery.journal import Journal
from modelseal.signing.signers import Signer
from modelseal.signing.trust import TrustPolicy

PENDING = ("planned", "started", "reencrypted", "signed", "pushed", "failed")


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
    session: reg.Session | None
    work: Path
    progress: Callable[[str], None] | None = None

    def emit(self, op: str, result: str, artifact: str | None, version: int | None = None) -> None:
        self.svc.sink.emit(AuditEvent(op, self.uri, result, version, artifact))


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
        with run.journal.clock("resign"):
            name, version = str(item["name"]), int(item["sign_version"])
            item["new_signatures"] = [signing.resign(path, s, name, version, run.svc) for s in run.signers]
        run.emit("incident-resign", "ok", str(item["new_id"]), version)
    _save(run, item, "signed" if item["kind"] == "registry" else "done")


def _replace(run: Run, item: dict[str, Any], path: Path) -> None:
    assert run.session is not None
    with run.journal.clock("push"):
        if item["state"] == "signed":
            new, moved, left = reg.replace_tags(run.session, item, path)
            item.update(new_digest=new or None, tags_moved=moved, tags_left=left)
            _save(run, item, "pushed")
        item["deleted"] = reg.delete_old(run.session, item)
    run.emit("incident-registry-replace", "ok", str(item["new_id"]), run.new_version)
    _save(run, item, "done")


def advance(run: Run, item: dict[str, Any]) -> None:
    """Drive one artifact record to ``done`` (or ``gone``) from whatever state it is in."""
    step = "reencrypt"
    try:
        path = _where(run, item)
        state = item.get("state", "planned")
        if state == "failed":
            state = item.get("failed_in", "planned")
        if item["kind"] == "registry":
            assert run.session is not None
            if state in ("reencrypted", "signed") and not path.exists():
                state = "planned"  # the work copy is gone: start again from the old manifest
            if state in ("planned", "started"):
                step = "pull"
                if not reg.present(run.session, item):
                    _save(run, item, "gone")
                    return
                with run.journal.clock("pull"):
                    reg.pull(run.session, item, path)
                state = "planned"
        elif state in ("planned", "started") and not (path.exists() or path.is_symlink()):
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


def pending(items: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [it for _, it in sorted(items.items()) if it.get("state", "planned") in PENDING]


__all__ = ["PENDING", "Run", "advance", "pending"]
