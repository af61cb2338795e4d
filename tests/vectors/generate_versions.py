"""Generate the golden vectors of the statement ``version`` (docs/format.md, section 11.2).

    python tests/vectors/generate_versions.py

Signature files over ``signed-three-chunks.mseal`` (verified with ``signature=``), signed
by the published Ed25519 test key of ``generate_signatures.py`` at a fixed time, so every
byte is reproducible:
- ``version-7.msig``: a statement with ``"version": 7`` (expect: success, version 7);
- ``version-bad-*.msig``: genuinely signed statements whose ``version`` is not an integer
  from 1 to 2^53 - 1 (expect: malformed, refused);
- ``versions.json``: each file's expected outcome, and the signature id of the good one.
A statement without ``version`` (``signed-three-chunks.mseal.msig``) is version 0.
Like the other vectors, once released these MUST keep their outcome in every later release.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: E402

from modelseal.format.file import canonical_json  # noqa: E402
from modelseal.signing.commitment import artifact_digest, hash_sealed_file  # noqa: E402
from modelseal.signing.sigfile import MEDIA_TYPE, PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE  # noqa: E402
from modelseal.signing.signers import PemSigner, b64, sign_envelope  # noqa: E402

SEED = bytes(range(32))  # the published test key of generate_signatures.py: never use it for anything real
SIGNED_AT = "2026-12-01T00:00:00Z"
BAD = {"zero": 0, "negative": -1, "string": "7", "fraction": 7.5, "boolean": True, "too-big": 1 << 53}


def signature_file(signer: PemSigner, version: Any, table: bytes, statement: dict[str, Any]) -> tuple[bytes, str]:
    doc = json.loads(json.dumps(statement))
    doc["predicate"]["version"] = version
    payload = canonical_json(doc)
    env = sign_envelope(signer, PAYLOAD_TYPE, payload)
    sid = hashlib.sha256(signer.public.key_id.encode() + b"\x00" + payload).hexdigest()
    sf = {
        "chunks": {".": b64(table)},
        "history": [],
        "mediaType": MEDIA_TYPE,
        "signatures": [{"envelope": env, "id": sid}],
    }
    return json.dumps(sf, indent=1, sort_keys=True).encode() + b"\n", sid


def main() -> None:
    signer = PemSigner(ed25519.Ed25519PrivateKey.from_private_bytes(SEED))
    raw, c = hash_sealed_file(HERE / "signed-three-chunks.mseal", ".")
    statement = {
        "_type": STATEMENT_TYPE,
        "predicate": {
            "context": dict(raw.core.context),
            "files": [c.to_json()],
            "kind": "file",
            "signed_at": SIGNED_AT,
        },
        "predicateType": PREDICATE_TYPE,
        "subject": [{"digest": {"blake3": artifact_digest([c])}, "name": "vector-three-chunks"}],
    }
    data, sid = signature_file(signer, 7, c.table, statement)
    (HERE / "version-7.msig").write_bytes(data)
    vectors: list[dict[str, Any]] = [
        {"signature": "version-7.msig", "expect": "success", "version": 7, "signature_id": sid}
    ]
    for label, value in BAD.items():
        name = f"version-bad-{label}.msig"
        (HERE / name).write_bytes(signature_file(signer, value, c.table, statement)[0])
        vectors.append({"signature": name, "expect": "malformed"})
    vectors.append({"signature": "signed-three-chunks.mseal.msig", "expect": "success", "version": 0})
    (HERE / "versions.json").write_text(
        json.dumps({"artifact": "signed-three-chunks.mseal", "vectors": vectors}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
