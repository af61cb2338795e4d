"""Shared pieces of the registry client tests (test_push_pull, test_registry_client): a CA
with server and client folders, Debian's ``docker-registry`` (CNCF distribution 2.8) behind
mutual TLS on 127.0.0.1, ``modelseal serve``, and a TCP relay that cuts a connection after a
number of bytes (a real network fault). Every process is started on 127.0.0.1 and stopped by
its PID. ``modelseal serve`` decides every registry request by Cedar, default deny: the
servers started here get bindings first (``bind_all``: reader and publisher for every
service identity of the environment, through the real ``GovStore``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from modelseal.cli.serve import default_data
from modelseal.governance.cedar import default_policy
from modelseal.governance.model import Binding
from modelseal.governance.store import GovStore, open_target
from modelseal.governance.versions import PolicyStore
from modelseal.pki import ca as pki_ca
from modelseal.pki import issue, pins
from modelseal.pki.identity import Identity
from modelseal.registry.reference import Endpoint
from modelseal.registry.tlsclient import client_context
from modelseal.registry.transport import Transport
from tests.conftest import Env
from tests.services import free_port

TD = "example.org"
DOCKER_REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


@dataclass
class Pki:
    ca: pki_ca.CA
    server_dir: Path
    client_dir: Path

    def pins(self) -> list[str]:
        """The pins a client is configured with: the live intermediate and the backup key."""
        return [pins.pin_of(self.ca.issuing), pins.pin_of_key(self.ca.next_public)]


def issue_dir(env: Env, folder: Path, kind: str, name: str, ca: pki_ca.CA | None = None, **kw: object) -> Path:
    issued = issue.issue(env.svc, Identity.of(TD, "prod", kind, name), ca=ca, **kw)  # type: ignore[arg-type]
    issue.write_dir(issued, folder, force=True)
    return folder


def make_pki(env: Env) -> Pki:
    ca = pki_ca.init_ca(env.svc, TD)
    server = issue_dir(env, env.work / "server-tls", "server", "registry", ips=["127.0.0.1"])
    client = issue_dir(env, env.work / "client-tls", "service", "trainer")
    return Pki(ca, server, client)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_tls(port: int, client_dir: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    ctx = client_context(client_dir)
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=2)
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


@contextmanager
def docker_registry(work: Path, tls_dir: Path, client_dir: Path) -> Iterator[int]:
    """``docker-registry`` on 127.0.0.1 requiring a client certificate of the CA in ``tls_dir/ca.pem``."""
    port = free_port()
    root = work / "dr-storage"
    root.mkdir(exist_ok=True)
    cfg = work / "dr-config.yml"
    cfg.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  tls:\n"
        f"    certificate: {tls_dir / 'cert.pem'}\n    key: {tls_dir / 'key.pem'}\n"
        f"    clientcas:\n      - {tls_dir / 'ca.pem'}\n    minimumtls: tls1.3\n"
    )
    log_path = work / "dr.log"
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen([DOCKER_REGISTRY, "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_tls(port, client_dir, proc, log_path)
        yield port
    finally:
        stop(proc)
        log.close()


# The registry tests seal to the keystore's local: test key, which the prod standard refuses
# at push and pull: the test servers run the shipped policy plus this one exception (as an operator would).
LOCAL_KEYS_EXCEPTION = """
@id("tests-local-keys")
@exception("tests-local-keys")
@waives("std-prod-kms")
@justification("the registry tests seal to the local test key of their keystore")
@owner("tests@example.org")
@approved_by("tests@example.org")
@expires("2099-01-01T00:00:00Z")
permit (principal, action in [Action::"artifact.push", Action::"artifact.pull"], resource is Artifact);
"""


def bind_all(
    data: Path, db: str | None = None, env: str = "prod", roles: tuple[str, ...] = ("reader", "publisher")
) -> None:
    """Bind ``roles`` to every service identity ``spiffe://TD/ENV/service/*`` (users stay free
    for other roles: a key-admin never meets them) in the governance database of a
    server with ``--data data`` (and ``--db db``), unless bound already, and activate the
    shipped policy with ``LOCAL_KEYS_EXCEPTION`` (both written as the approval flow would)."""
    target = open_target(data, db)
    store = GovStore.open(target)
    try:
        pattern = f"spiffe://{TD}/{env}/service/*"
        have = {(b.pattern, b.role, b.env) for b in store.bindings()}
        for role in roles:
            if (pattern, role, env) not in have:
                store.bind(Binding("", pattern, role, env, time.time() + 300 * 86400), by="tests")
    finally:
        store.close()
    policies = PolicyStore.open(target)
    try:
        version = policies.propose(default_policy().text + LOCAL_KEYS_EXCEPTION, "tests", "registry tests")
        if policies.active_digest() != version.digest:
            policies.activate(version.digest, "tests", ["officer-a", "officer-b"])
    finally:
        policies.close()


def _flag(args: tuple[str, ...], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@contextmanager
def modelseal_serve(work: Path, tls_dir: Path, client_dir: Path, *args: str) -> Iterator[int]:
    """``modelseal serve`` on 127.0.0.1 (a subprocess, stopped by PID), its environment's
    identities bound as readers and publishers (``bind_all``)."""
    data = _flag(args, "--data")
    bind_all(Path(data) if data else default_data(), _flag(args, "--db"), _flag(args, "--env") or "prod")
    port = free_port()
    log_path = work / "serve.log"
    log = open(log_path, "wb")  # noqa: SIM115
    cmd = [sys.executable, "-m", "modelseal.cli", "serve", "--listen", f"127.0.0.1:{port}", "--tls-dir", str(tls_dir)]
    proc = subprocess.Popen([*cmd, *args], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        wait_tls(port, client_dir, proc, log_path)
        yield port
    finally:
        stop(proc)
        log.close()


def transport(p: Pki, port: int, **kw: object) -> Transport:
    return Transport([Endpoint("127.0.0.1", port)], p.client_dir, p.pins(), **kw)  # type: ignore[arg-type]


class CuttingRelay:
    """A TCP relay to 127.0.0.1:``target`` that passes the TLS bytes through untouched and
    closes a connection once ``cut_after`` bytes went in ``direction`` (``"down"``: server to
    client, ``"up"``: client to server). Only the first ``cuts`` connections are armed."""

    def __init__(self, target: int, cut_after: int, direction: str = "down", cuts: int = 1) -> None:
        self.target, self.cut_after, self.direction, self.cuts = target, cut_after, direction, cuts
        self.cut = 0
        self._armed = 0
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._srv.getsockname()[1])
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self._srv.accept()
            except OSError:
                return
            s = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                armed = self._armed < self.cuts
                self._armed += armed
            state = {"armed": int(armed), "n": 0}
            threading.Thread(target=self._pump, args=(s, c, "down", state), daemon=True).start()
            threading.Thread(target=self._pump, args=(c, s, "up", state), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str, state: dict[str, int]) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if way == self.direction and state["armed"]:
                    room = self.cut_after - state["n"]
                    if len(data) >= room:
                        dst.sendall(data[: max(room, 0)])
                        with self._lock:
                            self.cut += 1
                        break
                    state["n"] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._srv.close()


@contextmanager
def app_in_thread(start: Callable[[], Awaitable[tuple[web.AppRunner, Any]]]) -> Iterator[Any]:
    """An aiohttp application served from a thread of this process, on its own event loop:
    ``start`` sets it up and starts its site, and returns the runner and what the test gets
    (the test can reach the server's objects directly). Cleaned up on exit."""
    loop, ready, box = asyncio.new_event_loop(), threading.Event(), {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["runner"], box["value"] = loop.run_until_complete(start())
        except BaseException as e:
            box["error"] = e
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(30) and "error" not in box, box.get("error")
    try:
        yield box["value"]
    finally:
        asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
