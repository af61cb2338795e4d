"""What every recipe shares: the default key service, the encryption context, the trust
policy in force and the verify-on-load verdict, and the rule that keys never lie beside data.

Owns ``expecting()`` (the name and environment pins), the environment a host expects
(config.toml's ``host_env``) and the trust policy in force: config.toml's, which
``$MODELSEAL_TRUST`` may tighten (both must pass) but never loosen or switch off, unless
``MODELSEAL_TRUST_OVERRIDE=1`` says so explicitly, which is logged and audited; and the
system configuration's, which must pass as well and which nothing switches off.
It reads no artifact and writes nothing but that audit event.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from modelseal.audit.events import AuditEvent
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
TRUST_OVERRIDE_ENV = "MODELSEAL_TRUST_OVERRIDE"
_log = logging.getLogger("modelseal")


Verify = bool | TrustPolicy | None


EXPECTED_NAME: ContextVar[str | None] = ContextVar("modelseal_expected_name", default=None)
EXPECTED_ENV: ContextVar[str | None] = ContextVar("modelseal_expected_env", default=None)


@contextmanager
def expecting(name: str | None = None, *, env: str | None = None) -> Iterator[None]:
    """Within the block, opening and verify-on-load also require artifacts to be signed
    as ``name`` and sealed for environment ``env`` (either may be left out).

    Without a name pin, any artifact that satisfies the policy's rules for *its own*
    signed name is accepted, so a differently named artifact could be swapped in;
    without an environment pin (or config.toml's ``host_env``), a dev build that meets
    the dev rules could stand in for the prod one::

        with modelseal.expecting("llama-7b", env="prod"):
            weights = modelseal.safetensors.load_file("models/llama-7b.sealed")
    """
    tokens = (EXPECTED_NAME.set(name) if name is not None else None, EXPECTED_ENV.set(env) if env else None)
    try:
        yield
    finally:
        if tokens[1] is not None:
            EXPECTED_ENV.reset(tokens[1])
        if tokens[0] is not None:
            EXPECTED_NAME.reset(tokens[0])


def expected_env(keys: KeyService | None, explicit: str | None = None) -> str | None:
    """The environment an artifact must be sealed for: the caller's pin (``expect_env=``,
    then ``expecting(env=)``), else the host's (config.toml ``host_env``), else none."""
    return explicit or EXPECTED_ENV.get() or service(keys).config.host_env


_service: KeyService | None = None


def key_service() -> KeyService:
    global _service
    if _service is None:
        _service = KeyService()
    return _service


def service(keys: KeyService | None) -> KeyService:
    return keys or key_service()


def trust_policy(keys: KeyService | None = None) -> TrustPolicy | None:
    """The trust policy in force: config.toml's ``trust_policy``, tightened by
    ``$MODELSEAL_TRUST`` (a second policy that must pass as well; alone where config.toml
    names none). The variable cannot loosen config.toml's policy: set empty, it is
    refused, unless ``MODELSEAL_TRUST_OVERRIDE=1``, which lets it replace (or switch off)
    the configured policy and is logged and audited as a ``trust-override`` event.
    The system configuration's policy (``/etc/modelseal/config.toml``) must pass as well,
    whatever the home or the environment say: nothing here switches it off."""
    svc = service(keys)
    policy = _home_policy(svc)
    system = svc.config.system_trust_policy
    if system is None:
        return policy
    required = load_policy(system)
    if policy is None:
        return required
    if required.identity() in {p.identity() for p in policy.chain()}:
        return policy
    return policy.requiring(required)


def _home_policy(svc: KeyService) -> TrustPolicy | None:
    """config.toml's policy and ``$MODELSEAL_TRUST`` (see ``trust_policy``)."""
    configured = svc.config.trust_policy
    value = os.environ.get(TRUST_ENV)
    base = load_policy(configured) if configured else None
    if value is None or base is None:
        return load_policy(value) if value else base
    if os.environ.get(TRUST_OVERRIDE_ENV) == "1":
        if not (value and _same_file(value, configured)):
            _audit_override(svc, value, configured)
        return load_policy(value) if value else None
    if not value:
        raise PolicyDenied(
            f"{TRUST_ENV} is empty, but config.toml configures the trust policy {configured}: an environment variable"
            f" cannot switch verification off (pass verify=False, or set {TRUST_OVERRIDE_ENV}=1, which is audited)"
        )
    return base if _same_file(value, configured) else base.requiring(load_policy(value))


def _same_file(a: str | Path, b: Path | None) -> bool:
    try:
        return b is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _audit_override(svc: KeyService, value: str, configured: Path | None) -> None:
    """Loosening through the environment is explicit and never silent: a warning and an audit
    event (which must be written, or the override is refused), once per process and setting."""
    seen = (value, str(configured))
    if seen in _OVERRIDDEN:
        return
    _log.warning(
        "%s=1: %s=%r replaces the trust policy %s of config.toml", TRUST_OVERRIDE_ENV, TRUST_ENV, value, configured
    )
    svc.sink.emit(AuditEvent("trust-override", f"trust:{value or '(none)'}", "ok"))
    _OVERRIDDEN.add(seen)


_OVERRIDDEN: set[tuple[str, str]] = set()


def audit_verification_off(keys: KeyService | None, what: str) -> None:
    """An explicit switch that skips signature checks (``modelseal pull --no-verify``) while a
    trust policy is in force is never silent either: the same warning and ``trust-override``
    audit event as the environment override (which must be written, or the switch is refused)."""
    svc = service(keys)
    if trust_policy(svc) is None:
        return
    _log.warning("%s skips the trust policy in force", what)
    svc.sink.emit(AuditEvent("trust-override", f"trust:{what}", "ok"))


def policy_for(verify: Verify, keys: KeyService | None) -> TrustPolicy | None:
    if isinstance(verify, TrustPolicy):
        return verify
    if verify is False:
        return None
    policy = trust_policy(keys)
    if verify is True and policy is None:
        raise ValueError(f"verify=True, but no trust policy is configured ({TRUST_ENV} or trust_policy in config.toml)")
    return policy


def verdict_for(
    path: Path,
    verify: Verify,
    keys: KeyService | None,
    expect_name: str | None = None,
    expect_env: str | None = None,
) -> Verdict | None:
    """Verify-on-load: signatures, policy and revocations now; chunks as they are read.
    ``expect_env`` is the environment already resolved by ``expected_env``."""
    policy = policy_for(verify, keys)
    name = expect_name or EXPECTED_NAME.get()
    if policy is None:
        return None
    return verify_artifact(path, policy, deep=False, expect_name=name, expect_env=expect_env)


def check_keys_apart(*paths: Path) -> None:
    """Keys and data never share a folder tree: refuse a path (an artifact, a source, an
    output) that holds ``$MODELSEAL_HOME`` or lies inside it, through symlinks and bind
    mounts alike (``is_within``). Outputs are written beside their path, so a path
    inside the home would put sealed or plaintext data beside the keys."""
    home = modelseal_home()
    for p in paths:
        if is_within(home, p):
            raise PolicyDenied(f"the keystore ({home}) lies inside {p}: keys must never be stored beside the data")
        if is_within(p, home):
            raise PolicyDenied(
                f"{p} lies inside the keystore's folder ({home}): data must never be stored beside the keys"
            )


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
