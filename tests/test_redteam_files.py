"""The third red-team pass on files and loaders: a folder swapped for a symlink while the
seal walks, the keystore bind-mounted inside a source, names that are not UTF-8, the
pending signature file through ``sealed::``, sealed folders planted in sealed folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import modelseal
from modelseal.errors import PolicyDenied

from .conftest import Env

KEY = "test-kek"


def test_a_folder_swapped_for_a_symlink_mid_walk_brings_nothing_in(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    src = env.work / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "readme.txt").write_text("mine")
    (src / "a.txt").write_text("a")
    sub = src / "sub"
    real_open, real_scandir = os.open, os.scandir
    swapped: list[bool] = []

    def swap(arg: object) -> None:
        # The attacker's move, right when the walk comes to "sub": after the root's
        # listing named it as a folder, before "sub" itself is listed.
        if not swapped and isinstance(arg, str | os.PathLike) and Path(arg) == sub:
            swapped.append(True)
            os.rename(sub, env.work / "sub.orig")
            os.symlink(env.home, sub)

    def spy_open(path: object, *a: object, **k: object) -> int:
        swap(path)
        return real_open(path, *a, **k)  # type: ignore[arg-type]

    def spy_scandir(path: object = ".") -> object:
        swap(path)
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "scandir", spy_scandir)
    out = env.work / "out.sealed"
    with pytest.raises(PolicyDenied, match="changed while it was being walked"):
        modelseal.seal(src, out, KEY, keys=env.svc)
    monkeypatch.undo()
    assert swapped and not out.exists()


_BIND_SEAL = """
import subprocess, sys
from pathlib import Path
home, src, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
subprocess.run(["mount", "--bind", str(home), str(src / "mnt")], check=True)
import modelseal
from modelseal.errors import PolicyDenied
try:
    modelseal.seal(src, out, "test-kek")
except PolicyDenied as e:
    sys.exit(0 if "keystore" in str(e) and not out.exists() else 2)
sys.exit(1)
"""


def test_the_keystore_bind_mounted_inside_a_source_is_refused(env: Env) -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root for a private mount namespace")
    src = env.work / "src"
    (src / "mnt").mkdir(parents=True)
    (src / "a.txt").write_text("data")
    cmd = ["unshare", "-m", "--propagation", "private", sys.executable, "-c", _BIND_SEAL]
    r = subprocess.run(
        [*cmd, str(env.home), str(src), str(env.work / "out.sealed")], capture_output=True, text=True, timeout=60
    )
    if r.returncode != 0 and ("unshare:" in r.stderr or "mount:" in r.stderr):
        pytest.skip(f"no private mount namespace here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr


def test_a_name_that_is_not_utf8_is_a_typed_refusal(env: Env) -> None:
    src = env.work / "src"
    src.mkdir()
    (src / "ok.txt").write_text("ok")
    with open(os.path.join(os.fsencode(src), b"bad\xff"), "wb") as f:
        f.write(b"y")
    with pytest.raises(PolicyDenied, match="cannot be sealed"):
        modelseal.seal(src, env.work / "out.sealed", KEY, keys=env.svc)
    assert not (env.work / "out.sealed").exists()


def test_sealed_fsspec_reads_agree_with_open_after_a_crash_at_every_step(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fsspec

    from modelseal.signing.signers import generate

    from .test_findings_files import every_crash

    signer = generate()
    (tmp_path / "release.pub").write_bytes(signer.public.pem().encode())
    trust = tmp_path / "trust.toml"
    trust.write_text(
        f'version = 1\nstrict = true\n[signers.release]\nkeys = ["{tmp_path / "release.pub"}"]\n'
        '[[rules]]\nartifacts = ["*"]\nenvironments = ["*"]\nsigners = ["release"]\n'
    )
    monkeypatch.setenv("MODELSEAL_TRUST", str(trust))  # verify-on-load, for open and sealed:: alike
    old, new = os.urandom(300_000), os.urandom(200_000)
    (env.work / "old.bin").write_bytes(old)
    (env.work / "new.bin").write_bytes(new)

    def setup(case: Path, n: int) -> object:
        x = case / "w.sealed"
        modelseal.seal(env.work / "old.bin", x, KEY, keys=env.svc, sign_key=signer, name=f"m{n}")
        return lambda: modelseal.seal(
            env.work / "new.bin", x, KEY, keys=env.svc, sign_key=signer, name=f"m{n}", force=True
        )

    def check(case: Path) -> None:
        x = case / "w.sealed"
        with modelseal.open(x, keys=env.svc) as r:
            via_open = r.read()
        with fsspec.open(f"sealed::file://{x}", "rb") as f:
            assert f.read() == via_open  # the pending signature file counts for sealed:: too
        assert via_open in (old, new)

    assert every_crash(tmp_path / "cases", setup, check) >= 3  # type: ignore[arg-type]


def test_sign_writes_no_signature_file_beside_the_keys(env: Env) -> None:
    from modelseal.signing.signers import generate

    (env.work / "w.bin").write_bytes(b"w")
    inside = env.home / "x.sealed"
    modelseal.seal(env.work / "w.bin", env.work / "x.sealed", KEY, keys=env.svc)
    os.rename(env.work / "x.sealed", inside)  # put there by hand: modelseal itself refuses to
    with pytest.raises(PolicyDenied, match="keystore"):
        modelseal.sign(inside, generate(), keys=env.svc)
    assert not (env.home / "x.sealed.msig").exists()


def test_a_sealed_folder_planted_inside_another_is_not_opened(env: Env) -> None:
    from modelseal.errors import FormatError

    from .conftest import make_model_folder

    outer = env.work / "A.sealed"
    modelseal.seal(make_model_folder(env.work / "a"), outer, KEY, keys=env.svc)
    b = env.work / "b"
    b.mkdir()
    (b / "config.json").write_text("PLANTED")
    modelseal.seal(b, env.work / "B.sealed", KEY, keys=env.svc)
    os.rename(env.work / "B.sealed", outer / "sub")
    with pytest.raises(FormatError, match="inside the sealed folder"):
        modelseal.open(outer / "sub", "config.json", keys=env.svc)
    with pytest.raises(FormatError, match="inside the sealed folder"):
        modelseal.unseal(outer / "sub", env.work / "out", keys=env.svc)
    assert not (env.work / "out").exists()
