"""``sealed::`` — an fsspec filesystem that decrypts sealed files over any fsspec filesystem.

    fsspec.open("sealed::file:///data/train.csv.sealed")
    fsspec.open("sealed::s3://bucket/train.parquet.sealed", s3={...})
    pandas.read_parquet("sealed::file:///data/train.parquet.sealed")

Registered under the ``fsspec.specs`` entry point. Read-only. Files opened
through it are seekable and read at random: only the chunks a read spans are
fetched and decrypted. ``info``/``ls`` report plaintext sizes (from the public
header, no key needed). Keys come from the same providers as everywhere
(``KeyService``), optionally passed as ``keys=``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, ClassVar

from fsspec import AbstractFileSystem, filesystem
from fsspec.implementations.chained import ChainedFileSystem
from fsspec.implementations.local import LocalFileSystem

from modelseal.errors import FormatError, VerificationError
from modelseal.format.file import RawArtifact, SealedReader, open_keys, read_raw
from modelseal.format.header import KIND_FILE
from modelseal.format.source import CipherSource, FdSource, FileObjSource
from modelseal.keys.service import KeyService
from modelseal.recipes.context import EXPECTED_NAME, key_service, trust_policy, unwrapper
from modelseal.signing.commitment import FILE_PATH
from modelseal.signing.sigfile import MAX_SIGFILE, SignatureFile
from modelseal.signing.verification import verify_single
from modelseal.util.files import open_regular

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

    def _source(self, path: str) -> CipherSource:
        if isinstance(self.fs, LocalFileSystem):
            return FdSource(open_regular(self.fs._strip_protocol(path)))  # pread: parallel chunk reads
        return FileObjSource(self.fs.open(path, "rb", block_size=_BUFFER, cache_type="none"))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> io.BufferedReader:
        if mode != "rb":
            raise NotImplementedError("sealed:: is read-only; seal files with modelseal.seal")
        src = self._source(path)
        try:
            raw = read_raw(src)
            if raw.core.kind != KIND_FILE:
                raise FormatError(f"{path} is not a sealed file")
            table = self._verify(path, src, raw)
            opened = open_keys(raw, unwrapper(self._keys or key_service(), raw), src)
            reader = SealedReader(src, raw, opened.keys, name=path, chunk_hashes=table)
        except BaseException:
            src.close()
            raise
        return io.BufferedReader(reader, buffer_size=_BUFFER)

    def _verify(self, path: str, src: CipherSource, raw: RawArtifact) -> bytes | None:
        """Verify-on-load, as ``modelseal.open`` does, with the signature file ``PATH.msig``
        fetched from the same backend: the signed chunk table, or None without a policy."""
        policy = trust_policy(self._keys)
        if policy is None:
            return None
        sig_path = path + ".msig"
        sf = None
        if self.fs.exists(sig_path):
            with self.fs.open(sig_path, "rb") as f:
                data = f.read(MAX_SIGFILE + 1)
            if len(data) > MAX_SIGFILE:
                raise VerificationError(f"{sig_path} is too large")
            sf = SignatureFile.parse(data)
        verdict = verify_single(path, src, raw, sf, policy, expect_name=EXPECTED_NAME.get())
        return verdict.tables.get(FILE_PATH)

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
