"""What every recipe shares: the default key service, the encryption context, the trust
policy in force and the verify-on-load verdict, and the rule that keys never lie beside data.

Owns ``expecting()`` and the configured trust policy (``$MODELSEAL_TRUST`` or config.toml).
It reads no artifact and writes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from modelseal.errors import PolicyDenied
from modelseal.format.envelope import artifact_id
from modelseal.format.file import RawArtifact
from modelseal.format.header import (
    Recipient,
)
from modelseal.keys.service import KeyService
from modelseal.signing.trust import TrustPolicy, load_policy
from modelseal.signing.verification import Verdict, verify_artifact
from modelseal.util.files import (
    is_within,
)
from modelseal.util.home import modelseal_home

TRUST_ENV = "MODELSEAL_TRUST"


Verify = bool | TrustPolicy | None


EXPECTED_NAME: ContextVar[str | None] = ContextVar("modelseal_expected_name", default=None)


@contextmanager
def expecting(name: str) -> Iterator[None]:
    """Within the block, verify-on-load also requires artifacts to be signed as ``name``.

    Without it, any artifact that satisfies the policy's rules for *its own* signed
    name is accepted, so a differently named artifact could be swapped in::

        with modelseal.expecting("llama-7b"):
            weights = modelseal.safetensors.load_file("models/llama-7b.sealed")
    """
    token = EXPECTED_NAME.set(name)
    try:
        yield
    finally:
        EXPECTED_NAME.reset(token)


_service: KeyService | None = None


def key_service() -> KeyService:
    global _service
    if _service is None:
        _service = KeyService()
    return _service


def service(keys: KeyService | None) -> KeyService:
    return keys or key_service()


def trust_policy(keys: KeyService | None = None) -> TrustPolicy | None:
    """The configured trust policy: ``$MODELSEAL_TRUST`` (empty: none), else config.toml's."""
    env = os.environ.get(TRUST_ENV)
    if env is not None:
        return load_policy(env) if env else None
    path = service(keys).config.trust_policy
    return load_policy(path) if path else None


def policy_for(verify: Verify, keys: KeyService | None) -> TrustPolicy | None:
    if isinstance(verify, TrustPolicy):
        return verify
    if verify is False:
        return None
    policy = trust_policy(keys)
    if verify is True and policy is None:
        raise ValueError(f"verify=True, but no trust policy is configured ({TRUST_ENV} or trust_policy in config.toml)")
    return policy


def verdict_for(path: Path, verify: Verify, keys: KeyService | None, expect_name: str | None = None) -> Verdict | None:
    """Verify-on-load: signatures, policy and revocations now; chunks as they are read."""
    policy = policy_for(verify, keys)
    name = expect_name or EXPECTED_NAME.get()
    return None if policy is None else verify_artifact(path, policy, deep=False, expect_name=name)


def check_keys_apart(*paths: Path) -> None:
    home = modelseal_home()
    for p in paths:
        if is_within(home, p):
            raise PolicyDenied(f"the keystore ({home}) lies inside {p}: keys must never be stored beside the data")


def unwrapper(svc: KeyService, raw: RawArtifact, op: str = "unwrap") -> Callable[[Recipient], bytes]:
    aid = artifact_id(raw.core.binding)
    return lambda r: svc.unwrap(r, raw.core.context, aid, op=op)


def key_list(key: str | Sequence[str]) -> list[str]:
    keys = [key] if isinstance(key, str) else list(key)
    if not keys:
        raise ValueError("at least one key is needed")
    return keys


def resolve_context(
    svc: KeyService, context: Mapping[str, str] | None, env: str | None, project: str | None
) -> dict[str, str]:
    """The encryption context, which always carries ``env`` (the config's default if not given)."""
    ctx = dict(context or {})
    for name, value in (("env", env), ("project", project)):
        if value is not None:
            if ctx.get(name, value) != value:
                raise ValueError(f"{name}={value} disagrees with the context's {name}={ctx[name]}")
            ctx[name] = value
    ctx.setdefault("env", svc.config.default_env)
    return ctx
