"""The Keys page's use counts (``server.console_usage.UsageIndex``) over a real Merkle audit
log: counted once per entry, a later view reads only what was appended, a first view of a
long log starts ``per_view`` entries before its end and says what it does not reach, and a
forged row is never counted."""

from __future__ import annotations

import time
from pathlib import Path

from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog
from modelseal.server.console_audit import AuditView
from modelseal.server.console_usage import DAY, UsageIndex

KEY = "local:kek"


def _log(tmp_path: Path, n: int, t: float) -> MerkleAuditLog:
    log = MerkleAuditLog(tmp_path / "audit.db")
    for i in range(n):
        log.emit(AuditEvent("wrap" if i % 2 else "unwrap", KEY, "ok", 1, actor="u", time=t - i))
    return log


def _total(index: UsageIndex, start: float) -> int:
    rows = index.per_day(lambda k: "kek" if k == KEY else None, start, 7)
    return sum(sum(v) for v in rows.get("kek", {}).values())


def test_each_entry_is_counted_once_and_new_ones_only_are_read(tmp_path: Path) -> None:
    now = time.time()
    start = now - now % DAY - 6 * DAY
    log = _log(tmp_path, 10, now)
    index = UsageIndex(AuditView(log, cache_seconds=0.0))
    assert index.update() and _total(index, start) == 10 and index.upto == 10 and index.reaches(start)
    assert index.update() and _total(index, start) == 10  # nothing new: nothing counted twice
    for _ in range(3):
        log.emit(AuditEvent("rewrap", KEY, "ok", 1, actor="u", time=now))
    log.emit(AuditEvent("unwrap", KEY, "DecryptionError", 1, actor="u", time=now))
    assert index.update() and index.upto == 14 and _total(index, start) == 14
    day = int(now // DAY) - int(start // DAY)
    rows = index.per_day(lambda k: "kek" if k == KEY else None, start, 7)["kek"]
    assert rows["rewrap"][day] == 3 and rows["failed"][day] == 1


def test_a_first_view_of_a_long_log_starts_near_its_end(tmp_path: Path) -> None:
    now = time.time()
    start = now - now % DAY - 6 * DAY
    log = _log(tmp_path, 30, now)
    index = UsageIndex(AuditView(log, cache_seconds=0.0), per_view=8)
    assert index.update()  # the newest 8 counted: every entry since the floor
    assert index.floor == 22 and index.upto == 30 and _total(index, start) == 8
    assert index.reaches(now - 10) and not index.reaches(now - 1000)  # entry 22 is 21 s old


def test_a_changed_row_is_not_counted(tmp_path: Path) -> None:
    import sqlite3

    now = time.time()
    start = now - now % DAY - 6 * DAY
    log = _log(tmp_path, 5, now)
    con = sqlite3.connect(tmp_path / "audit.db")  # someone with write access to the database
    for (trigger,) in list(con.execute("SELECT name FROM sqlite_master WHERE type='trigger'")):
        con.execute(f"DROP TRIGGER {trigger}")
    cols = [r[1] for r in con.execute("PRAGMA table_info(events)")]
    body = next(c for c in cols if c in ("event", "body", "data"))
    con.execute(f"UPDATE events SET {body} = replace({body}, 'unwrap', 'rewrap') WHERE seq = 3")
    con.commit()
    con.close()
    index = UsageIndex(AuditView(log, cache_seconds=0.0))
    index.update()
    rows = index.per_day(lambda k: "kek" if k == KEY else None, start, 7).get("kek", {})
    assert not index.view.status().ok and sum(rows.get("rewrap", [0])) == 0
    assert _total(index, start) == 0  # the batch that holds the changed row is never shown, nor counted


def test_alerts_are_kept_for_their_window_and_read_once(tmp_path: Path) -> None:
    from modelseal.server.console_usage import Alerts

    now = time.time()
    log = _log(tmp_path, 4, now)
    log.emit(AuditEvent("anomaly", "detector:burst", "alert:high", actor="monitor", time=now - 2 * DAY))
    log.emit(AuditEvent("anomaly", "detector:burst", "alert:high", actor="monitor", time=now - 60))
    tail = Alerts(AuditView(log, cache_seconds=0.0), keep=3)
    assert tail.update() and [e["entry"] for e in tail.since(now - DAY)] == [6]
    for i in range(5):
        log.emit(AuditEvent("anomaly", "detector:burst", "alert:low", actor="monitor", time=now + i))
    assert tail.update() and tail.upto == 11
    assert [e["entry"] for e in tail.since(now - DAY)] == [11, 10, 9]  # newest first, at most keep
    assert tail.reaches(now - 10 * DAY)  # read from the log's first entry


def test_one_view_per_worker_shared_by_every_reader(tmp_path: Path) -> None:
    """The Audit log page, the key use and the alerts read one verified view: the log is
    verified once per worker, not once per page."""
    from aiohttp import web

    from modelseal.server import console_usage
    from modelseal.server.console_audit import VIEW

    log, app = _log(tmp_path, 3, time.time()), web.Application()
    console_usage.install(app, log)
    view = app[VIEW]
    console_usage.install(app, log)  # again: nothing replaced
    assert app[VIEW] is view and app[console_usage.INDEX].view is view and app[console_usage.ALERTS].view is view
    bare = web.Application()
    console_usage.install(bare, object())  # not a Merkle log: no view, and the pages say so
    assert VIEW not in bare
