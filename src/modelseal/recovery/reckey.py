"""The offline recovery key's life (docs/recovery.md, "The offline recovery key"): ``generate``
makes a fresh 32-byte seed, splits it into k-of-n SLIP-0039 shares (``shamir-mnemonic``, as
``keys.keystore.split_root`` does) and writes only the public key,
``$MODELSEAL_HOME/recovery/NAME.pub``; ``unlock`` combines shares, checks that they rebuild the
key the public key file (or a fingerprint the caller got from a signed manifest) names, and
installs the private key for ``recovery:NAME`` in this process only
(``keys.providers.recovery``). The seed is never written to disk whole, printed or logged.

The cryptography (the key derivation, the HPKE wrap) is in ``keys.providers.recovery``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import time
from pathlib import Path

from modelseal.errors import BackupError, DestinationExists, KeyProviderError
from modelseal.keys.providers import recovery as provider
from modelseal.util.files import fsync_dir, remove_path, temp_sibling, write_atomic, write_new
from modelseal.util.hardening import dont_dump
from modelseal.util.home import check_home, modelseal_home


def _check_split(shares: int, threshold: int) -> None:
    if not 1 <= threshold <= shares <= 16 or (threshold == 1 and shares > 1):
        raise BackupError("choose 1 <= threshold <= shares <= 16 (and a threshold of at least 2 for several shares)")


def generate(name: str, shares: int, threshold: int, home: Path) -> list[str]:
    """A new recovery key ``name``: its public key written (atomically, never replacing one)
    into ``home/recovery/NAME.pub``; returns the ``shares`` SLIP-0039 mnemonics, any
    ``threshold`` of which rebuild it. Hand each to its custodian; nothing else keeps the seed."""
    import shamir_mnemonic

    _check_split(shares, threshold)
    try:
        path = provider.public_path(name, home)
    except KeyProviderError as e:
        raise BackupError(str(e)) from None
    check_home(home, BackupError)
    if path.exists() or path.is_symlink():
        raise DestinationExists(f"a recovery key {name} exists already ({path}); choose another name")
    seed = bytearray(os.urandom(provider.SEED_LEN))
    dont_dump(seed)
    try:
        _private, public = provider.derive(bytes(seed))
        groups = shamir_mnemonic.generate_mnemonics(1, [(threshold, shares)], bytes(seed), b"", extendable=True)
    finally:
        seed[:] = bytes(len(seed))
    doc = provider.public_document(name, public, time.time())
    path.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        write_atomic(path, json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n", mode=0o644, exclusive=True)
    except FileExistsError:
        raise DestinationExists(f"a recovery key {name} appeared meanwhile ({path}); choose another name") from None
    return list(groups[0])


def share_names(name: str, shares: int) -> list[str]:
    return [f"{name}-share-{i}-of-{shares}.txt" for i in range(1, shares + 1)]


def generate_to(name: str, shares: int, threshold: int, home: Path, out: Path) -> list[Path]:
    """``generate``, with each share written to its own file (0600) in ``out``, a folder that
    must not exist or be empty. The shares are staged in a hidden folder beside ``out`` and
    moved into place in one rename; if that fails the public key file is removed again, so a
    failed keygen leaves neither a key nobody holds the shares of, nor stray shares."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DestinationExists(f"{out} exists and is not an empty folder; choose a new one")
    if not out.parent.is_dir():
        raise BackupError(f"folder {out.parent} does not exist")
    mnemonics = generate(name, shares, threshold, home)
    stage = temp_sibling(out, "shares")
    try:
        stage.mkdir(mode=0o700)
        for file_name, share in zip(share_names(name, shares), mnemonics, strict=True):
            write_new(stage / file_name, (share + "\n").encode(), mode=0o600)
        fsync_dir(stage)
        if out.exists():
            out.rmdir()  # empty, checked above: replaced by the staged folder in one rename
        os.rename(stage, out)
        fsync_dir(out.parent)
    except BaseException:
        remove_path(stage)
        with contextlib.suppress(OSError):
            provider.public_path(name, home).unlink()
        raise
    finally:
        mnemonics[:] = []
    return [out / n for n in share_names(name, shares)]


def unlock(name: str, mnemonics: list[str], *, home: Path | None = None, expect_fingerprint: str | None = None) -> str:
    """Combine ``mnemonics`` and install ``recovery:NAME``'s private key in this process.

    The rebuilt key must be the one ``expect_fingerprint`` (hex, from a signed backup manifest)
    names, else the one of ``home``'s ``recovery/NAME.pub``; with neither it is refused. A
    share set that does not combine (too few, mixed sets, a typo the checksum catches) or that
    combines to another key is a one-line ``BackupError``. Returns the fingerprint (hex)."""
    import shamir_mnemonic

    try:
        provider.check_name(name)
    except KeyProviderError as e:
        raise BackupError(str(e)) from None
    if expect_fingerprint is None:
        expect_fingerprint = provider.load_public(name, home or modelseal_home()).fingerprint_hex
    cleaned = [" ".join(m.split()) for m in mnemonics if m.strip()]
    if len(set(cleaned)) != len(cleaned):
        raise BackupError("the same share was given twice")
    try:
        seed = shamir_mnemonic.combine_mnemonics(cleaned, b"")
    except (shamir_mnemonic.MnemonicError, ValueError):
        # shamir-mnemonic's messages quote words of the shares: secrets stay out of the line.
        raise BackupError(
            f"the {len(cleaned)} shares given for recovery:{name} do not combine: too few, from different"
            " splits, or mistyped (each share's checksum is checked)"
        ) from None
    dont_dump(seed)
    if len(seed) != provider.SEED_LEN:
        raise BackupError(f"the shares combine, but not to a recovery key (recovery:{name})")
    private, public = provider.derive(seed)
    del seed
    fp = provider.fingerprint(public)
    if not hmac.compare_digest(fp.hex(), expect_fingerprint):
        raise BackupError(
            f"the shares combine, but not to recovery:{name} (fingerprint {expect_fingerprint[:16]}...):"
            " they belong to another recovery key"
        )
    provider.install(name, private, fp)
    return fp.hex()


def forget(name: str | None = None) -> None:
    """Remove an installed recovery key (every one with None) from this process."""
    provider.forget(name)


__all__ = ["forget", "generate", "generate_to", "share_names", "unlock"]
