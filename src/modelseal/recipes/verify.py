"""``verify_artifact``, the public keyless verification: the signing layer's, with the pins
in force where the caller gives none, as ``open`` has them.

The signed name defaults to ``expecting()``'s; the environment to ``expecting(env=)``'s,
then config.toml's ``host_env``. So a check run inside ``expecting("llama-7b",
env="prod")`` cannot accept a dev build signed as another model that ``open`` in the
same block would refuse. The trust decision itself is ``signing.verification``'s.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from modelseal.recipes.context import EXPECTED_NAME, expected_env
from modelseal.signing import verification
from modelseal.signing.evaluation import Verdict
from modelseal.signing.trust import TrustPolicy


def verify_artifact(
    path: str | Path,
    policy: TrustPolicy,
    *,
    signature: str | Path | None = None,
    strict: bool | None = None,
    deep: bool = True,
    expect_name: str | None = None,
    expect_env: str | None = None,
    now: datetime | None = None,
) -> Verdict:
    """Verify the sealed artifact at ``path`` keylessly against ``policy`` (every policy of
    its chain must pass). ``deep`` hashes every ciphertext chunk; otherwise the chunk
    tables are returned in the verdict for readers to check. ``expect_name`` (default:
    ``expecting()``'s) pins the signed name; ``expect_env`` (default: ``expecting(env=)``'s,
    else config.toml's ``host_env``) the environment the artifact is sealed for."""
    return verification.verify_artifact(
        path,
        policy,
        signature=signature,
        strict=strict,
        deep=deep,
        expect_name=expect_name if expect_name is not None else EXPECTED_NAME.get(),
        expect_env=expected_env(None, expect_env),
        now=now,
    )
