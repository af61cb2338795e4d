"""Signers named on the command line, picked by scheme: a PEM file, ``env:VAR``, ``transit:`` or ``pkcs11:``.

Owns only the choice; each backend lives in its own module (``signers`` for PEM,
``transit``, ``pkcs11``), so no backend imports another and none imports this one.
"""

from __future__ import annotations

from modelseal.signing.pkcs11 import Pkcs11Signer
from modelseal.signing.signers import PemSigner, Signer
from modelseal.signing.transit import TransitSigner


def load_signer(spec: str) -> Signer:
    """A signer from a CLI ``--sign-key``: a PEM file, ``env:VAR`` (PEM in an environment
    variable), ``transit:[MOUNT/]NAME`` or ``pkcs11:token=T;object=O``."""
    if spec.startswith("env:"):
        return PemSigner.from_env(spec.removeprefix("env:"))
    if spec.startswith("transit:"):
        return TransitSigner(spec.removeprefix("transit:"))
    if spec.startswith("pkcs11:"):
        return Pkcs11Signer(spec.removeprefix("pkcs11:"))
    return PemSigner.from_file(spec)
