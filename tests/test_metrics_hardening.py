"""The red team's findings on the metrics (issue 14, section 1), each shown fixed.

The multi-process files: a full filesystem is an error, never a SIGBUS (a 1 MiB tmpfs in
a private mount namespace, ``unshare -rm``); a replacement worker goes on from its index's
files (counter totals kept, a gauge not counted twice, no file per pid); holes are
allocated. Their directory: under ``$RUNTIME_DIRECTORY`` or ``--data``, private, and swept
only when its lock can be taken. The loopback listener: a foreign ``Host`` is 403, a full
house of idle connections makes room, one exposition a poll, an accept error pauses
accepting instead of raising, and the supervisor survives a poll that raises. The
revocation list is parsed again only when its file changes. ``classify`` and ``notify``
never let an error through; the textfile is 0644 under any umask.
"""

from __future__ import annotations

import errno
import fcntl
import http.client
import os
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelseal.cli import main
from modelseal.errors import RevocationListError, StorageError
from modelseal.server import handshakes, metrics_listen
from modelseal.server.metrics_listen import MetricsListener, metrics_root, sweep
from modelseal.signing.revocation import RevocationList
from modelseal.telemetry import collect, mpfiles
from tests.conftest import Env

ROOT = Path(__file__).resolve().parent.parent


def run_script(code: str, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    cmd = [*prefix, sys.executable, "-c", textwrap.dedent(code), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ))


FULL_FS = """
    import os, sys
    from pathlib import Path
    from modelseal.errors import StorageError
    from modelseal.telemetry import metrics
    fs = Path(sys.argv[1])
    run = fs / "run"
    run.mkdir(mode=0o700)
    metrics.enable_multiprocess(str(run))  # the parent's file: allocated while there is room

    def fill(leave):
        fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        size = 0
        try:
            while True:
                size += os.write(fd, b"\\1" * 4096)
        except OSError:
            pass
        os.ftruncate(fd, max(0, size - leave))
        os.close(fd)

    def child(body):
        pid = os.fork()
        if pid == 0:
            try:
                body()
                os._exit(3)  # counted everything: the filesystem was not full?
            except (OSError, StorageError) as e:
                print(type(e).__name__, flush=True)
                os._exit(0)
        return os.waitpid(pid, 0)[1]

    def count_many():
        for i in range(4000):  # ~1 MiB of keys: the file must grow
            metrics.AUTHZ_DECISIONS.labels(result="deny", policy=f"policy-{i}").inc()

    fill(0)
    first = child(lambda: metrics.BREAK_GLASS.inc())  # a new file on a full filesystem
    second = child(lambda: metrics.worker(0))  # a worker's files at its start
    os.unlink(fs / "filler")
    fill(300 << 10)  # room for a file, not for its growth
    third = child(count_many)
    print("statuses", first, second, third)
"""


def test_a_full_filesystem_is_an_error_not_a_sigbus(tmp_path: Path) -> None:
    fs = tmp_path / "small"
    fs.mkdir()
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("unshare -rm (a private mount namespace for a small tmpfs) is not allowed here")
    mount = f'mount -t tmpfs -o size=1m tmpfs {fs} && exec "$0" "$@"'
    done = run_script(FULL_FS, str(fs), prefix=("unshare", "-rm", "--propagation", "private", "sh", "-c", mount))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["OSError", "StorageError", "OSError", "statuses", "0", "0", "0"], done.stdout


RESTART = """
    import os, sys
    from pathlib import Path
    from prometheus_client import Gauge
    from modelseal.telemetry import collect, metrics
    run = Path(sys.argv[1])
    metrics.enable_multiprocess(str(run))
    g = Gauge("modelseal_test_gauge", "a worker's gauge", multiprocess_mode="sum", registry=None)
    for value in (5.0, 7.0):  # worker 0, then its replacement
        pid = os.fork()
        if pid == 0:
            metrics.worker(0)
            metrics.BREAK_GLASS.inc()
            g.set(value)
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
    sys.stdout.write(collect.exposition(None)[0].decode())
"""


def test_a_replacement_worker_reuses_its_index_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    done = run_script(RESTART, str(run))
    assert done.returncode == 0, done.stderr
    got = {s.name: s.value for f in text_string_to_metric_families(done.stdout) for s in f.samples}
    assert got["modelseal_break_glass_uses_total"] == 2  # the first worker's count is kept
    assert got["modelseal_test_gauge"] == 7  # replaced, not 5 + 7
    workers = sorted(p.name for p in run.iterdir() if "_w" in p.name)
    assert workers == ["counter_w0.db", "gauge_sum_w0.db", "histogram_w0.db"], workers
    assert len(list(run.glob("counter_*.db"))) == 2  # worker 0's and the parent's: none per dead pid


def test_allocate_fills_the_holes_of_a_sparse_file(tmp_path: Path) -> None:
    path = tmp_path / "counter_w0.db"
    with open(path, "wb") as f:
        f.truncate(1 << 20)  # what prometheus_client does: a sparse file
    assert path.stat().st_blocks * 512 < 1 << 20
    mpfiles.allocate(path)
    assert path.stat().st_size == 1 << 20 and path.stat().st_blocks * 512 >= 1 << 20
    with pytest.raises(ValueError):
        mpfiles.claim("../x")


def test_the_metrics_root_is_private_and_never_the_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: Env
) -> None:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    root = metrics_root(data)
    assert root == data / "metrics-run" and stat.S_IMODE(root.stat().st_mode) == 0o700
    root.chmod(0o777)
    assert stat.S_IMODE(metrics_root(data).stat().st_mode) == 0o700
    assert metrics_root(None) == env.home / "metrics-run"  # an embedding caller without --data
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o755)  # systemd's RuntimeDirectoryMode= default
    monkeypatch.setenv("RUNTIME_DIRECTORY", f"{runtime}:{tmp_path / 'second'}")
    assert metrics_root(data) == runtime
    runtime.chmod(0o777)
    try:
        with pytest.raises(StorageError, match="writable by others"):
            metrics_root(data)
    finally:
        runtime.chmod(0o755)
    (tmp_path / "link").symlink_to(runtime)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "link"))
    with pytest.raises(StorageError, match="symlink"):
        metrics_root(data)


def test_sweep_removes_only_runs_whose_lock_is_free(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(mode=0o700)

    def run(parent: Path, name: str, lock: bool = True) -> Path:
        d = parent / name
        d.mkdir(parents=True)
        (d / "counter_w0.db").write_bytes(b"x")
        if lock:
            (d / ".lock").write_bytes(b"")
        return d

    dead = run(root, "modelseal-metrics-1-a")  # pid 1 is alive: a pid says nothing across namespaces
    live = run(root, "modelseal-metrics-999999-b")
    held = os.open(live / ".lock", os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # its parent (maybe in another PID namespace) holds it
    unlocked = run(root, "modelseal-metrics-2-c", lock=False)
    other = run(root, "not-metrics-3-d")
    target = run(outside, "modelseal-metrics-4-e")
    (root / "modelseal-metrics-4-e").symlink_to(target)
    linked = run(root, "modelseal-metrics-5-f", lock=False)
    (linked / ".lock").symlink_to(target / ".lock")
    try:
        sweep(root)
    finally:
        os.close(held)
    assert not dead.exists()
    assert live.is_dir() and unlocked.is_dir() and other.is_dir() and linked.is_dir()
    assert (root / "modelseal-metrics-4-e").is_symlink() and (target / "counter_w0.db").is_file()


def _serve(listener: MetricsListener) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            listener.poll(0.05)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return stop, t


def _get(port: int, host: str | None) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.putrequest("GET", "/metrics", skip_host=True)
        if host is not None:
            c.putheader("Host", host)
        c.endheaders()
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def test_the_listener_answers_its_own_host_only_and_makes_room_when_full() -> None:
    listener = MetricsListener("127.0.0.1", 0, collect.ScrapeCollector())
    port = listener.port
    stop, t = _serve(listener)
    idle: list[socket.socket] = []
    try:
        for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", f"[::1]:{port}", f"127.5.6.7:{port}"):
            assert _get(port, host) == 200, host
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1:1", None, "127.0.0.1.evil.example"):
            assert _get(port, host) == 403, host
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(metrics_listen.MAX_CLIENTS)]
        deadline = time.monotonic() + 10
        while len(listener._clients) < metrics_listen.MAX_CLIENTS:  # every idle one holds a slot
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert _get(port, f"127.0.0.1:{port}") == 200  # the oldest idle connection made room
    finally:
        for s in idle:
            s.close()
        stop.set()
        t.join()
        listener.close()


def test_one_exposition_serves_a_poll_and_an_accept_error_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    listener = MetricsListener("127.0.0.1", 0, collect.ScrapeCollector())
    request = f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{listener.port}\r\n\r\n".encode()
    clients = [socket.create_connection(("127.0.0.1", listener.port), timeout=10) for _ in range(3)]
    try:
        for c in clients:
            c.sendall(request)
        listener.poll(1.0)  # all three arrive together: accepted, answered in one round
        assert listener.builds == 1
        for c in clients:
            assert c.recv(12) == b"HTTP/1.1 200"
        monkeypatch.setattr(metrics_listen, "CACHE_SECONDS", 0.0)
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as c:
            c.sendall(request)
            listener.poll(1.0)
            assert c.recv(12) == b"HTTP/1.1 200" and listener.builds == 2  # a later poll builds anew

        class Failing:  # accept() fails as it does out of descriptors
            calls = 0

            def __init__(self, real: socket.socket) -> None:
                self.real = real

            def accept(self) -> None:
                Failing.calls += 1
                raise OSError(errno.EMFILE, "Too many open files")

            def fileno(self) -> int:
                return self.real.fileno()

            def close(self) -> None:
                self.real.close()

        real = listener.sock
        listener.sock = Failing(real)  # type: ignore[assignment]
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as c:
            c.sendall(request)
            listener.poll(0.2)  # raises nothing
            listener.poll(0.2)  # paused: not asked again at once (no busy loop)
            assert Failing.calls == 1
            time.sleep(metrics_listen.ACCEPT_PAUSE)  # the pause is over: asked again
            listener.poll(0.2)
            assert Failing.calls == 2
            listener.sock = real
            time.sleep(metrics_listen.ACCEPT_PAUSE)
            listener.poll(0.2)
            c.settimeout(10)
            assert c.recv(12) == b"HTTP/1.1 200"  # accepting again once the error is gone
    finally:
        for c in clients:
            c.close()
        listener.close()


SUPERVISOR = """
    import logging, os, signal, sys, time
    from modelseal.server.workers import Supervisor
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    def worker(index, ready):
        signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.write(ready, b"R")
        while True:
            time.sleep(1)

    calls = []

    def poll(timeout):
        calls.append(timeout)
        raise OSError(24, "Too many open files")

    def tick(sup):
        if len(calls) >= 5:
            os.kill(os.getpid(), signal.SIGTERM)

    Supervisor(1, worker, 1.0, tick=tick, poll=poll).run()
    print("stopped after", len(calls) >= 5)
"""


def test_a_failing_listener_never_stops_the_supervisor() -> None:
    done = run_script(SUPERVISOR)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopped after True"
    assert "the metrics listener failed" in done.stderr and "stopping (SIGTERM)" in done.stderr


def test_the_revocation_list_is_read_again_only_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def load(path: Path, *args: object, **kw: object) -> RevocationList:
        calls.append(path)
        raise RevocationListError("not a signed list")  # a forged list costs a parse once, not per scrape

    monkeypatch.setattr(RevocationList, "load", staticmethod(load))
    collect._LISTS.clear()
    path = tmp_path / "revoked.json"
    path.write_bytes(b"x" * 4096)
    assert collect.list_expiry(path, {}, 1, {}) is None
    assert collect.list_expiry(path, {}, 1, {}) is None
    assert len(calls) == 1
    path.write_bytes(b"y" * 4097)
    assert collect.list_expiry(path, {}, 1, {}) is None
    assert len(calls) == 2


def test_classify_and_notify_never_let_an_error_through() -> None:
    class Odd(ssl.SSLError):
        @property
        def reason(self) -> str:  # type: ignore[override]
            raise RuntimeError("no reason")

    for exc in (ssl.SSLError(), ssl.SSLCertVerificationError(), ssl.SSLEOFError(), Odd()):
        assert handshakes.classify(exc) == "other"

    class Boom(BaseException):
        pass

    seen: list[str] = []

    def bad(h: handshakes.Handshake) -> None:
        raise Boom

    event = handshakes.Handshake(0.0, "127.0.0.1", True, "TLSv1.3", "TLS_AES_256_GCM_SHA384", None, None)
    handshakes.notify([bad, lambda h: seen.append(h.source)], event)
    assert seen == ["127.0.0.1"]  # the next observer still ran

    def stop(h: handshakes.Handshake) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        handshakes.notify([stop], event)


def test_the_textfile_is_0644_whatever_the_umask(env: Env) -> None:
    out = env.work / "tf" / "modelseal.prom"
    out.parent.mkdir()
    old = os.umask(0o077)
    try:
        assert main(["metrics", "--textfile", str(out)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert sorted(p.name for p in out.parent.iterdir()) == ["modelseal.prom"]
