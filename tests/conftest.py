"""Shared fixtures: a private MODELSEAL_HOME with a fresh keystore for every test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelseal.audit.events import MemorySink
from modelseal.keys import keystore
from modelseal.keys.service import KeyService
from modelseal.recipes import context as recipes_context

PASSPHRASE = "test-passphrase-not-secret"


@dataclass
class Env:
    home: Path
    work: Path
    svc: KeyService
    sink: MemorySink


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("MODELSEAL_HOME", str(home))
    monkeypatch.setenv("MODELSEAL_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("MODELSEAL_AGENT_SOCK", raising=False)  # a developer's own agent session must not leak in
    keystore.clear_cache()
    monkeypatch.setattr(recipes_context, "_service", None)  # the process-wide default KeyService
    # The smallest scrypt cost the keystore accepts keeps tests fast; the CLI's init uses 2^17.
    keystore.create(keystore.keystore_path(home), PASSPHRASE.encode(), scrypt_log2_n=14)
    sink = MemorySink()
    svc = KeyService(sink=sink)
    svc.create("test-kek")
    yield Env(home, work, svc, sink)
    keystore.clear_cache()


def make_model_folder(root: Path, big: int = 3 * (1 << 20) + 17) -> Path:
    """A small Hugging Face-style folder: config, a weight shard, tokenizer, a nested file."""
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
    (root / "model.safetensors").write_bytes(os.urandom(big))
    (root / "tokenizer.json").write_text('{"version": "1.0", "vocab": {"a": 1}}')
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "nested" / "deeper" / "adapter.bin").write_bytes(os.urandom(1000))
    (root / "empty.txt").write_bytes(b"")
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True, scope="session")
def _in_process_cli_keeps_the_hard_core_limit() -> Iterator[None]:
    """``main()`` lowers the hard core-dump limit for good, as the CLI process must. Tests
    call it in this process, whose children (the core-dump tests' probes) would inherit a
    limit nobody can raise again; here it lowers the soft limit only. The CLI's own
    hardening is tested in a child process of its own (tests/test_findings_loaders.py)."""
    from modelseal.util import hardening

    mp = pytest.MonkeyPatch()
    mp.setattr(hardening, "harden_cli", lambda: hardening.disable_core_dumps(permanent=False))
    yield
    mp.undo()
