"""The parent process's share of ``modelseal serve``'s metrics (docs/serve.md, "Metrics").

``MultiprocDir``: prometheus_client's multi-process mode needs one directory the workers
write their counters to and every scrape reads. It never lives in a shared temporary
folder (a full ``/tmp`` would cost the server, and anyone can fill one): its root is
``$RUNTIME_DIRECTORY`` (systemd's ``RuntimeDirectory=``, a tmpfs only the service user
writes) or else a private folder (0700) under ``--data`` (``metrics_root``). The parent
makes a fresh directory there per run, before any fork, holds an ``flock`` on its lock
file for the run (forked workers share it), removes the directories of earlier runs whose
lock nobody holds (``sweep``: that root only, that kind only, never through a symlink),
and removes its own when it stops. Files are named per worker index and allocated before
they are mapped (``telemetry.mpfiles``).

``MetricsListener``: ``--metrics-listen 127.0.0.1:PORT``, the one listener of the server
without TLS: plain HTTP, refused at start unless its address is loopback (127.0.0.0/8,
::1), so only processes of this host reach it; it answers ``GET /metrics`` and nothing
else, with the same aggregated figures as the mutual-TLS route, and 403 to a request whose
``Host`` is not a loopback address or ``localhost`` with this port (a browser led there by
DNS rebinding). It runs in the parent, which stays single-threaded (it forks replacement
workers): the supervisor's loop calls ``poll`` between signal checks, every socket is
non-blocking, each connection is bounded (2 s for its request head, 8 KiB, 5 s to take
the answer), at most 16 at once, and when they are full the oldest that has not sent a
whole request makes room for a new one. The parent builds at most one exposition a poll
and shares it for a second between the requests that ask (so a flood of local requests
costs one build a second); an error accepting a connection (out of descriptors, say) is
logged, throttled, and pauses accepting for a second: nothing here stops the supervisor.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import selectors
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import multiprocess

from modelseal.errors import ModelsealError, StorageError
from modelseal.telemetry import metrics
from modelseal.telemetry.collect import ScrapeCollector, exposition
from modelseal.telemetry.logthrottle import ThrottledLog
from modelseal.util.home import modelseal_home

log = logging.getLogger("modelseal.server")

PREFIX = "modelseal-metrics-"
LOCK = ".lock"
RUN_FOLDER = "metrics-run"  # under --data
MAX_REQUEST = 8 << 10
MAX_CLIENTS = 16
HEAD_SECONDS = 2.0  # to send a whole request head
SEND_SECONDS = 5.0  # to take the answer
CACHE_SECONDS = 1.0  # one exposition serves every request within this
ACCEPT_PAUSE = 1.0  # after an error accepting a connection


def _private_root(path: Path, what: str, create: bool) -> Path:
    try:
        if create:  # --data may not exist yet (a registry on --db and --blobs s3:// makes nothing there)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
        st = os.lstat(path)
    except OSError as e:
        raise StorageError(f"cannot use {what} {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise StorageError(f"{what} {path} is not a folder of this user (a symlink is refused)")
    if st.st_mode & 0o022:
        if not create:
            raise StorageError(f"{what} {path} is writable by others than its owner")
        os.chmod(path, 0o700)
    return path


def metrics_root(data: Path | None) -> Path:
    """Where the run directories go: ``$RUNTIME_DIRECTORY`` (its first entry) if set, else
    ``DATA/metrics-run`` (made 0700); without ``data`` (an embedding caller of
    ``runner.serve``), ``$MODELSEAL_HOME/metrics-run``. ``StorageError`` if unusable."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":", 1)[0]
    if runtime:
        return _private_root(Path(runtime), "RUNTIME_DIRECTORY", create=False)
    return _private_root((data if data is not None else modelseal_home()) / RUN_FOLDER, "the metrics folder", True)


class MultiprocDir:
    """This run's multi-process directory (module docstring), under ``root`` if given."""

    def __init__(self, data: Path | None = None, *, root: Path | None = None) -> None:
        self.root = root if root is not None else metrics_root(data)
        sweep(self.root)
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=self.root))  # 0700, empty
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._lock = os.open(self.path / LOCK, flags, 0o600)
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while this run (or a worker) lives
            metrics.enable_multiprocess(str(self.path))
        except OSError as e:
            raise StorageError(f"cannot make the metrics directory in {self.root}: {e.strerror}") from None

    def process_gone(self, index: int | None, pid: int) -> None:
        """A child was reaped: drop its live gauges (worker ``index``'s, or the pid's)."""
        with contextlib.suppress(OSError):
            name = f"w{index}" if index is not None else str(pid)
            multiprocess.mark_process_dead(name, str(self.path))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock)


def sweep(root: Path) -> None:
    """Remove the run directories in ``root`` whose lock can be taken (their run is over):
    only names of this kind, only real folders of this user, a lock file opened without
    following a link; a folder with no lock file is left alone."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.geteuid():
                continue
            folder = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            lock = os.open(LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
        except OSError:
            os.close(folder)
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # held: that run is alive (maybe in another PID namespace)
        else:
            shutil.rmtree(entry.path, ignore_errors=True)  # fd-based: never follows a link inside
        finally:
            os.close(lock)
            os.close(folder)


def loopback(host: str) -> str:
    """``host`` if it is a loopback address (``localhost`` is 127.0.0.1), else ModelsealError."""
    text = "127.0.0.1" if host == "localhost" else host
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ModelsealError(f"--metrics-listen takes a loopback address, got {host[:80]!r}") from None
    if not ip.is_loopback:
        raise ModelsealError(
            f"--metrics-listen {host[:80]} is not a loopback address: the plain-HTTP metrics listener is for "
            "this host only (127.0.0.0/8 or ::1); scrape GET /metrics over mutual TLS from elsewhere"
        )
    return text


def host_allowed(value: bytes, port: int) -> bool:
    """A ``Host`` header naming this listener: a loopback address or ``localhost``, with
    no port or ``port`` (DNS rebinding would show another name)."""
    text = value.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        name, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            return False
        given = rest[1:] if rest else None
    else:
        name, sep, given = text.partition(":")
        given = given if sep else None
    if given is not None and given != str(port):
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass
class _Client:
    sock: socket.socket
    deadline: float
    data: bytearray = field(default_factory=bytearray)
    out: bytes = b""  # the answer, once the request is whole


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class MetricsListener:
    """Plain-HTTP ``GET /metrics`` on a loopback address, driven by ``poll``. ``build``
    makes one exposition (``collect.exposition`` over ``collector``)."""

    def __init__(
        self,
        host: str,
        port: int,
        collector: ScrapeCollector,
        build: Callable[[ScrapeCollector], tuple[bytes, str]] = exposition,
    ) -> None:
        host = loopback(host)
        self.collector, self._build = collector, build
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(MAX_CLIENTS)
        except OSError as e:
            self.sock.close()
            raise ModelsealError(f"cannot listen on {host}:{port} for metrics: {e.strerror}") from None
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self.address = f"{host}:{self.port}"
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._clients: dict[int, _Client] = {}
        self._cache: tuple[float, bytes] | None = None  # (when, the whole 200 or 500 answer)
        self._built = False  # an exposition was built in this poll
        self._paused_until = 0.0  # accepting paused after an error, until then
        self._accept_errors = ThrottledLog(log)
        self.builds = 0  # expositions built (tests)

    def poll(self, timeout: float) -> None:
        """Serve what is ready within ``timeout`` seconds (at most one wait)."""
        self._built = False
        now = time.monotonic()
        if self._paused_until:
            if now >= self._paused_until:
                self._paused_until = 0.0
                self._sel.register(self.sock, selectors.EVENT_READ, None)
            else:
                timeout = min(timeout, self._paused_until - now)
        for key, events in self._sel.select(max(0.0, timeout)):
            if key.data is None:
                self._accept()
            elif key.data.sock.fileno() in self._clients:  # not evicted earlier in this round
                self._step(key.data, events)
        now = time.monotonic()
        for c in [c for c in self._clients.values() if c.deadline < now]:
            self._drop(c)

    def _accept(self) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS, EPROTO...: never the supervisor's problem
                name = errno.errorcode.get(e.errno or 0, type(e).__name__)
                self._accept_errors.note("metrics listener: accept failed %d time(s) (latest: %s); pausing 1 s", name)
                self._sel.unregister(self.sock)
                self._paused_until = time.monotonic() + ACCEPT_PAUSE
                return
            if len(self._clients) >= MAX_CLIENTS and not self._evict():
                conn.close()  # every slot is sending an answer: this one waits for none
                continue
            conn.setblocking(False)
            c = _Client(conn, time.monotonic() + HEAD_SECONDS)
            self._clients[conn.fileno()] = c
            self._sel.register(conn, selectors.EVENT_READ, c)
            self._step(c, selectors.EVENT_READ | selectors.EVENT_WRITE)  # a request sent at once is served now

    def _evict(self) -> bool:
        """Drop the oldest connection that has not sent a whole request; False if none."""
        for c in self._clients.values():  # in the order they were accepted
            if not c.out:
                self._drop(c)
                return True
        return False

    def _step(self, c: _Client, events: int) -> None:
        try:
            if events & selectors.EVENT_READ and not c.out:
                chunk = c.sock.recv(MAX_REQUEST)
                if not chunk:
                    self._drop(c)
                    return
                c.data += chunk
                if b"\r\n\r\n" in c.data or len(c.data) >= MAX_REQUEST:
                    c.out = self._answer(bytes(c.data))
                    c.deadline = time.monotonic() + SEND_SECONDS
                    self._sel.modify(c.sock, selectors.EVENT_WRITE, c)
            if events & selectors.EVENT_WRITE and c.out:
                sent = c.sock.send(c.out)
                c.out = c.out[sent:]
                if not c.out:
                    self._drop(c)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)

    def _answer(self, request: bytes) -> bytes:
        lines = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        line = lines[0].split(b" ")
        if len(line) != 3 or not line[2].startswith(b"HTTP/1."):
            return _response("400 Bad Request", b"bad request\n")
        hosts = [v for k, _, v in (h.partition(b":") for h in lines[1:]) if k.strip().lower() == b"host"]
        if len(hosts) != 1 or not host_allowed(hosts[0], self.port):
            return _response("403 Forbidden", b"the Host header must name this listener (127.0.0.1, ::1, localhost)\n")
        method, target = line[0], line[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return _response("404 Not Found", b"only /metrics is served here\n")
        if method != b"GET":
            return _response("405 Method Not Allowed", b"GET only\n")
        return self._metrics()

    def _metrics(self) -> bytes:
        """The answer to GET /metrics: built at most once a poll, shared for CACHE_SECONDS."""
        now = time.monotonic()
        if self._cache is not None and (self._built or now - self._cache[0] < CACHE_SECONDS):
            return self._cache[1]
        self._built = True
        self.builds += 1
        try:
            body, content_type = self._build(self.collector)
            answer = _response("200 OK", body, content_type)
        except Exception as e:  # a broken metrics file must not stop the supervisor
            answer = _response("500 Internal Server Error", f"metrics unavailable ({type(e).__name__})\n".encode())
        self._cache = (time.monotonic(), answer)
        return answer

    def _drop(self, c: _Client) -> None:
        self._clients.pop(c.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(c.sock)
        c.sock.close()

    def close(self) -> None:
        for c in list(self._clients.values()):
            self._drop(c)
        self._sel.close()
        self.sock.close()

    def close_in_child(self) -> None:
        """A forked child's copies closed, nothing else: the epoll instance is shared with
        the parent, so unregistering a socket here would unregister it there too."""
        self._sel.close()  # closes this process's epoll descriptor only (no EPOLL_CTL_DEL)
        for c in self._clients.values():
            c.sock.close()
        self._clients = {}
        self.sock.close()


__all__ = ["PREFIX", "MetricsListener", "MultiprocDir", "host_allowed", "loopback", "metrics_root", "sweep"]
