"""``modelseal push``/``pull`` against Debian's ``docker-registry`` (CNCF distribution 2.8) behind
mutual TLS on 127.0.0.1: files and folders, signatures as referrers through the tag-scheme
fallback (2.8 has no referrers API), verification before anything reaches DST, a tampered or
unsigned artifact leaving nothing behind, resumed uploads and downloads, oci:// loads, the CLI.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import modelseal
from modelseal import registry
from modelseal.cli import main
from modelseal.errors import DigestMismatch, RegistryError, VerificationError
from modelseal.registry import layout
from modelseal.registry.client import Repository
from modelseal.registry.reference import Endpoint
from modelseal.registry.transport import Transport
from modelseal.signing.signers import P256, PemSigner, generate, private_pem
from modelseal.signing.trust import load_policy
from tests.conftest import Env, make_model_folder, tree_bytes
from tests.push_pull_helpers import DOCKER_REGISTRY, CuttingRelay, Pki, docker_registry, make_pki

KEY = "local:test-kek"
pytestmark = pytest.mark.skipif(not os.path.exists(DOCKER_REGISTRY), reason="docker-registry is not installed")


@dataclass
class Reg:
    env: Env
    pki: Pki
    port: int
    signer: Path
    policy: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kw(self, **extra: object) -> dict[str, object]:
        return {"tls_dir": self.pki.client_dir, "pins": self.pki.pins(), **extra}

    def repo(self, name: str) -> Repository:
        return Repository(Transport([Endpoint("127.0.0.1", self.port)], self.pki.client_dir, self.pki.pins()), name)


@pytest.fixture
def reg(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[Reg]:
    monkeypatch.setenv("MODELSEAL_CACHE", str(env.work / "cache"))
    monkeypatch.delenv("MODELSEAL_TRUST", raising=False)
    pki = make_pki(env)
    s = generate(P256)
    signer = env.work / "release.pem"
    signer.write_bytes(private_pem(s, None))
    (env.work / "release.pub").write_text(s.public.pem())
    policy = env.work / "trust.toml"
    policy.write_text(
        'version = 1\nstrict = true\n[signers.release]\nkeys = ["' + str(env.work / "release.pub") + '"]\n'
        '[[rules]]\nartifacts = ["*"]\nenvironments = ["*"]\nsigners = ["release"]\n'
    )
    os.chmod(policy, 0o600)
    with docker_registry(env.work, pki.server_dir, pki.client_dir) as port:
        yield Reg(env, pki, port, signer, policy)


def sealed_file(reg: Reg, name: str = "weights", size: int = 5 * (1 << 20) + 123, sign: bool = True) -> Path:
    src = reg.env.work / f"{name}.bin"
    src.write_bytes(os.urandom(size))
    dst = reg.env.work / f"{name}.sealed"
    signer = PemSigner.from_file(reg.signer) if sign else None
    modelseal.seal(src, dst, KEY, keys=reg.env.svc, sign_key=signer, name=name if sign else None)
    return dst


def sealed_folder(reg: Reg, name: str = "model", sign: bool = True) -> Path:
    src = make_model_folder(reg.env.work / f"src-{name}")
    dst = reg.env.work / f"{name}.sealed"
    signer = PemSigner.from_file(reg.signer) if sign else None
    modelseal.seal(src, dst, KEY, keys=reg.env.svc, sign_key=signer, name=name if sign else None)
    return dst


def test_push_pull_file_round_trip_with_signatures_via_tag_fallback(reg: Reg) -> None:
    art = sealed_file(reg)
    pushed = registry.push(art, f"{reg.host}/models/weights:v1", **reg.kw())
    assert pushed.signatures is not None and pushed.sent == art.stat().st_size
    repo = reg.repo("models/weights")
    # distribution 2.8 has no referrers API: the signature is listed under sha256-<hex>
    assert repo.referrers(pushed.digest, layout.SIGNATURES) is None
    assert layout.fallback_tag(pushed.digest) in repo.tags()
    got = repo.get_manifest("v1")
    assert got is not None and got[1] == pushed.digest
    doc = json.loads(got[0])
    assert doc["artifactType"] == layout.ARTIFACT_TYPE and [x["mediaType"] for x in doc["layers"]] == [
        layout.SEALED_FILE
    ]
    assert b"weights" not in got[0]  # no plaintext name in the manifest

    dst = reg.env.work / "pulled" / "weights.sealed"
    dst.parent.mkdir()
    pulled = registry.pull(f"{reg.host}/models/weights:v1", dst, verify=load_policy(reg.policy), **reg.kw())
    assert pulled.verdict is not None and pulled.verdict.signed
    assert dst.read_bytes() == art.read_bytes()
    assert (dst.parent / "weights.sealed.msig").read_bytes() == (art.parent / "weights.sealed.msig").read_bytes()
    assert sorted(p.name for p in dst.parent.iterdir()) == ["weights.sealed", "weights.sealed.msig"]
    assert modelseal.open(dst, keys=reg.env.svc).read() == (reg.env.work / "weights.bin").read_bytes()
    # pushing again sends nothing and attaches no second referrer
    again = registry.push(art, f"{reg.host}/models/weights:v1", **reg.kw())
    assert again.sent == 0 and again.digest == pushed.digest and again.signatures == pushed.signatures


def test_push_pull_folder_keeps_names_opaque(reg: Reg) -> None:
    art = sealed_folder(reg)
    pushed = registry.push(art, f"{reg.host}/team/model:v2", **reg.kw(chunk=1 << 20))
    got = reg.repo("team/model").get_manifest(pushed.digest)
    assert got is not None
    for plain in (b"config.json", b"tokenizer", b"safetensors", b"adapter", b"nested"):
        assert plain not in got[0]
    dst = reg.env.work / "model-pulled"
    registry.pull(f"{reg.host}/team/model@{pushed.digest}", dst, verify=load_policy(reg.policy), **reg.kw(part=1 << 20))
    assert tree_bytes(dst) == tree_bytes(art)
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(".model-pulled")]
    with modelseal.open_folder(dst, keys=reg.env.svc) as f:
        assert f.read("config.json") == (reg.env.work / "src-model" / "config.json").read_bytes()


def test_tampered_blob_leaves_nothing_behind(reg: Reg) -> None:
    art = sealed_file(reg, "tampered")
    pushed = registry.push(art, f"{reg.host}/models/tampered:v1", **reg.kw())
    layer = json.loads(reg.repo("models/tampered").get_manifest("v1")[0])["layers"][0]  # type: ignore[index]
    hexd = layer["digest"].removeprefix("sha256:")
    blob = next((reg.env.work / "dr-storage").rglob(f"blobs/sha256/{hexd[:2]}/{hexd}/data"))
    data = bytearray(blob.read_bytes())
    data[-100] ^= 1
    blob.write_bytes(bytes(data))
    out = reg.env.work / "out"
    out.mkdir()
    with pytest.raises(DigestMismatch):
        registry.pull(f"{reg.host}/models/tampered@{pushed.digest}", out / "t.sealed", verify=False, **reg.kw())
    assert list(out.iterdir()) == []


def test_unsigned_under_strict_policy_leaves_nothing_behind(reg: Reg) -> None:
    art = sealed_file(reg, "unsigned", sign=False)
    pushed = registry.push(art, f"{reg.host}/models/unsigned:v1", **reg.kw())
    assert pushed.signatures is None
    out = reg.env.work / "out"
    out.mkdir()
    with pytest.raises(VerificationError):
        registry.pull(f"{reg.host}/models/unsigned:v1", out / "u.sealed", verify=load_policy(reg.policy), **reg.kw())
    assert list(out.iterdir()) == []
    # without a policy (verify=False) it arrives, digests checked
    registry.pull(f"{reg.host}/models/unsigned:v1", out / "u.sealed", verify=False, **reg.kw())
    assert (out / "u.sealed").read_bytes() == art.read_bytes()


def test_signature_of_another_artifact_is_refused(reg: Reg) -> None:
    a = sealed_file(reg, "alpha")
    b = sealed_file(reg, "beta", sign=False)
    pa = registry.push(a, f"{reg.host}/models/x:a", **reg.kw())
    pb = registry.push(b, f"{reg.host}/models/x:b", **reg.kw())
    # graft alpha's valid signature file onto beta as a referrer
    repo = reg.repo("models/x")
    sig = (a.parent / "alpha.sealed.msig").read_bytes()
    manifest_b = repo.get_manifest(pb.digest)
    assert manifest_b is not None and pa.signatures is not None
    from modelseal.registry.transfer import attach_signatures

    attach_signatures(repo, layout.Descriptor(layout.IMAGE_MANIFEST, pb.digest, len(manifest_b[0])), sig)
    out = reg.env.work / "graft"
    out.mkdir()
    with pytest.raises(VerificationError):
        registry.pull(f"{reg.host}/models/x:b", out / "b.sealed", verify=load_policy(reg.policy), **reg.kw())
    assert list(out.iterdir()) == []


def test_interrupted_download_resumes_in_process_and_across_runs(reg: Reg) -> None:
    art = sealed_file(reg, "big", size=24 << 20)
    registry.push(art, f"{reg.host}/models/big:v1", **reg.kw())
    # a real network fault: the relay cuts the first two connections after 3 MiB from the server
    relay = CuttingRelay(reg.port, 3 << 20, "down", cuts=2)
    try:
        dst = reg.env.work / "big-pulled.sealed"
        pulled = registry.pull(f"{reg.host.split(':')[0]}:{relay.port}/models/big:v1", dst, verify=False, **reg.kw())
        assert relay.cut == 2 and dst.read_bytes() == art.read_bytes() and pulled.size == art.stat().st_size
    finally:
        relay.close()

    # across runs: the first pull stops after ~10 MiB; the second fetches only the rest
    class Stop(Exception):
        pass

    def stop_at_10(done: int, total: int) -> None:
        if done >= 10 << 20:
            raise Stop

    dst2 = reg.env.work / "big2.sealed"
    with pytest.raises(Stop):
        registry.pull(
            f"{reg.host}/models/big:v1", dst2, verify=False, jobs=1, part=4 << 20, progress=stop_at_10, **reg.kw()
        )
    assert not dst2.exists()
    assert [p for p in reg.env.work.iterdir() if p.name.startswith(".big2.sealed.pull-")]
    seen: list[int] = []
    registry.pull(
        f"{reg.host}/models/big:v1",
        dst2,
        verify=False,
        jobs=1,
        part=4 << 20,
        progress=lambda d, t: seen.append(d),
        **reg.kw(),
    )
    assert dst2.read_bytes() == art.read_bytes()
    assert seen[0] >= 9 << 20  # the first progress report already counts what the first run fetched
    assert not [p for p in reg.env.work.iterdir() if p.name.startswith(".big2.sealed.pull-")]


def test_interrupted_upload_resumes(reg: Reg) -> None:
    art = sealed_file(reg, "up", size=12 << 20)

    class Stop(Exception):
        pass

    def stop_at_5(done: int, total: int) -> None:
        if done >= 5 << 20:
            raise Stop

    ref = f"{reg.host}/models/up:v1"
    with pytest.raises(Stop):
        registry.push(art, ref, chunk=1 << 20, progress=stop_at_5, **reg.kw())
    assert list((reg.env.work / "cache" / "uploads").iterdir())  # the upload's location was kept
    pushed = registry.push(art, ref, chunk=1 << 20, **reg.kw())
    assert 0 < pushed.sent <= art.stat().st_size - (5 << 20)  # only the rest was sent
    dst = reg.env.work / "up-pulled.sealed"
    registry.pull(ref, dst, verify=False, **reg.kw())
    assert dst.read_bytes() == art.read_bytes()
    assert not list((reg.env.work / "cache" / "uploads").iterdir())


def test_upload_chunk_cut_mid_patch_still_completes(reg: Reg) -> None:
    art = sealed_file(reg, "cut", size=6 << 20)
    relay = CuttingRelay(reg.port, 2 << 20, "up", cuts=1)
    try:
        pushed = registry.push(art, f"127.0.0.1:{relay.port}/models/cut:v1", chunk=1 << 20, **reg.kw())
    finally:
        relay.close()
    assert relay.cut == 1
    dst = reg.env.work / "cut-pulled.sealed"
    registry.pull(f"{reg.host}/models/cut@{pushed.digest}", dst, verify=False, **reg.kw())
    assert dst.read_bytes() == art.read_bytes()


def test_cross_repository_mount(reg: Reg) -> None:
    art = sealed_file(reg, "shared", sign=False)
    registry.push(art, f"{reg.host}/a/one:v1", **reg.kw())
    pushed = registry.push(art, f"{reg.host}/b/two:v1", mount_from="a/one", **reg.kw())
    assert pushed.sent == 0
    dst = reg.env.work / "mounted.sealed"
    registry.pull(f"{reg.host}/b/two:v1", dst, verify=False, **reg.kw())
    assert dst.read_bytes() == art.read_bytes()


def test_existing_destination_is_refused_before_anything_is_fetched(reg: Reg) -> None:
    art = sealed_file(reg, "exists", sign=False)
    registry.push(art, f"{reg.host}/models/exists:v1", **reg.kw())
    dst = reg.env.work / "exists-dst.sealed"
    dst.write_bytes(b"keep me")
    with pytest.raises(modelseal.errors.DestinationExists):
        registry.pull(f"{reg.host}/models/exists:v1", dst, verify=False, **reg.kw())
    assert dst.read_bytes() == b"keep me"
    registry.pull(f"{reg.host}/models/exists:v1", dst, verify=False, force=True, **reg.kw())
    assert dst.read_bytes() == art.read_bytes()


def test_unknown_tag_and_bad_names_are_one_line_errors(reg: Reg) -> None:
    with pytest.raises(RegistryError) as e:
        registry.pull(f"{reg.host}/models/none:v1", reg.env.work / "n", verify=False, **reg.kw())
    assert "\n" not in str(e.value) and e.value.exit_code == 15
    for bad in (f"{reg.host}/Models/x:v1", f"{reg.host}/a/../b:v1", f"{reg.host}/a\x00b:v1"):
        with pytest.raises(RegistryError):
            registry.pull(bad, reg.env.work / "n", verify=False, **reg.kw())


def test_oci_loader_pulls_into_the_ciphertext_cache(reg: Reg, monkeypatch: pytest.MonkeyPatch) -> None:
    art = sealed_folder(reg, "loadme")
    registry.push(art, f"{reg.host}/team/loadme:v1", **reg.kw())
    monkeypatch.setenv("MODELSEAL_TLS_DIR", str(reg.pki.client_dir))
    monkeypatch.setenv("MODELSEAL_REGISTRY_PINS", ",".join(reg.pki.pins()))
    monkeypatch.setenv("MODELSEAL_TRUST", str(reg.policy))
    from modelseal.loaders.common import read_member

    data = read_member(f"oci://{reg.host}/team/loadme:v1", "config.json", keys=reg.env.svc)
    assert bytes(data) == (reg.env.work / "src-loadme" / "config.json").read_bytes()
    cached = list((reg.env.work / "cache" / "sha256").iterdir())
    assert len([p for p in cached if p.is_dir()]) == 1
    for p in (reg.env.work / "cache").rglob("*"):  # ciphertext only: no plaintext bytes in the cache
        if p.is_file():
            assert b"bert" not in p.read_bytes()


def test_cli_push_and_pull(reg: Reg, capsys: pytest.CaptureFixture[str]) -> None:
    art = sealed_file(reg, "cli")
    pins = [a for p in reg.pki.pins() for a in ("--pin", p)]
    tls = ["--tls-dir", str(reg.pki.client_dir)]
    assert main(["push", str(art), f"{reg.host}/models/cli:v1", *tls, *pins]) == 0
    out = capsys.readouterr().out
    assert "sha256:" in out
    dst = reg.env.work / "cli-pulled.sealed"
    assert main(["pull", f"{reg.host}/models/cli:v1", str(dst), *tls, *pins, "--trust", str(reg.policy)]) == 0
    assert dst.read_bytes() == art.read_bytes()
    assert main(["pull", f"{reg.host}/models/nothing:v1", str(reg.env.work / "x"), *tls, *pins]) == 15
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MANIFEST_UNKNOWN" in err
