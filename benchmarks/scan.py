"""Speed of ``modelseal scan`` on local disk, against reading the same prefixes, in one run.

    python benchmarks/scan.py [--files 20000] [--size-kib 8] [--repeat 3]

Makes FILES files in 100 folders (page-cached), mixed: sealed unsigned, sealed and signed
(each with its ``.msig`` beside it), plaintext safetensors, NumPy ``.npy``, and random bytes,
about a fifth each. Then times, best of REPEAT:

- ``scan`` in process (``telemetry.scan.scan``, a trust policy in force so every signature
  is verified, KEK versions looked up in the keystore), and the ``modelseal scan`` command
  end to end (interpreter start included);
- the references: plain Python ``os.walk`` + ``open``/``read(4096)`` of every file, and
  ``find -type f -print0 | xargs -0 head -c 4096``.

Prints files per minute for each and the ratio of scan to each reference. The issue's
target is 10,000 files per minute at least. Figures, not pass/fail: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.keys import keystore
from modelseal.keys.service import KeyService
from modelseal.signing.signers import P256, PemSigner, generate, private_pem
from modelseal.signing.trust import load_policy
from modelseal.telemetry.scan import ScanOptions, scan
from modelseal.telemetry.scankeys import scan_service

PASSPHRASE = "benchmark-passphrase-not-secret"
FOLDERS = 100


def best_of(n: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def make_tree(work: Path, files: int, size: int) -> tuple[Path, Path, int]:
    """The tree, its trust policy, and the number of files in it."""
    home = work / "home"
    os.environ["MODELSEAL_HOME"] = str(home)
    os.environ["MODELSEAL_PASSPHRASE"] = PASSPHRASE
    keystore.create(keystore.keystore_path(home), PASSPHRASE.encode(), scrypt_log2_n=14)
    svc = KeyService(sink=MemorySink())
    svc.create("bench-kek")
    signer = generate(P256)
    (work / "release.pem").write_bytes(private_pem(signer, None))
    (work / "release.pub").write_text(signer.public.pem())
    policy = work / "trust.toml"
    policy.write_text(
        f'version = 1\n[signers.release]\nkeys = ["{work / "release.pub"}"]\n'
        '[[rules]]\nartifacts = ["*"]\nenvironments = ["*"]\nsigners = ["release"]\n'
    )
    os.chmod(policy, 0o600)
    src = work / "plain.bin"
    src.write_bytes(os.urandom(size))
    modelseal.seal(src, work / "unsigned.mseal", "local:bench-kek", keys=svc)
    modelseal.seal(
        src, work / "signed.mseal", "local:bench-kek", keys=svc, sign_key=PemSigner.from_file(work / "release.pem")
    )
    samples = {
        "unsigned": (work / "unsigned.mseal").read_bytes(),
        "signed": (work / "signed.mseal").read_bytes(),
        "safetensors": bytes(save({"w": np.frombuffer(os.urandom(size), dtype=np.uint8)})),
        "npy": _npy(size),
        "random": os.urandom(size),
    }
    msig = (work / "signed.mseal.msig").read_bytes()
    root = work / "tree"
    count = 0
    kinds = list(samples)
    for i in range(files):
        folder = root / f"d{i % FOLDERS:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        kind = kinds[i % len(kinds)]
        path = folder / f"f{i:06d}.{'bin' if kind != 'signed' else 'mseal'}"
        path.write_bytes(samples[kind])
        count += 1
        if kind == "signed":
            Path(f"{path}.msig").write_bytes(msig)
            count += 1
    return root, policy, count


def _npy(size: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.frombuffer(os.urandom(size), dtype=np.uint8))
    return buf.getvalue()


def python_read(root: Path) -> int:
    n = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                f.read(4096)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--size-kib", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelseal-bench-scan-"))
    try:
        root, policy, files = make_tree(work, args.files, args.size_kib << 10)
        opts = ScanOptions(policy=load_policy(policy), svc=scan_service(KeyService(sink=MemorySink())), table={})
        report = scan([str(root)], opts)  # warms the page cache, and checks what is found
        assert report.files == files, (report.files, files)
        print(f"{files} files, {args.size_kib} KiB each; scan found {len(report.findings)} findings")
        print(f"  {report.summary()}")
        t_scan = best_of(args.repeat, lambda: scan([str(root)], opts))
        cli = [
            sys.executable,
            "-m",
            "modelseal.cli",
            "scan",
            str(root),
            "--trust",
            str(policy),
            "--fail-on",
            "1000000000",
        ]
        t_cli = best_of(
            args.repeat, lambda: subprocess.run(cli, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        t_py = best_of(args.repeat, lambda: python_read(root))
        shell = f"find {root} -type f -print0 | xargs -0 head -c 4096 > /dev/null"
        t_head = best_of(args.repeat, lambda: subprocess.run(shell, shell=True, check=True))

        def rate(t: float) -> float:
            return files / t * 60

        print(f"  scan (in process)        {t_scan:7.2f} s  {rate(t_scan):12,.0f} files/min")
        print(f"  modelseal scan (command) {t_cli:7.2f} s  {rate(t_cli):12,.0f} files/min")
        print(f"  python open+read(4096)   {t_py:7.2f} s  {rate(t_py):12,.0f} files/min")
        print(f"  find | xargs head -c4096 {t_head:7.2f} s  {rate(t_head):12,.0f} files/min")
        print(f"  ratio scan / python read: {t_py / t_scan:.2f}x the reference's rate")
        print(f"  ratio scan / find+head:   {t_head / t_scan:.2f}x the reference's rate")
        print(
            f"  target 10,000 files/min: {'met' if rate(t_cli) >= 10_000 else 'NOT met'} ({rate(t_cli) / 10_000:.0f}x)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
