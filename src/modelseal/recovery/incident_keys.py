"""The key steps of a key-compromise incident: which versions are compromised, the rotation
(once, whatever the crashes), and disabling the compromised versions at the provider.

Which versions: ``KEY@V`` names one; without it, every version up to the newest one at the
start of the incident. Transit disables versions from the oldest up (its only switch is
``min_decryption_version``), so on ``transit:`` a compromise of V is handled as one of every
version up to V: those artifacts are re-encrypted too, rather than left on a version that the
disabling step would switch off anyway.

Rotation: the journal records the newest version before the call; a resumed run that finds
a newer one adopts it instead of rotating again (a crash between the provider's answer and
the journal's write must not rotate twice).

Disabling, per provider, and only after every artifact is re-encrypted and verified (the
re-encryption needs the old version once more; see docs/recovery.md for the order):

- ``local:``: the version's destruction is scheduled (``KeyService.destroy(after=...)``,
  default 7 days): it stops unwrapping at once (``pending-destroy``) and its material is
  erased when the wait is over. Not ``--now`` by default: the attacker's copy of the
  material is not touched by erasing ours, and a copy of an artifact the incident did not
  reach (an offline disk, a laptop) can still be recovered, by cancelling the destruction,
  during the wait. ``destroy_after=0`` erases at once.
- ``transit:``: ``min_decryption_version`` moves above the newest compromised version.
  Transit's trim (destruction) is left to the operator: it cannot be undone.
- any other provider: each compromised version is disabled (``KeyService.set_state``).

Then ``check_disabled`` reads the key back: no compromised version may still unwrap.
"""

from __future__ import annotations

import math
from typing import Any

from modelseal.errors import IncidentError
from modelseal.keys.providers import parse_key_uri
from modelseal.keys.providers.base import KeyInfo
from modelseal.keys.service import KeyService
from modelseal.recovery.journal import Journal

DEFAULT_DESTROY_AFTER = 7 * 86400.0
MAX_DESTROY_AFTER = 366 * 86400.0  # a waiting period, not a way to keep the version


def destroy_after_problem(seconds: float) -> str | None:
    """Why ``--destroy-after`` cannot be used (checked in the plan, not at the last step)."""
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DESTROY_AFTER:
        return f"disable: --destroy-after must be from 0 to {MAX_DESTROY_AFTER / 86400:g} days, got {seconds:g} s"
    return None


def parse_target(text: str) -> tuple[str, int | None]:
    """``KEY[@VERSION]`` -> (key URI, version or None)."""
    key, sep, tail = text.rpartition("@")
    if sep and tail.isdigit() and key:
        version = int(tail)
        if version < 1:
            raise ValueError("a key version is a whole number from 1")
        return parse_key_uri(key).uri, version
    return parse_key_uri(text).uri, None


def decide_versions(svc: KeyService, uri: str, version: int | None) -> dict[str, Any]:
    """The versions record of a new incident: newest before, compromised, their states."""
    info = svc.info(uri)
    present = {v.version: v.state for v in info.versions}
    if version is None:
        compromised = sorted(present)
    elif version not in present:
        raise IncidentError(f"find: {uri} has no version {version} ({_span(sorted(present))})")
    elif parse_key_uri(uri).scheme == "transit":
        compromised = sorted(v for v in present if v <= version)
    else:
        compromised = [version]
    return {
        "before": info.latest,
        "compromised": compromised,
        "states": {str(v): present[v] for v in compromised},
        "min_decryption_version": info.min_decryption_version,
        "new": None,
    }


def _span(vs: list[int]) -> str:
    return f"versions {vs[0]}..{vs[-1]}" if vs else "no versions"


def rotate_once(journal: Journal, svc: KeyService, uri: str) -> int:
    """The new primary version: rotated now, or by an earlier run of this incident."""
    versions = journal.doc["versions"]
    if versions.get("new"):
        return int(versions["new"])
    info = svc.info(uri)
    # A newer version than the one recorded: rotated by a run that crashed before recording it.
    new = info.latest if info.latest > int(versions["before"]) else svc.rotate(uri).latest
    versions["new"] = new
    journal.save()
    return new


def still_decrypting(info: KeyInfo, compromised: list[int]) -> list[int]:
    states = {v.version: v.state for v in info.versions}
    return [v for v in compromised if states.get(v) == "active" and v >= info.min_decryption_version]


def disable(svc: KeyService, uri: str, compromised: list[int], destroy_after: float) -> list[dict[str, Any]]:
    """Stop the compromised versions decrypting (see the module doc); what was done, per version."""
    info = svc.info(uri)
    todo = still_decrypting(info, compromised)
    scheme = parse_key_uri(uri).scheme
    done: list[dict[str, Any]] = []
    if not todo:
        return [{"version": v, "how": "already not decrypting"} for v in compromised]
    if scheme == "transit":
        minimum = max(compromised) + 1
        svc.set_min_version(uri, minimum)
        return [{"version": v, "how": f"min_decryption_version {minimum}"} for v in compromised]
    for v in compromised:
        if v not in todo:
            done.append({"version": v, "how": "already not decrypting"})
        elif scheme == "local":
            svc.destroy(uri, v, after=destroy_after)
            how = "destroyed now" if destroy_after <= 0 else f"destruction scheduled in {destroy_after / 86400:g} d"
            done.append({"version": v, "how": how})
        else:
            svc.set_state(uri, v, "disabled")
            done.append({"version": v, "how": "disabled"})
    return done


def check_disabled(svc: KeyService, uri: str, compromised: list[int]) -> None:
    left = still_decrypting(svc.info(uri), compromised)
    if left:
        raise IncidentError(f"disable: version(s) {left} of {uri} still decrypt after the disabling step")


__all__ = [
    "DEFAULT_DESTROY_AFTER",
    "MAX_DESTROY_AFTER",
    "check_disabled",
    "decide_versions",
    "destroy_after_problem",
    "disable",
    "parse_target",
    "rotate_once",
    "still_decrypting",
]
