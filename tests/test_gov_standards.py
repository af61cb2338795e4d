"""The encryption standards over real sealed artifacts: facts from files, folders and raw
headers, KEK age, signatures against the trust policy, the host's pinned policy file and
the seal-time check."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytest

import modelseal
from modelseal.errors import FormatError, GovernanceError, StandardViolation
from modelseal.format.folder import MANIFEST_NAME
from modelseal.format.header import parse_core
from modelseal.governance import localpolicy, standards
from modelseal.governance.cedar import Engine, default_policy
from modelseal.keys.service import KeyService
from modelseal.signing.signers import ED25519, P256, PemSigner, generate, private_pem
from modelseal.signing.trust import load_policy

from .conftest import Env, make_model_folder

DAY = 86400


def sealed_file(env: Env, name: str = "m.sealed", seal_env: str = "prod", key: str = "local:test-kek") -> Path:
    src = env.work / f"{name}.bin"
    src.write_bytes(b"weights" * 1000)
    dst = env.work / name
    modelseal.seal(src, dst, key, env=seal_env, keys=env.svc)
    return dst


def write_config(env: Env, text: str) -> None:
    path = env.home / "config.toml"
    path.write_text(text)
    path.chmod(0o600)


def report(facts: standards.ArtifactFacts) -> dict[str, str]:
    return {f.standard: f.status for f in standards.check(facts, Engine(default_policy())).findings}


def test_a_prod_file_sealed_to_local_breaks_std_prod_kms(env: Env) -> None:
    path = sealed_file(env)
    facts = standards.facts_of(path, env.svc, None)
    assert (facts.env, facts.artifact_env, facts.schemes, facts.recipients) == (
        "prod",
        "prod",
        frozenset({"local"}),
        ("local:test-kek#1",),
    )
    assert facts.artifact_id == modelseal.inspect(path)["artifact_id"]
    r = standards.check(facts, Engine(default_policy()))
    assert not r.ok and r.decision.policies == ("std-prod-kms",)
    line = next(f.line() for f in r.findings if f.standard == "std-prod-kms")
    assert line.startswith("violation std-prod-kms: prod artifacts are sealed to") and "local:test-kek#1" in line
    with pytest.raises(StandardViolation, match="std-prod-kms"):
        standards.enforce(r, str(path))


def test_a_dev_artifact_may_use_local_keys_unless_judged_for_prod(env: Env) -> None:
    path = sealed_file(env, seal_env="dev")
    assert report(standards.facts_of(path, env.svc, None))["std-prod-kms"] == "ok"
    assert report(standards.facts_of(path, env.svc, None, env="prod"))["std-prod-kms"] == "violation"


def test_a_folder_is_judged_by_its_manifest(env: Env) -> None:
    src = make_model_folder(env.work / "model", big=70_000)
    dst = env.work / "model.sealed"
    modelseal.seal(src, dst, "local:test-kek", env="dev", keys=env.svc)
    facts = standards.facts_of(dst, env.svc, None)
    assert facts.recipients == ("local:test-kek#1",) and facts.artifact_env == "dev"
    assert report(facts) == {"std-prod-kms": "ok", "std-cryptoperiod": "ok", "std-signatures": "ok", "std-tls13": "ok"}


def test_the_kek_age_of_a_configured_key(env: Env) -> None:
    write_config(env, '[environments.dev]\nkeys = ["local:test-kek"]\n')
    svc = KeyService(sink=env.sink)
    path = sealed_file(env, seal_env="dev")
    assert standards.facts_of(path, svc, None).kek_age_days == 0
    late = standards.facts_of(path, svc, None, now=time.time() + 400 * DAY)
    assert late.kek_age_days == 400
    r = report(late)
    assert r["std-cryptoperiod"] == "violation" and r["std-prod-kms"] == "ok"
    assert report(standards.facts_of(path, svc, None, now=time.time() + 364 * DAY))["std-cryptoperiod"] == "ok"


def test_an_unlisted_key_is_never_asked_about(env: Env) -> None:
    """The recipient's key id is the artifact's text: only the operator's own keys are looked up."""
    path = sealed_file(env, seal_env="dev")
    asked: list[str] = []
    svc = env.svc
    original = svc.info

    def info(uri: str) -> object:
        asked.append(uri)
        return original(uri)

    svc.info = info  # type: ignore[method-assign]
    facts = standards.facts_of(path, svc, None)
    assert facts.kek_age_days is None and asked == []


def test_facts_from_a_header_equal_the_files(env: Env) -> None:
    path = sealed_file(env)
    core = parse_core(path.read_bytes()[: 160 * 1024])
    head = path.read_bytes()[: core.payload_offset]
    server = standards.facts_from_header(head, "prod")
    client = standards.facts_of(path, env.svc, None)
    assert (server.recipients, server.schemes, server.artifact_id) == (
        client.recipients,
        client.schemes,
        client.artifact_id,
    )
    assert server.has_trust is False
    signed = standards.facts_from_header(head, "prod", signatures=1, threshold=2)
    assert report(signed)["std-signatures"] == "violation"
    # A dev-sealed artifact in a prod registry is judged by the prod rules.
    dev = sealed_file(env, "d.sealed", seal_env="dev")
    dev_head = dev.read_bytes()[: core.payload_offset]
    assert report(standards.facts_from_header(dev_head, "prod"))["std-prod-kms"] == "violation"
    with pytest.raises(FormatError, match="slots"):
        standards.facts_from_header(head[: core.slots_offset + 10], "prod")
    with pytest.raises(FormatError):
        standards.facts_from_header(b"not a header" * 10, "prod")


def test_a_blob_header_is_not_an_artifact(env: Env) -> None:
    src = make_model_folder(env.work / "model", big=70_000)
    dst = env.work / "model.sealed"
    modelseal.seal(src, dst, "local:test-kek", env="dev", keys=env.svc)
    blob = next(p for p in (dst / "blobs").iterdir())
    with pytest.raises(FormatError, match="blob"):
        standards.facts_from_header(blob.read_bytes()[:200_000], "dev")
    assert (dst / MANIFEST_NAME).exists()


def test_a_damaged_slot_still_shows_the_other_ones_recipients(env: Env) -> None:
    path = sealed_file(env, seal_env="dev")
    raw = path.read_bytes()
    core = parse_core(raw[: 160 * 1024])
    head = bytearray(raw[: core.payload_offset])
    start = core.slots_offset + core.slot_size  # slot B (empty after sealing): garbage in it
    head[start : start + 20] = b"\xff" * 20
    facts = standards.facts_from_header(bytes(head), "dev")
    assert facts.recipients == ("local:test-kek#1",)


@pytest.fixture
def signers(tmp_path: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, alg in (("release", P256), ("security", ED25519)):
        s = generate(alg)
        (tmp_path / f"{name}.pem").write_bytes(private_pem(s, None))
        (tmp_path / f"{name}.pub").write_text(s.public.pem())
        out[name], out[name + ".pub"] = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub"
    trust = tmp_path / "trust.toml"
    trust.write_text(
        "version = 1\nstrict = true\n"
        f'[signers.release]\nkeys = ["{out["release.pub"]}"]\n'
        f'[signers.security]\nkeys = ["{out["security.pub"]}"]\n'
        '[[rules]]\nartifacts = ["*"]\nenvironments = ["*"]\nsigners = ["release", "security"]\nthreshold = 2\n'
    )
    trust.chmod(0o600)
    out["trust"] = trust
    return out


def test_signatures_are_counted_against_the_threshold(env: Env, signers: dict[str, Path]) -> None:
    policy = load_policy(signers["trust"])
    path = sealed_file(env, seal_env="dev")
    unsigned = standards.facts_of(path, env.svc, policy)
    assert (unsigned.signatures, unsigned.threshold, unsigned.has_trust) == (0, 2, True)
    assert "not signed" in unsigned.signature_problem
    modelseal.sign(path, PemSigner.from_file(signers["release"]), name="m")
    one = standards.facts_of(path, env.svc, policy)
    assert (one.signatures, one.threshold) == (0, 2) and "needs 2" in one.signature_problem
    r = standards.check(one, Engine(default_policy()))
    line = next(f.line() for f in r.findings if f.standard == "std-signatures")
    assert line.startswith("violation std-signatures") and "needs 2" in line
    modelseal.sign(path, PemSigner.from_file(signers["security"]), name="m")
    two = standards.facts_of(path, env.svc, policy)
    assert (two.signatures, two.threshold, two.name) == (2, 2, "m")
    assert report(two)["std-signatures"] == "ok"


# -- the host's policy file -------------------------------------------------------------

STRICT = '@id("only-transit") @standard("std-transit") @reason("transit only")\nforbid(principal, action in [Action::"artifact.seal", Action::"artifact.check"], resource is Artifact) when { !["transit"].containsAll(resource.schemes) };\n'


def pinned(env: Env, text: str, pin: str | None = "auto", extra: str = "") -> Path:
    path = env.home / "governance.cedar"
    path.write_text(text)
    lines = ["[governance]", 'policy = "governance.cedar"']
    if pin is not None:
        lines.append(
            f'policy_sha256 = "{"sha256:" + hashlib.sha256(text.encode()).hexdigest() if pin == "auto" else pin}"'
        )
    write_config(env, "\n".join(lines) + "\n" + extra)
    return path


def test_no_governance_table_is_the_shipped_policy(env: Env) -> None:
    assert localpolicy.client_policy() is default_policy()
    assert localpolicy.standards_mode() == "warn"


def test_a_pinned_policy_file_is_used(env: Env) -> None:
    text = default_policy().text + STRICT
    pinned(env, text)
    ps = localpolicy.client_policy()
    assert ps.digest == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    assert "std-transit" in ps.standards


def test_an_unsigned_policy_file_is_refused(env: Env) -> None:
    path = pinned(env, default_policy().text + STRICT, pin=None)
    with pytest.raises(GovernanceError, match=f"{path} is unsigned: .*policy_sha256 = .*sha256sum"):
        localpolicy.client_policy()


def test_a_tampered_policy_file_is_refused(env: Env) -> None:
    path = pinned(env, default_policy().text + STRICT)
    path.write_text(default_policy().text)  # the strict rule quietly removed
    with pytest.raises(GovernanceError, match=r"does not match its pin in config.toml \(tampered\)"):
        localpolicy.client_policy()
    pinned(env, default_policy().text + STRICT, pin="sha256:" + "0" * 64)
    with pytest.raises(GovernanceError, match="tampered"):
        localpolicy.client_policy()


# -- seal -------------------------------------------------------------------------------


def test_seal_warns_by_default(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="modelseal"):
        path = sealed_file(env)
    assert path.exists()
    warned = [r.getMessage() for r in caplog.records if "encryption standards" in r.getMessage()]
    assert len(warned) == 1 and "std-prod-kms" in warned[0] and 'standards = "enforce"' in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modelseal"):
        sealed_file(env, "dev.sealed", seal_env="dev")
    assert not [r for r in caplog.records if "encryption standards" in r.getMessage()]


def test_seal_refuses_under_enforce_and_writes_nothing(env: Env) -> None:
    write_config(env, '[governance]\nstandards = "enforce"\n')
    with pytest.raises(StandardViolation, match="std-prod-kms"):
        sealed_file(env, "refused.sealed")
    assert not (env.work / "refused.sealed").exists()
    assert [e for e in env.sink.events if e.operation == "wrap"] == []  # refused before any key was used
    assert sealed_file(env, "dev.sealed", seal_env="dev").exists()


def test_seal_under_a_pinned_policy(env: Env) -> None:
    pinned(env, default_policy().text + STRICT, extra='standards = "enforce"\n')
    with pytest.raises(StandardViolation, match="std-transit"):
        sealed_file(env, "x.sealed", seal_env="dev")


def test_a_config_others_may_write_cannot_pin_a_policy(env: Env) -> None:
    from modelseal.keys.config import ConfigError

    pinned(env, default_policy().text + STRICT)
    (env.home / "config.toml").chmod(0o666)
    with pytest.raises(ConfigError, match="writable"):
        localpolicy.client_policy()
