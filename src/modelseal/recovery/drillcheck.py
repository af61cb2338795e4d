"""The checks of a restore drill over artifacts (docs/recovery.md, "Restore drills").

What "the plaintext digests match the signed manifests" means here. A modelseal signature
commits to sealed bytes, never to plaintext: each sealed file's core header (which holds the
key commitment, so it pins the data key) and the table of per-chunk BLAKE3 hashes of its
ciphertext (``signing.commitment``). The plaintext digests live inside what is signed: a
sealed file's encrypted metadata holds the SHA-256 of its plaintext, and a sealed folder's
encrypted ``manifest.mseal`` the SHA-256 and size of every member. So an artifact passes
when (1) every layer blob read from the live blob store hashes to the digest its OCI
manifest in the *restored* registry database names, (2) a signature attached to it (an OCI
referrer in that database) verifies under the *restored* trust policy: an artifact with
a signature attached (a referrer, or a ``--path``'s signature file) passes only when one
of them verifies as signed by a signer the policy trusts, however lax the policy (one
that would take it unsigned does not make a signature that fails a pass); only an
artifact with no signature at all is left to the policy (one that allows it unsigned is
obeyed, and the row says so), (3) it opens with the *restored* keys,
and (4) every chunk is decrypted (each AEAD tag checked, each ciphertext chunk checked
against the signed chunk table as it is read) and the SHA-256 of each file's plaintext
equals the digest the signed manifest or metadata holds. Plaintext is hashed in a buffer
kept out of core dumps, never written anywhere, and no digest of it is recorded.

``--path`` artifacts (sealed files or folders on disk, with their signature files) go
through (2) to (4). Every failure names the artifact (``REPO@sha256:...`` or the path) and
what failed, in one line. The blob store is only read. The audit checks are ``drillaudit``'s.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.errors import ModelsealError, VerificationError
from modelseal.format.file import RawArtifact, read_raw
from modelseal.format.reader import SealedReader
from modelseal.format.source import FdSource
from modelseal.keys.service import KeyService, printable
from modelseal.recipes import opening
from modelseal.registry import layout
from modelseal.registry.blobs import BlobStore
from modelseal.registry.download import fits
from modelseal.registry.sqlmeta import SqlMeta
from modelseal.signing.evaluation import Verdict
from modelseal.signing.sigfile import MAX_SIGFILE, SignatureFile, signature_path
from modelseal.signing.trust import TrustPolicy
from modelseal.signing.verification import verify_artifact
from modelseal.util.files import open_regular, remove_path
from modelseal.util.hardening import secret_buffer

PAGE = 500
READ_BUFFER = 4 << 20
MAX_REFERRERS = 16  # signature referrers tried per artifact, newest first


@dataclass(frozen=True)
class Failure:
    subject: str  # the artifact (REPO@sha256:..., a path) or the check ("audit log")
    what: str  # one line

    def line(self) -> str:
        return f"{self.subject}: {self.what}"


@dataclass
class Checked:
    subject: str
    name: str | None  # the signed name, once verified
    signed: bool
    files: int
    size: int  # plaintext bytes decrypted and hashed


@dataclass
class Findings:
    """What the artifact checks found (``to_json`` for the drill record)."""

    registry_total: int = 0
    sampled: int = 0
    checked: list[Checked] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "registry_artifacts": self.registry_total,
            "sampled": self.sampled,
            "passed": len(self.checked),
            "failed": len(self.failures),
            "artifacts": [vars(c) for c in self.checked],
            "failures": [vars(f) for f in self.failures],
        }


class _Failed(Exception):
    """One artifact's check failed: ``what`` says how (one line)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _one_line(e: BaseException) -> str:
    text = printable(str(e) or type(e).__name__)
    return f"{type(e).__name__}: {text[:300]}"


# -- the registry's artifacts ---------------------------------------------------------------


def registry_artifacts(meta: SqlMeta) -> list[tuple[str, str]]:
    """(repository, manifest digest) of every modelseal artifact the database lists."""
    out: list[tuple[str, str]] = []
    cursor: tuple[str, str] | None = None
    while True:
        page = meta.manifest_page(cursor, PAGE)
        out += [(repo, digest) for repo, digest, kind in page if kind == layout.ARTIFACT_TYPE]
        if len(page) < PAGE:
            return out
        cursor = page[-1][0], page[-1][1]


def choose(items: list[tuple[str, str]], sample: int | None, rng: random.Random | None = None) -> list[tuple[str, str]]:
    """``sample`` (at least 1) of ``items`` picked at random (all of them when None or more
    than there are)."""
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 1):
        raise ValueError("a drill samples at least one artifact")
    if sample is None or sample >= len(items):
        return list(items)
    return sorted((rng or random.SystemRandom()).sample(items, sample))


def _fetch(blobs: BlobStore, meta: SqlMeta, repo: str, desc: layout.Descriptor, out: Path, what: str) -> None:
    """The blob of ``desc`` from the live store into ``out``, its SHA-256 checked on the way."""
    row = meta.blob_in_repo(repo, desc.digest)
    if row is None:
        raise _Failed(f"{what}: the blob {desc.digest} is unknown to the restored registry database")
    size = blobs.size(row.storage)
    if size is None:
        raise _Failed(f"{what}: the blob {desc.digest} is missing from the blob store")
    if size != desc.size:
        raise _Failed(f"{what}: the blob {desc.digest} holds {size} bytes, its manifest says {desc.size}")
    h = hashlib.sha256()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            for chunk in blobs.read(row.storage, 0, size):
                h.update(chunk)
                f.write(chunk)
    finally:
        os.close(fd)
    if not hmac.compare_digest(h.hexdigest(), desc.hex):
        raise _Failed(f"{what}: the blob {desc.digest} in the blob store does not hash to its digest (corrupted)")


def _signature_files(meta: SqlMeta, blobs: BlobStore, repo: str, digest: str) -> tuple[list[bytes], int]:
    """The well-formed signature files attached to ``digest`` in the restored database, newest
    first, and how many signature referrers it lists at all."""
    refs = meta.referrers(repo, digest, layout.SIGNATURES, MAX_REFERRERS * 4)

    def created(r: Any) -> str:
        try:
            notes = json.loads(r.annotations) if r.annotations else {}
        except ValueError:
            notes = {}
        value = notes.get(layout.CREATED_ANNOTATION, "") if isinstance(notes, dict) else ""
        return value if isinstance(value, str) else ""

    out: list[bytes] = []
    for ref in sorted(refs, key=lambda r: (created(r), r.digest), reverse=True)[:MAX_REFERRERS]:
        row = meta.manifest_get(repo, ref.digest, None, True)
        try:
            layer = layout.parse_signature_manifest(row.body or b"" if row else b"", digest)
        except ModelsealError:
            continue
        blob = meta.blob_in_repo(repo, layer.digest)
        if blob is None or layer.size > MAX_SIGFILE:
            continue
        try:
            data = b"".join(blobs.read(blob.storage, 0, layer.size))
            SignatureFile.parse(data)
        except (ModelsealError, OSError):
            continue
        if layout.sha256_digest(data) == layer.digest and data not in out:
            out.append(data)
    return out, len(refs)


def materialize(meta: SqlMeta, blobs: BlobStore, repo: str, digest: str, work: Path) -> tuple[Path, list[bytes], int]:
    """The artifact ``repo@digest`` put together in ``work`` from the live blobs (ciphertext
    only), the signature files of it that fit its sealed files, and how many are attached."""
    row = meta.manifest_get(repo, digest, None, True)
    if row is None or not row.body:
        raise _Failed("the manifest is missing from the restored registry database")
    try:
        layers = layout.parse_artifact(row.body)
    except ModelsealError as e:
        raise _Failed(f"its manifest is not a modelseal artifact's ({_one_line(e)})") from None
    if [x.path for x in layers] == [layout.FILE_PATH]:
        root = work / "artifact"
        _fetch(blobs, meta, repo, layers[0].descriptor, root, "the sealed file")
    else:
        root = work / "folder"
        (root / "blobs").mkdir(mode=0o700, parents=True)
        for x in layers:
            _fetch(blobs, meta, repo, x.descriptor, root / x.path, f"layer {x.path}")
    raws: dict[str, RawArtifact] = {}
    for x in layers:
        src = FdSource(open_regular(root if x.path == layout.FILE_PATH else root / x.path))
        try:
            raws[x.path] = read_raw(src)
        except ModelsealError:
            raise _Failed(f"layer {x.path}: not a sealed file, or its header is damaged") from None
        finally:
            src.close()
    found, attached = _signature_files(meta, blobs, repo, digest)
    return root, [s for s in found if fits(s, raws)], attached


# -- verification and decryption -------------------------------------------------------------


_UNTRUSTED = "VerificationError: not signed by a signer the restored trust policy trusts"


def _verify(root: Path, sigs: Sequence[bytes] | None, policy: TrustPolicy, attached: int = 0) -> Verdict:
    """The verdict of the first signature file that verifies as signed (``sigs`` None: the
    one on disk); an artifact with a signature attached and none of them verifying fails,
    whatever the policy would say of it unsigned (module docstring)."""
    target = signature_path(root)
    if sigs is None:
        verdict = verify_artifact(root, policy, deep=False)
        if target.exists() and not verdict.signed:
            raise _Failed(f"its signature file does not verify under the restored trust policy ({_UNTRUSTED})")
        return verdict
    failures: list[str] = []
    for data in sigs:
        target.write_bytes(data)
        try:
            verdict = verify_artifact(root, policy, deep=False)
        except VerificationError as e:
            failures.append(_one_line(e))
            continue
        if verdict.signed:
            return verdict
        failures.append(_UNTRUSTED)
    target.unlink(missing_ok=True)
    if not sigs and not attached:
        return verify_artifact(root, policy, deep=False)  # no signature at all: the policy judges it
    if not sigs:
        raise _Failed(f"none of its {attached} attached signatures is a well-formed signature file that fits it")
    raise _Failed(f"none of its {len(sigs)} signature files verifies under the restored trust policy ({failures[0]})")


def _digest_of(reader: SealedReader, buf: memoryview) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while True:
        got = reader.readinto(buf)
        if not got:
            return h.hexdigest(), n
        h.update(buf[:got])
        n += got


def _same(got: str, want: object) -> bool:
    return isinstance(want, str) and hmac.compare_digest(got.encode(), want.encode("utf-8", "replace"))


def decrypt_and_compare(root: Path, svc: KeyService, verdict: Verdict | None) -> tuple[int, int]:
    """Decrypt every file of the artifact with ``svc``'s keys, each chunk checked against the
    verdict's signed tables, and compare each plaintext's SHA-256 with the signed one; (files, bytes)."""
    buf = secret_buffer(READ_BUFFER)
    try:
        if root.is_dir():
            files = total = 0
            with opening.open_sealed_folder(root, svc, verdict) as folder:
                for e in folder.entries():
                    with folder.open(e.path) as r:
                        got, n = _digest_of(r, buf)
                    if n != e.size or not _same(got, e.sha256):
                        member = printable(e.path)[:200]
                        raise _Failed(f"member {member}: its plaintext differs from the signed manifest")
                    files, total = files + 1, total + n
            return files, total
        with opening.open_sealed_file(root, svc, verdict) as r:
            want = r.metadata().get("sha256")
            got, n = _digest_of(r, buf)
        if not _same(got, want):
            raise _Failed("its plaintext differs from the digest its signed header holds")
        return 1, n
    finally:
        buf[:] = bytes(len(buf))
        buf.release()


def check_one(
    subject: str, root: Path, sigs: Sequence[bytes] | None, policy: TrustPolicy, svc: KeyService, attached: int = 0
) -> Checked:
    verdict = _verify(root, sigs, policy, attached)
    files, size = decrypt_and_compare(root, svc, verdict)
    return Checked(subject, verdict.name, verdict.signed, files, size)


def _guarded(findings: Findings, subject: str, run: Any) -> None:
    """Run one artifact's check; any failure becomes that artifact's one-line ``Failure``."""
    try:
        findings.checked.append(run())
    except _Failed as e:
        findings.failures.append(Failure(subject, e.what))
    except ModelsealError as e:
        findings.failures.append(Failure(subject, _one_line(e)))
    except OSError as e:
        findings.failures.append(Failure(subject, f"cannot read it: {e.strerror or type(e).__name__}"))


@dataclass(frozen=True)
class Targets:
    """What a drill checks: the restored registry (its database and the live blobs) and paths."""

    meta: SqlMeta | None
    blobs: BlobStore | None
    paths: tuple[Path, ...] = ()
    sample: int | None = None


def check_artifacts(
    targets: Targets, policy: TrustPolicy | None, svc: KeyService, work: Path, rng: random.Random | None = None
) -> Findings:
    """Every check of the module docstring over ``targets`` (``work``: a private scratch folder)."""
    findings = Findings()
    if policy is None:
        findings.failures.append(
            Failure("trust policy", "the restored configuration names no trust policy: signatures cannot be verified")
        )
        return findings
    if targets.meta is not None and targets.blobs is not None:
        meta, blobs = targets.meta, targets.blobs
        every = registry_artifacts(meta)
        findings.registry_total = len(every)
        picked = choose(every, targets.sample, rng)
        findings.sampled = len(picked)
        for i, (repo, digest) in enumerate(picked):
            scratch = work / f"a{i}"
            scratch.mkdir(mode=0o700)
            subject = f"{repo}@{digest}"

            def run(repo: str = repo, digest: str = digest, scratch: Path = scratch, subject: str = subject) -> Checked:
                root, sigs, attached = materialize(meta, blobs, repo, digest, scratch)
                return check_one(subject, root, sigs, policy, svc, attached)

            try:
                _guarded(findings, subject, run)
            finally:
                remove_path(scratch)
    for path in targets.paths:
        _guarded(findings, str(path), lambda path=path: check_one(str(path), path, None, policy, svc))
    return findings


def lines(failures: Sequence[Failure]) -> Iterator[str]:
    for f in failures:
        yield f.line()


__all__ = [
    "Checked",
    "Failure",
    "Findings",
    "Targets",
    "check_artifacts",
    "check_one",
    "choose",
    "decrypt_and_compare",
    "lines",
    "materialize",
    "registry_artifacts",
]
