"""Regression tests for the outside review's findings on files (7 for sealing, 9, 12, 16, and
"data beside keys, the other way round").

The crash tests run the operation in a forked child that kills itself with SIGKILL just
before its n-th rename, link, exchange or unlink, for n = 1, 2, ... until the operation
finishes first, and check after each crash that the artifact and its signatures agree.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

import modelseal
from modelseal.errors import DestinationExists, PolicyDenied, StorageError
from modelseal.signing.sigfile import SignatureFile, signature_path
from modelseal.signing.signers import ED25519, P256, PemSigner, generate, private_pem
from modelseal.signing.trust import TrustPolicy, load_policy
from modelseal.signing.verification import verify_artifact
from modelseal.util import files as fsutil

from .conftest import Env, make_model_folder, tree_bytes

KEY = "local:test-kek"
_COUNTED = ("rename", "replace", "link", "unlink")


# --- the crash harness -------------------------------------------------------------------------


def _run_child(n: int, op: Callable[[], object]) -> None:
    from modelseal.format import stream

    stream._POOL = None  # the parent's worker threads do not exist in a forked child
    signal.alarm(30)  # bounded: a child that hangs dies of SIGALRM, and the test fails
    count = 0

    def counted(real: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            nonlocal count
            count += 1
            if count == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return call

    for name in _COUNTED:
        setattr(os, name, counted(getattr(os, name)))
    fsutil.renameat2 = counted(fsutil.renameat2)  # type: ignore[assignment]
    op()


def crashed(n: int, op: Callable[[], object]) -> bool:
    """Run ``op`` in a child killed just before its n-th rename, link, exchange or unlink:
    True if it was killed, False if it finished first."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            _run_child(n, op)
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the operation itself failed in the child"
    return False


def every_crash(root: Path, setup: Callable[[Path, int], Callable[[], object]], check: Callable[[Path], None]) -> int:
    """For n = 1, 2, ...: a fresh case folder, ``setup`` there, crash at step n, ``check``.
    Returns the number of steps of the operation."""
    for n in range(1, 60):
        case = root / f"crash-{n}"
        case.mkdir(parents=True)
        if not crashed(n, setup(case, n)):
            check(case)
            return n - 1
        check(case)
    raise AssertionError("the operation never finished")


# --- keys and policy ---------------------------------------------------------------------------


@pytest.fixture
def signers(tmp_path: Path) -> dict[str, PemSigner]:
    out = {}
    for name, alg in (("release", ED25519), ("security", ED25519), ("p256", P256)):
        s = generate(alg)
        (tmp_path / f"{name}.pem").write_bytes(private_pem(s, None))
        (tmp_path / f"{name}.pub").write_text(s.public.pem())
        out[name] = PemSigner.from_file(tmp_path / f"{name}.pem")
    return out


@pytest.fixture
def policy(tmp_path: Path, signers: dict[str, PemSigner]) -> TrustPolicy:
    text = "version = 1\nstrict = true\n"
    for name in signers:
        text += f'[signers.{name}]\nkeys = ["{tmp_path / (name + ".pub")}"]\n'
    text += '[[rules]]\nartifacts = ["*"]\nenvironments = ["*"]\nsigners = ["release", "security", "p256"]\n'
    (tmp_path / "trust.toml").write_text(text)
    return load_policy(tmp_path / "trust.toml")


def _read(x: Path, env: Env, verify: object) -> bytes:
    with modelseal.open(x, keys=env.svc, verify=verify) as r:  # type: ignore[arg-type]
        return r.read()


def _verifies(x: Path, policy: TrustPolicy) -> None:
    for deep in (True, False):  # the CLI's full hash, and a loader's lazy check
        verify_artifact(x, policy, deep=deep)


def _current_ids(x: Path) -> tuple[set[str], set[str]]:
    sf = SignatureFile.load(signature_path(x))
    if sf is None:
        return set(), set()
    return {e.id for e in sf.signatures}, {e.id for e in sf.history}


# --- finding 9: seal --force of a file, with and without a signing key ------------------------------


def test_seal_force_sign_key_of_a_file_survives_a_crash_at_every_step(
    env: Env, signers: dict[str, PemSigner], policy: TrustPolicy, tmp_path: Path
) -> None:
    old, new = os.urandom(300_000), os.urandom(200_000)
    (env.work / "old.bin").write_bytes(old)
    (env.work / "new.bin").write_bytes(new)

    def setup(case: Path, n: int) -> Callable[[], object]:
        x = case / "w.sealed"
        modelseal.seal(env.work / "old.bin", x, KEY, keys=env.svc, sign_key=signers["release"], name=f"m{n}")
        return lambda: modelseal.seal(
            env.work / "new.bin", x, KEY, keys=env.svc, sign_key=signers["release"], name=f"m{n}", force=True
        )

    def check(case: Path) -> None:
        x = case / "w.sealed"
        # Whichever artifact is at x, its signatures are the ones a reader finds: the
        # untouched original still verifies, and so does the new one once it is in place.
        assert _read(x, env, policy) in (old, new)
        _verifies(x, policy)

    assert every_crash(tmp_path / "cases", setup, check) >= 3


def test_seal_force_of_a_signed_file_without_a_key_survives_a_crash_at_every_step(
    env: Env, signers: dict[str, PemSigner], policy: TrustPolicy, tmp_path: Path
) -> None:
    old, new = os.urandom(100_000), os.urandom(50_000)
    (env.work / "old.bin").write_bytes(old)
    (env.work / "new.bin").write_bytes(new)
    ids: dict[Path, str] = {}

    def setup(case: Path, n: int) -> Callable[[], object]:
        x = case / "w.sealed"
        res = modelseal.seal(env.work / "old.bin", x, KEY, keys=env.svc, sign_key=signers["release"], name=f"m{n}")
        assert res.signature is not None
        ids[case] = res.signature
        return lambda: modelseal.seal(env.work / "new.bin", x, KEY, keys=env.svc, force=True)

    def check(case: Path) -> None:
        x = case / "w.sealed"
        plain = _read(x, env, False)
        current, history = _current_ids(x)
        if plain == old:
            assert current == {ids[case]}
            _verifies(x, policy)
        else:
            # The new file is unsigned: the old signatures are history, never current.
            assert plain == new and current == set() and ids[case] in history

    every_crash(tmp_path / "cases", setup, check)


def test_reencrypt_of_a_signed_file_survives_a_crash_at_every_step(
    env: Env, signers: dict[str, PemSigner], policy: TrustPolicy, tmp_path: Path
) -> None:
    data = os.urandom(80_000)
    (env.work / "w.bin").write_bytes(data)
    before: dict[Path, tuple[bytes, str]] = {}

    def setup(case: Path, n: int) -> Callable[[], object]:
        x = case / "w.sealed"
        res = modelseal.seal(env.work / "w.bin", x, KEY, keys=env.svc, sign_key=signers["release"], name=f"m{n}")
        assert res.signature is not None
        before[case] = (x.read_bytes(), res.signature)
        return lambda: modelseal.reencrypt(x, KEY, keys=env.svc)

    def check(case: Path) -> None:
        x = case / "w.sealed"
        assert _read(x, env, False) == data
        current, history = _current_ids(x)
        old_bytes, sig = before[case]
        if x.read_bytes() == old_bytes:
            assert current == {sig}
            _verifies(x, policy)
        else:
            assert current == set() and sig in history

    every_crash(tmp_path / "cases", setup, check)


def test_sign_survives_a_crash_at_every_step_even_during_an_interrupted_replacement(
    env: Env, signers: dict[str, PemSigner], policy: TrustPolicy, tmp_path: Path
) -> None:
    """A crash left a replacement half done (the new file in place, its signature file still
    pending); a second signer then signs it, and crashes at every step of that too."""
    old, new = os.urandom(30_000), os.urandom(30_000)
    (env.work / "old.bin").write_bytes(old)
    (env.work / "new.bin").write_bytes(new)

    def interrupted(case: Path, n: int) -> Path:
        base = case / "base"
        base.mkdir()
        modelseal.seal(env.work / "old.bin", base / "w.sealed", KEY, keys=env.svc, sign_key=signers["release"])
        x = case / "w.sealed"
        for k in range(1, 40):  # find the crash right after the new file was renamed into place
            shutil.copy(base / "w.sealed", x)
            shutil.copy(signature_path(base / "w.sealed"), signature_path(x))
            assert crashed(
                k,
                lambda: modelseal.seal(
                    env.work / "new.bin", x, KEY, keys=env.svc, sign_key=signers["release"], name=f"m{n}", force=True
                ),
            )
            if _read(x, env, False) == new:
                assert (case / ".w.sealed.msig.pending").exists()  # its signatures are still pending
                return x
        raise AssertionError("no crash point between the two renames")

    def setup(case: Path, n: int) -> Callable[[], object]:
        x = interrupted(case, n)
        sf = SignatureFile.load(signature_path(x))
        assert sf is not None
        version = sf.signatures[0].statement.version  # a co-signer signs the same version
        return lambda: modelseal.sign(x, signers["security"], name=f"m{n}", version=version)

    def check(case: Path) -> None:
        x = case / "w.sealed"
        assert _read(x, env, policy) == new
        _verifies(x, policy)

    every_crash(tmp_path / "cases", setup, check)
    # Once finished, both signers' signatures are current and nothing is pending.
    last = max((tmp_path / "cases").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    assert len(_current_ids(last / "w.sealed")[0]) == 2
    assert not (last / ".w.sealed.msig.pending").exists()


# --- findings 9 and 12: folders are swapped in one step ------------------------------------------------


def test_seal_force_of_a_folder_survives_a_crash_at_every_step(
    env: Env, signers: dict[str, PemSigner], policy: TrustPolicy, tmp_path: Path
) -> None:
    old = make_model_folder(env.work / "old", big=10)
    new = make_model_folder(env.work / "new", big=20)
    (new / "config.json").write_text('{"model_type": "new"}')

    def setup(case: Path, n: int) -> Callable[[], object]:
        x = case / "m.sealed"
        modelseal.seal(old, x, KEY, keys=env.svc, sign_key=signers["release"], name=f"m{n}")
        return lambda: modelseal.seal(new, x, KEY, keys=env.svc, sign_key=signers["release"], name=f"m{n}", force=True)

    def check(case: Path) -> None:
        x = case / "m.sealed"
        assert x.is_dir()  # never nothing at the path
        with modelseal.open_folder(x, keys=env.svc, verify=policy) as f:
            assert f.read("config.json") in ((old / "config.json").read_bytes(), (new / "config.json").read_bytes())
        _verifies(x, policy)

    every_crash(tmp_path / "cases", setup, check)


def test_sign_of_a_folder_survives_a_crash_at_every_step(
    env: Env, signers: dict[str, PemSigner], policy: TrustPolicy, tmp_path: Path
) -> None:
    """The new signature file is staged beside the sealed folder, not inside it: a temp
    name left inside by a crash would make the folder unverifiable for good."""
    model = make_model_folder(env.work / "model", big=10)

    def setup(case: Path, n: int) -> Callable[[], object]:
        x = case / "m.sealed"
        modelseal.seal(model, x, KEY, keys=env.svc, sign_key=signers["release"], name=f"m{n}")
        sf = SignatureFile.load(signature_path(x))
        assert sf is not None
        version = sf.signatures[0].statement.version
        return lambda: modelseal.sign(x, signers["security"], name=f"m{n}", version=version)

    def check(case: Path) -> None:
        x = case / "m.sealed"
        assert sorted(p.name for p in x.iterdir()) == ["blobs", "manifest.mseal", "signatures.msig"]
        _verifies(x, policy)

    every_crash(tmp_path / "cases", setup, check)


def test_reencrypt_of_a_folder_survives_a_crash_at_every_step(env: Env, tmp_path: Path) -> None:
    model = make_model_folder(env.work / "model", big=10)

    def setup(case: Path, n: int) -> Callable[[], object]:
        x = case / "m.sealed"
        modelseal.seal(model, x, KEY, keys=env.svc)
        return lambda: modelseal.reencrypt(x, KEY, keys=env.svc)

    def check(case: Path) -> None:
        with modelseal.open_folder(case / "m.sealed", keys=env.svc, verify=False) as f:
            assert {rel: f.read(rel) for rel in f} == tree_bytes(model)

    every_crash(tmp_path / "cases", setup, check)


def test_folder_swap_without_rename_exchange_rolls_back_on_the_next_access(
    env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On a filesystem that cannot RENAME_EXCHANGE the swap is two renames; a crash
    between them is rolled back by the next access, which finds the original."""
    monkeypatch.setattr(fsutil, "renameat2", lambda *a: False, raising=False)
    model = make_model_folder(env.work / "model", big=10)
    other = make_model_folder(env.work / "other", big=30)
    base, x = tmp_path / "base.sealed", tmp_path / "m.sealed"
    modelseal.seal(model, base, KEY, keys=env.svc)
    before = tree_bytes(base)

    def crash_swap_at(k: int) -> bool:
        fsutil.remove_path(x)
        shutil.copytree(base, x)
        assert crashed(k, lambda: modelseal.seal(other, x, KEY, keys=env.svc, force=True))
        return not x.exists()

    k = next(k for k in range(1, 40) if crash_swap_at(k))  # between the two renames
    with pytest.raises(DestinationExists):
        modelseal.seal(other, x, KEY, keys=env.svc)  # nothing is replaced without --force...
    assert tree_bytes(x) == before  # ...and the original is back
    assert not fsutil.replaced_name(x).exists()
    # A crash right after the new folder moved in: the next access removes the old one.
    assert not crash_swap_at(k + 1) and fsutil.replaced_name(x).is_dir()
    fsutil.settle_replaced(x)
    with modelseal.open_folder(x, keys=env.svc, verify=False) as f:
        assert f.read("config.json") == (other / "config.json").read_bytes()
    assert not fsutil.replaced_name(x).exists()


# --- findings 9 and 16: unseal ------------------------------------------------------------------


def test_unseal_of_a_file_never_leaves_a_bundle_of_another_file(
    env: Env, signers: dict[str, PemSigner], tmp_path: Path
) -> None:
    pairs = {}
    for tag in ("a", "b"):
        (env.work / f"{tag}.bin").write_bytes(os.urandom(60_000))
        sealed = env.work / f"{tag}.sealed"
        modelseal.seal(env.work / f"{tag}.bin", sealed, KEY, keys=env.svc, sign_key=signers["p256"], name=tag)
        out = env.work / f"{tag}.out"
        modelseal.unseal(sealed, out, keys=env.svc, verify=False)
        pairs[tag] = (out.read_bytes(), out.with_name(out.name + ".sig").read_bytes())
    assert pairs["a"][1] != pairs["b"][1]

    def setup(case: Path, n: int) -> Callable[[], object]:
        out = case / "model.bin"
        out.write_bytes(pairs["a"][0])
        out.with_name("model.bin.sig").write_bytes(pairs["a"][1])
        return lambda: modelseal.unseal(env.work / "b.sealed", out, keys=env.svc, verify=False, force=True)

    def check(case: Path) -> None:
        plain = (case / "model.bin").read_bytes()
        sig = case / "model.bin.sig"
        bundle = sig.read_bytes() if sig.exists() else None
        allowed = {pairs["a"], (pairs["a"][0], None), (pairs["b"][0], None), pairs["b"]}
        assert (plain, bundle) in allowed

    every_crash(tmp_path / "cases", setup, check)


def test_unseal_of_a_folder_survives_a_crash_at_every_step(env: Env, tmp_path: Path) -> None:
    a = make_model_folder(env.work / "a", big=10)
    b = make_model_folder(env.work / "b", big=40)
    modelseal.seal(b, env.work / "b.sealed", KEY, keys=env.svc)

    def setup(case: Path, n: int) -> Callable[[], object]:
        shutil.copytree(a, case / "out")
        return lambda: modelseal.unseal(env.work / "b.sealed", case / "out", keys=env.svc, verify=False, force=True)

    def check(case: Path) -> None:
        assert tree_bytes(case / "out") in (tree_bytes(a), tree_bytes(b))

    every_crash(tmp_path / "cases", setup, check)


def test_unseal_without_force_replaces_no_bundle(env: Env, signers: dict[str, PemSigner]) -> None:
    (env.work / "w.bin").write_bytes(os.urandom(10_000))
    sealed = env.work / "w.sealed"
    modelseal.seal(env.work / "w.bin", sealed, KEY, keys=env.svc, sign_key=signers["p256"], name="w")
    out = env.work / "w.out"
    mine = out.with_name("w.out.sig")
    mine.write_text("someone's own file")
    with pytest.raises(DestinationExists, match=r"w\.out\.sig"):
        modelseal.unseal(sealed, out, keys=env.svc, verify=False)
    assert mine.read_text() == "someone's own file" and not out.exists()
    assert sorted(p.name for p in env.work.iterdir()) == ["w.bin", "w.out.sig", "w.sealed", "w.sealed.msig"]
    modelseal.unseal(sealed, out, keys=env.svc, verify=False, force=True)
    assert out.read_bytes() == (env.work / "w.bin").read_bytes() and b"dsseEnvelope" in mine.read_bytes()


def test_unseal_with_force_removes_a_bundle_that_no_longer_belongs(env: Env) -> None:
    (env.work / "w.bin").write_bytes(b"plain")
    modelseal.seal(env.work / "w.bin", env.work / "w.sealed", KEY, keys=env.svc)  # unsigned: no bundle
    out = env.work / "w.out"
    out.write_bytes(b"old output")
    out.with_name("w.out.sig").write_text("the bundle of the old output")
    modelseal.unseal(env.work / "w.sealed", out, keys=env.svc, verify=False, force=True)
    assert out.read_bytes() == b"plain" and not out.with_name("w.out.sig").exists()


def test_seal_without_force_replaces_no_signature_file(env: Env, signers: dict[str, PemSigner]) -> None:
    (env.work / "w.bin").write_bytes(os.urandom(10_000))
    x = env.work / "w.sealed"
    modelseal.seal(env.work / "w.bin", x, KEY, keys=env.svc, sign_key=signers["release"], name="w")
    stale = signature_path(x).read_bytes()
    x.unlink()  # the artifact is gone, its signature file is still there
    for sign_key in (None, signers["release"]):
        with pytest.raises(DestinationExists, match=r"w\.sealed\.msig"):
            modelseal.seal(env.work / "w.bin", x, KEY, keys=env.svc, sign_key=sign_key, name="w")
        assert signature_path(x).read_bytes() == stale and not x.exists()
    assert sorted(p.name for p in env.work.iterdir()) == ["w.bin", "w.sealed.msig"]
    modelseal.seal(env.work / "w.bin", x, KEY, keys=env.svc, sign_key=signers["release"], name="w", force=True)
    current, history = _current_ids(x)
    assert len(current) == 1 and len(history) == 1  # the stale signature is kept, as history


# --- finding 7: a folder that cannot be listed ---------------------------------------------------------


def test_seal_refuses_a_folder_with_a_subfolder_it_cannot_list(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model_folder(env.work / "model", big=10)
    locked = model / "nested"
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:
        if Path(str(path)) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)  # type: ignore[call-overload]

    real_open = os.open

    def open_(path: object, flags: int, *a: object, **k: object) -> int:
        # The walk lists each folder through a descriptor: refuse opening that one too.
        if flags & os.O_DIRECTORY and Path(str(path)) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(StorageError, match="cannot list"):
        modelseal.seal(model, env.work / "m.sealed", KEY, keys=env.svc)
    monkeypatch.undo()
    assert sorted(p.name for p in env.work.iterdir()) == ["model"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists any folder")
def test_seal_refuses_an_unreadable_subfolder(env: Env) -> None:
    model = make_model_folder(env.work / "model", big=10)
    (model / "nested").chmod(0)
    try:
        with pytest.raises(StorageError, match="cannot list"):
            modelseal.seal(model, env.work / "m.sealed", KEY, keys=env.svc)
    finally:
        (model / "nested").chmod(0o700)
    assert sorted(p.name for p in env.work.iterdir()) == ["model"]


# --- data beside keys, the other way round ------------------------------------------------------------


def test_no_output_inside_the_keystore_folder(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    src = env.work / "a.txt"
    src.write_text("data")
    sealed = env.work / "a.sealed"
    modelseal.seal(src, sealed, KEY, keys=env.svc)
    before = sorted(p.name for p in env.home.iterdir())
    with pytest.raises(PolicyDenied, match="beside the keys"):
        modelseal.seal(src, env.home / "x.sealed", KEY, keys=env.svc)
    with pytest.raises(PolicyDenied, match="beside the keys"):
        modelseal.unseal(sealed, env.home / "plain.txt", keys=env.svc, verify=False)
    with pytest.raises(PolicyDenied, match="beside the keys"):
        modelseal.seal(env.home / "keystore.json", env.work / "ks.sealed", KEY, keys=env.svc)
    # ...nor through a symlink to it, or to a folder inside it.
    (env.work / "link").symlink_to(env.home)
    (env.home / "sub").mkdir()
    (env.work / "sublink").symlink_to(env.home / "sub")
    for dst in (env.work / "link" / "x.sealed", env.work / "sublink" / "x.sealed"):
        with pytest.raises(PolicyDenied, match="beside the keys"):
            modelseal.seal(src, dst, KEY, keys=env.svc)
        with pytest.raises(PolicyDenied, match="beside the keys"):
            modelseal.unseal(sealed, dst, keys=env.svc, verify=False)
    # A home given through a symlink is seen through too.
    monkeypatch.setenv("MODELSEAL_HOME", str(env.work / "link"))
    with pytest.raises(PolicyDenied, match="beside the keys"):
        modelseal.seal(src, env.home / "y.sealed", KEY, keys=env.svc)
    (env.home / "sub").rmdir()
    assert sorted(p.name for p in env.home.iterdir()) == before


_BIND_CHECK = """
import subprocess, sys
from pathlib import Path
home, alias = Path(sys.argv[1]), Path(sys.argv[2])
subprocess.run(["mount", "--bind", str(home), str(alias)], check=True)
from modelseal.errors import PolicyDenied
from modelseal.recipes.context import check_keys_apart
try:
    check_keys_apart(alias / "x.sealed")
except PolicyDenied:
    sys.exit(0)
sys.exit(1)
"""


def test_no_output_inside_the_keystore_folder_through_a_bind_mount(env: Env) -> None:
    import subprocess

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root for a private mount namespace")
    alias = env.work / "alias"
    alias.mkdir()
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", _BIND_CHECK, str(env.home), str(alias)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0 and ("unshare:" in r.stderr or "mount:" in r.stderr):
        pytest.skip(f"no private mount namespace here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr


def test_a_fifo_planted_as_the_signature_file_does_not_block(env: Env, policy: TrustPolicy) -> None:
    (env.work / "w.bin").write_bytes(b"data")
    x = env.work / "w.sealed"
    modelseal.seal(env.work / "w.bin", x, KEY, keys=env.svc)
    os.mkfifo(signature_path(x))
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        signal.alarm(10)  # a regression blocks in open(): the alarm then kills the child
        try:
            verify_artifact(x, policy)
        except modelseal.VerificationError as e:
            os._exit(0 if "not a regular file" in str(e) else 2)
        except BaseException:
            os._exit(3)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
