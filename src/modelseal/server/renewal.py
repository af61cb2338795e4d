"""The server's own certificate, kept fresh without a restart (docs/serve.md, "Renewal").

Both run in the parent process (``server.workers``), once for all workers:

- ``FolderWatch`` notices that ``--tls-dir`` changed (``cert.pem``, ``key.pem`` or
  ``ca.pem``: inode, size, mtime), checks the new folder loads (``tls.server_context``), and
  only then has every worker reload it (SIGHUP). An external renewer (a ``modelseal cert
  renew DIR`` timer: ``pki.issue.write_dir`` swaps the folder whole) needs nothing else.
- ``Renewer``: when the CA is this host's (``$MODELSEAL_HOME/ca`` issued the server's
  chain) and its key can be reached without a prompt (``MODELSEAL_PASSPHRASE``, the agent
  socket, or a CA KEK outside the keystore), the server renews itself at two thirds of the
  certificate's lifetime through ``pki.issue.renew``, in a short-lived forked child: the
  keystore is unlocked there, never in the parent or a worker. The child writes the folder;
  the watch picks it up. A failure is retried with a back-off until the certificate expires.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from modelseal.errors import CertificateError, ModelsealError
from modelseal.keys import agent_client, keystore
from modelseal.keys.providers.base import parse_key_uri
from modelseal.pki import ca as pki_ca
from modelseal.pki import store
from modelseal.server import tls
from modelseal.server.workers import Supervisor

log = logging.getLogger("modelseal.server")

RENEW_AT = 2 / 3  # of the lifetime, notBefore to notAfter
RENEW_TIMEOUT = 120.0
RETRY_MIN, RETRY_MAX = 5.0, 300.0

Stamp = tuple[tuple[int, int, int] | None, ...]


def stamp(tls_dir: Path) -> Stamp:
    """What identifies the folder's three files now (None for a missing one)."""
    out: list[tuple[int, int, int] | None] = []
    for name in (tls.CERT_FILE, tls.KEY_FILE, tls.CA_FILE):
        try:
            st = os.stat(tls_dir / name)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def due_at(leaf: x509.Certificate, fraction: float = RENEW_AT) -> dt.datetime:
    """When ``leaf`` is due for renewal: ``fraction`` of the way from notBefore to notAfter."""
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    return start + (end - start) * fraction


@dataclass
class FolderWatch:
    """``--tls-dir`` as last loaded by the workers."""

    tls_dir: Path
    last: Stamp = ()

    def __post_init__(self) -> None:
        self.last = stamp(self.tls_dir)

    def changed(self) -> bool:
        """True once per change that loads; a broken folder is reported once and skipped."""
        now = stamp(self.tls_dir)
        if now == self.last:
            return False
        try:
            tls.server_context(self.tls_dir)
        except CertificateError as e:
            if stamp(self.tls_dir) == now:
                log.error("%s changed but does not load, the workers keep the old one: %s", self.tls_dir, e)
                self.last = now
            return False
        if stamp(self.tls_dir) != now:
            return False  # changed again while being read: look next time
        self.last = now
        return True


def local_ca(tls_dir: Path, ca_folder: Path | None) -> tuple[Path | None, str]:
    """The CA folder that can renew the server here, or None and why not. A local CA
    (``ca.json`` of ``pki.ca``) must be the one in ``ca.pem`` and its key reachable
    without a prompt; another backend's CA (OpenBao PKI) is tried by the renewer itself."""
    folder = ca_folder or store.ca_dir()
    if not (folder / pki_ca.CA_FILE).is_file():
        return None, f"no CA in {folder}"
    try:
        doc = store.read_json(folder, pki_ca.CA_FILE)
        if not isinstance(doc, dict) or doc.get("format") not in (None, pki_ca.CA_FORMAT):
            return folder, "the CA's backend"
        the_ca = pki_ca.load_ca(folder)
        with open(tls_dir / tls.CA_FILE, "rb") as f:
            anchors = x509.load_pem_x509_certificates(f.read(tls.MAX_PEM))
    except (ModelsealError, ValueError, OSError) as e:
        return None, f"the CA in {folder} does not load ({type(e).__name__})"
    if the_ca.root not in anchors:
        return None, f"the server certificate is not of the CA in {folder}"
    if parse_key_uri(the_ca.kek).scheme == "local" and not (
        os.environ.get(keystore.PASSPHRASE_ENV) or os.environ.get(agent_client.SOCK_ENV)
    ):
        return None, f"the CA key needs the keystore: set {keystore.PASSPHRASE_ENV} or {agent_client.SOCK_ENV}"
    return folder, "the local CA"


@dataclass
class Renewer:
    """Renew the certificate of ``tls_dir`` at ``fraction`` of its lifetime through
    the CA in ``ca_folder`` (None: only warn that it is due; an external renewer must act)."""

    tls_dir: Path
    ca_folder: Path | None
    fraction: float = RENEW_AT
    _seen: Stamp = ()
    _due: dt.datetime | None = None
    _pid: int | None = None
    _started: float = 0.0
    _next_try: float = 0.0
    _failures: int = 0
    _warned: set[int] = field(default_factory=set)

    def tick(self, sup: Supervisor) -> None:
        self._read_leaf()
        if self._due is None or pki_ca.utcnow() < self._due:
            return
        if self._pid is not None:
            if time.monotonic() - self._started > RENEW_TIMEOUT:
                log.error("the certificate renewal takes over %g s; killing it", RENEW_TIMEOUT)
                os.kill(self._pid, signal.SIGKILL)
            return
        if self.ca_folder is None:
            serial = tls.own_leaf(self.tls_dir).serial_number
            if serial not in self._warned:
                self._warned.add(serial)
                log.warning("the server certificate is due for renewal; waiting for %s to be renewed", self.tls_dir)
            return
        if time.monotonic() >= self._next_try:
            self._started = time.monotonic()
            self._pid = sup.fork_helper(self._renew, self._done)

    def _read_leaf(self) -> None:
        now = stamp(self.tls_dir)
        if now == self._seen:
            return
        try:
            leaf = tls.own_leaf(self.tls_dir)
        except CertificateError:
            return  # the watch reports a broken folder
        self._seen, self._due = now, due_at(leaf, self.fraction)
        self._failures = 0
        self._next_try = 0.0
        log.info(
            "server certificate %x valid until %s, renewal due at %s",
            leaf.serial_number,
            leaf.not_valid_after_utc.isoformat(timespec="seconds"),
            self._due.isoformat(timespec="seconds"),
        )

    def _renew(self) -> int:
        """In the helper child: no prompt can block it (stdin is /dev/null)."""
        from modelseal.keys.service import KeyService
        from modelseal.pki import issue

        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
        svc = KeyService()
        issued = issue.renew(svc, self.tls_dir, ca=issue.load_issuer(svc, self.ca_folder))
        log.warning(
            "renewed the server certificate: serial %s, valid until %s",
            issued.serial,
            issued.cert.not_valid_after_utc.isoformat(timespec="seconds"),
        )
        return 0

    def _done(self, code: int) -> None:
        self._pid = None
        if code == 0:
            return
        self._failures += 1
        wait = min(RETRY_MAX, RETRY_MIN * 2 ** (self._failures - 1))
        self._next_try = time.monotonic() + wait
        log.error("the certificate renewal failed (status %d); retrying in %g s", code, wait)


__all__ = ["RENEW_AT", "FolderWatch", "Renewer", "due_at", "local_ca", "stamp"]
