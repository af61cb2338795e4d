"""Artifacts in a registry by protection state, server side: ``protection_states(registry)``
feeds ``modelseal_artifacts{state}`` (``telemetry.statepass``, docs/monitoring.md).

Directly over a ``registry.service.Registry`` (its metadata store and blob store, no HTTP),
headers only, with the same checks as ``modelseal scan oci://`` (``scanartifacts``): every
manifest's layers are read by content (the first bytes, a sealed header with its slots),
whatever the manifest's media type or artifact type says (OCI or Docker; a signature
referrer's layers are signature files, which are no artifact): a sealed file or folder
manifest is ``sealed-signed`` or ``sealed-unsigned`` by its signature referrers, ``revoked``
(under a trust policy with a revocation list), or ``past-cryptoperiod`` (when the KEK versions
are known: ``keys``); a manifest with a plaintext model layer is ``plaintext``. A layer's size
is the blob store's, never the descriptor's. An index's manifests are manifests of their own.

Bounded work per call, resumable: a cursor walks every manifest of the registry in
(repository, digest) order, at most ``budget`` manifests per call, and a call stops once about
``max_reads`` layers were read or ``max_seconds`` passed, in the middle of a manifest if need
be (its distinct layers are read once each, and the next call goes on where this one
stopped): no layer is left out, however many a manifest lists. Each manifest's signature
files are fetched and parsed once per call. Each state is kept until the cursor comes round
again; a deleted manifest drops out as the cursor passes where it was. The counts are
therefore each manifest as of its last examination: a registry of N manifests is up to date
after about N / ``budget`` calls. Only artifacts are kept (at most ``MAX_TRACKED`` per
registry; past that, a warning is logged once and further artifacts are not counted). One
manifest counts once, as the worst of its layers (plaintext, then revoked, past its
cryptoperiod, unsigned, signed). Without a trust policy a signature still has to verify
against the key it carries (``scansig``).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field

from modelseal.errors import ModelsealError, RegistryRefused
from modelseal.registry import layout
from modelseal.registry.service import Registry
from modelseal.signing.sigfile import MAX_SIGFILE
from modelseal.signing.trust import TrustPolicy
from modelseal.telemetry import scankeys
from modelseal.telemetry.scanartifacts import ScanContext, examine
from modelseal.telemetry.scanmodel import STATES, ScanReport
from modelseal.telemetry.scanoci import MAX_LAYERS, digests
from modelseal.telemetry.scansig import TrustCheck
from modelseal.util.bounded import json_loads

BUDGET = 512  # manifests examined per call
MAX_TRACKED = 1_000_000
MAX_READS = 16384  # layers read per call, about
MAX_SECONDS = 2.0  # per call, about (a layer in progress is finished)
MAX_REFERRERS_READ = 4  # signature referrers read per artifact, newest first
FIRST_READ = 16 << 10
_log = logging.getLogger(__name__)
Key = tuple[str, str]


@dataclass
class _Partial:
    key: Key
    layers: list[str]
    next: int = 0
    found: Counter[str] = field(default_factory=Counter)


@dataclass
class _Walk:
    cursor: Key | None = None
    keys: list[Key] = field(default_factory=list)  # sorted: the tracked artifacts
    states: dict[Key, str] = field(default_factory=dict)
    partial: _Partial | None = None
    warned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, key: Key, state: str | None) -> None:
        if state is None:
            self.drop(key)
            return
        if key not in self.states:
            if len(self.states) >= MAX_TRACKED:
                if not self.warned:
                    _log.warning("protection_states: more than %d artifacts; the rest are not counted", MAX_TRACKED)
                    self.warned = True
                return
            bisect.insort(self.keys, key)
        self.states[key] = state

    def drop(self, key: Key) -> None:
        if self.states.pop(key, None) is not None:
            del self.keys[bisect.bisect_left(self.keys, key)]

    def forget(self, low: Key | None, high: Key | None, keep: set[Key]) -> None:
        """Drop the artifacts in (low, high] not in ``keep`` (deleted since the cursor passed)."""
        start = 0 if low is None else bisect.bisect_right(self.keys, low)
        end = len(self.keys) if high is None else bisect.bisect_right(self.keys, high)
        for key in [k for k in self.keys[start:end] if k not in keep]:
            self.drop(key)


_walks: weakref.WeakKeyDictionary[Registry, _Walk] = weakref.WeakKeyDictionary()
_walks_lock = threading.Lock()


class _RegistryBlob:
    def __init__(self, reg: Registry, repo: str, digest: str) -> None:
        self._reg, self._row = reg, reg.blob(repo, digest)
        self._where = f"{repo}#{digest}"

    @property
    def location(self) -> str:
        return self._where

    @property
    def size(self) -> int:
        return self._row.size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0 or offset >= self._row.size:
            return b""
        try:
            return b"".join(self._reg.read_blob(self._row, offset, min(length, self._row.size - offset)))
        except ModelsealError as e:
            raise OSError(str(e)) from None


@dataclass
class _Budget:
    reads: int
    deadline: float
    report: ScanReport
    progressed: bool = False  # a layer was read in this call: every call moves on

    def spent(self) -> bool:
        return self.progressed and (self.report.files >= self.reads or time.monotonic() > self.deadline)


def protection_states(
    registry: Registry,
    *,
    policy: TrustPolicy | None = None,
    keys: scankeys.KeyStates | None = None,
    budget: int = BUDGET,
    max_reads: int = MAX_READS,
    max_seconds: float = MAX_SECONDS,
) -> dict[str, int]:
    """The registry's artifacts by protection state (every state, 0 included); examines at
    most ``budget`` manifests, about ``max_reads`` layers and ``max_seconds`` (module doc)."""
    with _walks_lock:
        walk = _walks.get(registry)
        if walk is None:
            walk = _walks[registry] = _Walk()
    with walk.lock:
        page = registry.meta.manifest_page(walk.cursor, budget)
        report = ScanReport("registry")
        ctx = ScanContext(report, TrustCheck(policy), keys or scankeys.KeyStates(None), prefix=FIRST_READ)
        limit = _Budget(max_reads, time.monotonic() + max_seconds, report)
        done: list[Key] = []
        stopped = False
        for repo, digest, _artifact_type in page:
            if limit.spent():
                stopped = True
                break
            state = _state(registry, (repo, digest), ctx, walk, limit)
            if state == _UNFINISHED:
                stopped = True
                break
            done.append((repo, digest))
            walk.put((repo, digest), state)
        finished = not stopped and len(page) < budget  # the end of the registry: round again
        low, high = walk.cursor, (None if finished else (done[-1] if done else walk.cursor))
        if done or finished:
            walk.forget(low, high, set(done))
        walk.cursor = high
        counts = Counter(walk.states.values())
    return {s: counts.get(s, 0) for s in STATES}


# A manifest with several kinds of layers counts once, as the worst of them.
_PRECEDENCE = ("plaintext", "revoked", "past-cryptoperiod", "sealed-unsigned", "sealed-signed")
_UNFINISHED = "unfinished"  # the call's budget ran out within this manifest


def _state(reg: Registry, key: Key, ctx: ScanContext, walk: _Walk, limit: _Budget) -> str | None:
    """The protection state of one manifest (None: no artifact in it), or ``_UNFINISHED``."""
    repo, digest = key
    part = walk.partial if walk.partial is not None and walk.partial.key == key else None
    if part is None:
        try:
            body = reg.get_manifest(repo, digest).body or b""
            doc = json_loads(body, max_depth=8, max_values=8 * layout.MAX_LAYERS + 64, error=ValueError)
        except (ModelsealError, ValueError):
            return None
        if not isinstance(doc, dict):
            return None
        part = _Partial(key, list(dict.fromkeys([*digests(doc, "layers"), *digests(doc, "blobs")]))[:MAX_LAYERS])
    walk.partial = None
    signatures: list[bytes] | None = None

    def neighbours(kind: int) -> tuple[str, list[bytes]]:
        nonlocal signatures
        del kind
        if signatures is None:
            signatures = _signature_files(reg, repo, digest)
        return f"{repo}@{digest}", signatures

    while part.next < len(part.layers):
        if limit.spent():
            walk.partial = part  # the next call goes on from here
            return _UNFINISHED
        layer = part.layers[part.next]
        part.next += 1
        limit.progressed = True
        before = Counter(ctx.report.states)
        try:
            examine(_RegistryBlob(reg, repo, layer), ctx, neighbours)
        except (OSError, ModelsealError):
            continue
        part.found.update(ctx.report.states - before)
    return next((state for state in _PRECEDENCE if part.found.get(state)), None)


def _signature_files(reg: Registry, repo: str, digest: str) -> list[bytes]:
    """The signature files of the artifact manifest ``digest``: its signature referrers'
    layers, newest first, each bounded and digest-checked."""
    try:
        refs = reg.referrers(repo, digest, layout.SIGNATURES)
    except ModelsealError:
        return []
    descriptors = layout.newest_signatures(_descriptors(refs))
    out: list[bytes] = []
    for ref in descriptors[:MAX_REFERRERS_READ]:
        try:
            body = reg.get_manifest(repo, ref.digest).body or b""
            sig = layout.parse_signature_manifest(body, digest)
            if sig.size > MAX_SIGFILE:
                continue
            row = reg.blob(repo, sig.digest)
            data = b"".join(reg.read_blob(row, 0, min(row.size, MAX_SIGFILE)))
        except (ModelsealError, RegistryRefused):
            continue
        if layout.sha256_digest(data) == sig.digest and data not in out:
            out.append(data)
    return out


def _descriptors(refs: list[dict[str, object]]) -> list[layout.Descriptor]:
    out = []
    for r in refs:
        digest, size, media = r.get("digest"), r.get("size"), r.get("mediaType")
        notes = r.get("annotations")
        if isinstance(digest, str) and isinstance(size, int) and isinstance(media, str):
            annotations = {str(k): str(v) for k, v in notes.items()} if isinstance(notes, dict) else {}
            out.append(layout.Descriptor(media, digest, size, annotations, layout.SIGNATURES))
    return out


__all__ = ["BUDGET", "MAX_SECONDS", "protection_states"]
