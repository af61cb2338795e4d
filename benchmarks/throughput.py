"""Throughput of the sealed format against plain reads and age, measured in one run.

    python benchmarks/throughput.py [--size-mib 1024] [--rss-gib 4] [--writes-rounds 3] [--writes-only] [--reads]

Prints GB/s and ratios against (a) reading the plaintext file with readinto
and (b) age 1.x doing the same work, all on page-cached files in one run.
Peak RSS of a seal is measured in a child process on a --rss-gib file.

The writes section (issue 11) seals the file and a folder of 4 equal shards through
the CLI (a subprocess: interpreter start and scrypt included) and through the API
(no scrypt), each timed right after its own `dd bs=16M conv=fsync` of the 1 GiB
file to the same disk: the ratio is that pair's, the figure the median over
--writes-rounds rounds. --compare-writes adds the paths not chosen (O_DIRECT output,
one folder file at a time).
--reads adds every read pattern of issue 11 (benchmarks/reads.py), each against the
same pattern on the plaintext file and against the AES floor, on the same file.
Figures, not pass/fail: see docs/benchmarks.md for the latest.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import reads

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.keys import keystore
from modelseal.keys.providers.local import LocalProvider
from modelseal.keys.service import KeyService

GB = 1e9
MIB = 1 << 20


def best_of(n: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def make_file(path: Path, size: int) -> None:
    block = os.urandom(16 * MIB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def plain_readinto(path: Path, buf: bytearray) -> None:
    with open(path, "rb", buffering=0) as f:
        view = memoryview(buf)
        while view:
            n = f.readinto(view)
            if not n:
                break
            view = view[n:]


def child_seal_rss(src: Path, dst: Path, home: Path) -> int:
    code = (
        "import modelseal, sys\n"
        "from modelseal.keys.service import KeyService\n"
        "from modelseal.audit.events import MemorySink\n"
        "modelseal.seal(sys.argv[1], sys.argv[2], key='bench', keys=KeyService(sink=MemorySink()))\n"
        # VmHWM, not ru_maxrss: ru_maxrss survives exec and would count the parent's pages.
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    env = dict(os.environ, MODELSEAL_HOME=str(home))
    out = subprocess.run(
        [sys.executable, "-c", code, str(src), str(dst)], env=env, check=True, capture_output=True, text=True
    )
    return int(out.stdout.strip()) * 1024


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _clear(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    os.sync()  # the deletion's own I/O (discard, journal) is not charged to the next run


def writes(work: Path, src: Path, svc: KeyService, rounds: int, compare: bool) -> None:
    """Durable writes of the same bytes: seal (CLI and API, file and folder) against dd."""
    from modelseal.format import writer
    from modelseal.recipes import writing

    size = src.stat().st_size
    shards = work / "shards"
    shards.mkdir()
    with open(src, "rb") as f:
        for k in range(4):
            (shards / f"model-{k:05d}-of-00004.bin").write_bytes(f.read(size // 4))
    dd_out, out = work / "dd.out", work / "w.sealed"
    cli = [str(Path(sys.executable).parent / "modelseal"), "seal", "--key", "local:bench", "--force"]

    def dd(_what: Path) -> None:  # the reference is always the one file: the same bytes, one fsync
        subprocess.run(["dd", f"if={src}", f"of={dd_out}", "bs=16M", "conv=fsync"], check=True, capture_output=True)

    def api(what: Path, direct: bool = False, parallel: int = 2) -> Callable[[], None]:
        def run() -> None:
            writer.DIRECT, writing.FOLDER_PARALLEL = direct, parallel
            try:
                modelseal.seal(what, out, key="bench", force=True, keys=svc)
            finally:
                writer.DIRECT, writing.FOLDER_PARALLEL = False, 2

        return run

    cases: list[tuple[str, Path, Callable[[], None]]] = [
        (
            "CLI seal, 1 GiB file",
            src,
            lambda: subprocess.run([*cli, str(src), str(out)], check=True, capture_output=True),
        ),
        (
            "CLI seal, 4-shard folder",
            shards,
            lambda: subprocess.run([*cli, str(shards), str(out)], check=True, capture_output=True),
        ),
        ("API seal, 1 GiB file", src, api(src)),
        ("API seal, 4-shard folder", shards, api(shards)),
    ]
    if compare:
        cases += [
            ("API seal, file, O_DIRECT", src, api(src, direct=True)),
            ("API seal, folder, O_DIRECT", shards, api(shards, direct=True)),
            ("API seal, folder, 1 at a time", shards, api(shards, parallel=1)),
        ]
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    rates: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    refs: list[float] = []
    for _ in range(rounds):
        for name, what, fn in cases:
            t_dd = _timed(lambda: dd(what))  # noqa: B023
            _clear(dd_out)
            t = _timed(fn)
            _clear(out)
            refs.append(size / t_dd / GB)
            rates[name].append(size / t / GB)
            ratios[name].append(t_dd / t)
    print(f"writes: {size / MIB:.0f} MiB, {rounds} rounds, each seal paired with its own dd (median of the pairs)")
    lo, hi = min(refs), max(refs)
    print(f"dd bs=16M conv=fsync           {statistics.median(refs):6.2f} GB/s   (reference; {lo:.2f}-{hi:.2f})")
    for name, _, _ in cases:
        r = ratios[name]
        med, rate = statistics.median(r), statistics.median(rates[name])
        print(f"{name:30s} {rate:6.2f} GB/s   {med:5.2f}x dd  (pairs {min(r):.2f}-{max(r):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rss-gib", type=int, default=4)
    ap.add_argument("--dir", default=None, help="work folder (default: a temp folder under /tmp)")
    ap.add_argument("--writes-rounds", type=int, default=3, help="rounds of the writes section (0: skip it)")
    ap.add_argument("--writes-only", action="store_true", help="only the writes section")
    ap.add_argument("--compare-writes", action="store_true", help="also the write paths not chosen")
    ap.add_argument(
        "--reads", action="store_true", help="also every read pattern of benchmarks/reads.py on the same file"
    )
    args = ap.parse_args()
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="msbench-", dir=args.dir))
    home = work / "home"
    os.environ["MODELSEAL_HOME"] = str(home)
    os.environ.setdefault("MODELSEAL_PASSPHRASE", "benchmark-passphrase")
    try:
        keystore.create(keystore.keystore_path(home), os.environ["MODELSEAL_PASSPHRASE"].encode())
        svc = KeyService(sink=MemorySink(), providers={"local": LocalProvider()})
        svc.create("bench")
        src, sealed = work / "plain.bin", work / "plain.sealed"
        make_file(src, size)
        print(f"cores: {os.cpu_count()}  file: {size / MIB:.0f} MiB (page-cached)")
        if args.writes_rounds:
            writes(work, src, svc, args.writes_rounds, args.compare_writes)
        if args.writes_only:
            return
        buf = bytearray(size)

        t_plain = best_of(3, lambda: plain_readinto(src, buf))
        r_plain = size / t_plain / GB
        print(f"plain readinto            {r_plain:6.2f} GB/s   (reference)")

        copy_dst = work / "plain.copy"

        def plain_copy() -> None:
            # The I/O floor of any tool that writes a new file durably: read, write, fsync.
            with open(src, "rb", buffering=0) as fi, open(copy_dst, "wb", buffering=0) as fo:
                view = memoryview(bytearray(16 * MIB))
                off = 0
                while n := fi.readinto(view):
                    fo.write(view[:n])
                    off += n
                    if off % (32 * MIB) == 0:  # the same early-writeback hint modelseal uses
                        os.posix_fadvise(fo.fileno(), off - 32 * MIB, 32 * MIB, os.POSIX_FADV_DONTNEED)
                os.fsync(fo.fileno())
            copy_dst.unlink()

        t_copy = best_of(3, plain_copy)
        r_copy = size / t_copy / GB
        print(f"plain copy + fsync        {r_copy:6.2f} GB/s   (reference for writers)")

        def do_seal() -> None:
            modelseal.seal(src, sealed, key="bench", force=True, keys=svc)

        t_seal = best_of(3, do_seal)
        r_seal = size / t_seal / GB

        shm = Path("/dev/shm")
        r_seal_shm = None
        if shm.is_dir() and shutil.disk_usage(shm).free > 3 * size:
            shm_out = shm / f"msbench-{os.getpid()}.sealed"
            try:
                t = best_of(3, lambda: modelseal.seal(src, shm_out, key="bench", force=True, keys=svc))
                r_seal_shm = size / t / GB
            finally:
                shm_out.unlink(missing_ok=True)

        def do_unseal() -> None:
            with modelseal.open(sealed, keys=svc) as r:
                r.readinto(buf)

        t_open = best_of(3, do_unseal)
        r_open = size / t_open / GB

        lat = []
        rng = random.Random(1)
        with modelseal.open(sealed, keys=svc) as r:
            one = bytearray(MIB)
            for _ in range(200):
                off = rng.randrange(0, size - MIB)
                t = time.perf_counter()
                r.preadinto(off, one)
                lat.append(time.perf_counter() - t)
        lat.sort()

        t_rewrap = best_of(5, lambda: modelseal.rewrap(sealed, keys=svc))

        print(
            f"seal (to file, fsync)     {r_seal:6.2f} GB/s   {r_seal / r_plain:5.2f}x plain read,"
            f" {r_seal / r_copy:5.2f}x plain copy"
        )
        if r_seal_shm is not None:
            print(f"seal (to tmpfs, no disk)  {r_seal_shm:6.2f} GB/s   {r_seal_shm / r_plain:5.2f}x plain read")
        print(f"unseal to memory          {r_open:6.2f} GB/s   {r_open / r_plain:5.2f}x plain read")
        print(
            f"1 MiB pread, random       median {statistics.median(lat) * 1e3:.2f} ms,"
            f" p95 {lat[int(len(lat) * 0.95)] * 1e3:.2f} ms"
        )
        print(f"rewrap of {size / MIB:.0f} MiB          {t_rewrap * 1e3:.2f} ms")

        age = shutil.which("age")
        if age:
            ident = work / "age.key"
            subprocess.run(["age-keygen", "-o", str(ident)], check=True, capture_output=True)
            recipient = subprocess.run(
                ["age-keygen", "-y", str(ident)], check=True, capture_output=True, text=True
            ).stdout.strip()
            aged = work / "plain.age"
            t_age_enc = best_of(
                3, lambda: subprocess.run([age, "-r", recipient, "-o", str(aged), str(src)], check=True)
            )

            def age_dec() -> None:
                with subprocess.Popen([age, "-d", "-i", str(ident), str(aged)], stdout=subprocess.PIPE) as p:
                    assert p.stdout is not None
                    view = memoryview(buf)
                    while view:
                        n = p.stdout.readinto(view)  # type: ignore[attr-defined]
                        if not n:
                            break
                        view = view[n:]

            t_age_dec = best_of(3, age_dec)
            r_age_enc, r_age_dec = size / t_age_enc / GB, size / t_age_dec / GB
            print(f"age -r (encrypt to file)  {r_age_enc:6.2f} GB/s   seal is {r_seal / r_age_enc:5.2f}x age")
            print(f"age -d (decrypt to memory){r_age_dec:6.2f} GB/s   unseal is {r_open / r_age_dec:5.2f}x age")
        else:
            print("age: not installed (apt-get install age) - comparison skipped")

        if args.reads:
            print("read patterns (benchmarks/reads.py), on the same file:")
            reads.report(work, src, sealed, svc, 3)

        if args.rss_gib:
            big, big_sealed = work / "big.bin", work / "big.sealed"
            src.unlink()
            sealed.unlink()
            make_file(big, args.rss_gib << 30)
            rss = child_seal_rss(big, big_sealed, home)
            print(f"peak RSS sealing {args.rss_gib} GiB    {rss / MIB:6.1f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
