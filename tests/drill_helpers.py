"""Shared pieces of the drill and restore tests (tests/test_backup_drill*.py,
tests/test_backup_restore*.py): a trusted release signer and a trust policy named in
config.toml, small sealed and signed artifacts, and putting them through a real
``registry.service.Registry`` (its upload, manifest and referrer calls: what ``modelseal
serve`` runs for a push), sealed-only."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import modelseal
from modelseal.audit.log import MerkleAuditLog
from modelseal.keys.service import KeyService
from modelseal.recovery import reckey
from modelseal.recovery.create import create_backup
from modelseal.recovery.locations import Locations
from modelseal.registry import layout
from modelseal.registry.localblobs import LocalBlobs
from modelseal.registry.service import Registry, open_registry
from modelseal.signing.commitment import hash_artifact
from modelseal.signing.sigfile import signature_path
from modelseal.signing.signers import P256, PemSigner, generate, private_pem
from tests.conftest import Env, make_model_folder

KEY = "local:test-kek"
OWNER = "spiffe://example.org/prod/service/ci"


HOST_CONFIG = """trust_policy = "trust.toml"
[environments.dev]
keys = ["{key}"]
[backup]
recovery_keys = ["recovery:offline"]
rto = "1h"
rpo = "1d"
"""


def release(env: Env, key: str = KEY) -> PemSigner:
    """A P-256 release signer, trusted by ``trust.toml`` in the home (config.toml names it
    by a relative path, so a restored home's copy is the one in force there)."""
    s = generate(P256)
    (env.work / "release.pem").write_bytes(private_pem(s, None))
    pub = env.work / "release.pub"
    pub.write_text(s.public.pem())
    policy = env.home / "trust.toml"
    policy.write_text(
        f'version = 1\nstrict = true\n[signers.release]\nkeys = ["{pub}"]\n'
        '[[rules]]\nartifacts = ["*"]\nenvironments = ["*"]\nsigners = ["release"]\n'
    )
    os.chmod(policy, 0o600)
    config = env.home / "config.toml"
    config.write_text(HOST_CONFIG.format(key=key))
    os.chmod(config, 0o600)
    return PemSigner.from_file(env.work / "release.pem")


def sealed_file(
    env: Env, name: str, signer: PemSigner, size: int = 5000, *, key: str = KEY, svc: KeyService | None = None
) -> Path:
    src = env.work / f"{name}.src"
    src.write_bytes(os.urandom(size))
    dst = env.work / f"{name}.mseal"
    modelseal.seal(src, dst, key, keys=svc or env.svc, sign_key=signer, name=name)
    return dst


def sealed_folder(env: Env, name: str, signer: PemSigner, *, key: str = KEY, svc: KeyService | None = None) -> Path:
    src = make_model_folder(env.work / f"{name}-src", big=70_000)
    dst = env.work / f"{name}.msealed"
    modelseal.seal(src, dst, key, keys=svc or env.svc, sign_key=signer, name=name)
    return dst


def _upload(reg: Registry, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    up = reg.start_upload(repo, OWNER)
    reg.finish(repo, up, OWNER, digest, None, [data], len(data))
    return digest


def push(reg: Registry, repo: str, tag: str, artifact: Path) -> str:
    """Put a sealed artifact and its signature file into ``reg``; the manifest digest."""
    commits, _ = hash_artifact(artifact)
    _upload(reg, repo, layout.EMPTY_BYTES)  # the empty config every artifact manifest names
    layers = []
    for c in commits:
        data = (artifact if c.path == layout.FILE_PATH else artifact / c.path).read_bytes()
        layers.append(layout.layer_for(c.path, _upload(reg, repo, data), len(data)))
    body = layout.artifact_manifest(layers)
    digest, _, _ = reg.put_manifest(repo, tag, body, layout.IMAGE_MANIFEST)
    sig = signature_path(artifact).read_bytes()
    sig_desc = layout.Descriptor(layout.SIGNATURES, _upload(reg, repo, sig), len(sig))
    subject = layout.Descriptor(layout.IMAGE_MANIFEST, digest, len(body))
    created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    referrer = layout.signature_manifest(sig_desc, subject, created)
    reg.put_manifest(repo, layout.sha256_digest(referrer), referrer, layout.IMAGE_MANIFEST)
    return digest


def secret_file(path: Path, lines: list[str]) -> Path:
    """A mode-600 file of secrets, one per line (shares, unseal keys, a token)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def registry(data: Path, db: str | None = None, blobs: str | None = None) -> Registry:
    return open_registry(data, db=db, blobs=blobs)


def blob_file(blobs_root: Path, digest: str) -> Path:
    """The one segment file of a small blob in a ``LocalBlobs`` folder (to corrupt it)."""
    folder = LocalBlobs(blobs_root).blob_path(digest.removeprefix("sha256:"))
    files = sorted(folder.iterdir())
    assert len(files) == 1
    return files[0]


def layer_digests(reg: Registry, repo: str, digest: str) -> list[str]:
    body = reg.get_manifest(repo, digest).body or b""
    return [x.descriptor.digest for x in layout.parse_artifact(body)]


@dataclass
class Host:
    """A small host: its audit log and key service, a registry of two signed artifacts, the
    offline recovery key's shares, and one backup of it all in ``dest``."""

    env: Env
    svc: KeyService
    log: MerkleAuditLog
    loc: Locations
    data: Path
    dest: Path
    digests: dict[str, str]
    shares: list[str]


def make_host(env: Env, before_backup: Callable[[Env, KeyService], None] | None = None) -> Host:
    log = MerkleAuditLog(env.home / "audit.db")
    svc = KeyService(sink=log)
    signer = release(env)
    shares = reckey.generate("offline", 3, 2, env.home)
    data = env.work / "registry"
    reg = registry(data)
    digests = {
        "team/a": push(reg, "team/a", "v1", sealed_file(env, "a", signer, svc=svc)),
        "team/b": push(reg, "team/b", "v1", sealed_folder(env, "b", signer, svc=svc)),
    }
    reg.close()
    if before_backup is not None:
        before_backup(env, svc)
    loc = Locations.from_args(env.home, registry_data=data)
    dest = env.work / "backups"
    create_backup(str(dest), loc, None, svc, sink=log)
    return Host(env, svc, log, loc, data, dest, digests, shares)
