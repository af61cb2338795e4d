"""Backup and restore-drill times for a registry of many artifacts (docs/benchmarks.md,
docs/recovery.md "Rehearsal timings").

    python benchmarks/drill.py [--artifacts 1000] [--size-mib 3] [--model-gib 1] [--sample N]

Builds a host in a temporary folder: a keystore (scrypt 2^17, as ``modelseal init``), a
trust policy, the offline recovery key, a SQLite registry with a local blob folder holding
``--artifacts`` sealed and signed files of ``--size-mib`` random MiB each and one sealed,
signed model of ``--model-gib`` GiB, all put through ``registry.service``. Then it times
``backup create`` into a folder and ``backup drill`` from it (every artifact checked, or
``--sample N``), and prints each step of the drill, then the reference measured in the same run:
every file of the registry folder read and hashed with SHA-256 (the floor of checking those bytes).
Setup (sealing) is not timed. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import PASSPHRASE, Env
from tests.drill_helpers import push, registry, release, sealed_file

from modelseal.audit.events import MemorySink
from modelseal.audit.log import MerkleAuditLog
from modelseal.keys import keystore
from modelseal.keys.service import KeyService
from modelseal.recovery import reckey
from modelseal.recovery.create import create_backup
from modelseal.recovery.drill import DrillRequest, run_drill, table
from modelseal.recovery.locations import Locations

MIB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=int, default=1000)
    ap.add_argument("--size-mib", type=float, default=3)
    ap.add_argument("--model-gib", type=float, default=1)
    ap.add_argument("--sample", type=int, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelseal-drill-bench-") as tmp:
        run(Path(tmp), args.artifacts, int(args.size_mib * MIB), int(args.model_gib * 1024 * MIB), args.sample)


def run(root: Path, n: int, size: int, model: int, sample: int | None) -> None:
    home, work = root / "home", root / "work"
    work.mkdir()
    os.environ["MODELSEAL_HOME"] = str(home)
    os.environ["MODELSEAL_PASSPHRASE"] = PASSPHRASE
    keystore.create(keystore.keystore_path(home), PASSPHRASE.encode())
    log = MerkleAuditLog(home / "audit.db")
    svc = KeyService(sink=log)
    svc.create("test-kek")
    env = Env(home, work, svc, MemorySink())
    signer = release(env)
    reckey.generate("offline", 3, 2, home)
    data = work / "registry"
    reg = registry(data)
    t = time.perf_counter()
    for i in range(n):
        art = sealed_file(env, f"m{i:04d}", signer, size=size)
        push(reg, f"team/m{i % 50:02d}", f"v{i}", art)
        art.unlink()
        art.with_name(art.name + ".msig").unlink()
        (work / f"m{i:04d}.src").unlink()
    if model:
        big = sealed_file(env, "big", signer, size=model)
        push(reg, "team/big", "v1", big)
        big.unlink()
        (work / "big.src").unlink()
    reg.close()
    total = n * size + model
    print(
        f"setup: {n} artifacts of {size / MIB:g} MiB + a {model / MIB:g} MiB model sealed and pushed"
        f" in {time.perf_counter() - t:.1f} s"
    )
    loc = Locations.from_args(home, registry_data=data)
    t = time.perf_counter()
    create_backup(str(root / "backups"), loc, None, svc, sink=log)
    print(f"backup create: {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    req = DrillRequest(str(root / "backups"), sample=sample, registry_data=data)
    report = run_drill(req, Locations.from_args(home), svc, log, check=False)
    took = time.perf_counter() - t
    print(table(report))
    checked = sum(c.size for c in report.findings.checked)
    print(
        f"backup drill: {took:.2f} s, {checked / MIB / max(took, 1e-9):.0f} MiB/s of plaintext checked"
        f" ({checked / MIB:.0f} of {total / MIB:.0f} MiB)"
    )
    ref = plain_read_and_hash(data)
    print(
        f"reference: plain read + SHA-256 of the registry's {ref[1] / MIB:.0f} MiB of blob files in {ref[0]:.2f} s"
        f" ({ref[1] / MIB / max(ref[0], 1e-9):.0f} MiB/s); the drill's artifact check runs at"
        f" {(checked / max(took, 1e-9)) / (ref[1] / max(ref[0], 1e-9)):.2f}x of it"
    )
    report.raise_if_failed()


def plain_read_and_hash(data: Path) -> tuple[float, int]:
    """The floor of checking the same bytes: every file under the registry folder read and
    hashed with SHA-256 (no decryption, no signature), in the same run."""
    t, n = time.perf_counter(), 0
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(MIB):
                h.update(chunk)
                n += len(chunk)
    return time.perf_counter() - t, n


if __name__ == "__main__":
    main()
