"""``modelseal.onnx.inference_session``: ONNX Runtime sessions from sealed models.

The model protobuf is decrypted into memory and passed to
``onnxruntime.InferenceSession`` as bytes. Models with external data (any
model over 2 GB) keep their weights in separate files; those are decrypted
into memory too and handed over with
``SessionOptions.add_external_initializers_from_files_in_memory``, so no
plaintext file is ever needed.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from modelseal.errors import FormatError
from modelseal.keys.service import KeyService
from modelseal.loaders.common import open_folder_any, read_member, split_member, wipe


def _external_locations(model: bytes | bytearray) -> list[str]:
    """Every external-data file name the model refers to, in any graph or subgraph.

    Each one must be supplied from memory: a reference ONNX Runtime cannot satisfy
    from memory would be read from the working directory, unsealed.
    """
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors
    except ImportError:
        raise FormatError("loading ONNX models needs the onnx package: pip install 'modelseal[onnx]'") from None
    proto = onnx.ModelProto()
    proto.ParseFromString(bytes(model))  # parsing alone never opens external files
    found: set[str] = set()
    for t in _get_all_tensors(proto):  # initializers, attributes, subgraphs, sparse tensors
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    found.add(entry.value)
    return sorted(found)


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
    """An ``onnxruntime.InferenceSession`` for a sealed ``.onnx`` file or sealed model folder."""
    import onnxruntime as ort

    p, implied = split_member(Path(path))
    member = member or implied
    so = sess_options if sess_options is not None else ort.SessionOptions()
    buffers: list[bytearray] = []
    if p.is_dir():
        with open_folder_any(p, allow_plaintext=allow_plaintext, keys=keys) as folder:
            if member is None:
                models = [m for m in folder if m.endswith(".onnx")]
                if len(models) != 1:
                    raise FormatError(f"{p} holds {len(models)} .onnx files; name the one to load with member=")
                member = models[0]
            model = _read(folder, member)
            base = PurePosixPath(member).parent
            names, bufs = [], []
            for loc in _external_locations(model):
                rel = (base / loc).as_posix()
                if rel not in folder:
                    raise FormatError(f"the model's external data {loc!r} is not in the sealed folder")
                data = _read(folder, rel)
                buffers.append(data)
                names.append(loc)
                bufs.append(data)
            if names:
                so.add_external_initializers_from_files_in_memory(names, bufs, [len(b) for b in bufs])
    else:
        model = read_member(p, member, allow_plaintext=allow_plaintext, keys=keys)
        if _external_locations(model):
            wipe(model)
            raise FormatError("this model keeps weights in external files: seal its folder and load the folder")
    try:
        return ort.InferenceSession(
            bytes(model), sess_options=so, providers=providers or ["CPUExecutionProvider"], **kwargs
        )
    finally:
        # ORT has copied what it needs during session creation.
        for b in buffers:
            wipe(b)
        if isinstance(model, bytearray):
            wipe(model)


def _read(folder: Any, rel: str) -> bytearray:
    reader = folder.open(rel)
    try:
        buf = bytearray(reader.size)
        reader.preadinto(0, buf, private=True)
        return buf
    finally:
        reader.close()
