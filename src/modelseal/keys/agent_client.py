"""The client side of ``modelseal agent`` and the wire format both sides share.

Owns the protocol (docs/keys.md, "The agent"): over a Unix stream socket, one request
and one response per connection, each a 4-byte big-endian length and that many bytes of
a UTF-8 JSON object, at most ``MAX_REQUEST`` / ``MAX_RESPONSE`` bytes, parsed with the
bounded parser. Both sides check the other's uid with ``SO_PEERCRED``: the agent serves
only its own user, and a client sends a data key only to an agent of its own user.

Knows no key material: ``keys.providers.local`` calls it when ``MODELSEAL_AGENT_SOCK`` is
set, and it turns the agent's answers back into recipients, data keys, key information
and the modelseal error tree. Every failure to reach the agent, or an agent without
keys, is a ``KeystoreError`` (exit 6) in one line that says what to do.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

from modelseal.errors import (
    DecryptionError,
    KeyDisabled,
    KeyNotFound,
    KeyProviderError,
    KeystoreError,
    ModelsealError,
)
from modelseal.format.header import Recipient
from modelseal.keys.providers.base import KeyInfo, KeyVersionInfo
from modelseal.util.bounded import json_loads

SOCK_ENV = "MODELSEAL_AGENT_SOCK"
PID_ENV = "MODELSEAL_AGENT_PID"
PROTOCOL = 1
MAX_REQUEST = 256 * 1024  # a context of 64 entries of 1 KiB, JSON-escaped, fits
MAX_RESPONSE = 4 * 1024 * 1024  # a key listing
MAX_MESSAGE = 512  # characters of an error message passed on
TIMEOUT = 10.0
UNLOCK_TIMEOUT = 120.0  # the agent pays the KDF (up to 2^22 scrypt)
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# The error classes an agent may name; anything else is a KeystoreError.
_ERRORS: dict[str, type[ModelsealError]] = {
    "DecryptionError": DecryptionError,
    "KeyDisabled": KeyDisabled,
    "KeyNotFound": KeyNotFound,
    "KeyProviderError": KeyProviderError,
    "KeystoreError": KeystoreError,
}


class ProtocolError(KeystoreError):
    """A frame that breaks the protocol: too long, truncated, not a JSON object."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a connected Unix socket."""
    return parse_credentials(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


def parse_credentials(raw: bytes) -> tuple[int, int, int]:
    if len(raw) != _CRED.size:
        raise ProtocolError("unexpected peer credentials")
    pid, uid, gid = _CRED.unpack(raw)
    return pid, uid, gid


def same_user(raw: bytes, uid: int | None = None) -> bool:
    """Whether the ``struct ucred`` bytes ``raw`` name a process of ``uid`` (this process's
    effective uid by default). Malformed credentials are never the same user."""
    try:
        _pid, peer, _gid = parse_credentials(raw)
    except ProtocolError:
        return False
    return peer == (os.geteuid() if uid is None else uid)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """``n`` bytes; with ``deadline`` (time.monotonic) the whole read must end by then, however
    the peer paces its bytes (a socket timeout alone bounds each recv, not the frame)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the peer took too long to send its frame")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ProtocolError("the connection closed " + ("inside a frame" if got else "without a frame"))
        got += k
    return bytes(buf)


def send_frame(sock: socket.socket, obj: dict[str, Any], limit: int) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > limit:
        raise ProtocolError(f"a request of {len(data)} bytes is more than the agent takes ({limit})")
    sock.sendall(struct.pack(">I", len(data)) + data)


def recv_frame(sock: socket.socket, limit: int, deadline: float | None = None) -> dict[str, Any]:
    """One frame, refused before reading its body if it announces more than ``limit``."""
    (n,) = struct.unpack(">I", _recv_exact(sock, 4, deadline))
    if not 2 <= n <= limit:
        raise ProtocolError(f"a frame of {n} bytes is outside 2..{limit}")
    doc = json_loads(
        _recv_exact(sock, n, deadline), max_depth=6, max_values=1 << 16, error=ProtocolError, what="the frame"
    )
    if not isinstance(doc, dict):
        raise ProtocolError("a frame must be a JSON object")
    return doc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str) or len(value) > 4096:
        raise ProtocolError(f"{what} is not base64")
    try:
        out = base64.b64decode(value, validate=True)
    except ValueError:
        raise ProtocolError(f"{what} is not base64") from None
    if size is not None and len(out) != size:
        raise ProtocolError(f"{what} has the wrong length")
    return out


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 32:
        raise ProtocolError(f"{what} is not an unsigned 32-bit integer")
    return value


class AgentClient:
    """Requests to the agent listening at ``path``; one connection per request."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _fail(self, why: str) -> KeystoreError:
        return KeystoreError(
            f"the modelseal agent at {self.path} {why}; start one with 'eval \"$(modelseal agent)\"' "
            f"or unset {SOCK_ENV}"
        )

    def request(self, op: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        """Send one request and return the agent's answer; an error answer is raised as the
        error class it names (allowlisted; else ``KeystoreError``)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise self._fail("is not running") from None
            except OSError as e:
                raise self._fail(f"cannot be reached ({e.strerror or type(e).__name__})") from None
            try:
                pid, uid, _gid = peer_credentials(sock)
                if uid != os.geteuid():
                    raise self._fail(f"belongs to another user (uid {uid}, pid {pid}): nothing was sent")
                send_frame(sock, {"v": PROTOCOL, "op": op, **fields}, MAX_REQUEST)
                answer = recv_frame(sock, MAX_RESPONSE)
            except TimeoutError:
                raise self._fail("did not answer in time") from None
            except ProtocolError as e:
                raise self._fail(f"broke the protocol ({e})") from None
            except OSError as e:
                raise self._fail(f"dropped the connection ({e.strerror or type(e).__name__})") from None
        finally:
            sock.close()
        if answer.get("ok") is True:
            return answer
        message = answer.get("message")
        text = message[:MAX_MESSAGE] if isinstance(message, str) else "the agent refused the request"
        if answer.get("error") == "DecryptionError":
            raise DecryptionError()
        raise _ERRORS.get(str(answer.get("error")), KeystoreError)(text)

    # -- key operations (the keystore path is compared by the agent, never opened) ----
    def wrap(self, keystore: Path, name: str, dek: bytes, context: tuple[tuple[str, str], ...]) -> Recipient:
        r = self.request(
            "wrap", keystore=_where(keystore), name=name, dek=_b64(dek), context=[list(c) for c in context]
        )
        version = _int(r.get("version"), "the version")
        return Recipient("local", name, version, unb64(r.get("wrapped"), "the wrapped key", 12 + len(dek) + 16))

    def unwrap(self, keystore: Path, recipient: Recipient, context: tuple[tuple[str, str], ...]) -> bytes:
        r = self.request(
            "unwrap",
            keystore=_where(keystore),
            name=recipient.key_id,
            version=recipient.key_version,
            wrapped=_b64(recipient.wrapped),
            context=[list(c) for c in context],
        )
        return unb64(r.get("dek"), "the data key", 32)

    def list(self, keystore: Path) -> list[KeyInfo]:
        keys = self.request("list", keystore=_where(keystore)).get("keys")
        if not isinstance(keys, list):
            raise self._fail("broke the protocol (no key list)")
        return [_key_info(k) for k in keys]

    def info(self, keystore: Path, name: str) -> KeyInfo:
        return _key_info(self.request("info", keystore=_where(keystore), name=name).get("key"))

    # -- control ------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self.request("status")

    def lock(self) -> dict[str, Any]:
        return self.request("lock")

    def unlock(self, passphrase: bytes) -> dict[str, Any]:
        return self.request("unlock", timeout=UNLOCK_TIMEOUT, passphrase=_b64(passphrase))

    def stop(self) -> dict[str, Any]:
        return self.request("stop")


def _where(keystore: Path) -> str:
    return os.path.realpath(keystore)


def _key_info(obj: Any) -> KeyInfo:
    try:
        versions = tuple(KeyVersionInfo(_int(v, "a version"), float(c), str(s)) for v, c, s in obj["versions"])
        uri, low = obj["uri"], _int(obj["min_decryption_version"], "the minimum version")
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("the agent sent a malformed key description") from None
    if not isinstance(uri, str) or not uri.startswith("local:") or not versions:
        raise ProtocolError("the agent sent a malformed key description")
    return KeyInfo(uri, versions, low)


def from_env() -> AgentClient | None:
    """The agent ``MODELSEAL_AGENT_SOCK`` names, read now, or None when it is unset or empty."""
    path = os.environ.get(SOCK_ENV)
    return AgentClient(path) if path else None


__all__ = [
    "MAX_REQUEST",
    "MAX_RESPONSE",
    "PID_ENV",
    "SOCK_ENV",
    "AgentClient",
    "ProtocolError",
    "from_env",
    "peer_credentials",
    "recv_frame",
    "same_user",
    "send_frame",
    "unb64",
]
