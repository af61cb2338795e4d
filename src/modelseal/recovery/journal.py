"""The journal of an incident command (docs/recovery.md, "Incident: key compromise").

One folder per incident, ``$MODELSEAL_HOME/incidents/<id>/``:

- ``journal.json``: what the incident is (its kind, target, the versions it decided on), its
  steps (status, seconds spent over every run, the last error) and whether it is closed;
- ``artifacts/<hash of ref>.json``: one small record per artifact (found, started,
  re-encrypted, signed, pushed, done), so a run over N artifacts writes O(N) bytes in all,
  not N copies of one growing file;
- ``report.json`` and ``report.txt`` once it is closed.

Every write is ``util.files.write_atomic`` (a temporary name beside the file, fsync, rename,
fsync of the folder): a crash leaves each file as it was before or after, never half. The
whole run holds an exclusive ``flock`` on the folder's ``.lock``, so a second run of the same
incident waits instead of interleaving. An incident's id is derived from what it is about
(``incident_id``), so the same command finds it again and resumes; a closed incident is never
reopened, and a new one on the same target needs ``new`` (``--new-incident``).

The journal holds no secret: key URIs, versions, artifact ids, signature ids, paths and
registry references. Its files are still 0600 under the home's own rules.

What it holds is still only a record, never an instruction: every file is schema-checked
when it is read (``check_doc``, ``check_item``: a malformed one is an ``IncidentError``, an
unknown state included), and a resumed run acts only on records that its own discovery finds
again (``incident_scope``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelseal.errors import IncidentError, StorageError
from modelseal.util.bounded import json_loads
from modelseal.util.files import write_atomic
from modelseal.util.home import check_home, check_private, modelseal_home

FORMAT = "modelseal-incident-journal/v1"
JOURNAL = "journal.json"
ITEMS = "artifacts"
LOCK = ".lock"
MAX_JOURNAL = 16 << 20
MAX_ITEM = 1 << 20
MAX_INCIDENTS_PER_TARGET = 1000
# An artifact record's states (incident_artifacts): PENDING ones are driven on, the rest are final.
PENDING = ("planned", "started", "reencrypted", "signed", "pushed", "failed")
FINAL = ("done", "gone", "left")
STATES = PENDING + FINAL
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def incidents_dir(home: Path | None = None) -> Path:
    return (home or modelseal_home()) / "incidents"


def incident_id(kind: str, target: str, seq: int = 0) -> str:
    """``<kind>-<16 hex>``: the same (kind, target) gives the same id, so a re-run resumes."""
    digest = hashlib.sha256(json.dumps([kind, target, seq], separators=(",", ":")).encode()).hexdigest()
    return f"{kind}-{digest[:16]}"


def _load(path: Path, limit: int) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > limit:
        raise IncidentError(f"{path} is larger than a journal file can be")

    def bad(_why: str) -> IncidentError:
        return IncidentError(f"{path} is not a readable incident journal file")

    doc = json_loads(data, max_depth=16, max_values=1_000_000, error=bad)
    if not isinstance(doc, dict):
        raise bad("not an object")
    return doc


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def item_name(ref: str) -> str:
    return hashlib.sha256(ref.encode()).hexdigest()[:24] + ".json"


class Journal:
    """One incident's journal; ``doc`` is journal.json, ``items`` the artifact records by ref."""

    def __init__(self, folder: Path, doc: dict[str, Any], items: dict[str, dict[str, Any]]) -> None:
        self.folder = folder
        self.doc = doc
        self.items = items
        self._clock: dict[str, float] = {}

    @property
    def id(self) -> str:
        return str(self.doc["id"])

    @property
    def closed(self) -> bool:
        return self.doc.get("closed") is not None

    def save(self) -> None:
        write_atomic(self.folder / JOURNAL, _dump(self.doc), mode=0o600)

    def save_item(self, item: dict[str, Any]) -> None:
        ref = str(item["ref"])
        self.items[ref] = item
        write_atomic(self.folder / ITEMS / item_name(ref), _dump(item), mode=0o600)

    def step(self, name: str) -> dict[str, Any]:
        steps: dict[str, Any] = self.doc.setdefault("steps", {})
        s: dict[str, Any] = steps.setdefault(name, {"status": "pending", "seconds": 0.0, "runs": 0})
        return s

    @contextlib.contextmanager
    def timed(self, name: str, *, save: bool = True) -> Iterator[dict[str, Any]]:
        """Run one step: its status, runs and seconds (summed over every run, resumed ones too)
        are recorded; an exception marks it failed with the error's class and message."""
        s = self.step(name)
        s["status"], s["runs"] = "running", int(s.get("runs", 0)) + 1
        s.setdefault("started", time.time())
        if save:
            self.save()
        t = time.monotonic()
        try:
            yield s
        except BaseException as e:
            s["seconds"] = float(s.get("seconds", 0.0)) + time.monotonic() - t
            s["status"], s["error"] = "failed", f"{type(e).__name__}: {str(e)[:300]}"
            self.save()
            raise
        s["seconds"] = float(s.get("seconds", 0.0)) + time.monotonic() - t
        s["status"], s["finished"] = "done", time.time()
        s.pop("error", None)
        if save:
            self.save()

    @contextlib.contextmanager
    def clock(self, name: str) -> Iterator[None]:
        """Time part of a step that runs once per artifact (pull, re-encrypt, re-sign, push):
        summed in memory and written with the next save of journal.json."""
        t = time.monotonic()
        try:
            yield
        finally:
            s = self.step(name)
            s["seconds"] = float(s.get("seconds", 0.0)) + time.monotonic() - t
            s["count"], s["status"] = int(s.get("count", 0)) + 1, "part of artifacts"
            s.pop("runs", None)

    def close(self) -> None:
        self.doc["closed"] = time.time()
        self.save()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float)) and not isinstance(v, bool)


def _strs(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _opt(check: Any) -> Any:
    return lambda v: v is None or check(v)


_DOC: dict[str, Any] = {
    "kind": lambda v: v in ("key", "cert"),
    "target": lambda v: isinstance(v, str),
    "created": _is_num,
    "closed": _opt(_is_num),
    "opened": _opt(_is_num),
    "steps": lambda v: isinstance(v, dict) and all(isinstance(s, dict) for s in v.values()),
    "key": lambda v: isinstance(v, str),
    "canonical": lambda v: isinstance(v, str),
    "inputs": lambda v: isinstance(v, dict),
    "notes": _strs,
    "disabled": lambda v: isinstance(v, list) and all(isinstance(d, dict) for d in v),
    "revocation_list_version": _is_int,
    "identity": _opt(lambda v: isinstance(v, str)),
    "since": _is_num,
    "results": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
    "ca": lambda v: isinstance(v, dict),
}
_ITEM: dict[str, Any] = {
    "kind": lambda v: v in ("path", "registry"),
    "location": lambda v: isinstance(v, str) and bool(v),
    "old_id": lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None,
    "versions": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "signed": lambda v: isinstance(v, bool),
    "state": lambda v: v in STATES,
    "size": lambda v: _is_int(v) and v >= 0,
    "digest": _opt(lambda v: isinstance(v, str) and _DIGEST.fullmatch(v) is not None),
    "tags": _strs,
    "folder": lambda v: isinstance(v, bool),
    "parent": _opt(lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)),
    "failed_in": lambda v: v in PENDING and v != "failed",
    "error": lambda v: isinstance(v, str),
    "why": lambda v: isinstance(v, str),
    "why_left": lambda v: isinstance(v, str),
    "old_signatures": lambda v: (
        isinstance(v, list)
        and all(isinstance(s, dict) and isinstance(s.get("id"), str) and _HEX64.fullmatch(s["id"]) for s in v)
    ),
    "name": lambda v: isinstance(v, str),
    "sign_version": lambda v: _is_int(v) and v >= 1,
    "new_id": lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None,
    "new_signatures": _strs,
    "new_digest": _opt(lambda v: isinstance(v, str) and _DIGEST.fullmatch(v) is not None),
    "tags_moved": _strs,
    "tags_left": _strs,
    "deleted": _is_int,
    "verified": lambda v: isinstance(v, bool),
}
_ITEM_REQUIRED = ("ref", "kind", "location", "old_id", "versions", "signed", "state")


def _fields(doc: dict[str, Any], table: dict[str, Any], path: Path) -> None:
    for name, check in table.items():
        if name in doc and not check(doc[name]):
            raise IncidentError(f"{path} is not a readable incident journal file (field {name})")


def check_doc(doc: dict[str, Any], path: Path) -> None:
    """journal.json's schema; a key incident's versions must be the ones it could have decided."""
    _fields(doc, _DOC, path)
    if doc.get("kind") == "key":
        v = doc.get("versions")
        ok = isinstance(v, dict) and _is_int(v.get("before")) and isinstance(v.get("compromised"), list)
        if ok and isinstance(v, dict):
            c, new = v["compromised"], v.get("new")
            ok = bool(c) and all(_is_int(x) and 1 <= x <= v["before"] for x in c)
            ok = ok and (new is None or (_is_int(new) and new > v["before"]))
            ok = ok and isinstance(v.get("states", {}), dict)
        if not ok or not isinstance(doc.get("key"), str) or not isinstance(doc.get("canonical"), str):
            raise IncidentError(f"{path} is not a readable incident journal file (its key and versions)")


def check_item(item: dict[str, Any], path: Path) -> None:
    """An artifact record's schema: required fields, types, a known state, and a ref that is
    the one its kind and location make."""
    if any(k not in item for k in _ITEM_REQUIRED):
        raise IncidentError(f"{path} is not a readable incident journal file (a required field is missing)")
    _fields(item, _ITEM, path)
    loc = item["location"]
    want = f"path:{loc}" if item["kind"] == "path" else f"oci://{loc}@{item.get('digest')}"
    if item["ref"] != want or (item["kind"] == "registry" and "/" not in loc):
        raise IncidentError(f"{path} is not a readable incident journal file (its ref)")


def _read(folder: Path) -> Journal:
    doc = _load(folder / JOURNAL, MAX_JOURNAL)
    if doc.get("format") != FORMAT or doc.get("id") != folder.name:
        raise IncidentError(f"{folder / JOURNAL} is not this incident's journal")
    check_doc(doc, folder / JOURNAL)
    items: dict[str, dict[str, Any]] = {}
    folder_items = folder / ITEMS
    if folder_items.is_dir():
        for p in sorted(folder_items.iterdir()):
            if p.suffix != ".json" or p.name.startswith("."):
                continue  # a temporary name a crash left behind: its rename never happened
            item = _load(p, MAX_ITEM)
            ref = item.get("ref")
            if not isinstance(ref, str) or item_name(ref) != p.name:
                raise IncidentError(f"{p} is not an artifact record of this incident")
            check_item(item, p)
            items[ref] = item
    return Journal(folder, doc, items)


def peek(kind: str, target: str, *, new: bool = False, home: Path | None = None) -> Journal | str:
    """The open incident of (kind, target) if there is one, else the id a new one would get
    (nothing is written: a dry run). A closed incident is refused unless ``new``."""
    base = incidents_dir(home)
    for seq in range(MAX_INCIDENTS_PER_TARGET):
        iid = incident_id(kind, target, seq)
        folder = base / iid
        if not (folder / JOURNAL).exists():
            return iid
        j = _read(folder)
        if not j.closed:
            return j
        if not new:
            raise IncidentError(
                f"incident {iid} on this target is closed (report: {folder / 'report.txt'}); "
                "to handle a new compromise of it, pass --new-incident"
            )
    raise IncidentError(f"{MAX_INCIDENTS_PER_TARGET} incidents on one target: clean up {base}")


@contextlib.contextmanager
def opened(kind: str, target: str, fields: dict[str, Any], *, new: bool = False) -> Iterator[Journal]:
    """The open incident of (kind, target), or a new one made with ``fields``, locked for
    the duration of the ``with`` block."""
    home = modelseal_home()
    check_home(home, StorageError)
    home.mkdir(mode=0o700, exist_ok=True)  # this user's own default home, on first use (check_home allows only that)
    base = incidents_dir(home)
    base.mkdir(mode=0o700, exist_ok=True)
    check_private(base, "the incidents folder", StorageError)
    while True:
        found = peek(kind, target, new=new, home=home)
        iid = found if isinstance(found, str) else found.id
        folder = base / iid
        folder.mkdir(mode=0o700, exist_ok=True)
        (folder / ITEMS).mkdir(mode=0o700, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not (folder / JOURNAL).exists():
                doc = {"format": FORMAT, "id": iid, "kind": kind, "target": target, "created": time.time()}
                doc.update(fields)
                doc.update({"closed": None, "steps": {}})
                journal = Journal(folder, doc, {})
                journal.save()
            else:
                journal = _read(folder)
                if journal.closed:  # closed by another run while this one waited for the lock
                    continue
            yield journal
            return
        finally:
            os.close(fd)


__all__ = [
    "FINAL",
    "FORMAT",
    "PENDING",
    "STATES",
    "Journal",
    "check_doc",
    "check_item",
    "incident_id",
    "incidents_dir",
    "item_name",
    "opened",
    "peek",
]
