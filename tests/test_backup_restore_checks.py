"""What a restore checks before it writes and when it resumes (docs/recovery.md, "Restores"):
a refusal that can be predicted (a database that holds other rows, without --replace) stops
the restore before its first part is written; a journal says a part is done only under the
digest the signed manifest gives it, and even then the target is checked: a planted or
stale journal never makes a part count as restored; a resumed audit part whose log has
grown since is verified, never replaced (the events after the backup are kept)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modelseal.errors import BackupError
from modelseal.keys.providers import recovery as provider
from modelseal.recovery import records
from modelseal.recovery.restore import JOURNAL, JOURNAL_FORMAT, RestoreRequest, run_restore
from modelseal.recovery.sealing import load_verified
from modelseal.registry.sqlmeta import open_meta
from tests.conftest import Env
from tests.drill_helpers import Host, PemSigner, make_host, push, registry, sealed_file


@pytest.fixture(autouse=True)
def _no_installed_recovery_keys() -> object:
    provider.forget()
    yield None
    provider.forget()


def _restore(h: Host, **kw: Any) -> dict[str, Any]:
    return run_restore(RestoreRequest(source=str(h.dest), **kw), h.loc, h.svc, h.log)


def _manifests(h: Host) -> set[str]:
    meta = open_meta(None, h.data)
    try:
        return {d for _, d, _ in meta.manifest_page(None, 100)}
    finally:
        meta.close()


def _journal(h: Host, done: dict[str, str], parts: list[str]) -> None:
    _, m = load_verified(str(h.dest), home=h.env.home)
    doc = {"format": JOURNAL_FORMAT, "backup": m.id, "parts": parts, "done": done}
    (h.env.home / JOURNAL).write_text(json.dumps(doc))


def _digest(h: Host, name: str) -> str:
    return next(e.sha256 for e in load_verified(str(h.dest), home=h.env.home)[1].parts if e.name == name)


def test_a_predictable_refusal_stops_the_restore_before_its_first_part(env: Env) -> None:
    h = make_host(env)
    want = _manifests(h)
    (env.home / "trust.toml").unlink()  # the config part would write it back
    reg = registry(h.data)
    signer = PemSigner.from_file(env.work / "release.pem")
    push(reg, "team/c", "v1", sealed_file(env, "c", signer, svc=h.svc))  # the registry moved on
    reg.close()
    with pytest.raises(BackupError, match=r"registry database holds other data than the backup.s.*--replace"):
        _restore(h, components=("config", "registry"))
    assert not (env.home / "trust.toml").exists() and not (env.home / JOURNAL).exists()
    assert h.log.events()[-1]["result"] == "BackupError"
    # With --replace the same restore goes through, both parts.
    report = _restore(h, components=("config", "registry"), replace=True)
    assert (env.home / "trust.toml").exists() and _manifests(h) == want
    assert report["resumed"] == [] and set(report["parts"]) == {"config", "registry"}


def test_a_planted_journal_never_makes_a_part_count_as_restored(env: Env) -> None:
    h = make_host(env)
    want = _manifests(h)
    for p in h.data.glob("registry.db*"):
        p.unlink()
    # A journal of this backup and selection, naming the part done under the right digest:
    # the target is checked, found empty, and the part restored again.
    _journal(h, {"registry": _digest(h, "registry")}, ["registry"])
    report = _restore(h, components=("registry",), replace=True)
    assert report["resumed"] == ["registry"] and report["parts"]["registry"]["resumed"] == "restored again"
    assert _manifests(h) == want and not (env.home / JOURNAL).exists()
    body = records.read_record(Path(report["record"]), records.RESTORE, [records.host_key(env.home)])
    assert body["resumed"] == ["registry"] and body["result"] == "ok"
    # Under any other digest the journal's entry does not count at all.
    for p in h.data.glob("registry.db*"):
        p.unlink()
    _journal(h, {"registry": "0" * 64}, ["registry"])
    report = _restore(h, components=("registry",), replace=True)
    assert report["resumed"] == [] and report["parts"]["registry"]["written"] > 0
    assert _manifests(h) == want
    # An old-format journal (a list of names, no digests) is refused, not trusted.
    (env.home / JOURNAL).write_text(json.dumps({"format": JOURNAL_FORMAT, "parts": ["registry"], "done": ["registry"]}))
    with pytest.raises(BackupError, match="not a restore journal"):
        _restore(h, components=("registry",), replace=True)


def test_a_resumed_audit_part_is_verified_and_the_later_events_kept(env: Env) -> None:
    h = make_host(env)
    before = len(h.log.events())  # the backup's entries and the events written since
    # A fresh restore of the audit part refuses without --replace: the live log has grown.
    with pytest.raises(BackupError, match="audit database holds other data"):
        _restore(h, components=("audit",))
    grown = len(h.log.events())
    assert grown > before  # the refusal's own event
    # Resumed (its journal names it done), it is checked: the log starts with the backup's
    # entries, so it counts as restored and is not replaced, even with --replace.
    _journal(h, {"audit": _digest(h, "audit")}, ["audit"])
    report = _restore(h, components=("audit",), replace=True)
    assert report["parts"]["audit"] == {"resumed": "verified"}
    events = h.log.events()
    assert len(events) == grown + 1 and h.log.verify().ok  # nothing lost; the restore's event added
