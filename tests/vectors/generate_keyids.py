"""Generate the key-id vectors (docs/format.md, section 4: the characters a key id may hold).

    python tests/vectors/generate_keyids.py

Each vector is a sealed file under ``local:vector-kek`` of ``home/keystore.json`` (the
keystore of generate.py, used read-only) whose slot A holds two recipients: first one
whose key id is the one under test, then a valid wrap of the data key. The slot MAC is
correct (it is computed with the data key), so the key id is the only thing that
decides the outcome:

- ``keyid-ok-*``: the key id is allowed; the first recipient is unavailable (no such
  provider or key) and the second opens the file: ``success``;
- ``keyid-bad-*``: the key id holds a forbidden character; the whole slot is malformed,
  so nothing opens the file (``header failure``), although the second recipient would.

The slot is encoded here, by hand, because the library refuses to write such key ids.
Writes ``keyid-*.mseal`` and ``keyids.json``. Like the other vectors, once released
these MUST keep their outcome in every later release: add new files, never regenerate.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from modelseal.audit.events import MemorySink  # noqa: E402
from modelseal.format.envelope import HeaderPlan, derive_file_keys, slot_mac  # noqa: E402
from modelseal.format.file import canonical_json, write_sealed  # noqa: E402
from modelseal.format.header import KIND_FILE, parse_core, parse_slot, slots_offset  # noqa: E402
from modelseal.format.stream import fd_reader  # noqa: E402
from modelseal.keys import keystore  # noqa: E402
from modelseal.keys.providers.local import LocalProvider  # noqa: E402
from modelseal.keys.service import KeyService  # noqa: E402

PASSPHRASE = b"modelseal-test-vectors"
SLOT_SIZE = 1024

# (file, scheme, key id, expect, note). Allowed ids sit on each edge of a forbidden range.
CASES = [
    ("keyid-ok-unicode.mseal", "vendorx", "mod\u00e8le/\u043a\u043b\u044e\u0447-\u6a21\u578b", "success", "non-ASCII"),
    (
        "keyid-ok-edges.mseal",
        "local",
        "a b~\u00a0c\u061bd\u200de\u2027f\u202fg\u2065h\u206a",
        "success",
        "U+0020 U+007E U+00A0 U+061B U+200D U+2027 U+202F U+2065 U+206A: each beside a forbidden character",
    ),
    ("keyid-bad-nul.mseal", "local", "vector-kek\x00", "header failure", "U+0000 NUL"),
    (
        "keyid-bad-lf.mseal",
        "local",
        "x\n  12 2026-01-01T00:00:00Z root destroy local:prod-kek",
        "header failure",
        "U+000A: a forged audit log line",
    ),
    ("keyid-bad-cr.mseal", "local", "x\rfake", "header failure", "U+000D"),
    ("keyid-bad-tab.mseal", "local", "x\ty", "header failure", "U+0009"),
    ("keyid-bad-esc.mseal", "local", "x\x1b[2K\x1b[1Gok", "header failure", "U+001B: terminal escape sequence"),
    ("keyid-bad-us.mseal", "local", "x\x1f", "header failure", "U+001F, last C0 control"),
    ("keyid-bad-del.mseal", "local", "x\x7f", "header failure", "U+007F DEL"),
    ("keyid-bad-nel.mseal", "local", "x\x85y", "header failure", "U+0085 NEL (C1)"),
    ("keyid-bad-c1-last.mseal", "local", "x\x9f", "header failure", "U+009F, last C1 control"),
    ("keyid-bad-alm.mseal", "local", "x\u061c", "header failure", "U+061C ARABIC LETTER MARK"),
    ("keyid-bad-lrm.mseal", "local", "x\u200e", "header failure", "U+200E LEFT-TO-RIGHT MARK"),
    ("keyid-bad-rlm.mseal", "local", "x\u200f", "header failure", "U+200F RIGHT-TO-LEFT MARK"),
    ("keyid-bad-lsep.mseal", "local", "x\u2028y", "header failure", "U+2028 LINE SEPARATOR"),
    ("keyid-bad-psep.mseal", "local", "x\u2029y", "header failure", "U+2029 PARAGRAPH SEPARATOR"),
    ("keyid-bad-lre.mseal", "local", "x\u202a", "header failure", "U+202A LEFT-TO-RIGHT EMBEDDING"),
    ("keyid-bad-rlo.mseal", "local", "kek-\u202eko >- yek\u202c", "header failure", "U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("keyid-bad-lri.mseal", "local", "x\u2066", "header failure", "U+2066 LEFT-TO-RIGHT ISOLATE"),
    ("keyid-bad-pdi.mseal", "local", "x\u2069", "header failure", "U+2069 POP DIRECTIONAL ISOLATE"),
]


def _recipient(scheme: str, key_id: str, version: int, wrapped: bytes) -> bytes:
    sb, kb = scheme.encode("ascii"), key_id.encode("utf-8")
    return struct.pack(">B", len(sb)) + sb + struct.pack(">H", len(kb)) + kb + struct.pack(">IH", version, len(wrapped))


def _sealed(svc: KeyService, work: Path, data: bytes) -> tuple[bytes, bytes]:
    dek = os.urandom(32)
    plan = HeaderPlan(
        dek=dek, kind=KIND_FILE, chunk_log2=16, plaintext_length=len(data), context=(), slot_size=SLOT_SIZE
    )
    src, dst = work / "src", work / "dst"
    src.write_bytes(data)
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:

        def meta(d: str) -> bytes:
            return canonical_json({"name": "keyid.bin", "sha256": d, "size": len(data)})

        write_sealed(fd_reader(sfd), dfd, plan, meta, len(meta("0" * 64)), (svc.wrap("local:vector-kek", dek, ()),))
    finally:
        os.close(sfd)
        os.close(dfd)
    return dst.read_bytes(), dek


def with_first_recipient(blob: bytes, dek: bytes, scheme: str, key_id: str) -> bytes:
    """``blob`` with slot A rewritten as (scheme:key_id, then its own valid recipient), MAC included."""
    core = parse_core(blob)
    start = slots_offset(len(core.raw), core.slot_size)
    slot = parse_slot(blob[start : start + core.slot_size])
    assert slot is not None
    valid = slot.recipients[0]
    decoy = hashlib.sha256(key_id.encode()).digest() * 2  # a wrap no key opens
    body = struct.pack(">QB", slot.generation, 2)
    body += _recipient(scheme, key_id, 1, decoy[:60]) + decoy[:60]
    body += _recipient(valid.scheme, valid.key_id, valid.key_version, valid.wrapped) + valid.wrapped
    mac = slot_mac(derive_file_keys(dek, core.salt, core.binding), core.mac, body)
    new_slot = (body + mac).ljust(core.slot_size, b"\x00")
    return blob[:start] + new_slot + blob[start + core.slot_size :]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(HERE / "home", work / "home")
        path = keystore.keystore_path(work / "home")
        path.chmod(0o600)
        provider = LocalProvider(path=path, passphrase=lambda: PASSPHRASE)
        svc = KeyService(sink=MemorySink(), providers={"local": provider})
        plain = b"key ids are data, never lines of output\n"
        index = []
        for name, scheme, key_id, expect, note in CASES:
            blob, dek = _sealed(svc, work, plain)
            (HERE / name).write_bytes(with_first_recipient(blob, dek, scheme, key_id))
            index.append(
                {
                    "file": name,
                    "expect": expect,
                    "note": note,
                    "first_recipient": {"scheme": scheme, "key_id_utf8_hex": key_id.encode().hex()},
                    "plaintext_sha256": hashlib.sha256(plain).hexdigest(),
                    "dek": dek.hex(),
                }
            )
        keystore.clear_cache()
    doc = {"passphrase": PASSPHRASE.decode(), "key": "local:vector-kek", "rule": "docs/format.md section 4"}
    (HERE / "keyids.json").write_text(json.dumps({**doc, "vectors": index}, indent=1) + "\n")


if __name__ == "__main__":
    main()
