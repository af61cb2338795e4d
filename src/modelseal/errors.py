"""The one error tree of modelseal, and the CLI exit code of each class.

Artifact faults (the sealed bytes are wrong) and infrastructure faults (keys,
keystore, storage) are separate branches. Every cryptographic failure while
opening an artifact is the same ``DecryptionError``: it never says which check
failed, so it cannot be used as an oracle.
"""

from __future__ import annotations


class ModelsealError(Exception):
    """Root of every error modelseal raises on purpose."""

    exit_code = 1


class ArtifactError(ModelsealError):
    """The artifact itself is at fault."""

    exit_code = 3


class DecryptionError(ArtifactError):
    """The artifact is corrupted, tampered with, or not openable with this key."""

    exit_code = 3

    def __init__(self, message: str = "artifact is corrupted, tampered with, or was sealed under another key") -> None:
        super().__init__(message)


class FormatError(ArtifactError):
    """Not a sealed artifact, or a format version or suite this release does not know."""

    exit_code = 4


class KeyProviderError(ModelsealError):
    """A key provider failed or refused (infrastructure fault)."""

    exit_code = 5


class ProviderUnavailable(KeyProviderError):
    """The provider could not be reached, or refused this caller: a fault of the service,
    not of the one artifact or key asked about."""

    exit_code = 5


class KeyNotFound(KeyProviderError):
    """No such key (or key version) in the provider."""

    exit_code = 5


class KeyDisabled(KeyProviderError):
    """The key version is disabled, destroyed, or below the minimum decryption version."""

    exit_code = 5


class KeystoreError(ModelsealError):
    """The local keystore is missing, locked (wrong passphrase) or damaged."""

    exit_code = 6


class StorageError(ModelsealError):
    """Reading or writing files failed; nothing half-written was left behind."""

    exit_code = 7


class DestinationExists(StorageError):
    """The destination exists and ``force`` was not given."""

    exit_code = 7


class PolicyDenied(ModelsealError):
    """The request is refused by a safety rule (symlink escape, keys beside data)."""

    exit_code = 8


class VerificationError(ModelsealError):
    """A signature check failed: tampered, copied, unsigned where a signature is
    required, signed by an untrusted key, or short of the policy's threshold."""

    exit_code = 10


class Revoked(VerificationError):
    """The artifact, a signature it depends on, or its signer has been revoked."""

    exit_code = 11


class RevocationListError(VerificationError):
    """The revocation list is missing, unsigned, forged, malformed or expired:
    never a silent pass."""

    exit_code = 12


class SigningKeyError(ModelsealError):
    """A signing or verification key cannot be read (wrong passphrase, unsupported type)."""

    exit_code = 2


class CertificateError(ModelsealError):
    """A certificate or the internal CA is refused: not issued by this CA, expired,
    malformed, a bad identity in it, or a pin set that does not match or has no backup."""

    exit_code = 13


class CertificateRevoked(CertificateError):
    """The certificate's serial is on the CA's denylist."""

    exit_code = 14


class IdentityError(CertificateError):
    """A malformed SPIFFE-style identity (``spiffe://DOMAIN/ENV/KIND/NAME``) given by an operator."""

    exit_code = 2


class RegistryError(ModelsealError):
    """A registry operation failed: the server refused it (its OCI error code and one-line
    reason are in the message), a transfer failed, or the registry's stores failed."""

    exit_code = 15


class RegistryRefused(RegistryError):
    """The registry answered with an OCI error: ``status`` and ``code`` say which
    (``MANIFEST_INVALID``, ``DENIED``, ``NAME_UNKNOWN``, ...)."""

    exit_code = 15

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class BlobStoreError(RegistryError):
    """The blob store failed (I/O, the S3 service); nothing partial becomes visible."""

    exit_code = 15


class DigestMismatch(RegistryError):
    """Bytes that do not hash to the digest they were named by (an upload, a pulled blob)."""

    exit_code = 15


class GovernanceError(ModelsealError):
    """Governance state or policy that cannot be used: a policy that does not parse or fails
    its pinned digest, a binding that would break separation of duties, an unknown approval."""

    exit_code = 16


class AccessDenied(GovernanceError):
    """An authorization decision said no; the message names the deciding policies."""

    exit_code = 17


class ApprovalRequired(GovernanceError):
    """The operation was not run: it waits for approvals (the message names the request id)."""

    exit_code = 18


class StandardViolation(PolicyDenied):
    """An artifact breaks an encryption standard (``modelseal policy check``)."""

    exit_code = 8


class ScanFindings(ModelsealError):
    """``modelseal scan`` found more than ``--fail-on`` findings (its report was printed)."""

    exit_code = 19


class WebhookSignatureError(VerificationError):
    """A signed alert webhook is refused: no valid signature of a trusted key over its body,
    a timestamp outside the window (a replay, or a delivery held too long), or a body that
    is not an alert (``modelseal alerts verify``, ``telemetry.alertsign.verify_webhook``)."""

    exit_code = 20


class ControlsFailed(ModelsealError):
    """``modelseal controls test``: an intrusion attempt went through, or its alert did not
    fire (the table was printed first; docs/controls.md)."""

    exit_code = 21


class ScanIncomplete(ModelsealError):
    """``modelseal scan`` could not read or decide everything it was given (a file, an object,
    a layer, a TLS probe): its report was printed and counts them (``--allow-errors`` accepts
    an incomplete scan; docs/scan.md)."""

    exit_code = 22


class BackupError(ModelsealError):
    """A backup cannot be made, found or read: the destination or source is unreachable, no
    recipient key of the backup can be reached by this restorer, a part is missing, or the
    configuration names no recovery key (docs/recovery.md). Nothing is left half-written."""

    exit_code = 23


class BackupTampered(VerificationError):
    """A backup fails its checks: a part's digest, the manifest's signature, the chain to the
    previous backup (a deleted, swapped or older backup), or a part's contents (docs/recovery.md)."""

    exit_code = 24


class DrillFailed(ModelsealError):
    """``modelseal backup drill`` restored but a check failed (an artifact that does not open or
    whose digest differs, a signature, the audit log, RTO/RPO): the drill record says which."""

    exit_code = 25


class IncidentError(ModelsealError):
    """An incident command (``modelseal incident key-compromise|cert-compromise``) stopped: a step
    failed; its journal lets the same command resume (docs/recovery.md)."""

    exit_code = 26


class EvidenceError(ModelsealError):
    """``modelseal evidence export`` cannot gather or write the bundle (docs/evidence.md)."""

    exit_code = 27


class EvidenceTampered(VerificationError):
    """``modelseal evidence verify``: a file of the bundle was edited, deleted, added or reordered,
    or the bundle's signature does not verify under the expected key."""

    exit_code = 28


class ConsoleError(ModelsealError):
    """The web console (docs/console.md): a sign-in link that is unknown, used, expired or
    not this identity's, a session that ended, or ``modelseal console login`` refused."""

    exit_code = 29
