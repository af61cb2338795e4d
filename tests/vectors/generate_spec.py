"""Generate the vectors of the rules that had none (docs/format.md, "Implementing a reader").

    python tests/vectors/generate_spec.py

Writes ``spec-*.mseal`` (lone files), ``spec-*.sealed/`` (folders), ``spec-*.msig``
(signature files), ``home-states/keystore.json`` (a second vector keystore, passphrase
``modelseal-test-vectors``, whose key ``states-kek`` has a version in every state) and
``spec.json``: each vector's expected outcome, the exception class, the stage it is
raised at and the exit code of ``modelseal unseal``. ``home/keystore.json`` (generate.py)
is used read-only.

The files are encoded here, partly by hand, because the library refuses to write what
readers must refuse. Like every vector, once released these MUST keep their outcome in
every later release: add new files, never regenerate released ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: E402

from modelseal.audit.events import MemorySink  # noqa: E402
from modelseal.format.envelope import HeaderPlan, new_slot_bytes, verify_with_dek  # noqa: E402
from modelseal.format.file import canonical_json, write_sealed  # noqa: E402
from modelseal.format.header import (  # noqa: E402
    KIND_BLOB,
    KIND_FILE,
    KIND_MANIFEST,
    MAGIC,
    TAG_LEN,
    Recipient,
    normalize_context,
    parse_core,
)
from modelseal.format.stream import ReadAt  # noqa: E402
from modelseal.keys import keystore  # noqa: E402
from modelseal.keys.providers.local import LocalProvider  # noqa: E402
from modelseal.keys.service import KeyService  # noqa: E402
from modelseal.signing.commitment import artifact_digest, hash_sealed_file  # noqa: E402
from modelseal.signing.sigfile import PREDICATE_TYPE, STATEMENT_TYPE, SignatureFile, Statement, sign_statement  # noqa: E402
from modelseal.signing.signers import PemSigner  # noqa: E402

PASSPHRASE = b"modelseal-test-vectors"
KEY = "local:vector-kek"
CHUNK_LOG2 = 16
FORMAT = "modelseal-manifest/1"
SEED = bytes(range(32))  # generate_signatures.py's published test key
SIGNED_AT = "2026-11-27T00:00:00Z"
CENTURY = 100 * 365 * 86400.0

Meta = Callable[[str], bytes]


def reader(data: bytes) -> ReadAt:
    view = memoryview(data)

    def read_at(buf: memoryview, offset: int) -> None:
        buf[:] = view[offset : offset + len(buf)]

    return read_at


def seal(
    svc: KeyService | None,
    data: bytes,
    meta: Meta,
    *,
    kind: int = KIND_FILE,
    context: dict[str, str] | None = None,
    slot: int = 1024,
    dek: bytes | None = None,
    key: str = KEY,
) -> tuple[bytes, bytes, str]:
    """One sealed file as bytes, with the metadata ``meta(sha256)``; returns (bytes, dek, header MAC hex)."""
    dek = dek or os.urandom(32)
    ctx = normalize_context(context or {})
    plan = HeaderPlan(
        dek=dek, kind=kind, chunk_log2=CHUNK_LOG2, plaintext_length=len(data), context=ctx, slot_size=slot
    )
    recips = (svc.wrap(key, dek, ctx, plan.artifact_id),) if svc is not None and kind != KIND_BLOB else ()
    with tempfile.TemporaryFile() as f:
        write_sealed(reader(data), f.fileno(), plan, meta, len(meta("0" * 64)), recips)
        f.seek(0)
        return f.read(), dek, plan.mac.hex()


def file_meta(name: str, size: int) -> Meta:
    return lambda d: canonical_json({"name": name, "sha256": d, "size": size})


def with_slot(blob: bytes, dek: bytes, generation: int, recipients: tuple[Recipient, ...]) -> bytes:
    """``blob`` with slot A rewritten (a valid slot MAC) and slot B empty."""
    core = parse_core(blob)
    keys = verify_with_dek(core, dek)
    slot = new_slot_bytes(core, keys, generation, recipients)
    off = core.slots_offset
    return blob[:off] + slot + bytes(core.slot_size) + blob[off + 2 * core.slot_size :]


def first_recipient(blob: bytes) -> Recipient:
    from modelseal.format.header import parse_slot

    core = parse_core(blob)
    slot = parse_slot(blob[core.slots_offset : core.slots_offset + core.slot_size])
    assert slot is not None
    return slot.recipients[0]


class Folder:
    """A sealed folder written by hand: blobs, then the manifest (overridable at each step)."""

    def __init__(self, svc: KeyService, members: list[tuple[str, bytes]]) -> None:
        self.svc, self.dek = svc, os.urandom(32)
        self.blobs: dict[str, bytes] = {}
        self.entries: list[dict[str, Any]] = []
        for path, data in sorted(members, key=lambda m: m[0].encode()):
            self.add(path, data, b"{}")

    def add(self, path: str, data: bytes, meta: bytes) -> dict[str, Any]:
        blob_id = secrets.token_hex(16)
        sealed, _, mac = seal(None, data, lambda _d: meta, kind=KIND_BLOB, context={"env": "dev"}, dek=self.dek)
        self.blobs[blob_id] = sealed
        entry = {"blob": blob_id, "header_mac": mac, "path": path, "sha256": hashlib.sha256(data).hexdigest()}
        entry["size"] = len(data)
        self.entries.append(entry)
        return entry

    def write(
        self, root: Path, manifest: bytes | None = None, meta: Meta | None = None, kind: int = KIND_MANIFEST
    ) -> None:
        shutil.rmtree(root, ignore_errors=True)
        (root / "blobs").mkdir(parents=True)
        for blob_id, sealed in self.blobs.items():
            (root / "blobs" / blob_id).write_bytes(sealed)
        manifest = manifest if manifest is not None else canonical_json({"files": self.entries, "format": FORMAT})
        count = len(self.entries)
        meta = meta or (lambda d: canonical_json({"files": count, "sha256": d}))
        if kind == KIND_FILE:
            meta = file_meta("manifest", len(manifest))
        sealed, _, _ = seal(self.svc, manifest, meta, kind=kind, context={"env": "dev"}, slot=4096, dek=self.dek)
        (root / "manifest.mseal").write_bytes(sealed)


def states_home() -> tuple[KeyService, LocalProvider]:
    home = HERE / "home-states"
    shutil.rmtree(home, ignore_errors=True)
    keystore.create(keystore.keystore_path(home), PASSPHRASE, scrypt_log2_n=14)
    provider = LocalProvider(path=keystore.keystore_path(home), passphrase=lambda: PASSPHRASE)
    return KeyService(sink=MemorySink(), providers={"local": provider}), provider


def main() -> None:
    index: list[dict[str, Any]] = []

    def add(vector: str, blob: bytes | None, expect: str, note: str, **extra: Any) -> None:
        if blob is not None:
            (HERE / vector).write_bytes(blob)
        index.append({"path": vector, "expect": expect, "note": note, "home": "home", **extra})

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        shutil.copytree(HERE / "home", home)
        (home / "keystore.json").chmod(0o600)
        provider = LocalProvider(path=keystore.keystore_path(home), passphrase=lambda: PASSPHRASE)
        svc = KeyService(sink=MemorySink(), providers={"local": provider})

        # -- empty plaintexts: the one empty chunk must authenticate (section 6) --------
        empty, _, _ = seal(svc, b"", file_meta("empty.bin", 0))
        flipped = bytearray(empty)
        flipped[-1] ^= 0x01
        add("spec-empty-flipped-tag.mseal", bytes(flipped), "payload failure", "L = 0, last tag bit flipped")
        add("spec-empty-zeroed-tag.mseal", empty[:-TAG_LEN] + bytes(TAG_LEN), "payload failure", "L = 0, tag zeroed")

        # -- the prefix: magic, version, suite (section 3) -------------------------------
        small = bytes(range(100))
        ok, dek_ok, _ = seal(svc, small, file_meta("small.bin", 100))
        add("spec-short-magic.bin", MAGIC[:5], "not sealed", "5 bytes, a prefix of the magic")
        add("spec-cut-in-version.mseal", ok[:9], "header failure", "the magic and one byte of the version")
        add(
            "spec-cut-in-suite.mseal", ok[:21], "header failure", "cut inside the suite (suite_len 38, 10 of its bytes)"
        )
        suite_end = 11 + ok[10]
        add(
            "spec-suite-len-0.mseal",
            ok[:10] + b"\x00" + ok[suite_end:],
            "unsupported",
            "suite_len 0: not a known suite",
        )
        add(
            "spec-suite-len-65.mseal",
            ok[:10] + b"\x41" + ok[11:suite_end] + b"X" * (65 - ok[10]) + ok[suite_end:],
            "unsupported",
            "suite_len 65: not a known suite",
        )

        # -- metadata, checked on open (section 7) ---------------------------------------
        meta_cases = [
            ("size-not-L", '{"name":"small.bin","sha256":"{sha}","size":101}', "size 101, L = 100"),
            ("white-space", '{"name": "small.bin","sha256":"{sha}","size":100}', "a space after a colon"),
            ("unsorted", '{"sha256":"{sha}","name":"small.bin","size":100}', "keys not in code-point order"),
            ("duplicate-key", '{"name":"a","name":"small.bin","sha256":"{sha}","size":100}', "a duplicate key"),
            ("extra-key", '{"name":"small.bin","sha256":"{sha}","size":100,"x":1}', "a key section 7 has not"),
            ("float-size", '{"name":"small.bin","sha256":"{sha}","size":100.0}', "size written as a float"),
            ("escaped-utf8", '{"name":"\\u00e9.bin","sha256":"{sha}","size":100}', "\\u00e9 where raw UTF-8 is due"),
            ("escaped-slash", '{"name":"a\\/b","sha256":"{sha}","size":100}', "\\/ where / is due"),
            ("upper-hex", '{"name":"small.bin","sha256":"{SHA}","size":100}', "sha256 in upper-case hex"),
        ]
        for label, template, note in meta_cases:

            def meta(d: str, t: str = template) -> bytes:
                return t.replace("{sha}", d).replace("{SHA}", d.upper()).encode()

            blob, _, _ = seal(svc, small, meta)
            add(f"spec-meta-{label}.mseal", blob, "header failure", f"metadata: {note}")
        name = 'q"b\\s\n\x1f\x7f\u00e9\u2028\U0001f600'
        blob, dek_u, _ = seal(svc, small, file_meta(name, 100))
        add(
            "spec-ok-meta-escapes.mseal",
            blob,
            "success",
            'canonical escapes: name q"b\\s, LF, U+001F, DEL, e-acute, U+2028, U+1F600',
            sha256=hashlib.sha256(small).hexdigest(),
            metadata_name=name,
            dek=dek_u.hex(),
        )

        # -- the largest header the bounds allow (sections 3, 4) -------------------------
        ctx = {f"{i:02d}" + "k" * 62: "v" * 1024 for i in range(64)}
        pad = "n" * (65536 - len(canonical_json({"name": "", "sha256": "0" * 64, "size": 1})))
        big, dek_b, _ = seal(svc, b"m", file_meta(pad, 1), context=ctx, slot=16384)
        core = parse_core(big)
        assert len(core.raw) == 135_539 and core.payload_offset == 172_032, (len(core.raw), core.payload_offset)
        add(
            "spec-ok-maximal-header.mseal",
            big,
            "success",
            "64 context entries of 64 + 1024 bytes, 65,552 bytes of metadata, 16 KiB slots: payload at 172,032",
            sha256=hashlib.sha256(b"m").hexdigest(),
            dek=dek_b.hex(),
        )

        # -- slots: generation at the limit, key_version out of the keystore -------------
        r = first_recipient(ok)
        gen_max = with_slot(ok, dek_ok, (1 << 64) - 1, (r,))
        add(
            "spec-generation-max.mseal",
            gen_max,
            "success",
            "slot generation 2^64 - 1: opens; rewrap refuses (exit 7)",
            sha256=hashlib.sha256(small).hexdigest(),
            rewrap_exit=7,
        )
        for version, label in ((0, "0"), ((1 << 32) - 1, "max")):
            bad = Recipient(r.scheme, r.key_id, version, r.wrapped)
            add(
                f"spec-key-version-{label}.mseal",
                with_slot(ok, dek_ok, 1, (bad,)),
                "key not found",
                f"local:vector-kek version {version}: a u32, but no such version",
            )

        # -- lone files of the wrong kind (section 10) -----------------------------------
        folder = Folder(svc, [("a.txt", b"alpha\n"), ("empty", b"")])
        folder.write(HERE / "spec-ok-folder.sealed")
        add(
            "spec-ok-folder.sealed",
            None,
            "success",
            "a folder with a 6-byte and an empty member; e.size is the plaintext length",
            files={e["path"]: e["sha256"] for e in folder.entries},
        )
        manifest = (HERE / "spec-ok-folder.sealed" / "manifest.mseal").read_bytes()
        add("spec-kind-2-lone.mseal", manifest, "wrong kind", "a folder's manifest.mseal given as a lone file")
        first_blob = next(iter(folder.blobs.values()))
        add("spec-kind-3-lone.mseal", first_blob, "wrong kind", "a folder's blob given as a lone file")

        # -- folders ---------------------------------------------------------------------
        def folder_case(name: str, expect: str, note: str, build: Callable[[Folder, Path], None], **extra: Any) -> None:
            f = Folder(svc, [("a.txt", b"alpha\n"), ("b.txt", b"beta\n")])
            root = HERE / name
            build(f, root)
            add(name, None, expect, note, **extra)

        def empty_blob(how: str) -> Callable[[Folder, Path], None]:
            def build(f: Folder, root: Path) -> None:
                e = f.add("c-empty", b"", b"{}")
                sealed = bytearray(f.blobs[e["blob"]])
                if how == "flipped":
                    sealed[-3] ^= 0x40
                else:
                    sealed[-TAG_LEN:] = bytes(TAG_LEN)
                f.blobs[e["blob"]] = bytes(sealed)
                f.write(root)

            return build

        folder_case(
            "spec-folder-empty-blob-flipped.sealed",
            "payload failure",
            "the empty member's blob has a flipped tag bit",
            empty_blob("flipped"),
            stage="member",
            member="c-empty",
        )
        folder_case(
            "spec-folder-empty-blob-zeroed.sealed",
            "payload failure",
            "the empty member's blob has a zeroed tag",
            empty_blob("zeroed"),
            stage="member",
            member="c-empty",
        )

        def hand_manifest(old: str, new: str) -> Callable[[Folder, Path], None]:
            def build(f: Folder, root: Path) -> None:
                doc = canonical_json({"files": f.entries, "format": FORMAT})
                assert old.encode() in doc, old
                f.write(root, manifest=doc.replace(old.encode(), new.encode("utf-8", "surrogatepass"), 1))

            return build

        manifest_cases = [
            ("surrogate-escaped", '"path":"a.txt"', '"path":"a\\ud800"', "a path holding an escaped lone surrogate"),
            ("surrogate-raw", '"path":"a.txt"', '"path":"a\ud800"', "a path holding a raw (CESU-8) lone surrogate"),
            ("escaped-path", '"path":"a.txt"', '"path":"\\u0061.txt"', "path a.txt written with a \\u escape"),
            ("blob-dotdot", '"blob":"', '"blob":"../', "a blob id with ../ in front"),
            ("format-2", '"format":"modelseal-manifest/1"', '"format":"modelseal-manifest/2"', "format value /2"),
            ("size-float", '"size":6', '"size":6.0', "a size written as a float"),
            ("missing-sha256", '"sha256":"', '"sha25X":"', "an entry without sha256 (another key instead)"),
        ]
        for label, old, new, note in manifest_cases:
            folder_case(f"spec-folder-{label}.sealed", "header failure", note, hand_manifest(old, new), stage="folder")

        def upper(field: str) -> Callable[[Folder, Path], None]:
            def build(f: Folder, root: Path) -> None:
                f.entries[0][field] = f.entries[0][field].upper()
                f.write(root)

            return build

        for field in ("blob", "header_mac", "sha256"):
            label = field.replace("_", "-")
            folder_case(
                f"spec-folder-upper-{label}.sealed",
                "header failure",
                f"{field} in upper-case hex",
                upper(field),
                stage="folder",
            )

        def file_length_size(f: Folder, root: Path) -> None:
            f.entries[0]["size"] = len(f.blobs[f.entries[0]["blob"]])
            f.write(root)

        folder_case(
            "spec-folder-size-is-file-length.sealed",
            "header failure",
            "e.size of a.txt holds the blob's file length, not its plaintext length",
            file_length_size,
            stage="member",
            member="a.txt",
        )

        def count_off(f: Folder, root: Path) -> None:
            f.write(root, meta=lambda d: canonical_json({"files": 3, "sha256": d}))

        folder_case(
            "spec-folder-count-off.sealed",
            "header failure",
            "metadata files = 3, two entries",
            count_off,
            stage="folder",
        )

        def digest_off(f: Folder, root: Path) -> None:
            f.write(root, meta=lambda d: canonical_json({"files": 2, "sha256": "0" * 64}))

        folder_case(
            "spec-folder-digest-off.sealed",
            "header failure",
            "metadata sha256 not the manifest's",
            digest_off,
            stage="folder",
        )

        def blob_meta(f: Folder, root: Path) -> None:
            f.add("c", b"gamma\n", b'{"name":"c"}')
            f.write(root)

        folder_case(
            "spec-folder-blob-metadata.sealed",
            "header failure",
            'member c\'s blob has metadata {"name":"c"}, not {}',
            blob_meta,
            stage="member",
            member="c",
        )

        def missing_blob(f: Folder, root: Path) -> None:
            f.write(root)
            (root / "blobs" / f.entries[1]["blob"]).unlink()

        folder_case(
            "spec-folder-missing-blob.sealed",
            "header failure",
            "the blob of b.txt is missing",
            missing_blob,
            stage="member",
            member="b.txt",
        )

        def extra_blob(f: Folder, root: Path) -> None:
            f.write(root)
            (root / "blobs" / secrets.token_hex(16)).write_bytes(next(iter(f.blobs.values())))

        folder_case(
            "spec-folder-extra-blob.sealed",
            "success",
            "an unreferenced copy of a blob: opens (open never lists blobs/); verify refuses it",
            extra_blob,
            files={"a.txt": hashlib.sha256(b"alpha\n").hexdigest(), "b.txt": hashlib.sha256(b"beta\n").hexdigest()},
            verify_exit=10,
        )

        def no_manifest(f: Folder, root: Path) -> None:
            f.write(root)
            (root / "manifest.mseal").unlink()

        folder_case("spec-folder-no-manifest.sealed", "not sealed", "blobs/ but no manifest.mseal", no_manifest)

        def kind_1(f: Folder, root: Path) -> None:
            f.write(root, kind=KIND_FILE)

        folder_case(
            "spec-folder-manifest-kind-1.sealed", "wrong kind", "manifest.mseal is a kind-1 sealed file", kind_1
        )

        # -- signature files: the chunk table (section 11.3) -----------------------------
        signer = PemSigner(ed25519.Ed25519PrivateKey.from_private_bytes(SEED))
        signed = HERE / "spec-signed.mseal"
        signed.write_bytes(ok)
        raw, c = hash_sealed_file(signed, ".")
        doc = {
            "_type": STATEMENT_TYPE,
            "predicate": {
                "context": dict(raw.core.context),
                "files": [c.to_json()],
                "kind": "file",
                "signed_at": SIGNED_AT,
                "version": 1,
            },
            "predicateType": PREDICATE_TYPE,
            "subject": [{"digest": {"blake3": artifact_digest([c])}, "name": "spec-signed"}],
        }
        entry = sign_statement(signer, Statement.parse(canonical_json(doc)))
        SignatureFile({".": c.table}, [entry]).save(HERE / "spec-signed.mseal.msig")
        wrong = bytearray(c.table)
        wrong[0] ^= 0x01
        SignatureFile({".": bytes(wrong)}, [entry]).save(HERE / "spec-signed-bad-chunks.msig")
        SignatureFile({}, [entry]).save(HERE / "spec-signed-no-chunks.msig")
        SignatureFile({".": c.table, "blobs/" + "0" * 32: c.table}, [entry]).save(
            HERE / "spec-signed-extra-chunks.msig"
        )
        sigs = [
            {"signature": "spec-signed.mseal.msig", "verify_exit": 0, "note": "the good signature file"},
            {"signature": "spec-signed-bad-chunks.msig", "verify_exit": 10, "note": "chunk table, one bit flipped"},
            {"signature": "spec-signed-no-chunks.msig", "verify_exit": 10, "note": "no chunk table"},
            {"signature": "spec-signed-extra-chunks.msig", "verify_exit": 10, "note": "a table for a file not there"},
        ]

        # -- key states (section 9): a second keystore -----------------------------------
        states_svc, states = states_home()
        states.create("states-kek")
        by_version: dict[int, bytes] = {}
        for v in range(1, 6):
            if v > 1:
                states.rotate("states-kek")
            by_version[v], _, _ = seal(states_svc, small, file_meta("small.bin", 100), key="local:states-kek")
        states.set_min_decryption_version("states-kek", 2)
        states.set_version_state("states-kek", 2, "disabled")
        states.destroy("states-kek", 3, after=CENTURY)
        states.destroy("states-kek", 4)
        state_cases = [
            (1, "key disabled", "version 1, active but below min_decryption_version 2"),
            (2, "key disabled", "version 2, disabled"),
            (3, "key disabled", "version 3, pending-destroy (destroy_after a century away)"),
            (4, "key disabled", "version 4, destroyed"),
            (5, "success", "version 5, active"),
        ]
        for v, expect, note in state_cases:
            extra = {"sha256": hashlib.sha256(small).hexdigest()} if expect == "success" else {}
            add(f"spec-key-state-v{v}.mseal", by_version[v], expect, "local:states-kek " + note, **extra)
            index[-1]["home"] = "home-states"
        r5 = first_recipient(by_version[5])
        ghost, dek_g, _ = seal(states_svc, small, file_meta("small.bin", 100), key="local:states-kek")
        rg = first_recipient(ghost)
        add(
            "spec-key-no-such-version.mseal",
            with_slot(ghost, dek_g, 1, (Recipient(rg.scheme, rg.key_id, 6, rg.wrapped),)),
            "key not found",
            "local:states-kek version 6: the key has versions 1 to 5",
        )
        index[-1]["home"] = "home-states"
        add(
            "spec-key-no-such-name.mseal",
            with_slot(ghost, dek_g, 1, (Recipient(r5.scheme, "no-such-kek", 1, rg.wrapped),)),
            "key not found",
            "local:no-such-kek: no such key name (key_id is the key name)",
        )
        index[-1]["home"] = "home-states"
        keystore.clear_cache()

    (HERE / "home-states" / "keystore.json").chmod(0o644)  # as a checkout has it
    out = {"passphrase": PASSPHRASE.decode(), "key": KEY, "vectors": index, "signatures": sigs}
    (HERE / "spec.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
