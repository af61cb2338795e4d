"""modelseal rotate: rotation at scale, resumable, crash-safe (kill -9 midway)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.keys.providers.local import LocalProvider
from modelseal.keys.service import KeyService
from modelseal.recipes.rotation import rotate

from .conftest import Env, make_model_folder


def _many(env: Env, n: int, key: str = "test-kek") -> list[Path]:
    out = env.work / "artifacts"
    out.mkdir()
    src = env.work / "small.bin"
    src.write_bytes(b"tiny model" * 10)
    paths = []
    for i in range(n):
        sub = out / f"team{i % 3}"
        sub.mkdir(exist_ok=True)
        p = sub / f"m{i}.sealed"
        modelseal.seal(src, p, key=key, keys=env.svc)
        paths.append(p)
    return paths


def test_rotate_when_due_and_rewrap_only_affected(env: Env) -> None:
    paths = _many(env, 6)
    folder = make_model_folder(env.work / "model", big=100)
    modelseal.seal(folder, env.work / "artifacts" / "folder.sealed", key="test-kek", keys=env.svc)
    env.svc.create("other-kek")
    (env.work / "artifacts" / "other.sealed").write_bytes(b"")
    modelseal.seal(
        env.work / "small.bin", env.work / "artifacts" / "other.sealed", key="other-kek", force=True, keys=env.svc
    )
    (env.work / "artifacts" / "notes.txt").write_text("not sealed")
    # Not due: the key is new.
    r = rotate("test-kek", [env.work / "artifacts"], keys=env.svc)
    assert not r.rotated and r.rewrapped == [] and len(r.up_to_date) == 7
    # Due (0 days): rotated and every artifact using it rewrapped, the other one left alone.
    r = rotate("test-kek", [env.work / "artifacts"], older_than_days=0, keys=env.svc)
    assert r.rotated and r.latest_version == 2 and len(r.rewrapped) == 7 and r.not_using_key == 1
    for p in paths:
        assert modelseal.inspect(p)["recipients"] == [{"key": "local:test-kek", "version": 2}]
    env.svc.set_state("test-kek", 1, "disabled")
    assert modelseal.open_folder(env.work / "artifacts" / "folder.sealed", keys=env.svc).read("config.json")
    # Re-running changes nothing.
    r = rotate("test-kek", [env.work / "artifacts"], older_than_days=1000, keys=env.svc)
    assert not r.rotated and r.rewrapped == []


def test_cli_rotate_and_policy_from_key_age(env: Env) -> None:
    LocalProvider(now=lambda: time.time() - 200 * 86400).create("old-kek")
    paths = _many(env, 3, key="old-kek")
    r = subprocess.run(
        [sys.executable, "-m", "modelseal.cli", "rotate", "--key", "old-kek", str(env.work / "artifacts")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "rotated to v2; rewrapped 3" in r.stdout
    assert all(modelseal.inspect(p)["recipients"][0]["version"] == 2 for p in paths)


def test_kill_9_midway_leaves_every_artifact_openable_and_rerun_finishes(env: Env) -> None:
    paths = _many(env, 150)
    env.svc.rotate("test-kek")
    code = (
        "import sys\nfrom pathlib import Path\nfrom modelseal.recipes.rotation import rotate\n"
        "import time\n"
        # Slowed down (10 ms per artifact) so the kill lands midway, whatever the machine's speed.
        "rotate('test-kek', [Path(sys.argv[1])], progress=lambda n: (print(n, flush=True), time.sleep(0.01)))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(env.work / "artifacts")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for _ in range(20):  # let it rewrap some, then kill it without warning
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sum(modelseal.inspect(p)["recipients"][0]["version"] == 2 for p in paths)
    assert 20 <= done < len(paths)
    fresh = KeyService(sink=MemorySink())
    for p in paths:  # every artifact still opens, rewrapped or not
        assert modelseal.open(p, keys=fresh).read() == b"tiny model" * 10
    r = rotate("test-kek", [env.work / "artifacts"], keys=fresh)
    assert not r.rotated and len(r.rewrapped) == len(paths) - done and not r.failed
    assert all(modelseal.inspect(p)["recipients"][0]["version"] == 2 for p in paths)
