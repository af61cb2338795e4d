"""The key broker against a direct Transit client of the same key, measured in one run.

    python benchmarks/broker.py [--artifacts 10000] [--quick]

A real OpenBao dev server and a real ``modelseal serve`` (one worker, its governance
database with the client's bindings, its audit log on the data disk) on 127.0.0.1. The
broker key ``bench`` is a static catalog entry backed by ``transit:transit/bench-kek``, the
key the direct client uses, so both paths unwrap the same wraps with the same key.

Reports (figures, not pass/fail; docs/benchmarks.md):
- unwrap of one data key: direct ``TransitProvider.unwrap`` vs ``BrokerProvider.unwrap``
  (mutual TLS, Cedar decision, two audit events, Transit), median and p95, with the target
  "at most 1.2x + 0.5 ms" and the server's share that is its audit log (an fsync per event);
- a batched unwrap of 1,000 keys: Transit's ``unwrap_many`` vs the broker's (2 requests);
- ``rotate`` of N small artifacts through the broker vs directly with Transit (batches);
- the two unwrap figures again with the server's audit log on tmpfs (``MODELSEAL_AUDIT_URL``),
  which is what the broker itself costs without its audit log's fsyncs.
``--quick`` is a small run (200 artifacts, fewer samples).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.push_pull_helpers import stop, wait_tls
from tests.services import free_port, openbao_dev

import modelseal
from modelseal.audit.events import AuditEvent, MemorySink
from modelseal.audit.log import MerkleAuditLog
from modelseal.format.header import normalize_context
from modelseal.governance import brokerops
from modelseal.governance.model import Binding
from modelseal.governance.store import GovStore, open_target
from modelseal.keys import keystore
from modelseal.keys.config import Config
from modelseal.keys.providers.transit import TransitProvider
from modelseal.keys.service import KeyService
from modelseal.pki import ca as pki_ca
from modelseal.pki import issue, pins
from modelseal.pki.identity import Identity
from modelseal.recipes.rotation import rotate
from modelseal.registry.apiclient import ApiClient
from modelseal.registry.broker import BrokerProvider

TD = "example.org"
SERVE = [sys.executable, "-m", "modelseal.cli", "serve"]
CTX = normalize_context({"env": "prod", "model": "bench"})
DOCS_DIRECT_ROTATION = 524.0  # artifacts/s, docs/benchmarks.md "Keys" (Transit, batches of 100)


def latency(fn: Callable[[], object], n: int) -> tuple[float, float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times) * 1e3, times[int(len(times) * 0.95)] * 1e3


def verdict(broker: float, direct: float) -> str:
    target = 1.2 * direct + 0.5
    return f"{broker / direct:5.2f}x; target <= {target:.2f} ms: {'met' if broker <= target else 'NOT met'}"


def setup(work: Path) -> tuple[Path, Path, list[str], Path]:
    """Keystore, CA, certificates and bindings; returns (server dir, client dir, pins, data)."""
    home, data = work / "home", work / "data"
    keystore.create(keystore.keystore_path(home), b"benchmark", scrypt_log2_n=14)
    (home / "config.toml").write_text('[broker.keys.bench]\nkey = "transit:transit/bench-kek"\nenv = "prod"\n')
    os.chmod(home / "config.toml", 0o600)
    svc = KeyService(sink=MemorySink())
    ca = pki_ca.init_ca(svc, TD)
    folders = {}
    for kind, name, kw in (("server", "broker", {"ips": ["127.0.0.1"]}), ("service", "bench", {})):
        issued = issue.issue(svc, Identity.of(TD, "prod", kind, name), **kw)  # type: ignore[arg-type]
        issue.write_dir(issued, work / f"tls-{name}", force=True)
        folders[kind] = work / f"tls-{name}"
    store = GovStore.open(open_target(data, None))
    for role in ("reader", "publisher"):
        store.bind(
            Binding("", Identity.of(TD, "prod", "service", "bench").uri, role, "prod", time.time() + 86400), "bench"
        )
    store.close()
    return folders["server"], folders["service"], [pins.pin_of(ca.issuing), pins.pin_of_key(ca.next_public)], data


def seal_many(folder: Path, n: int, key: str, svc: KeyService) -> None:
    folder.mkdir()
    src = folder.parent / "small.bin"
    src.write_bytes(os.urandom(4096))
    for i in range(n):
        modelseal.seal(src, folder / f"a{i:05d}.sealed", key=key, context=dict(CTX), keys=svc)


@contextlib.contextmanager
def serving(server_dir: Path, client_dir: Path, data: Path, log_path: Path, audit: str | None) -> Iterator[int]:
    """``modelseal serve`` (one worker); ``audit``: its audit log elsewhere than the data disk."""
    port = free_port()
    cmd = [*SERVE, "--listen", f"127.0.0.1:{port}", "--tls-dir", str(server_dir), "--data", str(data)]
    env = {**os.environ, **({"MODELSEAL_AUDIT_URL": audit} if audit else {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*cmd, "--workers", "1", "--renew", "watch"], stdout=log, stderr=log, env=env)
    try:
        wait_tls(port, client_dir, proc, log_path)
        yield port
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help="200 artifacts and fewer samples")
    args = ap.parse_args()
    n, samples = (200, 100) if args.quick else (args.artifacts, 300)
    work = Path(tempfile.mkdtemp(prefix="msbroker-"))
    shm = Path(tempfile.mkdtemp(prefix="msbroker-", dir="/dev/shm")) if Path("/dev/shm").is_dir() else None
    os.environ.update(MODELSEAL_HOME=str(work / "home"), MODELSEAL_PASSPHRASE="benchmark")
    try:
        server_dir, client_dir, pin_list, data = setup(work)
        with openbao_dev(work) as (addr, token):
            os.environ.update(BAO_ADDR=addr, BAO_TOKEN=token)
            transit = TransitProvider()
            transit.create("bench-kek")
            print(f"cores: {os.cpu_count()}; the same Transit key both ways (broker:bench = transit:transit/bench-kek)")
            with serving(server_dir, client_dir, data, work / "serve.log", None) as port:
                broker = client(port, client_dir, pin_list)
                print("server audit log on the data disk (as deployed):")
                latencies(transit, broker, samples)
                probe = MerkleAuditLog(work / "audit-probe.db")
                a_med, _ = latency(lambda: probe.emit(AuditEvent("unwrap", "transit:transit/k", "ok", 1)), 50)
                print(
                    f"  one audit event on this disk (Merkle log append, fsynced): {a_med:.2f} ms; a request writes two"
                )
                rotation(work, transit, broker, n)
            if shm is not None:
                with serving(server_dir, client_dir, data, work / "serve-shm.log", str(shm / "audit.db")) as port:
                    print("server audit log on tmpfs (the broker's own cost, without its audit log's fsyncs):")
                    latencies(transit, client(port, client_dir, pin_list), samples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)


def client(port: int, folder: Path, pin_list: list[str]) -> BrokerProvider:
    server = f"127.0.0.1:{port}"
    return BrokerProvider(client_factory=lambda: ApiClient.from_settings(server, tls_dir=folder, pins=pin_list))


def latencies(transit: TransitProvider, broker: BrokerProvider, samples: int) -> None:
    inner = transit.wrap("transit/bench-kek", os.urandom(32), CTX)
    outer = brokerops.outer("bench", inner)
    broker.unwrap(outer, CTX)  # connection and caches warm on both sides
    d_med, d_p95 = latency(lambda: transit.unwrap(inner, CTX), samples)
    b_med, b_p95 = latency(lambda: broker.unwrap(outer, CTX), samples)
    print(f"  unwrap one key   direct transit: median {d_med:6.2f} ms  p95 {d_p95:6.2f} ms")
    print(f"                   broker:         median {b_med:6.2f} ms  p95 {b_p95:6.2f} ms  ({verdict(b_med, d_med)})")
    inners = [transit.wrap("transit/bench-kek", os.urandom(32), CTX) for _ in range(1000)]
    outers = [brokerops.outer("bench", r) for r in inners]
    d_med, _ = latency(lambda: transit.unwrap_many(inners, CTX), 5)
    b_med, _ = latency(lambda: broker.unwrap_many(outers, CTX), 5)
    print(f"  unwrap 1000 keys direct transit: {d_med:7.1f} ms = {1000 / d_med * 1e3:7.0f} keys/s")
    rate = 1000 / b_med * 1e3
    print(f"                   broker:         {b_med:7.1f} ms = {rate:7.0f} keys/s  ({verdict(b_med, d_med)})")


def rotation(work: Path, transit: TransitProvider, broker: BrokerProvider, n: int) -> None:
    ways = {"broker": ("broker:bench", {"broker": broker}), "direct": ("transit:bench-kek", {"transit": transit})}
    for label, (key, providers) in ways.items():
        seal_many(work / label, n, key, KeyService(sink=MemorySink(), providers=providers, config=Config()))
    transit.rotate("bench-kek")
    figures = {}
    for label, (key, providers) in ways.items():
        cold = KeyService(sink=MemorySink(), providers=providers, config=Config())  # no cached DEKs
        t = time.perf_counter()
        report = rotate(key, [work / label], keys=cold)
        dt = time.perf_counter() - t
        assert len(report.rewrapped) == n and not report.failed, report.failed[:3]
        figures[label] = n / dt
        print(f"  rotate + rewrap {n} artifacts, {label:6}: {dt:6.1f} s = {n / dt:6.0f} artifacts/s")
    print(
        f"  broker / direct rotation (this run): {figures['broker'] / figures['direct']:.2f}x;"
        f" broker / docs figure ({DOCS_DIRECT_ROTATION:.0f}/s): {figures['broker'] / DOCS_DIRECT_ROTATION:.2f}x"
    )


if __name__ == "__main__":
    main()
