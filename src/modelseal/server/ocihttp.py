"""HTTP plumbing of the OCI routes (``server.oci``): error bodies, request bodies streamed
to a worker thread with a per-read timeout, ``Range``/``Content-Range`` parsing, and the
bound on concurrent uploads per identity. Knows no registry rules.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientError, EofStream, web

from modelseal.errors import RegistryRefused

BODY_READ_TIMEOUT = 30.0  # seconds without a byte from the client: a slow (slowloris) upload
BATCH = 1 << 20  # bytes handed to the blob store per write: one thread hop per MiB
MAX_BLOB = 1 << 40  # one blob: 1 TiB
MAX_UPLOADS_PER_IDENTITY = 8  # request bodies in flight per identity, per instance


def error(
    status: int, code: str, message: str, head: bool = False, headers: dict[str, str] | None = None
) -> web.Response:
    """The OCI error answer: ``{"errors": [{"code", "message", "detail"}]}``, one line."""
    one_line = " ".join(message.split())[:300]
    if head:
        return web.Response(status=status, headers=headers)
    return web.json_response(
        {"errors": [{"code": code, "message": one_line, "detail": {}}]}, status=status, headers=headers
    )


def refusal(e: RegistryRefused, head: bool = False) -> web.Response:
    return error(e.status or 400, e.code or "UNSUPPORTED", str(e), head)


def bad(status: int, code: str, message: str) -> RegistryRefused:
    return RegistryRefused(message, status=status, code=code)


_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?([0-9]{1,19})-([0-9]{1,19})(?:/(?:[0-9]{1,19}|\*))?")
_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")


def content_range(value: str | None) -> tuple[int, int] | None:
    """``(start, length)`` of a chunk's ``Content-Range: START-END`` (inclusive), None if absent.
    An END before START cannot be appended anywhere: 416."""
    if value is None:
        return None
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if not m:
        raise bad(400, "BLOB_UPLOAD_INVALID", "Content-Range must be START-END")
    start, end = int(m.group(1)), int(m.group(2))
    if end < start:
        raise bad(416, "BLOB_UPLOAD_INVALID", "Content-Range ends before it starts")
    return start, end - start + 1


def content_length(request: web.Request) -> int | None:
    value = request.headers.get("Content-Length")
    if value is None:
        return None
    if not value.isdigit() or len(value) > 19:
        raise bad(400, "SIZE_INVALID", "Content-Length is not a number")
    n = int(value)
    if n > MAX_BLOB:
        raise bad(413, "SIZE_INVALID", f"a body over {MAX_BLOB} bytes is refused")
    return n


def byte_range(value: str | None, size: int) -> tuple[int, int] | None:
    """``(start, length)`` of a single ``Range: bytes=...`` over ``size`` bytes, None for the
    whole blob (no header, or one this server ignores: multiple ranges, other units).
    Unsatisfiable: ``RegistryRefused`` 416."""
    if value is None:
        return None
    m = _RANGE.fullmatch(value.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # a suffix: the last N bytes
        n = min(int(last), size)
        if n == 0:
            raise bad(416, "BLOB_UNKNOWN", "the range is not satisfiable")
        return size - n, n
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise bad(416, "BLOB_UNKNOWN", "the range is not satisfiable")
    return start, end - start + 1


@dataclass
class UploadSlots:
    """At most ``limit`` upload bodies in flight per identity (by its URI) in this process."""

    limit: int = MAX_UPLOADS_PER_IDENTITY
    _busy: dict[str, int] = field(default_factory=dict)

    def take(self, who: str) -> bool:
        n = self._busy.get(who, 0)
        if n >= self.limit:
            return False
        self._busy[who] = n + 1
        return True

    def give(self, who: str) -> None:
        n = self._busy.get(who, 1) - 1
        if n <= 0:
            self._busy.pop(who, None)
        else:
            self._busy[who] = n


class BodyPump:
    """The request body as a synchronous iterator of ~1 MiB batches for a worker thread.

    The worker pulls each batch from the event loop (``run_coroutine_threadsafe``), so the
    body is never held in memory whole; a read that waits more than ``timeout`` for the
    client refuses the request (408), which stops a slow client holding a slot."""

    def __init__(self, request: web.Request, loop: asyncio.AbstractEventLoop, timeout: float = BODY_READ_TIMEOUT):
        self._content = request.content
        self._loop = loop
        self._timeout = timeout
        self.timed_out = False

    async def _batch(self) -> bytes:
        parts: list[bytes] = []
        size = 0
        while size < BATCH:
            try:
                chunk = await asyncio.wait_for(self._content.readany(), self._timeout)
            except TimeoutError:
                self.timed_out = True
                raise bad(408, "BLOB_UPLOAD_INVALID", f"the client sent nothing for {self._timeout:.0f} s") from None
            except (ClientError, EofStream, OSError):
                raise bad(400, "BLOB_UPLOAD_INVALID", "the request body ended early") from None
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            batch = asyncio.run_coroutine_threadsafe(self._batch(), self._loop).result(self._timeout + 5)
            if not batch:
                return
            yield batch


async def in_thread(pool: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


__all__ = [
    "BodyPump",
    "UploadSlots",
    "bad",
    "byte_range",
    "content_length",
    "content_range",
    "error",
    "in_thread",
    "refusal",
]
