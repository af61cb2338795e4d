"""Shared helpers of the registry tests: a real ``modelseal serve`` subprocess with mTLS, a
small HTTP client over it, and OCI test content (sealed files, manifests)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from modelseal.pki import ca as pki_ca
from modelseal.pki import issue
from modelseal.pki.identity import Identity
from modelseal.server import tls
from tests.conftest import Env
from tests.push_pull_helpers import bind_all
from tests.services import free_port

TD = "example.org"
SERVE = [sys.executable, "-m", "modelseal.cli", "serve"]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
SEALED_LAYER = "application/vnd.modelseal.sealed.v1"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_dir(env: Env, folder: Path, kind: str, name: str, envname: str = "prod", **kw: object) -> Path:
    issued = issue.issue(env.svc, Identity.of(TD, envname, kind, name), **kw)  # type: ignore[arg-type]
    issue.write_dir(issued, folder, force=True)
    return folder


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> object:
        return json.loads(self.body)

    def code(self) -> str:
        doc = json.loads(self.body)
        assert isinstance(doc, dict)
        return str(doc["errors"][0]["code"])


class Client:
    """HTTPS with the test client's certificate, one keep-alive connection, re-opened on need."""

    def __init__(self, ctx: ssl.SSLContext, port: int) -> None:
        self.ctx, self.port = ctx, port
        self.conn: http.client.HTTPSConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Resp:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=60)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.close()
                return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 2:
                    raise
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def push_blob(self, repo: str, data: bytes) -> str:
        d = sha(data)
        r = self.request("POST", f"/v2/{repo}/blobs/uploads/")
        assert r.status == 202, r.body
        loc = r.header("Location")
        assert loc is not None and loc.startswith("/v2/")
        r = self.request("PUT", f"{loc}?digest={d}", data, {"Content-Type": "application/octet-stream"})
        assert r.status == 201, r.body
        return d

    def put_manifest(self, repo: str, ref: str, doc: dict[str, object], media: str = MANIFEST) -> Resp:
        return self.request("PUT", f"/v2/{repo}/manifests/{ref}", json.dumps(doc).encode(), {"Content-Type": media})


def image(config: str, layers: list[tuple[str, str, int]], **extra: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": EMPTY, "digest": config, "size": 2},
        "layers": [{"mediaType": m, "digest": d, "size": s} for m, d, s in layers],
    }
    doc.update(extra)
    return doc


@dataclass
class Server:
    port: int
    data: Path
    proc: subprocess.Popen[bytes]
    env: Env
    log: Path
    client_dir: Path
    args: list[str]

    def client(self) -> Client:
        return Client(tls.client_context(self.client_dir), self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def start(self) -> None:
        """(Re)start the server process on the same port, data and flags."""
        out = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        probe = self.client()
        deadline = time.monotonic() + 30
        last = ""
        while True:
            try:
                if probe.request("GET", "/v2/").status == 200:
                    break
            except (OSError, ssl.SSLError, http.client.HTTPException) as e:
                last = repr(e)
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log.read_text()[-3000:] + last
            time.sleep(0.2)
        probe.close()


@contextmanager
def running_server(env: Env, *flags: str, data: Path | None = None) -> Iterator[Server]:
    if not (env.home / "ca").exists():
        pki_ca.init_ca(env.svc, TD)
    tls_dir = make_dir(env, env.work / "server-tls", "server", "registry", ips=["127.0.0.1"])
    client_dir = make_dir(env, env.work / "client-tls", "service", "trainer")
    port = free_port()
    data = data or env.work / "data"
    args = [*SERVE, "--listen", f"127.0.0.1:{port}", "--tls-dir", str(tls_dir), "--data", str(data), *flags]
    server = Server(port, data, None, env, env.work / "serve.log", client_dir, args)  # type: ignore[arg-type]
    db = flags[flags.index("--db") + 1] if "--db" in flags else None
    bind_all(data, db)  # every request is decided by Cedar, default deny
    server.start()
    try:
        yield server
    finally:
        server.stop()
