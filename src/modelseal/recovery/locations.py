"""Where one host's state lives, for collecting a backup and for restoring one
(docs/recovery.md, "What a backup holds"): the home (keystore, config, CA), the registry's
and the governance tables' databases, the audit log and the OpenBao cluster. Only the
operator's flags and environment fill these in, never a backup's contents.

It owns no I/O beyond reading ``MODELSEAL_AUDIT_URL``, ``BAO_ADDR``/``VAULT_ADDR`` and
checking that a database URL carries no password (argv is public), and that OpenBao is reached
over https unless it listens on this host (the token and the snapshot must not cross a network
in clear).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from modelseal.errors import BackupError
from modelseal.util.net import is_loopback

AUDIT_URL_ENV = "MODELSEAL_AUDIT_URL"
_BAO_ADDR_ENV = ("BAO_ADDR", "VAULT_ADDR")


@dataclass(frozen=True)
class BaoTarget:
    """One OpenBao cluster: its address and where its token comes from (a mode-600 file,
    or else ``$BAO_TOKEN``/``$VAULT_TOKEN``; never argv, a URL or a log)."""

    addr: str  # http(s)://127.0.0.1:PORT
    token_file: Path | None


def _check_db(url: str | None, flag: str) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme == "sqlite" and parts.path.startswith("/") and not parts.netloc:
        return url
    if parts.scheme in ("postgresql", "postgres"):
        if parts.password is not None or "password" in parse_qs(parts.query):
            raise BackupError(f"{flag} must not carry a password: use PGPASSFILE or PGPASSWORD (docs/deploy.md)")
        return url
    raise BackupError(f"{flag} takes postgresql://... or sqlite:///PATH")


def _check_addr(addr: str) -> str:
    parts = urlsplit(addr)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise BackupError("the OpenBao address must be http(s)://HOST:PORT, with no credentials")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise BackupError("the OpenBao address must be http(s)://HOST:PORT, with no path")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise BackupError("the OpenBao address must be https:// unless it is on this host (127.0.0.1, ::1, localhost)")
    return addr.rstrip("/")


@dataclass(frozen=True)
class Locations:
    """Where this host's state lives (see the module docstring)."""

    home: Path  # MODELSEAL_HOME
    registry_db: str | None  # None: SQLite registry_data/registry.db; or postgresql://... (no password in URL)
    registry_data: Path | None  # the registry's --data (None: no registry on this host)
    governance_db: str | None  # as governance.store.open_target(data, db)
    audit: str | Path  # MODELSEAL_AUDIT_URL or home/"audit.db"
    bao: BaoTarget | None  # OpenBao is a provider here (transit:/transit-pki)

    @classmethod
    def from_args(
        cls,
        home: Path,
        *,
        registry_data: Path | str | None = None,
        registry_db: str | None = None,
        governance_db: str | None = None,
        bao_addr: str | None = None,
        bao_token_file: Path | str | None = None,
    ) -> Locations:
        """From the operator's flags: ``--data``/``--db`` as ``modelseal serve`` takes them (the
        governance tables default to the registry's ``--db``, as ``serve`` keeps them), the audit
        log of ``MODELSEAL_AUDIT_URL`` or ``home/audit.db``, and OpenBao at ``bao_addr`` or else
        ``$BAO_ADDR``/``$VAULT_ADDR`` (no OpenBao part without either)."""
        registry_db = _check_db(registry_db, "--db")
        governance_db = _check_db(governance_db, "--governance-db") or registry_db
        audit: str | Path = os.environ.get(AUDIT_URL_ENV) or Path(home) / "audit.db"
        if isinstance(audit, str) and audit.startswith(("postgresql://", "postgres://")):
            if urlsplit(audit).password is not None or "password" in parse_qs(urlsplit(audit).query):
                raise BackupError(f"{AUDIT_URL_ENV} must not carry a password: use PGPASSFILE or PGPASSWORD")
        elif isinstance(audit, str):
            audit = Path(audit)
        addr = bao_addr or next((os.environ[n] for n in _BAO_ADDR_ENV if os.environ.get(n)), None)
        bao = BaoTarget(_check_addr(addr), Path(bao_token_file) if bao_token_file else None) if addr else None
        return cls(
            home=Path(home),
            registry_db=registry_db,
            registry_data=Path(registry_data) if registry_data is not None else None,
            governance_db=governance_db,
            audit=audit,
            bao=bao,
        )

    def registry_target(self) -> tuple[str, str] | None:
        """The registry database as ``(dialect, target)`` for ``util.sqldb``; None when this
        host has no registry (neither ``--data`` nor ``--db``)."""
        return _target(self.registry_db, self.registry_data, "registry.db")

    def governance_target(self) -> tuple[str, str] | None:
        """The governance tables' database (``governance.store.open_target``), or None."""
        return _target(self.governance_db, self.registry_data, "governance.db")

    def audit_target(self) -> tuple[str, str]:
        """The audit log as ``(dialect, target)``."""
        text = str(self.audit)
        if text.startswith(("postgresql://", "postgres://")):
            return "pg", text
        return "sqlite", text


def _target(db: str | None, data: Path | None, default_name: str) -> tuple[str, str] | None:
    if db is not None:
        parts = urlsplit(db)
        if parts.scheme == "sqlite":
            return "sqlite", parts.path
        return "pg", db
    if data is None:
        return None
    return "sqlite", str(data / default_name)


__all__ = ["AUDIT_URL_ENV", "BaoTarget", "Locations"]
