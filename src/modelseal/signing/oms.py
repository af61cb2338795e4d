"""OpenSSF model-signing (OMS) signatures over plaintext models (docs/signing.md).

Writes and checks the ``model.sig`` that ``model_signing sign key`` /
``verify key`` (PyPI ``model-signing`` 1.1.1) produce and accept: a Sigstore
bundle v0.3 holding a DSSE envelope over an in-toto Statement v1 with
predicate ``https://model_signing/signature/v1.0``, method ``files``, SHA-256
per file, signed with ECDSA (model-signing supports P-256/384/521 only, not
Ed25519). The key hint is SHA-256 of the PEM SubjectPublicKeyInfo text. The
subject digest is SHA-256 over the resources' raw digests in listed order;
resources are sorted component-wise, as ``pathlib`` sorts.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelseal.errors import SigningKeyError, StorageError, VerificationError
from modelseal.format.stream import workers
from modelseal.signing.signers import Signer, b64, pae, unb64
from modelseal.util.bounded import json_loads
from modelseal.util.files import open_regular, read_limited

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
SIGNATURE_NAME = "model.sig"
GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")  # model-signing ignores these by default
MAX_BUNDLE = 64 << 20
# Bounds checked before the JSON parser runs (util.bounded). A bundle nests about 6 deep
# (verificationMaterial.tlogEntries[].inclusionProof.checkpoint); a statement 4.
MAX_JSON_DEPTH = 16
_BUNDLE_VALUES = 100_000  # a bundle holds one envelope, a key hint or certificates, a few log entries
_STATEMENT_VALUES = 4 * 250_000 + 4096  # four values per file: a quarter of a million files
MAX_IGNORE_PATHS = 1024
_CURVE_HASH: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
_HASHERS = ("sha256", "blake2b")


def sort_key(name: str) -> tuple[str, ...]:
    return tuple(name.split("/"))


def is_ignored(rel: str, ignores: Iterable[str]) -> bool:
    parts = PurePosixPath(rel).parts
    for ign in ignores:
        ip = PurePosixPath(ign).parts
        if ip and parts[: len(ip)] == ip:
            return True
    return False


def key_hint(key: ec.EllipticCurvePublicKey) -> str:
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def supports(signer: Signer) -> bool:
    """Whether model-signing can verify this signer's signatures (ECDSA only)."""
    return isinstance(signer.public.key, ec.EllipticCurvePublicKey)


def make_bundle(signer: Signer, model_name: str, files: Iterable[tuple[str, str]], ignore_paths: list[str]) -> bytes:
    """An OMS bundle over (relative path, SHA-256 hex) of every plaintext file."""
    key = signer.public.key
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SigningKeyError("model-signing verifies ECDSA signatures only; sign with a P-256 key")
    rows = sorted(files, key=lambda f: sort_key(f[0]))
    resources = [{"algorithm": "sha256", "digest": d, "name": n} for n, d in rows]
    root = hashlib.sha256(b"".join(bytes.fromhex(d) for _, d in rows)).hexdigest()
    statement = {
        "_type": STATEMENT_TYPE,
        "predicate": {
            "resources": resources,
            "serialization": {
                "allow_symlinks": False,
                "hash_type": "sha256",
                "ignore_paths": ignore_paths,
                "method": "files",
            },
        },
        "predicateType": PREDICATE_TYPE,
        "subject": [{"digest": {"sha256": root}, "name": model_name}],
    }
    payload = json.dumps(statement, indent=2, sort_keys=True).encode()
    sig = signer.sign(pae(PAYLOAD_TYPE, payload))
    bundle = {
        "dsseEnvelope": {
            "payload": b64(payload),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"keyid": "", "sig": b64(sig)}],
        },
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_hint(key)}, "tlogEntries": []},
    }
    return json.dumps(bundle, separators=(",", ":"), sort_keys=True).encode()


def bundle_for_folder(signer: Signer, model_name: str, files: Iterable[tuple[str, str]]) -> bytes:
    """The bundle an unsealed folder carries as ``model.sig``: git paths and the
    signature itself ignored, as model-signing's CLI does."""
    rows = [(n, d) for n, d in files if not is_ignored(n, (*GIT_PATHS, SIGNATURE_NAME))]
    return make_bundle(signer, model_name, rows, [*GIT_PATHS, SIGNATURE_NAME])


def bundle_for_file(signer: Signer, model_name: str, sha256: str) -> bytes:
    return make_bundle(signer, model_name, [(".", sha256)], list(GIT_PATHS))


# --- verification of plaintext models --------------------------------------------------------


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as e:
        raise SigningKeyError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError(f"{path} is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVE_HASH:
        raise SigningKeyError("model-signing signatures use ECDSA P-256, P-384 or P-521 keys")
    return key


@dataclass(frozen=True)
class OmsResult:
    name: str
    files: int
    ignored: list[str]
    unlisted: list[str]
    key: ec.EllipticCurvePublicKey  # the trusted key that verified
    digest: str = ""  # the subject digest: SHA-256 over the resources' raw digests (the model's digest)
    payload: bytes = b""  # the signed statement, exactly as signed


# How many bytes of one plaintext file may be holes: at least this much, and up to 16
# times what the file stores, so hashing stays proportional to what the disk holds. A
# genuine sparse copy (zero runs of an untrained adapter, ZFS all-zero blocks) passes;
# an attack has 2^50 bytes of holes over a few blocks.
MAX_HOLES = 64 << 20
HOLES_PER_STORED_BYTE = 16


def _hole_bytes(fd: int, size: int, limit: int = MAX_HOLES) -> int:
    """The bytes of holes in the file, counted up to just past ``limit`` with
    ``SEEK_DATA``/``SEEK_HOLE``: what the file system stores, not ``st_blocks``, which
    compression (ZFS, btrfs) also lowers. Each step costs an extent the disk holds."""
    holes, pos = 0, 0
    try:
        while pos < size and holes <= limit:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            holes += data - pos
            pos = os.lseek(fd, data, os.SEEK_HOLE)
    except OSError as e:
        if e.errno != errno.ENXIO:  # no SEEK_DATA here: a read returns only what is there
            return 0
        holes += size - pos  # no data after pos: a hole up to the end
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return holes


def _hash_file(path: Path, hash_type: str) -> str:
    """The digest of one file of the model, in work bounded by what the disk holds: a
    FIFO or device swapped in is refused without blocking (``open_regular``), and so is
    a sparse file (2^50 bytes of holes take weeks to hash, and a few blocks to store)."""
    h = hashlib.new(hash_type)
    fd = open_regular(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        limit = max(MAX_HOLES, HOLES_PER_STORED_BYTE * st.st_blocks * 512)
        if _hole_bytes(fd, st.st_size, limit) > limit:
            raise _fail(
                f"{str(path)[:200]!r} is sparse (more than {limit} bytes of holes): refusing to hash them"
                " (copy it with cp --sparse=never to verify it)"
            )
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
    finally:
        os.close(fd)
    return str(h.hexdigest())


def _list_files(model: Path, ignores: list[str]) -> tuple[dict[str, Path], list[str]]:
    if model.is_symlink():
        raise VerificationError(f"{model} is a symlink")
    if model.is_file():
        return {".": model}, []
    if not model.is_dir():
        raise VerificationError(f"{model} is not a file or a folder")
    out: dict[str, Path] = {}
    skipped: list[str] = []
    stack: list[tuple[Path, str]] = [(model, "")]  # iterative: no recursion limit on deep trees
    while stack:
        d, prefix = stack.pop()
        try:
            listing = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:  # an unlistable folder is never skipped: its files would go unchecked
            raise StorageError(f"cannot list {d}: {e.strerror}") from None
        for entry in listing:
            rel = prefix + entry.name
            if is_ignored(rel, ignores):
                skipped.append(rel)
                continue
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                raise VerificationError(f"symlink {rel[:200]!r} in the model: refused (model-signing's default)")
            if stat.S_ISDIR(mode):
                stack.append((Path(entry.path), rel + "/"))
            elif stat.S_ISREG(mode):
                out[rel] = Path(entry.path)
            else:
                raise VerificationError(f"{rel[:200]!r} is not a regular file")
    return out, skipped


def _fail(msg: str) -> VerificationError:
    return VerificationError(f"model-signing signature: {msg}")


def read_bundle(path: Path) -> dict[str, Any]:
    try:
        data = read_limited(path, MAX_BUNDLE, _fail, str(path), regular=True)  # an artifact's file: no FIFO
    except FileNotFoundError:
        raise _fail(f"{path} does not exist") from None
    doc = json_loads(
        data, max_depth=MAX_JSON_DEPTH, max_values=_BUNDLE_VALUES, error=lambda d: _fail(f"{path}: {d} (truncated?)")
    )
    if not isinstance(doc, dict) or doc.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise _fail("not a Sigstore bundle v0.3")
    return doc


def verify_model(
    model: Path,
    bundle_path: Path,
    keys: list[ec.EllipticCurvePublicKey],
    *,
    allow_unlisted: bool = False,
) -> OmsResult:
    """Verify an OMS ``model.sig`` over a plaintext model folder (or file) with trusted keys."""
    doc = read_bundle(bundle_path)
    try:
        env = doc["dsseEnvelope"]
        if env["payloadType"] != PAYLOAD_TYPE:
            raise ValueError("payload type")
        payload = unb64(env["payload"])
        sig = unb64(env["signatures"][0]["sig"], 1024)
        hint = ((doc.get("verificationMaterial") or {}).get("publicKey") or {}).get("hint")
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise _fail("malformed bundle (truncated?)") from None
    hint_b = str(hint or "").encode("utf-8", "replace")
    candidates = [k for k in keys if not hint or hmac.compare_digest(hint_b, key_hint(k).encode())]
    if not candidates:
        raise _fail("signed by a key that is not trusted (the key hint matches no trusted key)")
    data = pae(PAYLOAD_TYPE, payload)
    signer: ec.EllipticCurvePublicKey | None = None
    for k in candidates:
        try:
            k.verify(sig, data, ec.ECDSA(_CURVE_HASH[k.curve.name]()))
            signer = k
            break
        except InvalidSignature:
            continue
    if signer is None:
        raise _fail("the signature does not verify with the trusted key(s): tampered or untrusted")
    try:
        st = json_loads(payload, max_depth=MAX_JSON_DEPTH, max_values=_STATEMENT_VALUES, error=ValueError)
        if st["_type"] != STATEMENT_TYPE or st["predicateType"] != PREDICATE_TYPE or len(st["subject"]) != 1:
            raise ValueError
        ser = st["predicate"]["serialization"]
        if ser["method"] != "files" or ser["hash_type"] not in _HASHERS:
            raise _fail(f"unsupported serialization {ser.get('method')}/{ser.get('hash_type')}; use 'files'")
        expected: dict[str, tuple[str, str]] = {}
        root = hashlib.sha256()
        for r in st["predicate"]["resources"]:
            if r["name"] in expected:
                raise ValueError
            root.update(bytes.fromhex(r["digest"]))
            expected[r["name"]] = (r["algorithm"], r["digest"])
        raw_ignores = ser.get("ignore_paths", [])
        if len(raw_ignores) > MAX_IGNORE_PATHS:  # each is compared with every file
            raise ValueError
        signed_ignores = [str(p) for p in raw_ignores]
        subject = st["subject"][0]
        if not hmac.compare_digest(root.hexdigest(), str(subject["digest"]["sha256"])):
            raise _fail("the subject digest does not match the resources")
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError):
        raise _fail("malformed statement") from None
    ignores = [*GIT_PATHS, *signed_ignores]
    try:
        inside = bundle_path.resolve().relative_to(model.resolve()).as_posix()
        ignores.append(inside)
    except ValueError:
        pass
    files, skipped = _list_files(model, ignores)
    missing = sorted(set(expected) - set(files), key=sort_key)
    if missing:
        raise _fail(f"{len(missing)} signed file(s) missing, e.g. {missing[0][:120]!r}")
    unlisted = sorted(set(files) - set(expected), key=sort_key)
    if unlisted and not allow_unlisted:
        raise _fail(f"{len(unlisted)} file(s) present but not signed, e.g. {unlisted[0][:120]!r} (--allow-unlisted)")
    names = sorted(set(files) & set(expected), key=sort_key)
    algorithm = ser["hash_type"]

    def check(name: str) -> str | None:
        alg, digest = expected[name]
        ok = alg == algorithm and hmac.compare_digest(_hash_file(files[name], algorithm), str(digest))
        return None if ok else name

    with ThreadPoolExecutor(workers()) as pool:
        bad = [n for n in pool.map(check, names) if n is not None]
    if bad:
        raise _fail(f"{len(bad)} file(s) do not match their signed digest, e.g. {bad[0][:120]!r}")
    return OmsResult(str(subject.get("name", "")), len(names), skipped, unlisted, signer, root.hexdigest(), payload)
