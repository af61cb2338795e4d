"""modelseal.torch.load and modelseal.onnx.inference_session on sealed artifacts."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import modelseal
import modelseal.onnx as monnx
import modelseal.torch as mtorch

from .conftest import Env


class Custom:
    """Not a tensor or plain container: weights_only refuses to unpickle it."""

    def __init__(self) -> None:
        self.x = 1


def _seal(env: Env, src: Path) -> Path:
    dst = env.work / (src.name + ".sealed")
    modelseal.seal(src, dst, key="test-kek", keys=env.svc)
    return dst


def test_torch_state_dict_round_trip(env: Env) -> None:
    sd = collections.OrderedDict(w=torch.randn(20, 30), b=torch.randn(30), step=torch.tensor(7))
    plain = env.work / "model.pt"
    torch.save({"state_dict": sd, "epoch": 3, "name": "ft"}, plain)
    got = mtorch.load(_seal(env, plain), keys=env.svc)
    assert got["epoch"] == 3 and got["name"] == "ft"
    for k, v in sd.items():
        assert torch.equal(got["state_dict"][k], v)


def test_torch_refuses_pickles_that_need_code(env: Env) -> None:
    plain = env.work / "evil.pt"
    torch.save({"obj": Custom()}, plain)
    sealed = _seal(env, plain)
    with pytest.raises(mtorch.UnsafeCheckpoint, match="weights_only=False"):
        mtorch.load(sealed, keys=env.svc)
    # An explicit, informed opt-out works.
    assert mtorch.load(sealed, weights_only=False, keys=env.svc)["obj"].x == 1


def test_torch_load_streams_and_a_tampered_chunk_raises_decryption_error(env: Env) -> None:
    from modelseal.errors import DecryptionError
    from modelseal.format.file import read_raw
    from modelseal.format.source import FdSource

    sd = {f"w{i}": torch.randn(300_000) for i in range(8)}  # ~9.6 MB: ten 1 MiB chunks
    plain = env.work / "big.pt"
    torch.save(sd, plain)
    sealed = _seal(env, plain)
    got = mtorch.load(sealed, keys=env.svc)
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    with open(sealed, "r+b") as f:
        layout = read_raw(FdSource(f.fileno(), owns=False)).layout
        assert layout.count >= 8
        off = layout.offset(layout.count // 2) + 100  # inside the tensor records, past the pickle
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(DecryptionError):  # not torch's RuntimeError around it
        mtorch.load(sealed, keys=env.svc)


def test_torch_member_of_sealed_folder(env: Env) -> None:
    folder = env.work / "ckpt"
    folder.mkdir()
    torch.save({"w": torch.ones(3)}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    sealed = env.work / "ckpt.sealed"
    modelseal.seal(folder, sealed, key="test-kek", keys=env.svc)
    assert torch.equal(mtorch.load(sealed / "pytorch_model.bin", keys=env.svc)["w"], torch.ones(3))
    assert torch.equal(mtorch.load(sealed, member="pytorch_model.bin", keys=env.svc)["w"], torch.ones(3))


def _onnx_model() -> tuple[onnx.ModelProto, np.ndarray]:
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 8])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w


def test_onnx_single_file(env: Env) -> None:
    model, _w = _onnx_model()
    plain = env.work / "tiny.onnx"
    onnx.save_model(model, plain)
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    sess = monnx.inference_session(_seal(env, plain), keys=env.svc)
    ref = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref.run(None, {"x": x})[0])


def test_onnx_external_data_from_memory(env: Env) -> None:
    model, w = _onnx_model()
    folder = env.work / "onnxmodel"
    folder.mkdir()
    onnx.save_model(
        model,
        folder / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (folder / "weights.bin").stat().st_size == w.nbytes
    sealed = env.work / "onnxmodel.sealed"
    modelseal.seal(folder, sealed, key="test-kek", keys=env.svc)
    x = np.ones((2, 16), dtype=np.float32)
    sess = monnx.inference_session(sealed, keys=env.svc)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], np.maximum(x @ w, 0), rtol=1e-5)
