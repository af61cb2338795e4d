"""Registry benchmark (issue 12 section 7): ``modelseal serve`` against nginx, on loopback, in one run.

Everything runs on 127.0.0.1 under a fresh MODELSEAL_HOME in a temporary folder: an internal
CA, a server certificate (127.0.0.1) and a client certificate, one sealed artifact of
``--size-mib`` (default 1024) and a 16 MiB one.

- **pull**: the 1 GiB sealed blob fetched with curl (TLS 1.3, client certificate) from
  ``modelseal serve`` and from nginx serving the same file with ``ssl_verify_client on``;
  the ratio is ours / nginx (target >= 0.8). ``modelseal pull`` (client, digest check and
  signature verification included) is reported beside it.
- **push**: the same file uploaded by curl to nginx (WebDAV ``PUT``; nginx does not fsync) and
  to ``modelseal serve`` (one monolithic upload; fsynced, hashed, policy-checked), beside
  ``dd conv=fsync`` (the durable-write floor); and ``modelseal push`` (the client: hashing,
  parallel resumable chunks), MB/s.
- **concurrency**: ``--clients`` (default 50) curl processes at once, each pulling the
  16 MiB artifact: errors, p50 and p99 latency, aggregate MB/s.
- **handshakes**: new mTLS connections per second, ``openssl s_time -new`` against both.
- **rotation**: a ``--rotation-seconds`` (default 60) pull loop while the server
  certificate is re-issued every 10 s (SIGHUP): failed requests (target 0).

Run: ``.venv/bin/python benchmarks/registry.py [--size-mib 1024] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MS = [PY, "-m", "modelseal.cli"]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Bench:
    """The temporary world: a home with a CA, certificate folders and sealed artifacts."""

    def __init__(self, work: Path, size_mib: int) -> None:
        self.work = work
        self.env = dict(os.environ)
        self.env.update(
            MODELSEAL_HOME=str(work / "home"),
            MODELSEAL_PASSPHRASE="bench-passphrase",
            MODELSEAL_SCRYPT_LOG2N="14",
        )
        self.env.pop("MODELSEAL_AGENT_SOCK", None)
        self.ms("init")
        self.ms("key", "create", "bench")
        self.ms("ca", "init", "--trust-domain", "bench.example")
        pins = json.loads(self.ms("ca", "pins", "--json"))
        self.pins = ["--pin", pins["live"], "--pin", pins["backup"]]
        self.server_tls = work / "server-tls"
        self.client_tls = work / "client-tls"
        self.issue_server()
        self.ms("cert", "issue", "bench-client", "--kind", "service", "--env", "prod", "--out", str(self.client_tls))
        self.big = self.sealed("big", size_mib << 20)
        self.small = self.sealed("small", 16 << 20)

    def ms(self, *args: str) -> str:
        out = subprocess.run([*MS, *args], env=self.env, check=True, capture_output=True, text=True)
        return out.stdout

    def client(self, *args: str) -> None:
        """Run the client CLI (``push``, ``pull``) with this world's client TLS folder and pins."""
        subprocess.run([*MS, *args, "--tls-dir", str(self.client_tls), *self.pins], env=self.env, check=True)

    def issue_server(self) -> None:
        self.ms(
            "cert", "issue", "bench-registry", "--kind", "server", "--env", "prod", "--ip", "127.0.0.1",
            "--out", str(self.server_tls), "--force",
        )  # fmt: skip

    def sealed(self, name: str, size: int) -> Path:
        plain = self.work / f"{name}.bin"
        with open(plain, "wb") as f:
            left = size
            while left:
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n
        out = self.work / f"{name}.sealed"
        self.ms("seal", str(plain), str(out), "--key", "bench")
        plain.unlink()
        return out

    def curl_tls(self) -> list[str]:
        t = self.client_tls
        return ["--tlsv1.3", "--cert", str(t / "cert.pem"), "--key", str(t / "key.pem"), "--cacert", str(t / "ca.pem")]

    def curl(self, url: str, *extra: str) -> tuple[int, float, int]:
        """(http code, seconds, bytes) of one GET with curl, body to /dev/null."""
        out = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total} %{size_download}",
             *self.curl_tls(), *extra, url],
            capture_output=True, text=True, env=self.env,
        )  # fmt: skip
        if out.returncode != 0:
            return 0, 0.0, 0
        code, secs, size = out.stdout.split()
        return int(code), float(secs), int(float(size))


@contextmanager
def modelseal_serve(b: Bench, port: int) -> Iterator[subprocess.Popen[bytes]]:
    data = b.work / "registry-data"
    log = open(b.work / "serve.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [*MS, "serve", "--listen", f"127.0.0.1:{port}", "--tls-dir", str(b.server_tls), "--data", str(data)],
        env=b.env, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        wait_port(port, proc)
        yield proc
    finally:
        stop(proc)
        log.close()


NGINX_CONF = """
{user}
worker_processes {workers};
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate {tls}/cert.pem;
        ssl_certificate_key {tls}/key.pem;
        ssl_client_certificate {tls}/ca.pem;
        ssl_verify_client on;
        ssl_verify_depth 3;
        root {root};
        location / {{ }}
        location /up/ {{
            dav_methods PUT;
            client_max_body_size 0;
            client_body_buffer_size 1m;
        }}
    }}
}}
"""


@contextmanager
def nginx(b: Bench, port: int, root: Path) -> Iterator[subprocess.Popen[bytes]]:
    conf = b.work / "nginx.conf"
    # as root, nginx's workers would drop to nobody and could not read the 0600 files
    user = "user root;" if os.geteuid() == 0 else ""
    cores = os.cpu_count() or 1
    text = NGINX_CONF.format(user=user, workers=cores, work=b.work, port=port, tls=b.server_tls, root=root)
    conf.write_text(text)
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-e", str(b.work / "nginx-error.log")])
    try:
        wait_port(port, proc)
        yield proc
    finally:
        stop(proc)


def mbps(size: int, secs: float) -> float:
    return size / secs / 1e6 if secs > 0 else 0.0


def best_pull(b: Bench, url: str, rounds: int) -> float:
    """Best MB/s of ``rounds`` curl GETs of ``url``."""
    best = 0.0
    for _ in range(rounds):
        code, secs, size = b.curl(url)
        if code != 200:
            raise RuntimeError(f"GET {url} answered {code}")
        best = max(best, mbps(size, secs))
    return best


def curl_put(b: Bench, url: str, path: Path, *extra: str) -> tuple[int, float]:
    """(http code, seconds) of one upload of ``path`` with curl (``-T``: PUT, streamed from the file)."""
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", *b.curl_tls(),
         "-H", "Content-Type: application/octet-stream", "-T", str(path), *extra, url],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        print(f"curl PUT {url.split('?')[0]}: {out.stderr.strip()[:300]}", file=sys.stderr)
        return 0, 0.0
    code, secs = out.stdout.split()
    return int(code), float(secs)


def upload_location(b: Bench, port: int, repo: str) -> str:
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-D", "-", *b.curl_tls(), "-X", "POST",
         f"https://127.0.0.1:{port}/v2/{repo}/blobs/uploads/"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    for line in out.stdout.splitlines():
        if line.lower().startswith("location:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError("no Location in the upload answer")


def dd_fsync(src: Path, dst: Path) -> float:
    """Seconds ``dd conv=fsync`` takes to copy ``src``: the durable-write floor of this disk."""
    t = time.perf_counter()
    subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=4M", "conv=fsync", "status=none"], check=True)
    secs = time.perf_counter() - t
    dst.unlink()
    return secs


def manifest_blob(b: Bench, port: int, repo: str, tag: str) -> str:
    out = subprocess.run(
        ["curl", "-sS", *b.curl_tls(), "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
         f"https://127.0.0.1:{port}/v2/{repo}/manifests/{tag}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    layers = json.loads(out.stdout)["layers"]
    return str(layers[0]["digest"])


def handshakes(b: Bench, port: int, seconds: int = 5) -> float:
    """New mTLS connections per second by ``openssl s_time -new``."""
    t = b.client_tls
    out = subprocess.run(
        ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(seconds),
         "-cert", str(t / "cert.pem"), "-key", str(t / "key.pem"), "-CAfile", str(t / "ca.pem"), "-www", "/v2/"],
        capture_output=True, text=True,
    )  # fmt: skip
    # "N connections in T real seconds, B bytes read per connection"
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) > 4 and parts[1] == "connections" and parts[2] == "in" and parts[4] == "real":
            return int(parts[0]) / float(parts[3])
    raise RuntimeError("openssl s_time printed no result: " + out.stdout[-300:] + out.stderr[-300:])


def concurrent(b: Bench, url: str, clients: int) -> dict[str, float]:
    results: list[tuple[int, float, int]] = [(0, 0.0, 0)] * clients

    def one(i: int) -> None:
        results[i] = b.curl(url)

    t = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    ok = [r for r in results if r[0] == 200]
    lat = sorted(r[1] for r in ok) or [0.0]
    return {
        "errors": clients - len(ok),
        "p50_s": statistics.median(lat),
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "aggregate_mbps": mbps(sum(r[2] for r in ok), wall),
    }


def rotation(b: Bench, proc: subprocess.Popen[bytes], url: str, seconds: float) -> dict[str, int]:
    """Pull ``url`` in a loop for ``seconds`` on two threads while the server certificate is re-issued
    and the server is sent SIGHUP every 10 s; count failures."""
    stop_at = time.monotonic() + seconds
    counts = {"requests": 0, "failed": 0, "rotations": 0}
    lock = threading.Lock()

    def loop() -> None:
        while time.monotonic() < stop_at:
            code, _, _ = b.curl(url)
            with lock:
                counts["requests"] += 1
                counts["failed"] += code != 200

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for th in threads:
        th.start()
    while time.monotonic() < stop_at - 1:
        time.sleep(min(10.0, max(0.0, stop_at - time.monotonic() - 1)))
        if time.monotonic() >= stop_at - 1:
            break
        b.issue_server()
        proc.send_signal(signal.SIGHUP)
        counts["rotations"] += 1
    for th in threads:
        th.join()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rotation-seconds", type=float, default=60.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ms-bench-registry-") as tmp:
        work = Path(tmp)
        b = Bench(work, args.size_mib)
        size = b.big.stat().st_size
        report: dict[str, object] = {"artifact_bytes": size, "cores": os.cpu_count()}
        root = work / "www"
        root.mkdir()
        os.link(b.big, root / "big.sealed")
        os.link(b.small, root / "small.sealed")
        nport, mport = free_port(), free_port()
        (root / "up").mkdir()
        floor_s = min(dd_fsync(b.big, work / "dd.out") for _ in range(args.rounds))
        with nginx(b, nport, root):
            ng_put = min(curl_put(b, f"https://127.0.0.1:{nport}/up/big-{i}", b.big)[1] for i in range(args.rounds))
            ng_pull = best_pull(b, f"https://127.0.0.1:{nport}/big.sealed", args.rounds)
            ng_hs = handshakes(b, nport)
            ng_conc = concurrent(b, f"https://127.0.0.1:{nport}/small.sealed", args.clients)
        with modelseal_serve(b, mport) as proc:
            ref = f"127.0.0.1:{mport}/bench/big:v1"
            t = time.perf_counter()
            b.client("push", str(b.big), ref)
            push_s = time.perf_counter() - t
            b.client("push", str(b.small), f"127.0.0.1:{mport}/bench/small:v1")
            with open(b.big, "rb") as f:
                digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
            curl_push = []
            for i in range(args.rounds):  # a new repository each time: the blob is written again
                loc = upload_location(b, mport, f"bench/curl{i}")
                code, secs = curl_put(b, f"https://127.0.0.1:{mport}{loc}?digest={digest}", b.big)
                if code != 201:
                    raise RuntimeError(f"monolithic upload answered {code}")
                curl_push.append(secs)
            big_url = f"https://127.0.0.1:{mport}/v2/bench/big/blobs/{manifest_blob(b, mport, 'bench/big', 'v1')}"
            small_url = f"https://127.0.0.1:{mport}/v2/bench/small/blobs/{manifest_blob(b, mport, 'bench/small', 'v1')}"
            ms_pull = best_pull(b, big_url, args.rounds)
            dst = work / "pulled"
            t = time.perf_counter()
            b.client("pull", ref, str(dst))
            client_pull_s = time.perf_counter() - t
            ms_hs = handshakes(b, mport)
            ms_conc = concurrent(b, small_url, args.clients)
            rot = rotation(b, proc, small_url, args.rotation_seconds)
        report["pull"] = {
            "nginx_mbps": round(ng_pull), "modelseal_mbps": round(ms_pull), "ratio": round(ms_pull / ng_pull, 2),
            "modelseal_pull_cli_mbps": round(mbps(size, client_pull_s)),
        }  # fmt: skip
        report["push"] = {
            "dd_fsync_mbps": round(mbps(size, floor_s)), "nginx_put_mbps": round(mbps(size, ng_put)),
            "modelseal_curl_put_mbps": round(mbps(size, min(curl_push))),
            "ratio_vs_nginx": round(ng_put / min(curl_push), 2),
            "modelseal_push_cli_mbps": round(mbps(size, push_s)),
        }  # fmt: skip
        report["concurrent_16mib"] = {"clients": args.clients, "nginx": ng_conc, "modelseal": ms_conc}
        report["handshakes_per_s"] = {
            "nginx": round(ng_hs), "modelseal": round(ms_hs), "ratio": round(ms_hs / ng_hs, 2),
        }  # fmt: skip
        report["rotation"] = rot
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
