"""What a file is, from its first bytes: a plaintext model format, a modelseal sealed file, or
neither (``modelseal scan``, docs/scan.md).

The caller reads a prefix of at most ``PREFIX`` bytes (and knows the file's size); ``sniff``
decides from those bytes, by content, never by name, the way each format's own loader
decides, and, given a bounded read callback, reads a little more where a loader would look
further: a zip archive's central directory (``sniffzip``), a safetensors header longer than
the prefix (at most ``DEEP_HEADER`` bytes), a pickle or an ONNX model whose first bytes look
right (``sniffwalk``: at most ``DEEP_READS`` reads of ``DEEP_PAGE`` bytes). Without a read
callback the decision is the prefix's alone (``ZIP`` for an archive whose first entry does not
decide).

Each format is recognised by a structure, so that random bytes, text, JSON, images,
archives and executables are not flagged:

- safetensors: an 8-byte little-endian header length within the file, then JSON whitespace
  and a JSON object of tensor entries (parsed whole when it is at most ``DEEP_HEADER`` bytes,
  else its beginning checked);
- NumPy ``.npy``: the magic, a version ``np.load`` reads (1.0, 2.0, 3.0) and a header within
  the file (the header dict's keys in any order);
- GGUF: the magic and version 1 to 3; TFLite: ``TFL3`` at offset 4 behind a root table offset
  within the file; HDF5 (Keras ``.h5``): its signature at 0, 512, 1024 or 2048;
- a pickle (protocols 0 to 5) and ONNX: ``sniffwalk``; torch zip, ``.npz``, ``.keras``:
  ``sniffzip``.
"""

from __future__ import annotations

import ast
import json
import struct
import warnings

from modelseal.telemetry import sniffzip
from modelseal.telemetry.sniffwalk import DEEP_PAGE, DEEP_READS, Read, Window, is_onnx, is_pickle

PREFIX = 4096  # bytes a local scan reads first; remote scans read more in one request
DEEP_HEADER = 1 << 20  # a safetensors header up to this long is read and parsed whole

SAFETENSORS, TORCH, PICKLE, ONNX, GGUF, NUMPY, NPZ = "safetensors", "torch", "pickle", "onnx", "gguf", "npy", "npz"
TFLITE, HDF5, KERAS = "tflite", "hdf5", "keras"
SEALED = "sealed"  # a modelseal sealed file: the artifact checks take over
ZIP = "zip"  # a zip archive whose first entry did not decide, when there is no read callback
MODEL_FORMATS = (SAFETENSORS, TORCH, PICKLE, ONNX, GGUF, NUMPY, NPZ, TFLITE, HDF5, KERAS)

SEALED_MAGIC = b"\x89MSEAL\r\n"  # format.header.MAGIC (kept here so this module stays pure)
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_NPY_MAX_HEADER = 10_000 * 10  # np.load's max_header_size, with room for allow_pickle files
_JSON_SPACE = b" \t\r\n"
_ZIP_LOCAL = b"PK\x03\x04"
_HDF5 = b"\x89HDF\r\n\x1a\n"


def sniff(prefix: bytes, size: int, read: Read | None = None) -> str | None:
    """The format of a file of ``size`` bytes starting with ``prefix`` (``read``: more of it,
    bounded); None for anything else."""
    if prefix.startswith(SEALED_MAGIC):
        return SEALED
    if prefix.startswith(_ZIP_LOCAL):
        fmt = sniffzip.name_format(sniffzip.first_name(prefix))
        if fmt is None and read is None:
            return ZIP
        return fmt or (sniffzip.zip_format(read, size) if read is not None else None)
    if _safetensors(prefix, size, read):
        return SAFETENSORS
    for check, fmt in ((_numpy, NUMPY), (_gguf, GGUF), (_tflite, TFLITE), (_hdf5, HDF5)):
        if check(prefix, size):
            return fmt
    if is_pickle(Window(prefix, size, read)):
        return PICKLE
    if is_onnx(Window(prefix, size, read)):
        return ONNX
    return None


# -- safetensors -----------------------------------------------------------------------------------


def _safetensors(prefix: bytes, size: int, read: Read | None) -> bool:
    if len(prefix) < 10:
        return False
    (n,) = struct.unpack("<Q", prefix[:8])
    if not 2 <= n <= _SAFETENSORS_MAX_HEADER or n + 8 > size:
        return False
    start = 8
    while start < len(prefix) and start < 8 + n and prefix[start] in _JSON_SPACE:
        start += 1
    if prefix[start : start + 1] != b"{":
        return False
    if 8 + n <= len(prefix):
        return _tensor_header(prefix[8 : 8 + n])
    if n <= DEEP_HEADER and read is not None and _looks_like_object(prefix[start:]):
        head = read(8, n)
        return len(head) == n and _tensor_header(head)
    return _looks_like_object(prefix[start:])


def _tensor_header(head: bytes) -> bool:
    """A safetensors header: a JSON object of tensor entries (and ``__metadata__``)."""
    try:
        doc = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    if not isinstance(doc, dict):
        return False
    for key, value in doc.items():
        if key == "__metadata__":
            continue
        if not (isinstance(value, dict) and isinstance(value.get("dtype"), str) and "data_offsets" in value):
            return False
    return True


def _looks_like_object(head: bytes) -> bool:
    """The beginning of a JSON object whose end is past ``head``: the first key (or the end of
    an empty object), and nothing but UTF-8 text without control characters."""
    body = head[1:].lstrip(_JSON_SPACE)
    if body and body[:1] not in (b'"', b"}"):
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut by the end of the prefix is fine
        if e.start < len(head) - 3:
            return False
        text = head[: e.start].decode("utf-8")
    return all(c >= " " or c in "\t\r\n" for c in text)


# -- NumPy, GGUF, TFLite, HDF5 ----------------------------------------------------------------------


def _numpy(prefix: bytes, size: int) -> bool:
    if len(prefix) < 12 or not prefix.startswith(b"\x93NUMPY") or prefix[6] not in (1, 2, 3) or prefix[7] != 0:
        return False
    if prefix[6] == 1:
        (hlen,), start = struct.unpack("<H", prefix[8:10]), 10
    else:
        (hlen,), start = struct.unpack("<I", prefix[8:12]), 12
    if not 0 < hlen <= _NPY_MAX_HEADER or start + hlen > size:
        return False
    header = prefix[start : start + hlen]
    if not header.lstrip(b" \t").startswith(b"{"):
        return False
    if len(header) < hlen:  # a header longer than the prefix: its beginning is all that can be seen
        return len(header) >= 256 and all(32 <= c < 127 or c == 10 for c in header)
    try:  # what np.load does with it (the keys in any order)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            doc = ast.literal_eval(header.decode("latin-1"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return isinstance(doc, dict) and set(doc) == {"descr", "fortran_order", "shape"}


def _gguf(prefix: bytes, size: int) -> bool:
    if len(prefix) < 8 or not prefix.startswith(b"GGUF"):
        return False
    (version,) = struct.unpack("<I", prefix[4:8])
    return version in (1, 2, 3) and size >= 16


def _tflite(prefix: bytes, size: int) -> bool:
    if len(prefix) < 8 or prefix[4:8] != b"TFL3":
        return False
    root = int.from_bytes(prefix[:4], "little")
    return 8 <= root < size


def _hdf5(prefix: bytes, size: int) -> bool:
    del size
    return any(prefix[at : at + 8] == _HDF5 for at in (0, 512, 1024, 2048))


__all__ = [
    "DEEP_HEADER",
    "DEEP_PAGE",
    "DEEP_READS",
    "MODEL_FORMATS",
    "PREFIX",
    "SEALED",
    "SEALED_MAGIC",
    "ZIP",
    "sniff",
]
