"""HTTP plumbing of the OCI routes (``server.oci``): error bodies, request bodies read on
the event loop in ~1 MiB batches at a minimum rate, ``Range``/``Content-Range`` parsing, and
the bounds on request bodies in flight (per identity and per worker). Knows no registry rules.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientError, EofStream, web

from modelseal.errors import RegistryRefused

BODY_READ_TIMEOUT = 30.0  # seconds a batch (or the rest of the body) may take: the minimum rate
BATCH = 1 << 20  # bytes handed to the blob store per write: one thread hop per MiB
MAX_BLOB = 1 << 40  # one blob: 1 TiB
MAX_UPLOADS_PER_IDENTITY = 8  # request bodies in flight per identity, per instance
MAX_UPLOADS = 24  # request bodies in flight per instance: below its thread pool (32)


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
    """At most ``limit`` request bodies in flight per identity (by its URI) and ``total`` in
    all, in this process. Taken and given back on the event loop only."""

    limit: int = MAX_UPLOADS_PER_IDENTITY
    total: int = MAX_UPLOADS
    _busy: dict[str, int] = field(default_factory=dict)
    _all: int = 0

    def take(self, who: str) -> str | None:
        """None if a slot was taken, else why not (for the 429's message)."""
        n = self._busy.get(who, 0)
        if n >= self.limit:
            return f"at most {self.limit} request bodies at once per identity"
        if self._all >= self.total:
            return "the server is receiving too many request bodies; retry"
        self._busy[who] = n + 1
        self._all += 1
        return None

    def give(self, who: str) -> None:
        self._all = max(0, self._all - 1)
        n = self._busy.get(who, 1) - 1
        if n <= 0:
            self._busy.pop(who, None)
        else:
            self._busy[who] = n


async def body_batches(
    request: web.Request, timeout: float = BODY_READ_TIMEOUT, batch: int = BATCH, code: str = "BLOB_UPLOAD_INVALID"
) -> AsyncIterator[bytes]:
    """The request body in batches of ``batch`` bytes (the last one shorter), read on the
    event loop: no thread waits for the network. Each batch, or the rest of the body, must
    arrive within ``timeout`` seconds (a minimum rate of ``batch/timeout``), else 408: a
    client trickling a byte at a time cannot hold a slot for long."""
    loop = asyncio.get_running_loop()
    content = request.content
    while True:
        deadline = loop.time() + timeout
        parts: list[bytes] = []
        size = 0
        while size < batch:
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                chunk = await asyncio.wait_for(content.readany(), left)
            except TimeoutError:
                raise bad(408, code, f"the body arrives slower than {batch >> 10} KiB in {timeout:.0f} s") from None
            except (ClientError, EofStream, OSError):
                raise bad(400, code, "the request body ended early") from None
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        if size:
            yield parts[0] if len(parts) == 1 else b"".join(parts)
        if size < batch:
            return


async def in_thread(pool: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


__all__ = [
    "UploadSlots",
    "bad",
    "body_batches",
    "byte_range",
    "content_length",
    "content_range",
    "error",
    "in_thread",
    "refusal",
]
