"""Regressions for the outside review's re-keying findings (rewrap, reencrypt, rotate, key identity).

1. A pkcs11 recipient planted in an artifact made ``rewrap``/``reencrypt``/``rotate`` load the
   module its ``module-path=`` named (the key URI was rebuilt from the artifact).
2. ``reencrypt``/``rewrap``/``rotate`` kept planted recipients (slots are authenticated by the
   data key only), handing a fresh data key to whoever planted one.
6. An AWS KMS environment binding written with one spelling of a key (alias, key id, ARN)
   did not apply to another spelling.
7. ``rotate`` skipped, silently, artifacts below folders it could not list.
Design item: Transit enable/disable silently moved other versions (a minimum version).

AWS KMS cannot run here: the KMS tests use botocore's ``Stubber`` (a STUB that checks each
request against the KMS API model, DescribeKey included) or a recording fake client, and
prove nothing about KMS-side behaviour. Transit runs against a real OpenBao dev server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import modelseal
from modelseal.audit.events import MemorySink
from modelseal.errors import DecryptionError, KeyNotFound, KeyProviderError, PolicyDenied, StorageError
from modelseal.format.envelope import open_envelope
from modelseal.format.file import open_keys, read_raw, write_slot_in_place
from modelseal.format.folder import MANIFEST_NAME
from modelseal.format.header import Recipient, normalize_context
from modelseal.format.source import FdSource
from modelseal.keys.providers import recipient_key
from modelseal.keys.providers.awskms import AwsKmsProvider
from modelseal.keys.providers.pkcs11 import Pkcs11Provider
from modelseal.keys.service import KeyService
from modelseal.recipes.recipients import RekeyPlan
from modelseal.recipes.rotation import find_artifacts, rotate

from .conftest import Env, make_model_folder

ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
FOREIGN = "arn:aws:kms:eu-west-1:999999999999:key/00000000-dead-beef-0000-000000000000"


def _svc(**providers: Any) -> KeyService:
    return KeyService(sink=MemorySink(), providers=providers)


def _seal(env: Env, name: str = "m.sealed", key: str | list[str] = "test-kek", **kw: Any) -> Path:
    src = env.work / "weights.bin"
    src.write_bytes(b"weights" * 1000)
    dst = env.work / name
    modelseal.seal(src, dst, key=key, **{"keys": env.svc, **kw})
    return dst


def plant(path: Path, extra: Recipient, svc: KeyService) -> None:
    """What anyone who learnt the data key can do: write a slot with one more recipient
    (the slot MAC needs only the DEK). ``svc`` stands for the attacker's copy of the DEK."""
    target = path / MANIFEST_NAME if path.is_dir() else path
    src = FdSource(os.open(target, os.O_RDWR))
    try:
        raw = read_raw(src)
        dek = open_keys(raw, lambda r: svc.unwrap(r, raw.core.context)).dek
        opened = open_envelope(raw.core, raw.slots, lambda r: dek)
        write_slot_in_place(src.fd, raw, opened, (*opened.slot.recipients, extra))
    finally:
        src.close()


def keys_of(path: Path) -> list[str]:
    return [r["key"] for r in modelseal.inspect(path)["recipients"]]


def config(env: Env, text: str) -> None:
    (env.home / "config.toml").write_text(text)


# -- finding 1: nothing from an artifact becomes a module path or PIN source -------------------


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every PKCS#11 module python-pkcs11 is asked to load (none is loaded)."""
    import pkcs11

    calls: list[str] = []

    def lib(path: str) -> Any:
        calls.append(path)
        raise RuntimeError("module loading is recorded, not done, in this test")

    monkeypatch.setattr(pkcs11, "lib", lib)
    monkeypatch.delenv("MODELSEAL_PKCS11_MODULE", raising=False)
    return calls


def _evil_pkcs11(env: Env, module: Path) -> Recipient:
    pin = env.work / "pin"
    pin.write_text("1234")
    return Recipient("pkcs11", f"token=t;object=o?module-path={module}&pin-source=file:{pin}", 1, b"x" * 60)


def test_rekeying_never_loads_a_module_named_by_the_artifact(env: Env, loaded: list[str]) -> None:
    evil = env.work / "evil.so"
    sealed = _seal(env)
    plant(sealed, _evil_pkcs11(env, evil), env.svc)
    folder = env.work / "f.sealed"
    modelseal.seal(make_model_folder(env.work / "model", big=10), folder, key="test-kek", keys=env.svc)
    plant(folder, _evil_pkcs11(env, evil), env.svc)
    for path in (sealed, folder):
        with pytest.raises(PolicyDenied, match="pkcs11:token=t;object=o"):
            modelseal.rewrap(path, keys=_svc())
        with pytest.raises(PolicyDenied):
            modelseal.reencrypt(path, keys=_svc())
    report = rotate("test-kek", [env.work], force=True, keys=_svc())
    assert sorted(name for name, _ in report.failed) == sorted([str(sealed), str(folder)])
    assert report.rewrapped == []
    # A key id with query attributes is malformed (readers must refuse it): it cannot even be confirmed.
    with pytest.raises(PolicyDenied):
        modelseal.rewrap(sealed, keys=_svc(), keep_recipients=["pkcs11:token=t;object=o"])
    assert loaded == []
    assert "module-path" in str(modelseal.inspect(sealed)["recipients"])  # the planted slot is still there


def test_a_configured_pkcs11_key_is_wrapped_with_the_operators_module(
    env: Env, loaded: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELSEAL_PKCS11_PIN", "1234")
    config(env, '[environments.dev]\nkeys = ["local:test-kek", "pkcs11:token=t;object=o?module-path=/opt/hsm.so"]\n')
    sealed = _seal(env)
    plant(sealed, _evil_pkcs11(env, env.work / "evil.so"), env.svc)
    with pytest.raises(PolicyDenied):  # the planted recipient is malformed: never kept
        modelseal.rewrap(sealed, keys=_svc())
    assert loaded == []
    # A well-formed stored recipient of that key is wrapped with the operator's URI: its module.
    plain = _seal(env, "plain.sealed")
    plant(plain, Recipient("pkcs11", "token=t;object=o", 1, b"x" * 60), env.svc)
    with pytest.raises(KeyProviderError):  # the (recorded) operator module fails to load here
        modelseal.rewrap(plain, keys=_svc())
    assert loaded == ["/opt/hsm.so"]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler to build the planted module")
def test_a_planted_module_is_never_dlopened(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's exploit, with a real shared object whose constructor leaves a marker."""
    monkeypatch.delenv("MODELSEAL_PKCS11_MODULE", raising=False)
    marker = env.work / "constructor-ran"
    c = env.work / "evil.c"
    c.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void run(void) "
        f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
    )
    so = env.work / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(so), str(c)], check=True, capture_output=True)
    sealed = _seal(env)
    plant(sealed, _evil_pkcs11(env, so), env.svc)
    for attempt in (
        lambda: modelseal.rewrap(sealed, keys=_svc()),
        lambda: modelseal.reencrypt(sealed, keys=_svc()),
        lambda: rotate("test-kek", [sealed], force=True, keys=_svc()),
    ):
        with contextlib.suppress(modelseal.ModelsealError):
            attempt()
    assert not marker.exists()


def test_an_artifact_cannot_present_the_pin_to_a_token_not_listed(
    env: Env, loaded: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELSEAL_PKCS11_MODULE", "/opt/hsm.so")
    monkeypatch.setenv("MODELSEAL_PKCS11_PIN", "1234")
    monkeypatch.setenv("MODELSEAL_PKCS11_TOKENS", "models")
    with pytest.raises(KeyNotFound, match="MODELSEAL_PKCS11_TOKENS"):
        Pkcs11Provider().unwrap(Recipient("pkcs11", "token=signing;object=k", 1, b"x" * 60), ())
    assert loaded == []  # no module loaded, no login tried (a wrong PIN spends the token's retries)


def test_recipient_identity_is_parsed_the_untrusted_way() -> None:
    with pytest.raises(DecryptionError):  # the artifact's fault
        recipient_key("pkcs11", "token=t;object=o?module-path=/x.so")
    with pytest.raises(KeyProviderError):
        recipient_key("transit", "cubbyhole/x")
    with pytest.raises(KeyProviderError):
        recipient_key("awskms", "arn:aws:kms:x\n")
    assert recipient_key("pkcs11", "object=o;token=t") == "pkcs11:token=t;object=o"
    assert recipient_key("transit", "k") == "transit:transit/k"


# -- finding 2: a re-key writes only recipients the operator vouches for ---------------------------


def test_planted_recipient_is_refused_by_reencrypt_rewrap_and_rotate(env: Env) -> None:
    config(env, '[environments.dev]\nkeys = ["local:test-kek"]\n')
    env.svc.create("attacker-kek")  # stands for a key the attacker can unwrap with
    sealed = _seal(env)
    plant(sealed, Recipient("local", "attacker-kek", 1, b"\0" * 60), env.svc)
    before = sealed.read_bytes()
    with pytest.raises(PolicyDenied, match=r"local:attacker-kek#1 are not among config\.toml's keys for env=dev"):
        modelseal.reencrypt(sealed, keys=_svc())
    with pytest.raises(PolicyDenied, match="--keep-recipient"):
        modelseal.rewrap(sealed, keys=_svc())
    env.svc.rotate("test-kek")
    report = rotate("test-kek", [sealed], keys=_svc())
    assert [name for name, _ in report.failed] == [str(sealed)] and "attacker-kek" in report.failed[0][1]
    assert sealed.read_bytes() == before  # nothing written, nothing lost
    # The remedy for an exposed DEK: name the keys. The planted recipient is gone for good.
    modelseal.reencrypt(sealed, key="test-kek", keys=_svc())
    assert keys_of(sealed) == ["local:test-kek"]


def test_an_explicitly_confirmed_recipient_is_kept(env: Env) -> None:
    config(env, '[environments.dev]\nkeys = ["local:test-kek"]\n')
    env.svc.create("escrow-kek")
    sealed = _seal(env, key=["test-kek", "escrow-kek"])
    seen: list[RekeyPlan] = []
    modelseal.rewrap(sealed, keys=_svc(), keep_recipients=["escrow-kek"], confirm=seen.append)
    assert seen[0].stored == ("local:test-kek#1", "local:escrow-kek#1")
    assert seen[0].write == ("local:test-kek", "escrow-kek")  # the operator's own spellings
    res = modelseal.reencrypt(sealed, keys=_svc(), keep_recipients=["local:escrow-kek"])
    assert res.recipients == ("local:test-kek", "local:escrow-kek")
    with pytest.raises(ValueError, match="with --key, list every key"):
        modelseal.rewrap(sealed, key="test-kek", keys=_svc(), keep_recipients=["escrow-kek"])


class RecordingKms:
    """A fake KMS client that records every request (Encrypt answers like KMS would)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def encrypt(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("encrypt", kw))
        return {"CiphertextBlob": b"wrapped-for-" + kw["KeyId"].encode(), "KeyId": kw["KeyId"]}

    def describe_key(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(("describe_key", kw))
        return {"KeyMetadata": {"KeyId": kw["KeyId"].rsplit("/", 1)[-1], "Arn": kw["KeyId"]}}


def test_a_planted_remote_recipient_never_gets_the_new_data_key(env: Env) -> None:
    """No config.toml: the keystore vouches for its own keys, but a KMS key in another
    account, planted in the artifact, never receives the fresh data key."""
    kms = RecordingKms()
    svc = _svc(awskms=AwsKmsProvider(lambda: kms))
    sealed = _seal(env)
    plant(sealed, Recipient("awskms", FOREIGN, 1, b"kms-blob"), env.svc)
    with pytest.raises(PolicyDenied, match=f"awskms:{FOREIGN}#1"):
        modelseal.reencrypt(sealed, keys=svc)
    with pytest.raises(PolicyDenied):
        modelseal.rewrap(sealed, keys=svc)
    assert not [c for c in kms.calls if c[0] == "encrypt"]
    modelseal.reencrypt(sealed, keys=svc, keep_recipients=[f"awskms:{FOREIGN}"])  # explicitly confirmed
    assert [c[1]["KeyId"] for c in kms.calls if c[0] == "encrypt"] == [FOREIGN]


def test_configured_keys_rekey_as_documented(env: Env) -> None:
    """The normal case: artifacts sealed to config.toml's keys rewrap, reencrypt and rotate as before."""
    config(env, '[environments.prod]\nkeys = ["local:prod-kek", "recovery-kek"]\n[projects.ft]\nprod = ["ft-kek"]\n')
    for k in ("prod-kek", "recovery-kek", "ft-kek"):
        env.svc.create(k)
    src = env.work / "w.bin"
    src.write_bytes(b"w" * 5000)
    prod, ft = env.work / "p.sealed", env.work / "ft.sealed"
    modelseal.seal(src, prod, env="prod", keys=_svc())
    modelseal.seal(src, ft, env="prod", project="ft", keys=_svc())
    env.svc.rotate("prod-kek")
    assert modelseal.rewrap(prod, keys=_svc()).recipients == ("local:prod-kek#2", "local:recovery-kek#1")
    modelseal.reencrypt(ft, keys=_svc())
    assert keys_of(ft) == ["local:ft-kek"]
    env.svc.rotate("recovery-kek")
    report = rotate("recovery-kek", [env.work], keys=_svc())
    assert report.rewrapped == [str(prod)] and not report.failed
    assert modelseal.inspect(prod)["recipients"] == [
        {"key": "local:prod-kek", "version": 2},
        {"key": "local:recovery-kek", "version": 2},
    ]
    assert modelseal.open(prod, keys=_svc()).read() == src.read_bytes()


def test_cli_refuses_shows_and_confirms(env: Env) -> None:
    config(env, '[environments.dev]\nkeys = ["local:test-kek"]\n')
    env.svc.create("attacker-kek")
    sealed = _seal(env)
    plant(sealed, Recipient("local", "attacker-kek", 1, b"\0" * 60), env.svc)
    before = sealed.read_bytes()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "modelseal.cli", *args], capture_output=True, text=True)

    r = run("reencrypt", str(sealed))
    assert r.returncode == 8 and r.stderr.count("\n") == 1 and "--keep-recipient" in r.stderr, r.stderr
    r = run("rewrap", str(sealed), "--dry-run", "--key", "test-kek")
    assert r.returncode == 0, r.stderr
    assert "local:test-kek#1, local:attacker-kek#1 -> will write test-kek (dry run: nothing written)" in r.stdout
    assert sealed.read_bytes() == before
    r = run("rewrap", str(sealed), "--keep-recipient", "local:attacker-kek")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("-> will write local:test-kek, local:attacker-kek") and lines[1].startswith("rewrapped")
    r = run("rotate", "--key", "test-kek", "--force", str(sealed))
    assert r.returncode != 0 and "failed 1" in r.stdout
    r = run("rotate", "--key", "test-kek", str(sealed), "--keep-recipient", "local:attacker-kek")
    assert r.returncode == 0 and "rewrapped 1" in r.stdout, r.stdout + r.stderr


# -- finding 6: one canonical identity for every spelling of an AWS KMS key ----------------------


@pytest.fixture
def kms() -> Iterator[tuple[Any, Any]]:
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("kms", region_name="eu-west-1", aws_access_key_id="stub", aws_secret_access_key="stub")
    with Stubber(client) as stub:
        yield client, stub
        stub.assert_no_pending_responses()


def _describe(stub: Any, key_id: str) -> None:
    stub.add_response("describe_key", {"KeyMetadata": {"KeyId": ARN.rsplit("/", 1)[1], "Arn": ARN}}, {"KeyId": key_id})


def test_awskms_binding_holds_for_every_spelling(env: Env, kms: tuple[Any, Any]) -> None:
    client, stub = kms
    config(env, '[environments.prod]\nkeys = ["awskms:alias/prod-kek"]\n')
    svc = _svc(awskms=AwsKmsProvider(lambda: client))
    src = env.work / "a.bin"
    src.write_bytes(b"weights")
    _describe(stub, ARN)  # the key asked for, then the configured alias: the same key
    _describe(stub, "alias/prod-kek")
    with pytest.raises(PolicyDenied, match="belongs to environment prod"):
        modelseal.seal(src, env.work / "x.sealed", key=f"awskms:{ARN}", env="dev", keys=svc)
    for spelling in (ARN.rsplit("/", 1)[1], "arn:aws:kms:eu-west-1:111122223333:alias/prod-kek"):
        _describe(stub, spelling)
        with pytest.raises(PolicyDenied):
            modelseal.seal(src, env.work / "x.sealed", key=f"awskms:{spelling}", env="dev", keys=svc)
    # Unwrap: a recipient records the ARN; the binding by alias applies (cached: no request).
    dev = normalize_context({"env": "dev"})
    with pytest.raises(PolicyDenied):
        svc.unwrap(Recipient("awskms", ARN, 1, b"blob"), dev)
    assert svc.environments_of(f"awskms:{ARN}") == {"prod"}
    assert not (env.work / "x.sealed").exists()


def test_describe_key_is_cached_and_expires(kms: tuple[Any, Any]) -> None:
    client, stub = kms
    clock = [0.0]
    provider = AwsKmsProvider(lambda: client, now=lambda: clock[0])
    _describe(stub, "alias/prod-kek")
    assert provider.canonical_name("alias/prod-kek") == ARN
    assert provider.canonical_name("alias/prod-kek") == ARN  # no second request (the stub would refuse it)
    clock[0] += 61
    _describe(stub, "alias/prod-kek")
    assert provider.canonical_name("alias/prod-kek") == ARN


# -- finding 7: rotate reports every path it cannot read or list --------------------------------


def test_rotate_reports_folders_it_cannot_list(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    root = env.work / "fleet"
    paths = []
    for team in ("a", "b", "c"):
        (root / team).mkdir(parents=True)
        paths.append(_seal(env, f"fleet/{team}/m.sealed"))
    env.svc.rotate("test-kek")
    blocked = root / "b"
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(os.fsdecode(path)) == blocked:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # root may list anything; the review ran unprivileged
    link = env.work / "link"
    link.symlink_to(root / "c")
    report = rotate("test-kek", [root, env.work / "no-such-folder", link], keys=_svc())
    assert sorted(report.rewrapped) == [str(paths[0]), str(paths[2])]
    assert sorted(name for name, _ in report.failed) == sorted(
        [str(blocked), str(env.work / "no-such-folder"), str(link)]
    )
    assert "Permission denied" in dict(report.failed)[str(blocked)]
    with pytest.raises(StorageError, match="cannot read"):
        list(find_artifacts([blocked]))
    from modelseal.cli import main

    assert main(["rotate", "--key", "test-kek", str(root)]) == 1  # failed 1: not a silent success


def test_cli_rotate_counts_unlistable_folders(env: Env, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    _seal(env, "m.sealed")
    from modelseal.cli import main

    assert main(["rotate", "--key", "test-kek", "--force", str(env.work / "missing")]) == 1
    out = capsys.readouterr()
    assert "failed 1" in out.out and "missing" in out.err


# -- design item: Transit enable/disable say exactly what changes, and refuse what Transit cannot express --


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    from .services import openbao_dev

    with openbao_dev(tmp_path_factory.mktemp("bao")) as server:
        yield server


@pytest.fixture
def transit(bao: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from modelseal.keys.providers.transit import TransitProvider

    monkeypatch.setenv("BAO_ADDR", bao[0])
    monkeypatch.setenv("BAO_TOKEN", bao[1])
    return TransitProvider()


def _states(svc: KeyService, uri: str) -> dict[int, str]:
    return {v.version: v.state for v in svc.info(uri).versions}


def test_transit_enable_disable_move_exactly_one_version_or_refuse(env: Env, transit: Any, capsys: Any) -> None:
    from modelseal.cli import main

    uri = "transit:versions-kek"
    svc = _svc(transit=transit)
    svc.create(uri)
    for _ in range(3):
        svc.rotate(uri)  # versions 1..4
    with pytest.raises(KeyProviderError, match="versions 1 are active"):
        svc.set_state(uri, 2, "disabled")  # would also disable version 1
    assert _states(svc, uri) == {1: "active", 2: "active", 3: "active", 4: "active"}
    svc.set_state(uri, 1, "disabled")
    svc.set_state(uri, 2, "disabled")
    with pytest.raises(KeyProviderError, match="versions 2 are disabled"):
        svc.set_state(uri, 1, "active")  # would also re-enable version 2, disabled on purpose
    svc.set_state(uri, 3, "active")  # already active: nothing moves (it used to disable 1 and 2... and keep them)
    svc.set_state(uri, 1, "disabled")  # already disabled: nothing moves
    assert _states(svc, uri) == {1: "disabled", 2: "disabled", 3: "active", 4: "active"}
    svc.set_min_version(uri, 4)  # the explicit way to move several versions
    svc.set_state(uri, 2, "disabled")  # used to lower the minimum to 3, re-enabling version 3
    assert _states(svc, uri) == {1: "disabled", 2: "disabled", 3: "disabled", 4: "active"}
    with pytest.raises(KeyProviderError, match="oldest up"):
        svc.destroy(uri, 2)  # would also destroy version 1
    svc.destroy(uri, 1)  # used to set the minimum to 2, re-enabling versions 2 and 3
    assert _states(svc, uri) == {2: "disabled", 3: "disabled", 4: "active"}
    # The CLI says exactly what changed.
    capsys.readouterr()
    assert main(["key", "enable", uri, "--version", "3"]) == 0
    assert capsys.readouterr().out.startswith(f"{uri}: v3 disabled -> active\n")
    assert main(["key", "enable", uri, "--version", "4"]) == 0
    assert capsys.readouterr().out.startswith(f"{uri}: no change\n")
    assert main(["key", "min-version", uri, "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{uri}: v2 disabled -> active\n")
    assert main(["key", "disable", uri, "--version", "3"]) == 5  # version 2 is older and active


def test_transit_rotation_batch_refuses_a_planted_recipient(env: Env, transit: Any) -> None:
    transit.create("fleet2-kek")
    transit.create("attacker2-kek")  # a Transit key the attacker's own token can decrypt with
    svc = _svc(transit=transit)
    paths = [_seal(env, f"t{i}.sealed", key="transit:fleet2-kek", keys=svc) for i in range(3)]
    planted = transit.wrap("attacker2-kek", b"\0" * 32, ())
    plant(paths[1], planted, svc)
    report = rotate("transit:fleet2-kek", [env.work], force=True, keys=_svc(transit=transit))
    assert sorted(report.rewrapped) == [str(paths[0]), str(paths[2])]
    assert [name for name, _ in report.failed] == [str(paths[1])]
    assert modelseal.inspect(paths[1])["recipients"][0]["version"] == 1
