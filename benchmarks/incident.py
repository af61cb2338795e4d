"""Key-compromise re-encryption throughput against plain ``modelseal reencrypt``, in one run.

    python benchmarks/incident.py [--artifacts 100] [--size-mib 4]
    python benchmarks/incident.py --rehearsal [--artifacts 20] [--size-mib 4]

Seals the same set of artifacts (random bytes, a local key) into three folders and measures,
one after the other on this machine:
- plain ``reencrypt`` of every artifact of the first set (``recipes.rekey.reencrypt``, the
  library call ``modelseal reencrypt`` makes), unsigned;
- ``incident key-compromise --execute`` over the second set, unsigned: its re-encryption step
  (the journal's ``artifacts`` step: header check, re-encryption, one journal record per state)
  and the whole incident (find, rotate, re-encrypt, verify: every artifact decrypted again and
  its digest checked, disable, report);
- the same over the third set, signed: each superseded signature verified first (every chunk
  hashed), re-signed, revoked in one new revocation list, the new signature verified.

Prints MB/s (plaintext bytes) and artifacts/s, and each incident figure as a ratio to plain
reencrypt. Figures, not pass/fail; see docs/benchmarks.md.

``--rehearsal`` is the rehearsal of docs/recovery.md instead: a real ``modelseal serve``
(SQLite, mutual TLS, on 127.0.0.1) holding half the artifacts (pushed, signed) and a folder
holding the other half; ``incident key-compromise --execute`` over both, then
``incident cert-compromise IDENTITY --rotate-ca --execute`` on the client's identity; each
step's time from the incidents' reports.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.incident_helpers import make_trust

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.keys import keystore
from modelseal.keys.service import KeyService
from modelseal.recipes import rekey
from modelseal.recovery.keycompromise import KeyIncident, execute
from modelseal.signing.signers import PemSigner

MIB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=int, default=100)
    ap.add_argument("--size-mib", type=int, default=4)
    ap.add_argument("--rehearsal", action="store_true", help="the docs/recovery.md rehearsal (registry + paths)")
    args = ap.parse_args()
    if args.rehearsal:
        rehearsal(args.artifacts, args.size_mib * MIB)
        return
    work = Path(tempfile.mkdtemp(prefix="msincident-"))
    home = work / "home"
    os.environ["MODELSEAL_HOME"] = str(home)
    os.environ["MODELSEAL_PASSPHRASE"] = "benchmark"
    os.environ["MODELSEAL_CACHE"] = str(work / "cache")
    os.environ.pop("MODELSEAL_AGENT_SOCK", None)
    try:
        keystore.create(keystore.keystore_path(home), b"benchmark", scrypt_log2_n=14)
        svc = KeyService(sink=MemorySink())
        trust = make_trust(work / "trust")
        signer = PemSigner.from_file(trust.release)
        n, size = args.artifacts, args.size_mib * MIB
        sets = {name: work / name for name in ("plain", "incident", "signed")}
        for name, root in sets.items():
            svc.create(f"local:{name}")
            root.mkdir()
        src = work / "src.bin"
        for i in range(n):
            src.write_bytes(os.urandom(size))
            for name, root in sets.items():
                sign = signer if name == "signed" else None
                modelseal.seal(src, root / f"a{i:05}.sealed", f"local:{name}", keys=svc, sign_key=sign,
                               name=f"a{i}" if sign else None)  # fmt: skip
        total_mb = n * size / 1e6
        print(f"cores: {os.cpu_count()}; {n} artifacts of {args.size_mib} MiB ({total_mb:.0f} MB), local key")

        t = time.perf_counter()
        for p in sorted(sets["plain"].iterdir()):
            rekey.reencrypt(p, keys=svc)
        plain = time.perf_counter() - t
        rate = f"{total_mb / plain:8.1f} MB/s  {n / plain:7.1f} artifacts/s"
        print(f"  {'plain reencrypt':37} {plain:7.2f} s  {rate}")

        for name, extra in (("incident", {}), ("signed", {"signed": True})):
            kw: dict[str, object] = {}
            if extra:
                kw = {"sign_keys": (str(trust.release2),), "trust": str(trust.policy),
                      "revocation_keys": (str(trust.security),)}  # fmt: skip
            inc = KeyIncident(f"local:{name}", paths=(str(sets[name]),), **kw)  # type: ignore[arg-type]
            t = time.perf_counter()
            report = execute(inc, KeyService(sink=MemorySink()))
            whole = time.perf_counter() - t
            step = float(report["steps"]["artifacts"]["seconds"])
            label = "incident" + (", signed" if extra else ", unsigned")
            for what, secs in (("re-encryption step", step), ("whole incident", whole)):
                print(
                    f"  {label:18} {what:18} {secs:7.2f} s  {total_mb / secs:8.1f} MB/s  {n / secs:7.1f} artifacts/s"
                    f"  = {plain / secs:4.2f} x plain reencrypt"
                )
            parts = ", ".join(
                f"{k} {float(v['seconds']):.2f} s"
                for k, v in report["steps"].items()
                if isinstance(v, dict) and float(v.get("seconds", 0)) >= 0.005
            )
            print(f"    steps: {parts}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _steps(report: dict[str, object]) -> None:
    steps = report["steps"]
    assert isinstance(steps, dict)
    for name, s in steps.items():
        count = f"  ({s['count']} artifacts)" if s.get("count") else ""
        print(f"    {name:18} {float(s.get('seconds', 0.0)):8.3f} s  {s.get('status')}{count}")


def rehearsal(n: int, size: int) -> None:
    from tests.conftest import Env
    from tests.push_pull_helpers import make_pki, modelseal_serve

    from modelseal import registry
    from modelseal.recovery.certcompromise import CertIncident
    from modelseal.recovery.certcompromise import execute as cert_execute
    from modelseal.recovery.incident_registry import RegistryTarget

    work = Path(tempfile.mkdtemp(prefix="msrehearsal-"))
    home = work / "home"
    os.environ.update(MODELSEAL_HOME=str(home), MODELSEAL_PASSPHRASE="rehearsal", MODELSEAL_CACHE=str(work / "cache"))
    os.environ.pop("MODELSEAL_AGENT_SOCK", None)
    os.environ.pop("MODELSEAL_TRUST", None)
    try:
        keystore.create(keystore.keystore_path(home), b"rehearsal", scrypt_log2_n=14)
        svc = KeyService()  # the host's audit log: the cert incident lists the client's requests from it
        env = Env(home, work, svc, MemorySink())
        pki = make_pki(env)
        trust = make_trust(work / "trust")
        signer = PemSigner.from_file(trust.release)
        svc.create("local:prod-kek")
        paths = work / "models"
        paths.mkdir()
        data = work / "serve-data"
        with modelseal_serve(work, pki.server_dir, pki.client_dir, "--data", str(data)) as port:
            host = f"127.0.0.1:{port}"
            kw = {"tls_dir": pki.client_dir, "pins": pki.pins()}
            src = work / "src.bin"
            for i in range(n):
                src.write_bytes(os.urandom(size))
                dst = paths / f"m{i:04}.sealed"
                modelseal.seal(src, dst, "local:prod-kek", keys=svc, sign_key=signer, name=f"m{i}")
                if i % 2:
                    registry.push(dst, f"{host}/models/m{i}:v1", **kw)
                    shutil.move(dst, work / dst.name)
                    shutil.move(dst.with_name(dst.name + ".msig"), work / (dst.name + ".msig"))
            print(f"rehearsal: {n} signed artifacts of {size // MIB} MiB, {n // 2} in a modelseal serve registry")
            target = RegistryTarget(host, (), str(pki.client_dir), tuple(pki.pins()), str(data), None)
            inc = KeyIncident(
                "local:prod-kek",
                paths=(str(paths),),
                registry=target,
                sign_keys=(str(trust.release2),),
                trust=str(trust.policy),
                revocation_keys=(str(trust.security),),
            )
            t = time.perf_counter()
            report = execute(inc, svc)
            print(f"  incident key-compromise local:prod-kek --execute: {time.perf_counter() - t:.2f} s")
            _steps(report)
            t = time.perf_counter()
            cert = cert_execute(CertIncident("spiffe://example.org/prod/service/trainer", rotate_ca=True), svc)
            print(f"  incident cert-compromise IDENTITY --rotate-ca --execute: {time.perf_counter() - t:.2f} s, "
                  f"{len(cert['activity'])} events listed")  # fmt: skip
            _steps(cert)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
