"""``modelseal policy``: ``check`` of sealed files, folders and registry references (exit 0 or
8, one line per standard), the host's pinned policy file refused when unsigned or tampered,
and the server's versions: propose, list, show, activate (a two-person request)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import time
from pathlib import Path

import pyotp
import pytest

import modelseal
from modelseal.cli import build_parser, main
from modelseal.cli.common import escape
from modelseal.cli.policy import add_policy
from modelseal.errors import ModelsealError
from modelseal.governance.cedar import default_policy
from modelseal.governance.model import Binding
from modelseal.governance.store import GovStore, open_target
from modelseal.keys.service import KeyService
from modelseal.registry import transfer

from .conftest import Env, make_model_folder


def policy_cli(argv: list[str]) -> int:
    """``modelseal ARGV``: through ``cli.main`` once it lists ``policy``, else the same
    parse-and-exit-code path over ``add_policy`` alone."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "policy" in sub.choices:
        return main(argv)
    p = argparse.ArgumentParser(prog="modelseal")
    add_policy(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    try:
        return int(args.fn(args, KeyService()))
    except ModelsealError as e:
        print(f"modelseal: error: {escape(e, backslash=False)}", file=sys.stderr)
        return e.exit_code


def seal(env: Env, name: str, seal_env: str, folder: bool = False) -> Path:
    dst = env.work / name
    if folder:
        modelseal.seal(make_model_folder(env.work / f"src-{name}", big=70_000), dst, "local:test-kek", env=seal_env)
    else:
        src = env.work / f"{name}.bin"
        src.write_bytes(b"w" * 5000)
        modelseal.seal(src, dst, "local:test-kek", env=seal_env)
    return dst


def test_check_passes_a_dev_artifact(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    path = seal(env, "dev.sealed", "dev")
    assert policy_cli(["policy", "check", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [
        "ok std-cryptoperiod (KEK age unknown)",
        "ok std-prod-kms (sealed for dev to local:test-kek#1)",
        "ok std-signatures (no trust policy in force)",
        "ok std-tls13 (TLS not in use)",
    ]
    assert out[-1] == f"{path} passes the standards of policy {default_policy().digest}"


def test_check_exits_8_on_a_violation(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    path = seal(env, "prod.sealed", "prod", folder=True)
    capsys.readouterr()
    assert policy_cli(["policy", "check", str(path)]) == 8
    out = capsys.readouterr().out
    assert "violation std-prod-kms: prod artifacts are sealed to transit" in out and "breaks the standards" in out
    dev = seal(env, "dev.sealed", "dev")
    assert policy_cli(["policy", "check", str(dev), "--env", "prod", "--json"]) == 8
    doc = json.loads(capsys.readouterr().out)
    assert doc["allowed"] is False and doc["policies"] == ["std-prod-kms"] and doc["env"] == "prod"
    assert {f["standard"]: f["status"] for f in doc["findings"]}["std-prod-kms"] == "violation"


def test_check_of_a_missing_or_foreign_file(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert policy_cli(["policy", "check", str(env.work / "nope.sealed")]) == 4
    junk = env.work / "junk.bin"
    junk.write_bytes(b"x" * 100)
    assert policy_cli(["policy", "check", str(junk)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("modelseal: error: ") for line in err)


def _config(env: Env, text: str) -> None:
    (env.home / "config.toml").write_text(text)
    (env.home / "config.toml").chmod(0o600)


def test_check_refuses_an_unsigned_or_tampered_policy_file(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    path = seal(env, "dev.sealed", "dev")
    text = default_policy().text
    (env.home / "gov.cedar").write_text(text)
    _config(env, '[governance]\npolicy = "gov.cedar"\n')
    assert policy_cli(["policy", "check", str(path)]) == 16
    assert "is unsigned" in capsys.readouterr().err
    pin = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    _config(env, f'[governance]\npolicy = "gov.cedar"\npolicy_sha256 = "{pin}"\n')
    assert policy_cli(["policy", "check", str(path)]) == 0
    capsys.readouterr()
    (env.home / "gov.cedar").write_text(text.replace("std-prod-kms", "std-prod-kms-off"))
    assert policy_cli(["policy", "check", str(path)]) == 16
    err = capsys.readouterr().err
    assert "(tampered)" in err and len(err.strip().splitlines()) == 1


# -- against a real modelseal serve ---------------------------------------------------------


def test_check_of_a_registry_reference(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    from .push_pull_helpers import make_pki, modelseal_serve

    pki = make_pki(env)
    with modelseal_serve(env.work, pki.server_dir, pki.client_dir, "--env", "prod") as port:
        _registry_config(env, pki, port)
        prod = seal(env, "prod.sealed", "prod", folder=True)
        transfer.push(prod, f"127.0.0.1:{port}/team/model:v1")
        capsys.readouterr()
        assert policy_cli(["policy", "check", f"oci://127.0.0.1:{port}/team/model:v1"]) == 8
        out = capsys.readouterr().out
        assert "violation std-prod-kms" in out
    cache = env.work / "cache"
    assert not [p for p in cache.rglob(".policy-check-*")]  # the temporary pull is gone


def _registry_config(env: Env, pki: object, port: int, extra: str = "") -> None:
    pins = ", ".join(f'"{p}"' for p in pki.pins())  # type: ignore[attr-defined]
    _config(
        env,
        f'[registry]\nendpoints = ["127.0.0.1:{port}"]\ntls_dir = "{pki.client_dir}"\npins = [{pins}]\n'  # type: ignore[attr-defined]
        f'cache = "{env.work / "cache"}"\n' + extra,
    )


def test_propose_list_show_and_activate(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelseal.registry.apiclient import ApiClient

    from .push_pull_helpers import TD, issue_dir, make_pki, modelseal_serve

    pki = make_pki(env)
    officers = [issue_dir(env, env.work / f"officer{i}", "user", f"officer{i}") for i in range(4)]
    data = env.home / "registry"
    store = GovStore.open(open_target(data, None))
    for i in range(4):
        store.bind(
            Binding("", f"spiffe://{TD}/prod/user/officer{i}", "security-officer", "prod", time.time() + 3600), "t"
        )
    store.close()
    with modelseal_serve(env.work, pki.server_dir, pki.client_dir, "--env", "prod") as port:
        _registry_config(env, pki, port)
        t0 = time.time()
        secrets = []
        for folder in officers:
            with ApiClient.from_settings(tls_dir=folder) as api:
                secret = pyotp.parse_uri(api.call("POST", "mfa/enroll")["uri"]).secret
                api.call("POST", "mfa/confirm", {"otp": pyotp.TOTP(secret).at(t0)})
            secrets.append(secret)
        proposal = env.work / "new.cedar"
        text = (
            default_policy().text
            + '\n@id("repo-team7") permit(principal, action == Action::"pull", resource == Repository::"team7/m");\n'
        )
        proposal.write_text(text)
        digest = "sha256:" + hashlib.sha256(text.encode()).hexdigest()

        def as_officer(i: int, argv: list[str]) -> int:
            monkeypatch.setenv("MODELSEAL_TLS_DIR", str(officers[i]))
            monkeypatch.setattr(sys, "stdin", io.StringIO(pyotp.TOTP(secrets[i]).at(t0 + 30) + "\n"))
            return policy_cli(argv)

        capsys.readouterr()
        assert as_officer(0, ["policy", "show", "--json"]) == 0
        before = json.loads(capsys.readouterr().out)["digest"]  # what the test server activated
        assert as_officer(0, ["policy", "propose", str(proposal), "--note", "team7 pulls"]) == 0
        assert f"proposed {digest}" in capsys.readouterr().out
        assert as_officer(1, ["policy", "list"]) == 0
        out = capsys.readouterr().out
        assert f"  {digest} " in out and "team7 pulls" in out and "active: " in out
        assert as_officer(1, ["policy", "activate", digest]) == 18
        line = capsys.readouterr().out.strip()
        assert "waits for approval by 2 security officers as request" in line
        approval = re.search(r"as request (\S+) ", line)
        assert approval is not None
        assert as_officer(1, ["policy", "show", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["digest"] == before  # not approved: not in force
        assert as_officer(2, ["policy", "show", digest]) == 0
        shown = capsys.readouterr().out
        assert 'permit(principal, action == Action::"pull", resource == Repository::"team7/m");' in shown
        assert as_officer(2, ["approve", approval.group(1)]) == 0  # one of two
        capsys.readouterr()
        assert as_officer(1, ["policy", "show", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["digest"] == before
        assert as_officer(3, ["approve", approval.group(1)]) == 0  # the second: it runs, once
        assert "ran policy.activate" in capsys.readouterr().out
        time.sleep(2.1)  # the server re-reads the active pin at most every 2 s (authz.CACHE_SECONDS)
        assert as_officer(0, ["policy", "show", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["digest"] == digest and doc["source"] == "activated" and "repo-team7" in doc["ids"]
        assert as_officer(0, ["policy", "list"]) == 0
        assert f"* {digest} " in capsys.readouterr().out
