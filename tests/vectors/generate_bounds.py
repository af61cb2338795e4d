"""Generate the manifest-bound vectors (docs/format.md, section 8: path length and depth,
JSON nesting, sizes, and the linear file-versus-folder rule).

    python tests/vectors/generate_bounds.py

Each vector is a sealed folder ``bounds-*.sealed`` under ``local:vector-kek`` of
``home/keystore.json`` (the keystore of generate.py, used read-only), context
``env=dev``. The manifest is encoded here, by hand, because the library refuses to seal
the folders readers must refuse. Every blob the manifest names is present and valid,
so the manifest alone decides the outcome:

- ``bounds-ok-*``: at the limits (a 4096-byte path, in ASCII and in two-byte UTF-8; a
  path of 256 segments; a file whose name starts another entry's folder name):
  ``success``, and each member reads back;
- ``bounds-bad-*``: just beyond a limit, or the exploit of the review (a 130 KiB
  manifest with one path 65,000 segments deep, which exhausted 1 GiB): ``header
  failure``, refused before any quadratic work.

Writes ``bounds-*.sealed/`` and ``bounds.json``. Like the other vectors, once released
these MUST keep their outcome in every later release: add new files, never regenerate.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from modelseal.audit.events import MemorySink  # noqa: E402
from modelseal.format.envelope import HeaderPlan  # noqa: E402
from modelseal.format.file import canonical_json, write_sealed  # noqa: E402
from modelseal.format.header import (  # noqa: E402
    DEFAULT_CHUNK_LOG2,
    DEFAULT_SLOT,
    KIND_BLOB,
    KIND_MANIFEST,
    normalize_context,
)
from modelseal.format.stream import ReadAt  # noqa: E402
from modelseal.keys import keystore  # noqa: E402
from modelseal.keys.providers.local import LocalProvider  # noqa: E402
from modelseal.keys.service import KeyService  # noqa: E402

PASSPHRASE = b"modelseal-test-vectors"
KEY = "local:vector-kek"
CONTEXT = normalize_context({"env": "dev"})
FORMAT = "modelseal-manifest/1"

LONG_ASCII = "long/" + "x" * 4091  # 4096 bytes
LONG_UTF8 = "utf8/" + "\u00e9" * 2045 + "x"  # 4096 bytes, 2051 characters
DEEP = "d/" * 255 + "f"  # 256 segments

# (folder, [(path, size override or None)], raw manifest or None, expect, note)
CASES: list[tuple[str, list[tuple[str, int | None]], bytes | None, str, str]] = [
    (
        "bounds-ok-limits.sealed",
        [(LONG_ASCII, None), (DEEP, None), ("p", None), ("p!x", None), ("p.y/z", None), (LONG_UTF8, None)],
        None,
        "success",
        "a 4096-byte path (ASCII, and 2-byte UTF-8), 256 segments, p beside p!x and p.y/z",
    ),
    ("bounds-bad-path-4097.sealed", [(LONG_ASCII + "x", None)], None, "header failure", "a 4097-byte ASCII path"),
    (
        "bounds-bad-path-4097-utf8.sealed",
        [("utf8/" + "\u00e9" * 2046, None)],
        None,
        "header failure",
        "a 4097-byte path of 2051 characters: the bound is in bytes",
    ),
    ("bounds-bad-257-segments.sealed", [("d/" * 256 + "f", None)], None, "header failure", "257 segments"),
    (
        "bounds-bad-parent-not-adjacent.sealed",
        [("p", None), ("p!x", None), ("p/z", None)],
        None,
        "header failure",
        "p is a file and the folder of p/z, with p!x sorted between them",
    ),
    ("bounds-bad-size-2-64.sealed", [("a", 1 << 64)], None, "header failure", "a size of 2^64"),
    (
        "bounds-bad-exploit-depth.sealed",
        [("a/" * 64_999 + "a", None)],
        None,
        "header failure",
        "the review's exploit: a 130 KiB manifest, one path 65,000 segments deep",
    ),
    (
        "bounds-bad-json-depth.sealed",
        [],
        b'{"files":' + b"[" * 50_000 + b"]" * 50_000 + b',"format":"' + FORMAT.encode() + b'"}',
        "header failure",
        "files nested 50,000 lists deep (the JSON parser must not recurse on it)",
    ),
]


def bytes_reader(data: bytes) -> ReadAt:
    view = memoryview(data)

    def read_at(buf: memoryview, offset: int) -> None:
        buf[:] = view[offset : offset + len(buf)]

    return read_at


def seal_one(
    svc: KeyService | None, dst: Path, data: bytes, dek: bytes, kind: int, meta: Callable[[str], bytes]
) -> tuple[str, str]:
    """One sealed file, as the library seals a blob or a manifest; returns (plaintext
    sha256, header MAC hex)."""
    plan = HeaderPlan(
        dek=dek,
        kind=kind,
        chunk_log2=DEFAULT_CHUNK_LOG2,
        plaintext_length=len(data),
        context=CONTEXT,
        slot_size=DEFAULT_SLOT,
    )
    recipients = (svc.wrap(KEY, dek, CONTEXT, plan.artifact_id),) if svc is not None else ()
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        digest, _ = write_sealed(bytes_reader(data), fd, plan, meta, len(meta("0" * 64)), recipients)
    finally:
        os.close(fd)
    return digest, plan.mac.hex()


def manifest_metadata(count: int) -> Callable[[str], bytes]:
    return lambda digest: canonical_json({"files": count, "sha256": digest})


def content(path: str) -> bytes:
    return f"member {hashlib.sha256(path.encode()).hexdigest()[:16]}\n".encode()


def main() -> None:
    index: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        shutil.copytree(HERE / "home", home)
        path = keystore.keystore_path(home)
        path.chmod(0o600)
        provider = LocalProvider(path=path, passphrase=lambda: PASSPHRASE)
        svc = KeyService(sink=MemorySink(), providers={"local": provider})
        for name, members, raw, expect, note in CASES:
            root = HERE / name
            shutil.rmtree(root, ignore_errors=True)
            (root / "blobs").mkdir(parents=True)
            dek = os.urandom(32)
            entries, files = [], {}
            for rel, size in sorted(members, key=lambda m: m[0].encode()):
                blob, data = secrets.token_hex(16), content(rel)
                sha, mac = seal_one(None, root / "blobs" / blob, data, dek, KIND_BLOB, lambda _d: b"{}")
                entries.append({"blob": blob, "header_mac": mac, "path": rel, "sha256": sha, "size": size or len(data)})
                files[rel] = sha
            manifest = raw if raw is not None else canonical_json({"files": entries, "format": FORMAT})
            meta = manifest_metadata(len(entries))
            seal_one(svc, root / "manifest.mseal", manifest, dek, KIND_MANIFEST, meta)
            index.append(
                {
                    "folder": name,
                    "expect": expect,
                    "note": note,
                    "manifest_length": len(manifest),
                    "files": files if expect == "success" else None,
                    "dek": dek.hex(),
                }
            )
    doc = {"passphrase": PASSPHRASE.decode(), "key": KEY, "vectors": index}
    (HERE / "bounds.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
