"""The signature file of a sealed artifact and the statement each signature signs
(docs/format.md, section 10).

A sealed file ``X`` keeps its signatures in ``X.msig``; a sealed folder in
``signatures.msig`` inside it. The file holds the chunk tables (public
hashes of ciphertext, so readers can check chunks lazily), the current
signatures and the history of signatures that an update superseded. Each
signature is a DSSE envelope over an in-toto Statement v1 whose predicate
lists the commitment of every sealed file. An optional ``oms`` attachment
carries an OpenSSF model-signing bundle over the *plaintext* digests,
encrypted under a key derived from the artifact's data key (it names files).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelseal.errors import DecryptionError, ModelsealError, VerificationError
from modelseal.format.file import canonical_json
from modelseal.format.folder import MAX_ENTRIES
from modelseal.signing import pending
from modelseal.signing.commitment import SIGNATURES_NAME, FileCommitment, chunks_digest
from modelseal.signing.signers import EnvelopeSig, Signer, b64, parse_envelope, sign_envelope, unb64
from modelseal.util.bounded import json_loads
from modelseal.util.files import read_limited
from modelseal.util.versions import MAX_VERSION, is_version

MEDIA_TYPE = "application/vnd.modelseal.signatures.v1+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://modelseal.dev/sealed-artifact/v1"
MAX_SIGFILE = 64 << 20
MAX_SIGNATURES = 256
# Bounds checked before the JSON parser runs (util.bounded): what the schema can hold.
MAX_JSON_DEPTH = 8  # a signature file nests 6 deep (signatures[].envelope.signatures[]), a statement 5
_STATEMENT_VALUES = 8 * (MAX_ENTRIES + 1) + 4096  # seven values per sealed file, and the rest
_SIGFILE_VALUES = 2 * (MAX_ENTRIES + 1) + 64 * MAX_SIGNATURES  # a chunk table per sealed file
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


def signature_path(artifact: Path) -> Path:
    """Where an artifact's signatures live: inside a folder, beside a file."""
    return artifact / SIGNATURES_NAME if artifact.is_dir() else artifact.with_name(artifact.name + ".msig")


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: Any, what: str) -> datetime:
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a timestamp")
    try:
        t = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise ValueError(f"{what} is not an RFC 3339 UTC timestamp (YYYY-MM-DDTHH:MM:SSZ)") from None
    return t.replace(tzinfo=UTC)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid artifact name {name!r}: 1-128 of [A-Za-z0-9._@+-], starting alphanumeric")
    return name


@dataclass(frozen=True)
class Statement:
    name: str
    digest: str
    kind: str
    context: dict[str, str]
    files: dict[str, dict[str, Any]]
    signed_at: str
    raw: bytes
    version: int = 0  # the artifact version under its name; 0: a statement without one (older releases)

    @classmethod
    def build(
        cls, name: str, kind: str, context: dict[str, str], files: list[FileCommitment], digest: str, version: int
    ) -> Statement:
        if not is_version(version, 1):
            raise ValueError(f"an artifact version is a whole number from 1 to {MAX_VERSION}")
        doc = {
            "_type": STATEMENT_TYPE,
            "predicate": {
                "context": context,
                "files": [f.to_json() for f in sorted(files, key=lambda f: f.path)],
                "kind": kind,
                "signed_at": now_rfc3339(),
                "version": version,
            },
            "predicateType": PREDICATE_TYPE,
            "subject": [{"digest": {"blake3": digest}, "name": check_name(name)}],
        }
        return cls.parse(canonical_json(doc))

    @classmethod
    def parse(cls, raw: bytes) -> Statement:
        try:
            doc = json_loads(raw, max_depth=MAX_JSON_DEPTH, max_values=_STATEMENT_VALUES, error=ValueError)
            if doc["_type"] != STATEMENT_TYPE or doc["predicateType"] != PREDICATE_TYPE:
                raise ValueError("not a modelseal statement")
            (subject,) = doc["subject"]
            name, digest = subject["name"], subject["digest"]["blake3"]
            pred = doc["predicate"]
            files: dict[str, dict[str, Any]] = {}
            for f in pred["files"]:
                if set(f) != {"chunks", "header", "path", "size"} or f["path"] in files:
                    raise ValueError("bad file entry")
                files[f["path"]] = f
            ctx = pred["context"]
            if not isinstance(ctx, dict) or not all(isinstance(v, str) for v in ctx.values()):
                raise ValueError("bad context")
            if pred["kind"] not in ("file", "folder") or not _HEX64.fullmatch(digest) or not files:
                raise ValueError("bad statement")
            parse_time(pred["signed_at"], "signed_at")
            # Absent in statements of older releases (version 0); when present, 1 or more.
            version = pred.get("version", 0)
            if "version" in pred and not is_version(version, 1):
                raise ValueError("bad version")
            return cls(check_name(name), digest, pred["kind"], ctx, files, pred["signed_at"], raw, version)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise VerificationError("a signature's statement is malformed") from None

    def matches(self, actual: list[FileCommitment]) -> bool:
        """Whether this statement commits to exactly these sealed files."""
        return {f.path: f.to_json() for f in actual} == self.files


@dataclass
class Entry:
    """One signature in the file: the envelope, its statement, optional attachments."""

    envelope: dict[str, Any]
    statement: Statement
    sigs: list[EnvelopeSig]
    public_key: str | None = None
    oms: dict[str, str] | None = None
    superseded_at: str | None = None

    @property
    def id(self) -> str:
        """Stable id of a signature (used by revocation lists): SHA-256 over the signer's key
        id and the signed statement. Not over the signature bytes: ECDSA signatures are
        malleable ((r, s) and (r, n-s) both verify), so such an id could be changed by
        anyone to dodge a revocation. The statement carries the signing time, so two
        signing events never share an id; the key id is bound once the signature verifies."""
        return hashlib.sha256(self.keyid.encode() + b"\x00" + self.statement.raw).hexdigest()

    @property
    def keyid(self) -> str:
        return self.sigs[0].keyid

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"envelope": self.envelope, "id": self.id}
        if self.public_key:
            out["public_key"] = self.public_key
        if self.oms:
            out["oms"] = self.oms
        if self.superseded_at:
            out["superseded_at"] = self.superseded_at
        return out

    @classmethod
    def from_json(cls, doc: Any) -> Entry:
        if not isinstance(doc, dict) or not set(doc) <= {"envelope", "id", "public_key", "oms", "superseded_at"}:
            raise ValueError("malformed signature entry")
        payload, sigs = parse_envelope(doc.get("envelope"), PAYLOAD_TYPE)
        if len(sigs) != 1:
            raise ValueError("a modelseal signature entry holds exactly one signature")
        pk, oms = doc.get("public_key"), doc.get("oms")
        if pk is not None and not isinstance(pk, str):
            raise ValueError("malformed public key")
        if oms is not None and (not isinstance(oms, dict) or set(oms) != {"nonce", "ciphertext"}):
            raise ValueError("malformed attachment")
        entry = cls(doc["envelope"], Statement.parse(payload), sigs, pk, oms, doc.get("superseded_at"))
        if doc.get("id") != entry.id:
            raise ValueError("signature id does not match the signature")
        return entry


@dataclass
class SignatureFile:
    chunks: dict[str, bytes] = field(default_factory=dict)
    signatures: list[Entry] = field(default_factory=list)
    history: list[Entry] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        doc = {
            "chunks": {k: b64(v) for k, v in sorted(self.chunks.items())},
            "history": [e.to_json() for e in self.history],
            "mediaType": MEDIA_TYPE,
            "signatures": [e.to_json() for e in self.signatures],
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes) -> SignatureFile:
        try:
            doc = json_loads(data, max_depth=MAX_JSON_DEPTH, max_values=_SIGFILE_VALUES, error=ValueError)
            if not isinstance(doc, dict) or doc.get("mediaType") != MEDIA_TYPE:
                raise ValueError("not a modelseal signature file")
            raw_sigs, raw_hist = doc["signatures"], doc.get("history", [])
            if len(raw_sigs) + len(raw_hist) > MAX_SIGNATURES:  # counted before any is parsed
                raise ValueError("too many signatures")
            chunks = {k: unb64(v) for k, v in doc["chunks"].items()}
            for table in chunks.values():
                chunks_digest(table)  # length check
            sigs = [Entry.from_json(e) for e in raw_sigs]
            hist = [Entry.from_json(e) for e in raw_hist]
            return cls(chunks, sigs, hist)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, VerificationError) as e:
            detail = str(e) if isinstance(e, ValueError | VerificationError) else "missing or malformed field"
            raise VerificationError(f"the signature file is malformed or truncated ({detail[:100]})") from None

    @classmethod
    def load(cls, path: Path) -> SignatureFile | None:
        data = read_signature_bytes(path)
        return None if data is None else cls.parse(data)

    def save(self, path: Path) -> None:
        pending.write_signatures(path, self.to_bytes(), MAX_SIGFILE)


def supersede(old: Path, new: Path) -> None:
    """The artifact at ``old`` was replaced by new ciphertext (re-encrypted, or sealed
    over with ``--force``): its signatures no longer apply. They move to the history of
    the signature file at ``new``, the new artifact's (staged beside it until both are
    moved into place together), until the new artifact is signed. A damaged old file is
    left out rather than block the update."""
    try:
        sf = SignatureFile.load(old)
    except VerificationError:
        return
    if sf is None or not (sf.signatures or sf.history):
        return
    now = now_rfc3339()
    for e in sf.signatures:
        e.superseded_at = now
    SignatureFile(history=[*sf.history, *sf.signatures]).save(new)


def signed_output(dst: Path, force: bool) -> AbstractContextManager[Path]:
    """A temp path for a new sealed file at ``dst``; its signature file, if the caller
    writes one at ``signature_path(tmp)``, moves into place with it so that a crash at
    any point leaves ``dst`` and its signatures agreeing (``pending``)."""
    return pending.signed_output(dst, force, MAX_SIGFILE)


def sign_statement(signer: Signer, statement: Statement) -> Entry:
    env = sign_envelope(signer, PAYLOAD_TYPE, statement.raw)
    _, sigs = parse_envelope(env, PAYLOAD_TYPE)
    return Entry(env, statement, sigs, public_key=signer.public.pem())


# --- the encrypted OMS attachment -------------------------------------------------------------

_OMS_AAD = b"modelseal/v1/attachment/oms\x00"


def seal_attachment(key: bytes, entry_id: str, bundle: bytes) -> dict[str, str]:
    nonce = os.urandom(12)
    ct = AESGCM(key).encrypt(nonce, bundle, _OMS_AAD + entry_id.encode())
    return {"ciphertext": b64(ct), "nonce": b64(nonce)}


def open_attachment(key: bytes, entry: Entry) -> bytes:
    if not entry.oms:
        raise DecryptionError()
    try:
        nonce, ct = unb64(entry.oms["nonce"], 64), unb64(entry.oms["ciphertext"])
        return AESGCM(key).decrypt(nonce, ct, _OMS_AAD + entry.id.encode())
    except (ValueError, InvalidTag):
        raise DecryptionError() from None


def read_signature_bytes(path: Path, error: type[ModelsealError] = VerificationError) -> bytes | None:
    """The bytes of the signature file at ``path`` (None if there is none), bounded, a regular
    file only; unreadable raises ``error``. After a crash while ``X`` was being replaced, the
    new artifact's signatures may still be pending: they are the ones that agree with what
    is at ``X`` now (``pending.journaled``)."""
    data = pending.journaled(path, MAX_SIGFILE)
    if data is None:
        try:
            data = read_limited(path, MAX_SIGFILE, error, str(path), regular=True)
        except FileNotFoundError:
            return None
    return data
