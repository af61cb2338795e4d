"""Generate the golden signature vectors (docs/format.md, section 11).

    python tests/vectors/generate_signatures.py

From ``ok-three-chunks.mseal`` (see generate.py) this writes:
- ``signed-three-chunks.mseal`` and its ``.msig``, signed by a fixed Ed25519 key
  (``signing-ed25519.pub``) at a fixed time, so every byte is reproducible;
- ``signed-tampered.mseal`` with the same signature file and one ciphertext byte flipped;
- ``signatures.json``: the header, chunks and artifact digests and the signature id
  expected, which pin the commitment construction.
Like the other vectors, once released these MUST keep verifying (or failing) in every
later release: do not regenerate released ones, add new files instead.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: E402

from modelseal.format.file import canonical_json  # noqa: E402
from modelseal.signing.commitment import artifact_digest, hash_sealed_file  # noqa: E402
from modelseal.signing.sigfile import (  # noqa: E402
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    SignatureFile,
    Statement,
    sign_statement,
)
from modelseal.signing.signers import PemSigner  # noqa: E402

SEED = bytes(range(32))  # a published test key: never use it for anything real
SIGNED_AT = "2026-11-27T00:00:00Z"


def main() -> None:
    signer = PemSigner(ed25519.Ed25519PrivateKey.from_private_bytes(SEED))
    (HERE / "signing-ed25519.pub").write_text(signer.public.pem())
    signed = HERE / "signed-three-chunks.mseal"
    shutil.copyfile(HERE / "ok-three-chunks.mseal", signed)
    raw, c = hash_sealed_file(signed, ".")
    digest = artifact_digest([c])
    doc = {
        "_type": STATEMENT_TYPE,
        "predicate": {
            "context": dict(raw.core.context),
            "files": [c.to_json()],
            "kind": "file",
            "signed_at": SIGNED_AT,
        },
        "predicateType": PREDICATE_TYPE,
        "subject": [{"digest": {"blake3": digest}, "name": "vector-three-chunks"}],
    }
    entry = sign_statement(signer, Statement.parse(canonical_json(doc)))
    sf = SignatureFile(chunks={".": c.table}, signatures=[entry])
    sf.save(HERE / "signed-three-chunks.mseal.msig")
    tampered = HERE / "signed-tampered.mseal"
    data = bytearray(signed.read_bytes())
    data[raw.layout.offset(1) + 10] ^= 0x01
    tampered.write_bytes(bytes(data))
    shutil.copyfile(HERE / "signed-three-chunks.mseal.msig", HERE / "signed-tampered.mseal.msig")
    expected = {
        "artifact_digest": digest,
        "chunks_digest": c.chunks,
        "header_digest": c.header,
        "key_id": signer.public.key_id,
        "signature_id": entry.id,
    }
    (HERE / "signatures.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
