"""Trust policy and signed revocation lists (docs/signing.md).

A trust policy (TOML) names signers and their public keys, says which
signers are trusted for which artifact names and environments, with a
threshold of distinct signers, whether unsigned artifacts are refused
(``strict``), and where the revocation list is and who may sign it::

    version = 1
    strict = true                        # the default: unsigned artifacts are refused
    require_name = true                  # callers must pin the name (verify --name, expecting())

    [signers.release]
    keys = ["keys/release.pub.pem"]      # relative to this file, or inline PEM

    [signers.security]
    keys = ["keys/security.pub.pem"]

    [[rules]]
    artifacts = ["llama-*"]              # shell patterns on the signed artifact name
    environments = ["prod"]
    signers = ["release", "security"]
    threshold = 2                        # distinct signers
    min_version = 3                      # optional: refuse older artifact versions (rollback)

    [revocation]
    list = "revocations.json"
    signers = ["security"]
    min_version = 12                     # optional: refuse older lists (rollback)

The revocation list itself, and the host's record of the newest list seen, are
``revocation``'s; this module decides which keys may sign it and how many. A policy
file, and every key file it names, must be writable by its owner only (``load_policy``).
A policy may carry a second one that must *also* pass (``also``): how an environment
variable tightens the configured policy without replacing it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from modelseal.errors import RevocationListError, SigningKeyError
from modelseal.signing.revocation import RevocationList, record_version, seen_version
from modelseal.signing.signers import VerifyKey
from modelseal.util.bounded import toml_loads
from modelseal.util.files import read_limited
from modelseal.util.home import check_private
from modelseal.util.versions import is_version, record_path

MAX_POLICY = 1 << 20
# Bounds checked before the TOML parser runs (util.bounded). The schema's keys have at most
# three parts (signers.NAME.keys) and its values nest at most three deep (inline tables).
_TOML_DEPTH, _TOML_KEY_PARTS, _TOML_VALUES = 8, 8, 100_000
MAX_POLICY_ITEMS = 1024  # signers, rules, and the entries of any one list
MAX_TRUSTED_KEYS = 4096  # in all signers: each may be a key file to read
_RULE_KEYS = {"artifacts", "environments", "signers", "threshold", "min_version"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIGNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class PolicyError(SigningKeyError):
    """The trust policy file is invalid (exit code 2)."""


@dataclass(frozen=True)
class Rule:
    artifacts: tuple[str, ...]
    environments: tuple[str, ...]
    signers: tuple[str, ...]
    threshold: int
    min_version: int = 0  # artifacts it covers must be signed at this version or later

    def covers(self, name: str, env: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.artifacts) and any(
            fnmatch.fnmatchcase(env, p) for p in self.environments
        )


@dataclass(frozen=True)
class RevocationConfig:
    list_path: Path
    signers: tuple[str, ...]
    threshold: int = 1
    min_version: int = 1  # lists older than this are refused (rollback protection for stateless CI)


@dataclass
class TrustPolicy:
    signers: dict[str, list[VerifyKey]]
    rules: list[Rule]
    strict: bool = True
    revocation: RevocationConfig | None = None
    source: str = "<inline>"
    require_name: bool = False  # every verification must say which artifact name it expects
    also: TrustPolicy | None = None  # a further policy every artifact must satisfy as well
    _keys: dict[str, tuple[str, VerifyKey]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name, keys in self.signers.items():
            for k in keys:
                other = self._keys.get(k.key_id)
                if other is not None and other[0] != name:
                    raise PolicyError(f"trust policy: one key is listed for both {other[0]!r} and {name!r}")
                self._keys[k.key_id] = (name, k)

    @classmethod
    def from_keys(cls, keys: list[VerifyKey], strict: bool = True) -> TrustPolicy:
        """The policy of ``verify --public-key``: these keys, for any artifact and environment."""
        return cls({"cli": keys}, [Rule(("*",), ("*",), ("cli",), 1)], strict=strict, source="--public-key")

    def identity(self) -> str:
        """What this host keeps its record of accepted artifact versions under: the policy
        file (its folder resolved, its own name not: ``util.versions.record_path``, so
        ``//x/trust.toml`` or a symlinked folder name the same record), or for a policy
        made in code or from --public-key,
        its trusted key ids. So a signer trusted by one policy (a vendor's key checked with
        --public-key, say) cannot raise the version floor another policy enforces."""
        if self.source.startswith("/"):
            return "file:" + self.source
        return "keys:" + hashlib.sha256(",".join(sorted(self._keys)).encode()).hexdigest()

    def signer_of(self, key_id: str) -> tuple[str, VerifyKey] | None:
        return self._keys.get(key_id)

    def keys_by_id(self, names: tuple[str, ...] | None = None) -> dict[str, VerifyKey]:
        return {kid: k for kid, (n, k) in self._keys.items() if names is None or n in names}

    def revocation_keys(self) -> tuple[dict[str, VerifyKey], dict[str, str]]:
        """The keys that may sign the revocation list, and the signer owning each."""
        names = self.revocation.signers if self.revocation else ()
        keys = self.keys_by_id(names)
        return keys, {kid: self._keys[kid][0] for kid in keys}

    def rules_for(self, name: str, env: str) -> list[Rule]:
        return [r for r in self.rules if r.covers(name, env)]

    def min_version_for(self, name: str, env: str) -> int:
        """The lowest artifact version acceptable for (name, env): the highest floor of
        the rules that cover it."""
        return max((r.min_version for r in self.rules_for(name, env)), default=0)

    def chain(self) -> list[TrustPolicy]:
        """This policy and every policy it requires as well (``also``), in order."""
        out: list[TrustPolicy] = []
        p: TrustPolicy | None = self
        while p is not None:
            out.append(p)
            p = p.also
        return out

    def requiring(self, other: TrustPolicy) -> TrustPolicy:
        """A copy of this policy that also requires ``other`` (it can only be stricter)."""
        tail = other if self.also is None else self.also.requiring(other)
        return TrustPolicy(self.signers, self.rules, self.strict, self.revocation, self.source, self.require_name, tail)

    def revocations(self, now: datetime | None = None) -> RevocationList | None:
        """The authenticated, fresh revocation list (``None`` if the policy has none).

        Its threshold counts distinct revocation *signers*, not keys. Its version must
        be at least the policy's ``min_version`` and at least the highest version this
        host has seen (``$MODELSEAL_HOME/revocation-state.json``): an older list, even
        an unexpired one, would un-revoke what a newer one revoked.
        """
        rc = self.revocation
        if rc is None:
            return None
        keys, owners = self.revocation_keys()
        rl = RevocationList.load(rc.list_path, keys, rc.threshold, now, owners)
        self.check_version(rl)
        record_version(rc.list_path, rl.version)
        return rl

    def version_floor(self) -> int:
        """The oldest list version acceptable: the policy's min_version, or newer seen here."""
        rc = self.revocation
        return 0 if rc is None else max(rc.min_version, seen_version(rc.list_path))

    def remember_version(self, version: int) -> None:
        if self.revocation is not None:
            record_version(self.revocation.list_path, version)

    def check_version(self, rl: RevocationList) -> None:
        rc = self.revocation
        if rc is None:
            return
        floor = self.version_floor()
        if rl.version < floor:
            raise RevocationListError(
                f"the revocation list is version {rl.version}, older than version {floor} already seen: rolled back"
            )


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"trust policy: {where} must be a non-empty list of strings")
    if len(value) > MAX_POLICY_ITEMS:
        raise PolicyError(f"trust policy: {where} lists more than {MAX_POLICY_ITEMS} entries")
    return tuple(value)


def _threshold(value: Any, where: str, most: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise PolicyError(f"trust policy: {where} must be a number from 1 to {most}")
    return value


def _load_key(spec: str, base: Path, where: str) -> VerifyKey:
    if spec.lstrip().startswith("-----BEGIN"):
        return VerifyKey.from_pem(spec.encode(), where)
    # A trusted key is part of the policy: whoever could replace it could sign anything.
    check_private(base / spec, f"the key of {where}", PolicyError, parent=True)
    return VerifyKey.from_file(base / spec)


def parse_policy(doc: dict[str, Any], base: Path, source: str = "<inline>") -> TrustPolicy:
    known = {"version", "strict", "require_name", "signers", "rules", "revocation"}
    if doc.get("version") != 1 or not set(doc) <= known:
        raise PolicyError(f"trust policy: needs version = 1 and only the keys {', '.join(sorted(known))}")
    strict = doc.get("strict", True)
    require_name = doc.get("require_name", False)
    if not isinstance(strict, bool) or not isinstance(require_name, bool):
        raise PolicyError("trust policy: strict and require_name must be true or false")
    signers: dict[str, list[VerifyKey]] = {}
    raw_signers = doc.get("signers", {})
    if not isinstance(raw_signers, dict) or not raw_signers:
        raise PolicyError("trust policy: [signers] must name at least one signer")
    if len(raw_signers) > MAX_POLICY_ITEMS:
        raise PolicyError(f"trust policy: [signers] names more than {MAX_POLICY_ITEMS} signers")
    key_count = 0
    for name, spec in raw_signers.items():
        if not _SIGNER.fullmatch(name) or not isinstance(spec, dict) or set(spec) != {"keys"}:
            raise PolicyError(f"trust policy: [signers.{name}] must be a table with only 'keys'")
        specs = _str_list(spec["keys"], f"{name}.keys")
        key_count += len(specs)
        if key_count > MAX_TRUSTED_KEYS:  # counted before any is read: each may be a file
            raise PolicyError(f"trust policy: more than {MAX_TRUSTED_KEYS} keys in all")
        signers[name] = [_load_key(k, base, f"signers.{name}") for k in specs]
    rules: list[Rule] = []
    raw_rules = doc.get("rules", [])
    if not isinstance(raw_rules, list) or not raw_rules:
        raise PolicyError("trust policy: at least one [[rules]] entry is needed")
    if len(raw_rules) > MAX_POLICY_ITEMS:
        raise PolicyError(f"trust policy: more than {MAX_POLICY_ITEMS} [[rules]] entries")
    for i, r in enumerate(raw_rules):
        where = f"rules[{i}]"
        if not isinstance(r, dict) or not set(r) <= _RULE_KEYS:
            raise PolicyError(f"trust policy: {where} has unknown keys")
        names = _str_list(r.get("signers"), f"{where}.signers")
        for n in names:
            if n not in signers:
                raise PolicyError(f"trust policy: {where} names the unknown signer {n!r}")
        min_version = r.get("min_version", 0)
        if not is_version(min_version):
            raise PolicyError(f"trust policy: {where}.min_version must be a whole number, 0 or more")
        rules.append(
            Rule(
                _str_list(r.get("artifacts", ["*"]), f"{where}.artifacts"),
                _str_list(r.get("environments", ["*"]), f"{where}.environments"),
                names,
                _threshold(r.get("threshold", 1), f"{where}.threshold", len(set(names))),
                min_version,
            )
        )
    revocation = None
    raw_rev = doc.get("revocation")
    if raw_rev is not None:
        if not isinstance(raw_rev, dict) or not set(raw_rev) <= {"list", "signers", "threshold", "min_version"}:
            raise PolicyError("trust policy: [revocation] takes list, signers, threshold and min_version")
        if not isinstance(raw_rev.get("list"), str):
            raise PolicyError("trust policy: [revocation] needs list = PATH")
        rsigners = _str_list(raw_rev.get("signers"), "revocation.signers")
        for n in rsigners:
            if n not in signers:
                raise PolicyError(f"trust policy: [revocation] names the unknown signer {n!r}")
        thr = _threshold(raw_rev.get("threshold", 1), "revocation.threshold", len(set(rsigners)))
        floor = raw_rev.get("min_version", 1)
        if not isinstance(floor, int) or isinstance(floor, bool) or floor < 1:
            raise PolicyError("trust policy: [revocation] min_version must be a positive number")
        revocation = RevocationConfig(base / raw_rev["list"], rsigners, thr, floor)
    return TrustPolicy(signers, rules, strict, revocation, source, require_name)


def load_policy(path: str | Path) -> TrustPolicy:
    """Read a trust policy file; refused if anyone but its owner could change it (or its folder)."""
    p = Path(path)
    check_private(p, "the trust policy", PolicyError, parent=True)
    try:
        raw = read_limited(p, MAX_POLICY, PolicyError, f"the trust policy {p}")
    except FileNotFoundError:
        raise PolicyError(f"the trust policy {p} does not exist") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"trust policy: {p} is not valid TOML ({str(e)[:120]})") from None
    doc = toml_loads(
        text,
        max_depth=_TOML_DEPTH,
        max_key_parts=_TOML_KEY_PARTS,
        max_values=_TOML_VALUES,
        error=PolicyError,
        what=f"trust policy: {p}",
    )
    return parse_policy(doc, p.parent, record_path(p))
