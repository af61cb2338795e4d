"""The control index: which items of a bundle evidence which control (docs/evidence.md).

Frameworks: SOC 2 (the 2017 Trust Services Criteria, revised points of focus 2022), ISO/IEC
27001:2022 Annex A, PCI DSS v4.0 and NIST SP 800-57 Part 1 Rev. 5. Each control has a one
line of what it asks and the items that bear on it. The index lists every control, and
counts what evidences it, not what was listed: an entry *qualifies* only when it proves
what the item is about (``qualifies``: a record vouched for by its audit event, equal to the
event's digest, validly signed and a success; a complete TLS scan; a key whose age was
measured; a log that verifies). A control is ``evidenced`` by a qualifying entry of its
required items, shows ``only failing or unverified entries`` when it has entries but none
of those qualifies, and ``no evidence in the window`` when it has none: never silently left
out. Pure data and a pure function of the gathered sections (or of the section files read
back, so ``verify`` recomputes every count).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelseal.evidence.model import ITEMS, STATE_AT_EXPORT, Section, Window, section_file, utc

EVIDENCED, UNVERIFIED, NONE = "evidenced", "only failing or unverified entries", "no evidence in the window"
# A record item -> the audit operation that vouches for its records and the result of a success.
RECORD_ITEMS = {
    "recovery.backups": ("backup-record", "ok"),
    "recovery.drills": ("backup-drill", "ok"),
    "recovery.restores": ("backup-restore", "ok"),
    "recovery.controls_tests": ("controls-test", "pass"),
}


@dataclass(frozen=True)
class Control:
    id: str
    framework: str
    ref: str
    title: str
    items: tuple[str, ...]
    required: tuple[str, ...] = ()  # the items one of which must qualify (empty: any of ``items``)

    @property
    def needs(self) -> tuple[str, ...]:
        return self.required or self.items


CONTROLS: tuple[Control, ...] = (
    Control(
        "soc2-cc6.1",
        "SOC 2",
        "CC6.1",
        "Logical access to information assets, and the encryption keys protecting them, is restricted to "
        "authorised identities",
        (
            "access.bindings",
            "access.attestations",
            "access.events",
            "keys.inventory",
            "certificates.authority",
            "certificates.issued",
            "certificates.revoked",
            "changes.approvals",
        ),
    ),
    Control(
        "soc2-cc6.7",
        "SOC 2",
        "CC6.7",
        "Data in transit is restricted to authorised parties and protected (TLS, mutual authentication)",
        ("tls.scans", "certificates.authority", "certificates.issued", "certificates.revoked", "certificates.events"),
    ),
    Control(
        "soc2-cc7.2",
        "SOC 2",
        "CC7.2",
        "System components are monitored for anomalies that indicate malicious acts or errors, and the "
        "monitoring is tested",
        ("audit.verification", "audit.security_events", "recovery.controls_tests", "tls.scans"),
    ),
    Control(
        "soc2-cc8.1",
        "SOC 2",
        "CC8.1",
        "Changes are authorised, approved, documented and implemented under change management",
        (
            "changes.policy_versions",
            "changes.activations",
            "changes.approvals",
            "changes.exceptions",
            "changes.events",
            "keys.history",
        ),
    ),
    Control(
        "soc2-a1.3",
        "SOC 2",
        "A1.3",
        "Recovery plan procedures supporting system recovery are tested",
        ("recovery.drills", "recovery.restores"),  # a backup alone tests nothing
    ),
    Control(
        "iso27001-a.8.24",
        "ISO/IEC 27001:2022",
        "A.8.24",
        "Use of cryptography: rules for cryptography and cryptographic key management are defined and followed",
        (
            "keys.inventory",
            "keys.history",
            "certificates.authority",
            "certificates.issued",
            "certificates.revoked",
            "tls.scans",
            "changes.exceptions",
        ),
    ),
    Control(
        "iso27001-a.8.13",
        "ISO/IEC 27001:2022",
        "A.8.13",
        "Information backup: backup copies are kept and regularly tested by restoring them",
        ("recovery.backups", "recovery.drills", "recovery.restores", "recovery.events"),
        ("recovery.drills", "recovery.restores"),  # kept AND tested: a test must qualify
    ),
    Control(
        "pci-3.6",
        "PCI DSS v4.0",
        "3.6",
        "Cryptographic keys protecting stored data are secured: few custodians, keys stored encrypted, access "
        "restricted and logged",
        ("keys.inventory", "access.bindings", "access.events", "recovery.backups"),
    ),
    Control(
        "pci-3.7",
        "PCI DSS v4.0",
        "3.7",
        "Key-management procedures cover the whole lifecycle: generation, storage, cryptoperiod change, "
        "retirement, destruction, split knowledge",
        ("keys.history", "keys.inventory", "certificates.events", "changes.approvals", "access.attestations"),
    ),
    Control(
        "nist-800-57-cryptoperiods",
        "NIST SP 800-57 Pt. 1 Rev. 5",
        "5.3 Cryptoperiods",
        "Each key is used for no longer than its cryptoperiod (here: config.toml rotate_after_days)",
        ("keys.inventory", "keys.history"),
    ),
)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def qualifies(item: str, entry: Any, window_end: str) -> bool:
    """Whether ``entry`` of ``item`` evidences what the item is about (``window_end``: the
    window's end as ``model.utc`` writes it)."""
    if not isinstance(entry, dict):
        return False
    if item == "audit.verification":  # a log that does not verify evidences nothing
        return entry.get("ok") is True
    if item in RECORD_ITEMS:
        operation, success = RECORD_ITEMS[item]
        sha, signature = entry.get("sha256"), entry.get("signature")
        signed = isinstance(signature, str) and signature.startswith("valid (")
        return (
            _number(entry.get("entry"))
            and isinstance(entry.get("file"), str)
            and isinstance(sha, str)
            and entry.get("artifact") == sha
            and entry.get("operation") == operation
            and entry.get("result") == success
            and (signed or (item == "recovery.controls_tests" and signature == "unsigned"))
        )
    if item == "tls.scans":
        return not entry.get("incomplete") and not entry.get("errors")
    if item == "keys.inventory":
        return "error" not in entry and _number(entry.get("latest_age_days"))
    if item == "certificates.authority":  # the CA as at export: did it exist in the window?
        nb = entry.get("not_before")
        return isinstance(nb, str) and bool(nb) and nb < window_end
    if item == "changes.policy_versions":
        proposed = entry.get("proposed")
        return isinstance(proposed, str) and bool(proposed) and proposed < window_end
    return True


def _count(item: str, entries: Any, window_end: str) -> tuple[int, int]:
    if not isinstance(entries, list):
        return 0, 0
    return len(entries), sum(1 for e in entries if qualifies(item, e, window_end))


def counts(sections: Mapping[str, Section], window: Window) -> dict[str, tuple[int, int]]:
    """Item -> (entries gathered, entries that qualify)."""
    end = utc(window.end)
    return {item: _count(item, sections[item.split(".")[0]].items.get(item, []), end) for item in ITEMS}


def counts_of_docs(docs: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """``counts`` over the section files as read back (verify); each file names its window."""
    out = {}
    for item in ITEMS:
        doc = docs.get(item.split(".")[0])
        items = doc.get("items") if isinstance(doc, dict) else None
        window = doc.get("window") if isinstance(doc, dict) else None
        end = window.get("to") if isinstance(window, dict) else None
        entries = items.get(item) if isinstance(items, dict) else None
        out[item] = _count(item, entries, end if isinstance(end, str) else "")
    return out


def status(c: Control, n: Mapping[str, tuple[int, int]]) -> str:
    if any(n[i][1] for i in c.needs):
        return EVIDENCED
    return UNVERIFIED if any(n[i][0] for i in c.items) else NONE


def rows(sections: Mapping[str, Section], n: Mapping[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """One row per control: what it is, its status, its items with their counts and notes."""
    out = []
    for c in CONTROLS:
        items = []
        for item in c.items:
            section = sections[item.split(".")[0]]
            items.append(
                {
                    "item": item,
                    "title": ITEMS[item],
                    "file": section_file(section.name),
                    "as_of": "state at export" if item in STATE_AT_EXPORT else "the window",
                    "required": item in c.needs,
                    "count": n[item][0],
                    "qualifying": n[item][1],
                    "attention": list(section.attention.get(item, [])),
                }
            )
        out.append(
            {
                "id": c.id,
                "framework": c.framework,
                "ref": c.ref,
                "title": c.title,
                "status": status(c, n),
                "items": items,
                "missing": [i["item"] for i in items if i["required"] and not i["qualifying"]],
            }
        )
    return out


def build_index(sections: Mapping[str, Section], window: Window) -> list[dict[str, Any]]:
    return rows(sections, counts(sections, window))


__all__ = [
    "CONTROLS",
    "EVIDENCED",
    "NONE",
    "RECORD_ITEMS",
    "UNVERIFIED",
    "Control",
    "build_index",
    "counts",
    "counts_of_docs",
    "qualifies",
    "status",
]
