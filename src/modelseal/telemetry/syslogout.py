"""Syslog output shared by the alert sinks and the SIEM export: one JSON record per message.

Framing is RFC 5424 (``<PRI>1 TIMESTAMP HOST modelseal PID MSGID - JSON``), written through
the stdlib's ``logging.handlers.SysLogHandler`` to a unix datagram socket (an absolute
path, ``/dev/log``) or over UDP (``HOST:PORT``, ``[v6]:PORT``). The JSON is ASCII (escaped)
and on one line, so no BOM is needed and a receiver splits nothing. Owns the address
syntax, the facility and the priority mapping; knows nothing of what it sends. A message
that cannot be sent is counted and logged (throttled), never raised: syslog is
fire-and-forget for its callers.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import UTC, datetime
from logging.handlers import SysLogHandler

from modelseal.keys.config import ConfigError
from modelseal.telemetry.logthrottle import ThrottledLog

log = logging.getLogger("modelseal.telemetry")

FACILITIES = tuple(sorted(SysLogHandler.facility_names))
DEFAULT_FACILITY = "auth"  # security and authorization messages (RFC 5424 facility 4)
LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.CRITICAL}
_HOST = (socket.gethostname() or "-").replace(" ", "_")[:255]


def parse_address(text: object, where: str) -> str | tuple[str, int]:
    """A unix socket path (absolute) or a UDP ``HOST:PORT``; ConfigError otherwise."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f'config: {where} must be a socket path ("/dev/log") or "HOST:PORT" (UDP)')
    if text.startswith("/"):
        return text
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f'config: {where} must be a socket path ("/dev/log") or "HOST:PORT" (UDP)')
    return host, int(port)


def check_facility(value: object, where: str) -> str:
    if value is None:
        return DEFAULT_FACILITY
    if not isinstance(value, str) or value not in SysLogHandler.facility_names:
        raise ConfigError(f"config: {where} must be one of {', '.join(FACILITIES)}")
    return value


class _Rfc5424(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        msgid = getattr(record, "msgid", "-")
        return f"1 {stamp.replace('+00:00', 'Z')} {_HOST} modelseal {os.getpid()} {msgid} - {record.getMessage()}"


class _Handler(SysLogHandler):
    def __init__(self, address: str | tuple[str, int], facility: int, throttle: ThrottledLog) -> None:
        super().__init__(address=address, facility=facility)
        self.append_nul = False  # RFC 5424 has no NUL terminator
        self._throttle = throttle

    def handleError(self, record: logging.LogRecord) -> None:
        # The default prints a traceback with the record; count and name the class only.
        import sys

        error = sys.exc_info()[1]
        self._throttle.note("syslog: %d message(s) not sent (latest: %s)", type(error).__name__)


class SyslogWriter:
    """One connection to a syslog receiver; ``send(msgid, level, text)`` writes one message."""

    def __init__(self, address: str | tuple[str, int], facility: str = DEFAULT_FACILITY) -> None:
        self.address = address
        self.failures = ThrottledLog(log)
        try:
            self._handler = _Handler(address, SysLogHandler.facility_names[facility], self.failures)
        except OSError as e:
            shown = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
            raise ConfigError(f"syslog: cannot open {shown}: {e.strerror or type(e).__name__}") from None
        self._handler.setFormatter(_Rfc5424())

    def send(self, msgid: str, level: str, text: str) -> None:
        """``text`` must be one line (the callers send compact, ASCII JSON)."""
        record = logging.LogRecord("modelseal.syslog", LEVELS.get(level, logging.INFO), __file__, 0, text, None, None)
        record.msgid = msgid
        self._handler.handle(record)

    def close(self) -> None:
        self._handler.close()


__all__ = ["DEFAULT_FACILITY", "FACILITIES", "SyslogWriter", "check_facility", "parse_address"]
