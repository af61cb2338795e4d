"""Generate the golden test vectors in this folder.

    python tests/vectors/generate.py

Writes ``home/keystore.json`` (passphrase ``modelseal-test-vectors``, key
``local:vector-kek``), one file per vector, and ``index.json`` listing each
vector's expected outcome: success, header failure, payload failure, wrong key,
not sealed or unsupported. Vectors are committed; once released they MUST keep
giving the same outcome in every later release, so do not regenerate released
ones: add new files instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from modelseal import keystore  # noqa: E402
from modelseal.audit.events import MemorySink  # noqa: E402
from modelseal.format.envelope import HeaderPlan  # noqa: E402
from modelseal.format.file import canonical_json, write_sealed  # noqa: E402
from modelseal.format.header import KIND_FILE, TAG_LEN, normalize_context  # noqa: E402
from modelseal.format.stream import fd_reader  # noqa: E402
from modelseal.keys.providers.local import LocalProvider  # noqa: E402
from modelseal.keys.service import KeyService  # noqa: E402

PASSPHRASE = b"modelseal-test-vectors"
CHUNK_LOG2 = 16  # 64 KiB chunks keep multi-chunk vectors small


def seal_bytes(
    svc: KeyService, data: bytes, name: str, context: dict[str, str], key: str = "vector-kek"
) -> tuple[bytes, bytes]:
    dek = os.urandom(32)
    ctx = normalize_context(context)
    plan = HeaderPlan(
        dek=dek, kind=KIND_FILE, chunk_log2=CHUNK_LOG2, plaintext_length=len(data), context=ctx, slot_size=1024
    )
    src = HERE / ".src.tmp"
    dst = HERE / ".dst.tmp"
    src.write_bytes(data)
    try:
        sfd = os.open(src, os.O_RDONLY)
        dfd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:

            def meta(d: str) -> bytes:
                return canonical_json({"name": name, "sha256": d, "size": len(data)})

            recips = (svc.wrap(key, dek, ctx),)
            write_sealed(fd_reader(sfd), dfd, plan, meta, len(meta("0" * 64)), recips)
        finally:
            os.close(sfd)
            os.close(dfd)
        return dst.read_bytes(), dek
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def main() -> None:
    rng = random.Random(20261127)
    home = HERE / "home"
    shutil.rmtree(home, ignore_errors=True)
    keystore.create(keystore.keystore_path(home), PASSPHRASE, scrypt_log2_n=14)
    provider = LocalProvider(path=keystore.keystore_path(home), passphrase=lambda: PASSPHRASE)
    svc = KeyService(sink=MemorySink(), providers={"local": provider})
    provider.create("vector-kek")
    index: list[dict[str, object]] = []

    def add(name: str, blob: bytes, expect: str, plain: bytes | None, dek: bytes | None, note: str) -> None:
        (HERE / name).write_bytes(blob)
        index.append(
            {
                "file": name,
                "expect": expect,
                "note": note,
                "plaintext_sha256": hashlib.sha256(plain).hexdigest() if plain is not None else None,
                "plaintext_length": len(plain) if plain is not None else None,
                "dek": dek.hex() if dek is not None else None,
            }
        )

    C = 1 << CHUNK_LOG2
    empty, dek_e = seal_bytes(svc, b"", "empty.bin", {})
    add("ok-empty.mseal", empty, "success", b"", dek_e, "empty plaintext: one empty final chunk")
    small = bytes(rng.getrandbits(8) for _ in range(100))
    s, dek_s = seal_bytes(svc, small, "small.bin", {"env": "dev", "artifact": "vector"})
    add("ok-small.mseal", s, "success", small, dek_s, "one chunk, context env=dev artifact=vector")
    exact = bytes(rng.getrandbits(8) for _ in range(C))
    e, dek_x = seal_bytes(svc, exact, "exact.bin", {})
    add("ok-one-full-chunk.mseal", e, "success", exact, dek_x, "exactly one chunk")
    multi = bytes(rng.getrandbits(8) for _ in range(2 * C + 1))
    m, dek_m = seal_bytes(svc, multi, "multi.bin", {"env": "prod"})
    add("ok-three-chunks.mseal", m, "success", multi, dek_m, "two full chunks and one byte")

    off = len(m) - (len(multi) + 3 * TAG_LEN)
    flip = bytearray(m)
    flip[off + C + TAG_LEN + 5] ^= 0x80
    add("payload-flipped-chunk1.mseal", bytes(flip), "payload failure", None, dek_m, "bit flip inside chunk 1")
    sw = (
        m[:off]
        + m[off + C + TAG_LEN : off + 2 * (C + TAG_LEN)]
        + m[off : off + C + TAG_LEN]
        + m[off + 2 * (C + TAG_LEN) :]
    )
    add("payload-swapped-chunks.mseal", sw, "payload failure", None, dek_m, "chunks 0 and 1 swapped")
    hdr = bytearray(s)
    hdr[60] ^= 0x01
    add("header-flipped-salt.mseal", bytes(hdr), "header failure", None, None, "bit flip in the salt")
    ctx = s.replace(b"dev", b"prd", 1)
    add("header-changed-context.mseal", ctx, "header failure", None, None, "context value dev -> prd")
    add("header-truncated.mseal", m[:-1], "header failure", None, None, "last byte removed (length check)")
    add("header-trailing-data.mseal", s + b"\x00", "header failure", None, None, "one byte appended")
    spliced = m[:off] + s[len(s) - 100 - TAG_LEN :]
    add("header-other-payload.mseal", spliced, "header failure", None, None, "header of one file, payload of another")

    # Same key name and context, another keystore: the wrap does not open here.
    other_home = HERE / ".other-home"
    shutil.rmtree(other_home, ignore_errors=True)
    keystore.create(keystore.keystore_path(other_home), b"other", scrypt_log2_n=14)
    other = LocalProvider(path=keystore.keystore_path(other_home), passphrase=lambda: b"other")
    other.create("vector-kek")
    wk, _ = seal_bytes(KeyService(sink=MemorySink(), providers={"local": other}), small, "small.bin", {})
    shutil.rmtree(other_home)
    keystore.clear_cache()
    add("wrong-key.mseal", wk, "wrong key", None, None, "sealed to a vector-kek of another keystore")

    add("not-sealed.bin", b"PK\x03\x04" + bytes(60), "not sealed", None, None, "a zip header, not a sealed file")
    unsupported = bytearray(s)
    unsupported[9] = 2
    add("unsupported-version.mseal", bytes(unsupported), "unsupported", None, None, "format version 2")

    (HERE / "index.json").write_text(
        json.dumps(
            {"passphrase": PASSPHRASE.decode(), "key": "local:vector-kek", "chunk_size": C, "vectors": index}, indent=1
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
