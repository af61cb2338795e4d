"""``sealed::`` — an fsspec filesystem that decrypts sealed files over any fsspec filesystem.

    fsspec.open("sealed::file:///data/train.csv.sealed")
    fsspec.open("sealed::s3://bucket/train.parquet.sealed", s3={...})
    pandas.read_parquet("sealed::file:///data/train.parquet.sealed")

Registered under the ``fsspec.specs`` entry point. Read-only. Files opened
through it are seekable and read at random: only the chunks a read spans are
fetched and decrypted. ``info``/``ls`` report plaintext sizes (from the public
header, no key needed). Keys come from the same providers as everywhere
(``KeyService``), optionally passed as ``keys=``.

A local file (``file://``, or a ``dir::`` over it) is opened non-blocking and must be a
regular file, checked on the opened descriptor: a FIFO planted in place of an artifact or
its signature file fails at once instead of hanging the reader. Any other backend must
report the path as a ``file`` before it is opened.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from fsspec import AbstractFileSystem, filesystem
from fsspec.implementations.chained import ChainedFileSystem
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from modelseal.errors import FormatError, StorageError, VerificationError
from modelseal.format.file import RawArtifact, open_keys, read_raw
from modelseal.format.folder import MANIFEST_NAME
from modelseal.format.header import KIND_FILE
from modelseal.format.reader import SealedReader
from modelseal.format.source import CipherSource, FdSource, FileObjSource
from modelseal.keys.service import KeyService
from modelseal.loaders.common import split_member
from modelseal.recipes.context import EXPECTED_NAME, expected_env, key_service, trust_policy, unwrapper
from modelseal.signing.commitment import FILE_PATH
from modelseal.signing.sigfile import MAX_SIGFILE, SignatureFile
from modelseal.signing.verification import check_env, verify_single
from modelseal.util.files import open_regular
from modelseal.util.hardening import harden_loader

_BUFFER = 1 << 20


class SealedFileSystem(ChainedFileSystem):  # type: ignore[misc]
    protocol: ClassVar[str] = "sealed"
    root_marker = ""

    def __init__(
        self,
        target_protocol: str | None = None,
        target_options: dict[str, Any] | None = None,
        fs: AbstractFileSystem | None = None,
        keys: KeyService | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("fo", None)
        super().__init__(**kwargs)
        self.fs = fs if fs is not None else filesystem(target_protocol or "file", **(target_options or {}))
        self._keys = keys

    def _local_path(self, path: str) -> str | None:
        """The OS path behind ``path`` when the backend is the local file system."""
        fs: Any = self.fs
        if isinstance(fs, DirFileSystem) and isinstance(fs.fs, LocalFileSystem):
            return str(fs.fs._strip_protocol(fs._join(path)))
        if isinstance(fs, LocalFileSystem):
            return str(fs._strip_protocol(path))
        return None

    def _open_remote(self, path: str, **kwargs: Any) -> BinaryIO:
        if self.fs.info(path).get("type", "file") != "file":
            raise StorageError(f"{path} is not a regular file")
        f: BinaryIO = self.fs.open(path, "rb", **kwargs)
        return f

    def _source(self, path: str) -> CipherSource:
        local = self._local_path(path)
        if local is not None:
            return FdSource(open_regular(local))  # pread: parallel chunk reads
        return FileObjSource(self._open_remote(path, block_size=_BUFFER, cache_type="none"))

    def _read_small(self, path: str, limit: int) -> bytes:
        local = self._local_path(path)
        if local is None:
            with self._open_remote(path) as f:
                return f.read(limit)
        fd = open_regular(local)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read(limit)
        finally:
            os.close(fd)

    def _refuse_inside_sealed_folder(self, path: str) -> None:
        """A file below a sealed folder is either a blob or planted there: never read it as an
        artifact of its own (members are read through the manifest, by ``modelseal``'s loaders)."""
        local = self._local_path(path)
        if local is not None:
            root, member = split_member(Path(local))
            found = str(root) if member is not None else None
        else:
            parts = str(self.fs._strip_protocol(path)).rstrip("/").split("/")
            found = next(
                (
                    p
                    for p in ("/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
                    if self.fs.exists(f"{p}/{MANIFEST_NAME}")
                ),
                None,
            )
        if found is not None:
            raise FormatError(f"{path} is inside the sealed folder {found}: sealed:: reads sealed files only")

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> io.BufferedReader:
        if mode != "rb":
            raise NotImplementedError("sealed:: is read-only; seal files with modelseal.seal")
        harden_loader()
        self._refuse_inside_sealed_folder(path)
        src = self._source(path)
        try:
            raw = read_raw(src)
            if raw.core.kind != KIND_FILE:
                raise FormatError(f"{path} is not a sealed file")
            env = expected_env(self._keys)  # expecting(env=), else config.toml's host_env
            check_env(dict(raw.core.context).get("env", ""), env, path)
            table = self._verify(path, src, raw, env)
            opened = open_keys(raw, unwrapper(self._keys or key_service(), raw), src)
            reader = SealedReader(src, raw, opened.keys, name=path, chunk_hashes=table)
        except BaseException:
            src.close()
            raise
        return io.BufferedReader(reader, buffer_size=_BUFFER)

    def _verify(self, path: str, src: CipherSource, raw: RawArtifact, env: str | None = None) -> bytes | None:
        """Verify-on-load, as ``modelseal.open`` does, with the signature file ``PATH.msig``
        fetched from the same backend: the signed chunk table, or None without a policy."""
        policy = trust_policy(self._keys)
        if policy is None:
            return None
        sig_path = path + ".msig"
        sf = None
        local = self._local_path(path)
        if local is not None:  # a local file: the pending signature file of a crash counts, as for modelseal.open
            sf = SignatureFile.load(Path(local + ".msig"))
        elif self.fs.exists(sig_path):
            data = self._read_small(sig_path, MAX_SIGFILE + 1)
            if len(data) > MAX_SIGFILE:
                raise VerificationError(f"{sig_path} is too large")
            sf = SignatureFile.parse(data)
        verdict = verify_single(path, src, raw, sf, policy, expect_name=EXPECTED_NAME.get(), expect_env=env)
        table: bytes | None = verdict.tables.get(FILE_PATH)
        return table

    def _plain_size(self, path: str) -> int:
        src = self._source(path)
        try:
            return read_raw(src).core.plaintext_length
        finally:
            src.close()

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        out = dict(self.fs.info(path, **kwargs))
        if out.get("type") == "file":
            out["size"] = self._plain_size(path)
        return out

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        entries = self.fs.ls(path, detail=True, **kwargs)
        if not detail:
            return [e["name"] for e in entries]
        out = []
        for e in entries:
            e = dict(e)
            if e.get("type") == "file":
                with contextlib.suppress(FormatError):  # not a sealed file: listed as it is
                    e["size"] = self._plain_size(e["name"])
            out.append(e)
        return out

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        with self._open(path) as f:
            size = f.raw.size  # type: ignore[attr-defined]
            lo = 0 if start is None else (start if start >= 0 else max(0, size + start))
            hi = size if end is None else (end if end >= 0 else max(0, size + end))
            return f.raw.pread(lo, max(0, hi - lo))  # type: ignore[attr-defined,no-any-return]
