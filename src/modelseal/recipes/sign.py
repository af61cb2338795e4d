"""``sign``: add a signature to an existing sealed artifact (a second signer, or a re-sign
after an update), keyless unless an OpenSSF model-signing bundle is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelseal.errors import DecryptionError, FormatError
from modelseal.format.folder import (
    MANIFEST_NAME,
)
from modelseal.keys.service import KeyService
from modelseal.recipes.context import check_keys_apart
from modelseal.recipes.opening import open_sealed_file, open_sealed_folder
from modelseal.signing import oms
from modelseal.signing.commitment import FILE_PATH, FileCommitment, artifact_digest, hash_artifact
from modelseal.signing.sigfile import PAYLOAD_TYPE as SIG_PAYLOAD_TYPE
from modelseal.signing.sigfile import SignatureFile, seal_attachment, signature_path
from modelseal.signing.signers import Signer, verify_envelope
from modelseal.signing.verification import Verdict, add_signature


def sign(
    path: str | os.PathLike[str],
    sign_key: Signer,
    *,
    name: str | None = None,
    version: int | None = None,
    oms_bundle: bool = False,
    keys: KeyService | None = None,
) -> str:
    """Add a signature to an existing sealed artifact (a second signer, or a re-sign
    after an update); returns its id. Needs no decryption key unless ``oms_bundle``,
    which opens the artifact to sign its plaintext digests for model-signing too.
    ``version`` is the artifact version the signature vouches for (default: this
    signer's version for these very files, else one more than its last for the name;
    see ``signing.rollback.default_version``). Signatures that no longer match the
    artifact, or sign it under another version, move to the signature history."""
    root = Path(path)
    check_keys_apart(root)  # its signature file would be written beside the keys
    commits, raws = hash_artifact(root)
    primary = raws.get(FILE_PATH) or raws.get(MANIFEST_NAME)
    if primary is None:
        raise FormatError(f"{root} is not a sealed artifact")
    name = name or _previous_name(root, sign_key, commits) or _default_name(root)
    attach: Callable[[Any], None] | None = None
    if oms_bundle:
        if not oms.supports(sign_key):
            raise ValueError("model-signing verifies ECDSA signatures only: sign with a P-256 key for --oms")
        # The plaintext digests must come from the very bytes just hashed and about to be
        # signed: the reader is pinned to those headers and chunks, so a manifest swapped
        # in meanwhile cannot put its digests into this signer's model-signing bundle.
        pinned = Verdict.pinned(root, commits)
        if root.is_dir():
            with open_sealed_folder(root, keys, pinned) as folder:
                rows = [(e.path, e.sha256) for e in folder.entries()]
                key = folder.attachment_key()
            bundle = oms.bundle_for_folder(sign_key, name, rows)
        else:
            with open_sealed_file(root, keys, pinned) as r:
                digest = r.metadata().get("sha256")
                key = r.attachment_key
            if not isinstance(digest, str):
                raise DecryptionError()
            bundle = oms.bundle_for_file(sign_key, name, digest)

        def attach(entry: Any) -> None:
            entry.oms = seal_attachment(key, entry.id, bundle)

    return add_signature(root, sign_key, name, commits, primary.core, attach=attach, version=version).id


def _previous_name(root: Path, signer: Signer, commits: list[FileCommitment]) -> str | None:
    """The name this signer already gave *this* artifact: its own signature that verifies
    and commits to these very files. Never a name from someone else's entry, nor from a
    genuine signature of another artifact copied into the file."""
    sf = SignatureFile.load(signature_path(root))
    if sf is None:
        return None
    mine = {signer.public.key_id: signer.public}
    digest = artifact_digest(commits)
    for e in reversed(sf.signatures):
        if (
            e.keyid == signer.public.key_id
            and e.statement.digest == digest
            and e.statement.matches(commits)
            and verify_envelope(SIG_PAYLOAD_TYPE, e.statement.raw, e.sigs, mine)
        ):
            return e.statement.name
    return None


def _default_name(root: Path) -> str:
    name = root.resolve().name
    for suffix in (".msealed", ".sealed", ".mseal"):
        name = name.removesuffix(suffix)
    return name
