"""OpenBao raft snapshots, and a temporary cluster to restore one into (docs/recovery.md, "OpenBao").

``save_snapshot`` reads ``GET /v1/sys/storage/raft/snapshot`` (a gzip stream: OpenBao's own
format, which the backup seals as a part); ``restore_snapshot`` posts one to
``/v1/sys/storage/raft/snapshot-force``, which replaces the cluster's whole state, keyring
included, even from another cluster. Only the HTTP API is used, with no proxy from the
environment (a proxy would see the token); the token comes from the target's mode-600 token
file, else ``$BAO_TOKEN``/``$VAULT_TOKEN``, and goes in the ``X-Vault-Token`` header only:
never argv, a URL, a log or an error message.

``raft_cluster`` starts a fresh single-node ``bao server`` on integrated (raft) storage under
a folder, on 127.0.0.1 and a free port, initialises it over the API (one key share) and
unseals it; it stops it by PID. ``temporary_bao`` is that cluster with a snapshot
force-restored into it: afterwards the cluster holds the snapshot's keyring, so it is
unsealed with the ORIGINAL cluster's unseal keys, and the original token is the one that
works; the temporary cluster's own init token and keys are forgotten.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.errors import BackupError
from modelseal.recovery.locations import BaoTarget
from modelseal.util.files import read_limited, write_atomic
from modelseal.util.hardening import dies_with_parent
from modelseal.util.home import check_private

MAX_SNAPSHOT = 2 << 30  # the snapshot is held in memory (it is sealed from there)
MAX_TOKEN_FILE = 8192
_TOKEN_ENV = ("BAO_TOKEN", "VAULT_TOKEN")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
START_TIMEOUT = 60.0
SETTLE_SECONDS = 6.0  # OpenBao re-reads its keyring 5 s after applying a snapshot (core's restore path)


def _token(bao: BaoTarget) -> str:
    if bao.token_file is not None:
        check_private(bao.token_file, "the OpenBao token file", BackupError)
        with contextlib.suppress(FileNotFoundError):
            if bao.token_file.stat().st_mode & 0o077:
                raise BackupError(f"the OpenBao token file {bao.token_file} is readable by others: chmod 600 it")
        try:
            raw = read_limited(bao.token_file, MAX_TOKEN_FILE, BackupError, "the OpenBao token file", regular=True)
        except FileNotFoundError:
            raise BackupError(f"the OpenBao token file {bao.token_file} does not exist") from None
        token = raw.decode("utf-8", "replace").strip()
    else:
        token = next((os.environ[n] for n in _TOKEN_ENV if os.environ.get(n)), "")
    if not token or not token.isprintable() or " " in token:
        raise BackupError("no OpenBao token: give a token file (mode 600) or set BAO_TOKEN")
    return token


def _call(
    addr: str,
    method: str,
    path: str,
    *,
    token: str | None,
    body: bytes | None = None,
    limit: int = 1 << 20,
    timeout: float = 60.0,
) -> tuple[int, bytes]:
    """One API request; (status, body). Errors name the request, never the token."""
    # ``addr`` is the operator's http(s) address (``locations._check_addr``) or our own listener.
    req = urllib.request.Request(f"{addr}{path}", data=body, method=method)  # noqa: S310
    if token is not None:
        req.add_header("X-Vault-Token", token)
    if body is not None:
        req.add_header("Content-Type", "application/octet-stream")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            data = resp.read(limit + 1)
            status = int(resp.status)
    except urllib.error.HTTPError as e:
        data, status = e.read(4096), int(e.code)
    except (OSError, ValueError) as e:
        raise BackupError(f"OpenBao at {addr} is unreachable ({type(e).__name__})") from None
    if len(data) > limit:
        raise BackupError(f"OpenBao's answer to {method} {path} is larger than {limit} bytes")
    return status, data


def _ok(addr: str, method: str, path: str, token: str | None, body: bytes | None = None, **kw: Any) -> bytes:
    status, data = _call(addr, method, path, token=token, body=body, **kw)
    if not 200 <= status < 300:
        raise BackupError(f"OpenBao refused {method} {path} (HTTP {status}{_errors(data)})")
    return data


def _errors(data: bytes) -> str:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        errs = json.loads(data).get("errors")
        if errs:
            return ": " + "; ".join(str(e) for e in errs)[:200]
    return ""


def save_snapshot(bao: BaoTarget) -> bytes:
    """The cluster's raft snapshot (GET /v1/sys/storage/raft/snapshot), in memory."""
    data = _ok(bao.addr, "GET", "/v1/sys/storage/raft/snapshot", _token(bao), limit=MAX_SNAPSHOT, timeout=600)
    if not data.startswith(b"\x1f\x8b"):
        raise BackupError("OpenBao's raft snapshot is not a gzip stream: is the cluster on raft storage?")
    return data


def restore_snapshot(bao: BaoTarget, data: bytes) -> None:
    """Replace the cluster's whole state with ``data`` (POST .../snapshot-force)."""
    if not data.startswith(b"\x1f\x8b"):
        raise BackupError("the OpenBao part is not a raft snapshot")
    _ok(bao.addr, "POST", "/v1/sys/storage/raft/snapshot-force", _token(bao), body=data, timeout=600)


# -- a fresh raft cluster ---------------------------------------------------------------


@dataclass
class RaftCluster:
    """A running single-node cluster: where it listens, its root token and unseal keys."""

    addr: str
    root_token: str = field(repr=False)
    unseal_keys: list[str] = field(repr=False)
    pid: int


def bao_binary() -> str:
    candidate = Path(sys.prefix) / "bin" / "bao"
    found = str(candidate) if candidate.exists() else shutil.which("bao")
    if found is None:
        raise BackupError("the bao binary (OpenBao) is not installed")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(addr: str, proc: subprocess.Popen[bytes], ready: set[int], log: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BackupError(f"bao server exited early (see {log})")
        with contextlib.suppress(BackupError):
            status, _ = _call(addr, "GET", "/v1/sys/health", token=None, timeout=2)
            if status in ready:
                return status
        time.sleep(0.2)
    raise BackupError(f"bao server did not become ready at {addr} (see {log})")


def unseal(addr: str, keys: list[str]) -> None:
    """Unseal with ``keys`` until OpenBao says it is unsealed."""
    for k in keys:
        answer = json.loads(_ok(addr, "PUT", "/v1/sys/unseal", None, json.dumps({"key": k}).encode()))
        if not answer.get("sealed", True):
            return
    raise BackupError("OpenBao is still sealed after every unseal key given")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def server_env(workdir: Path) -> dict[str, str]:
    """The whole environment of a ``bao server`` child: ``PATH`` and ``HOME`` only. Never this
    process's own: it holds the keystore passphrase, database and cloud credentials, tokens."""
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(workdir)}


def _spawn(workdir: Path, preexec: Callable[[], None] | None = None) -> tuple[subprocess.Popen[bytes], str, Path]:
    """A fresh single-node ``bao server`` on raft storage under ``workdir`` (127.0.0.1, two free
    ports, no TLS on loopback, the minimal ``server_env``): (process, address, its log)."""
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (workdir / "raft").mkdir(mode=0o700, exist_ok=True)
    port, cport = _free_port(), _free_port()
    conf = workdir / "bao.hcl"
    conf.write_text(
        f'storage "raft" {{\n  path = "{workdir / "raft"}"\n  node_id = "node1"\n  performance_multiplier = 1\n}}\n'
        f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n  cluster_address = "127.0.0.1:{cport}"\n'
        "  tls_disable = true\n}\n"
        f'api_addr = "http://127.0.0.1:{port}"\ncluster_addr = "http://127.0.0.1:{cport}"\n'
        "disable_mlock = true\nui = false\n"
    )
    log = workdir / "bao.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [bao_binary(), "server", f"-config={conf}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=server_env(workdir),
            preexec_fn=preexec,
        )
    return proc, f"http://127.0.0.1:{port}", log


def _initialise(
    addr: str, proc: subprocess.Popen[bytes], log: Path, shares: int, threshold: int
) -> tuple[str, list[str]]:
    """Init the node just spawned, unseal it and wait until it leads: (root token, unseal keys)."""
    _wait(addr, proc, {501}, log)  # up, not initialised
    body = json.dumps({"secret_shares": shares, "secret_threshold": threshold}).encode()
    init = json.loads(_ok(addr, "PUT", "/v1/sys/init", None, body))
    keys = [str(k) for k in init["keys"]]
    unseal(addr, keys[:threshold])
    _wait(addr, proc, {200}, log)  # the raft leader, active
    return str(init["root_token"]), keys


@contextmanager
def raft_cluster(workdir: Path, *, shares: int = 1, threshold: int = 1) -> Iterator[RaftCluster]:
    """A fresh ``bao server`` on raft storage under ``workdir`` (module docstring)."""
    proc, addr, log = _spawn(workdir)
    try:
        root, keys = _initialise(addr, proc, log, shares, threshold)
        yield RaftCluster(addr, root, keys, proc.pid)
    finally:
        _stop(proc)


def wait_active(addr: str, timeout: float = START_TIMEOUT) -> None:
    """Until the node answers health 200 (unsealed and active)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(BackupError):
            if _call(addr, "GET", "/v1/sys/health", token=None, timeout=2)[0] == 200:
                return
        time.sleep(0.2)
    raise BackupError(f"OpenBao at {addr} did not become active")


def settle(addr: str, timeout: float = START_TIMEOUT) -> str:
    """After a restore: "active" once the node is unsealed, active and past the restore's
    invalidation (OpenBao re-reads its keyring a few seconds after applying a snapshot),
    or "sealed" when that keyring is another cluster's and the node sealed itself."""
    deadline = time.monotonic() + timeout
    active_since: float | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(BackupError, ValueError):
            status, body = _call(addr, "GET", "/v1/sys/seal-status", token=None, timeout=2)
            if status == 200 and json.loads(body).get("sealed") is True:
                return "sealed"
            health = _call(addr, "GET", "/v1/sys/health", token=None, timeout=2)[0]
            if health != 200:
                active_since = None
            elif active_since is None:
                active_since = time.monotonic()
            elif time.monotonic() - active_since > SETTLE_SECONDS:
                return "active"
        time.sleep(0.2)
    raise BackupError(f"OpenBao at {addr} did not settle after the restore")


def _wait_sealed(addr: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(BackupError, ValueError):
            status, body = _call(addr, "GET", "/v1/sys/seal-status", token=None, timeout=2)
            if status == 200 and json.loads(body).get("sealed") is True:
                return
        time.sleep(0.2)
    raise BackupError(f"OpenBao at {addr} did not take the snapshot's keyring")


PIDFILE = "bao.pid"  # temporary_bao's server, for the next drill to stop if this one was killed


@contextmanager
def _own_server(workdir: Path) -> Iterator[tuple[str, str]]:
    """``raft_cluster``'s fresh node for ``temporary_bao`` (address, its init root token, held
    in memory only), whose server dies with this thread and whose PID is in ``PIDFILE``."""
    proc, addr, log = _spawn(workdir, dies_with_parent())  # one thread; prctl looked up before the fork
    try:
        write_atomic(workdir / PIDFILE, f"{proc.pid}\n".encode(), mode=0o600)
        yield addr, _initialise(addr, proc, log, 1, 1)[0]
    finally:
        _stop(proc)
        with contextlib.suppress(FileNotFoundError):
            (workdir / PIDFILE).unlink()


@contextmanager
def temporary_bao(workdir: Path, snapshot: bytes, unseal_keys: list[str], token: str) -> Iterator[BaoTarget]:
    """A fresh raft cluster under ``workdir`` holding ``snapshot``, unsealed with the original
    cluster's ``unseal_keys``. The original ``token`` is checked there and stays in memory:
    the target has no token file (its users send the token in the ``X-Vault-Token`` header,
    from ``BAO_TOKEN`` in this process's environment). The server dies with this thread
    (``util.hardening.dies_with_parent``) and leaves its PID in ``workdir/bao.pid``, for the
    next drill to stop if this one was killed (``recovery.drillwork``)."""
    if not snapshot.startswith(b"\x1f\x8b"):
        raise BackupError("the OpenBao part is not a raft snapshot")
    with _own_server(workdir) as (addr, root_token):
        _ok(addr, "POST", "/v1/sys/storage/raft/snapshot-force", root_token, body=snapshot, timeout=600)
        # OpenBao applies the snapshot, then (seconds later) finds its keyring replaced
        # and seals itself: wait for that, then unseal with the original cluster's keys.
        _wait_sealed(addr)
        unseal(addr, unseal_keys)
        wait_active(addr)
        status, _ = _call(addr, "GET", "/v1/auth/token/lookup-self", token=token)
        if status != 200:
            raise BackupError(f"the OpenBao token given does not work in the restored cluster (HTTP {status})")
        yield BaoTarget(addr, None)


__all__ = [
    "PIDFILE",
    "RaftCluster",
    "bao_binary",
    "raft_cluster",
    "restore_snapshot",
    "save_snapshot",
    "server_env",
    "settle",
    "temporary_bao",
    "unseal",
]
