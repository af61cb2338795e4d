"""The agent's process: its socket, the peer check, daemonizing, signals, and start-up.

Owns where the socket may live (a folder of this user's that nobody else can enter:
``check_socket_path``; by default a fresh ``mkdtemp`` folder under ``$XDG_RUNTIME_DIR``
or the temporary folder), binding it mode 0600, refusing every connection from another
uid (``SO_PEERCRED``) before reading a byte, one bounded frame each way per connection
with a timeout, the TTL's expiry checked several times a second, and a clean stop
(``stop`` request, SIGTERM, SIGINT, SIGHUP): keys zeroed, socket and folder removed.

``start`` reads the passphrase once (``MODELSEAL_PASSPHRASE`` or a prompt), then removes
the variable from this process's environment, overwriting its value in the environment
block first so that ``/proc/PID/environ`` no longer shows it. Key handling is
``keys.agent``'s, the wire format ``keys.agent_client``'s.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import socketserver
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from modelseal.errors import KeystoreError, PolicyDenied
from modelseal.keys import keystore
from modelseal.keys.agent import Agent
from modelseal.keys.agent_client import MAX_REQUEST, MAX_RESPONSE, ProtocolError, recv_frame, same_user, send_frame
from modelseal.util.hardening import disable_core_dumps
from modelseal.util.home import check_home, modelseal_home

CONNECTION_TIMEOUT = 5.0
MAX_CONNECTIONS = 32
MAX_SOCKET_PATH = 107  # sun_path, less its terminating NUL
POLL = 0.2


class _Stop(BaseException):  # not an Exception: socketserver swallows those
    pass


def check_private_dir(folder: Path) -> None:
    """Refuse a socket folder that is not a directory of this user with no access for others."""
    try:
        st = os.stat(folder)
    except OSError as e:
        raise PolicyDenied(f"cannot use {folder} for the agent's socket: {e.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or mode & 0o077:
        raise PolicyDenied(
            f"the agent's socket must be in a folder of this user that others cannot enter: {folder} "
            f"(mode {mode:o}, uid {st.st_uid}); run: chmod 700 {folder}"
        )


def check_socket_path(path: Path) -> None:
    """A socket path in a private folder, short enough for ``sun_path``, and free: an
    existing socket nobody listens on (a crashed agent's) is removed, anything else refused."""
    check_private_dir(path.parent)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise PolicyDenied(f"the socket path {path} is longer than {MAX_SOCKET_PATH} bytes")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise PolicyDenied(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)  # stale
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise PolicyDenied(f"an agent is already listening at {path}")


def default_socket() -> tuple[Path, Path]:
    """``agent.PID`` in a fresh 0700 folder (made by ``mkdtemp``), and that folder."""
    run = os.environ.get("XDG_RUNTIME_DIR")
    base: str | None = None
    if run:
        with contextlib.suppress(PolicyDenied):
            check_private_dir(Path(run))
            base = run
    folder = Path(tempfile.mkdtemp(prefix="modelseal-agent-", dir=base))
    return folder / f"agent.{os.getpid()}", folder


def bind(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: never a moment with a looser mode
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise PolicyDenied(f"cannot listen at {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def scrub_environ(name: str) -> None:
    """Remove ``name`` from the environment, first overwriting its value where the C
    environment keeps it (the block ``/proc/PID/environ`` shows), as far as it can."""
    try:
        libc = ctypes.CDLL(None)
        libc.getenv.restype, libc.getenv.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
        libc.strlen.restype, libc.strlen.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
        where = libc.getenv(name.encode())
        if where:
            ctypes.memset(where, 0, libc.strlen(where))
    except (OSError, AttributeError):
        pass
    os.environ.pop(name, None)


class _Handler(socketserver.BaseRequestHandler):
    server: AgentServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(CONNECTION_TIMEOUT)
        try:  # the whole request within CONNECTION_TIMEOUT: a slow peer cannot hold a slot
            request = recv_frame(conn, MAX_REQUEST, time.monotonic() + CONNECTION_TIMEOUT)
        except ProtocolError as e:
            answer: dict[str, Any] = {"ok": False, "error": "KeystoreError", "message": f"malformed request: {e}"}
            request = {}
        except OSError:  # a timeout, a reset: nothing to answer
            return
        else:
            answer = self.server.agent.handle(request)
        stopping = request.get("op") == "stop" and answer.get("ok") is True
        if stopping:
            self.server.remove_socket()  # gone before the answer: a new agent may start at once
        with contextlib.suppress(OSError, ProtocolError):
            send_frame(conn, answer, MAX_RESPONSE)
        if stopping:
            self.server.stop_requested.set()


class AgentServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Threads per connection (at most ``MAX_CONNECTIONS``), same uid only."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: socket.socket, agent: Agent, path: Path, folder: Path | None) -> None:
        super().__init__(sock.getsockname(), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.agent, self.path, self.folder = agent, path, folder
        self._ident = os.lstat(path).st_ino
        self.stop_requested = threading.Event()
        self._active: set[int] = set()
        self._count = threading.Lock()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        try:
            raw = request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        except OSError:
            return False
        if not same_user(raw):
            return False  # closed unread: another uid learns nothing but that
        with self._count:
            if len(self._active) >= MAX_CONNECTIONS:
                return False
            self._active.add(id(request))
        return True

    def shutdown_request(self, request: Any) -> None:
        with self._count:
            self._active.discard(id(request))
        super().shutdown_request(request)

    def remove_socket(self) -> None:
        """Remove the socket file (if it is still this one, not a later agent's) and its folder."""
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self._ident:
                os.unlink(self.path)
        if self.folder is not None:
            with contextlib.suppress(OSError):
                self.folder.rmdir()

    def service_actions(self) -> None:
        self.agent.expire()
        if self.stop_requested.is_set():
            raise _Stop


def _raise_stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def serve(agent: Agent, sock: socket.socket, path: Path, folder: Path | None, ready: Callable[[], None]) -> None:
    """Serve until stopped; then zero the keys and remove the socket (and ``folder``).
    ``ready`` is called once a stop signal would be handled (they may be blocked until then)."""
    disable_core_dumps(permanent=True)
    server = AgentServer(sock, agent, path, folder)
    for sig in _SIGNALS:
        signal.signal(sig, _raise_stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    try:
        ready()
        server.serve_forever(poll_interval=POLL)
    except _Stop:
        pass
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        agent.lock()
        server.server_close()
        server.remove_socket()


def _detach() -> None:
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)  # a `$(modelseal agent)` waits for stdout to close
    os.close(null)


def start(
    *,
    socket_path: str | None,
    ttl: float,
    foreground: bool,
    announce: Callable[[Path, int], None],
    passphrase: Callable[[], bytes] = keystore.read_passphrase,
) -> None:
    """Unlock the keystore of ``$MODELSEAL_HOME`` once and serve it at the socket.

    ``announce(socket, pid)`` is called once the socket listens: in this process before
    serving with ``foreground``, else in the parent after the fork, which then returns
    while the child serves in a new session with its standard streams on /dev/null.
    """
    home = modelseal_home()
    check_home(home, KeystoreError)
    agent = Agent(keystore.keystore_path(home), ttl)
    if socket_path is not None:
        path, folder = Path(os.path.abspath(socket_path)), None
        check_socket_path(path)
    secret = passphrase()
    scrub_environ(keystore.PASSPHRASE_ENV)
    try:
        agent.unlock(secret)
    finally:
        del secret
    if socket_path is None:
        path, folder = default_socket()
    try:
        sock = bind(path)
    except PolicyDenied:
        agent.lock()
        if folder is not None:
            folder.rmdir()
        raise
    if foreground:
        serve(agent, sock, path, folder, lambda: announce(path, os.getpid()))
        return
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # until the child's handlers are in place
    pid = os.fork()
    if pid == 0:  # the agent
        code = 0
        try:
            _detach()
            serve(agent, sock, path, folder, lambda: None)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    agent.lock()  # this process's copy of the keys, zeroed
    sock.close()
    announce(path, pid)


__all__ = ["AgentServer", "bind", "check_private_dir", "check_socket_path", "scrub_environ", "serve", "start"]
