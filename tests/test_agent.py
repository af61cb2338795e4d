"""``modelseal agent``: a real agent process on a temporary socket, and its parts.

Every agent process a test starts is stopped by its PID (``_stop``), whatever the test did.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import modelseal
from modelseal.errors import KeyDisabled, KeystoreError
from modelseal.keys import agent_client, keystore
from modelseal.keys.agent import Agent
from modelseal.keys.agent_client import AgentClient, same_user
from modelseal.keys.agent_server import check_socket_path
from modelseal.keys.providers.local import LocalProvider
from modelseal.keys.service import KeyService

from .conftest import PASSPHRASE, Env

CLI = [sys.executable, "-m", "modelseal.cli"]


@dataclass
class Running:
    proc: subprocess.Popen[str]
    sock: Path
    pid: int


def _env(env: Env, **extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("MODELSEAL_")}
    out["MODELSEAL_HOME"] = str(env.home)
    out.update(extra)
    return out


def _stop(pid: int, proc: subprocess.Popen[str] | None = None) -> None:
    """Stop a process this test started, by its PID, and wait until it is gone. A daemon
    (not our child) is signalled only while its PID is still an agent's, never a reused one."""
    if proc is None and not _is_agent(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=10)
        return
    _wait_gone(pid)


def _is_agent(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"modelseal.cli" in argv and b"agent" in argv


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":  # exited; its parent (not us) has yet to reap it
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="msa-"))  # short: sun_path holds 107 bytes
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def _start(env: Env, sockdir: Path, *args: str) -> Running:
    sock = sockdir / "agent.sock"
    proc = subprocess.Popen(
        [*CLI, "agent", "--foreground", "--socket", str(sock), *args],
        env=_env(env, MODELSEAL_PASSPHRASE=PASSPHRASE),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if not first:
        proc.wait(timeout=10)
        raise AssertionError(f"the agent did not start: {proc.stderr.read() if proc.stderr else ''}")
    assert first.startswith(f"MODELSEAL_AGENT_SOCK={sock}; export MODELSEAL_AGENT_SOCK;")
    pid = int(proc.stdout.readline().split("=", 1)[1].split(";")[0])
    assert pid == proc.pid
    return Running(proc, sock, pid)


@pytest.fixture
def agent(env: Env, sockdir: Path) -> Iterator[Running]:
    running = _start(env, sockdir)
    try:
        yield running
    finally:
        _stop(running.pid, running.proc)


def _use_agent(monkeypatch: pytest.MonkeyPatch, running: Running, passphrase: str | None = None) -> None:
    """This process talks to the agent: the passphrase is unset (or wrong) and any KDF fails the test."""
    monkeypatch.setenv(agent_client.SOCK_ENV, str(running.sock))
    if passphrase is None:
        monkeypatch.delenv(keystore.PASSPHRASE_ENV, raising=False)
    else:
        monkeypatch.setenv(keystore.PASSPHRASE_ENV, passphrase)
    keystore.clear_cache()

    def no_kdf(*_a: object) -> bytes:
        raise AssertionError("scrypt was paid in the client")

    monkeypatch.setattr(keystore, "_derive", no_kdf)


def test_seal_and_unseal_through_the_agent_pay_no_scrypt_and_are_audited(
    env: Env, agent: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_agent(monkeypatch, agent)
    data = os.urandom(300_000)
    (env.work / "m.bin").write_bytes(data)
    sealer = KeyService(sink=env.sink)
    modelseal.seal(env.work / "m.bin", env.work / "m.sealed", key="test-kek", keys=sealer)
    opener = KeyService(sink=env.sink)  # a fresh service: no data key cached
    modelseal.unseal(env.work / "m.sealed", env.work / "m.out", keys=opener)
    assert (env.work / "m.out").read_bytes() == data
    ops = [(e.operation, e.key, e.result) for e in env.sink.events]
    assert ("wrap", "local:test-kek", "ok") in ops
    assert ("unwrap", "local:test-kek", "ok") in ops
    assert [i.uri for i in sealer.list("local")] == ["local:test-kek"]  # list and info too
    assert sealer.info("test-kek").latest == 1


def test_the_cli_uses_the_agent_and_ignores_a_wrong_passphrase(env: Env, agent: Running) -> None:
    data = os.urandom(100_000)
    (env.work / "m.bin").write_bytes(data)
    wrong = _env(env, MODELSEAL_PASSPHRASE="not-the-passphrase")
    via = {**wrong, "MODELSEAL_AGENT_SOCK": str(agent.sock)}
    w, s, o = (str(env.work / n) for n in ("m.bin", "m.sealed", "m.out"))
    assert subprocess.run([*CLI, "seal", w, s, "--key", "test-kek"], env=via, capture_output=True).returncode == 0
    assert subprocess.run([*CLI, "unseal", s, o], env=via, capture_output=True).returncode == 0
    assert (env.work / "m.out").read_bytes() == data
    # Without the agent the same passphrase is checked (by scrypt) and refused.
    r = subprocess.run([*CLI, "unseal", s, o + "2"], env=wrong, capture_output=True, text=True)
    assert r.returncode == 6 and "wrong passphrase" in r.stderr


def test_key_changes_still_need_the_passphrase_and_the_agent_sees_them(
    env: Env, agent: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = env.work / "m.sealed"
    (env.work / "m.bin").write_bytes(b"x" * 5000)
    modelseal.seal(env.work / "m.bin", sealed, key="test-kek", keys=env.svc)
    with pytest.MonkeyPatch.context() as mp:
        _use_agent(mp, agent)
        with pytest.raises(KeystoreError, match="no passphrase"):  # no terminal, no MODELSEAL_PASSPHRASE
            LocalProvider().rotate("test-kek")
    keystore.clear_cache()  # the passphrase again, as an operator changing keys has it
    env.svc.set_state("test-kek", 1, "disabled")
    env.svc.rotate("test-kek")
    _use_agent(monkeypatch, agent)
    with pytest.raises(KeyDisabled):  # the agent re-read the changed keystore
        modelseal.unseal(sealed, env.work / "m.out", keys=KeyService(sink=env.sink))
    modelseal.seal(env.work / "m.bin", env.work / "m2.sealed", key="test-kek", keys=KeyService(sink=env.sink))
    assert modelseal.inspect(env.work / "m2.sealed")["recipients"] == [{"key": "local:test-kek", "version": 2}]


def test_an_older_copy_of_the_keystore_put_back_makes_the_agent_drop_its_keys(
    env: Env, agent: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that reaches the socket but lacks the passphrase must not undo a crypto-shred
    by restoring a backup of keystore.json: the held root opens that copy too."""
    import shutil

    path = keystore.keystore_path(env.home)
    dek, ctx = os.urandom(32), (("env", "prod"),)
    with pytest.MonkeyPatch.context() as mp:
        _use_agent(mp, agent)
        wrapped = LocalProvider().wrap("test-kek", dek, ctx)
    backup = env.work / "old-keystore.json"
    shutil.copy2(path, backup)
    keystore.clear_cache()
    env.svc.rotate("test-kek")
    env.svc.destroy("test-kek", 1)  # with the passphrase, as an operator does
    _use_agent(monkeypatch, agent)
    with pytest.raises(KeyDisabled):
        LocalProvider().unwrap(wrapped, ctx)
    shutil.copy2(backup, path)  # the attacker: same uid, no passphrase
    with pytest.raises(KeystoreError, match="went backwards"):
        LocalProvider().unwrap(wrapped, ctx)
    assert AgentClient(str(agent.sock)).status()["unlocked"] is False
    with pytest.raises(KeystoreError):  # and nothing comes back until someone with the passphrase unlocks
        LocalProvider().unwrap(wrapped, ctx)


def test_went_backwards_allows_what_key_commands_do() -> None:
    from modelseal.keys.agent import went_backwards

    def table(states: dict[str, str], floor: int = 1) -> dict[str, object]:
        return {"k": {"min_decryption_version": floor, "versions": {v: {"state": s} for v, s in states.items()}}}

    held = table({"1": "active", "2": "pending-destroy", "3": "disabled"})
    assert went_backwards(held, table({"1": "active", "2": "pending-destroy", "3": "disabled", "4": "active"})) is None
    assert went_backwards(held, table({"1": "destroyed", "2": "disabled", "3": "disabled"})) is None  # shred, cancel
    assert went_backwards(held, table({"1": "active", "2": "pending-destroy", "3": "disabled"}, 2)) is None
    assert went_backwards(held, table({"1": "active", "2": "active", "3": "disabled"})) is not None
    assert went_backwards(held, table({"1": "active", "2": "pending-destroy", "3": "active"})) is not None
    assert went_backwards(table({"1": "destroyed"}), table({"1": "active"})) is not None
    assert went_backwards(held, table({"1": "active", "2": "pending-destroy"})) is not None  # a version gone
    assert went_backwards(table({"1": "active"}, 2), table({"1": "active"}, 1)) is not None  # floor lowered
    assert went_backwards(held, {}) is not None


def test_a_rotated_root_makes_the_agent_drop_its_keys(env: Env, agent: Running) -> None:
    client = AgentClient(str(agent.sock))
    assert client.status()["unlocked"] is True
    keystore.rotate_root(keystore.keystore_path(env.home), lambda: PASSPHRASE.encode())
    with pytest.raises(KeystoreError, match="re-wrapped or replaced"):
        client.list(keystore.keystore_path(env.home))
    assert client.status()["unlocked"] is False
    assert client.unlock(PASSPHRASE.encode())["unlocked"] is True  # the new root, from the passphrase
    assert [i.uri for i in client.list(keystore.keystore_path(env.home))] == ["local:test-kek"]


def test_a_keystore_readable_by_others_makes_the_agent_drop_its_keys(env: Env, agent: Running) -> None:
    path = keystore.keystore_path(env.home)
    client = AgentClient(str(agent.sock))
    path.chmod(0o644)
    with pytest.raises(KeystoreError, match="readable by others"):
        client.info(path, "test-kek")
    path.chmod(0o600)
    assert client.status()["unlocked"] is False


def test_the_agent_serves_its_own_keystore_only(env: Env, agent: Running, tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="serves the keystore"):
        AgentClient(str(agent.sock)).list(tmp_path / "other" / "keystore.json")


def test_ttl_expiry_drops_the_keys(env: Env, sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    running = _start(env, sockdir, "--ttl", "1")
    try:
        client = AgentClient(str(running.sock))
        assert client.status()["unlocked"] is True
        time.sleep(1.6)
        assert client.status()["unlocked"] is False
        _use_agent(monkeypatch, running)
        with pytest.raises(KeystoreError, match="holds no keys"):
            LocalProvider().list()
        (env.work / "m.bin").write_bytes(b"w" * 1000)
        with pytest.raises(KeystoreError, match="holds no keys"):
            modelseal.seal(env.work / "m.bin", env.work / "m.s", key="test-kek", keys=KeyService(sink=env.sink))
        assert env.sink.events[-1].operation == "wrap" and env.sink.events[-1].result == "KeystoreError"
    finally:
        _stop(running.pid, running.proc)


def test_expiry_and_lock_zero_the_key_buffers(env: Env) -> None:
    now = [1000.0]
    a = Agent(keystore.keystore_path(env.home), ttl=60, clock=lambda: now[0])
    a.unlock(PASSPHRASE.encode())
    held = a._held
    assert held is not None
    buffers = [b.obj for b in (*held.keks.values(), held.root)]  # the mappings under the views
    assert buffers and all(any(bytes(m)) for m in buffers)  # type: ignore[call-overload]
    now[0] += 59
    assert a.expire() is False and a.status()["unlocked"] is True
    now[0] += 1
    assert a.expire() is True and a.status()["unlocked"] is False
    assert all(not any(bytes(m)) for m in buffers)  # type: ignore[call-overload]
    a.unlock(PASSPHRASE.encode())
    held = a._held
    assert held is not None
    buffers = [b.obj for b in held.keks.values()]
    assert a.lock() is True and all(not any(bytes(m)) for m in buffers)  # type: ignore[call-overload]


def test_lock_and_unlock_from_the_cli(env: Env, agent: Running) -> None:
    via = _env(env, MODELSEAL_AGENT_SOCK=str(agent.sock))
    r = subprocess.run([*CLI, "agent", "--lock"], env=via, capture_output=True, text=True)
    assert r.returncode == 0 and "keys dropped" in r.stdout
    r = subprocess.run([*CLI, "agent", "--status"], env=via, capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout.startswith("locked")
    (env.work / "m.bin").write_bytes(b"w" * 1000)
    r = subprocess.run(
        [*CLI, "seal", str(env.work / "m.bin"), str(env.work / "m.s"), "--key", "test-kek"],
        env=via,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 6 and "holds no keys" in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run(
        [*CLI, "agent", "--unlock"], env={**via, "MODELSEAL_PASSPHRASE": PASSPHRASE}, capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.startswith("unlocked")
    r = subprocess.run([*CLI, "agent", "--status", "--json"], env=via, capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["keys"] == 1


def test_a_dead_agent_is_one_clear_line(env: Env, sockdir: Path) -> None:
    via = _env(env, MODELSEAL_AGENT_SOCK=str(sockdir / "nobody.sock"))
    (env.work / "m.bin").write_bytes(b"w" * 1000)
    r = subprocess.run(
        [*CLI, "seal", str(env.work / "m.bin"), str(env.work / "m.s"), "--key", "test-kek"],
        env=via,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 6 and "is not running" in r.stderr and r.stderr.count("\n") == 1


def test_socket_is_0600_in_a_0700_folder_and_unsafe_folders_are_refused(
    env: Env, agent: Running, sockdir: Path, tmp_path: Path
) -> None:
    assert stat.S_IMODE(agent.sock.stat().st_mode) == 0o600 and stat.S_ISSOCK(agent.sock.stat().st_mode)
    assert stat.S_IMODE(sockdir.stat().st_mode) == 0o700
    r = subprocess.run(
        [*CLI, "agent", "--foreground", "--socket", "/tmp/modelseal-test.sock"],
        env=_env(env, MODELSEAL_PASSPHRASE=PASSPHRASE),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 8 and "others cannot enter" in r.stderr
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(modelseal.PolicyDenied):
        check_socket_path(shared / "s")
    with pytest.raises(modelseal.PolicyDenied, match="already listening"):
        check_socket_path(agent.sock)


def test_peer_check_on_fake_credentials() -> None:
    me = os.geteuid()
    assert same_user(struct.pack("3i", 4242, me, 0))
    assert not same_user(struct.pack("3i", 4242, me + 1, 0))
    assert not same_user(struct.pack("3i", 1, me, 0), uid=me + 1)
    assert not same_user(b"\x00" * 11)


SYSTEM_PYTHON = "/usr/bin/python3"  # one that uid 65534 may run (the venv's is under /root here)


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs root and python3")
def test_a_connection_from_another_uid_is_refused(agent: Running, sockdir: Path) -> None:
    # Let uid 65534 reach the socket at all, so that SO_PEERCRED is what refuses it.
    sockdir.chmod(0o711)
    agent.sock.chmod(0o666)
    probe = (
        "import socket, struct, json, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected')\n"
        "d = json.dumps({'v': 1, 'op': 'status'}).encode()\n"
        "try:\n"
        "    time.sleep(0.3); s.sendall(struct.pack('>I', len(d)) + d); print('answer' if s.recv(4) else 'refused')\n"
        "except OSError:\n"
        "    print('refused')\n"
    )
    r = subprocess.run(
        [SYSTEM_PYTHON, "-c", probe, str(agent.sock)], user=65534, capture_output=True, text=True, timeout=30, cwd="/"
    )
    assert r.stdout.split() == ["connected", "refused"], r.stderr  # reached the agent, which said nothing
    assert AgentClient(str(agent.sock)).status()["unlocked"] is True  # and it still serves its own user


def _raw(sock: Path, payload: bytes) -> dict[str, object] | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(sock))
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        head = s.recv(4)
        if len(head) < 4:
            return None
        (n,) = struct.unpack(">I", head)
        body = b""
        while len(body) < n:
            chunk = s.recv(n - len(body))
            if not chunk:
                break
            body += chunk
        return json.loads(body)  # type: ignore[no-any-return]
    finally:
        s.close()


def _frame(obj: object) -> bytes:
    d = json.dumps(obj).encode()
    return struct.pack(">I", len(d)) + d


def test_malformed_and_oversized_requests_get_an_error_and_the_agent_survives(env: Env, agent: Running) -> None:
    ks = os.path.realpath(keystore.keystore_path(env.home))
    bad = [
        struct.pack(">I", agent_client.MAX_REQUEST + 1) + b"{}",  # announced too long: refused unread
        struct.pack(">I", 0xFFFFFFFF),
        struct.pack(">I", 10) + b"not json!!",
        _frame([1, 2]),
        struct.pack(">I", 4000) + b"[" * 2000 + b"]" * 2000,
        _frame({"v": 2, "op": "status"}),
        _frame({"v": 1, "op": "shell"}),
        _frame({"v": 1, "op": "status", "path": "/etc/passwd"}),
        _frame({"v": 1, "op": "list", "keystore": ks, "socket": "/tmp/x"}),
        _frame({"v": 1, "op": "wrap", "keystore": ks, "name": "test-kek", "dek": "AAAA", "context": []}),
        _frame(
            {
                "v": 1,
                "op": "wrap",
                "keystore": ks,
                "name": "test-kek",
                "dek": "A" * 44,
                "context": [["z", "1"], ["a", "2"]],
            }
        ),
        _frame(
            {"v": 1, "op": "unwrap", "keystore": ks, "name": "test-kek", "version": -1, "wrapped": "", "context": []}
        ),
        _frame({"v": 1, "op": "info", "keystore": ks, "name": 7}),
    ]
    for payload in bad:
        answer = _raw(agent.sock, payload)
        assert answer is not None and answer["ok"] is False and answer["error"] == "KeystoreError", payload[:40]
    assert _raw(agent.sock, struct.pack(">I", 100) + b"{") is not None  # truncated: answered, not hung
    assert agent.proc.poll() is None
    assert AgentClient(str(agent.sock)).status()["unlocked"] is True


def test_stop_by_pid_removes_the_socket(env: Env, sockdir: Path) -> None:
    running = _start(env, sockdir)
    try:
        assert running.sock.exists()
    finally:
        _stop(running.pid, running.proc)
    assert running.proc.returncode == 0 and not running.sock.exists()


def test_stop_request_and_a_daemon_started_like_ssh_agent(env: Env) -> None:
    r = subprocess.run(
        [*CLI, "agent", "--ttl", "10m"],
        env=_env(env, MODELSEAL_PASSPHRASE=PASSPHRASE),
        capture_output=True,
        text=True,
        timeout=60,
    )  # returns: the daemon closed stdout
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("MODELSEAL_AGENT_SOCK=") and lines[0].endswith("; export MODELSEAL_AGENT_SOCK;")
    sock = Path(lines[0].split("=", 1)[1].split(";")[0])
    pid = int(lines[1].split("=", 1)[1].split(";")[0])
    try:
        assert lines[2] == f"echo Agent pid {pid};"
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert PASSPHRASE.encode() not in environ and PASSPHRASE.encode() not in argv
        client = AgentClient(str(sock))
        assert client.status()["unlocked"] is True
        dek = os.urandom(32)
        recipient = client.wrap(keystore.keystore_path(env.home), "test-kek", dek, (("env", "dev"),))
        assert LocalProvider().unwrap(recipient, (("env", "dev"),)) == dek  # the real KEK, here with the passphrase
        r = subprocess.run(
            [*CLI, "agent", "--stop"],
            env=_env(env, MODELSEAL_AGENT_SOCK=str(sock)),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0 and f"echo Agent pid {pid} killed;" in r.stdout
        assert _wait_gone(pid)
        assert not sock.exists() and not sock.parent.exists()
    finally:
        _stop(pid)


def test_the_foreground_agent_keeps_no_passphrase_in_its_environment(agent: Running) -> None:
    environ = Path(f"/proc/{agent.pid}/environ").read_bytes()
    assert b"MODELSEAL_HOME=" in environ  # the file is the agent's environment
    assert PASSPHRASE.encode() not in environ
    assert PASSPHRASE.encode() not in Path(f"/proc/{agent.pid}/cmdline").read_bytes()


def test_a_client_trickling_its_request_is_cut_off_and_cannot_hold_a_slot(agent: Running) -> None:
    """The request must arrive whole within the connection timeout (5 s), however the bytes
    are paced: one byte every 1.5 s would otherwise hold the connection for as long as it liked."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(agent.sock))
    cut = False
    try:
        s.sendall(struct.pack(">I", 200))
        for _ in range(10):  # 15 s of trickle if nobody cuts it off
            time.sleep(1.5)
            try:
                s.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
        else:
            cut = s.recv(1) == b""  # closed by the agent, no answer
    finally:
        s.close()
    assert cut
    assert AgentClient(str(agent.sock)).status()["unlocked"] is True  # and it still serves
