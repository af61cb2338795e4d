"""The decider's view of the holds (``governance.holds``; docs/access.md, "Holds"):
``HoldIndex`` keeps one environment's active holds in memory, re-read at most every
``CACHE_SECONDS`` (2 s) and only when the store's generation token changed, by one thread at
a time (the others keep the previous view meanwhile, for at most ``STALE_SECONDS``);
``invalidate`` makes the next lookup wait for a read that began after it, so a change this
worker made is in force at its next decision. ``check`` is the rule the decider
(``server.authz``) applies; ``backing_resolver`` names a key's canonical backing key through
the broker catalog, so a key hold holds every catalog name of that key.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from modelseal.errors import KeyNotFound, ModelsealError
from modelseal.governance.brokerkeys import BrokerKeys
from modelseal.governance.holdmodel import Hold, SourceNets
from modelseal.governance.model import Resource
from modelseal.keys.providers import canonical_key

log = logging.getLogger("modelseal.governance")
KEY_HELD_ACTIONS = ("key.unwrap", "key.rewrap")  # what a key hold denies: wraps of new data go on
CACHE_SECONDS = 2.0
STALE_SECONDS = 10.0  # the longest a decider keeps an old view while another thread re-reads


class Snapshots(Protocol):
    """Where the view is read from (``holds.HoldStore``)."""

    def snapshot(self, known: int | None, env: str | None = None) -> tuple[int, list[Hold] | None]: ...

    def active(self, now: float | None = None, *, env: str | None = None) -> list[Hold]: ...


def backing_resolver(catalog: BrokerKeys) -> Callable[[str], str | None]:
    """A key name's canonical backing key in ``catalog`` (None: no such key), for ``HoldIndex``."""

    def resolve(name: str) -> str | None:
        entry = catalog.cached(name)
        if entry is None:
            try:
                entry = catalog.get(name)
            except KeyNotFound:
                return None
        return canonical_key(entry.backing)

    return resolve


@dataclass(frozen=True)
class HoldView:
    """One read of the active holds: by (kind, subject), key holds by backing key, sources by network."""

    by: Mapping[tuple[str, str], Hold]
    backing: Mapping[str, Hold]
    nets: SourceNets


class HoldIndex:
    """The active holds of ``store`` in ``env`` (every environment's without), re-read at
    most every ``cache_seconds`` of ``clock`` (monotonic), only when the token changed.
    ``resolve``: a key name's canonical backing key (``backing_resolver``)."""

    def __init__(
        self,
        store: Snapshots,
        cache_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        *,
        env: str | None = None,
        resolve: Callable[[str], str | None] | None = None,
    ) -> None:
        self.store, self.cache_seconds, self.clock, self.env, self.resolve = store, cache_seconds, clock, env, resolve
        self._lock, self._flight = threading.Lock(), threading.Lock()
        self._view: HoldView | None = None
        self._stamp = -math.inf
        self._token: int | None = None
        self._asked = self._seen = 0  # invalidations asked for, and the last one the view was read after
        self._failed: tuple[str, int] | None = None

    def _fresh(self, t: float) -> HoldView | None:
        ok = self._seen == self._asked and t - self._stamp < self.cache_seconds
        return self._view if ok else None

    def current(self) -> HoldView:
        """The view as of the last read; GovernanceError when it cannot be read (the decider denies)."""
        t = self.clock()
        with self._lock:
            view = self._fresh(t)
            if view is not None:
                return view
            old = self._view if self._seen == self._asked and t - self._stamp < STALE_SECONDS else None
        if not self._flight.acquire(blocking=old is None):
            assert old is not None
            return old  # another thread is re-reading: the view of a moment ago
        try:
            with self._lock:
                t = self.clock()
                view = self._fresh(t)
                if view is not None:
                    return view
                asked, known = self._asked, self._token
            try:
                token, rows = self.store.snapshot(known, self.env)
                fresh = None if rows is None else self._build(rows)
            except ModelsealError as e:  # the decider denies (503); the log says why, once a minute
                if (str(e), int(t // 60)) != self._failed:
                    self._failed = (str(e), int(t // 60))
                    log.error("the holds cannot be read: %s", e)
                raise
            with self._lock:
                if fresh is not None:
                    self._view = fresh
                self._token, self._stamp, self._seen = token, t, asked
                assert self._view is not None
                return self._view
        finally:
            self._flight.release()

    def _build(self, rows: list[Hold]) -> HoldView:
        by = {(h.kind, h.subject): h for h in rows}
        backing: dict[str, Hold] = {}
        for h in (h for h in rows if h.kind == "key"):
            b = h.backing or self.backing_of(h.subject)  # a hold placed without the catalog: by its name now
            if b is not None:
                backing[b] = h
        return HoldView(by, backing, SourceNets(h for h in rows if h.kind == "source"))

    def backing_of(self, name: str) -> str | None:
        return None if self.resolve is None else self.resolve(name)

    def lookup(self, kind: str, subject: str) -> Hold | None:
        return self.current().by.get((kind, subject))

    def active(self) -> tuple[Hold, ...]:
        return tuple(self.current().by.values())

    def stored(self) -> list[Hold]:
        """The active holds of this index's environment, read now (not the cached view)."""
        return self.store.active(env=self.env)

    def invalidate(self) -> None:
        """Make the next lookup wait for a read that began after this call (this worker
        just placed or released one)."""
        with self._lock:
            self._asked += 1


def check(index: HoldIndex, identity: str, source: str | None, action: str, resource: Resource) -> Hold | None:
    """The hold that denies ``action`` on ``resource`` by ``identity`` from ``source``, if any:
    a held identity, or a source inside a held network, is denied everything; a held key
    (any name of its backing key) its unwraps and rewraps."""
    view = index.current()  # one read of the view per decision
    if not view.by:
        return None
    held = view.by.get(("identity", identity))
    if held is None and source is not None:
        held = view.by.get(("source", source))
        if held is None and view.nets.prefixes:
            held = view.nets.match(source)
    if held is None and action in KEY_HELD_ACTIONS and resource.type == "Key":
        held = view.by.get(("key", resource.id))
        if held is None and view.backing:
            b = index.backing_of(resource.id)
            held = None if b is None else view.backing.get(b)
    return held


__all__ = ["CACHE_SECONDS", "KEY_HELD_ACTIONS", "STALE_SECONDS", "HoldIndex", "HoldView", "Snapshots"]
__all__ += ["backing_resolver", "check"]
