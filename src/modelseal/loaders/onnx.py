"""``modelseal.onnx.inference_session``: ONNX Runtime sessions from sealed models.

The model protobuf is decrypted into memory and passed to
``onnxruntime.InferenceSession`` as bytes. Models with external data (any
model over 2 GB) keep their weights in separate files; those are decrypted
into memory too, so no plaintext file is ever needed.

The external references are untrusted data. Every ``TensorProto`` of the model is
walked here (graphs, subgraphs in attributes, functions and their default attributes,
training graphs, dense and sparse values and indices; any message field, so a field
this module does not name is walked too), and each external location must be a member
of the same sealed folder, inside the range of that member's bytes. Initializers of the
main graph go to ONNX Runtime from memory
(``SessionOptions.add_external_initializers_from_files_in_memory``); every other
external tensor is read from its member here and inlined, because ONNX Runtime reads
those from the file system whatever it holds in memory. As defence in depth its base
folder for external data is an empty private folder, so a reference that slipped
through fails instead of reading a file planted beside the process.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from modelseal.errors import FormatError, PolicyDenied
from modelseal.keys.service import KeyService
from modelseal.loaders.common import open_folder_any, read_into_memory, read_member, resolve_member, wipe
from modelseal.util.hardening import dont_dump

# ONNX Runtime resolves external data of a model loaded from bytes against this folder.
BASE_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_MAX_DIGITS = 20


@dataclass(frozen=True)
class ExternalRef:
    tensor: Any  # onnx.TensorProto, edited in place when inlined
    main_initializer: bool  # an initializer of the main graph: ONNX Runtime takes it from memory
    location: str
    offset: int
    length: int | None  # None: to the end of the file


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise FormatError("loading ONNX models needs the onnx package: pip install 'modelseal[onnx]'") from None
    return onnx


def parse_model(model: bytes | bytearray) -> Any:
    """The ``ModelProto`` (parsing alone never opens external files); FormatError if it is not one."""
    decode_error: type[Exception] = importlib.import_module("google.protobuf.message").DecodeError
    proto = _onnx().ModelProto()
    try:
        proto.ParseFromString(model)  # no copy of the plaintext
    except (decode_error, RuntimeError, ValueError):
        raise FormatError("the ONNX model is not a valid ModelProto") from None
    return proto


def all_tensors(model: Any) -> Iterator[tuple[Any, bool]]:
    """Every ``TensorProto`` anywhere in ``model``, with whether it is an initializer of the
    main graph. Walks every message field generically (iteratively: no recursion limit), so
    sparse values and indices, attribute tensors, subgraphs, functions and training graphs
    are all covered, and so is any field a later ONNX adds."""
    onnx = _onnx()
    tensor_d, model_d, graph_d = onnx.TensorProto.DESCRIPTOR, onnx.ModelProto.DESCRIPTOR, onnx.GraphProto.DESCRIPTOR
    stack: list[tuple[Any, str]] = [(model, "")]
    while stack:
        msg, role = stack.pop()
        d = msg.DESCRIPTOR
        if d is tensor_d:
            yield msg, role == "main-initializer"
            continue
        for field, value in msg.ListFields():
            if field.cpp_type != field.CPPTYPE_MESSAGE:
                continue
            if d is model_d and field.name == "graph":
                child = "main-graph"
            elif d is graph_d and role == "main-graph" and field.name == "initializer":
                child = "main-initializer"
            else:
                child = ""
            repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
            if field.message_type.GetOptions().map_entry:
                items = [v for v in value.values() if hasattr(v, "DESCRIPTOR")]
            elif repeated:
                items = list(value)
            else:
                items = [value]
            stack.extend((v, child) for v in reversed(items))


def _number(value: str, what: str, name: str) -> int:
    if not (0 < len(value) <= _MAX_DIGITS and value.isascii() and value.isdigit()):
        raise FormatError(f"tensor {name!r}: external data {what} {value[:40]!r} is not a number")
    return int(value)


def external_refs(model: Any) -> list[ExternalRef]:
    """Every tensor of ``model`` whose data lives in an external file, validated."""
    onnx = _onnx()
    refs = []
    for t, main in all_tensors(model):
        entries: dict[str, str] = {}
        for e in t.external_data:
            if e.key in entries:
                raise FormatError(f"tensor {t.name!r}: external data key {e.key!r} given twice")
            entries[e.key] = e.value
        if t.data_location != onnx.TensorProto.EXTERNAL:
            if entries:
                raise FormatError(f"tensor {t.name!r} has external data entries but is not marked external")
            continue
        location = entries.get("location", "")
        if not location:
            raise FormatError(f"tensor {t.name!r} is marked external but names no location")
        offset = _number(entries.get("offset", "0"), "offset", t.name)
        length = _number(entries["length"], "length", t.name) if "length" in entries else None
        refs.append(ExternalRef(t, main, location, offset, length))
    return refs


def member_for(base: PurePosixPath, location: str) -> str | None:
    """The folder member an external location names, relative to the model's own folder;
    None for one that cannot be a member (absolute, ``..``, backslashes, NUL)."""
    if "\\" in location or "\x00" in location or location.startswith("/"):
        return None
    parts = PurePosixPath(location).parts
    if not parts or ".." in parts:
        return None
    return (base / PurePosixPath(*parts)).as_posix()


def _slice(ref: ExternalRef, data: bytearray) -> memoryview:
    end = len(data) if ref.length is None else ref.offset + ref.length
    if ref.offset > len(data) or end > len(data):
        raise FormatError(f"tensor {ref.tensor.name!r}: external data range lies outside {ref.location!r}")
    return memoryview(data)[ref.offset : end]


def _inline(ref: ExternalRef, data: bytearray) -> None:
    """Put the tensor's bytes into the model itself: ONNX Runtime would read them from disk."""
    t = ref.tensor
    t.raw_data = bytes(_slice(ref, data))
    del t.external_data[:]
    t.data_location = _onnx().TensorProto.DEFAULT


def _in_memory(
    folder: Any, member: str, model: bytearray, buffers: list[bytearray]
) -> tuple[bytes | bytearray, list[str], list[bytearray]]:
    """The model bytes to hand to ONNX Runtime and its in-memory external files, with
    every external reference checked against ``folder`` (and inlined where needed)."""
    proto = parse_model(model)
    refs = external_refs(proto)
    if not refs:
        return model, [], []
    base = PurePosixPath(member).parent
    data_of: dict[str, bytearray] = {}
    names: list[str] = []
    files: list[bytearray] = []
    inlined = False
    for ref in refs:
        rel = member_for(base, ref.location)
        if rel is None or rel not in folder:
            raise FormatError(f"the model's external data {ref.location[:200]!r} is not in the sealed folder")
        if rel not in data_of:
            data_of[rel] = _read(folder, rel)
            buffers.append(data_of[rel])
        data = data_of[rel]
        _slice(ref, data)  # in range, whichever way it is handed over
        if ref.main_initializer:
            if ref.location not in names:
                names.append(ref.location)
                files.append(data)
        else:
            _inline(ref, data)
            inlined = True
    if not inlined:
        return model, names, files
    try:
        out = proto.SerializeToString()
    except (ValueError, RuntimeError):
        raise FormatError("the ONNX model is too large once its non-initializer external data is inlined") from None
    dont_dump(out)
    return out, names, files


def _check_options(so: Any) -> None:
    if getattr(so, "optimized_model_filepath", ""):
        # ONNX Runtime would write the optimized model, weights included, to that file.
        raise PolicyDenied("sess_options.optimized_model_filepath would write the decrypted model to disk")


def inference_session(
    path: str | os.PathLike[str],
    *,
    member: str | None = None,
    sess_options: Any = None,
    providers: list[str] | None = None,
    allow_plaintext: bool = False,
    keys: KeyService | None = None,
    **kwargs: Any,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for a sealed ``.onnx`` file or sealed model folder.

    ``sess_options`` is used for this one session: external data buffers and the base
    folder are registered on it.
    """
    import onnxruntime as ort

    p, member = resolve_member(path, member)
    so = sess_options if sess_options is not None else ort.SessionOptions()
    _check_options(so)
    buffers: list[bytearray] = []
    model: bytes | bytearray = b""
    empty = tempfile.mkdtemp(prefix="modelseal-ort-")
    try:
        so.add_session_config_entry(BASE_FOLDER_KEY, empty)
        if p.is_dir():
            with open_folder_any(p, allow_plaintext=allow_plaintext, keys=keys) as folder:
                if member is None:
                    models = [m for m in folder if m.endswith(".onnx")]
                    if len(models) != 1:
                        raise FormatError(f"{p} holds {len(models)} .onnx files; name the one to load with member=")
                    member = models[0]
                if member not in folder:
                    raise FormatError(f"{p} has no member {member!r}")
                plain = _read(folder, member)
                buffers.append(plain)
                model, names, files = _in_memory(folder, member, plain, buffers)
                if names:
                    so.add_external_initializers_from_files_in_memory(names, files, [len(b) for b in files])
        else:
            plain = read_member(p, member, allow_plaintext=allow_plaintext, keys=keys)
            buffers.append(plain)
            if external_refs(parse_model(plain)):
                raise FormatError("this model keeps weights in external files: seal its folder and load the folder")
            model = plain
        as_bytes = bytes(model)  # ONNX Runtime takes only bytes, and keeps them with the session
        dont_dump(as_bytes)
        return ort.InferenceSession(
            as_bytes, sess_options=so, providers=providers or ["CPUExecutionProvider"], **kwargs
        )
    finally:
        # ORT has copied what it needs during session creation.
        for b in buffers:
            wipe(b)
        shutil.rmtree(empty, ignore_errors=True)


def _read(folder: Any, rel: str) -> bytearray:
    reader = folder.open(rel)
    try:
        return read_into_memory(reader)
    finally:
        reader.close()


__all__ = ["inference_session"]
