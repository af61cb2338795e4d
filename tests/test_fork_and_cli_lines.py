"""Fixes made while integrating the review's findings: a forked child can still read in
parallel, and CLI error lines carrying untrusted text stay one line."""

from __future__ import annotations

import os
import signal
import time

import pytest

import modelseal
from modelseal.format import stream

from .conftest import Env


def test_a_forked_child_reads_sealed_data_in_parallel(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "workers", lambda: 2)  # the pool is used whatever the core count
    src = env.work / "w.bin"
    data = os.urandom(5 * (1 << 20) + 3)
    src.write_bytes(data)
    sealed = env.work / "w.sealed"
    modelseal.seal(src, sealed, "test-kek", keys=env.svc)
    with modelseal.open(sealed, keys=env.svc) as r:
        assert r.pread(0, len(data)) == data  # the parent's pool now exists, with idle threads
    pid = os.fork()
    if pid == 0:  # the child: a DataLoader worker, say
        try:
            with modelseal.open(sealed, keys=env.svc) as r:
                ok = r.pread(0, len(data)) == data
            os._exit(0 if ok else 3)
        except BaseException:
            os._exit(4)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in the inherited decryption pool")


def test_cli_error_lines_escape_untrusted_text(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    from modelseal.cli import main

    bad = env.work / "forged\nmodelseal: verified OK"
    assert main(["inspect", str(bad)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("modelseal: error: ")
    assert "\\x0amodelseal: verified OK" in err


def test_error_line_escaping_keeps_backslashes_of_already_escaped_parts() -> None:
    from modelseal.cli.common import escape

    assert escape("a\\x0ab\nc", backslash=False) == "a\\x0ab\\x0ac"
    assert escape("a\\b") == "a\\\\b"


def test_signing_key_never_replaces_a_public_key_without_force(env: Env) -> None:
    from modelseal.cli import main

    priv, pub = env.work / "k.pem", env.work / "k.pub"
    pub.write_bytes(b"pinned by a verifier\n")
    assert main(["signing-key", str(priv), str(pub)]) == 7
    assert pub.read_bytes() == b"pinned by a verifier\n" and not priv.exists()  # nothing half-made
    assert main(["signing-key", str(priv), str(pub), "--force"]) == 0
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_recovery_split_never_replaces_shares_without_force(env: Env) -> None:
    from modelseal.cli import main

    out = env.work / "shares"
    assert main(["recovery", "split", "--shares", "3", "--threshold", "2", "--out", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["recovery", "split", "--shares", "3", "--threshold", "2", "--out", str(out)]) == 7
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert main(["recovery", "split", "--shares", "3", "--threshold", "2", "--out", str(out), "--force"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} != first


def test_open_refuses_a_file_planted_inside_a_sealed_folder(env: Env) -> None:
    from modelseal.errors import FormatError

    from .conftest import make_model_folder

    folder = env.work / "m.sealed"
    modelseal.seal(make_model_folder(env.work / "m"), folder, "test-kek", keys=env.svc)
    lone = env.work / "x.sealed"
    (env.work / "x").write_bytes(b"planted weights")
    modelseal.seal(env.work / "x", lone, "test-kek", keys=env.svc)
    planted = folder / "config.json"
    planted.write_bytes(lone.read_bytes())  # a real sealed file where a member name is expected
    with pytest.raises(FormatError, match="inside the sealed folder"):
        modelseal.open(planted, keys=env.svc)
    with pytest.raises(FormatError, match="no member"):
        modelseal.open(lone, "config.json", keys=env.svc)
    with modelseal.open(folder, "config.json", keys=env.svc) as r:  # the member itself, from the manifest
        assert r.readall() != b"planted weights"
