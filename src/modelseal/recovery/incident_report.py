"""The report of an incident: JSON for tools and evidence, and a readable summary.

Both are built from the journal alone (its steps with the seconds each took, summed over
every run, and its artifact records), written into the incident's folder (``report.json``,
``report.txt``) and, with ``--report FILE``, to FILE (JSON) and FILE's ``.txt`` sibling. The
summary quotes paths, references and names that came from artifacts and registries: the
CLI escapes each line before it prints it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelseal.recovery.journal import Journal
from modelseal.util.files import write_atomic

FORMAT = "modelseal-incident-report/v1"
KEY_STEPS: tuple[str, ...] = ("find", "rotate", "hold", "artifacts", "pull", "check-signatures", "reencrypt")
KEY_STEPS += ("resign", "push")
KEY_STEPS += ("revoke-signatures", "verify", "disable")
CERT_STEPS = ("find", "revoke", "rotate-ca", "activity", "report")


def build(journal: Journal, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = journal.doc
    out: dict[str, Any] = {
        "format": FORMAT,
        "id": journal.id,
        "kind": doc.get("kind"),
        "target": doc.get("target"),
        "created": doc.get("created"),
        "closed": doc.get("closed"),
        "steps": doc.get("steps", {}),
        "artifacts": [journal.items[k] for k in sorted(journal.items)],
    }
    for k in ("key", "canonical", "versions", "inputs", "disabled", "revocation_list_version", "hold", "notes"):
        if k in doc:
            out[k] = doc[k]
    out.update(extra or {})
    return out


def _steps(steps: dict[str, Any], order: tuple[str, ...]) -> list[str]:
    lines = []
    for name in [*order, *sorted(set(steps) - set(order))]:
        s = steps.get(name)
        if not isinstance(s, dict):
            continue
        count = f", {s['count']} artifact(s)" if s.get("count") else ""
        lines.append(f"  {name:18} {float(s.get('seconds', 0.0)):9.3f} s  {s.get('status', '?')}{count}")
    return lines


def key_summary(report: dict[str, Any]) -> list[str]:
    v = report.get("versions", {})
    items = report.get("artifacts", [])
    done = [i for i in items if i.get("state") == "done"]
    reg = [i for i in done if i.get("kind") == "registry"]
    signed = [i for i in done if i.get("new_signatures")]
    revoked = sum(len(i.get("old_signatures", [])) for i in done)
    verified = sum(1 for i in done if i.get("verified"))
    size = sum(int(i.get("size", 0)) for i in done)
    lines = [
        f"incident {report['id']}: key compromise of {report.get('key')}, version(s) "
        f"{', '.join(map(str, v.get('compromised', [])))}; new primary version {v.get('new')}",
        *_steps(report.get("steps", {}), KEY_STEPS),
        f"  artifacts: {len(done)} re-encrypted ({len(reg)} in the registry, {size} bytes), {len(signed)} re-signed, "
        f"{revoked} superseded signature(s) revoked (list version {report.get('revocation_list_version', '-')}), "
        f"{verified} verified",
    ]
    for i in items:
        if i.get("state") != "done":
            why = i.get("why_left") or i.get("error", "")
            lines.append(f"  not done: {i.get('ref')}: {i.get('state')} {why}".rstrip())
        for tag in i.get("tags_left", []):
            lines.append(f"  left alone: tag {tag} of {i.get('location')} was moved by someone else meanwhile")
    for d in report.get("disabled", []):
        lines.append(f"  version {d.get('version')}: {d.get('how')}")
    lines += [f"  note: {n}" for n in report.get("notes", [])]
    return lines


def cert_summary(report: dict[str, Any]) -> list[str]:
    lines = [
        f"incident {report['id']}: certificate compromise of {report.get('target')}",
        *_steps(report.get("steps", {}), CERT_STEPS),
    ]
    for s in report.get("serials", []):
        lines.append(f"  serial {s.get('serial')} {s.get('identity')}: {s.get('result', 'to revoke')}")
    rolled = report.get("ca")
    if rolled:
        lines.append(f"  issuing CA: {rolled}")
    events = report.get("activity", [])
    lines.append(f"  activity since {report.get('since_utc')}: {len(events)} audit event(s)")
    for e in events[:200]:
        lines.append(
            f"    #{e.get('entry')} {e.get('time_utc')} {e.get('operation')} {e.get('key')} -> {e.get('result')}"
        )
    if len(events) > 200:
        lines.append(f"    ... {len(events) - 200} more in the JSON report")
    lines += [f"  note: {n}" for n in report.get("notes", [])]
    return lines


def write(journal: Journal, report: dict[str, Any], lines: list[str], dest: Path | None) -> None:
    data = json.dumps(report, indent=1, sort_keys=True).encode() + b"\n"
    text = ("\n".join(lines) + "\n").encode()
    write_atomic(journal.folder / "report.json", data, mode=0o600)
    write_atomic(journal.folder / "report.txt", text, mode=0o600)
    if dest is not None:
        write_atomic(dest, data, mode=0o600)
        write_atomic(text_path(dest), text, mode=0o600)


def text_path(dest: Path) -> Path:
    return dest.with_suffix(".txt") if dest.suffix == ".json" else dest.with_name(dest.name + ".txt")


__all__ = ["FORMAT", "build", "cert_summary", "key_summary", "text_path", "write"]
