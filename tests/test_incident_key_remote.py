"""``modelseal incident key-compromise`` against real services: a real ``modelseal serve``
registry (SQLite, mutual TLS; one per module, a subprocess stopped by PID) and a real OpenBao
Transit key (``openbao_dev``). Registry artifacts are pulled, re-encrypted, pushed under the
same tags with their signature referrers, and the old manifests deleted; the repositories
come from ``--repo`` or from the registry's catalog (``--registry-data``). A second registry
(another ``modelseal serve``) checks that a journal is never applied to the wrong one."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import modelseal
from modelseal import registry
from modelseal.audit.events import MemorySink
from modelseal.errors import IncidentError, KeyDisabled
from modelseal.keys import keystore
from modelseal.keys.service import KeyService
from modelseal.recipes import context as recipes_context
from modelseal.registry import layout
from modelseal.registry.client import Repository
from modelseal.signing.sigfile import SignatureFile
from tests.conftest import PASSPHRASE, Env, make_model_folder
from tests.incident_helpers import Trust, cli, make_trust, plaintext, seal_signed
from tests.push_pull_helpers import Pki, make_pki, modelseal_serve, transport
from tests.services import openbao_dev


@dataclass
class World:
    env: Env
    pki: Pki
    port: int
    data: Path
    port2: int

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tls(self, *ports: int) -> list[str]:
        out = []
        for port in ports or (self.port,):
            out += ["--registry", f"127.0.0.1:{port}"]
        out += ["--tls-dir", str(self.pki.client_dir)]
        for pin in self.pki.pins():
            out += ["--pin", pin]
        return out

    def repo(self, name: str, port: int | None = None) -> Repository:
        return Repository(transport(self.pki, port or self.port), name)

    def kw(self) -> dict[str, object]:
        return {"tls_dir": self.pki.client_dir, "pins": self.pki.pins()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("incident-remote")
    home, work = tmp / "home", tmp / "work"
    work.mkdir()
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("MODELSEAL_HOME", str(home))
        mp.setenv("MODELSEAL_PASSPHRASE", PASSPHRASE)
        mp.setenv("MODELSEAL_CACHE", str(work / "cache"))
        mp.delenv("MODELSEAL_AGENT_SOCK", raising=False)
        mp.delenv("MODELSEAL_TRUST", raising=False)
        mp.setattr(recipes_context, "_service", None)
        keystore.clear_cache()
        keystore.create(keystore.keystore_path(home), PASSPHRASE.encode(), scrypt_log2_n=14)
        sink = MemorySink()
        env = Env(home, work, KeyService(sink=sink), sink)
        pki = make_pki(env)
        with openbao_dev(tmp) as (addr, token):
            mp.setenv("BAO_ADDR", addr)
            mp.setenv("BAO_TOKEN", token)
            data = work / "serve-data"
            (work / "second").mkdir()
            with (
                modelseal_serve(work, pki.server_dir, pki.client_dir, "--data", str(data)) as port,
                modelseal_serve(work / "second", pki.server_dir, pki.client_dir, "--data", str(work / "d2")) as port2,
            ):
                yield World(env, pki, port, data, port2)
    finally:
        mp.undo()
        keystore.clear_cache()


def _push(
    w: World, key: str, trust: Trust | None, name: str, refs: list[str], folder: bool = False, port: int | None = None
) -> str:
    art = w.env.work / f"{name}.sealed"
    if not art.exists():
        src = w.env.work / f"{name}-src"
        if folder:
            make_model_folder(src, big=150_000)
        else:
            src.write_bytes(os.urandom(250_000))
        seal_signed(w.env.svc, src, art, key, trust, name)
    digest = ""
    for ref in refs:
        digest = registry.push(art, f"127.0.0.1:{port or w.port}/{ref}", **w.kw()).digest
    return digest


def test_registry_artifacts_are_replaced_under_their_tags(world: World) -> None:
    w, key = world, "local:reg-one"
    w.env.svc.create(key)
    trust = make_trust(w.env.work / "trust-one")
    a_old = _push(w, key, trust, "a", ["models/a:v1", "models/a:latest"])
    b_old = _push(w, key, trust, "b", ["models/b:v1"], folder=True)
    w.env.svc.create("local:other")
    c_old = _push(w, "local:other", None, "c", ["models/c:v1"])
    a_plain, b_plain = plaintext(w.env.svc, w.env.work / "a.sealed"), plaintext(w.env.svc, w.env.work / "b.sealed")
    old_sig = SignatureFile.load(w.env.work / "a.sealed.msig")
    assert old_sig is not None
    repos = ["--repo", "models/a", "--repo", "models/b", "--repo", "models/c"]

    rc, out, err = cli("incident", "key-compromise", key, *w.tls(), *repos)
    assert rc == 0, out + err
    assert out.count("exposed (header): oci://") == 2 and "tags latest,v1" in out
    assert w.repo("models/a").get_manifest("v1")[1] == a_old  # type: ignore[index]

    rc, out, err = cli("incident", "key-compromise", key, *w.tls(), *repos, *trust.args(), "--execute")
    assert rc == 0, out + err
    a, b = w.repo("models/a"), w.repo("models/b")
    a_new = a.get_manifest("v1")[1]  # type: ignore[index]
    assert a_new != a_old and a.get_manifest("latest")[1] == a_new  # type: ignore[index]
    assert a.get_manifest(a_old) is None and b.get_manifest(b_old) is None  # the GC reclaims the old ciphertext
    assert a.referrers(a_old, layout.SIGNATURES) == []  # the old signature referrers went with it
    assert b.get_manifest("v1")[1] != b_old  # type: ignore[index]
    assert w.repo("models/c").get_manifest("v1")[1] == c_old  # type: ignore[index]  # another key: untouched
    pulled = registry.pull(f"{w.host}/models/a:v1", w.env.work / "a-new.sealed", verify=trust.load(), **w.kw())
    assert pulled.verdict is not None and pulled.verdict.signed and pulled.verdict.version == 2
    assert plaintext(w.env.svc, w.env.work / "a-new.sealed") == a_plain
    rl = trust.load().revocations()
    assert rl is not None and rl.revoked("signature", old_sig.signatures[0].id) is not None
    pulled_b = w.env.work / "b-new"
    registry.pull(f"{w.host}/models/b:v1", pulled_b, verify=trust.load(), **w.kw())
    assert plaintext(w.env.svc, pulled_b) == b_plain
    with pytest.raises(KeyDisabled):  # the copy pushed before the incident no longer opens
        modelseal.open(w.env.work / "a.sealed", keys=KeyService(sink=MemorySink()), verify=False)
    assert not (w.env.work / "cache" / "incidents").exists() or not any((w.env.work / "cache" / "incidents").iterdir())
    # The registry's own collector (zero grace here) reclaims the exposed ciphertext.
    import hashlib

    from modelseal.registry import gc
    from modelseal.registry.service import Limits, open_registry

    exposed = hashlib.sha256((w.env.work / "a.sealed").read_bytes()).hexdigest()
    reg = open_registry(w.data, limits=Limits(link_grace=0.0, blob_grace=0.0))
    try:
        assert exposed in set(reg.blobs.digests())
        for _ in range(3):
            gc.collect(reg)
        assert exposed not in set(reg.blobs.digests())
    finally:
        reg.close()


def test_the_catalog_names_every_repository(world: World) -> None:
    w, key = world, "local:reg-two"
    w.env.svc.create(key)
    old = _push(w, key, None, "x", ["team/x:v3"])
    rc, out, err = cli("incident", "key-compromise", key, *w.tls(), "--registry-data", str(w.data), "--execute")
    assert rc == 0, out + err
    x = w.repo("team/x")
    new = x.get_manifest("v3")[1]  # type: ignore[index]
    assert new != old and x.get_manifest(old) is None
    pulled = w.env.work / "x-new.sealed"
    registry.pull(f"{w.host}/team/x:v3", pulled, verify=False, **w.kw())
    assert plaintext(w.env.svc, pulled) == (w.env.work / "x-src").read_bytes()
    rc, _, err = cli("incident", "key-compromise", key, *w.tls(), "--new-incident")  # no --repo, no catalog
    assert rc == 2 and "--registry-data" in err


def test_transit_key(world: World) -> None:
    w, key = world, "transit:incident-kek"
    w.env.svc.create(key)
    root = w.env.work / "transit"
    root.mkdir()
    made = {}
    for i in range(2):
        (w.env.work / f"t{i}").write_bytes(os.urandom(100_000))
        made[modelseal.seal(w.env.work / f"t{i}", root / f"t{i}.sealed", key, keys=w.env.svc).path] = i
    old = w.env.work / "t0-old.sealed"
    shutil.copy(root / "t0.sealed", old)
    rc, out, err = cli("incident", "key-compromise", key, "--path", str(root), "--execute")
    assert rc == 0, out + err
    info = w.env.svc.info(key)
    assert info.latest == 2 and info.min_decryption_version == 2
    for p, i in made.items():
        assert plaintext(w.env.svc, p) == (w.env.work / f"t{i}").read_bytes()
    fresh = KeyService(sink=MemorySink())  # no cached data key: asks OpenBao
    with pytest.raises(KeyDisabled):
        modelseal.open(old, keys=fresh, verify=False)
    assert plaintext(fresh, root / "t0.sealed") == (w.env.work / "t0").read_bytes()


def test_untagged_manifests_and_moved_tags_are_found_through_the_catalog(world: World) -> None:
    """Review finding 3: the catalog's every manifest, not only what tags name."""
    w, key, other = world, "local:reg-untagged", "local:reg-untagged-other"
    w.env.svc.create(key)
    w.env.svc.create(other)
    old = _push(w, key, None, "u1", ["models/u:latest"])  # exposed; then the tag moves on to another artifact
    moved = _push(w, other, None, "u2", ["models/u:latest"])
    odd = _push(w, key, None, "u3", ["models/u:sha256-release"])  # an ordinary tag, of the referrer tags' prefix
    u = w.repo("models/u")
    rc, out, err = cli("incident", "key-compromise", key, *w.tls(), "--repo", "models/u")
    assert rc == 0, out + err
    assert out.count("exposed (header)") == 1 and "tags sha256-release" in out and "untagged ones" in out
    rc, out, err = cli("incident", "key-compromise", key, *w.tls(), "--registry-data", str(w.data), "--repo",
                       "models/u")  # fmt: skip
    assert rc == 0 and out.count("exposed (header)") == 2 and "untagged (deleted" in out, out + err
    rc, out, err = cli("incident", "key-compromise", key, *w.tls(), "--registry-data", str(w.data), "--repo",
                       "models/u", "--execute")  # fmt: skip
    assert rc == 0, out + err
    assert u.get_manifest(old) is None and u.get_manifest(odd) is None
    assert u.get_manifest("sha256-release")[1] not in (odd, None)  # type: ignore[index]
    assert u.get_manifest("latest")[1] == moved  # type: ignore[index]  # another key's: untouched


def test_a_journal_is_never_applied_to_another_registry_and_two_run_together(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review findings 4 and 9: the record names its registry and repository; both must be given."""
    from modelseal.recovery import incident_registry
    from modelseal.recovery.journal import item_name

    w, key = world, "local:reg-mirror"
    w.env.svc.create(key)
    d1 = _push(w, key, None, "t1", ["models/t:v1"])
    d2 = _push(w, key, None, "t1", ["models/t:v1"], port=w.port2)  # the same artifact mirrored: the same digest
    assert d1 == d2
    real = incident_registry.pull

    def drop(*a: object, **kw: object) -> None:
        raise OSError(5, "simulated network drop")

    monkeypatch.setattr(incident_registry, "pull", drop)
    rc, _, err = cli("incident", "key-compromise", key, *w.tls(), "--repo", "models/t", "--execute")
    assert rc == IncidentError.exit_code and "network drop" in err
    monkeypatch.setattr(incident_registry, "pull", real)
    rc, _, err = cli("incident", "key-compromise", key, *w.tls(w.port2), "--repo", "models/t", "--execute")
    assert rc == IncidentError.exit_code and f"give --registry {w.host} again" in err
    (folder,) = [p for p in (w.env.home / "incidents").iterdir() if key in (p / "journal.json").read_text()]
    victim = _push(w, "local:reg-one", None, "a", ["prod/victim:v1"])  # a planted record of another repository
    ref = f"oci://{w.host}/prod/victim@{victim}"
    rec = {"ref": ref, "kind": "registry", "location": f"{w.host}/prod/victim", "old_id": "0" * 64, "versions": [1],
           "signed": False, "digest": victim, "tags": ["v1"], "folder": False, "state": "pushed", "new_id": "1" * 64}  # fmt: skip
    (folder / "artifacts" / item_name(ref)).write_text(json.dumps(rec))
    both = [*w.tls(w.port, w.port2), "--repo", "models/t"]
    rc, _, err = cli("incident", "key-compromise", key, *both, "--execute")
    assert rc == IncidentError.exit_code and "give --repo prod/victim again" in err
    (folder / "artifacts" / item_name(ref)).unlink()
    rc, out, err = cli("incident", "key-compromise", key, *both, "--execute")
    assert rc == 0, out + err
    assert w.repo("prod/victim").get_manifest("v1")[1] == victim  # type: ignore[index]
    for port in (w.port, w.port2):
        t = w.repo("models/t", port)
        assert t.get_manifest(d1) is None and t.get_manifest("v1")[1] != d1  # type: ignore[index]


def test_a_transit_batch_rotation_keeps_the_old_version_in_the_audit_log(world: World) -> None:
    """Review finding 8: ``rewrap-from`` names the version a batch rewrap moved away from."""
    from modelseal.audit.log import MerkleAuditLog
    from modelseal.recipes.rotation import rotate

    w, key = world, "transit:hist-kek"
    w.env.svc.create(key)
    root = w.env.work / "hist"
    root.mkdir()
    elsewhere = KeyService(sink=MemorySink())  # the host that sealed them: its events are in its own log
    for name in ("a", "b"):
        (w.env.work / f"h-{name}").write_bytes(os.urandom(2000))
        modelseal.seal(w.env.work / f"h-{name}", root / f"{name}.sealed", key, keys=elsewhere)
    rotate(key, [root / "b.sealed"], force=True, keys=elsewhere)  # b: 1 -> 2 there
    here = KeyService(sink=MerkleAuditLog(w.env.home / "audit.db"))
    report = rotate(key, [root], force=True, keys=here)  # one Transit batch: a 1 -> 3, b 2 -> 3
    assert sorted(Path(p).name for p in report.rewrapped) == ["a.sealed", "b.sealed"]
    ops = [(e["operation"], e["version"]) for e in MerkleAuditLog(w.env.home / "audit.db").events()
           if e["key"] == key and e["operation"].startswith("rewrap")]  # fmt: skip
    assert sorted(ops) == [("rewrap", 3), ("rewrap", 3), ("rewrap-from", 1), ("rewrap-from", 2)]
    rc, out, err = cli("incident", "key-compromise", key + "@1", "--path", str(root), "--json")
    assert rc == 0, out + err
    p = json.loads(out)
    assert [(Path(f["location"]).name, f["why"]) for f in p["found"]] == [("a.sealed", "audit history")]
    assert [Path(r.removeprefix("path:")).name for r in p["origin_unknown"]] == ["b.sealed"]
    rc, out, err = cli("incident", "key-compromise", key + "@2", "--path", str(root), "--json")
    assert rc == 0 and sorted(Path(f["location"]).name for f in json.loads(out)["found"]) == ["a.sealed", "b.sealed"]


def test_cert_compromise_of_the_client_lists_its_requests_and_the_server_refuses_it(world: World) -> None:
    """Last in the module: it revokes the client certificate every test here uses."""
    import json
    import time

    from modelseal.errors import ModelsealError

    w = world
    w.env.svc.create("local:cert-case")
    _push(w, "local:cert-case", None, "y", ["team/y:v1"])
    trainer = "spiffe://example.org/prod/service/trainer"
    deadline = time.monotonic() + 20
    while True:  # the server's decider writes its audit events in batches, off the request path
        rc, out, err = cli("incident", "cert-compromise", trainer, "--json")
        assert rc == 0, out + err
        pushes = [e for e in json.loads(out)["activity"] if e["key"] == "push Repository:team/y"]
        if pushes or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert pushes and all(e["actor"] == trainer for e in pushes)
    rc, out, err = cli("incident", "cert-compromise", trainer, "--execute", "--json")
    assert rc == 0, out + err
    assert all(s["result"].startswith("revoked") for s in json.loads(out)["serials"])
    with pytest.raises(ModelsealError) as refused:
        registry.pull(f"{w.host}/team/y:v1", w.env.work / "y-after.sealed", verify=False, **w.kw())
    assert "revoked" in str(refused.value)
