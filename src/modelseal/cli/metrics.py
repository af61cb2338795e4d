"""The ``modelseal metrics`` command: this host's figures for a host without a server, as a
node_exporter textfile (docs/monitoring.md, docs/cli.md).

``modelseal metrics --textfile /var/lib/node_exporter/textfile/modelseal.prom`` writes, in
the Prometheus text format, atomically (a temporary file, fsync, rename; mode 0644 set
with ``fchmod`` before the rename, whatever the umask, so the node exporter can read it),
what this host's own state says: key operations by op and result, pin mismatches and the
other counted events of the local audit log (the entries that verify), its verification
state and last backup; key version ages and cryptoperiods (config.toml's keys and the
keystore's, opened with ``MODELSEAL_PASSPHRASE`` or the agent, never a prompt); the client
certificate (``client``) and its CA (``ca``) of ``--tls-dir`` or the registry settings'
folder; the revocation list's next update; the build. Run it from cron or a systemd timer;
each run replaces the file whole.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

from modelseal.keys.service import KeyService
from modelseal.util.home import modelseal_home


class _Once:
    """An audit log whose ``verified_events`` is read once (the tally and the pass share it)."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._got: Any = None

    def verified_events(self) -> Any:
        if self._got is None:
            self._got = self.log.verified_events()
        return self._got


def _audit_log(home: Path) -> Any:
    from modelseal.audit.log import MerkleAuditLog

    url = os.environ.get("MODELSEAL_AUDIT_URL")
    path = home / "audit.db"
    if url:
        return MerkleAuditLog(url)
    return MerkleAuditLog(path) if path.is_file() else None  # no log here: nothing to count, none made


def _tls_dir(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    from modelseal.registry import settings

    return settings.load().tls_dir


def render(svc: KeyService, tls_dir: Path | None) -> bytes:
    """The textfile's bytes (the Prometheus text format)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from modelseal.telemetry import collect, feed, metrics, statepass

    home = modelseal_home()
    has_home = home.is_dir()
    log = _audit_log(home) if has_home else None
    audit = _Once(log) if log is not None else None
    tally = feed.Tally()
    if audit is not None:
        events, _ = audit.verified_events()
        for doc in events:
            tally.add(doc)
    sources = statepass.Sources(svc=svc if has_home else None, local_keys=has_home, audit=audit)
    passed = statepass.StatePass(sources, None, dict(statepass.INTERVALS)).run_all()
    roles = {} if tls_dir is None else {"client": [tls_dir / "cert.pem"], "ca": [tls_dir / "ca.pem"]}
    scrape = collect.ScrapeCollector(roles, home if has_home else None, snapshot=lambda: passed)
    counters = tally.families([metrics.PIN_MISMATCHES, metrics.BREAK_GLASS])

    class _All:
        def collect(self) -> Any:
            yield from counters
            yield from scrape.collect()

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_All())
    return generate_latest(reg)


def publish(path: Path, data: bytes) -> None:
    """``util.files.write_atomic``'s steps (a new temporary file beside ``path``, fsync,
    rename, fsync of the folder) with the mode set by ``fchmod`` before the rename: 0644
    whatever the umask (the node exporter reads the file as another user)."""
    from modelseal.errors import StorageError
    from modelseal.util.files import fsync_dir, temp_sibling, write_all

    tmp = temp_sibling(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fchmod(fd, 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise StorageError(f"cannot write {path}: {e.strerror}") from None
        raise


def cmd_metrics(args: argparse.Namespace, svc: KeyService) -> int:
    path = Path(args.textfile)
    if path.suffix != ".prom":
        raise ValueError(f"--textfile {str(path)[:200]!r}: the node exporter reads only *.prom files")
    if not path.parent.is_dir():
        raise ValueError(f"--textfile {str(path)[:200]!r}: {str(path.parent)[:200]} is not a folder")
    if path.is_dir():
        raise ValueError(f"--textfile {str(path)[:200]!r} is a folder")
    data = render(svc, _tls_dir(args.tls_dir))
    publish(path, data)  # readable by the node exporter (0644); replaced whole
    return 0


def add_metrics(sub: Any) -> None:
    p = sub.add_parser(
        "metrics",
        help="write this host's figures as a node_exporter textfile (docs/monitoring.md)",
        description="Write key, certificate and audit-log figures of this host, in the Prometheus text format, "
        "atomically to a node_exporter textfile (*.prom). For a server, scrape GET /metrics instead.",
    )
    p.add_argument("--textfile", required=True, metavar="PATH", help="the .prom file to write (replaced atomically)")
    p.add_argument(
        "--tls-dir",
        metavar="DIR",
        help="the client certificate folder to report (default: MODELSEAL_TLS_DIR or [registry] tls_dir)",
    )
    p.set_defaults(fn=cmd_metrics)


__all__ = ["add_metrics", "publish", "render"]
