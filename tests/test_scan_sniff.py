"""``telemetry.sniff`` decides each format the way its loader does (red-team review of issue 14,
finding 1): every variant below LOADS with its own library (checked here), and every one is
found, from a 4 KiB prefix plus the bounded reads ``sniff`` may make; while random bytes,
their near misses and common files (text, JSON, PNG, ELF, gzip, a plain zip) are not."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from modelseal.telemetry import sniff
from modelseal.telemetry.scan import ScanOptions, scan

W = np.random.default_rng(7).random((64, 64)).astype(np.float32)


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([b])
        out += bytes([b | 0x80])


def _onnx(doc: str = "") -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    init = numpy_helper.from_array(W, "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [x], [y], [init])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], doc_string=doc)
    m.ir_version = 8
    return bytes(m.SerializeToString())


def _onnx_graph_first() -> bytes:
    import onnx

    m = onnx.load_from_string(_onnx())
    graph = m.graph.SerializeToString()
    m.ClearField("graph")
    return b"\x3a" + _varint(len(graph)) + graph + m.SerializeToString()


def _npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, W)
    return buf.getvalue()


def _npy_key_order() -> bytes:
    b = _npy()
    (hlen,) = struct.unpack("<H", b[8:10])
    new = "{'shape': (64, 64), 'fortran_order': False, 'descr': '<f4', }"
    new = new.ljust(hlen - 1) + "\n"
    return b[:10] + new.encode("latin1") + b[10 + hlen :]


def _zip(entries: list[tuple[str, bytes]], comment: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, data)
        z.comment = comment
    return buf.getvalue()


def _torch_zip() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.from_numpy(W)}, buf)
    return buf.getvalue()


def _torch_entries() -> list[tuple[str, bytes]]:
    z = zipfile.ZipFile(io.BytesIO(_torch_zip()))
    return [(n, z.read(n)) for n in z.namelist()]


def _pickle_padded() -> bytes:
    p = pickle.dumps({"w": W}, protocol=2)
    pad = b"x" * 5000  # a first string longer than the prefix, popped
    return b"\x80\x02X" + struct.pack("<I", len(pad)) + pad + b"0" + p[2:]


def _pickle_p4_unframed() -> bytes:
    bio = io.BytesIO()
    pk = pickle._Pickler(bio, protocol=4)  # type: ignore[attr-defined]
    pk.framer.start_framing = lambda: None
    pk.dump({"w": W})
    return bio.getvalue()


def _torch_legacy(protocol: int) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.from_numpy(W)}, buf, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    return buf.getvalue()


def _safetensors(lead: bytes) -> bytes:
    from safetensors.numpy import save

    base = bytes(save({"w": np.arange(1024, dtype=np.float32)}))
    (n,) = struct.unpack("<Q", base[:8])
    head = lead + base[8 : 8 + n]
    return struct.pack("<Q", len(head)) + head + base[8 + n :]


def _safetensors_long_metadata() -> bytes:
    from safetensors.numpy import save

    return bytes(save({"w": np.arange(16, dtype=np.float32)}, metadata={"card": "x" * 20_000}))


def _tflite() -> bytes:
    return struct.pack("<I", 28) + b"TFL3" + bytes(20) + struct.pack("<I", 3) + os.urandom(200)


def _hdf5() -> bytes:
    return b"\x89HDF\r\n\x1a\n" + bytes([0, 0, 0, 0, 0, 8, 8, 0]) + os.urandom(400)


# (name, bytes, the format sniff must say, how its loader opens it)
VARIANTS = {
    "onnx-long-doc-string": (lambda: _onnx("Model card. " * 500), "onnx"),
    "onnx-graph-first": (_onnx_graph_first, "onnx"),
    "onnx-unknown-field-first": (lambda: b"\x98\x06\x01" + _onnx(), "onnx"),
    "npy-key-order": (_npy_key_order, "npy"),
    "npz-readme-first": (lambda: _zip([("README.txt", b"weights"), ("w.npy", _npy())]), "npz"),
    "npz-readme-after": (lambda: _zip([("w.npy", _npy()), ("README.txt", b"weights")]), "npz"),
    "torch-legacy-protocol-1": (lambda: _torch_legacy(1), "pickle"),
    "pickle-protocol-0": (lambda: pickle.dumps({"w": W}, protocol=0), "pickle"),
    "pickle-protocol-1": (lambda: pickle.dumps({"w": W}, protocol=1), "pickle"),
    "pickle-padded": (_pickle_padded, "pickle"),
    "pickle-memo-twice": (lambda: b"\x80\x02Nq\x000Nq\x000" + pickle.dumps({"w": W}, protocol=2)[2:], "pickle"),
    "pickle-protocol-4-unframed": (_pickle_p4_unframed, "pickle"),
    "torch-filler-entries": (
        lambda: _zip([(f"archive/extra/{i:04d}", b"") for i in range(600)] + _torch_entries()),
        "torch",
    ),
    "torch-comment-with-eocd": (lambda: _zip(_torch_entries()[1:] + _torch_entries()[:1], b"ci PK\x05\x06"), "torch"),
    "safetensors-leading-space": (lambda: _safetensors(b" "), "safetensors"),
    "safetensors-leading-newline": (lambda: _safetensors(b"\n"), "safetensors"),
    "safetensors-long-metadata": (_safetensors_long_metadata, "safetensors"),
}


def _loads(name: str, data: bytes, tmp: Path) -> None:
    """The variant opens with its format's own loader (so a miss would be a real evasion)."""
    path = tmp / name
    path.write_bytes(data)
    if name.startswith("onnx"):
        import onnx

        onnx.checker.check_model(onnx.load(str(path)))
    elif name.startswith(("npy", "npz")):
        loaded = np.load(path)
        assert (loaded if name.startswith("npy") else loaded["w"]).shape == (64, 64)
    elif name.startswith("torch"):
        import torch

        assert torch.load(path, weights_only=False)["w"].shape == (64, 64)
    elif name.startswith("pickle"):
        assert pickle.loads(data)["w"].shape == (64, 64)
    else:
        from safetensors.numpy import load

        assert list(load(data)) == ["w"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_variant_its_loader_opens_is_found(name: str, tmp_path: Path) -> None:
    make, fmt = VARIANTS[name]
    data = make()
    _loads(name, data, tmp_path)
    report = scan([str(tmp_path / name)], ScanOptions(table={}))
    assert [f.kind for f in report.findings] == ["plaintext-model"] and report.formats[fmt] == 1, report.lines()
    reads: list[tuple[int, int]] = []

    def read(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return data[offset : offset + length]

    assert sniff.sniff(data[: sniff.PREFIX], len(data), read) == fmt
    assert len(reads) <= sniff.DEEP_READS + 4 and all(n <= max(sniff.DEEP_PAGE, sniff.DEEP_HEADER) for _, n in reads)


def test_formats_outside_the_issue_list(tmp_path: Path) -> None:
    keras = _zip([("metadata.json", b"{}"), ("config.json", b"{}"), ("model.weights.h5", _hdf5())])
    files = {"m.tflite": _tflite(), "m.h5": _hdf5(), "ub.h5": bytes(512) + _hdf5(), "m.keras": keras}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    report = scan([str(tmp_path)], ScanOptions(table={}))
    assert {Path(f.location).name: f.kind for f in report.findings} == dict.fromkeys(files, "plaintext-model")
    assert report.formats == {"tflite": 1, "hdf5": 2, "keras": 1}
    details = {f.detail for f in report.findings}
    assert {
        "a plaintext TFLite model file, not sealed",
        "a plaintext Keras (.keras zip) model file, not sealed",
    } <= details


def _common_files(tmp: Path) -> dict[str, bytes]:
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + os.urandom(4000)
    files = {
        "text": b"Initial notes (see below)\n" * 200,
        "json": json.dumps({"layers": [{"w": list(range(50))}] * 20}).encode(),
        "png": png,
        "gzip": gzip.compress(os.urandom(6000)),
        "elf": Path(shutil.which("ls") or "/bin/ls").read_bytes(),
        "zip": _zip([("readme.txt", b"hello"), ("data/config.json", b"{}")]),
        "record": b"blinker/__init__.py,sha256=abc,1234\nblinker/base.py,sha256=def,99\n" * 40,
        "csv": b"1,2,3\n(4),5,6\n" * 300,
    }
    return files


def test_random_bytes_near_misses_and_common_files_are_not_flagged(tmp_path: Path) -> None:
    leads = [b"", b"\x80\x02", b"\x80\x04\x95", b"\x08\x07", b"\x08\x0b\x12\x07pytorch", b"(dp0\n", b"}q\x00(", b"\x3a"]
    leads += [b"\x93NUMPY\x01\x00", b"GGUF"]
    size = 1 << 20
    tail = os.urandom(size)

    def read(offset: int, length: int) -> bytes:
        return tail[offset : offset + length]

    for lead in leads:
        for _ in range(400):
            data = lead + os.urandom(sniff.PREFIX - len(lead))
            got = sniff.sniff(data, size, read)
            assert got is None or lead == b"GGUF", (lead, got, data[:40])
    for name, data in _common_files(tmp_path).items():
        got = sniff.sniff(data[: sniff.PREFIX], len(data), lambda o, n, d=data: d[o : o + n])
        assert got is None, (name, got)
    assert sniff.sniff(b"GGUF" + struct.pack("<I", 7) + bytes(32), 1 << 20) is None  # an unknown version
    assert sniff.sniff(struct.pack("<Q", 1 << 40) + b'{"a":1}', 100) is None  # header longer than the file
