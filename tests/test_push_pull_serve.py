"""``modelseal push``/``pull`` against our own ``modelseal serve`` (a subprocess on 127.0.0.1,
stopped by PID): the referrers API instead of the tag fallback, chunked uploads, ranged
pulls, failover to a second instance, a tampered artifact refused under a strict policy, and
junk signature referrers (newer than the genuine one) that neither block a verified pull nor
end up beside an unverified one."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import modelseal
from modelseal import registry
from modelseal.errors import VerificationError
from modelseal.registry import layout, transfer
from modelseal.registry.client import Repository
from modelseal.registry.reference import Endpoint
from modelseal.registry.transport import Transport
from modelseal.signing.signers import P256, PemSigner, generate, private_pem
from modelseal.signing.trust import load_policy
from tests.conftest import Env, make_model_folder, tree_bytes
from tests.push_pull_helpers import Pki, make_pki, modelseal_serve
from tests.services import free_port

KEY = "local:test-kek"


@dataclass
class Srv:
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


@pytest.fixture
def srv(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[Srv]:
    yield from _srv(env, monkeypatch)


@pytest.fixture
def srv_any(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[Srv]:
    """A general OCI registry (``--content any``): anyone with push rights may attach junk."""
    yield from _srv(env, monkeypatch, "--content", "any")


def _srv(env: Env, monkeypatch: pytest.MonkeyPatch, *args: str) -> Iterator[Srv]:
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
    data = env.work / "serve-data"
    with modelseal_serve(env.work, pki.server_dir, pki.client_dir, "--data", str(data), *args) as port:
        yield Srv(env, pki, port, signer, policy)


def _seal(srv: Srv, src: Path, name: str, sign: bool = True) -> Path:
    dst = srv.env.work / f"{name}.sealed"
    signer = PemSigner.from_file(srv.signer) if sign else None
    modelseal.seal(src, dst, KEY, keys=srv.env.svc, sign_key=signer, name=name if sign else None)
    return dst


def test_file_round_trip_uses_the_referrers_api(srv: Srv) -> None:
    src = srv.env.work / "w.bin"
    src.write_bytes(os.urandom((9 << 20) + 5))
    art = _seal(srv, src, "weights")
    pushed = registry.push(art, f"{srv.host}/models/weights:v1", chunk=2 << 20, **srv.kw())
    assert pushed.signatures is not None
    repo = Repository(
        Transport([Endpoint("127.0.0.1", srv.port)], srv.pki.client_dir, srv.pki.pins()), "models/weights"
    )
    found = repo.referrers(pushed.digest, layout.SIGNATURES)
    assert found is not None and [d.digest for d in found] == [pushed.signatures]
    assert layout.fallback_tag(pushed.digest) not in repo.tags()  # no fallback tag where the API exists
    dst = srv.env.work / "pulled.sealed"
    pulled = registry.pull(
        f"{srv.host}/models/weights:v1", dst, verify=load_policy(srv.policy), part=2 << 20, **srv.kw()
    )
    assert pulled.verdict is not None and pulled.verdict.signed
    assert dst.read_bytes() == art.read_bytes()


def test_folder_round_trip_and_failover_to_a_live_endpoint(srv: Srv) -> None:
    art = _seal(srv, make_model_folder(srv.env.work / "src"), "model")
    dead = f"127.0.0.1:{free_port()}"
    registry.push(art, f"{dead}/team/model:v1", endpoints=[dead, srv.host], **srv.kw())
    dst = srv.env.work / "model-pulled"
    registry.pull(f"{srv.host}/team/model:v1", dst, verify=load_policy(srv.policy), **srv.kw())
    assert tree_bytes(dst) == tree_bytes(art)


def test_unsigned_under_strict_leaves_nothing(srv: Srv) -> None:
    src = srv.env.work / "u.bin"
    src.write_bytes(os.urandom(1 << 20))
    art = _seal(srv, src, "unsigned", sign=False)
    registry.push(art, f"{srv.host}/models/unsigned:v1", **srv.kw())
    out = srv.env.work / "out"
    out.mkdir()
    with pytest.raises(VerificationError):
        registry.pull(f"{srv.host}/models/unsigned:v1", out / "u.sealed", verify=load_policy(srv.policy), **srv.kw())
    assert list(out.iterdir()) == []


def _attach(repo: Repository, subject: layout.Descriptor, data: bytes, created: str) -> None:
    """Attach ``data`` as a signature referrer of ``subject`` with the ``created`` time given."""
    digest = repo.put_blob_bytes(data)
    body = layout.signature_manifest(layout.Descriptor(layout.SIGNATURES, digest, len(data)), subject, created)
    repo.put_manifest(layout.sha256_digest(body), body, layout.IMAGE_MANIFEST)


def _bad_signature(msig: bytes, salt: int = 0) -> bytes:
    """The genuine signature file with its signature bytes broken (it still parses and commits
    to the artifact; ``salt`` trailing spaces make distinct files)."""
    doc = json.loads(msig)
    sig = doc["signatures"][0]["envelope"]["signatures"][0]
    raw = bytearray(base64.b64decode(sig["sig"]))
    raw[-1] ^= 1
    sig["sig"] = base64.b64encode(bytes(raw)).decode()
    return json.dumps(doc).encode() + b" " * salt


def test_junk_signature_referrers_neither_block_nor_leak_into_a_pull(srv_any: Srv) -> None:
    srv = srv_any
    src = srv.env.work / "w.bin"
    src.write_bytes(os.urandom(1 << 20))
    art = _seal(srv, src, "weights")
    genuine = (srv.env.work / "weights.sealed.msig").read_bytes()
    ref = f"{srv.host}/models/weights:v1"
    pushed = registry.push(art, ref, **srv.kw())
    other_src = srv.env.work / "o.bin"
    other_src.write_bytes(os.urandom(1 << 20))
    _seal(srv, other_src, "other")  # a genuine signature file, of another artifact
    other = (srv.env.work / "other.sealed.msig").read_bytes()
    repo = Repository(
        Transport([Endpoint("127.0.0.1", srv.port)], srv.pki.client_dir, srv.pki.pins()), "models/weights"
    )
    got = repo.get_manifest(pushed.digest)
    assert got is not None
    subject = layout.Descriptor(layout.IMAGE_MANIFEST, pushed.digest, len(got[0]))
    _attach(repo, subject, _bad_signature(genuine), "2099-01-01T00:00:00Z")
    _attach(repo, subject, other, "2099-02-01T00:00:00Z")
    _attach(repo, subject, b'{"mediaType":"' + layout.SIGNATURES.encode() + b'","junk":1}', "2099-03-01T00:00:00Z")
    broken = json.loads(
        layout.signature_manifest(
            layout.Descriptor(layout.SIGNATURES, layout.sha256_digest(genuine), len(genuine)),
            subject,
            "2099-04-01T00:00:00Z",
        )
    )
    broken["layers"] *= 2  # not a signature manifest modelseal reads
    body = layout.encode(broken)
    repo.put_manifest(layout.sha256_digest(body), body, layout.IMAGE_MANIFEST)
    found = repo.referrers(pushed.digest, layout.SIGNATURES)
    assert found is not None and len(found) == 5

    # under the policy: the genuine one, fifth newest, is found and kept
    dst = srv.env.work / "ok" / "w.sealed"
    dst.parent.mkdir()
    pulled = registry.pull(ref, dst, verify=load_policy(srv.policy), **srv.kw())
    assert pulled.verdict is not None and pulled.verdict.signed
    assert (dst.parent / "w.sealed.msig").read_bytes() == genuine
    # without a policy: the newest signature file that commits to this artifact (unverified),
    # never the one of another artifact nor one that is no signature file
    dst2 = srv.env.work / "nopolicy" / "w.sealed"
    dst2.parent.mkdir()
    registry.pull(ref, dst2, verify=False, **srv.kw())
    assert (dst2.parent / "w.sealed.msig").read_bytes() == _bad_signature(genuine)
    # pushing again still finds its own referrer past the junk
    assert registry.push(art, ref, **srv.kw()).signatures == pushed.signatures

    # more junk than the pull tries: refused, naming how many, nothing left
    for i in range(transfer.MAX_SIGNATURE_CANDIDATES):
        _attach(repo, subject, _bad_signature(genuine, i + 1), f"2099-05-0{i + 1}T00:00:00Z")
    out = srv.env.work / "refused"
    out.mkdir()
    with pytest.raises(VerificationError, match="none of the 8 signature files") as e:
        registry.pull(ref, out / "w.sealed", verify=load_policy(srv.policy), **srv.kw())
    assert "8 referrers tried" in str(e.value) and "\n" not in str(e.value)
    assert list(out.iterdir()) == []
