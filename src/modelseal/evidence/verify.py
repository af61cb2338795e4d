"""``evidence verify``: check a bundle offline against a key got out of band (docs/evidence.md).

The signature of ``manifest.json`` under one of the ``trusted`` keys (``--signer-key HEX``, or
this host's audit keys: ``MerkleAuditLog.trusted_keys``; never the key the manifest names
alone); the manifest's list in the bundle's one order; every file present, and no file that
the manifest does not list. Until the signature verifies nothing but the manifest (bounded,
type-checked) and the folder's listing is read: a bundle nobody trusted signed is reported
and left, its contents unread. Then every file is hashed as a stream (its size first, the
total bounded by ``MAX_TOTAL``) against its digest (an edit, a deletion, an addition, a
reordered list inside a file all change a digest or the set), and the contents are checked:
the signed tree head (under a trusted key too) and every inclusion proof
(``auditproof.check``), every audit entry a section cites proven and equal to the proven
event, every record entry equal to its event (key, digest) and its copy to its digest, and
the index's counts and statuses recomputed from the sections. Every problem is one line; all
of them are reported; a malformed structure is a problem, never an internal error.
Everything read is untrusted: a listed name is checked against the name grammar before it
becomes a path, and files are opened without following links.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from modelseal.audit.hosts import key_id
from modelseal.audit.log import MerkleAuditLog
from modelseal.errors import EvidenceError, EvidenceTampered
from modelseal.evidence import auditproof
from modelseal.evidence.controls import CONTROLS, counts_of_docs, status
from modelseal.evidence.model import (
    DOMAIN,
    INDEX,
    ITEMS,
    MANIFEST,
    MANIFEST_FORMAT,
    MAX_FILE,
    RECORDS_DIR,
    SAFE_NAME,
    SECTIONS,
    SIGNATURE,
    SIGNATURE_FORMAT,
    Window,
    file_order,
    fixed_files,
    section_file,
)
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited

MAX_MANIFEST = 4 << 20
MAX_TOTAL = 1 << 30  # bytes hashed in all: more is refused, not read
MAX_LINES = 100  # added or missing files named one by one; the rest counted
_HEX64 = re.compile(r"[0-9a-f]{64}")
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class Checked:
    folder: Path
    files: int
    proofs: int
    tree_size: int | None
    signer: str | None  # the key id that signed the manifest, if one trusted key did
    problems: tuple[str, ...]
    window: tuple[str, str] | None = None  # from, to (end excluded), as the signed manifest says
    host: str | None = None
    generated: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def parse_key(text: str) -> Ed25519PublicKey:
    """``HEX`` or ``ed25519:HEX`` (``modelseal audit key`` prints the latter)."""
    raw = text.strip().removeprefix("ed25519:")
    try:
        if len(raw) != 64:
            raise ValueError
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw))
    except ValueError:
        raise EvidenceError("--signer-key takes the 64 hex digits of an Ed25519 public key") from None


def trusted_keys(signer_keys: Sequence[str], audit: str | Path) -> dict[str, Ed25519PublicKey]:
    """The keys a bundle may be signed with: those given, else this host's audit keys."""
    keys = [parse_key(k) for k in signer_keys]
    found = {key_id(k): k for k in keys} if keys else MerkleAuditLog(audit).trusted_keys()
    if not found:
        raise EvidenceError("no key to check the bundle against: pass --signer-key HEX (the exporting host's key)")
    return found


def _bad(why: str) -> ValueError:
    return ValueError(why)


def _json(data: bytes) -> Any:
    try:
        return json_loads(data, max_depth=24, max_values=20_000_000, error=_bad)
    except ValueError:
        return None


def _safe(name: object) -> bool:
    if not isinstance(name, str):
        return False
    parts = name.split("/")
    return 1 <= len(parts) <= 3 and all(SAFE_NAME.fullmatch(p) for p in parts)


def _named(problems: list[str], names: Sequence[str], what: str) -> None:
    problems.extend(f"{n}: {what}" for n in names[:MAX_LINES])
    if len(names) > MAX_LINES:
        problems.append(f"{len(names) - MAX_LINES} more files: {what}")


def _listing(folder: Path, problems: list[str]) -> set[str]:
    """Every regular file under ``folder`` (relative, ``/``), without following links."""
    found: set[str] = set()
    odd: list[str] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        rel = Path(root).relative_to(folder)
        for d in list(dirs):
            if (Path(root) / d).is_symlink():
                odd.append(f"{(rel / d).as_posix()}: a symbolic link (added)")
                dirs.remove(d)
        for n in names:
            p = Path(root) / n
            name = (rel / n).as_posix()
            if p.is_symlink() or not p.is_file():
                odd.append(f"{name}: not a regular file (added)")
            else:
                found.add(name)
    problems.extend(odd[:MAX_LINES])
    return found


def _signature(folder: Path, raw: bytes, trusted: Mapping[str, Ed25519PublicKey], problems: list[str]) -> str | None:
    try:
        doc = _json(read_limited(folder / SIGNATURE, 4096, EvidenceTampered, SIGNATURE, regular=True))
    except FileNotFoundError:
        problems.append(f"{SIGNATURE}: missing (deleted)")
        return None
    except EvidenceTampered as e:
        problems.append(str(e))
        return None
    sig = doc.get("signature") if isinstance(doc, dict) and doc.get("format") == SIGNATURE_FORMAT else None
    if not isinstance(sig, str) or not re.fullmatch(r"[0-9a-f]{128}", sig):
        problems.append(f"{SIGNATURE}: not a bundle signature")
        return None
    for kid, key in trusted.items():
        try:
            key.verify(bytes.fromhex(sig), DOMAIN + raw)
        except InvalidSignature:
            continue
        return kid
    problems.append(
        f"{SIGNATURE}: the signature does not verify under the expected key (another key, or an edited manifest)"
    )
    return None


def _listed(manifest: Any, problems: list[str]) -> dict[str, tuple[str, int]] | None:
    """The manifest's files (name -> (sha256, size)) in its order, each entry type-checked."""
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(entries, list):
        problems.append(f"{MANIFEST}: not a bundle manifest")
        return None
    listed: dict[str, tuple[str, int]] = {}
    bad = 0
    for f in entries:
        name, digest, size = (f.get(k) if isinstance(f, dict) else None for k in ("name", "sha256", "size"))
        if (
            not _safe(name)
            or not isinstance(digest, str)
            or not _HEX64.fullmatch(digest)
            or not isinstance(size, int)
            or isinstance(size, bool)
            or size < 0
            or name in listed
            or name in (MANIFEST, SIGNATURE)
        ):
            bad += 1
            continue
        listed[str(name)] = (digest, size)
    if bad:
        problems.append(f"{MANIFEST}: {bad} malformed or repeated file entries")
    names = list(listed)
    if names != file_order([n for n in names if n.startswith(RECORDS_DIR + "/")]):
        problems.append(
            f"{MANIFEST}: the files are not listed in the bundle's order, or a file is missing from the list"
        )
    return listed


def _hash(path: Path, size: int, keep: bool) -> tuple[str, bytes | None]:
    """SHA-256 of the regular file ``path`` of exactly ``size`` bytes, as a stream (its bytes
    too with ``keep``); ``ValueError`` with the one-line reason otherwise."""
    try:
        fd = os.open(path, _OPEN)
    except OSError as e:
        raise ValueError(f"unreadable ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size != size:
            raise ValueError("changed (its size is not the manifest's)")
        h, chunks, total = hashlib.sha256(), [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > size:
                raise ValueError("changed (its size is not the manifest's)")
            h.update(chunk)
            if keep:
                chunks.append(chunk)
        if total != size:
            raise ValueError("changed (its size is not the manifest's)")
        return h.hexdigest(), b"".join(chunks) if keep else None
    except OSError as e:
        raise ValueError(f"unreadable ({e.strerror})") from None
    finally:
        os.close(fd)


def _files(
    folder: Path, listed: Mapping[str, tuple[str, int]], present: set[str], problems: list[str]
) -> tuple[dict[str, str], dict[str, bytes]]:
    """The digests of the listed files that match, and the bytes of the JSON files checked."""
    total = sum(size for _, size in listed.values())
    if total > MAX_TOTAL:
        problems.append(f"{MANIFEST}: lists {total} bytes, more than verify reads ({MAX_TOTAL}): not checked")
        return {}, {}
    fixed = set(fixed_files())
    digests: dict[str, str] = {}
    kept: dict[str, bytes] = {}
    for name, (digest, size) in listed.items():
        if name not in present:
            continue
        keep = name in fixed
        if keep and size > MAX_FILE:
            problems.append(f"{name}: larger than verify reads ({MAX_FILE} bytes)")
            continue
        try:
            found, data = _hash(folder / name, size, keep)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        if not hmac.compare_digest(found, digest):
            problems.append(f"{name}: changed (its SHA-256 is not the manifest's)")
            continue
        digests[name] = found
        if data is not None:
            kept[name] = data
    return digests, kept


def _sections(kept: Mapping[str, bytes], problems: list[str]) -> dict[str, dict[str, Any]]:
    docs = {}
    for name in SECTIONS:
        file = section_file(name)
        if file not in kept:
            continue
        doc = _json(kept[file])
        items = doc.get("items") if isinstance(doc, dict) else None
        if (
            not isinstance(items, dict)
            or doc.get("section") != name
            or not all(i in ITEMS and i.startswith(name + ".") for i in items)
            or not all(isinstance(v, list) and all(isinstance(e, dict) for e in v) for v in items.values())
        ):
            problems.append(f"{file}: not a section file of the bundle (its items are malformed)")
            continue
        docs[name] = doc
    return docs


def _index(index: Any, manifest: Mapping[str, Any], docs: Mapping[str, Any], problems: list[str]) -> None:
    if not isinstance(index, dict):
        problems.append(f"{INDEX}: not the bundle's index")
        return
    pairs = (("signer_public_key", "signer"), ("window", "window"), ("host", "host"), ("generated", "generated"))
    for field, ours in pairs:
        if index.get(field) != manifest.get(ours):
            problems.append(f"{INDEX}: names another {ours} than the manifest")
    if len(docs) != len(SECTIONS):
        return  # a section is missing or malformed: said already
    counted = counts_of_docs(docs)
    rows = index.get("controls")
    by_id = {r.get("id"): r for r in rows if isinstance(r, dict)} if isinstance(rows, list) else {}
    for c in CONTROLS:
        row = by_id.get(c.id)
        items = row.get("items") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(items, list):
            problems.append(f"{INDEX}: the control {c.ref} is missing")
            continue
        if row.get("status") != status(c, counted):
            problems.append(f"{INDEX}: {c.ref} is said to be {str(row.get('status'))[:40]}, its sections say otherwise")
        for i in items:
            got = (i.get("count"), i.get("qualifying")) if isinstance(i, dict) else None
            if got is None or counted.get(str(i.get("item"))) != got:
                problems.append(f"{INDEX}: {c.ref} counts other entries of an item than its section holds")


def _content(
    kept: Mapping[str, bytes], digests: Mapping[str, str], manifest: Mapping[str, Any], trusted: Any, p: list[str]
) -> tuple[int, int | None]:
    """The cross-checks of the contents; (proofs checked, tree size)."""
    docs = _sections(kept, p)
    audit = docs.get("audit")
    found, proven = auditproof.check(audit, trusted) if audit is not None else ([], {})
    p.extend(found)
    p.extend(auditproof.check_citations(docs, proven, digests))
    if INDEX in kept:
        _index(_json(kept[INDEX]), manifest, docs, p)
    th = audit.get("tree_head") if audit is not None else None
    size = th.get("size") if isinstance(th, dict) else None
    return len(proven), size if isinstance(size, int) and not isinstance(size, bool) else None


def _meta(manifest: Mapping[str, Any], asked: Window | None, problems: list[str]) -> dict[str, Any]:
    w = manifest.get("window")
    start, end = (w.get("start"), w.get("end")) if isinstance(w, dict) else (None, None)
    shown = (str(w.get("from"))[:40], str(w.get("to"))[:40]) if isinstance(w, dict) else None
    host, generated = manifest.get("host"), manifest.get("generated")
    when = float(generated) if isinstance(generated, int | float) and not isinstance(generated, bool) else None
    if asked is not None and (start, end) != (asked.start, asked.end):
        at = asked.to_json()
        covers = f"{shown[0]} to {shown[1]}" if shown else "no window"
        problems.append(
            f"{MANIFEST}: the bundle covers {covers}, not the window asked for ({at['from']} to {at['to']})"
        )
    return {
        "window": shown,
        "host": str(host)[:200] if isinstance(host, str) else None,
        "generated": when,
    }


def check(folder: Path, trusted: Mapping[str, Ed25519PublicKey], window: Window | None = None) -> Checked:
    """Every check (``window``: the window the bundle must cover); the problems found (none:
    the bundle verifies)."""
    problems: list[str] = []
    if not folder.is_dir():
        return Checked(folder, 0, 0, None, None, (f"{folder}: no evidence bundle here",))
    try:
        raw = read_limited(folder / MANIFEST, MAX_MANIFEST, EvidenceTampered, MANIFEST, regular=True)
    except FileNotFoundError:
        return Checked(folder, 0, 0, None, None, (f"{MANIFEST}: missing (deleted)",))
    except EvidenceTampered as e:
        return Checked(folder, 0, 0, None, None, (str(e),))
    signer = _signature(folder, raw, trusted, problems)
    manifest = _json(raw)
    listed = _listed(manifest, problems)
    present = _listing(folder, problems)
    if listed is not None:
        _named(problems, [n for n in listed if n not in present], "missing (deleted)")
        _named(problems, sorted(present - set(listed) - {MANIFEST, SIGNATURE}), "not in the manifest (added)")
    if signer is None or listed is None or not isinstance(manifest, dict):
        return Checked(folder, 0, 0, None, None, tuple(problems))  # unsigned: its contents stay unread
    meta = _meta(manifest, window, problems)
    digests, kept = _files(folder, listed, present, problems)
    try:
        proofs, size = _content(kept, digests, manifest, trusted, problems)
    except (TypeError, AttributeError, KeyError, ValueError, RecursionError) as e:
        problems.append(f"the bundle's contents are malformed ({type(e).__name__})")
        proofs, size = 0, None
    return Checked(folder, len(digests), proofs, size, signer, tuple(problems), **meta)


def verify(folder: Path, trusted: Mapping[str, Ed25519PublicKey], window: Window | None = None) -> Checked:
    """``check``, raising ``EvidenceTampered`` when any problem was found."""
    result = check(folder, trusted, window)
    if result.problems:
        raise EvidenceTampered(f"the evidence bundle {folder} does NOT verify: {len(result.problems)} problem(s)")
    return result


__all__ = ["Checked", "check", "parse_key", "trusted_keys", "verify"]
