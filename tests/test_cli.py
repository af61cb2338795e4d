"""The CLI: commands, one-line errors, documented exit codes, nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelseal.cli import main

from .conftest import Env, make_model_folder, tree_bytes


def run(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelseal.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env_extra or {})},
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def test_init_creates_keystore_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "h"
    r = run("init", env_extra={"MODELSEAL_HOME": str(home), "MODELSEAL_PASSPHRASE": "pw"})
    assert r.returncode == 0, r.stderr
    assert (home / "keystore.json").exists()
    r = run("init", env_extra={"MODELSEAL_HOME": str(home), "MODELSEAL_PASSPHRASE": "pw"})
    assert r.returncode == 6 and r.stderr.count("\n") == 1 and "already exists" in r.stderr
    r = run("key", "list", env_extra={"MODELSEAL_HOME": str(tmp_path / "none"), "MODELSEAL_PASSPHRASE": "pw"})
    assert r.returncode == 6 and "modelseal init" in r.stderr


def test_no_passphrase_without_terminal(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MODELSEAL_PASSPHRASE"}
    env["MODELSEAL_HOME"] = str(tmp_path / "h")
    r = subprocess.run(
        [sys.executable, "-m", "modelseal.cli", "init"],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 6 and "MODELSEAL_PASSPHRASE" in r.stderr


def test_full_cli_flow(env: Env) -> None:
    model = make_model_folder(env.work / "model", big=2 << 20)
    sealed = env.work / "model.sealed"
    r = run("seal", str(model), str(sealed), "--key", "test-kek", "--context", "env=dev", "--context", "artifact=tiny")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar when stderr is not a terminal
    r = run("inspect", str(sealed), "--json")
    info = json.loads(r.stdout)
    assert info["context"] == {"artifact": "tiny", "env": "dev"} and "files" not in info
    r = run("inspect", str(sealed), "--json", "--contents")
    assert {f["path"] for f in json.loads(r.stdout)["files"]} == set(tree_bytes(model))
    assert run("key", "rotate", "test-kek").returncode == 0
    r = run("rewrap", str(sealed))
    assert r.returncode == 0 and "local:test-kek#2" in r.stdout
    assert run("reencrypt", str(sealed)).returncode == 0
    r = run("unseal", str(sealed), str(env.work / "out"))
    assert r.returncode == 0, r.stderr
    assert tree_bytes(env.work / "out") == tree_bytes(model)
    r = run("key", "list", "--json")
    assert json.loads(r.stdout)[0]["latest_version"] == 2


@pytest.mark.parametrize(
    ("case", "code", "needle"),
    [
        ("not-sealed", 4, "not a modelseal artifact"),
        ("tampered", 3, "corrupted, tampered"),
        ("missing-key", 5, "no key local:ghost"),
        ("disabled", 5, "disabled"),
        ("exists", 7, "already exists"),
        ("symlink", 8, "outside the folder"),
        ("bad-context", 2, "--context takes KEY=VALUE"),
        ("missing-src", 7, "does not exist"),
    ],
)
def test_error_exit_codes_are_one_line(env: Env, case: str, code: int, needle: str) -> None:
    src = env.work / "plain.bin"
    src.write_bytes(os.urandom(5000))
    sealed = env.work / "plain.sealed"
    assert main(["seal", str(src), str(sealed), "--key", "test-kek"]) == 0
    before = {p: p.read_bytes() for p in env.work.rglob("*") if p.is_file()}
    if case == "not-sealed":
        args = ["unseal", str(src), str(env.work / "o")]
    elif case == "tampered":
        data = bytearray(sealed.read_bytes())
        data[-3] ^= 1
        sealed.write_bytes(bytes(data))
        before[sealed] = bytes(data)
        args = ["unseal", str(sealed), str(env.work / "o")]
    elif case == "missing-key":
        args = ["seal", str(src), str(env.work / "o"), "--key", "ghost"]
    elif case == "disabled":
        main(["key", "disable", "test-kek", "--version", "1"])
        args = ["unseal", str(sealed), str(env.work / "o")]
    elif case == "exists":
        args = ["seal", str(src), str(sealed), "--key", "test-kek"]
    elif case == "symlink":
        d = env.work / "linky"
        d.mkdir()
        os.symlink("/etc/hostname", d / "escape")
        args = ["seal", str(d), str(env.work / "o"), "--key", "test-kek"]
    elif case == "bad-context":
        args = ["seal", str(src), str(env.work / "o"), "--key", "test-kek", "--context", "oops"]
    else:
        args = ["seal", str(env.work / "nope"), str(env.work / "o"), "--key", "test-kek"]
    r = run(*args)
    assert r.returncode == code, r.stderr
    assert r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (env.work / "o").exists()
    leftovers = [p.name for p in env.work.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    for p, content in before.items():
        assert p.read_bytes() == content


def test_force_replaces_and_destroy_needs_confirmation(env: Env) -> None:
    src = env.work / "a.bin"
    src.write_bytes(b"one")
    dst = env.work / "a.sealed"
    assert main(["seal", str(src), str(dst), "--key", "test-kek"]) == 0
    src.write_bytes(b"two")
    assert main(["seal", str(src), str(dst), "--key", "test-kek", "--force"]) == 0
    assert main(["unseal", str(dst), str(env.work / "a.out")]) == 0
    assert (env.work / "a.out").read_bytes() == b"two"
    r = run("key", "destroy", "test-kek")
    assert r.returncode == 1 and "without --yes" in r.stderr
    r = run("key", "destroy", "test-kek", "--version", "1", "--yes")  # scheduled: 7 days by default
    assert r.returncode == 0 and "will be erased after" in r.stdout
    r = run("unseal", str(dst), str(env.work / "b.out"))
    assert r.returncode == 5 and "pending-destroy" in r.stderr  # unusable at once
    assert run("key", "cancel-destroy", "test-kek", "--version", "1").returncode == 0
    assert run("key", "enable", "test-kek", "--version", "1").returncode == 0
    assert run("unseal", str(dst), str(env.work / "c.out")).returncode == 0
    assert run("key", "destroy", "test-kek", "--version", "1", "--yes", "--now").returncode == 0
    r = run("unseal", str(dst), str(env.work / "b.out"))
    assert r.returncode == 5 and "destroyed" in r.stderr


def test_unseal_of_folder_member_paths_are_safe(env: Env) -> None:
    model = make_model_folder(env.work / "model", big=10)
    assert main(["seal", str(model), str(env.work / "s"), "--key", "test-kek"]) == 0
    assert main(["unseal", str(env.work / "s"), str(env.work / "o")]) == 0
    assert {p.as_posix() for p in (env.work / "o").rglob("*")} >= {
        (env.work / "o" / "nested/deeper/adapter.bin").as_posix()
    }


def test_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from modelseal.cli import common as cli

    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: False)
    bar = cli.ProgressBar(100, "seal")
    bar(100)
    bar.close()
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: True)
    bar = cli.ProgressBar(100, "seal")
    bar(50)
    bar(50)
    bar.close()
    err = capsys.readouterr().err
    assert "seal [" in err and "100.0%" in err


def test_min_version_command(env: Env) -> None:
    src = env.work / "a.bin"
    src.write_bytes(b"x")
    assert main(["seal", str(src), str(env.work / "a.sealed"), "--key", "test-kek"]) == 0
    assert run("key", "rotate", "test-kek").returncode == 0
    assert run("key", "min-version", "test-kek", "2").returncode == 0
    r = run("unseal", str(env.work / "a.sealed"), str(env.work / "a.out"))
    assert r.returncode == 5 and "minimum decryption version" in r.stderr


def test_seal_env_and_project_reach_the_context(env: Env) -> None:
    src = env.work / "w.bin"
    src.write_bytes(b"weights" * 100)
    dst = env.work / "w.sealed"
    assert main(["seal", str(src), str(dst), "--key", "local:test-kek", "--env", "prod", "--project", "llama"]) == 0
    from modelseal import inspect

    assert dict(inspect(dst)["context"]) == {"env": "prod", "project": "llama"}
