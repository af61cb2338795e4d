"""Fuzzing the header parser and the reader: only documented errors, never a crash.

Bounded in time (hypothesis example counts), run on every CI build. Mutations
start from real sealed files so they reach deep into the parser.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelseal
from modelseal.errors import ModelsealError
from modelseal.format.folder import parse_manifest
from modelseal.format.header import parse_core, parse_slot

from .conftest import Env

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(st.binary(max_size=4096))
def test_parse_core_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ModelsealError):
        parse_core(data)


@SETTINGS
@given(st.binary(max_size=1024))
def test_parse_slot_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ModelsealError):
        parse_slot(data)


@SETTINGS
@given(st.binary(max_size=512) | st.text(max_size=300).map(str.encode))
def test_parse_manifest_random(data: bytes) -> None:
    with contextlib.suppress(ModelsealError):
        parse_manifest(data)


@pytest.fixture
def sealed_sample(env: Env) -> tuple[Env, bytes, bytes]:
    plain = os.urandom(70_000)
    src = env.work / "f.bin"
    src.write_bytes(plain)
    modelseal.seal(src, env.work / "f.sealed", key="test-kek", context={"env": "dev"}, keys=env.svc)
    return env, (env.work / "f.sealed").read_bytes(), plain


mutation = st.tuples(
    st.sampled_from(["flip", "set", "cut", "insert", "delete"]),
    st.integers(min_value=0, max_value=10_000),
    st.integers(min_value=0, max_value=255),
)


@SETTINGS
@given(st.lists(mutation, min_size=1, max_size=4))
def test_mutated_sealed_file_only_documented_errors(
    sealed_sample: tuple[Env, bytes, bytes], muts: list[tuple[str, int, int]]
) -> None:
    env, sealed, plain = sealed_sample
    data = bytearray(sealed)
    for op, pos, val in muts:
        pos %= max(len(data), 1)
        if op == "flip" and data:
            data[pos] ^= 1 << (val % 8)
        elif op == "set" and data:
            data[pos] = val
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = bytes([val])
        elif op == "delete" and data:
            del data[pos]
    target: Path = env.work / "fuzz.sealed"
    target.write_bytes(bytes(data))
    try:
        with modelseal.open(target, keys=env.svc) as r:
            got = r.read()
    except ModelsealError:
        return
    # Accepted only if the change was a no-op on the authenticated content.
    assert got == plain
