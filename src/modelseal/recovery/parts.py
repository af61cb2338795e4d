"""What a backup holds (docs/recovery.md, "What a backup holds"): each part collected into
memory as plaintext (``recovery.partcodec``'s layout, with a header the scan recognises),
with counts for the manifest. Nothing here writes to disk: ``recovery.create`` seals the parts.

Parts, in ``PART_NAMES`` order:

- ``keystore``: ``keystore.json`` as it is; for an environment, a copy holding only the keys
  config.toml binds to it (its ``[environments]``/``[projects]`` keys and the broker keys of
  that environment backed by ``local:``, static or in ``gov_broker_keys``), under the same
  root key and passphrase wrap (``keys.keystore_export``; this needs the passphrase).
- ``config``: the names of ``CONFIG_FILES`` plus the files config.toml names inside the home
  (``config_names``): the trust policy, its key files and revocation list, the governance
  policy, each only in the fixed forms of ``config_file_allowed`` (``*.toml``, ``*.pem``,
  ``*.pub``, ``*.json``, ``*.cedar``, never a name reserved for other state); and
  ``audit-hosts.toml`` beside the audit log (as ``audit/audit-hosts.toml``). No private
  signing key is ever in a part: not the audit key (a full restore starts a new one), not the
  backup signing key.
- ``ca``: ``$MODELSEAL_HOME/ca/``, the names of ``CA_FILE`` only (its private keys are sealed).
- ``governance``, ``registry``, ``audit``: ``recovery.sqldump`` dumps.
- ``openbao``: a raft snapshot (``recovery.baosnap``).

A component this host does not have (no registry, no CA, no OpenBao) is skipped and named
in the first part's meta under ``skipped``. For an environment, a part never holds another
environment's keys: the keystore is filtered; the governance tables with an ``env`` column
keep that environment's rows; the OpenBao snapshot is taken only when config.toml's
``[recovery] openbao_env`` declares the cluster that environment's own and every ``transit:``
key anywhere in config.toml or the broker's catalog is that environment's (``check_bao_scope``);
otherwise the backup is refused (``BackupError``), since a snapshot holds every key of the
cluster.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelseal.errors import BackupError
from modelseal.governance.brokerkeys import load_config as load_broker_config
from modelseal.keys import keystore
from modelseal.keys.config import config_table
from modelseal.keys.config import load as load_config
from modelseal.keys.keystore_export import environment_keys, export_subset
from modelseal.keys.providers import parse_key_uri
from modelseal.recovery import baosnap, sqldump
from modelseal.recovery.locations import Locations
from modelseal.recovery.partcodec import encode_files
from modelseal.util.bounded import toml_loads
from modelseal.util.files import read_limited

if TYPE_CHECKING:
    from modelseal.keys.service import KeyService

PART_NAMES = ("keystore", "config", "ca", "governance", "registry", "audit", "openbao")
CONFIG_FILES = ("config.toml", "revocation-state.json", "artifact-state.json", "signing-state.json")
AUDIT_FILES = ("audit-hosts.toml",)  # beside the audit log's key: "audit/NAME"; never the key itself
VERSION_RECORDS = CONFIG_FILES[1:]  # only ever rise: merged, never lowered, on restore
CA_FILE = re.compile(
    r"(ca|issued|revoked)\.json|(root|issuing)-[0-9]{1,6}\.pem|(root|issuing|next)-[0-9]{1,6}\.key\.json"
)
NAMED_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,4}")
CONFIG_SUFFIXES = (".toml", ".pem", ".pub", ".json", ".cedar")  # policies, keys, revocation lists
# Names of the home that other state owns: a config part never writes one, whatever its config says.
RESERVED_NAMES = frozenset(
    {
        *CONFIG_FILES,
        "keystore.json",
        "backup-state.json",
        "backup-signing.key",
        "audit-signing.key",
        "audit-hosts.toml",
        "restore-journal.json",
        "governance.db",
    }
)
RESERVED_FOLDERS = frozenset({"recovery", "ca", "incidents", "evidence", "audit", "registry"})
MAX_FILE = 16 << 20


@dataclass(frozen=True)
class Part:
    name: str  # one of PART_NAMES
    kind: str  # "files" | "sql" | "bao-snapshot"
    data: bytes = field(repr=False)  # the plaintext, in memory only
    meta: dict[str, Any]


def _read(path: Path) -> tuple[bytes, int] | None:
    try:
        data = read_limited(path, MAX_FILE, BackupError, str(path), regular=True)
    except FileNotFoundError:
        return None
    return data, path.stat().st_mode & 0o777


def _toml(data: bytes, what: str) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BackupError(f"{what} is not UTF-8") from None
    doc = toml_loads(
        text, max_depth=8, max_key_parts=8, max_values=100_000, error=lambda why: BackupError(f"{what}: {why}")
    )
    return doc if isinstance(doc, dict) else {}


def _relative(name: str, base: str) -> str | None:
    """``name`` (relative to folder ``base`` of the home, or absolute) as a name inside the
    home, or None when it is absolute or leaves the home (not backed up: not the home's)."""
    if not name or name.startswith("/") or name.lstrip().startswith("-----BEGIN"):
        return None
    parts: list[str] = [p for p in base.split("/") if p]
    for seg in name.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(seg)
    joined = "/".join(parts)
    return joined if NAMED_FILE.fullmatch(joined) else None


def config_file_allowed(name: str) -> bool:
    """Whether ``name`` (relative to the home) is of the fixed forms a config part may hold
    beside its fixed names: plain segments, a policy/key/revocation-list suffix, and not a name
    or folder that other state owns (``RESERVED_NAMES``, ``RESERVED_FOLDERS``, ``audit.db*``)."""
    if not NAMED_FILE.fullmatch(name) or not name.endswith(CONFIG_SUFFIXES):
        return False
    top = name.split("/", 1)[0]
    return name not in RESERVED_NAMES and top not in RESERVED_FOLDERS and not top.startswith("audit.db")


def config_names(config: bytes, read: Callable[[str], bytes | None]) -> set[str]:
    """The files config.toml names inside the home: ``trust_policy`` with the key files and
    revocation list that policy names, and ``[governance] policy``, each kept only when
    ``config_file_allowed``. ``read`` gives a named file's bytes (from the home when collecting,
    from the part when restoring). The same rule on both sides: a restore writes no name this
    function does not produce."""
    return {n for n in _named(config, read) if config_file_allowed(n)}


def _named(config: bytes, read: Callable[[str], bytes | None]) -> set[str]:
    try:
        doc = _toml(config, "config.toml")
    except BackupError:
        return set()  # nothing derivable: only the fixed names (the allowlist only shrinks)
    names: set[str] = set()
    gov = doc.get("governance")
    if isinstance(gov, dict) and isinstance(gov.get("policy"), str) and (n := _relative(gov["policy"], "")):
        names.add(n)
    trust = doc.get("trust_policy")
    policy = _relative(trust, "") if isinstance(trust, str) else None
    if policy is None:
        return names
    names.add(policy)
    raw = read(policy)
    if raw is None:
        return names
    try:
        pdoc = _toml(raw, "the trust policy")
    except BackupError:
        return names  # the policy itself is backed up; what it names cannot be read
    base = policy.rpartition("/")[0]
    signers = pdoc.get("signers")
    for spec in signers.values() if isinstance(signers, dict) else ():
        keys = spec.get("keys") if isinstance(spec, dict) else None
        for k in keys if isinstance(keys, list) else ():
            if isinstance(k, str) and (n := _relative(k, base)):
                names.add(n)
    rev = pdoc.get("revocation")
    if isinstance(rev, dict) and isinstance(rev.get("list"), str) and (n := _relative(rev["list"], base)):
        names.add(n)
    return names


def audit_key_folder(loc: Locations) -> Path:
    """Where the audit signing key and ``audit-hosts.toml`` live (``audit.log``'s rule)."""
    dialect, target = loc.audit_target()
    return Path(target).parent if dialect == "sqlite" else loc.home


def _broker_keys(loc: Locations, env: str) -> set[str]:
    """The ``local:`` key names behind ``env``'s broker keys: config.toml's ``[broker.keys]``
    and the ``gov_broker_keys`` rows of the governance database."""
    backings = [k.backing for k in load_broker_config(loc.home).keys.values() if k.env == env]
    target = loc.governance_target()
    if target is not None and sqldump.source_exists(*target):
        backings += [b for e, b in sqldump.broker_backings(*target) if e == env]
    names = set()
    for uri in backings:
        ref = parse_key_uri(uri)
        if ref.scheme == "local":
            names.add(ref.name)
    return names


def _keystore(loc: Locations, env: str | None) -> Part | None:
    path = keystore.keystore_path(loc.home)
    if env is None:
        got = _read(path)
        if got is None:
            return None
        return Part("keystore", "files", encode_files("keystore", {"keystore.json": (got[0], 0o600)}), {"files": 1})
    if not path.is_file():
        return None
    names = environment_keys(load_config(loc.home), env) | _broker_keys(loc, env)
    data, kept = export_subset(path, names)
    meta = {"files": 1, "env": env, "keys": len(kept)}
    return Part("keystore", "files", encode_files("keystore", {"keystore.json": (data, 0o600)}, env=env), meta)


def _config(loc: Locations) -> Part | None:
    files: dict[str, tuple[bytes, int]] = {}
    for n in CONFIG_FILES:
        if (got := _read(loc.home / n)) is not None:
            files[n] = got
    if "config.toml" in files:

        def read(name: str) -> bytes | None:
            got = _read(loc.home / name)
            return None if got is None else got[0]

        for n in sorted(config_names(files["config.toml"][0], read)):
            if (got := _read(loc.home / n)) is not None:
                files[n] = got
    folder = audit_key_folder(loc)
    for n in AUDIT_FILES:
        if (got := _read(folder / n)) is not None:
            files[f"audit/{n}"] = got
    if not files:
        return None
    return Part("config", "files", encode_files("config", files), {"files": len(files)})


def _ca(loc: Locations) -> Part | None:
    folder = loc.home / "ca"
    if not folder.is_dir():
        return None
    files: dict[str, tuple[bytes, int]] = {}
    left_out = 0
    for p in sorted(folder.iterdir()):
        if CA_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            got = _read(p)
            if got is not None:
                files[p.name] = got
        elif not p.name.startswith("."):
            left_out += 1
    if "ca.json" not in files:
        return None
    return Part("ca", "files", encode_files("ca", files), {"files": len(files), "left_out": left_out})


def _sql(name: str, target: tuple[str, str] | None, env: str | None) -> Part | None:
    if target is None or not sqldump.source_exists(*target):
        return None
    data, meta = sqldump.dump(name, target[0], target[1], name=name, env=env if name == "governance" else None)
    return Part(name, "sql", data, {**meta, "dialect": target[0]})


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _ca_on_openbao(home: Path) -> bool:
    got = _read(home / "ca" / "ca.json")
    return got is not None and b'"transit-pki"' in got[0]  # its backend, as pki.transit_pki writes it


def bao_foreign_uses(loc: Locations, env: str) -> list[str]:
    """What puts keys of others than ``env`` on the OpenBao cluster: every ``transit:`` URI
    anywhere in config.toml that is not one of ``env``'s own keys (``[environments]``,
    ``[projects]``, ``[broker.keys]`` of that env), a ``[broker] create`` making another
    environment's keys in transit, a ``gov_broker_keys`` row of another environment backed by
    transit, and the CA or anything else on ``transit-pki`` (the host's, not one env's)."""
    cfg = load_config(loc.home)
    broker = load_broker_config(loc.home)
    own = set(cfg.environments.get(env, [])) | {k for p in cfg.projects.values() for k in p.get(env, [])}
    own |= {k.backing for k in broker.keys.values() if k.env == env}
    got = _read(loc.home / "config.toml")
    doc = _toml(got[0], "config.toml") if got is not None else {}
    found: list[str] = []
    for text in _strings(doc):
        if text.startswith("transit:") and text not in own:
            found.append(f"config.toml names the transit key {text[:80]!r}, which is not {env}'s")
        elif text == "transit-pki":
            found.append("config.toml uses transit-pki (the host's CA on the cluster)")
    for e, template in sorted(broker.create.items()):
        if e != env and template.partition(":")[0] == "transit":
            found.append(f"[broker] create makes {'every other' if e == '*' else e} environment's keys in transit")
    target = loc.governance_target()
    if target is not None and sqldump.source_exists(*target):
        for e, backing in sqldump.broker_backings(*target):
            if e != env and backing.startswith("transit:"):
                found.append(f"the broker key catalog has a transit key of environment {e}")
    if _ca_on_openbao(loc.home):
        found.append("the CA is on transit-pki (the host's, not one environment's)")
    return found


def check_bao_scope(loc: Locations, env: str) -> None:
    """Refuse an environment's OpenBao snapshot unless the cluster is that environment's alone:
    declared so (``[recovery] openbao_env``) and ``bao_foreign_uses`` finds nothing."""
    declared = config_table("recovery", loc.home).get("openbao_env")
    foreign = bao_foreign_uses(loc, env)
    if declared != env or foreign:
        why = foreign[0] if foreign else "config.toml [recovery] openbao_env does not name it"
        raise BackupError(
            f"the OpenBao snapshot would hold every key of the cluster, and it is not {env}'s own ({why}):"
            " back it up without --env"
        )


def collect(loc: Locations, env: str | None, svc: KeyService) -> list[Part]:
    """Every part of this host's state (``env`` None), or ``env``'s (module docstring).

    ``svc`` is the caller's key service (the keystore export unlocks the keystore with the
    passphrase from ``MODELSEAL_PASSPHRASE`` or the terminal, as ``svc``'s local provider does)."""
    del svc  # the parts are read as data; sealing them is the caller's (recovery.create)
    if env is not None and loc.bao is not None:
        check_bao_scope(loc, env)  # before anything is read
    found: dict[str, Part | None] = {
        "keystore": _keystore(loc, env),
        "config": _config(loc),
        "ca": _ca(loc),
        "governance": _sql("governance", loc.governance_target(), env),
        "registry": _sql("registry", loc.registry_target(), None),
        "audit": _sql("audit", loc.audit_target(), None),
        "openbao": None,
    }
    if loc.bao is not None:
        snap = baosnap.save_snapshot(loc.bao)
        found["openbao"] = Part("openbao", "bao-snapshot", snap, {"bytes": len(snap), **({"env": env} if env else {})})
    parts = [p for n in PART_NAMES if (p := found[n]) is not None]
    if not parts:
        raise BackupError(f"nothing to back up under {loc.home}")
    skipped = [n for n in PART_NAMES if found[n] is None]
    first = parts[0]
    parts[0] = Part(first.name, first.kind, first.data, {**first.meta, "skipped": skipped})
    return parts


__all__ = [
    "AUDIT_FILES",
    "CA_FILE",
    "CONFIG_FILES",
    "PART_NAMES",
    "Part",
    "audit_key_folder",
    "bao_foreign_uses",
    "check_bao_scope",
    "collect",
    "config_file_allowed",
    "config_names",
]
