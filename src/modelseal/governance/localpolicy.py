"""The policy this host checks artifacts against, and the seal-time check.

Without a ``[governance]`` table in config.toml the shipped ``default_policy()`` applies.
An operator may name another policy file, pinned by its digest::

    [governance]
    policy = "governance.cedar"          # relative to $MODELSEAL_HOME
    policy_sha256 = "sha256:<64 hex>"    # sha256sum of the file: the pin IS the sign-off
    standards = "warn"                   # or "enforce": what seal does on a violation

A file that does not hash to its pin is refused ("tampered"), a file without a pin too
("unsigned"): config.toml is writable by its owner only, so the pin there is what vouches
for the file. ``standards`` decides only what ``seal`` does (default ``warn``: a logged
warning); ``modelseal policy check`` always enforces. Reads files; decides nothing itself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelseal.errors import GovernanceError
from modelseal.governance.cedar import MAX_POLICY_TEXT, Engine, PolicySet, default_policy
from modelseal.governance.standards import check, enforce, facts_for_keys
from modelseal.keys.config import ConfigError, config_table
from modelseal.keys.service import KeyService
from modelseal.util.files import read_limited
from modelseal.util.home import modelseal_home

log = logging.getLogger("modelseal")
TABLE = "governance"
MODES = ("warn", "enforce")
_PIN = re.compile(r"sha256:[0-9a-f]{64}")
_parsed: dict[str, PolicySet] = {}
_lock = threading.Lock()


def settings(home: Path | None = None) -> dict[str, Any]:
    """The ``[governance]`` table of config.toml (empty without one); it pins the policy, so
    config.toml's ownership rules apply."""
    return config_table(TABLE, home)


def standards_mode(home: Path | None = None) -> str:
    mode = settings(home).get("standards", "warn")
    if mode not in MODES:
        raise ConfigError(f'config: [{TABLE}] standards must be "warn" or "enforce"')
    return str(mode)


def client_policy(home: Path | None = None) -> PolicySet:
    """config.toml's pinned policy file, or the shipped default (module docstring)."""
    home = home or modelseal_home()
    cfg = settings(home)
    name = cfg.get("policy")
    if name is None:
        return default_policy()
    if not isinstance(name, str) or not name:
        raise ConfigError(f"config: [{TABLE}] policy must be the path of a Cedar policy file")
    path = Path(name) if Path(name).is_absolute() else home / name
    pin = cfg.get("policy_sha256")
    if pin is None:
        raise GovernanceError(
            f"the governance policy {path} is unsigned: review it, then pin it in config.toml [{TABLE}]"
            f' as policy_sha256 = "sha256:<the hex of: sha256sum {path}>"'
        )
    if not isinstance(pin, str) or not _PIN.fullmatch(pin):
        raise ConfigError(f'config: [{TABLE}] policy_sha256 must be "sha256:" and 64 lowercase hex digits')
    try:
        raw = read_limited(path, MAX_POLICY_TEXT, GovernanceError, f"the governance policy {path}", regular=True)
    except FileNotFoundError:
        raise GovernanceError(f"the governance policy {path} does not exist") from None
    if not hmac.compare_digest("sha256:" + hashlib.sha256(raw).hexdigest(), pin):
        raise GovernanceError(f"the governance policy {path} does not match its pin in config.toml (tampered)")
    with _lock:
        hit = _parsed.get(pin)
    if hit is not None:
        return hit
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GovernanceError(f"the governance policy {path} is not UTF-8") from None
    ps = PolicySet.parse(text, str(path))
    with _lock:
        _parsed.clear()
        _parsed[pin] = ps
    return ps


def check_seal(svc: KeyService, key_uris: Sequence[str], env: str, home: Path | None = None) -> None:
    """The standards for ``artifact.seal`` to ``key_uris`` in ``env``, before anything is
    written: a violation is a warning, or ``StandardViolation`` with ``standards = "enforce"``."""
    mode = standards_mode(home)
    report = check(facts_for_keys(svc, key_uris, env), Engine(client_policy(home)), "artifact.seal")
    if report.ok:
        return
    if mode == "enforce":
        enforce(report, f"sealing for env={env}")
    log.warning(
        'seal for env=%s breaks the encryption standards: %s (config.toml [%s] standards = "enforce" refuses this)',
        env,
        report.summary(),
        TABLE,
    )


__all__ = ["MODES", "TABLE", "check_seal", "client_policy", "settings", "standards_mode"]
