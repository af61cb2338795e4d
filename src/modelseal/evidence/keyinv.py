"""The key inventory and its lifecycle history (docs/evidence.md, "Keys").

Every key of the local keystore (``KeyService.list("local")``) and every other key
config.toml names (Transit, PKCS#11, AWS KMS: ``KeyService.info``, the provider's own
metadata), each with its provider, environments, versions and their states, and the age of
its newest version against its cryptoperiod: the smallest ``rotate_after_days`` of the
environments it serves (config.toml), else the file's default (NIST SP 800-57 Part 1, 5.3:
the originator-usage period of a KEK). Ages are taken at the end of the window, or now if
that is earlier; a version created after the window's end is left out (a key none of whose
versions existed by then is named in a note), so no age is negative. A key that cannot be
described is an entry with its one-line error and a gap, never left out. The history is the
audit log's lifecycle events of the window.
"""

from __future__ import annotations

from typing import Any

from modelseal.errors import ModelsealError
from modelseal.evidence.model import Section, Window, event_entry, utc
from modelseal.keys.providers import KeyInfo, parse_key_uri
from modelseal.keys.service import LIFECYCLE_OPS, KeyService

KEY_OPS = LIFECYCLE_OPS | frozenset({"purge", "recovery-split", "recovery-combine", "recovery-keygen"})
DAY = 86400.0


def _configured(svc: KeyService) -> list[str]:
    cfg = svc.config
    uris = [k for keys in cfg.environments.values() for k in keys]
    uris += [k for per_env in cfg.projects.values() for keys in per_env.values() for k in keys]
    return sorted({parse_key_uri(k).uri for k in uris})


def _row(svc: KeyService, info: KeyInfo, as_of: float, end: float) -> dict[str, Any] | None:
    """The key as it stood at the window's end: versions created after it are left out (None:
    no version existed yet)."""
    envs = sorted(svc.environments_of(info.uri))
    cfg = svc.config
    policy = min((cfg.rotation_days(e) for e in envs), default=cfg.rotate_after_days)
    source = f"environments.{envs[0]}" if envs and policy == cfg.rotation_days(envs[0]) else "default"
    kept = [v for v in info.versions if not (v.created and v.created >= end)]
    if not kept:
        return None
    versions = []
    for v in sorted(kept, key=lambda v: v.version):
        age = round((as_of - v.created) / DAY, 2) if v.created and v.created <= as_of else None
        versions.append({"version": v.version, "state": v.state, "created": utc(v.created), "age_days": age})
    newest = max(kept, key=lambda v: v.version)
    age = round((as_of - newest.created) / DAY, 2) if newest.created and newest.created <= as_of else None
    return {
        "key": info.uri,
        "provider": parse_key_uri(info.uri).scheme,
        "environments": envs,
        "rotate_after_days": policy,
        "cryptoperiod_from": source,
        "latest_version": newest.version,
        "latest_age_days": age,
        "rotation_due": bool(age is not None and age > policy),
        "min_decryption_version": info.min_decryption_version,
        "versions": versions,
        "versions_after_window": len(info.versions) - len(kept),
        "destroyed_versions": [v.version for v in kept if v.state == "destroyed"],
    }


def _describe(svc: KeyService, home_has_keystore: bool) -> tuple[list[KeyInfo], list[tuple[str, str]]]:
    infos: list[KeyInfo] = []
    failed: list[tuple[str, str]] = []
    listed = False
    if home_has_keystore:
        try:
            infos.extend(svc.list("local"))
            listed = True
        except ModelsealError as e:
            failed.append(("local:*", str(e)))
    seen = {i.uri for i in infos}
    for uri in _configured(svc):
        if uri in seen:
            continue
        seen.add(uri)
        if listed and parse_key_uri(uri).scheme == "local":
            failed.append((uri, "config.toml names it, but the local keystore has no such key"))
            continue
        try:
            infos.append(svc.info(uri))
        except ModelsealError as e:
            failed.append((uri, str(e).splitlines()[0][:300] if str(e) else type(e).__name__))
    return infos, failed


def gather(svc: KeyService, window: Window, events: list[dict[str, Any]], *, keystore: bool, now: float) -> Section:
    """The ``keys`` section: inventory (state at export, as of the window's end) and lifecycle
    history (in the window)."""
    s = Section("keys")
    as_of = min(now, window.end)
    infos, failed = _describe(svc, keystore)
    later = []
    for info in sorted(infos, key=lambda i: i.uri):
        try:
            row = _row(svc, info, as_of, window.end)
        except ModelsealError as e:
            failed.append((info.uri, str(e)))
            continue
        if row is None:
            later.append(info.uri)
            continue
        s.add("keys.inventory", row)
        if row["rotation_due"]:
            s.note(
                "keys.inventory",
                f"{info.uri}: newest version is {row['latest_age_days']} days old, past its cryptoperiod "
                f"of {row['rotate_after_days']} days",
            )
    for uri, why in failed:
        s.add("keys.inventory", {"key": uri, "provider": uri.split(":")[0], "error": why})
        s.gaps.append(f"key {uri} could not be described: {why}")
        s.note("keys.inventory", f"{uri}: not described ({why})")
    if later:
        s.note("keys.inventory", f"not listed, created after the window: {', '.join(later[:50])}")
    if not keystore:
        s.gaps.append("no local keystore on this host")
    for ev in events:
        if ev.get("operation") in KEY_OPS:
            s.add("keys.history", event_entry(ev))
            if ev.get("result") != "ok":
                s.note(
                    "keys.history",
                    f"entry {ev['entry']}: {ev.get('operation')} of {ev.get('key')} -> {ev.get('result')}",
                )
    return s


__all__ = ["KEY_OPS", "gather"]
