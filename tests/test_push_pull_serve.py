"""``modelseal push``/``pull`` against our own ``modelseal serve`` (a subprocess on 127.0.0.1,
stopped by PID): the referrers API instead of the tag fallback, chunked uploads, ranged
pulls, failover to a second instance, and a tampered artifact refused under a strict policy."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import modelseal
from modelseal import registry
from modelseal.errors import VerificationError
from modelseal.registry import layout
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
    with modelseal_serve(env.work, pki.server_dir, pki.client_dir, "--data", str(data)) as port:
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
