"""The state of the KEK versions a sealed header names, for ``modelseal scan``: usable,
disabled, past its cryptoperiod, or unknown. No key is used: nothing is wrapped or unwrapped.

Where the state comes from:

- ``local:`` recipients: this host's keystore (``KeyService.list``), unlocked with
  ``MODELSEAL_PASSPHRASE`` or through the agent (``MODELSEAL_AGENT_SOCK``); a scan never
  prompts. Without either, or for a key this keystore does not hold (it may be another
  host's), the state is unknown.
- other schemes (``transit:``, ``awskms:``, ``pkcs11:``, ``broker:`` through the broker's
  catalog): only for a key the operator names, in config.toml's environments and projects
  or ``[scan] keys``, whose canonical identity is the recipient's (``KeyService.canonical``
  and ``recipient_identity``), asked once per key (``KeyService.info``). A recipient key id
  read from an artifact is compared with those, never used to choose a key to ask about.

A version is *disabled* when it exists in a state other than ``active``, or below the
key's minimum decryption version; *past its cryptoperiod* when it is active and older than
``cryptoperiod_days`` (``[scan] cryptoperiod_days``, default 365: the ``std-cryptoperiod``
standard of the shipped Cedar policy, docs/governance.md). Unknown is reported as a note,
never as a finding.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from modelseal.errors import KeystoreError, ModelsealError
from modelseal.format.header import Recipient
from modelseal.keys.keystore import PASSPHRASE_ENV
from modelseal.keys.providers.base import KeyInfo
from modelseal.keys.providers.local import LocalProvider
from modelseal.keys.service import KeyService, printable

CRYPTOPERIOD_DAYS = 365  # governance/policies/default.cedar, std-cryptoperiod
DAY = 86400.0
USABLE, DISABLED, PAST, UNKNOWN = "usable", "disabled", "past-cryptoperiod", "unknown"


@dataclass(frozen=True)
class VersionState:
    status: str  # USABLE, DISABLED, PAST or UNKNOWN
    detail: str  # one line: which version, and why


def _env_passphrase() -> bytes:
    value = os.environ.get(PASSPHRASE_ENV)
    if not value:
        raise KeystoreError(f"no {PASSPHRASE_ENV} (a scan never prompts)")
    return value.encode()


def scan_service(config_svc: KeyService | None = None) -> KeyService:
    """A KeyService whose ``local:`` provider never prompts for the passphrase (the
    environment or the agent only); other providers as configured."""
    cfg = config_svc.config if config_svc is not None else None
    return KeyService(providers={"local": LocalProvider(passphrase=_env_passphrase)}, config=cfg)


class KeyStates:
    """The state of recipients' KEK versions at time ``now`` (see the module doc)."""

    def __init__(
        self,
        svc: KeyService | None,
        *,
        cryptoperiod_days: int = CRYPTOPERIOD_DAYS,
        now: float | None = None,
        keys: Iterable[str] = (),
        note: Callable[[str], None] = lambda _text: None,
    ) -> None:
        self.svc = svc
        self.period = cryptoperiod_days * DAY
        self.cryptoperiod_days = cryptoperiod_days
        self.now = time.time() if now is None else now
        self._extra = list(keys)
        self._note = note
        self._local: dict[str, KeyInfo] | None = None
        self._canon: dict[str, str] | None = None
        self._infos: dict[str, KeyInfo | None] = {}

    def state(self, r: Recipient) -> VersionState:
        info = self._info(r)
        if info is None:
            return VersionState(UNKNOWN, f"{r.scheme}:{printable(r.key_id)}#{r.key_version}: state unknown")
        return self.judge(info, r.key_version)

    def judge(self, info: KeyInfo, version: int) -> VersionState:
        """The state of ``version`` of the key ``info`` describes."""
        name = f"{printable(info.uri)}#{version}"
        v = next((v for v in info.versions if v.version == version), None)
        if v is None:
            return VersionState(UNKNOWN, f"{name}: no such version here")
        if v.state != "active":
            return VersionState(DISABLED, f"{name} is {v.state}")
        if version < info.min_decryption_version:
            return VersionState(DISABLED, f"{name} is below the minimum decryption version")
        if v.created > 0 and self.now - v.created > self.period:
            age = int((self.now - v.created) // DAY)
            return VersionState(PAST, f"{name} is {age} days old (cryptoperiod {self.cryptoperiod_days} days)")
        return VersionState(USABLE, f"{name} is active")

    # -- where the state comes from ---------------------------------------------------------

    def _info(self, r: Recipient) -> KeyInfo | None:
        if self.svc is None:
            return None
        if r.scheme == "local":
            return self._local_keys().get(r.key_id)
        uri = self._configured().get(self._identity(r) or "")
        if uri is None:
            self._note(f"{r.scheme}: key versions unknown for keys config.toml does not name")
            return None
        if uri not in self._infos:
            try:
                self._infos[uri] = self.svc.info(uri)
            except (ModelsealError, ValueError, OSError) as e:
                self._note(f"{printable(uri)}: key versions unknown ({printable(str(e))[:160]})")
                self._infos[uri] = None
        return self._infos[uri]

    def _identity(self, r: Recipient) -> str | None:
        assert self.svc is not None
        try:
            return self.svc.recipient_identity(r)
        except (ModelsealError, ValueError):
            return None

    def _local_keys(self) -> dict[str, KeyInfo]:
        if self._local is None:
            assert self.svc is not None
            try:
                self._local = {i.uri.removeprefix("local:"): i for i in self.svc.list("local")}
            except (ModelsealError, ValueError, OSError) as e:
                self._note(f"local: key versions unknown ({printable(str(e))[:160]})")
                self._local = {}
        return self._local

    def _configured(self) -> dict[str, str]:
        """canonical identity -> the operator's key URI, for every key the operator names."""
        if self._canon is None:
            assert self.svc is not None
            self._canon = {}
            try:
                cfg = self.svc.config
                named = [k for ks in cfg.environments.values() for k in ks]
                named += [k for per_env in cfg.projects.values() for ks in per_env.values() for k in ks]
            except (ModelsealError, ValueError) as e:
                self._note(f"config.toml unreadable: key versions unknown ({printable(str(e))[:160]})")
                named = []
            for k in dict.fromkeys([*named, *self._extra]):
                if k.startswith("local:") or ":" not in k:
                    continue
                try:
                    self._canon.setdefault(self.svc.canonical(k), k)
                except (ModelsealError, ValueError, OSError):
                    continue
        return self._canon


__all__ = ["CRYPTOPERIOD_DAYS", "DISABLED", "PAST", "UNKNOWN", "USABLE", "KeyStates", "VersionState", "scan_service"]
