"""OpenSSF model-signing interoperability, both directions, against the real package
(model-signing 1.1.1 in its own venv: tests/services.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from modelseal.cli import main
from modelseal.signing.oms import make_bundle
from modelseal.signing.signers import ED25519, P256, PemSigner, generate, private_pem

from .conftest import Env, make_model_folder
from .services import model_signing_cli

KEY = "local:test-kek"


@pytest.fixture(scope="module")
def oms() -> Path:
    return model_signing_cli()


@pytest.fixture
def p256(tmp_path: Path) -> tuple[Path, Path]:
    s = generate(P256)
    priv, pub = tmp_path / "p.pem", tmp_path / "p.pub"
    priv.write_bytes(private_pem(s, None))
    pub.write_text(s.public.pem())
    return priv, pub


def oms_verify(oms: Path, model: Path, sig: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(oms), "verify", "key", str(model), "--signature", str(sig), "--public_key", str(pub)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unsealed_folder_carries_model_sig_that_model_signing_accepts(
    env: Env, oms: Path, p256: tuple[Path, Path]
) -> None:
    priv, pub = p256
    src = make_model_folder(env.work / "model")
    (src / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # ignored by model-signing
    sealed, out = env.work / "model.sealed", env.work / "out"
    assert main(["seal", str(src), str(sealed), "--key", KEY, "--sign-key", str(priv), "--name", "bert-mini"]) == 0
    assert b"config.json" not in (sealed / "signatures.msig").read_bytes()  # file names stay encrypted
    assert main(["unseal", str(sealed), str(out)]) == 0
    r = oms_verify(oms, out, out / "model.sig", pub)
    assert r.returncode == 0, r.stdout + r.stderr
    (out / "nested" / "deeper" / "adapter.bin").write_bytes(b"tampered")
    r = oms_verify(oms, out, out / "model.sig", pub)
    assert r.returncode != 0 and "mismatch" in (r.stdout + r.stderr).lower()


def test_unsealed_file_carries_sig_and_sign_oms_adds_one_later(env: Env, oms: Path, p256: tuple[Path, Path]) -> None:
    priv, pub = p256
    src = env.work / "w.bin"
    src.write_bytes(os.urandom(3 << 20))
    sealed = env.work / "w.sealed"
    assert main(["seal", str(src), str(sealed), "--key", KEY, "--sign-key", str(priv)]) == 0
    assert main(["unseal", str(sealed), str(env.work / "w.out")]) == 0
    assert oms_verify(oms, env.work / "w.out", env.work / "w.out.sig", pub).returncode == 0
    # an unsigned folder, signed afterwards with --oms (needs the data key for the plaintext digests)
    folder = make_model_folder(env.work / "f")
    fs = env.work / "f.sealed"
    assert main(["seal", str(folder), str(fs), "--key", KEY]) == 0
    assert main(["sign", str(fs), "--sign-key", str(priv), "--oms"]) == 0
    assert main(["unseal", str(fs), str(env.work / "f.out")]) == 0
    assert oms_verify(oms, env.work / "f.out", env.work / "f.out" / "model.sig", pub).returncode == 0


def test_ed25519_signatures_make_no_model_sig(env: Env, tmp_path: Path) -> None:
    s = generate(ED25519)
    (tmp_path / "e.pem").write_bytes(private_pem(s, None))
    src = make_model_folder(env.work / "m")
    assert main(["seal", str(src), str(env.work / "m.s"), "--key", KEY, "--sign-key", str(tmp_path / "e.pem")]) == 0
    assert main(["unseal", str(env.work / "m.s"), str(env.work / "o")]) == 0
    assert not (env.work / "o" / "model.sig").exists()  # model-signing verifies ECDSA only


def test_modelseal_verifies_what_model_signing_signed(env: Env, oms: Path, p256: tuple[Path, Path]) -> None:
    priv, pub = p256
    model = make_model_folder(env.work / "plain")
    sig = model / "model.sig"
    r = subprocess.run(
        [str(oms), "sign", "key", str(model), "--private_key", str(priv), "--signature", str(sig)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert main(["verify", "--plaintext", str(model), "--signature", str(sig), "--public-key", str(pub)]) == 0
    assert main(["verify", "--plaintext", str(model), "--public-key", str(pub)]) == 0  # model.sig found inside
    # a file the signature does not list: refused unless explicitly allowed
    (model / "extra.txt").write_text("smuggled")
    assert main(["verify", "--plaintext", str(model), "--public-key", str(pub)]) == 10
    assert main(["verify", "--plaintext", str(model), "--public-key", str(pub), "--allow-unlisted"]) == 0
    (model / "extra.txt").unlink()
    # an untrusted key
    other = generate(P256)
    (env.work / "o.pub").write_text(other.public.pem())
    assert main(["verify", "--plaintext", str(model), "--public-key", str(env.work / "o.pub")]) == 10
    # a truncated signature
    full = sig.read_bytes()
    sig.write_bytes(full[:-40])
    assert main(["verify", "--plaintext", str(model), "--public-key", str(pub)]) == 10
    sig.write_bytes(full)
    # a tampered file, and a symlink
    (model / "config.json").write_text("{}")
    assert main(["verify", "--plaintext", str(model), "--public-key", str(pub)]) == 10


def test_oms_statement_with_traversal_paths_or_symlinks_is_refused(env: Env, p256: tuple[Path, Path]) -> None:
    priv, pub = p256
    signer = PemSigner.from_file(priv)
    model = env.work / "m"
    model.mkdir()
    (model / "a.bin").write_bytes(b"a")
    import hashlib

    da = hashlib.sha256(b"a").hexdigest()
    for evil in ("../outside", "/etc/passwd"):
        (env.work / "evil.sig").write_bytes(make_bundle(signer, "m", [("a.bin", da), (evil, da)], []))
        assert (
            main(
                [
                    "verify",
                    "--plaintext",
                    str(model),
                    "--signature",
                    str(env.work / "evil.sig"),
                    "--public-key",
                    str(pub),
                ]
            )
            == 10
        )
    (env.work / "ok.sig").write_bytes(make_bundle(signer, "m", [("a.bin", da)], []))
    assert (
        main(["verify", "--plaintext", str(model), "--signature", str(env.work / "ok.sig"), "--public-key", str(pub)])
        == 0
    )
    (model / "link.bin").symlink_to(model / "a.bin")
    assert (
        main(["verify", "--plaintext", str(model), "--signature", str(env.work / "ok.sig"), "--public-key", str(pub)])
        == 10
    )
    doc = json.loads((env.work / "ok.sig").read_text())
    doc["mediaType"] = "x"
    (env.work / "bad.sig").write_text(json.dumps(doc))
    (model / "link.bin").unlink()
    assert (
        main(["verify", "--plaintext", str(model), "--signature", str(env.work / "bad.sig"), "--public-key", str(pub)])
        == 10
    )
