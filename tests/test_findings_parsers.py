"""Finding 8 of the outside review, and the same class in every parser of untrusted input.

A sealed manifest of ~130 KiB holding one path 65,000 segments deep made validation
quadratic in the depth and exhausted 1 GiB. The rule: bounds (path length and depth,
nesting, number of values, lengths) are in the spec, checked first, and validation is
linear. The same pattern is looked for in the trust policy (TOML), revocation lists,
signature files and statements, OMS bundles and the safetensors header.

Exploits that were super-linear run in a subprocess under a 1 GiB address-space cap
(``RLIMIT_AS``) and a timeout, so a regression fails fast instead of eating the machine.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

import modelseal
from modelseal.errors import DecryptionError, PolicyDenied, VerificationError
from modelseal.format.folder import (
    MAX_MANIFEST,
    Entry,
    encode_manifest,
    is_safe_relpath,
    parse_manifest,
    read_manifest,
)
from modelseal.format.header import KIND_MANIFEST
from modelseal.format.reader import SealedReader
from modelseal.loaders.safetensors import SafetensorsError, parse_header
from modelseal.recipes.writing import check_sealable
from modelseal.signing.sigfile import MAX_SIGNATURES, SignatureFile
from modelseal.signing.signers import generate
from modelseal.signing.trust import PolicyError, load_policy
from modelseal.util.bounded import json_loads, toml_loads

from .conftest import Env

VECTORS = Path(__file__).parent / "vectors"
BOUNDS = json.loads((VECTORS / "bounds.json").read_text(encoding="utf-8"))
CAP = 1 << 30
TIMEOUT = 20


def run_capped(code: str, env: dict[str, str] | None = None, recursion_limit: int | None = None) -> str:
    """Run ``code`` in a fresh interpreter under a 1 GiB address-space cap and a timeout;
    return its stdout (the test fails on a crash, a MemoryError or the timeout)."""
    prelude = f"import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, ({CAP}, {CAP}))\n"
    if recursion_limit:
        prelude += f"sys.setrecursionlimit({recursion_limit})\n"
    # The helpers below, for code that reads a safetensors header from memory (the
    # subprocess cannot import this module: it belongs to the tests package).
    prelude += "".join(inspect.getsource(f) for f in (Bytes, safetensors_bytes))
    try:
        r = subprocess.run(
            [sys.executable, "-c", prelude + textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env or dict(os.environ),
            cwd=Path(__file__).parent,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {TIMEOUT} s: super-linear work")
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    return r.stdout


def vector_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "vector-home"
    shutil.copytree(VECTORS / "home", home)
    (home / "keystore.json").chmod(0o600)  # git does not keep file modes
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSEAL_")}
    env.update(MODELSEAL_HOME=str(home), MODELSEAL_PASSPHRASE=BOUNDS["passphrase"])
    return env


class Bytes:
    """A plaintext in memory, as ``parse_header`` reads one (``RandomAccess``)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def preadinto(self, offset: int, buf: bytearray | memoryview, *, private: bool = False) -> int:
        chunk = self.data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        pass


def safetensors_bytes(header: bytes) -> Bytes:
    return Bytes(len(header).to_bytes(8, "little") + header)


# --- finding 8: the sealed manifest ------------------------------------------------------------


def test_review_exploit_deep_path_is_refused_fast_under_a_memory_cap() -> None:
    """The review's manifest: one path of 65,000 segments in ~130 KiB. It exhausted 1 GiB."""
    out = run_capped(
        """
        from modelseal.errors import DecryptionError
        from modelseal.format.folder import Entry, encode_manifest, parse_manifest
        data = encode_manifest([Entry("a/" * 64_999 + "a", 0, "0" * 64, "0" * 32, "0" * 64)])
        assert 125 << 10 < len(data) < 130 << 10
        try:
            parse_manifest(data)
        except DecryptionError:
            print("refused")
        """
    )
    assert out.split() == ["refused"]


def test_review_exploit_through_unseal_exits_3_and_writes_nothing(tmp_path: Path) -> None:
    """The same manifest, sealed under a real key (the golden vector): ``modelseal unseal``
    refuses it as a header failure (exit 3), under the memory cap, and writes nothing."""
    env = vector_env(tmp_path)
    out_dir = tmp_path / "out"
    src = VECTORS / "bounds-bad-exploit-depth.sealed"
    out = run_capped(
        f"""
        from modelseal.cli import main
        print("exit", main(["unseal", {str(src)!r}, {str(out_dir)!r}]))
        """,
        env,
    )
    assert out.split() == ["exit", "3"]
    assert not out_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["vector-home"]


def test_path_bounds_are_bytes_and_segments() -> None:
    ascii_4096 = "long/" + "x" * 4091
    utf8_4096 = "utf8/" + "\u00e9" * 2045 + "x"
    deep_256 = "d/" * 255 + "f"
    assert all(is_safe_relpath(p) for p in (ascii_4096, utf8_4096, deep_256))
    assert len(utf8_4096) < 4096 == len(utf8_4096.encode())
    for too_far in (ascii_4096 + "x", "utf8/" + "\u00e9" * 2046, "d/" * 256 + "f", "a/" * 64_999 + "a"):
        assert not is_safe_relpath(too_far)


def test_manifest_at_the_limits_validates_in_linear_time() -> None:
    """3,000 paths of exactly 4096 bytes and 256 segments, each with its own parents: the
    old prefix set built ~1.5 GB of parent strings; now it is one binary search each."""
    out = run_capped(
        """
        from modelseal.format.folder import Entry, encode_manifest, parse_manifest
        rest = "/".join(["s" * 15] * 255)[16:]
        entries = [Entry(f"{i:015d}/{rest}/{i:016d}", 0, "0" * 64, f"{i:032x}", "0" * 64) for i in range(3000)]
        assert {(len(e.path.encode()), e.path.count("/") + 1) for e in entries} == {(4096, 256)}
        print(len(parse_manifest(encode_manifest(entries))))
        """
    )
    assert out.split() == ["3000"]


def test_a_file_that_is_also_a_folder_is_found_when_not_adjacent() -> None:
    def entries(*paths: str) -> list[Entry]:
        return [Entry(p, 0, "0" * 64, f"{i:032x}", "0" * 64) for i, p in enumerate(paths)]

    # "p!x" sorts between "p" and "p/z" ('!' < '/'): a neighbour-only check misses it.
    with pytest.raises(DecryptionError):
        parse_manifest(encode_manifest(entries("p", "p!x", "p/z")))
    with pytest.raises(DecryptionError):
        parse_manifest(encode_manifest(entries("a/b", "a/b!", "a/b/c/d")))
    assert [e.path for e in parse_manifest(encode_manifest(entries("p", "p!x", "p.y/z", "q/p")))] == [
        "p",
        "p!x",
        "p.y/z",
        "q/p",
    ]


def test_manifest_nesting_and_values_are_bounded_before_parsing() -> None:
    deep = b'{"files":' + b"[" * 100_000 + b"]" * 100_000 + b',"format":"modelseal-manifest/1"}'
    with pytest.raises(DecryptionError):
        parse_manifest(deep)  # was a RecursionError, not a typed error
    with pytest.raises(DecryptionError):
        parse_manifest(b'{"files":[{"size":' + b"9" * 5000 + b"}]}")
    with pytest.raises(DecryptionError):  # a lone surrogate used to escape as UnicodeEncodeError
        parse_manifest(b'{"files":[],"format":"\\ud800"}')
    sized = encode_manifest([Entry("a", 1 << 64, "0" * 64, "0" * 32, "0" * 64)])
    with pytest.raises(DecryptionError):
        parse_manifest(sized)


def test_read_manifest_refuses_an_oversized_claim_before_allocating() -> None:
    """``readall`` allocates the length the header claims (up to 2^50, from a sparse file):
    ``read_manifest`` checks it against 64 MiB first."""

    class Claim:
        raw_artifact = SimpleNamespace(core=SimpleNamespace(kind=KIND_MANIFEST))
        size = MAX_MANIFEST + 1

        def readall(self) -> bytes:
            raise AssertionError("allocated the claimed length")

    with pytest.raises(DecryptionError):
        read_manifest(cast(SealedReader, Claim()))
    Claim.size = 1 << 50
    with pytest.raises(DecryptionError):
        read_manifest(cast(SealedReader, Claim()))


def test_seal_refuses_a_folder_readers_would_refuse_before_writing(env: Env) -> None:
    src = env.work / "deep"
    leaf = src.joinpath(*(["d"] * 256))
    leaf.mkdir(parents=True)
    (leaf / "f").write_bytes(b"257 segments")
    with pytest.raises(PolicyDenied, match="more than 256 levels deep"):
        modelseal.seal(src, env.work / "deep.sealed", key="test-kek", keys=env.svc)
    assert sorted(p.name for p in env.work.iterdir()) == ["deep"]  # no output, no temp name
    (leaf / "f").rename(leaf.parent / "f")  # 256 segments: sealed, and it opens
    modelseal.seal(src, env.work / "deep.sealed", key="test-kek", keys=env.svc)
    with modelseal.open_folder(env.work / "deep.sealed", keys=env.svc) as f:
        assert f.read("/".join(["d"] * 255 + ["f"])) == b"257 segments"
    with pytest.raises(PolicyDenied, match="longer than 4096 bytes"):
        check_sealable(["ok", "a/" + "b" * 4095])
    with pytest.raises(PolicyDenied, match="at most 100000 files"):
        check_sealable([f"{i}" for i in range(100_001)])


def test_bound_vectors(tmp_path: Path) -> None:
    """tests/vectors/bounds.json: through the API with the vector keystore, and at the
    format level with the recorded data key (a second reader needs no provider)."""
    vectors = {v["folder"]: v for v in BOUNDS["vectors"]}
    assert {v["expect"] for v in vectors.values()} == {"success", "header failure"}
    out = run_capped(
        f"""
        import hashlib, json, os
        from pathlib import Path
        import modelseal
        from modelseal.audit.events import MemorySink
        from modelseal.errors import DecryptionError
        from modelseal.format.envelope import verify_with_dek
        from modelseal.format.file import read_raw
        from modelseal.format.reader import SealedReader
        from modelseal.format.folder import parse_manifest
        from modelseal.format.source import FdSource
        from modelseal.keys.service import KeyService

        svc = KeyService(sink=MemorySink())
        results = {{}}
        for v in json.loads(Path({str(VECTORS / "bounds.json")!r}).read_text(encoding="utf-8"))["vectors"]:
            root = Path({str(VECTORS)!r}) / v["folder"]
            try:
                with modelseal.open_folder(root, keys=svc) as f:
                    api = ["success", {{p: hashlib.sha256(f.read(p)).hexdigest() for p in f}}]
            except DecryptionError:
                api = ["header failure", None]
            src = FdSource(os.open(root / "manifest.mseal", os.O_RDONLY))
            raw = read_raw(src)
            with SealedReader(src, raw, verify_with_dek(raw.core, bytes.fromhex(v["dek"]))) as r:
                plain = r.readall()
            assert len(plain) == v["manifest_length"]
            try:
                parse_manifest(plain)
                direct = "success"
            except DecryptionError:
                direct = "header failure"
            results[v["folder"]] = [api, direct]
        print(json.dumps(results))
        """,
        vector_env(tmp_path),
    )
    results = json.loads(out)
    assert set(results) == set(vectors)
    for name, ((api, files), direct) in results.items():
        want = vectors[name]
        assert (name, api, direct) == (name, want["expect"], want["expect"])
        assert files == want["files"]


# --- the same class in the other parsers -------------------------------------------------------


def test_deep_nesting_is_refused_even_with_a_raised_recursion_limit(tmp_path: Path) -> None:
    """With a high recursion limit (as some ML code sets) the C JSON parser overflowed the
    stack on deep input: a signature file of a million '[' killed the process (SIGSEGV)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a").write_bytes(b"a")
    out = run_capped(
        f"""
        from pathlib import Path
        from modelseal.errors import ModelsealError
        from modelseal.format.folder import parse_manifest
        from modelseal.loaders.safetensors import parse_header
        from modelseal.signing.oms import read_bundle
        from modelseal.signing.revocation import RevocationList
        from modelseal.signing.sigfile import SignatureFile, Statement
        from modelseal.signing.trust import load_policy

        deep = b"[" * 1_000_000 + b"]" * 1_000_000
        hidden = b'["]",' * 300_000 + b"[]" + b',"["]' * 300_000  # brackets in strings cancel out
        tmp = Path({str(tmp_path)!r})
        (tmp / "deep.json").write_bytes(deep)
        (tmp / "deep.toml").write_text("version = [" + "[" * 300_000 + "]" * 300_000 + "]")
        cases = {{
            "manifest": lambda: parse_manifest(deep),
            "sigfile": lambda: SignatureFile.parse(deep),
            "sigfile hidden": lambda: SignatureFile.parse(hidden),
            "statement": lambda: Statement.parse(deep),
            "revocation list": lambda: RevocationList.load(tmp / "deep.json", {{}}),
            "revocation payload": lambda: RevocationList.parse_payload(deep),
            "oms bundle": lambda: read_bundle(tmp / "deep.json"),
            "safetensors": lambda: parse_header(safetensors_bytes(deep)),
            "trust policy": lambda: load_policy(tmp / "deep.toml"),
        }}
        for name, case in cases.items():
            try:
                case()
            except ModelsealError as e:
                print(name.replace(" ", "-"), type(e).__name__)
        """,
        recursion_limit=10_000_000,
    )
    assert out.splitlines() == [
        "manifest DecryptionError",
        "sigfile VerificationError",
        "sigfile-hidden VerificationError",
        "statement VerificationError",
        "revocation-list RevocationListError",
        "revocation-payload RevocationListError",
        "oms-bundle VerificationError",
        "safetensors SafetensorsError",
        "trust-policy PolicyError",
    ]


def test_value_counts_are_bounded_before_the_parser_allocates(tmp_path: Path) -> None:
    """Tens of MiB of empty lists made the JSON parser allocate GiBs before any schema check
    (a MemoryError, not a typed error, under the 1 GiB cap)."""
    out = run_capped(
        f"""
        from pathlib import Path
        from modelseal.errors import ModelsealError
        from modelseal.format.folder import parse_manifest
        from modelseal.loaders.safetensors import parse_header
        from modelseal.signing.oms import read_bundle
        from modelseal.signing.sigfile import SignatureFile

        def lists(n):
            return b"[" + b"[]," * (n // 3 - 1) + b"[]]"

        bundle = Path({str(tmp_path)!r}) / "model.sig"
        bundle.write_bytes(lists(40 << 20))
        cases = {{
            "manifest": lambda: parse_manifest(b'{{"files":' + lists(40 << 20) + b'}}'),
            "sigfile": lambda: SignatureFile.parse(b'{{"signatures":' + lists(40 << 20) + b'}}'),
            "oms": lambda: read_bundle(bundle),
            "safetensors": lambda: parse_header(safetensors_bytes(b'{{"a":{{"shape":' + lists(40 << 20) + b'}}}}')),
        }}
        for name, case in cases.items():
            try:
                case()
            except ModelsealError as e:
                print(name, type(e).__name__, "values" in str(e) or name == "manifest")
        """
    )
    assert out.splitlines() == [
        "manifest DecryptionError True",
        "sigfile VerificationError True",
        "oms VerificationError True",
        "safetensors SafetensorsError True",
    ]


def test_safetensors_shape_with_many_huge_dimensions_is_refused_in_linear_time() -> None:
    """math.prod over 200,000 dimensions near 2^62 is quadratic (minutes); the running
    product stops at 2^63, as the reference implementation's checked multiply does."""
    out = run_capped(
        """
        import json
        from modelseal.loaders.safetensors import SafetensorsError, parse_header
        spec = {"dtype": "U8", "shape": [(1 << 62) + 1] * 200_000, "data_offsets": [0, 0]}
        try:
            parse_header(safetensors_bytes(json.dumps({"t": spec}).encode()))
        except SafetensorsError as e:
            print("too-large" if "too large" in str(e) else e)
        """
    )
    assert out.split() == ["too-large"]
    overflow = {"t": {"dtype": "U8", "shape": [1 << 40, 1 << 40, 0], "data_offsets": [0, 0]}}
    with pytest.raises(SafetensorsError, match="too large"):
        parse_header(safetensors_bytes(json.dumps(overflow).encode()))
    empty = {"t": {"dtype": "U8", "shape": [0, 1 << 40], "data_offsets": [0, 0]}}
    assert parse_header(safetensors_bytes(json.dumps(empty).encode()))[0]["t"].shape == (0, 1 << 40)


def test_safetensors_header_nesting_and_integers_are_typed_errors() -> None:
    for header in (
        b'{"t":' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # was a RecursionError
        b'{"t":{"dtype":"U8","shape":[' + b"1" * 5000 + b'],"data_offsets":[0,0]}}',
        b'{"t":{"dtype":"U8","shape":[[[1]]],"data_offsets":[0,1]}}',  # deeper than the schema
        b'{"t":{"dtype":"U8"',
    ):
        with pytest.raises(SafetensorsError):
            parse_header(safetensors_bytes(header))


def test_trust_policy_long_dotted_key_is_refused_fast(tmp_path: Path) -> None:
    """tomllib's work on a dotted key grows with the square of its parts: a 300 KB table
    header took minutes and GiBs. The policy's keys have at most three parts."""
    policy = tmp_path / "policy.toml"
    policy.write_text("version = 1\n[" + "a." * 150_000 + "a]\n")
    out = run_capped(
        f"""
        from modelseal.signing.trust import PolicyError, load_policy
        try:
            load_policy({str(policy)!r})
        except PolicyError as e:
            print("dotted" if "dotted key" in str(e) else e)
        """
    )
    assert out.split() == ["dotted"]
    for text in (
        "version = 1\nx = " + "[" * 50_000 + "]" * 50_000,  # was a RecursionError
        'version = 1\n"a"."b"."c"."d"."e"."f"."g"."h"."i" = 1\n',  # quoted parts count too
        'version = 1\nx = "unterminated\n',
    ):
        policy.write_text(text)
        with pytest.raises(PolicyError):
            load_policy(policy)


def test_trust_policy_counts_are_bounded_before_keys_are_read(tmp_path: Path) -> None:
    """Each four-byte entry of a 1 MiB policy could make the verifier read and parse a key
    file: signers, rules, list entries and keys in all are counted first."""
    for i in range(5):
        (tmp_path / f"k{i}.pem").write_text(generate().public.pem())
    policy = tmp_path / "policy.toml"
    rule = '[[rules]]\nsigners = ["s0"]\n'

    def write(signers: int, keys: int, rules: int = 1) -> None:
        table = "".join(f"[signers.s{i}]\nkeys = {json.dumps([f'k{i}.pem'] * keys)}\n" for i in range(signers))
        policy.write_text("version = 1\n" + table + rule * rules)

    write(2, 3)
    assert len(load_policy(policy).signers) == 2
    for args, message in (
        ((1, 1025), "more than 1024 entries"),
        ((5, 1000), "more than 4096 keys"),
        ((1025, 1), "more than 1024 signers"),
        ((1, 1, 1025), "more than 1024"),
    ):
        write(*args)
        with pytest.raises(PolicyError, match=message):
            load_policy(policy)


def test_oms_signed_ignore_paths_are_bounded(tmp_path: Path) -> None:
    """Every file was compared with every signed ignore path: 200,000 of them over 300
    files took minutes."""
    model = tmp_path / "model"
    model.mkdir()
    for i in range(300):
        (model / f"f{i}").write_bytes(b"x")
    out = run_capped(
        f"""
        import hashlib
        from pathlib import Path
        from modelseal.errors import VerificationError
        from modelseal.signing.oms import make_bundle, verify_model
        from modelseal.signing.signers import P256, generate
        signer = generate(P256)
        model = Path({str(model)!r})
        rows = [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in model.iterdir()]
        ignores = [f"ignored/{{i}}" for i in range(200_000)]
        bundle = model.parent / "model.sig"
        bundle.write_bytes(make_bundle(signer, "m", rows, ignores))
        try:
            verify_model(model, bundle, [signer.public.key])
        except VerificationError as e:
            print("malformed" if "malformed statement" in str(e) else e)
        bundle.write_bytes(make_bundle(signer, "m", rows, ignores[:1024]))
        print(verify_model(model, bundle, [signer.public.key]).files)
        """
    )
    assert out.split() == ["malformed", "300"]


def test_signature_file_counts_signatures_before_parsing_them() -> None:
    doc: dict[str, object] = {"chunks": {}, "mediaType": "application/vnd.modelseal.signatures.v1+json"}
    doc.update(history=[], signatures=[{}] * (MAX_SIGNATURES + 1))
    with pytest.raises(VerificationError, match="too many signatures"):
        SignatureFile.parse(json.dumps(doc).encode())


# --- util.bounded ------------------------------------------------------------------------------


def test_bounded_json_counts_only_what_is_outside_strings() -> None:
    text = '"' + "[,{" * 1000 + '\\"]"'
    doc = json.dumps({"a": [text, {"b": text}]}).encode()
    # Five values: the object, the list, the two strings and the inner object.
    assert json_loads(doc, max_depth=3, max_values=5, error=ValueError) == {"a": [text, {"b": text}]}
    with pytest.raises(ValueError, match="nested more than 2"):
        json_loads(doc, max_depth=2, max_values=5, error=ValueError)
    with pytest.raises(ValueError, match="more than 4 values"):
        json_loads(doc, max_depth=3, max_values=4, error=ValueError)
    with pytest.raises(ValueError, match="unterminated"):
        json_loads(b'["' + b"[" * 100 + b'\\"' * (1 << 20) + b"]", max_depth=3, max_values=9, error=ValueError)
    # Brackets inside strings neither count nor hide real nesting: ["]", ["]", ... "["], "["]
    hidden = b'["]",' * 100 + b"[]" + b',"["]' * 100
    with pytest.raises(ValueError, match="nested more than 16"):
        json_loads(hidden, max_depth=16, max_values=1000, error=ValueError)
    assert json_loads(b'["\\\\", "\\"[", "]"]', max_depth=1, max_values=4, error=ValueError) == ["\\", '"[', "]"]
    with pytest.raises(ValueError, match="not UTF-8"):  # in UTF-16 a bracket byte may be half a character
        json_loads('["\u225b"]'.encode("utf-16-le"), max_depth=1, max_values=2, error=ValueError)
    assert json_loads(b"[-" + b"1" * 40 + b"]", max_depth=1, max_values=2, error=ValueError) == [-int("1" * 40)]
    with pytest.raises(ValueError, match="not valid JSON"):
        json_loads(b"[" + b"1" * 41 + b"]", max_depth=1, max_values=2, error=ValueError)
    assert json_loads(b'"' + b"x" * (3 << 20) + b'"', max_depth=0, max_values=1, error=ValueError) == "x" * (3 << 20)


def test_bounded_toml_ignores_strings_and_comments() -> None:
    def load(text: str, parts: int = 3) -> dict[str, object]:
        return toml_loads(text, max_depth=2, max_key_parts=parts, max_values=100, error=ValueError)

    text = (
        "# a.b.c.d.e [[[[ {{{{\n"
        'a.b.c = "x.y.z.w.v [[[["\n'
        "l = 'p.q.r.s.t'\n"
        'm = """one\n"two".three.four.five [[[ """"\n'
        "n = '''a.b.c.d.e'''\n"
        "[t]\nf = [1.5, 2.5]\n"
    )
    assert load(text)["m"] == 'one\n"two".three.four.five [[[ "'
    with pytest.raises(ValueError, match="more than 3 parts"):
        load('a . "b" . c . d = 1')
    with pytest.raises(ValueError, match="nested more than 2"):
        load("x = [[[1]]]")
    with pytest.raises(ValueError, match="unterminated"):
        load('x = """never closed')
