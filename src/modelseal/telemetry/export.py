"""SIEM export of security events and alerts (docs/monitoring.md, "Events").

Every ``SecurityEvent`` and every ``Alert`` the monitor handles can go, as the documented
record (``to_dict()``, docs/schemas/security-event.schema.json), to any of:

- a JSON lines file (``FileOutput``, format ``jsonl``): one record per line;
- an OTLP/JSON file (``FileOutput``, format ``otlp-json``): one ``ExportLogsServiceRequest``
  per line, as the OpenTelemetry Collector's ``otlpjsonfile`` receiver reads
  (``telemetry.otlp``);
- syslog (``SyslogOutput``): one RFC 5424 message per record, the record's JSON as its
  message (``telemetry.syslogout``).

Files are appended under an ``flock`` of a lock file beside them (several writers may
share one), created 0600, fsynced once per batch, and rotated by size: ``NAME`` becomes
``NAME.1``, ``NAME.1`` becomes ``NAME.2`` and so on, ``keep`` old files at most, the way
``logging.handlers.RotatingFileHandler`` names them (so a log shipper's ``NAME*`` glob
finds them). A file that cannot be written raises ``StorageError`` to the caller, who
decides (the monitor logs it and goes on); syslog never raises. ``exporter_from_config``
reads config.toml's ``[monitor.export]``. ``modelseal events export`` writes the same
lines from the local audit log, for a backfill.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from modelseal.errors import StorageError
from modelseal.keys.config import ConfigError
from modelseal.telemetry.alerting import Alert
from modelseal.telemetry.otlp import logs_request
from modelseal.telemetry.secevents import SecurityEvent
from modelseal.telemetry.syslogout import SyslogWriter, check_facility, parse_address
from modelseal.util.files import fsync_dir, write_all
from modelseal.util.home import modelseal_home

FORMATS = ("jsonl", "otlp-json")
OTLP_BATCH = 500  # log records per OTLP request line
DEFAULT_MAX_BYTES = 100 << 20
DEFAULT_KEEP = 5


def dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def lines(records: Iterable[Mapping[str, Any]], fmt: str, now: float | None = None) -> Iterator[str]:
    """The lines (without newlines) of ``records`` in ``fmt`` (``FORMATS``)."""
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}")
    if fmt == "jsonl":
        yield from (dumps(r) for r in records)
        return
    batch: list[Mapping[str, Any]] = []
    for r in records:
        batch.append(r)
        if len(batch) == OTLP_BATCH:
            yield dumps(logs_request(batch, now))
            batch = []
    if batch:
        yield dumps(logs_request(batch, now))


class Output(Protocol):
    def write(self, records: Sequence[Mapping[str, Any]]) -> None: ...

    def close(self) -> None: ...


class FileOutput:
    """Append ``records`` to ``path`` in ``fmt``, rotated above ``max_bytes``, ``keep`` old files."""

    def __init__(
        self, path: Path, fmt: str = "jsonl", max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"export format must be one of {', '.join(FORMATS)}")
        self.path, self.fmt, self.max_bytes, self.keep = path, fmt, max_bytes, keep

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        data = "".join(line + "\n" for line in lines(records, self.fmt)).encode()
        try:
            with self._locked():
                self._append(data)
        except OSError as e:
            raise StorageError(f"export: cannot write {self.path}: {e.strerror or type(e).__name__}") from None

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _append(self, data: bytes) -> None:
        try:
            size = os.lstat(self.path).st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.max_bytes:
            self._rotate()
            size = 0
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(f"export: {self.path} is not a regular file")
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)  # security events are for the SIEM, not for every local user
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if size == 0:
            fsync_dir(self.path.parent)  # a new file's name is durable too

    def _rotate(self) -> None:
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


class SyslogOutput:
    """One syslog message per record: MSGID ``event`` (info, or warning for a failure or
    refusal) or ``alert`` (the alert's severity)."""

    def __init__(self, writer: SyslogWriter) -> None:
        self.writer = writer

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        for r in records:
            if str(r.get("schema", "")).startswith("modelseal.alert/"):
                self.writer.send("alert", str(r.get("severity")), dumps(r))
            else:
                self.writer.send("event", "info" if r.get("outcome") == "success" else "warning", dumps(r))

    def close(self) -> None:
        self.writer.close()


class Exporter:
    """The configured outputs; with none, writing does nothing."""

    def __init__(self, outputs: Sequence[Output] = ()) -> None:
        self.outputs = list(outputs)

    def write(self, events: Sequence[SecurityEvent]) -> None:
        """Every event to every output (a ``StorageError`` after all outputs were tried)."""
        self._write([e.to_dict() for e in events])

    def write_alert(self, alert: Alert) -> None:
        self._write([alert.to_dict()])

    def _write(self, records: Sequence[Mapping[str, Any]]) -> None:
        failed: StorageError | None = None
        for out in self.outputs:
            try:
                out.write(records)
            except StorageError as e:
                failed = e
        if failed is not None:
            raise failed

    def close(self) -> None:
        for out in self.outputs:
            out.close()


_KEYS = {"jsonl", "otlp_json", "syslog", "facility", "max_bytes", "keep"}


def _file(value: object, where: str, home: Path | None) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config: {where} must be a file path")
    path = Path(value)
    path = path if path.is_absolute() else (home or modelseal_home()) / path
    if not path.parent.is_dir():
        raise ConfigError(f"config: {where}: folder {path.parent} does not exist")
    return path


def _int(table: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"config: monitor.export.{name} must be an integer from {low} to {high}")
    return value


def exporter_from_config(table: Mapping[str, Any], home: Path | None = None) -> Exporter:
    """The outputs of ``[monitor.export]``: ``jsonl`` and ``otlp_json`` (file paths; relative
    ones under ``home``), ``syslog`` (``/dev/log`` or ``HOST:PORT``) with ``facility``, and
    ``max_bytes`` (default 100 MiB) and ``keep`` (5) for the files' rotation."""
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"config: [monitor.export] has unknown setting(s) {', '.join(unknown)}")
    max_bytes = _int(table, "max_bytes", DEFAULT_MAX_BYTES, 1 << 16, 1 << 40)
    keep = _int(table, "keep", DEFAULT_KEEP, 1, 1000)
    outputs: list[Output] = []
    for name, fmt in (("jsonl", "jsonl"), ("otlp_json", "otlp-json")):
        if name in table:
            outputs.append(FileOutput(_file(table[name], f"monitor.export.{name}", home), fmt, max_bytes, keep))
    if "syslog" in table:
        address = parse_address(table["syslog"], "monitor.export.syslog")
        outputs.append(SyslogOutput(SyslogWriter(address, check_facility(table.get("facility"), "monitor.export"))))
    elif "facility" in table:
        raise ConfigError("config: monitor.export.facility needs monitor.export.syslog")
    return Exporter(outputs)


__all__ = [
    "FORMATS",
    "Exporter",
    "FileOutput",
    "Output",
    "SyslogOutput",
    "dumps",
    "exporter_from_config",
    "lines",
]
