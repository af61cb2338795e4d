"""Group commit over the Merkle audit log: concurrent emitters, all recorded, errors shared."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from modelseal.audit.batch import GroupCommit
from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog
from modelseal.errors import StorageError


def test_emit_many_appends_in_order_and_verifies(tmp_path: Path) -> None:
    log = MerkleAuditLog(tmp_path / "audit.db")
    log.emit_many([AuditEvent("unwrap", f"local:k{i}", "ok") for i in range(5)])
    log.emit(AuditEvent("wrap", "local:last", "ok"))
    assert log.verify().ok
    assert [e["key"] for e in log.events()] == [f"local:k{i}" for i in range(5)] + ["local:last"]


def test_concurrent_emitters_share_commits_and_every_event_is_recorded(tmp_path: Path) -> None:
    log = MerkleAuditLog(tmp_path / "audit.db")
    calls: list[int] = []
    real = log.emit_many

    def counting(events: Sequence[AuditEvent]) -> None:
        calls.append(len(events))
        real(events)

    log.emit_many = counting  # type: ignore[method-assign]
    sink = GroupCommit(log)
    start = threading.Barrier(16)

    def worker(n: int) -> None:
        start.wait()
        for i in range(10):
            sink.emit(AuditEvent("unwrap", f"local:t{n}-{i}", "ok", actor="spiffe://d/prod/service/a"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(calls) == 160
    assert len(calls) < 160  # some appends carried several events
    assert log.verify().ok
    keys = [e["key"] for e in log.events()]
    assert sorted(keys) == sorted(f"local:t{n}-{i}" for n in range(16) for i in range(10))
    for n in range(16):  # one thread's events keep their order
        mine = [k for k in keys if k.startswith(f"local:t{n}-")]
        assert mine == [f"local:t{n}-{i}" for i in range(10)]


class _Failing:
    def emit_many(self, events: Sequence[AuditEvent]) -> None:
        raise StorageError("the audit log is full")


def test_an_append_failure_reaches_every_emitter_of_the_batch() -> None:
    sink = GroupCommit(_Failing())
    with pytest.raises(StorageError, match="full"):
        sink.emit(AuditEvent("unwrap", "local:k", "ok"))
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            sink.emit(AuditEvent("unwrap", "local:k", "ok"))
        except StorageError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 8
