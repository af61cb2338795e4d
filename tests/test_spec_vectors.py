"""The vectors of tests/vectors/spec.json (generate_spec.py): every rule that had none, each
with its error class through the API and its exit code through ``modelseal unseal``,
``verify`` and ``rewrap``; and the spec's numbers (docs/format.md) checked against the code."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.errors import DecryptionError, FormatError, KeyDisabled, KeyNotFound, ModelsealError, StorageError
from modelseal.format.file import read_raw
from modelseal.format.header import MAX_HEADER, parse_core
from modelseal.format.source import FdSource
from modelseal.keys import keystore
from modelseal.keys.service import KeyService

VECTORS = Path(__file__).parent / "vectors"
SPEC = json.loads((VECTORS / "spec.json").read_text(encoding="utf-8"))
FORMAT_MD = (Path(__file__).parents[1] / "docs" / "format.md").read_text(encoding="utf-8")

ERRORS: dict[str, type[ModelsealError]] = {
    "not sealed": FormatError,
    "unsupported": FormatError,
    "wrong kind": FormatError,
    "header failure": DecryptionError,
    "payload failure": DecryptionError,
    "key not found": KeyNotFound,
    "key disabled": KeyDisabled,
}
EXIT = {"success": 0, "not sealed": 4, "unsupported": 4, "wrong kind": 4, "header failure": 3}
EXIT |= {"payload failure": 3, "key not found": 5, "key disabled": 5}


def _home(tmp: Path, name: str) -> Path:
    """A private copy of a vector keystore: git keeps no file modes, so a checkout has it
    0644, and a keystore readable by others is refused (docs/format.md, section 9)."""
    home = tmp / name
    shutil.copytree(VECTORS / name, home)
    (home / "keystore.json").chmod(0o600)
    return home


@pytest.fixture
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("MODELSEAL_PASSPHRASE", SPEC["passphrase"])
    keystore.clear_cache()
    return {name: _home(tmp_path, name) for name in ("home", "home-states")}


def _service(home: Path, monkeypatch: pytest.MonkeyPatch) -> KeyService:
    monkeypatch.setenv("MODELSEAL_HOME", str(home))
    keystore.clear_cache()
    return KeyService(sink=MemorySink())


def _read_all(path: Path, keys: KeyService, vec: dict[str, Any]) -> dict[str, bytes]:
    """Open the vector as the API does and read every member; raises what a reader raises."""
    if path.is_dir() or vec["path"].endswith(".sealed"):
        out: dict[str, bytes] = {}
        with modelseal.open_folder(path, keys=keys) as f:
            if vec.get("stage") == "folder":
                raise AssertionError("the folder opened, but its manifest must be refused")
            for member in sorted(f):
                out[member] = f.read(member)
        return out
    with modelseal.open(path, keys=keys) as r:
        return {".": r.read()}


@pytest.mark.parametrize("vec", SPEC["vectors"], ids=lambda v: v["path"])
def test_spec_vector(vec: dict[str, Any], homes: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    keys = _service(homes[vec["home"]], monkeypatch)
    path = VECTORS / vec["path"]
    expect = vec["expect"]
    if expect == "success":
        got = _read_all(path, keys, vec)
        want = vec.get("files") or {".": vec["sha256"]}
        assert {k: hashlib.sha256(v).hexdigest() for k, v in got.items()} == want
        if "metadata_name" in vec:
            with modelseal.open(path, keys=keys) as r:
                assert r.metadata()["name"] == vec["metadata_name"]
        return
    with pytest.raises(ERRORS[expect]) as info:
        _read_all(path, keys, vec)
    assert type(info.value) is ERRORS[expect]
    if expect in ("header failure", "payload failure"):
        assert str(info.value) == str(DecryptionError())  # never which check failed
    if vec.get("stage") == "member":  # the folder itself opens; only its member fails
        with modelseal.open_folder(path, keys=keys) as f:
            assert vec["member"] in f
            with pytest.raises(ERRORS[expect]):
                f.read(vec["member"])


def _cli(home: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODELSEAL_HOME": str(home), "MODELSEAL_PASSPHRASE": SPEC["passphrase"]}
    env.pop("MODELSEAL_TRUST", None)
    return subprocess.run(
        [sys.executable, "-m", "modelseal.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


def test_unseal_exit_codes(homes: dict[str, Path], tmp_path: Path) -> None:
    """``modelseal unseal`` of every vector: the exit code of its class, one line on
    stderr and no traceback; nothing is left at the destination when it fails."""
    # One vector of each outcome, and every one whose error used to escape its class.
    chosen: dict[str, int] = {}
    for i, vec in enumerate(SPEC["vectors"]):
        if "surrogate" in vec["path"] or "kind" in vec["path"] or "empty" in vec["path"]:
            chosen[vec["path"]] = i
        chosen.setdefault(vec["expect"], i)
    picked = sorted(set(chosen.values()))
    assert {SPEC["vectors"][i]["expect"] for i in picked} == set(EXIT)

    def run(i: int) -> subprocess.CompletedProcess[str]:
        vec = SPEC["vectors"][i]
        return _cli(homes[vec["home"]], "unseal", str(VECTORS / vec["path"]), str(tmp_path / f"out-{i}"), cwd=tmp_path)

    with ThreadPoolExecutor(8) as pool:  # one process per vector: in parallel
        results = list(pool.map(run, picked))
    for i, res in zip(picked, results, strict=True):
        vec, out = SPEC["vectors"][i], tmp_path / f"out-{i}"
        assert res.returncode == EXIT[vec["expect"]], (vec["path"], res.stderr)
        if res.returncode:
            assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
            assert "codec" not in res.stderr, res.stderr  # no raw UnicodeError text
            assert not out.exists()


def test_empty_plaintext_tag_is_authenticated(homes: dict[str, Path], tmp_path: Path) -> None:
    """The bug of issue 11: an L = 0 file (or an empty blob) with a flipped or zeroed tag
    used to unseal. Both exit 3 now, and the intact ones unseal to empty files."""
    for name in ("spec-empty-flipped-tag.mseal", "spec-empty-zeroed-tag.mseal"):
        res = _cli(homes["home"], "unseal", str(VECTORS / name), str(tmp_path / name), cwd=tmp_path)
        assert res.returncode == 3 and "corrupted" in res.stderr
    for name in ("spec-folder-empty-blob-flipped.sealed", "spec-folder-empty-blob-zeroed.sealed"):
        res = _cli(homes["home"], "unseal", str(VECTORS / name), str(tmp_path / name), cwd=tmp_path)
        assert res.returncode == 3 and not (tmp_path / name).exists()
    res = _cli(homes["home"], "unseal", str(VECTORS / "ok-empty.mseal"), str(tmp_path / "e"), cwd=tmp_path)
    assert res.returncode == 0 and (tmp_path / "e").read_bytes() == b""
    res = _cli(homes["home"], "unseal", str(VECTORS / "spec-ok-folder.sealed"), str(tmp_path / "f"), cwd=tmp_path)
    assert res.returncode == 0 and (tmp_path / "f" / "empty").read_bytes() == b""


def test_rewrap_refusals_exit_7(homes: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Section 10 lists exit 7 for the two rewrap refusals: the generation counter at
    2^64 - 1, and recipients that do not fit the slot. Nothing is written either time."""
    gen = tmp_path / "gen.mseal"
    shutil.copy(VECTORS / "spec-generation-max.mseal", gen)
    before = gen.read_bytes()
    res = _cli(homes["home"], "rewrap", str(gen), cwd=tmp_path)
    assert res.returncode == 7 and "generation" in res.stderr, res.stderr
    assert gen.read_bytes() == before
    keys = _service(homes["home"], monkeypatch)
    small = tmp_path / "small.mseal"
    shutil.copy(VECTORS / "ok-small.mseal", small)  # slot_size 1024; a local recipient takes 81 bytes
    names = [f"fill-{i:02d}" for i in range(14)]  # 14 * 81 + 41 bytes > 1024
    for n in names:
        keys.create(f"local:{n}")
    before = small.read_bytes()
    with pytest.raises(StorageError, match="do not fit"):
        modelseal.rewrap(small, key=[f"local:{n}" for n in names], keys=keys)
    assert small.read_bytes() == before
    assert StorageError.exit_code == 7


def test_verify_checks_the_chunk_table(tmp_path: Path) -> None:
    """A verifier compares the signature file's chunk tables with the chunks it hashed:
    a wrong, missing or extra table is refused (exit 10), by ``verify`` as on load."""
    from modelseal.errors import VerificationError
    from modelseal.signing.signers import VerifyKey
    from modelseal.signing.trust import TrustPolicy
    from modelseal.signing.verification import verify_artifact

    policy = TrustPolicy.from_keys([VerifyKey.from_file(VECTORS / "signing-ed25519.pub")])
    for case in SPEC["signatures"]:
        work = tmp_path / case["signature"]
        work.mkdir()
        art = work / "spec-signed.mseal"
        shutil.copy(VECTORS / "spec-signed.mseal", art)
        shutil.copy(VECTORS / case["signature"], work / "spec-signed.mseal.msig")
        for deep in (True, False):
            if case["verify_exit"] == 0:
                assert verify_artifact(art, policy, deep=deep).name == "spec-signed"
            else:
                # Deep: the chunks were hashed, so the table itself is refused. Lazy: the
                # table stands in for the chunks and must hash to the signed digest.
                with pytest.raises(VerificationError, match="chunk table" if deep else None) as info:
                    verify_artifact(art, policy, deep=deep)
                assert info.value.exit_code == case["verify_exit"]
        pub = str(VECTORS / "signing-ed25519.pub")
        res = _cli(tmp_path, "verify", str(art), "--public-key", pub, cwd=work)
        assert res.returncode == case["verify_exit"], (case, res.stderr)


def test_extra_blob_opens_but_does_not_verify(tmp_path: Path) -> None:
    """Section 8: open never lists blobs/, so an unreferenced blob does not stop it; a
    verifier covers every file of the folder, so a signed folder with one is refused."""
    from modelseal.errors import VerificationError
    from modelseal.signing.commitment import sealed_members

    members = sealed_members(VECTORS / "spec-folder-extra-blob.sealed")
    assert len([m for m in members if m.startswith("blobs/")]) == 3  # two referenced, one extra
    vec = next(v for v in SPEC["vectors"] if v["path"] == "spec-folder-extra-blob.sealed")
    assert vec["verify_exit"] == VerificationError.exit_code


def test_maximal_header_and_the_read_window() -> None:
    """read_raw parses the largest header the bounds allow: a core of 135,565 bytes at
    most (this vector: 135,539, the suite being 38 bytes, not 64), slots ending at 172,032."""
    path = VECTORS / "spec-ok-maximal-header.mseal"
    src = FdSource(os.open(path, os.O_RDONLY))
    try:
        raw = read_raw(src)
    finally:
        src.close()
    assert (len(raw.core.raw), raw.core.slots_offset, raw.core.payload_offset) == (135_539, 139_264, 172_032)
    assert raw.core.slot_size == 16384 and any(raw.slots[0]) and not any(raw.slots[1])
    assert len(raw.core.raw) + 64 - 38 == 135_565 < 160 * 1024 < 172_032 < MAX_HEADER
    assert "135,565" in FORMAT_MD and "172,032" in FORMAT_MD
    with pytest.raises(DecryptionError):
        parse_core(path.read_bytes()[:135_000])  # a header cut short is a header failure


def test_spec_states_the_payload_offset_of_every_vector() -> None:
    """Section 6's formula (slots_offset + 2 * slot_size, slots_offset the core's end
    rounded up to 4096; kind 3: the core's end) holds for every vector, old and new."""
    assert "payload_offset = slots_offset + 2 * slot_size" in FORMAT_MD
    seen = 0
    for path in sorted(VECTORS.rglob("*")):
        if not path.is_file() or path.read_bytes()[:8] != b"\x89MSEAL\r\n":
            continue
        try:
            core = parse_core(path.read_bytes())
        except ModelsealError:
            continue
        end = len(core.raw)
        slots = end if core.slot_size == 0 else -(-end // 4096) * 4096
        assert core.payload_offset == slots + 2 * core.slot_size
        seen += 1
    assert seen > 50


def test_spec_names_every_exit_code_of_the_error_tree() -> None:
    """Section 10 lists every exit code an artifact command can give, 7 included."""
    section = FORMAT_MD.split("## 10. Error classes", 1)[1].split("\n## ", 1)[0]
    codes = {int(c) for c in re.findall(r"\| (\d+) \|\n", section)}
    assert {3, 4, 5, 6, 7, 10, 11, 12} <= codes
    assert StorageError.exit_code == 7 and FormatError.exit_code == 4


def test_vector_keystore_is_refused_until_private(tmp_path: Path) -> None:
    """The documented rough edge: a checkout's keystore is 0644 (git keeps no modes) and
    the CLI refuses it with the chmod to run; the documented copy-and-chmod opens it."""
    home = tmp_path / "h"
    shutil.copytree(VECTORS / "home", home)
    (home / "keystore.json").chmod(0o644)
    res = _cli(home, "unseal", str(VECTORS / "ok-small.mseal"), str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 6 and "chmod 600" in res.stderr
    (home / "keystore.json").chmod(0o600)
    res = _cli(home, "unseal", str(VECTORS / "ok-small.mseal"), str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    readme = (VECTORS / "README.md").read_text(encoding="utf-8")
    assert "chmod 600" in readme
