"""Shared pieces of the incident tests (test_incident_key, test_incident_cert): signing keys, a
trust policy with a signed revocation list, sealed artifacts, and the CLI in this process."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import modelseal
from modelseal.cli import main
from modelseal.keys.service import KeyService
from modelseal.signing.revocation import RevocationList
from modelseal.signing.signers import ED25519, PemSigner, generate, private_pem
from modelseal.signing.trust import TrustPolicy, load_policy


@dataclass
class Trust:
    policy: Path
    release: Path  # signs artifacts
    release2: Path  # the new signing key of an incident
    security: Path  # signs the revocation list
    revocations: Path

    def load(self) -> TrustPolicy:
        return load_policy(self.policy)

    def args(self) -> list[str]:
        return ["--sign-key", str(self.release2), "--trust", str(self.policy), "--revocation-key", str(self.security)]


def make_trust(root: Path) -> Trust:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("release", "release2", "security"):
        s = generate(ED25519)
        (root / f"{name}.pem").write_bytes(private_pem(s, None))
        os.chmod(root / f"{name}.pem", 0o600)
        (root / f"{name}.pub").write_text(s.public.pem())
        paths[name] = root / f"{name}.pem"
    lst = root / "revocations.json"
    policy = root / "trust.toml"
    policy.write_text(
        "version = 1\nstrict = true\n"
        f'[signers.release]\nkeys = ["{root / "release.pub"}", "{root / "release2.pub"}"]\n'
        f'[signers.security]\nkeys = ["{root / "security.pub"}"]\n'
        '[[rules]]\nartifacts = ["*"]\nenvironments = ["*"]\nsigners = ["release"]\n'
        f'[revocation]\nlist = "{lst}"\nsigners = ["security"]\n'
    )
    os.chmod(policy, 0o600)
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC).replace(microsecond=0)
    lst.write_bytes(RevocationList(1, now, now + timedelta(days=30), []).sign(PemSigner.from_file(paths["security"])))
    return Trust(policy, paths["release"], paths["release2"], paths["security"], lst)


def seal_signed(
    svc: KeyService, src: Path, dst: Path, key: str, trust: Trust | None, name: str, env: str = "dev"
) -> Path:
    signer = PemSigner.from_file(trust.release) if trust is not None else None
    modelseal.seal(src, dst, key, keys=svc, sign_key=signer, name=name if signer else None, env=env)
    return dst


def plaintext(svc: KeyService, path: Path) -> bytes | dict[str, bytes]:
    if path.is_dir():
        with modelseal.open_folder(path, keys=svc, verify=False) as f:
            out = {}
            for e in f.entries():
                with f.open(e.path) as r:
                    out[e.path] = r.read()
            return out
    with modelseal.open(path, keys=svc, verify=False) as r:
        return bytes(r.read())


def snapshot(paths: list[Path]) -> dict[str, bytes]:
    """Every file's bytes under ``paths`` (to show a dry run changed nothing)."""
    out = {}
    for root in paths:
        items = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({str(p): p.read_bytes() for p in items})
    return out


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def audit_ops(home: Path) -> list[dict[str, Any]]:
    from modelseal.audit.log import MerkleAuditLog

    return MerkleAuditLog(home / "audit.db").events()


def journal_of(home: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    (folder,) = [p for p in (home / "incidents").iterdir() if (p / "journal.json").exists()]
    items = [json.loads(p.read_text()) for p in sorted((folder / "artifacts").glob("*.json"))]
    return json.loads((folder / "journal.json").read_text()), items


@contextlib.contextmanager
def env_vars(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
