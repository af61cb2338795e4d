"""``modelseal agent``: the unlocked local keystore held in memory, and what it does with it.

The ssh-agent model (docs/keys.md, "The agent"): the agent performs the key operations
of the ``local:`` provider's hot path (``wrap``, ``unwrap``, and the key descriptions
``list`` and ``info``) and never hands out the root key or a KEK. It holds each KEK and
the root key in its own buffer left out of core dumps (``util.hardening.secret_buffer``),
zeroed when the keys are dropped: on ``lock``, when the TTL runs out, on ``stop``, and
when the keystore file is found re-wrapped, replaced, gone or readable by others.

Before every key operation the keystore file is read again and compared by SHA-256: a
file changed by a lifecycle command (``key rotate``, ``disable``, ``destroy``, made with
the passphrase by the CLI) is re-opened with the held root key, so a disabled or
destroyed version stops unwrapping at once. Requests are checked field by field
(``Agent.handle``); nothing in one becomes a path or a setting: the keystore path a
request names is only compared with the agent's own. The socket and the process are
``keys.agent_server``'s; the wire format is ``keys.agent_client``'s.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from modelseal.errors import KeystoreError, ModelsealError
from modelseal.format.header import MAX_CONTEXT_ENTRIES, MAX_KEY_ID, Recipient, normalize_context
from modelseal.keys import keystore
from modelseal.keys.agent_client import MAX_MESSAGE, PROTOCOL, ProtocolError, unb64
from modelseal.keys.providers.base import KeyInfo
from modelseal.keys.providers.local import entry_of, key_info, unwrap_entry, wrap_entry
from modelseal.util.hardening import secret_buffer

DEFAULT_TTL = 3600.0
MAX_TTL = 30 * 86400.0
LOCKED = "the modelseal agent holds no keys (locked, expired, or the keystore changed): run 'modelseal agent --unlock'"

# Each operation and the fields its request carries (besides ``v`` and ``op``).
FIELDS: dict[str, frozenset[str]] = {
    "status": frozenset(),
    "lock": frozenset(),
    "unlock": frozenset({"passphrase"}),
    "stop": frozenset(),
    "wrap": frozenset({"keystore", "name", "dek", "context"}),
    "unwrap": frozenset({"keystore", "name", "version", "wrapped", "context"}),
    "list": frozenset({"keystore"}),
    "info": frozenset({"keystore", "name"}),
}


def _secret(data: Any) -> memoryview:
    buf = secret_buffer(len(data))
    buf[:] = data
    return buf


def _wipe(buf: memoryview) -> None:
    buf[:] = bytes(len(buf))
    buf.release()


# How usable a version is; a reload may only lower it (pending-destroy -> disabled is the
# one way up: cancel_destroy). Anything else means an older copy of the file came back.
_RANK = {"destroyed": 0, "pending-destroy": 1, "disabled": 2, "active": 3}


def went_backwards(held: dict[str, Any], fresh: dict[str, Any]) -> str | None:
    """Why the reloaded key table ``fresh`` cannot follow the held table, or None.

    The held root opens any copy of the file ever written under it, so a process that
    can reach the socket (but lacks the passphrase) could restore a backup to bring back
    a destroyed, disabled or retired version. Key changes are made with the passphrase
    and only ever shred, disable, add versions or raise the floor, or enable a disabled
    version; a reload that undoes one of those drops the keys until an unlock, which
    costs a legitimate ``key enable`` one ``modelseal agent --unlock``."""
    for name, entry in held.items():
        new = fresh.get(name)
        if not isinstance(new, dict) or not isinstance(new.get("versions"), dict):
            return f"key {name} is gone"
        if int(new.get("min_decryption_version", 1)) < int(entry.get("min_decryption_version", 1)):
            return f"the minimum decryption version of {name} went down"
        for v, data in entry["versions"].items():
            nd = new["versions"].get(v)
            if not isinstance(nd, dict):
                return f"version {v} of {name} is gone"
            before, after = _RANK.get(str(data.get("state")), 0), _RANK.get(str(nd.get("state")), 3)
            if after > before and not (before == 1 and after == 2):
                return f"version {v} of {name} went from {data.get('state')} to {nd.get('state')}"
    return None


class HeldKeys:
    """One unlocked keystore: the key table without its material, each version's KEK and
    the root key in secret buffers, and what identifies the file they came from."""

    def __init__(self, ks: keystore.UnlockedKeystore) -> None:
        self.header, self.signature = ks.header, ks.signature
        self.root = _secret(ks.root_key)
        self._wiped = False
        self.table: dict[str, Any] = {}
        self.keks: dict[tuple[str, int], memoryview] = {}
        try:
            for name, entry in ks.keys.items():
                versions = {}
                for v, data in entry["versions"].items():
                    versions[v] = {k: x for k, x in data.items() if k != "material"}
                    if isinstance(data.get("material"), str):
                        self.keks[(name, int(v))] = _secret(base64.b64decode(data["material"], validate=True))
                self.table[name] = {**{k: x for k, x in entry.items() if k != "versions"}, "versions": versions}
        except (KeyError, TypeError, ValueError, AttributeError):
            self.wipe()
            raise KeystoreError("keystore file is damaged") from None

    def material(self, name: str) -> Callable[[int, dict[str, Any]], Any]:
        def kek(version: int, _data: dict[str, Any]) -> Any:
            buf = self.keks.get((name, version))
            if buf is None:
                raise KeystoreError(f"version {version} of local:{name} has no key material")
            return buf

        return kek

    def wipe(self) -> None:
        """Zero every key byte this object holds (the parsed file's own strings and the
        KDF's output were Python objects, freed but not zeroed: as far as Python allows)."""
        for buf in self.keks.values():
            _wipe(buf)
        self.keks.clear()
        if not self._wiped:
            _wipe(self.root)
            self._wiped = True
        self.table.clear()


class Agent:
    """The key-holding state of one agent process, safe to share between threads."""

    def __init__(self, path: Path, ttl: float = DEFAULT_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        if not 1.0 <= ttl <= MAX_TTL:
            raise ValueError(f"the TTL must be between 1 second and {int(MAX_TTL // 86400)} days")
        self.path = Path(os.path.realpath(path))
        self.ttl, self._clock = ttl, clock
        self._lock = threading.Lock()
        self._held: HeldKeys | None = None
        self._deadline = 0.0

    # -- state ----------------------------------------------------------------------
    def unlock(self, passphrase: bytes) -> None:
        """Unlock the keystore with the passphrase (paying the KDF) and hold it for the TTL."""
        held = HeldKeys(keystore.unlock_uncached(self.path, passphrase))
        with self._lock:
            old, self._held, self._deadline = self._held, held, self._clock() + self.ttl
        if old is not None:
            old.wipe()

    def lock(self) -> bool:
        """Drop and zero the keys; whether any were held."""
        with self._lock:
            old, self._held = self._held, None
        if old is not None:
            old.wipe()
        return old is not None

    def expire(self) -> bool:
        """Drop the keys if the TTL has run out; whether it did."""
        with self._lock:
            due = self._held is not None and self._clock() >= self._deadline
        return self.lock() if due else False

    def status(self) -> dict[str, Any]:
        self.expire()
        with self._lock:
            held = self._held
            left = max(0.0, self._deadline - self._clock()) if held is not None else None
            count = len(held.table) if held is not None else 0
        unlocked = held is not None
        return {"unlocked": unlocked, "expires_in": left, "keystore": str(self.path), "pid": os.getpid(), "keys": count}

    def _current(self, keystore_named: Any) -> HeldKeys:
        """The held keys, refreshed from the file if it changed; the caller holds ``_lock``."""
        if not isinstance(keystore_named, str) or len(keystore_named) > 4096:
            raise ProtocolError("the keystore must be a path string")
        if keystore_named != str(self.path):
            raise KeystoreError(f"this agent serves the keystore {self.path}, not {keystore_named}")
        held = self._held
        if held is not None and self._clock() >= self._deadline:
            self._held = None
            held.wipe()
            held = None
        if held is None:
            raise KeystoreError(LOCKED)
        try:
            fresh = keystore.reread(self.path, held.root, held.header, held.signature)
            if fresh is None:
                return held
            why = went_backwards(held.table, fresh.keys)
            if why is not None:
                self._held = None
                raise KeystoreError(f"keystore {self.path} went backwards ({why}): unlock the agent again")
            self._held = HeldKeys(fresh)  # copies the held root before that copy is zeroed
        except KeystoreError:
            self._held = None  # a file the held root no longer opens: keep nothing
            raise
        finally:
            if self._held is not held:
                held.wipe()
        return self._held

    # -- requests -------------------------------------------------------------------
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """The answer to one decoded request: never raises (an error is an answer)."""
        try:
            return {"ok": True, **self._dispatch(request)}
        except ProtocolError as e:
            return _error("KeystoreError", f"malformed request: {e}")
        except ModelsealError as e:
            return _error(type(e).__name__, str(e))
        except ValueError as e:  # an invalid context, say
            return _error("KeyProviderError", f"invalid request: {e}")
        except Exception as e:  # the agent keeps serving; the message is not echoed
            return _error("KeystoreError", f"internal error in the agent ({type(e).__name__})")

    def _dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("v") != PROTOCOL:
            raise ProtocolError(f"protocol version {PROTOCOL} only")
        op = req.get("op")
        if not isinstance(op, str) or op not in FIELDS:
            raise ProtocolError("unknown operation")
        if set(req) - {"v", "op"} != FIELDS[op]:
            raise ProtocolError(f"{op} takes exactly the fields {', '.join(sorted(FIELDS[op])) or '(none)'}")
        if op == "status":
            return self.status()
        if op == "lock":
            return {"was_unlocked": self.lock()}
        if op == "stop":  # the server stops once the answer is sent
            self.lock()
            return {"pid": os.getpid()}
        if op == "unlock":
            # Immutable copies (the frame, base64, bytes): freed, not zeroed, as in the CLI.
            passphrase = unb64(req["passphrase"], "the passphrase")
            if not passphrase:
                raise KeystoreError("an empty passphrase is not allowed")
            self.unlock(passphrase)
            return self.status()
        with self._lock:
            held = self._current(req["keystore"])
            if op == "list":
                return {"keys": [_describe(key_info(n, held.table[n])) for n in sorted(held.table)]}
            name = _name(req["name"])
            entry = entry_of(held.table, name)
            if op == "info":
                return {"key": _describe(key_info(name, entry))}
            context = _context(req["context"])
            if op == "wrap":
                r = wrap_entry(name, entry, unb64(req["dek"], "the data key", 32), context, held.material(name))
                return {"version": r.key_version, "wrapped": base64.b64encode(r.wrapped).decode()}
            version = req["version"]
            if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 1 << 32:
                raise ProtocolError("the version must be an unsigned 32-bit integer")
            recipient = Recipient("local", name, version, unb64(req["wrapped"], "the wrapped key"))
            dek = unwrap_entry(entry, recipient, context, held.material(name))
            return {"dek": base64.b64encode(dek).decode()}


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": kind, "message": message[:MAX_MESSAGE]}


def _name(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value.encode(errors="replace")) <= MAX_KEY_ID:
        raise ProtocolError("the key name must be a string of 1..512 bytes")
    return value


def _context(value: Any) -> tuple[tuple[str, str], ...]:
    """The canonical encryption context the request carries; refused unless canonical."""
    if not isinstance(value, list) or len(value) > MAX_CONTEXT_ENTRIES:
        raise ProtocolError(f"the context must be a list of at most {MAX_CONTEXT_ENTRIES} pairs")
    pairs: list[tuple[str, str]] = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2 or not all(isinstance(x, str) for x in item):
            raise ProtocolError("each context entry must be a [key, value] pair of strings")
        pairs.append((cast(str, item[0]), cast(str, item[1])))
    if normalize_context(dict(pairs)) != tuple(pairs):
        raise ProtocolError("the context must be canonical: sorted, without repeated keys")
    return tuple(pairs)


def _describe(info: KeyInfo) -> dict[str, Any]:
    return {
        "uri": info.uri,
        "versions": [[v.version, v.created, v.state] for v in info.versions],
        "min_decryption_version": info.min_decryption_version,
    }


__all__ = ["DEFAULT_TTL", "FIELDS", "LOCKED", "MAX_TTL", "Agent", "HeldKeys"]
