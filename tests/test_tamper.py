"""Bad input: every corruption gives the documented error and leaks no plaintext."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import modelseal
from modelseal.errors import ArtifactError, DecryptionError, FormatError, KeyProviderError
from modelseal.format.file import read_raw
from modelseal.format.header import MAGIC, TAG_LEN
from modelseal.format.source import FdSource

from .conftest import Env, make_model_folder

C = 1 << 20


def _seal(env: Env, name: str, data: bytes, **kw: object) -> Path:
    src = env.work / f"{name}.bin"
    src.write_bytes(data)
    dst = env.work / f"{name}.sealed"
    modelseal.seal(src, dst, key="test-kek", keys=env.svc, **kw)  # type: ignore[arg-type]
    return dst


def _read_all(env: Env, path: Path) -> bytes:
    with modelseal.open(path, keys=env.svc) as r:
        return r.read()


def _slots_at(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_raw(FdSource(fd, owns=False)).core.slots_offset
    finally:
        os.close(fd)


def _layout(path: Path) -> tuple[int, int, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = read_raw(FdSource(fd, owns=False))
    finally:
        os.close(fd)
    return len(raw.core.raw), raw.core.payload_offset, raw.core.slot_size


def _flip(path: Path, offset: int, out: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    out.write_bytes(bytes(data))
    return out


def test_every_header_bit_flip_fails(env: Env) -> None:
    sealed = _seal(env, "h", os.urandom(3000), context={"env": "dev"})
    core_len, payload_off, slot = _layout(sealed)
    target = env.work / "t.sealed"
    # Every byte of the core header and of the active slot's used part, one flip each.
    for off in range(core_len):
        _flip(sealed, off, target)
        with pytest.raises(ArtifactError) as ei:
            _read_all(env, target)
        if off < len(MAGIC) + 2 + 1 + 38:  # magic, version, suite: "not sealed"/"unsupported"
            assert isinstance(ei.value, FormatError | DecryptionError)
        else:
            assert type(ei.value) is DecryptionError, off
    # The recipient slot cannot be authenticated before a key is found: a flip in a
    # recipient's scheme, key id or version shows as "key unavailable"; anywhere else
    # (generation, wrapped key, slot MAC, padding) as a decryption failure.
    outcomes = set()
    slots = _slots_at(sealed)
    for off in range(core_len, slots, 97):  # zero alignment padding before the slots
        _flip(sealed, off, target)
        with pytest.raises(DecryptionError):
            _read_all(env, target)
    for off in range(slots, slots + slot, 3):
        _flip(sealed, off, target)
        try:
            _read_all(env, target)
        except DecryptionError:
            outcomes.add("decryption")
        except KeyProviderError:
            outcomes.add("key")
        else:
            raise AssertionError(f"a flip at {off} went unnoticed")
    assert outcomes == {"decryption", "key"}
    assert payload_off == slots + 2 * slot and slots % 4096 == 0


def test_inactive_slot_damage_is_ignored_but_reported(env: Env) -> None:
    """Slot B is where a rewrap writes; a torn write there must not make the artifact
    unreadable, so a damaged inactive slot is skipped (it cannot change the plaintext)
    and ``inspect`` reports it."""
    data = os.urandom(3000)
    sealed = _seal(env, "b", data)
    _, _, slot = _layout(sealed)
    base = _slots_at(sealed)
    assert modelseal.inspect(sealed)["inactive_slot"] == "empty"
    target = env.work / "t.sealed"
    for off in (base + slot, base + slot + 9, base + 2 * slot - 1):
        _flip(sealed, off, target)
        assert _read_all(env, target) == data
        assert modelseal.inspect(target)["inactive_slot"] == "damaged"


def test_magic_and_version_give_format_error(env: Env) -> None:
    sealed = _seal(env, "m", b"hello")
    for off in (0, 3, 7, 8, 9):
        with pytest.raises(FormatError):
            _read_all(env, _flip(sealed, off, env.work / "x.sealed"))


@pytest.mark.parametrize("where", ["first-tag", "mid-chunk", "last-byte", "second-chunk"])
def test_payload_bit_flip_fails_on_read_not_open(env: Env, where: str) -> None:
    sealed = _seal(env, "p", os.urandom(2 * C + 100))
    _, off, _ = _layout(sealed)
    pos = {
        "first-tag": off + C + 3,
        "mid-chunk": off + 500,
        "last-byte": sealed.stat().st_size - 1,
        "second-chunk": off + C + TAG_LEN + 7,
    }[where]
    target = _flip(sealed, pos, env.work / "t.sealed")
    r = modelseal.open(target, keys=env.svc)  # the header is intact: opening works
    with pytest.raises(DecryptionError):
        r.read()
    r.close()


def test_failed_chunk_never_leaks_partial_plaintext(env: Env) -> None:
    data = os.urandom(3 * C)
    sealed = _seal(env, "leak", data)
    _, off, _ = _layout(sealed)
    target = _flip(sealed, off + 2 * (C + TAG_LEN) + 10, env.work / "t.sealed")
    buf = bytearray(b"\xaa" * (3 * C))
    with modelseal.open(target, keys=env.svc) as r, pytest.raises(DecryptionError):
        r.preadinto(0, buf)
    assert buf == bytes(3 * C)  # zeroed, not the good chunks and not unauthenticated bytes


@pytest.mark.parametrize("cut", [1, 15, 16, 17, 1000, "payload", "header", "slots"])
def test_truncation(env: Env, cut: object) -> None:
    sealed = _seal(env, "tr", os.urandom(C + 50))
    core_len, off, _ = _layout(sealed)
    data = sealed.read_bytes()
    if cut == "payload":
        n = off
    elif cut == "header":
        n = core_len - 10
    elif cut == "slots":
        n = core_len + 100
    else:
        assert isinstance(cut, int)
        n = len(data) - cut
    target = env.work / "t.sealed"
    target.write_bytes(data[:n])
    with pytest.raises(DecryptionError):
        _read_all(env, target)


def test_empty_and_garbage_files_are_not_sealed(env: Env) -> None:
    empty = env.work / "empty.sealed"
    empty.write_bytes(b"")
    with pytest.raises(FormatError):
        _read_all(env, empty)
    junk = env.work / "junk.sealed"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(FormatError):
        _read_all(env, junk)
    short = env.work / "short.sealed"
    short.write_bytes(MAGIC)
    with pytest.raises(ArtifactError):
        _read_all(env, short)


def test_appended_bytes(env: Env) -> None:
    sealed = _seal(env, "ap", os.urandom(100))
    with open(sealed, "ab") as f:
        f.write(b"\x00")
    with pytest.raises(DecryptionError):
        _read_all(env, sealed)


def _chunks(path: Path) -> tuple[bytes, list[bytes]]:
    _, off, _ = _layout(path)
    data = path.read_bytes()
    head, body = data[:off], data[off:]
    size = C + TAG_LEN
    return head, [body[i : i + size] for i in range(0, len(body), size)]


def test_swapped_and_duplicated_chunks(env: Env) -> None:
    sealed = _seal(env, "sw", os.urandom(3 * C))
    head, chunks = _chunks(sealed)
    assert len(chunks) == 3
    target = env.work / "t.sealed"
    target.write_bytes(head + chunks[1] + chunks[0] + chunks[2])
    with pytest.raises(DecryptionError):
        _read_all(env, target)
    target.write_bytes(head + chunks[0] + chunks[0] + chunks[2])
    with pytest.raises(DecryptionError):
        _read_all(env, target)
    # Dropping the final chunk and relabelling is impossible: the length no longer matches.
    target.write_bytes(head + chunks[0] + chunks[1])
    with pytest.raises(DecryptionError):
        _read_all(env, target)


def test_chunk_and_header_from_another_file(env: Env) -> None:
    a = _seal(env, "a", os.urandom(2 * C))
    b = _seal(env, "b", os.urandom(2 * C))  # same key, same size, same layout
    head_a, chunks_a = _chunks(a)
    head_b, chunks_b = _chunks(b)
    target = env.work / "t.sealed"
    target.write_bytes(head_a + chunks_a[0] + chunks_b[1])
    with pytest.raises(DecryptionError):
        _read_all(env, target)
    target.write_bytes(head_b + b"".join(chunks_a))
    with pytest.raises(DecryptionError):
        _read_all(env, target)


def test_folder_blob_swap_and_cross_folder_manifest(env: Env) -> None:
    model = make_model_folder(env.work / "model", big=5000)
    s1, s2 = env.work / "s1", env.work / "s2"
    modelseal.seal(model, s1, key="test-kek", keys=env.svc)
    modelseal.seal(model, s2, key="test-kek", keys=env.svc)
    blobs = sorted((s1 / "blobs").iterdir())
    # Swap two blobs' contents within the folder.
    a, b = blobs[0].read_bytes(), blobs[1].read_bytes()
    blobs[0].write_bytes(b)
    blobs[1].write_bytes(a)
    with modelseal.open_folder(s1, keys=env.svc) as f:
        failures = 0
        for path in f:
            try:
                f.read(path)
            except DecryptionError:
                failures += 1
        assert failures == 2
    # A manifest from another folder does not open these blobs.
    t = env.work / "t"
    shutil.copytree(s2, t)
    shutil.copy(s1 / "manifest.mseal", t / "manifest.mseal")
    with modelseal.open_folder(t, keys=env.svc) as f, pytest.raises(DecryptionError):
        f.read("config.json")
    # A deleted blob.
    shutil.rmtree(t)
    shutil.copytree(s2, t)
    next((t / "blobs").iterdir()).unlink()
    with pytest.raises(DecryptionError):
        modelseal.unseal(t, env.work / "out", keys=env.svc)
    assert not (env.work / "out").exists()


def test_wrong_passphrase_and_wrong_key(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelseal.errors import KeyNotFound, KeystoreError
    from modelseal.keys import keystore

    sealed = _seal(env, "w", b"secret weights")
    keystore.clear_cache()
    monkeypatch.setenv("MODELSEAL_PASSPHRASE", "wrong")
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        _read_all(env, sealed)
    # A different keystore whose key has the same name: the wrap does not open.
    keystore.clear_cache()
    other = env.work / "otherhome"
    monkeypatch.setenv("MODELSEAL_HOME", str(other))
    monkeypatch.setenv("MODELSEAL_PASSPHRASE", "p2")
    keystore.create(keystore.keystore_path(other), b"p2", scrypt_log2_n=14)
    from modelseal.keys.service import KeyService

    svc = KeyService()
    with pytest.raises(KeyNotFound):
        modelseal.open(sealed, keys=svc)
    svc.create("test-kek")
    with pytest.raises(DecryptionError):
        modelseal.open(sealed, keys=svc)


def test_context_cannot_be_changed(env: Env) -> None:
    sealed = _seal(env, "c", b"x" * 100, context={"env": "dev"})
    data = sealed.read_bytes()
    i = data.index(b"dev")
    target = env.work / "t.sealed"
    target.write_bytes(data[:i] + b"prd" + data[i + 3 :])
    with pytest.raises(DecryptionError):
        _read_all(env, target)
