"""Process-wide observation hooks: how a lower layer reports a measurement without knowing
who counts it.

``keys.service`` times every key provider call (``timed("kms", scheme, fn)``) and
``signing.verification`` reports each verification's result (``note("signature",
result)``); ``telemetry`` installs the hooks that turn them into Prometheus figures
(``telemetry.feed.install_hooks``). Without a hook nothing happens but a clock read. A
hook must be cheap and never raise; one that does is dropped for that call, never the
caller's problem. No dependency: this module imports the standard library only.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
Hook = Callable[[str, float], None]  # (label, value): a duration in seconds, or 1.0 for an event

_hooks: dict[str, tuple[Hook, ...]] = {}
_lock = threading.Lock()


def install(kind: str, hook: Hook) -> None:
    """Call ``hook`` for every observation of ``kind`` from now on (once per hook)."""
    with _lock:
        have = _hooks.get(kind, ())
        if hook not in have:
            _hooks[kind] = (*have, hook)


def uninstall(kind: str, hook: Hook) -> None:
    with _lock:
        _hooks[kind] = tuple(h for h in _hooks.get(kind, ()) if h != hook)


def note(kind: str, label: str, value: float = 1.0) -> None:
    """Report ``value`` for ``label`` to the hooks of ``kind``."""
    for hook in _hooks.get(kind, ()):
        with contextlib.suppress(Exception):  # an observer's failure must not fail what it watches
            hook(label, value)


def timed(kind: str, label: str, fn: Callable[[], T]) -> T:
    """``fn()``, its duration (success or failure) reported to the hooks of ``kind``."""
    if not _hooks.get(kind):
        return fn()
    start = time.perf_counter()
    try:
        return fn()
    finally:
        note(kind, label, time.perf_counter() - start)


__all__ = ["Hook", "install", "note", "timed", "uninstall"]
