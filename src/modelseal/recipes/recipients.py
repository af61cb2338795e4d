"""Which recipients a re-key (``rewrap``, ``reencrypt``, ``rotate``) writes.

Recipient slots are authenticated only by the data key, so anyone who learnt it can add
a recipient to an artifact. A re-key therefore never takes its recipient list from the
artifact: each stored recipient must stand for a key the operator vouches for, namely

- a key named for this run (``--key``; ``rotate``'s key),
- a key config.toml lists for the artifact's environment (and project),
- a recipient confirmed by name (``--keep-recipient URI``), or,
- only when config.toml lists no keys for that environment, a key of this host's own
  keystore (a wrap under it reaches nobody who cannot already open the whole keystore).

Any other stored recipient stops the re-key with ``PolicyDenied``, naming it. What is
wrapped to is always the operator's key URI (with the operator's pkcs11 module and PIN
source, Transit mount, KMS key), found by canonical identity; a key URI is never rebuilt
from the bytes of an artifact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from modelseal.errors import KeyNotFound, ModelsealError, PolicyDenied
from modelseal.format.header import Recipient
from modelseal.keys.providers import parse_key_uri, recipient_key
from modelseal.keys.service import KeyService, printable


@dataclass(frozen=True)
class RekeyPlan:
    """What a re-key of one artifact will write, shown before anything is written."""

    path: Path
    stored: tuple[str, ...]  # the artifact's recipients as KEY#VERSION, non-printable characters escaped
    write: tuple[str, ...]  # the operator's key URIs the new data-key wraps go to, in order


def shown(r: Recipient) -> str:
    return f"{r.scheme}:{printable(r.key_id)}#{r.key_version}"


def named_keys(key: str | Sequence[str] | None, keep: Sequence[str]) -> list[str] | None:
    """``--key`` as a list (None when not given); refuses ``--keep-recipient`` beside it."""
    if key is None:
        return None
    keys = [key] if isinstance(key, str) else list(key)
    if not keys:
        raise ValueError("at least one key is needed")
    if keep:
        raise ValueError("--keep-recipient confirms a recipient the artifact already has; with --key, list every key")
    return keys


def plan(
    svc: KeyService,
    path: Path,
    stored: Sequence[Recipient],
    context: tuple[tuple[str, str], ...],
    key: list[str] | None,
    keep: Sequence[str] = (),
) -> RekeyPlan:
    """The plan for one artifact: ``key`` replaces the recipients; without it the stored
    recipients are kept, each as the operator's own key URI (``keys_to_write``)."""
    write = key if key is not None else keys_to_write(svc, path, stored, context, keep=keep)
    return RekeyPlan(path, tuple(shown(r) for r in stored), tuple(write))


def keys_to_write(
    svc: KeyService,
    path: Path,
    stored: Sequence[Recipient],
    context: tuple[tuple[str, str], ...],
    *,
    named: Sequence[str] = (),
    keep: Sequence[str] = (),
) -> list[str]:
    """The operator's key URIs standing for the (authenticated) ``stored`` recipients.

    Raises ``PolicyDenied`` naming every stored recipient no vouched-for key stands for.
    """
    ctx = dict(context)
    env = ctx.get("env")
    configured = svc.config.keys_for(env, ctx.get("project")) if env is not None else []
    vouched = [*named, *configured, *keep]
    if not configured and any(r.scheme == "local" for r in stored):
        vouched += _keystore_keys(svc)
    schemes = {r.scheme for r in stored}
    by_identity: dict[str, str] = {}
    for uri in vouched:
        if parse_key_uri(uri).scheme in schemes:
            by_identity.setdefault(svc.canonical(uri), uri)
    vouched_schemes = {parse_key_uri(u).scheme for u in by_identity.values()}
    out: list[str] = []
    refused: list[Recipient] = []
    for r in stored:
        match = by_identity.get(_identity(svc, r)) if r.scheme in vouched_schemes else None
        if match is None:
            refused.append(r)
        elif match not in out:
            out.append(match)
    if refused:
        raise PolicyDenied(_refusal(path, refused, env, bool(configured)))
    return out


def same_key(svc: KeyService, r: Recipient, canon: str) -> bool:
    """Whether a stored recipient is the key of canonical identity ``canon`` (a malformed one is not).

    Only a recipient of ``canon``'s scheme is resolved: the key ids of the others are the
    artifact's choice and must never reach a provider (an AWS KMS ``DescribeKey`` of an
    artifact-chosen key, and AWS credentials, to rotate a local key)."""
    if r.scheme != parse_key_uri(canon).scheme:
        return False
    return _identity(svc, r) == canon


def _identity(svc: KeyService, r: Recipient) -> str:
    try:
        recipient_key(r.scheme, r.key_id)  # the artifact's fault: matches nothing
    except ModelsealError:
        return ""
    # Any other provider error (a KMS that cannot be reached) propagates: not the artifact's fault.
    try:
        return svc.recipient_identity(r)
    except KeyNotFound:
        return ""  # e.g. a KMS key that does not exist: none of the operator's keys


def _keystore_keys(svc: KeyService) -> list[str]:
    try:
        return [info.uri for info in svc.list("local")]
    except ModelsealError:
        path = getattr(svc.provider("local"), "path", None)
        if isinstance(path, Path) and path.exists():
            raise  # a keystore that is there but cannot be read (locked agent, wrong passphrase): say so
        return []  # no keystore here: no local key to vouch for


def _refusal(path: Path, refused: list[Recipient], env: str | None, configured: bool) -> str:
    where = f"env={printable(env)}" if env is not None else "this artifact (it names no env)"
    source = (
        f"config.toml's keys for {where}"
        if configured
        else f"this host's keystore (config.toml lists no keys for {where})"
    )
    names = ", ".join(shown(r) for r in refused)
    return (
        f"{path}: recipient(s) {names} are not among {source}; a re-key never carries an unconfirmed recipient over: "
        f"name every key with --key, or confirm a recipient with --keep-recipient URI"
    )
