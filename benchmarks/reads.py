"""The read patterns ordinary code uses, sealed against plaintext, in one run (issue 11's baseline).

    python benchmarks/reads.py [--size-mib 512] [--rounds 3]

One random file, sealed once; both page-cached. For each pattern: the plaintext file
read the same way (the reference), then the sealed one through ``modelseal.open`` (or
``sealed::`` for the fsspec rows); best of ROUNDS each. Prints GB/s and the ratio
sealed/plain, which issue 11 wants at 0.7x or better for every pattern, and the
median of random 1 MiB ``pread`` calls (target: under 1 ms).
Figures, not pass/fail: docs/benchmarks.md has the latest.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

sys.path.insert(0, str(Path(__file__).parent))
from floors import CORES, ciphertext_chunks, on_every_core

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.keys import keystore
from modelseal.keys.service import KeyService

GB = 1e9
MIB = 1 << 20


def readinto_loop(f: BinaryIO, size: int) -> None:
    buf = bytearray(size)
    while f.readinto(buf):  # type: ignore[attr-defined]
        pass


def read_loop(f: BinaryIO, size: int) -> None:
    while f.read(size):
        pass


class _Sink(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return len(b)


PATTERNS: list[tuple[str, Callable[[BinaryIO], None]]] = [
    ("readinto, 64 KiB buffer", lambda f: readinto_loop(f, 64 << 10)),
    ("readinto, 1 MiB buffer", lambda f: readinto_loop(f, MIB)),
    ("readinto, 8 MiB buffer", lambda f: readinto_loop(f, 8 * MIB)),
    ("read(1 MiB) loop", lambda f: read_loop(f, MIB)),
    ("read(8 MiB) loop", lambda f: read_loop(f, 8 * MIB)),
    ("shutil.copyfileobj", lambda f: shutil.copyfileobj(f, _Sink())),
    ("io.BufferedReader, 16 KiB reads", lambda f: read_loop(io.BufferedReader(f), 16 << 10)),  # type: ignore[arg-type]
]


def aes_floor(cipher: Any, cts: list[memoryview], rounds: int) -> float:
    """AES-256-GCM decryption of this artifact's chunks ``cts`` on every core, the ciphertext
    already in memory and the output a reused per-thread buffer: the compute ceiling of any
    sealed read, with no file read and no copy to the caller. Best of ``rounds`` (seconds)."""
    layout = cipher.layout

    def work(k: int) -> None:
        out = memoryview(bytearray(layout.chunk_size))
        for i in range(k, layout.count, CORES):
            cipher.decrypt_chunk(i, cts[i], out[: layout.plain_len(i)])

    return min(on_every_core(work) for _ in range(rounds))


def aes_floor_chunks(cipher: Any, cts: list[memoryview], n: int, reps: int) -> float:
    """Median seconds to decrypt ``n`` consecutive chunks at a random place of this artifact
    (the whole ciphertext in memory, so the chunks are as cold as a random read finds them),
    split across every core: the floor of one random read spanning them."""
    layout = cipher.layout
    outs = [memoryview(bytearray(layout.chunk_size)) for _ in range(n)]
    with ThreadPoolExecutor(CORES) as pool:
        times = []
        for _ in range(reps):
            first = random.randrange(0, layout.count - n)  # a benchmark offset, not a secret
            t = time.perf_counter()
            futures = [
                pool.submit(cipher.decrypt_chunk, first + k, cts[first + k], outs[k][: layout.plain_len(first + k)])
                for k in range(1, n)
            ]
            cipher.decrypt_chunk(first, cts[first], outs[0][: layout.plain_len(first)])
            for fut in futures:
                fut.result()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def best_of(rounds: int, fn: Callable[[], None]) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="work folder (default: a temp folder under /tmp)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelseal-reads-", dir=args.dir))
    try:
        home = work / "home"
        os.environ["MODELSEAL_HOME"] = str(home)
        keystore.create(keystore.keystore_path(home), b"bench", scrypt_log2_n=14)
        os.environ["MODELSEAL_PASSPHRASE"] = "bench"
        svc = KeyService(sink=MemorySink())
        svc.create("bench")
        plain = work / "data.bin"
        with open(plain, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        sealed = work / "data.sealed"
        modelseal.seal(plain, sealed, "bench", keys=svc)
        print(f"cores: {os.cpu_count()}  file: {args.size_mib} MiB (page-cached)")
        report(work, plain, sealed, svc, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(work: Path, plain: Path, sealed: Path, svc: KeyService, rounds: int) -> None:
    """Every read pattern on ``sealed`` against the same on ``plain`` (its plaintext), plus the
    AES floor and random preads; also called by throughput.py on its own file."""
    size = plain.stat().st_size
    size_mib = size // MIB
    print(f"{'pattern':36} {'plain':>10} {'sealed':>10} {'ratio':>7}")

    def row(name: str, on_plain: Callable[[], None], on_sealed: Callable[[], None]) -> None:
        on_plain()  # warm the page cache and the pool
        tp = best_of(rounds, on_plain)
        ts = best_of(rounds, on_sealed)
        print(f"{name:36} {size / tp / GB:7.2f} GB/s {size / ts / GB:5.2f} GB/s {tp / ts:6.2f}x")

    for name, pattern in PATTERNS:

        def on_plain(p: Callable[[BinaryIO], None] = pattern) -> None:
            with open(plain, "rb", buffering=0) as f:
                p(f)

        def on_sealed(p: Callable[[BinaryIO], None] = pattern) -> None:
            with modelseal.open(sealed, keys=svc, verify=False) as r:
                p(r)  # type: ignore[arg-type]

        row(name, on_plain, on_sealed)
    try:
        import fsspec
    except ImportError:
        print("fsspec: not installed - sealed:: rows skipped")
    else:

        def fs_plain() -> None:
            with fsspec.open(f"file://{plain}", "rb") as f:
                read_loop(f, MIB)

        def fs_sealed() -> None:
            with fsspec.open(f"sealed::file://{sealed}", "rb", sealed={"keys": svc}) as f:
                read_loop(f, MIB)

        row("fsspec, default block size", fs_plain, fs_sealed)
    try:
        import pandas as pd
    except ImportError:
        print("pandas: not installed - read_csv row skipped")
    else:
        csv = work / "table.csv"
        rows = max(1, size_mib // 8) * 100_000  # about a sixteenth of the file size
        with open(csv, "w") as f:
            rng = random.Random(0)  # a benchmark table, not a secret
            f.write("a,b,c,d\n")
            for k in range(rows):
                f.write(f"{k},{rng.random():.6f},{rng.randrange(10**6)},x{k % 97}\n")
        csv_sealed = work / "table.csv.sealed"
        modelseal.seal(csv, csv_sealed, "bench", keys=svc)
        csv_size = csv.stat().st_size
        opts = {"sealed": {"keys": svc}}
        pd.read_csv(csv)
        tp = best_of(rounds, lambda: pd.read_csv(csv))
        ts = best_of(rounds, lambda: pd.read_csv(f"sealed::file://{csv_sealed}", storage_options=opts))
        name = f"pandas.read_csv ({csv_size / MIB:.0f} MiB CSV)"
        print(f"{name:36} {csv_size / tp / GB:7.2f} GB/s {csv_size / ts / GB:5.2f} GB/s {tp / ts:6.2f}x")
    with modelseal.open(sealed, keys=svc, verify=False) as r:
        cipher = r._cipher  # the benchmark borrows the reader's chunk cipher: same key, same layout
        cts = ciphertext_chunks(sealed, cipher.layout)  # read once, for both floors
        t_floor = aes_floor(cipher, cts, rounds)
        two = aes_floor_chunks(cipher, cts, 2, 200)
    del cts
    print(
        f"{'floor: AES-GCM on all cores':36} {size / t_floor / GB:18.2f} GB/s"
        f"   (no read can beat it; ceiling of the ratio here: see docs/benchmarks.md)"
    )
    with modelseal.open(sealed, keys=svc, verify=False) as r:
        times = []
        for _ in range(200):
            off = random.randrange(0, size - MIB)  # a benchmark offset, not a secret
            t = time.perf_counter()
            r.pread(off, MIB)
            times.append(time.perf_counter() - t)
    print(f"{'1 MiB pread at random offsets':36} median {statistics.median(times) * 1e3:.2f} ms")
    # A 1 MiB read at a random offset spans two 1 MiB chunks, and GCM authenticates whole
    # chunks: its floor is decrypting two chunks (ciphertext in memory) on all cores.
    print(f"{'  floor: two chunks on all cores':36} median {two * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
