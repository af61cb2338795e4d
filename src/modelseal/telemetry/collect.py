"""The figures read when Prometheus scrapes, and the exposition (docs/monitoring.md).

``ScrapeCollector`` is a prometheus_client collector of what is cheap to read at every
scrape and needs no key, store or network: certificate dates by role (``server``,
``client``, ``ca``: the PEM files the caller names; for a role with several certificates,
the one that expires first), the next update of the signature revocation list (its
``expires_at``, authenticated with the trust policy of config.toml; parsed again only when
the list file changes), and
``modelseal_build_info``. What needs a key service, a database or a long pass over the
audit log (key version ages, holds, audit-log verification, last backup, artifacts by
protection state) comes from ``telemetry.statepass``, whose latest pass the collector
yields too: in one process from memory, in ``modelseal serve``'s several from the snapshot
file the pass writes in the multi-process directory (``read_snapshot``).

``exposition`` is the body and content type (the classic text format, 0.0.4, which every
Prometheus 2 and 3 reads; prometheus_client 0.26 calls its same bytes 1.0.0) of one scrape:
the counters of this process
(``metrics.REGISTRY``) or, in multi-process mode, of every process (prometheus_client's
``MultiProcessCollector`` over the per-process files), plus the collector's figures.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from modelseal.errors import ModelsealError
from modelseal.telemetry import metrics
from modelseal.util.files import read_limited

CERT_ROLES = ("server", "client", "ca")
MAX_PEM = 1 << 20
SNAPSHOT = "state.json"  # in the multi-process directory (prometheus_client reads only *.db there)
MAX_SNAPSHOT = 4 << 20


@dataclass(frozen=True)
class Family:
    """One gauge family of a pass: its name, help, label names and samples."""

    name: str
    help: str
    labels: tuple[str, ...] = ()
    samples: tuple[tuple[tuple[str, ...], float], ...] = ()

    def metric(self) -> GaugeMetricFamily:
        g = GaugeMetricFamily(self.name, self.help, labels=list(self.labels))
        for values, value in self.samples:
            g.add_metric(list(values), value)
        return g

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "help": self.help, "labels": list(self.labels), "samples": self.samples}

    @classmethod
    def from_json(cls, doc: Any) -> Family | None:
        try:
            labels = tuple(str(x) for x in doc["labels"])
            samples = tuple(
                (tuple(str(v) for v in values), float(value))
                for values, value in doc["samples"]
                if len(values) == len(labels)
            )
            return cls(str(doc["name"]), str(doc["help"]), labels, samples)
        except (KeyError, TypeError, ValueError):
            return None


@dataclass
class Memory:
    """The latest pass of this process (single-process mode)."""

    families: list[Family] = field(default_factory=list)


MEMORY = Memory()


def write_snapshot(families: Sequence[Family], directory: str | None) -> None:
    """Publish a pass: to the multi-process directory's snapshot file (whole, atomically) or,
    without one, to this process's memory."""
    if directory is None:
        MEMORY.families = list(families)
        return
    doc = {"pid": os.getpid(), "time": time.time(), "families": [f.to_json() for f in families]}
    path = Path(directory) / SNAPSHOT
    tmp = path.with_name(f".{SNAPSHOT}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:  # the folder is private and in tmpfs-like use: no fsync needed
        f.write(json.dumps(doc, separators=(",", ":")).encode())
    os.replace(tmp, path)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_snapshot(directory: str | None) -> list[Family]:
    """The latest published pass; none when its writer is gone (a restarted worker
    publishes again when its first pass ends) or the file is unreadable."""
    if directory is None:
        return list(MEMORY.families)
    try:
        raw = read_limited(Path(directory) / SNAPSHOT, MAX_SNAPSHOT, ModelsealError, "the metrics snapshot")
        doc = json.loads(raw)
    except (FileNotFoundError, ModelsealError, ValueError, OSError):
        return []
    if not isinstance(doc, dict) or not _alive(doc.get("pid")) or not isinstance(doc.get("families"), list):
        return []
    return [f for f in map(Family.from_json, doc["families"]) if f is not None]


# -- certificates -------------------------------------------------------------------------


def load_certificates(path: Path) -> list[x509.Certificate]:
    """The certificates of a PEM file; none if it is missing or unreadable."""
    try:
        data = read_limited(path, MAX_PEM, ModelsealError, f"certificate file {path}")
        return x509.load_pem_x509_certificates(data)
    except (FileNotFoundError, ModelsealError, ValueError, OSError):
        return []


def certificate_families(roles: Mapping[str, Sequence[Path]]) -> list[Family]:
    """Expiry and not-before timestamps by role, of each role's first-expiring certificate."""
    expiry: list[tuple[tuple[str, ...], float]] = []
    before: list[tuple[tuple[str, ...], float]] = []
    for role in CERT_ROLES:
        certs = [c for p in roles.get(role, ()) for c in load_certificates(p)]
        if not certs:
            continue
        first = min(certs, key=lambda c: c.not_valid_after_utc)
        expiry.append(((role,), first.not_valid_after_utc.timestamp()))
        before.append(((role,), first.not_valid_before_utc.timestamp()))
    return [
        Family(
            "modelseal_certificate_expiry_timestamp_seconds",
            "Not-after time of the first-expiring certificate of each role.",
            ("role",),
            tuple(expiry),
        ),
        Family(
            "modelseal_certificate_not_before_timestamp_seconds",
            "Not-before time of the same certificate (its lifetime is expiry minus not-before).",
            ("role",),
            tuple(before),
        ),
    ]


# -- trust material -----------------------------------------------------------------------


_LISTS: dict[tuple[Any, ...], tuple[tuple[int, ...], float | None]] = {}  # list, keys -> (stamp, expiry)


def list_expiry(path: Path, keys: Mapping[str, Any], threshold: int, owners: Mapping[str, str]) -> float | None:
    """``expires_at`` of the revocation list at ``path``, authenticated with ``keys``; None
    if it is missing or does not verify. The list (up to 8 MiB) is read again only when the
    file changes (its stat stamp) or the keys do: a scrape costs a ``stat``."""
    from modelseal.signing.revocation import RevocationList

    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    key = (str(path), tuple(sorted(keys)), threshold, tuple(sorted(owners.items())))
    hit = _LISTS.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    expiry: float | None = None
    with contextlib.suppress(ModelsealError, OSError, ValueError):
        rl = RevocationList.load(path, dict(keys), threshold, owners=dict(owners), check_time=False)
        expiry = rl.expires_at.timestamp()
    if len(_LISTS) >= 16:
        _LISTS.clear()
    _LISTS[key] = (stamp, expiry)
    return expiry


def revocation_family(home: Path | None) -> Family:
    """``expires_at`` of the signature revocation list of config.toml's trust policy (the
    earliest, over the policies in force), read authenticated; nothing if there is none."""
    samples: list[tuple[tuple[str, ...], float]] = []
    with contextlib.suppress(ModelsealError, OSError, ValueError):
        from modelseal.keys.config import load as load_config
        from modelseal.signing.trust import load_policy

        cfg = load_config(home)
        paths = [p for p in (cfg.trust_policy, cfg.system_trust_policy) if p is not None]
        expiries = []
        for path in paths:
            for policy in load_policy(path).chain():
                rc = policy.revocation
                if rc is None:
                    continue
                keys, owners = policy.revocation_keys()
                if (expiry := list_expiry(rc.list_path, keys, rc.threshold, owners)) is None:
                    raise ValueError("a revocation list in force does not verify")  # no sample, as before
                expiries.append(expiry)
        if expiries:
            samples.append((("signatures",), min(expiries)))
    return Family(
        "modelseal_revocation_list_next_update_timestamp_seconds",
        "Time the revocation list must be replaced by (its expires_at), by list.",
        ("list",),
        tuple(samples),
    )


def version() -> str:
    """The installed distribution's version (the facade's ``__version__`` is the same string)."""
    try:
        return importlib.metadata.version("modelseal")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_family() -> Family:
    return Family(
        "modelseal_build_info", "The modelseal version running (always 1).", ("version",), (((version(),), 1.0),)
    )


class ScrapeCollector:
    """The scrape-time figures (module docstring). ``roles``: the certificate files by role;
    ``home``: whose config.toml names the trust policy (None: ``$MODELSEAL_HOME``)."""

    def __init__(
        self,
        roles: Mapping[str, Sequence[Path]] | None = None,
        home: Path | None = None,
        snapshot: Callable[[], list[Family]] | None = None,
    ) -> None:
        self.roles = dict(roles or {})
        self.home = home
        self._snapshot = snapshot or (lambda: read_snapshot(metrics.multiprocess_dir()))

    def families(self) -> list[Family]:
        out = [build_family(), *certificate_families(self.roles), revocation_family(self.home)]
        seen = {f.name for f in out}
        out += [f for f in self._snapshot() if f.name not in seen and f.name.startswith("modelseal_")]
        return out

    def collect(self) -> Iterator[Metric]:
        for family in self.families():
            yield family.metric()


class _Union:
    def __init__(self, parts: Iterable[Any]) -> None:
        self.parts = list(parts)

    def collect(self) -> Iterator[Metric]:
        for part in self.parts:
            yield from part.collect()


def exposition(collector: ScrapeCollector | None) -> tuple[bytes, str]:
    """One scrape: (body, content type) in the Prometheus text format."""
    directory = metrics.multiprocess_dir()
    reg = CollectorRegistry(auto_describe=False)
    parts: list[Any] = [metrics.REGISTRY]
    if directory:
        parts = [MultiProcessCollector(None, directory)]  # type: ignore[no-untyped-call]
    if collector is not None:
        parts.append(collector)
    reg.register(_Union(parts))
    return generate_latest(reg), CONTENT_TYPE_PLAIN_0_0_4  # the classic text format: what Prometheus 2 asks for


__all__ = [
    "CERT_ROLES",
    "MEMORY",
    "SNAPSHOT",
    "Family",
    "ScrapeCollector",
    "build_family",
    "certificate_families",
    "exposition",
    "list_expiry",
    "load_certificates",
    "read_snapshot",
    "revocation_family",
    "write_snapshot",
]
