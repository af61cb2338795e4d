"""The parent process of ``modelseal serve``: N forked workers on one listening socket,
signals, restarts and helper children (docs/serve.md, "Workers").

The parent binds the socket, forks the workers (each runs its own event loop and accepts
from the same socket: ``server.hygiene.Listener``) and then only supervises: it never
accepts a TLS connection, never builds the application and never unlocks a key (its one
socket of its own, if any, is the loopback metrics listener it serves through ``poll``,
whose errors are logged, throttled, and never stop it).
It stays single-threaded, so forking a replacement worker or a helper (the renewer,
``server.renewal``) is safe.

Signals are blocked in the parent and taken with ``sigtimedwait``; children inherit the
mask and unblock once their own handlers are installed, so no signal finds a child
half set up. SIGTERM/SIGINT: every worker gets SIGTERM (it finishes its requests, bounded),
SIGKILL after ``grace``. SIGHUP: forwarded to every worker (each reloads its TLS context).
A worker that dies is restarted after a short back-off; one that exits with an error
before it is ready at start (one killed by a signal then is restarted), or too many deaths
in a row, stops the server with a non-zero status: it never
serves on with fewer workers than asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from modelseal.errors import ModelsealError
from modelseal.keys.service import printable
from modelseal.telemetry.logthrottle import ThrottledLog

log = logging.getLogger("modelseal.server")
_poll_errors = ThrottledLog(log)

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
TICK = 1.0
POLL = 0.05  # signal latency while the parent serves a socket (--metrics-listen)
READY_TIMEOUT = 60.0
MAX_DEATHS = 5  # within DEATH_WINDOW seconds: the server stops
DEATH_WINDOW = 60.0
# The worker entry: (index, fd to write one byte to once it serves) -> exit status.
WorkerMain = Callable[[int, int], int]


class WorkersFailed(ModelsealError):
    """A worker could not start, or workers keep dying. Its exit status is the worker's."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.exit_code = status if 0 < status < 126 else 1


@dataclass
class _Worker:
    index: int
    pid: int
    ready_fd: int  # read end; -1 once ready
    started: float


@dataclass
class Supervisor:
    """Run ``count`` workers of ``main`` until SIGTERM/SIGINT. ``tick`` runs about every
    second in the parent (folder watch, renewal); ``on_hup`` on SIGHUP before the workers
    get it; ``helpers`` maps the pid of a helper child to what to call with its status."""

    count: int
    main: WorkerMain
    grace: float
    tick: Callable[[Supervisor], None] = lambda s: None
    on_hup: Callable[[], None] = lambda: None
    helpers: dict[int, Callable[[int], None]] = field(default_factory=dict)
    poll: Callable[[float], None] | None = None  # serves the parent's own sockets, up to N s a call
    on_exit: Callable[[int], None] = lambda pid: None  # a child (worker or helper) was reaped
    _workers: dict[int, _Worker] = field(default_factory=dict)
    _deaths: list[float] = field(default_factory=list)
    _restart: list[tuple[float, int]] = field(default_factory=list)  # (when, index)

    def run(self) -> None:
        """Block until stopped; raises ``WorkersFailed`` when a worker fails for good."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            for i in range(self.count):
                self._spawn(i)
            self._wait_ready()
            log.info("%d workers serving", self.count)
            while self._step():
                pass
        finally:
            self.stop()
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def fork_helper(self, body: Callable[[], int], done: Callable[[int], None]) -> int:
        """Fork a helper child running ``body`` (its return is the exit status); ``done``
        gets the status when it is reaped."""

        def helper() -> int:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; SIGTERM stops it
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            return body()

        pid = _fork(helper)
        self.helpers[pid] = done
        return pid

    def index_of(self, pid: int) -> int | None:
        """The index of the worker ``pid`` (until it is reaped), None for any other child."""
        w = self._workers.get(pid)
        return None if w is None else w.index

    def signal_workers(self, sig: int) -> None:
        for w in list(self._workers.values()):
            _kill(w.pid, sig)

    def _spawn(self, index: int) -> None:
        r, w = os.pipe()

        def body() -> int:
            os.close(r)
            return self.main(index, w)

        pid = _fork(body)
        os.close(w)
        self._workers[pid] = _Worker(index, pid, r, time.monotonic())

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while any(w.ready_fd >= 0 for w in self._workers.values()):
            self._poll_ready()
            self._reap(starting=True)
            pending = signal.sigtimedwait(SIGNALS - {signal.SIGCHLD}, 0.05)
            if pending is not None and pending.si_signo in (signal.SIGTERM, signal.SIGINT):
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                raise WorkersFailed(f"workers not ready within {READY_TIMEOUT:g} s", 1)

    def _poll_ready(self) -> None:
        for w in self._workers.values():
            if w.ready_fd < 0:
                continue
            os.set_blocking(w.ready_fd, False)
            try:
                got = os.read(w.ready_fd, 1)
            except BlockingIOError:
                continue
            if got:
                os.close(w.ready_fd)
                w.ready_fd = -1

    def _wait(self) -> signal.struct_siginfo | None:
        """The next signal within ``TICK``; with ``poll``, served in slices of ``POLL`` s
        between checks for a signal (still never a thread: the parent forks)."""
        if self.poll is None:
            return signal.sigtimedwait(SIGNALS, TICK)
        end = time.monotonic() + TICK
        while True:
            info = signal.sigtimedwait(SIGNALS, 0)
            left = end - time.monotonic()
            if info is not None or left <= 0:
                return info
            try:
                self.poll(min(left, POLL))
            except Exception as e:  # the parent's optional socket never stops the supervisor
                _poll_errors.note("the metrics listener failed %d time(s) (latest: %s)", type(e).__name__)
                info = signal.sigtimedwait(SIGNALS, min(left, POLL))  # no busy loop on a poll that keeps failing
                if info is not None:
                    return info

    def _step(self) -> bool:
        info = self._wait()
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
            log.warning("stopping (%s)", signal.Signals(info.si_signo).name)
            return False
        if info is not None and info.si_signo == signal.SIGHUP:
            self.on_hup()
            self.signal_workers(signal.SIGHUP)
        self._poll_ready()
        self._reap(starting=False)
        now = time.monotonic()
        due = [i for t, i in self._restart if t <= now]
        self._restart = [(t, i) for t, i in self._restart if t > now]
        if due and not _stop_pending():
            for i in due:
                self._spawn(i)
        self.tick(self)
        return True

    def _reap(self, *, starting: bool) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            self.on_exit(pid)
            if pid in self.helpers:
                self.helpers.pop(pid)(code)
            elif pid in self._workers:
                self._died(self._workers.pop(pid), code, starting)

    def _died(self, w: _Worker, code: int, starting: bool) -> None:
        if w.ready_fd >= 0:
            os.close(w.ready_fd)
        how = f"exited with status {code}" if code >= 0 else f"was killed by {signal.Signals(-code).name}"
        if starting and code >= 0:  # it exited on its own: its configuration or stores are wrong
            raise WorkersFailed(f"worker {w.index} {how} while starting", code)
        # killed by a signal (an operator, the OOM killer): restarted like any death, and counted
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < DEATH_WINDOW] + [now]
        if len(self._deaths) > MAX_DEATHS:
            raise WorkersFailed(f"{len(self._deaths)} worker deaths within {DEATH_WINDOW:g} s; stopping", code)
        backoff = min(5.0, 0.5 * 2 ** (len(self._deaths) - 1))
        log.error("worker %d (pid %d) %s; restarting it in %.1f s", w.index, w.pid, how, backoff)
        self._restart.append((now + backoff, w.index))

    def stop(self) -> None:
        """SIGTERM every worker and helper, wait up to ``grace`` (plus a margin), then SIGKILL."""
        pids = list(self._workers) + list(self.helpers)
        for pid in pids:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace * 2 + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if not _reaped(p)]
            if pids:
                time.sleep(0.05)
        for pid in pids:
            log.error("pid %d did not stop in time; killing it", pid)
            _kill(pid, signal.SIGKILL)
            _reaped(pid, block=True)
        for w in self._workers.values():
            if w.ready_fd >= 0:
                os.close(w.ready_fd)
        self._workers.clear()
        self.helpers.clear()


def _fork(body: Callable[[], int]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child never returns into the caller's stack
        code = body()
    except ModelsealError as e:
        print(f"modelseal: error: {printable(str(e))}", file=sys.stderr)
        code = e.exit_code
    except BaseException as e:
        print(f"modelseal serve: worker failed ({type(e).__name__})", file=sys.stderr)
        if os.environ.get("MODELSEAL_DEBUG") == "1":
            import traceback

            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reaped(pid: int, block: bool = False) -> bool:
    try:
        got, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return True
    return got == pid


def _stop_pending() -> bool:
    return bool(signal.sigpending() & {signal.SIGTERM, signal.SIGINT})


__all__ = ["Supervisor", "WorkerMain", "WorkersFailed"]
