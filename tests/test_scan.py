"""``modelseal scan`` over a local folder (docs/scan.md): every kind of finding planted and
reported, renamed plaintext models found by content, noise and common files left alone, the
exit code and ``--fail-on``, ``--json`` and ``--textfile``."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import struct
import time
import zipfile
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import modelseal
from modelseal.cli import main
from modelseal.format.header import parse_core
from modelseal.signing.revocation import RevocationList, new_revocation, write_list
from modelseal.signing.sigfile import SignatureFile, signature_path
from modelseal.signing.signers import ED25519, P256, PemSigner, generate, private_pem
from modelseal.signing.trust import load_policy
from modelseal.telemetry import sniff
from modelseal.telemetry.scan import ScanOptions, scan
from modelseal.telemetry.scankeys import scan_service
from modelseal.telemetry.scanmodel import ScanReport
from tests.conftest import Env, make_model_folder

KEY = "local:test-kek"


@pytest.fixture
def signers(tmp_path: Path) -> dict[str, Path]:
    """release (P-256, trusted), security (Ed25519, trusted, signs revocations), other (untrusted)."""
    out: dict[str, Path] = {}
    for name, alg in (("release", P256), ("security", ED25519), ("other", ED25519)):
        s = generate(alg)
        (tmp_path / f"{name}.pem").write_bytes(private_pem(s, None))
        (tmp_path / f"{name}.pub").write_text(s.public.pem())
        out[name] = tmp_path / f"{name}.pem"
    return out


def trust_file(tmp_path: Path, revocations: Path | None = None) -> Path:
    p = tmp_path / "trust.toml"
    text = (
        f'version = 1\nstrict = true\n[signers.release]\nkeys = ["{tmp_path / "release.pub"}"]\n'
        f'[signers.security]\nkeys = ["{tmp_path / "security.pub"}"]\n'
        '[[rules]]\nartifacts = ["*"]\nenvironments = ["*"]\nsigners = ["release", "security"]\n'
    )
    if revocations is not None:
        text += f'[revocation]\nlist = "{revocations}"\nsigners = ["security"]\n'
    p.write_text(text)
    os.chmod(p, 0o600)
    return p


def revocation_list(path: Path, signers: dict[str, Path], *entries: tuple[str, str]) -> None:
    now = datetime.now(UTC)
    rl = RevocationList(1, now, now + timedelta(days=7), [new_revocation(k, v, "planted") for k, v in entries])
    write_list(path, rl, PemSigner.from_file(signers["security"]))


def sealed(env: Env, name: str, *, key: str = KEY, signer: Path | None = None, folder: bool = False) -> Path:
    if folder:
        src = make_model_folder(env.work / f"src-{name}", big=5000)
    else:
        src = env.work / f"src-{name}.bin"
        src.write_bytes(os.urandom(3000))
    dst = env.work / "tree" / name
    dst.parent.mkdir(exist_ok=True)
    sign = PemSigner.from_file(signer) if signer is not None else None
    modelseal.seal(src, dst, key, keys=env.svc, sign_key=sign, name=name.replace("/", "-"))
    return dst


def run(root: Path, policy: Path | None, env: Env, now: float | None = None) -> ScanReport:
    opts = ScanOptions(policy=load_policy(policy) if policy else None, svc=scan_service(env.svc), now=now, table={})
    return scan([str(root)], opts)


def kinds_at(report: ScanReport) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in report.findings:
        out.setdefault(Path(f.location).name, set()).add(f.kind)
    return out


# -- plaintext by content, and what must not be flagged --------------------------------------------


def _onnx_model() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.5, 1.0, 2.0, 4.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    return bytes(
        onnx.load_from_string(helper.make_model(graph, producer_name="pytorch").SerializeToString()).SerializeToString()
    )


def _gguf() -> bytes:
    key = b"general.architecture"
    value = b"llama"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv + bytes(64)


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + os.urandom(48) for _ in range(16))
    ihdr = struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def plant_plaintext(root: Path) -> dict[str, str]:
    """Plaintext models under misleading names; the format each must be found as."""
    import torch
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.arange(64, dtype=np.float32)}, str(root / "weights.bin"))
    buf = io.BytesIO()
    torch.save({"w": torch.arange(8.0)}, buf)
    (root / "notes.txt").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    torch.save({"w": torch.arange(8.0)}, buf, _use_new_zipfile_serialization=False)
    (root / "legacy.dat").write_bytes(buf.getvalue())
    (root / "state.cache").write_bytes(pickle.dumps({"layer.0": list(range(50))}, protocol=4))
    (root / "graph.data").write_bytes(_onnx_model())
    (root / "llm.q4").write_bytes(_gguf())
    arr = io.BytesIO()
    np.save(arr, np.zeros((8, 8), dtype=np.float16))
    (root / "arr.tmp").write_bytes(arr.getvalue())
    return {
        "weights.bin": "safetensors",
        "notes.txt": "torch",
        "legacy.dat": "pickle",
        "state.cache": "pickle",
        "graph.data": "onnx",
        "llm.q4": "gguf",
        "arr.tmp": "npy",
    }


def plant_noise(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (root / f"noise-{i}.bin").write_bytes(os.urandom(4096 + i * 97))
    (root / "image.png").write_bytes(_png())
    with zipfile.ZipFile(root / "docs.zip", "w") as z:
        z.writestr("readme.txt", "hello")
        z.writestr("data/config.json", "{}")
    (root / "blob.gz").write_bytes(gzip.compress(os.urandom(5000)))
    shutil.copy("/bin/ls", root / "tool")
    (root / "config.json").write_text('{"hidden_size": 32}')
    (root / "empty").write_bytes(b"")
    os.symlink("/etc/passwd", root / "link")  # never followed


def test_plaintext_models_are_found_by_content_and_noise_is_not(env: Env) -> None:
    root = env.work / "tree"
    expected = plant_plaintext(root / "models")
    plant_noise(root / "noise")
    report = run(root, None, env)
    found = {Path(f.location).name: f for f in report.findings}
    assert set(found) == set(expected), [f.line() for f in report.findings]
    for name, fmt in expected.items():
        assert found[name].kind == "plaintext-model" and found[name].severity == "critical"
        assert report.formats[fmt] >= 1, (name, fmt)
    assert report.formats["pickle"] == 2 and report.formats["torch"] == 1 and report.formats["onnx"] == 1
    assert report.states["plaintext"] == len(expected)
    assert report.formats["symlink"] == 1 and report.formats["other"] == 46
    assert report.files == len(expected) + 46 and not report.errors


def test_random_bytes_and_their_near_misses_are_not_flagged() -> None:
    # Leading bytes of a format, then noise: none of the structures holds.
    leads = [b"", b"\x80\x02", b"\x80\x05\x95", b"\x08\x07", b"\x08\x0b\x12\x07pytorch", b"GGUF", b"\x93NUMPY\x01\x00"]
    for lead in leads:
        for _ in range(300):
            data = lead + os.urandom(4096 - len(lead))
            assert sniff.sniff(data, 1 << 20) is None or lead == b"GGUF", (lead, data[:32])
    assert sniff.sniff(b"GGUF" + struct.pack("<I", 7) + bytes(32), 1 << 20) is None  # an unknown version
    assert sniff.sniff(struct.pack("<Q", 1 << 40) + b'{"a":1}', 100) is None  # header longer than the file


# -- sealed artifacts --------------------------------------------------------------------------------


def test_each_kind_of_sealed_artifact_finding(env: Env, signers: dict[str, Path], tmp_path: Path) -> None:
    good = sealed(env, "good.mseal", signer=signers["release"])
    folder = sealed(env, "folder.sealed", signer=signers["security"], folder=True)
    sealed(env, "unsigned.mseal")
    sealed(env, "untrusted.mseal", signer=signers["other"])
    revoked = sealed(env, "revoked.mseal", signer=signers["release"])
    env.svc.create("old-kek")
    sealed(env, "disabled.mseal", key="local:old-kek", signer=signers["release"])
    env.svc.set_state("local:old-kek", 1, "disabled")
    inactive = sealed(env, "torn.mseal", signer=signers["release"])
    modelseal.rewrap(inactive, keys=env.svc)  # generation 2 in slot B; slot A zeroed
    broken = sealed(env, "broken.mseal", signer=signers["release"])
    core = parse_core(inactive.read_bytes()[: 1 << 17])
    with open(inactive, "r+b") as f:  # a torn write: garbage in the zeroed (inactive) slot A
        f.seek(core.slots_offset)
        f.write(b"\xff" * 64)
    with open(broken, "r+b") as f:  # and both slots of another
        f.seek(core.slots_offset)
        f.write(b"\xff" * (2 * core.slot_size))
    copied = sealed(env, "copied.mseal")  # another artifact's signature file beside it
    shutil.copy(signature_path(good), signature_path(copied))
    sf = SignatureFile.load(signature_path(revoked))
    assert sf is not None
    lst = tmp_path / "revocations.json"
    revocation_list(lst, signers, ("signature", sf.signatures[0].id))

    report = run(env.work / "tree", trust_file(tmp_path, lst), env)
    got = kinds_at(report)
    assert got == {
        "unsigned.mseal": {"unsigned"},
        "untrusted.mseal": {"untrusted-signature"},
        "copied.mseal": {"untrusted-signature"},
        "revoked.mseal": {"revoked"},
        "disabled.mseal": {"disabled-key-version"},
        "torn.mseal": {"damaged-slot"},
        "broken.mseal": {"damaged-slot"},
    }, [f.line() for f in report.findings]
    by_name = {Path(f.location).name: f for f in report.findings}
    assert by_name["torn.mseal"].severity == "warning" and "inactive slot A" in by_name["torn.mseal"].detail
    assert by_name["broken.mseal"].severity == "critical" and "cannot be opened" in by_name["broken.mseal"].detail
    assert "untrusted key" in by_name["untrusted.mseal"].detail  # the words of signing.evaluation
    assert "sign other bytes" in by_name["copied.mseal"].detail
    assert good.name not in got and folder.name not in got  # signed, trusted, keys active
    assert report.states["sealed-signed"] == 5 and report.states["sealed-unsigned"] == 3
    assert report.states["revoked"] == 1
    assert report.formats["sealed-folder"] == 1 and report.formats["sealed-blob"] == 5


def test_past_cryptoperiod_by_the_clock_and_revoked_by_artifact_id(
    env: Env, signers: dict[str, Path], tmp_path: Path
) -> None:
    art = sealed(env, "old.mseal", signer=signers["release"])
    report = run(env.work / "tree", trust_file(tmp_path), env, now=time.time() + 366 * 86400)
    assert [(f.kind, Path(f.location).name) for f in report.findings] == [("past-cryptoperiod", "old.mseal")]
    assert "test-kek#1 is 366 days old (cryptoperiod 365 days)" in report.findings[0].detail
    assert report.states["past-cryptoperiod"] == 1
    assert not run(env.work / "tree", trust_file(tmp_path), env, now=time.time() + 300 * 86400).findings
    # a rotated key whose new version wraps it again is no longer past its cryptoperiod
    env.svc.rotate("test-kek")
    modelseal.rewrap(art, keys=env.svc)
    assert not run(env.work / "tree", trust_file(tmp_path), env).findings
    # an artifact revoked by its id (no signature needed for that)
    aid = modelseal.inspect(art)["artifact_id"]
    lst = tmp_path / "revocations.json"
    revocation_list(lst, signers, ("artifact", aid))
    report = run(env.work / "tree", trust_file(tmp_path, lst), env)
    assert [f.kind for f in report.findings] == ["revoked"] and f"artifact {aid[:16]}" in report.findings[0].detail


def test_without_a_passphrase_key_states_are_unknown_not_findings(
    env: Env, signers: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.svc.create("old-kek")
    sealed(env, "disabled.mseal", key="local:old-kek", signer=signers["release"])
    env.svc.set_state("local:old-kek", 1, "disabled")
    monkeypatch.delenv("MODELSEAL_PASSPHRASE")
    from modelseal.keys import keystore

    keystore.clear_cache()
    report = run(env.work / "tree", trust_file(tmp_path), env)
    assert not report.findings
    assert any("local: key versions unknown" in n for n in report.notes), report.notes


# -- the command line ----------------------------------------------------------------------------------


def test_cli_lines_exit_code_fail_on_json_and_textfile(
    env: Env, signers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = env.work / "tree"
    plant_plaintext(root / "models")
    sealed(env, "unsigned\nforged-line.mseal")  # a name that tries to add a line to the report
    sealed(env, "good.mseal", signer=signers["release"])
    pol = str(trust_file(tmp_path))
    textfile = tmp_path / "scan.prom"
    code = main(["scan", str(root), "--trust", pol, "--textfile", str(textfile)])
    out, err = capsys.readouterr()
    assert code == 19 and "8 findings, more than --fail-on 0" in err
    lines = out.splitlines()
    assert len([x for x in lines if x.startswith("plaintext-model  ")]) == 7
    assert any(x.startswith("unsigned  ") and "unsigned\\x0aforged-line.mseal" in x for x in lines), lines
    assert not any(x.startswith("forged-line") for x in lines)
    assert lines[-1].startswith("scanned 10 files") and "plaintext-model 7, unsigned 1" in lines[-1]

    families = {f.name: f for f in text_string_to_metric_families(textfile.read_text())}
    findings = {s.labels["kind"]: s.value for s in families["modelseal_scan_findings"].samples}
    assert findings["plaintext-model"] == 7 and findings["unsigned"] == 1 and findings["tls-pin-mismatch"] == 0
    states = {s.labels["state"]: s.value for s in families["modelseal_artifacts"].samples}
    assert states == {"sealed-signed": 1, "sealed-unsigned": 1, "revoked": 0, "past-cryptoperiod": 0, "plaintext": 7}
    (last,) = families["modelseal_scan_last_timestamp_seconds"].samples
    assert abs(last.value - time.time()) < 600
    assert oct(textfile.stat().st_mode & 0o777) == "0o644"

    assert main(["scan", str(root), "--trust", pol, "--fail-on", "8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"] == 10 and doc["findings_by_kind"]["plaintext-model"] == 7
    assert {f["location"] for f in doc["findings"] if f["kind"] == "unsigned"} == {
        str(root / "unsigned\nforged-line.mseal")
    }
    assert main(["scan", str(root), "--trust", pol, "--fail-on", "7"]) == 19
    capsys.readouterr()
    assert main(["scan", str(env.work / "nowhere")]) == 7  # the scan itself failing keeps its error's code
    assert main(["scan", "ftp://host/x"]) == 2
