"""Regressions of the third review for the loaders: ONNX external data outside the in-memory
set (finding 3), FIFOs in place of model files (finding 15), core dumps, memfd names, and
members of a sealed folder resolved to planted files."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelseal
import modelseal.onnx as monnx
import modelseal.safetensors as mst
import modelseal.torch as mtorch
from modelseal.errors import FormatError, PolicyDenied, StorageError, VerificationError
from modelseal.loaders import common
from modelseal.loaders import onnx as onnx_loader
from modelseal.loaders.fs import SealedFileSystem
from modelseal.util import files

from .conftest import Env

KEY = "test-kek"

# --- finding 3: every external tensor of an ONNX model comes from the sealed folder -------------

GENUINE = np.array([1.0, 2.0], dtype=np.float32)
PLANTED = np.array([100.0, 200.0], dtype=np.float32)
# weights.bin: two floats at 0, then two int64 sparse indices at 8.
GENUINE_FILE = GENUINE.tobytes() + np.array([0, 1], dtype=np.int64).tobytes()
PLANTED_FILE = PLANTED.tobytes() + np.array([1, 0], dtype=np.int64).tobytes()


def _external(t: TensorProto, location: str, offset: int, length: int) -> TensorProto:
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.ClearField("float_data")
    t.ClearField("int64_data")
    t.ClearField("raw_data")
    return t


def _weights(loc: str) -> TensorProto:
    return _external(numpy_helper.from_array(GENUINE, "w"), loc, 0, 8)


def _sparse(loc: str, where: str) -> onnx.SparseTensorProto:
    values = numpy_helper.from_array(GENUINE, "w")
    indices = numpy_helper.from_array(np.array([0, 1], dtype=np.int64), "w_indices")
    if where == "values":
        _external(values, loc, 0, 8)
    else:
        _external(indices, loc, 8, 16)
    return helper.make_sparse_tensor(values, indices, [2])


def _io() -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]), helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [2]
    )


def _if(then_nodes: list[onnx.NodeProto], then_inits: list[TensorProto]) -> list[onnx.NodeProto]:
    then = helper.make_graph(
        then_nodes, "then", [], [helper.make_tensor_value_info("yt", TensorProto.FLOAT, [2])], initializer=then_inits
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["ye"])],
        "else",
        [],
        [helper.make_tensor_value_info("ye", TensorProto.FLOAT, [2])],
    )
    return [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
    ]


def _model(case: str, loc: str = "weights.bin") -> onnx.ModelProto:
    """y = x + w, with w's bytes in the external file ``loc``, placed as ``case`` says."""
    x, y = _io()
    add = helper.make_node("Add", ["x", "w"], ["y"])
    nodes, inits, sparse, funcs, training = [add], [], [], [], []
    if case in ("sparse-values", "sparse-indices"):
        sparse = [_sparse(loc, case.split("-")[1])]
    elif case == "sparse-attribute":
        nodes = [helper.make_node("Constant", [], ["w"], sparse_value=_sparse(loc, "values")), add]
    elif case == "subgraph-initializer":
        nodes = _if([helper.make_node("Add", ["x", "w"], ["yt"])], [_weights(loc)])
    elif case == "subgraph-constant":
        nodes = _if(
            [helper.make_node("Constant", [], ["w"], value=_weights(loc)), helper.make_node("Add", ["x", "w"], ["yt"])],
            [],
        )
    elif case == "function-constant":
        body = [
            helper.make_node("Constant", [], ["k"], value=_weights(loc)),
            helper.make_node("Add", ["a", "k"], ["b"]),
        ]
        funcs = [helper.make_function("local", "F", ["a"], ["b"], body, [helper.make_opsetid("", 17)])]
        nodes = [helper.make_node("F", ["x"], ["y"], domain="local")]
    elif case == "training-info":
        inits = [numpy_helper.from_array(GENUINE, "w")]
        init_graph = helper.make_graph([], "init", [], [], initializer=[_weights(loc)])
        training = [onnx.TrainingInfoProto(initialization=init_graph)]
    elif case == "main-initializer":
        inits = [_weights(loc)]
    else:
        raise AssertionError(case)
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits, sparse_initializer=sparse)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=funcs)
    model.training_info.extend(training)
    model.ir_version = 8
    return model


def _sealed_onnx(env: Env, model: onnx.ModelProto, name: str = "m") -> Path:
    src = env.work / f"{name}-src"
    src.mkdir()
    (src / "model.onnx").write_bytes(model.SerializeToString())
    (src / "weights.bin").write_bytes(GENUINE_FILE)
    dst = env.work / f"{name}.sealed"
    modelseal.seal(src, dst, key=KEY, keys=env.svc)
    return dst


@pytest.fixture
def planted_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The process's working directory holds an attacker's ``weights.bin`` and ``host.bin``."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "weights.bin").write_bytes(PLANTED_FILE)
    (cwd / "host.bin").write_bytes(PLANTED_FILE)
    monkeypatch.chdir(cwd)
    return cwd


def _run(sess: object) -> np.ndarray:
    out: list[np.ndarray] = sess.run(None, {"x": np.zeros(2, dtype=np.float32)})  # type: ignore[attr-defined]
    return out[0]


@pytest.mark.parametrize(
    "case",
    [
        "sparse-values",
        "sparse-indices",
        "sparse-attribute",
        "subgraph-initializer",
        "subgraph-constant",
        "function-constant",
    ],
)
def test_onnx_external_data_outside_main_initializers_comes_from_the_sealed_folder(
    env: Env, planted_cwd: Path, case: str
) -> None:
    # Before: ONNX Runtime read these tensors from ./weights.bin (or failed), whatever the
    # in-memory set held: a signed model computed with the planted file.
    sess = monnx.inference_session(_sealed_onnx(env, _model(case)), keys=env.svc)
    np.testing.assert_array_equal(_run(sess), GENUINE)


@pytest.mark.parametrize("case", ["sparse-values", "sparse-indices", "sparse-attribute", "training-info"])
@pytest.mark.parametrize("where", ["beside", "absolute"])
def test_onnx_external_location_outside_the_folder_is_refused(
    env: Env, planted_cwd: Path, case: str, where: str
) -> None:
    loc = "host.bin" if where == "beside" else str(planted_cwd / "host.bin")  # a host file read into a tensor
    sealed = _sealed_onnx(env, _model(case, loc))
    with pytest.raises(FormatError, match="not in the sealed folder"):
        monnx.inference_session(sealed, keys=env.svc)


def test_onnx_external_range_outside_the_member_is_refused(env: Env, planted_cwd: Path) -> None:
    model = _model("main-initializer")
    _external(model.graph.initializer[0], "weights.bin", len(GENUINE_FILE) - 4, 8)
    with pytest.raises(FormatError, match="outside"):
        monnx.inference_session(_sealed_onnx(env, model), keys=env.svc)


def test_onnx_runtime_resolves_external_data_against_an_empty_private_folder(
    env: Env, planted_cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defence in depth: a reference the walk missed must fail, not read the working directory.
    sealed = _sealed_onnx(env, _model("sparse-values"))
    monkeypatch.setattr(onnx_loader, "external_refs", lambda proto: [])
    with pytest.raises(Exception, match="modelseal-ort-") as e:
        monnx.inference_session(sealed, keys=env.svc)
    assert str(planted_cwd) not in str(e.value)


def test_onnx_walk_sees_every_tensor_of_every_placement() -> None:
    for case in ("sparse-values", "sparse-attribute", "subgraph-constant", "function-constant", "training-info"):
        refs = onnx_loader.external_refs(_model(case))
        assert [(r.location, r.main_initializer) for r in refs] == [("weights.bin", False)], case
    (ref,) = onnx_loader.external_refs(_model("main-initializer"))
    assert ref.main_initializer


def test_onnx_refuses_options_that_write_the_model_to_disk(env: Env, tmp_path: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    with pytest.raises(PolicyDenied, match="optimized_model_filepath"):
        monnx.inference_session(_sealed_onnx(env, _model("main-initializer")), sess_options=so, keys=env.svc)
    assert not (tmp_path / "optimized.onnx").exists()


# --- finding 15: no open of an untrusted path blocks ------------------------------------------


@contextlib.contextmanager
def fifo_watchdog(fifo: Path, after: float = 5.0) -> Iterator[list[bool]]:
    """Bound a test that might block opening ``fifo``: after ``after`` seconds, keep opening
    its write end (which succeeds only while a reader is blocked in open) so the reader
    gets EOF. ``fired`` records that it had to, i.e. that something blocked."""
    fired: list[bool] = []
    stop = threading.Event()

    def run() -> None:
        if stop.wait(after):
            return
        while not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.02)
                continue
            fired.append(True)
            os.close(fd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield fired
    finally:
        stop.set()
        t.join()


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    "load",
    [
        lambda p, env: mst.load_file(p, keys=env.svc),
        lambda p, env: mst.safe_open(p, allow_plaintext=True, keys=env.svc),
        lambda p, env: mtorch.load(p, keys=env.svc),
        lambda p, env: monnx.inference_session(p, keys=env.svc),
    ],
    ids=["safetensors", "safetensors-plaintext", "torch", "onnx"],
)
def test_loaders_refuse_a_fifo_in_place_of_a_model_without_blocking(
    env: Env, load: Callable[[Path, Env], object]
) -> None:
    fifo = _fifo(env.work / "model.sealed")
    with fifo_watchdog(fifo) as fired, pytest.raises(StorageError, match="not a regular file"):
        load(fifo, env)
    assert not fired


def test_memfd_view_refuses_a_fifo_in_a_plaintext_folder(env: Env) -> None:
    # The folder goes to transformers as it is, whose own open would block on the FIFO.
    plain = env.work / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_text("{}")
    fifo = _fifo(plain / "config.json")
    with (
        fifo_watchdog(fifo) as fired,
        pytest.raises(StorageError, match="not a regular file"),
        common.memfd_view(plain, allow_plaintext=True, keys=env.svc),
    ):
        pass
    assert not fired


def test_fsspec_refuses_fifos_without_blocking(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    from modelseal.loaders import fs as fs_loader
    from modelseal.signing.signers import ED25519, generate
    from modelseal.signing.trust import TrustPolicy

    fifo = _fifo(env.work / "data.sealed")
    dirfs = SealedFileSystem(fs=DirFileSystem(path=str(env.work), fs=LocalFileSystem()), keys=env.svc)
    with fifo_watchdog(fifo) as fired, pytest.raises(StorageError, match="not a regular file"):
        dirfs.open("data.sealed", "rb")
    assert not fired
    # The signature file beside a genuine artifact, read when a trust policy is in force.
    plain = env.work / "train.csv"
    plain.write_bytes(b"a,b\n1,2\n")
    modelseal.seal(plain, env.work / "train.csv.sealed", key=KEY, keys=env.svc)
    sig = _fifo(env.work / "train.csv.sealed.msig")
    policy = TrustPolicy.from_keys([generate(ED25519).public])
    monkeypatch.setattr(fs_loader, "trust_policy", lambda keys: policy)
    local = SealedFileSystem(keys=env.svc)
    # Read as modelseal.open reads it (pending signature files included): the same error.
    with fifo_watchdog(sig) as fired, pytest.raises(VerificationError, match="not a regular file"):
        local.open(str(env.work / "train.csv.sealed"), "rb")
    assert not fired


def test_open_regular_hands_back_a_blocking_descriptor(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x")
    for fd in (files.open_regular(p), files.open_walked(p, (p.stat().st_dev, p.stat().st_ino))):
        try:
            assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        finally:
            os.close(fd)
    fifo = _fifo(tmp_path / "fifo")
    with fifo_watchdog(fifo) as fired:
        with pytest.raises(StorageError, match="not a regular file"):
            files.open_regular(fifo)
        with pytest.raises(PolicyDenied):
            files.open_walked(fifo, (fifo.stat().st_dev, fifo.stat().st_ino))
    assert not fired


# --- members resolve through the manifest only ------------------------------------------------


def _safetensors_bytes(value: float) -> bytes:
    from safetensors.numpy import save

    return save({"w": np.full((4, 4), value, dtype=np.float32)})


def _sealed_model_folder(env: Env) -> Path:
    src = env.work / "model-src"
    (src / "nested").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(_safetensors_bytes(1.0))
    (src / "nested" / "model.safetensors").write_bytes(_safetensors_bytes(2.0))
    dst = env.work / "model.sealed"
    modelseal.seal(src, dst, key=KEY, keys=env.svc)
    return dst


@pytest.mark.parametrize("planted_kind", ["plaintext", "sealed-file"])
def test_a_file_planted_in_a_sealed_folder_is_never_loaded(env: Env, planted_kind: str) -> None:
    sealed = _sealed_model_folder(env)
    evil = env.work / "evil.safetensors"
    evil.write_bytes(_safetensors_bytes(666.0))
    if planted_kind == "sealed-file":  # sealed by anyone who can wrap to the host's key
        modelseal.seal(evil, env.work / "evil.sealed", key=KEY, keys=env.svc)
        evil = env.work / "evil.sealed"
    (sealed / "nested").mkdir()
    for rel in ("model.safetensors", "nested/model.safetensors"):
        (sealed / rel).write_bytes(evil.read_bytes())
    sealed_fs = SealedFileSystem(keys=env.svc)
    for rel, want in (("model.safetensors", 1.0), ("nested/model.safetensors", 2.0)):
        with pytest.raises(FormatError, match="inside the sealed folder"):
            sealed_fs.open(str(sealed / rel), "rb")
        for allow in (False, True):
            got = mst.load_file(sealed / rel, allow_plaintext=allow, keys=env.svc)["w"]
            assert np.all(got == want), (rel, allow)
            with mst.safe_open(sealed / rel, allow_plaintext=allow, keys=env.svc) as f:
                assert np.all(f.get_tensor("w") == want)


def test_member_resolution_refuses_nested_sealed_folders_and_climbing(env: Env) -> None:
    sealed = _sealed_model_folder(env)
    inner = sealed / "inner.sealed"
    inner.mkdir()
    (inner / "manifest.mseal").write_bytes((sealed / "manifest.mseal").read_bytes())
    with pytest.raises(FormatError, match="inside the sealed folder"):
        mst.load_file(inner / "model.safetensors", keys=env.svc)
    with pytest.raises(FormatError, match="name a member"):
        common.split_member(sealed / "nested" / ".." / ".." / "x")
    assert common.resolve_member(sealed / "nested", "model.safetensors") == (sealed, "nested/model.safetensors")
    with pytest.raises(StorageError, match="no member"):
        mtorch.load(sealed / "absent.bin", keys=env.svc)
    # A real folder planted inside is not loaded whole as plaintext either.
    (sealed / "nested").mkdir()
    (sealed / "nested" / "config.json").write_text("{}")
    with (
        pytest.raises(FormatError, match="inside the sealed folder"),
        common.memfd_view(sealed / "nested", allow_plaintext=True, keys=env.svc),
    ):
        pass
    with pytest.raises(FormatError, match="inside the sealed folder"):
        common.open_folder_any(sealed / "nested", allow_plaintext=True, keys=env.svc)


# --- memfd names --------------------------------------------------------------------------------


def test_memfd_names_do_not_reveal_member_paths(env: Env) -> None:
    src = env.work / "secret-project-src"
    (src / "llama-finetune-customer-x").mkdir(parents=True)
    (src / "llama-finetune-customer-x" / "adapter_model.safetensors").write_bytes(_safetensors_bytes(3.0))
    (src / "config.json").write_text(json.dumps({"a": 1}))
    sealed = env.work / "secret.sealed"
    modelseal.seal(src, sealed, key=KEY, keys=env.svc)
    with common.memfd_view(sealed, keys=env.svc) as view:
        assert (view / "config.json").read_text() == '{"a": 1}'
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        memfds = [link for link in links if link.startswith("/memfd:")]
        assert len(memfds) >= 2
        for secret in ("config.json", "customer", "adapter_model"):
            assert not [link for link in memfds if secret in link], memfds
        assert len(set(memfds)) == 1  # one opaque name for all
        maps = Path("/proc/self/maps").read_text()
        assert "config.json" not in maps and "customer" not in maps and "adapter_model" not in maps


# --- core dumps ---------------------------------------------------------------------------------

_PROBE = """
import ctypes, resource, sys
{body}
libc = ctypes.CDLL(None)
print(resource.getrlimit(resource.RLIMIT_CORE)[0], resource.getrlimit(resource.RLIMIT_CORE)[1], libc.prctl(3, 0, 0, 0, 0))
"""


def _probe(body: str, env_extra: dict[str, str] | None = None) -> tuple[list[int], str]:
    env = dict(os.environ, **(env_extra or {}))
    r = subprocess.run(
        [sys.executable, "-c", _PROBE.format(body=body)], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 0, r.stderr
    return [int(v) for v in r.stdout.split()[-3:]], r.stderr


def test_cli_switches_core_dumps_off_for_good(env: Env) -> None:
    # Raise the soft limit as far as this process may: an earlier in-process CLI call in the
    # same test run may already have lowered the hard limit, which nobody can raise again.
    body = "import resource\nh = resource.getrlimit(resource.RLIMIT_CORE)[1]\n"
    body += "resource.setrlimit(resource.RLIMIT_CORE, (1 << 20 if h == resource.RLIM_INFINITY else h, h))\n"
    body += "from modelseal.cli import main\nmain(['inspect', '/nonexistent-artifact'])"
    (soft, hard, dumpable), _ = _probe(body)
    assert (soft, hard, dumpable) == (0, 0, 0)


def test_loaders_switch_core_dumps_off_unless_opted_out(env: Env) -> None:
    if resource_hard_limit() == 0:
        pytest.skip("this machine forbids core dumps outright: no opt-out to observe")
    plain = env.work / "w.safetensors"
    plain.write_bytes(_safetensors_bytes(1.0))
    sealed = env.work / "w.sealed"
    modelseal.seal(plain, sealed, key=KEY, keys=env.svc)
    # Raise the soft limit as far as this process may: an earlier in-process CLI call in the
    # same test run may already have lowered the hard limit, which nobody can raise again.
    body = "import resource\nh = resource.getrlimit(resource.RLIMIT_CORE)[1]\n"
    body += "resource.setrlimit(resource.RLIMIT_CORE, (1 << 20 if h == resource.RLIM_INFINITY else h, h))\n"
    body += f"import modelseal.safetensors as m\nassert m.load_file({str(sealed)!r})['w'][0, 0] == 1.0"
    (soft, hard, dumpable), _ = _probe(body)
    assert (soft, dumpable) == (0, 0)
    assert hard == resource_hard_limit()  # an embedding application may turn dumps back on itself
    (soft, hard, dumpable), err = _probe(body, {"MODELSEAL_ALLOW_CORE_DUMPS": "1"})
    assert (soft, dumpable) == (1 << 20, 1)
    assert "MODELSEAL_ALLOW_CORE_DUMPS" in err  # the opt-out is logged


def resource_hard_limit() -> int:
    import resource

    return int(resource.getrlimit(resource.RLIMIT_CORE)[1])


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    current: tuple[int, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            current = (lo, hi)
        elif line.startswith("VmFlags:") and current is not None and current[0] <= address < current[1]:
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def _address(buf: object) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(memoryview(buf).cast("B")))  # type: ignore[arg-type]


def test_buffers_of_plaintext_are_left_out_of_core_dumps(env: Env) -> None:
    from modelseal.util.hardening import secret_buffer

    scratch = secret_buffer(1 << 20)
    assert "dd" in _vm_flags(_address(scratch))
    from safetensors.numpy import save

    big = env.work / "big.safetensors"
    big.write_bytes(save({"w": np.ones((512, 512), dtype=np.float32)}))
    sealed = env.work / "big.sealed"
    modelseal.seal(big, sealed, key=KEY, keys=env.svc)
    tensor = mst.load_file(sealed, keys=env.svc)["w"]
    assert "dd" in _vm_flags(tensor.ctypes.data)
    buf = common.read_member(sealed, keys=env.svc)
    assert "dd" in _vm_flags(_address(buf))
    with modelseal.open(sealed, keys=env.svc) as r:
        assert "dd" in _vm_flags(_address(r._cache))  # the one-chunk plaintext cache
