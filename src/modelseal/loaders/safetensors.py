"""Load sealed safetensors files (and sealed folders of shards) straight into memory.

Drop-in counterparts of ``safetensors.safe_open`` and ``safetensors.*.load_file``.
The safetensors header (tensor index and ``__metadata__``) lives inside the
sealed payload, so it is encrypted and authenticated like the weights. Each
tensor is allocated at its final size and its bytes are decrypted into it,
touching only the chunks that tensor (or slice) spans: there is no plaintext
copy of the whole file, in memory or on disk.

The header is validated completely before anything is allocated: sizes, dtypes,
shapes, and offsets that tile the data area exactly (no gaps, no overlaps).
"""

from __future__ import annotations

import math
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from modelseal.errors import FormatError
from modelseal.keys.service import KeyService
from modelseal.loaders.common import RandomAccess, open_folder_any, open_member, resolve_member
from modelseal.util.bounded import json_loads
from modelseal.util.hardening import dont_dump, prefer_huge_pages

MAX_HEADER = 100_000_000  # the limit the safetensors format itself sets
# What the JSON parser may allocate: about 125,000 two-dimensional tensors. Checked before
# parsing, with the nesting the schema allows ({name: {"shape": [...]}}), in linear time.
MAX_HEADER_VALUES = 1_000_000
_HEADER_DEPTH = 3

# safetensors dtype -> (numpy dtype name or None, item size, torch dtype attribute or None)
DTYPES: dict[str, tuple[str | None, int, str | None]] = {
    "F64": ("float64", 8, "float64"),
    "F32": ("float32", 4, "float32"),
    "F16": ("float16", 2, "float16"),
    "BF16": (None, 2, "bfloat16"),
    "F8_E4M3": (None, 1, "float8_e4m3fn"),
    "F8_E5M2": (None, 1, "float8_e5m2"),
    "I64": ("int64", 8, "int64"),
    "I32": ("int32", 4, "int32"),
    "I16": ("int16", 2, "int16"),
    "I8": ("int8", 1, "int8"),
    "U64": ("uint64", 8, "uint64"),
    "U32": ("uint32", 4, "uint32"),
    "U16": ("uint16", 2, "uint16"),
    "U8": ("uint8", 1, "uint8"),
    "BOOL": ("bool", 1, "bool"),
}

INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX = 64 << 20  # a weight map of about a million tensors

# Smaller tensors share heap pages with everything else: marking each would split the
# process's memory map into thousands of areas (vm.max_map_count) for little gain.
DONTDUMP_MIN = 64 * 1024


class SafetensorsError(FormatError):
    """The plaintext is not a valid safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute plaintext offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SafetensorsError(f"duplicate key {k!r} in the safetensors header")
        out[k] = v
    return out


def _element_count(shape: list[int]) -> int | None:
    """The number of elements, or ``None`` once a dimension or the running product reaches
    2^63 (as the reference implementation's checked multiplication overflows): stopping
    early keeps it linear, where ``math.prod`` of many huge dimensions is quadratic."""
    count = 1
    for d in shape:
        if d >= 1 << 63:
            return None
        count *= d
        if count >= 1 << 63:
            return None
    return count


def parse_header(reader: RandomAccess, name: str = "") -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    """Read and validate the safetensors header of ``reader``'s plaintext."""
    head = bytearray(8)
    if reader.size < 8 or reader.preadinto(0, head) != 8:
        raise SafetensorsError(f"{name or 'artifact'} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > reader.size:
        raise SafetensorsError(f"{name or 'artifact'} is not a safetensors file (header length {n})")
    raw = bytearray(n)
    reader.preadinto(8, raw)
    doc = json_loads(
        bytes(raw),
        max_depth=_HEADER_DEPTH,
        max_values=MAX_HEADER_VALUES,
        error=lambda detail: SafetensorsError(f"{name or 'artifact'} is not a safetensors file ({detail})"),
        what="its header",
        object_pairs_hook=_no_duplicates,
    )
    if not isinstance(doc, dict):
        raise SafetensorsError("safetensors header is not a JSON object")
    meta = doc.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise SafetensorsError("safetensors __metadata__ must map strings to strings")
    data_start, data_len = 8 + n, reader.size - 8 - n
    tensors: list[TensorInfo] = []
    for tname, spec in doc.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"tensor {tname!r}: malformed entry")
        dtype, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsError(f"tensor {tname!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise SafetensorsError(f"tensor {tname!r}: invalid shape")
        if not (
            isinstance(offs, list)
            and len(offs) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise SafetensorsError(f"tensor {tname!r}: invalid data_offsets")
        begin, end = offs
        count = _element_count(shape)
        if count is None:
            raise SafetensorsError(f"tensor {tname!r}: a dimension or the element count is too large")
        if len(shape) > 64:  # numpy's limit (NPY_MAXDIMS); numpy and torch refuse more untyped
            raise SafetensorsError(f"tensor {tname!r}: more than 64 dimensions")
        if not 0 <= begin <= end <= data_len or count * DTYPES[dtype][1] != end - begin:
            raise SafetensorsError(f"tensor {tname!r}: shape and offsets disagree or leave the file")
        tensors.append(TensorInfo(tname, dtype, tuple(shape), data_start + begin, data_start + end))
    expected = data_start
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin != expected:
            raise SafetensorsError(f"tensor {t.name!r}: offsets overlap or leave a gap")
        expected = t.end
    if expected != reader.size:
        raise SafetensorsError("safetensors data area has trailing or missing bytes")
    return {t.name: t for t in tensors}, meta


def _alloc(info: TensorInfo, framework: str, shape: tuple[int, ...] | None = None) -> tuple[Any, memoryview]:
    """An uninitialised tensor of the right dtype and shape, and a byte view of its memory
    (left out of core dumps)."""
    tensor, view = _empty(info, framework, shape)
    if view.nbytes >= DONTDUMP_MIN:
        dont_dump(view)
        prefer_huge_pages(view)  # before the first touch: faults in 2 MiB steps, not 4 KiB
    return tensor, view


def _empty(info: TensorInfo, framework: str, shape: tuple[int, ...] | None) -> tuple[Any, memoryview]:
    shape = info.shape if shape is None else shape
    np_name, size, torch_name = DTYPES[info.dtype]
    if framework in ("pt", "torch"):
        import torch

        nbytes = math.prod(shape) * size
        flat = torch.empty(nbytes, dtype=torch.uint8)
        return flat.view(getattr(torch, str(torch_name))).reshape(shape), memoryview(cast(Any, flat.numpy()))
    if framework in ("np", "numpy"):
        import numpy as np

        if np_name is None:
            raise SafetensorsError(f"dtype {info.dtype} has no numpy equivalent; load with framework='pt'")
        arr: Any = np.empty(shape, dtype=np.dtype(np_name).newbyteorder("<"))
        return arr, memoryview(cast(Any, arr.reshape(-1).view(np.uint8)))
    raise ValueError(f"unsupported framework {framework!r} (use 'np' or 'pt')")


def _to_device(t: Any, framework: str, device: str) -> Any:
    if device in ("cpu", None):
        return t
    if framework in ("pt", "torch"):
        return t.to(device)
    raise ValueError(f"framework {framework!r} only loads to the cpu")


class _Shard:
    def __init__(self, reader: RandomAccess, name: str) -> None:
        self.reader = reader
        self.tensors, self.meta = parse_header(reader, name)

    def read_all(self, framework: str) -> dict[str, Any]:
        """Every tensor, in one parallel pass over the data area (no barrier per tensor)."""
        infos = sorted(self.tensors.values(), key=lambda t: t.begin)
        allocated = [(t, *_alloc(t, framework)) for t in infos]
        views = [view for _, _, view in allocated]
        if infos and hasattr(self.reader, "preadinto_many"):
            self.reader.preadinto_many(infos[0].begin, views, private=True)
        else:
            for t, _, view in allocated:
                if t.nbytes:
                    self.reader.preadinto(t.begin, view, private=True)
        return {t.name: tensor for t, tensor, _ in allocated}

    def read(self, info: TensorInfo, framework: str) -> Any:
        tensor, view = _alloc(info, framework)
        if info.nbytes:
            self.reader.preadinto(info.begin, view, private=True)  # a fresh tensor nobody sees yet
        return tensor


class TensorSlice:
    """``get_slice(name)[...]``: reads only the rows of dimension 0 the index needs."""

    def __init__(self, shard: _Shard, info: TensorInfo, framework: str, device: str) -> None:
        self._shard, self._info, self._framework, self._device = shard, info, framework, device

    def get_shape(self) -> list[int]:
        return list(self._info.shape)

    def get_dtype(self) -> str:
        return self._info.dtype

    def __getitem__(self, index: Any) -> Any:
        info = self._info
        idx = index if isinstance(index, tuple) else (index,)
        if not info.shape or not idx or isinstance(idx[0], bool) or not isinstance(idx[0], int | slice):
            tensor = self._shard.read(info, self._framework)
            return _to_device(tensor[index], self._framework, self._device)
        rows = info.shape[0]
        first = idx[0]
        if isinstance(first, int):
            r = first + rows if first < 0 else first
            if not 0 <= r < rows:
                raise IndexError(f"index {first} is out of range for dimension 0 of size {rows}")
            lo, hi, rest = r, r + 1, (0, *idx[1:])
        else:
            start, stop, step = first.indices(rows)
            if step < 0:
                tensor = self._shard.read(info, self._framework)
                return _to_device(tensor[index], self._framework, self._device)
            lo, hi = start, max(start, stop)
            rest = (slice(0, hi - lo, step), *idx[1:])
        row_bytes = (info.nbytes // rows) if rows else 0
        part = TensorInfo(
            info.name, info.dtype, (hi - lo, *info.shape[1:]), info.begin + lo * row_bytes, info.begin + hi * row_bytes
        )
        tensor, view = _alloc(part, self._framework)
        if part.nbytes:
            self._shard.reader.preadinto(part.begin, view, private=True)
        return _to_device(tensor[rest], self._framework, self._device)


class SafeOpen:
    """Counterpart of ``safetensors.safe_open`` over a sealed file or sealed folder."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        framework: str = "np",
        device: str = "cpu",
        *,
        allow_plaintext: bool = False,
        keys: KeyService | None = None,
    ) -> None:
        if sys.byteorder != "little":
            raise SafetensorsError("safetensors data is little-endian; this loader supports little-endian hosts only")
        self._framework, self._device = framework, device
        self._shards: dict[str, _Shard] = {}
        self._where: dict[str, str] = {}
        self._metadata: dict[str, str] | None = None
        p, member = resolve_member(path, None)
        if p.is_dir() and member is None:
            self._open_folder(p, allow_plaintext, keys)
        else:
            self._add(member or p.name, open_member(p, member, allow_plaintext=allow_plaintext, keys=keys))
            self._metadata = next(iter(self._shards.values())).meta

    def _add(self, name: str, reader: RandomAccess) -> None:
        try:
            shard = _Shard(reader, name)
        except BaseException:
            reader.close()
            raise
        self._shards[name] = shard
        for t in shard.tensors:
            if t in self._where:
                raise SafetensorsError(f"tensor {t!r} appears in two shards")
            self._where[t] = name

    def _open_folder(self, p: Path, allow_plaintext: bool, keys: KeyService | None) -> None:
        with open_folder_any(p, allow_plaintext=allow_plaintext, keys=keys) as folder:
            members = list(folder)
            if INDEX_NAME in folder:
                with folder.open(INDEX_NAME) as r:  # sized before anything is read or allocated
                    if r.size > MAX_INDEX:
                        raise SafetensorsError(f"{INDEX_NAME} is larger than {MAX_INDEX} bytes")
                    raw = r.read()
                index = json_loads(raw, max_depth=4, max_values=2_000_000, error=SafetensorsError, what=INDEX_NAME)
                weight_map = index.get("weight_map") if isinstance(index, dict) else None
                if not isinstance(weight_map, dict):
                    raise SafetensorsError(f"{INDEX_NAME} has no weight_map")
                shard_names = sorted(set(map(str, weight_map.values())))
                meta = index.get("metadata")
                self._metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else None
            else:
                shard_names = [m for m in members if m.endswith(".safetensors")]
            if not shard_names:
                raise SafetensorsError(f"{p} holds no .safetensors file")
            for name in shard_names:
                if name not in folder:
                    raise SafetensorsError(f"{INDEX_NAME} names {name!r}, which is not in the sealed folder")
                self._add(name, folder.open(name))
        if INDEX_NAME not in members and len(self._shards) == 1:
            self._metadata = next(iter(self._shards.values())).meta

    def __enter__(self) -> SafeOpen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for shard in self._shards.values():
            shard.reader.close()
        self._shards = {}

    def keys(self) -> list[str]:
        return sorted(self._where)

    def metadata(self) -> dict[str, str] | None:
        return self._metadata

    def _info(self, name: str) -> tuple[_Shard, TensorInfo]:
        try:
            shard = self._shards[self._where[name]]
        except KeyError:
            raise KeyError(f"no tensor named {name!r}") from None
        return shard, shard.tensors[name]

    def get_tensor(self, name: str) -> Any:
        shard, info = self._info(name)
        return _to_device(shard.read(info, self._framework), self._framework, self._device)

    def load_all(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for shard in self._shards.values():
            for name, tensor in shard.read_all(self._framework).items():
                out[name] = _to_device(tensor, self._framework, self._device)
        return out

    def get_slice(self, name: str) -> TensorSlice:
        shard, info = self._info(name)
        return TensorSlice(shard, info, self._framework, self._device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


def safe_open(
    path: str | os.PathLike[str],
    framework: str = "np",
    device: str = "cpu",
    *,
    allow_plaintext: bool = False,
    keys: KeyService | None = None,
) -> SafeOpen:
    return SafeOpen(path, framework, device, allow_plaintext=allow_plaintext, keys=keys)


def load_file(
    path: str | os.PathLike[str],
    framework: str = "np",
    device: str = "cpu",
    *,
    allow_plaintext: bool = False,
    keys: KeyService | None = None,
) -> dict[str, Any]:
    """Every tensor of a sealed safetensors file or sealed (sharded) folder."""
    with safe_open(path, framework, device, allow_plaintext=allow_plaintext, keys=keys) as f:
        return f.load_all()


__all__ = ["SafeOpen", "SafetensorsError", "TensorSlice", "load_file", "safe_open"]
