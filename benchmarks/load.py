"""Loading sealed safetensors against plaintext safetensors and the encrypted competitors.

    python benchmarks/load.py [--tensors 64] [--elements 4194304]

Makes a 1 GiB safetensors file (64 float32 tensors of 4M elements, fixed seed),
seals it, and reports in one run, everything page-cached:
- a full load, plaintext ``safetensors.{numpy,torch}.load_file`` vs
  ``modelseal.safetensors.load_file``, every tensor materialised in memory;
- one lazy 16 MiB ``get_tensor`` on an already open file vs plaintext ``safe_open``;
- peak RSS (VmHWM) of a child process doing the full torch load;
- CryptoTensors and tensorizer with encryption, where they are installed.
Figures, not pass/fail: see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).parent))
import competitors
from floors import CORES, on_every_core

import modelseal
import modelseal.safetensors as mst
from modelseal.audit.events import MemorySink
from modelseal.keys import keystore
from modelseal.keys.service import KeyService

MIB = 1 << 20


def touch(tensors: dict[str, Any]) -> None:
    """Materialise: read one value per 4 KiB page of every tensor."""
    for t in tensors.values():
        a = t.numpy() if hasattr(t, "numpy") else t
        flat = a.reshape(-1).view(np.uint8)
        int(flat[::4096].sum())


def best_of(n: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        del out
    return min(times)


def median_of(n: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def aes_floor(size: int, rounds: int) -> float:
    """The physical floor for ``size`` bytes: AES-256-GCM decryption of 1 MiB chunks (the
    ciphertext already in memory) into fresh, untouched memory, on every core; best of
    ``rounds``. A decrypting loader cannot beat it: it does this work plus reading the
    ciphertext and parsing."""
    aead = AESGCM(AESGCM.generate_key(256))
    n = max(1, size // MIB)
    block = os.urandom(MIB)
    cts = [aead.encrypt(i.to_bytes(12, "big"), block, None) for i in range(n)]

    def once() -> float:
        out = memoryview(np.empty(n * MIB, np.uint8))  # fresh pages, first touched by the decryption

        def work(k: int) -> None:
            for i in range(k, n, CORES):
                aead.decrypt_into(i.to_bytes(12, "big"), cts[i], None, out[i * MIB : (i + 1) * MIB])

        return on_every_core(work)

    return min(once() for _ in range(rounds))


def read_floor(sealed: Path, svc: KeyService, rounds: int) -> float:
    """The floor plus reading the ciphertext: every chunk of ``sealed`` read with ``preadv``
    from the page cache into a page-aligned per-thread buffer and decrypted into fresh
    memory, on every core, with none of modelseal's bookkeeping. What a loader that does
    not map the file (a mapping turns a concurrent truncation into SIGBUS) cannot beat."""
    with modelseal.open(sealed, keys=svc, verify=False) as r:
        cipher, layout = r._cipher, r._cipher.layout  # the benchmark borrows the reader's key
        fd = os.open(sealed, os.O_RDONLY)
        try:

            def once() -> float:
                out = memoryview(np.empty(layout.plaintext_length, np.uint8))
                cs = layout.chunk_size

                def work(k: int) -> None:
                    ct = memoryview(mmap.mmap(-1, cs + 16))
                    for i in range(k, layout.count, CORES):
                        n = layout.plain_len(i)
                        os.preadv(fd, [ct[: n + 16]], layout.offset(i))
                        cipher.decrypt_chunk(i, ct[: n + 16], out[i * cs : i * cs + n])

                return on_every_core(work)

            return min(once() for _ in range(rounds))
        finally:
            os.close(fd)


def child_rss(setup: str, load: str, env: dict[str, str]) -> tuple[int, int]:
    """(peak RSS, RSS after imports) of a child that runs ``setup`` then ``load``."""
    status = "[int(l.split()[1]) for l in open('/proc/self/status') if l.startswith({!r})][0]"
    code = f"{setup}\nbase = {status.format('VmRSS')}\n{load}\nprint(base, {status.format('VmHWM')})\n"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    base, peak = out.stdout.strip().splitlines()[-1].split()
    return int(peak) * 1024, int(base) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--elements", type=int, default=4 * MIB)
    args = ap.parse_args()
    import safetensors.numpy
    import safetensors.torch
    import torch
    from safetensors import safe_open

    work = Path(tempfile.mkdtemp(prefix="msload-"))
    home = work / "home"
    os.environ["MODELSEAL_HOME"] = str(home)
    os.environ.setdefault("MODELSEAL_PASSPHRASE", "benchmark-passphrase")
    try:
        keystore.create(keystore.keystore_path(home), os.environ["MODELSEAL_PASSPHRASE"].encode(), scrypt_log2_n=14)
        svc = KeyService(sink=MemorySink())
        svc.create("bench")
        rng = np.random.default_rng(0)
        tensors = {f"layer.{i}.weight": rng.random(args.elements, dtype=np.float32) for i in range(args.tensors)}
        size = sum(t.nbytes for t in tensors.values())
        plain, sealed = work / "model.safetensors", work / "model.sealed"
        safetensors.numpy.save_file(tensors, str(plain))
        del tensors
        modelseal.seal(plain, sealed, key="bench", keys=svc)
        for p in (plain, sealed):  # page-cache both
            with open(p, "rb") as f:
                while f.read(64 * MIB):
                    pass
        print(f"model: {args.tensors} float32 tensors, {size / MIB:.0f} MiB; cores: {os.cpu_count()}")

        rows = []
        floor_full = aes_floor(size, 3)
        floor_rate = size / floor_full / 1e9
        print(f"floor: AES-256-GCM of {size / MIB:.0f} MiB into fresh memory on all cores {floor_rate:5.2f} GB/s")
        t_read_floor = read_floor(sealed, svc, 3)
        print(
            f"floor + reading the ciphertext (preadv, all cores) {size / t_read_floor / 1e9:5.2f} GB/s:"
            f" the read alone costs {floor_full / t_read_floor:4.2f}x of the floor"
        )

        def full(name: str, plain_fn: Callable[[], Any], sealed_fn: Callable[[], Any]) -> None:
            tp = best_of(3, lambda: touch(plain_fn()))
            ts = best_of(3, lambda: touch(sealed_fn()))
            rows.append((name, tp, ts))
            print(
                f"full load {name:5}  plaintext {size / tp / 1e9:5.2f} GB/s   sealed {size / ts / 1e9:5.2f} GB/s"
                f"   ratio {ts / tp:4.2f}x   sealed at {floor_full / ts:4.2f}x of the floor (target 0.9x),"
                f" {t_read_floor / ts:4.2f}x of floor + read"
            )

        full("numpy", lambda: safetensors.numpy.load_file(str(plain)), lambda: mst.load_file(sealed, "np", keys=svc))
        full("torch", lambda: safetensors.torch.load_file(str(plain)), lambda: mst.load_file(sealed, "pt", keys=svc))
        # safetensors.torch maps the file: its "load" copies nothing. A decrypting loader must
        # write every byte into private memory, so also compare with plaintext + one copy.
        t_copy = best_of(3, lambda: touch({k: v.clone() for k, v in safetensors.torch.load_file(str(plain)).items()}))
        print(
            f"  reference: plaintext torch load + clone (private memory) {size / t_copy / 1e9:5.2f} GB/s;"
            f" sealed torch load is {rows[1][2] / t_copy:4.2f}x that"
        )

        # torch.load of a checkpoint: modelseal.torch decrypts it into memory, then torch parses it.
        pt_plain, pt_sealed = work / "model.pt", work / "model.pt.sealed"
        torch.save(safetensors.torch.load_file(str(plain)), pt_plain)
        modelseal.seal(pt_plain, pt_sealed, key="bench", keys=svc)
        import modelseal.torch as mtorch

        tp = best_of(3, lambda: touch(torch.load(pt_plain, weights_only=True)))
        ts = best_of(3, lambda: touch(mtorch.load(pt_sealed, keys=svc)))
        print(
            f"full load torch.load  plaintext {size / tp / 1e9:5.2f} GB/s   sealed {size / ts / 1e9:5.2f} GB/s"
            f"   ratio {ts / tp:4.2f}x   torch's own parsing dominates: sealed at {(tp + floor_full) / ts:4.2f}x"
            " of plaintext torch.load + the floor"
        )
        pt_plain.unlink()

        name = f"layer.{args.tensors // 2}.weight"
        with safe_open(str(plain), framework="pt") as fp, mst.safe_open(sealed, framework="pt", keys=svc) as fs:
            tp = median_of(21, lambda: touch({name: fp.get_tensor(name)}))
            tc = median_of(21, lambda: touch({name: fp.get_tensor(name).clone()}))
            ts = median_of(21, lambda: touch({name: fs.get_tensor(name)}))
        print(f"  reference: plaintext get_tensor + clone {tc * 1e3:6.2f} ms; sealed is {ts / tc:4.2f}x that")
        nbytes = args.elements * 4
        floor_one = aes_floor(nbytes, 21)
        print(
            f"lazy get_tensor {nbytes / MIB:.0f} MiB  plaintext {tp * 1e3:6.2f} ms   sealed {ts * 1e3:6.2f} ms"
            f"   ratio {ts / tp:4.2f}x   floor {floor_one * 1e3:5.2f} ms: sealed at {floor_one / ts:4.2f}x of it"
            f" (target 0.8x); floor + read, pro rata: {t_read_floor * nbytes / size * 1e3:5.2f} ms"
        )

        env = dict(os.environ)
        peak, base = child_rss(
            "import torch, modelseal.safetensors as m\n"
            "from modelseal.keys.service import KeyService\nfrom modelseal.audit.events import MemorySink\n"
            "svc = KeyService(sink=MemorySink())",
            f"t = m.load_file({str(sealed)!r}, 'pt', keys=svc)",
            env,
        )
        print(
            f"peak RSS, sealed full torch load: {peak / MIB:6.0f} MiB, of which {base / MIB:4.0f} MiB is the"
            f" interpreter and torch before loading: {(peak - base) / size:4.2f}x the model size"
        )

        with safe_open(str(plain), framework="pt") as fp:
            ref = {k: fp.get_tensor(k) for k in fp.keys()}  # noqa: SIM118
        for comp in competitors.available():
            try:
                path = str(work / f"model.{comp.name}")
                comp.save(ref, path)
                tc = best_of(3, lambda c=comp, p=path: touch(c.load_all(p)))  # type: ignore[misc]
                got = comp.load_all(path)
                assert all(torch.equal(got[k], ref[k]) for k in ref)
                tp = rows[1][1]
                print(
                    f"{comp.name:12} full load (encrypted) {size / tc / 1e9:5.2f} GB/s   {tc / tp:4.2f}x plaintext;"
                    f" modelseal is {tc / rows[1][2]:4.2f}x faster   names in clear: {comp.names_in_clear(path, ref)}"
                )
                if comp.load_one is not None:
                    tl = median_of(11, lambda c=comp, p=path: touch({name: c.load_one(p, name)}))  # type: ignore[misc]
                    print(f"{comp.name:12} lazy one tensor {tl * 1e3:6.2f} ms")
            except Exception as e:  # a competitor failing must not hide our figures
                print(f"{comp.name}: failed ({type(e).__name__}: {str(e)[:120]})")
        for missing in competitors.missing():
            print(f"{missing}: not installed, skipped")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
