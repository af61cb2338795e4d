"""``modelseal scan`` finds backups in clear (kind ``unencrypted-backup``, docs/scan.md): a
backup part's plaintext whatever its name, a backup folder's part file that is not
ciphertext, a raft snapshot and database dumps by their first bytes; and leaves alone a
sealed part, ordinary archives and near misses."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import sqlite3
import subprocess
import tarfile
from pathlib import Path

import pytest

import modelseal
from modelseal.cli import main
from modelseal.recovery.partcodec import encode_files, header_line
from modelseal.telemetry.scanbackup import is_raft_snapshot

from .conftest import Env


def _tar_gz(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


RAFT_META = (
    json.dumps(
        {
            "Version": 1,
            "ID": "bolt-snapshot",
            "Index": 29,
            "Term": 3,
            "Peers": None,
            "Configuration": {"Servers": [{"Suffrage": 0, "ID": "node1", "Address": "127.0.0.1:8201"}]},
            "ConfigurationIndex": 1,
            "Size": 5,
        }
    ).encode()
    + b"\n"
)


def _scan(root: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    assert main(["scan", str(root), "--json", "--fail-on", "1000"]) == 0
    doc = json.loads(capsys.readouterr().out)
    return {
        Path(f["location"]).relative_to(root).as_posix(): f["detail"]
        for f in doc["findings"]
        if f["kind"] == "unencrypted-backup"
    }


def test_backups_in_clear_are_found(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = env.work / "tree"
    (root / "backups" / "b-0001" / "parts").mkdir(parents=True)
    part = encode_files("config", {"config.toml": (b'host_env = "prod"\n', 0o600)})
    (root / "notes.txt").write_bytes(part)  # a plaintext part, renamed
    (root / "sql.part").write_bytes(header_line("registry", "sql", schema="registry") + b"[]\n")
    parts = root / "backups" / "b-0001" / "parts"
    (parts / "keystore.mseal").write_bytes(b'{"format": "modelseal-keystore/1"}')  # not ciphertext
    src = env.work / "plain.bin"
    src.write_bytes(b"sealed part bytes" * 100)
    modelseal.seal(src, parts / "registry.mseal", key="local:test-kek")  # a sealed part: ciphertext
    (root / "backups" / "b-0001" / "manifest.json").write_text("{}")
    (root / "raft.snap").write_bytes(_tar_gz({"meta.json": RAFT_META, "state.bin": b"state"}))
    (root / "pg.dump").write_bytes(b"PGDMP\x01\x0e\x00\x04\x08\x01\x01\x01" + b"\x00" * 64)
    db = sqlite3.connect(env.work / "x.db")
    db.execute("CREATE TABLE t (a TEXT)")
    db.execute("INSERT INTO t VALUES ('secret-row')")
    db.commit()
    (root / "iterdump.sql").write_text("\n".join(db.iterdump()))
    if shutil.which("sqlite3"):
        dump = subprocess.run(["sqlite3", str(env.work / "x.db"), ".dump"], capture_output=True, check=True).stdout
        (root / "cli.sql").write_bytes(dump)
    # Near misses: an ordinary tar.gz, a gzip of JSON, a JSON document naming the header key later.
    (root / "models.tar.gz").write_bytes(_tar_gz({"config.json": b"{}", "meta.json": b'{"Index": 1}'}))
    (root / "json.gz").write_bytes(gzip.compress(RAFT_META))
    (root / "doc.json").write_text('{"name": "x", "modelseal-backup-part": 1}')
    (root / "readme.md").write_text("-- PostgreSQL notes\n")

    found = _scan(root, capsys)
    expected = {"notes.txt", "sql.part", "backups/b-0001/parts/keystore.mseal", "raft.snap", "pg.dump", "iterdump.sql"}
    if shutil.which("sqlite3"):
        expected.add("cli.sql")
    assert set(found) == expected
    assert "backup part (config)" in found["notes.txt"] and "backup part (registry)" in found["sql.part"]
    assert "not modelseal ciphertext" in found["backups/b-0001/parts/keystore.mseal"]
    assert "raft snapshot" in found["raft.snap"] and "pg_dump" in found["pg.dump"]
    # The exit code follows --fail-on as for every finding.
    assert main(["scan", str(root / "notes.txt")]) == 19
    assert "unencrypted-backup" in capsys.readouterr().out


def test_the_raft_check_reads_only_a_prefix() -> None:
    snap = _tar_gz({"meta.json": RAFT_META, "state.bin": bytes(1 << 20)})
    assert is_raft_snapshot(snap[:4096])
    assert not is_raft_snapshot(b"\x1f\x8b\x08" + b"\x00" * 50)  # a broken stream
    assert not is_raft_snapshot(_tar_gz({"meta.json": b'{"ID": "x"}'}))


def test_backups_compressed_tarred_or_reencoded_are_found(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 10: a plaintext part or dump inside gzip, xz, bzip2, a tar (first member) or a
    .tgz, after a byte order mark or a blank line, with CRLF lines, and pg_dumpall's banner; a
    raft snapshot's tar without its gzip. Near misses (an ordinary tar.gz) stay unreported."""
    import bz2
    import lzma

    root = tmp_path / "loot"
    root.mkdir()
    part = encode_files("keystore", {"keystore.json": (b'{"format": "modelseal-keystore/1"}', 0o600)})
    plain_tar = io.BytesIO()
    with tarfile.open(fileobj=plain_tar, mode="w") as t:
        info = tarfile.TarInfo("meta.json")
        info.size = len(RAFT_META)
        t.addfile(info, io.BytesIO(RAFT_META))
    files = {
        "part.gz": gzip.compress(part),
        "part.xz": lzma.compress(part),
        "part.bz2": bz2.compress(part),
        "backup.tar.gz": _tar_gz({"parts/keystore": part}),
        "bom.dat": b"\xef\xbb\xbf" + part,
        "blank.dat": b"\r\n\n" + part,
        "crlf.sql": b"--\r\n-- PostgreSQL database dump\r\n--\r\n",
        "all.sql": b"--\n-- PostgreSQL database cluster dump\n--\n\nSET default_transaction_read_only = off;\n",
        "dump.sql.xz.tar": b"",
        "raft.tar": plain_tar.getvalue(),
        "model.tar.gz": _tar_gz({"config.json": b"{}", "model.safetensors": b"\x00" * 64}),
        "notes.txt.gz": gzip.compress(b"-- PostgreSQL notes\n"),
    }
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w", format=tarfile.PAX_FORMAT) as t:  # a pax header first
        data = lzma.compress(b"PRAGMA foreign_keys=OFF;\r\nBEGIN TRANSACTION;\r\nCREATE TABLE x(a);\r\n")
        info = tarfile.TarInfo("d" * 120 + ".sql.xz")  # a long name: pax extended header
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    files["dump.sql.xz.tar"] = inner.getvalue()
    for name, data in files.items():
        (root / name).write_bytes(data)
    found = _scan(root, capsys)
    assert set(found) == set(files) - {"model.tar.gz", "notes.txt.gz"}
    assert "backup part (keystore)" in found["backup.tar.gz"] and "raft snapshot" in found["raft.tar"]
    assert "pg_dumpall" in found["all.sql"] and "sqlite3 .dump" in found["dump.sql.xz.tar"]
