"""``modelseal backup drill``: restore a backup into a throwaway environment, check it, time
it, and record the result (docs/recovery.md, "Restore drills").

The steps, each timed: the backup's manifest verified (signature under a key this host
trusts, every part present, the chain intact: ``recovery.sealing.load_verified``); every part
unsealed into memory (the production key where this host reaches it, else the offline
recovery key from its shares); the parts restored into a fresh ``MODELSEAL_HOME`` and
registry folder inside a private work folder under the live home (``drillwork``: a killed
drill's is swept by the next; the live audit key is never copied there), and the OpenBao
snapshot into a temporary OpenBao (``recovery.baosnap.temporary_bao``), which the restored
environment is pointed at;
the restored keystore opened (passphrase or shares); the restored audit log checked
(``drillaudit``); the artifacts checked with the restored keys and trust policy
(``drillcheck``). The recovery time (RTO) runs from the start to restored-and-checked; the
recovery point (RPO) is the backup's age, and the live audit entries after its tree head.
Both are compared with ``--rto``/``--rpo`` or config.toml ``[backup] rto``/``rpo``; a drill
with no target for either fails (a recovery not measured against an objective is not a
pass), and so does one that checked no artifact at all.

Whatever happens, the work folder and OpenBao are removed, the recovery key is dropped
from this process, and a signed record goes into the LIVE home with its ``backup-drill``
audit event (``records``): result ``ok``, else the error class of what stopped the drill
(``DrillFailed`` when it ran and a check failed). Then any failure raises ``DrillFailed``.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelseal.audit.checks import read_checkpoint
from modelseal.audit.events import AuditSink
from modelseal.audit.log import MerkleAuditLog
from modelseal.errors import BackupError, DrillFailed, ModelsealError
from modelseal.keys.config import config_table
from modelseal.keys.keystore import keystore_path
from modelseal.keys.service import KeyService, printable
from modelseal.recipes.context import trust_policy
from modelseal.recovery import drillenv, drillwork, records
from modelseal.recovery.drillaudit import AuditFindings, check_audit, recorded_head
from modelseal.recovery.drillcheck import Failure, Findings, Targets, check_artifacts
from modelseal.recovery.locations import Locations
from modelseal.registry.sqlmeta import open_meta
from modelseal.registry.stores import open_blobs

_DURATION = re.compile(r"([0-9]{1,7})([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: object, where: str) -> float:
    """Seconds of ``90``, ``90s``, ``30m``, ``4h`` or ``2d``."""
    m = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise BackupError(f"{where} takes a duration like 90s, 30m, 4h or 1d")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


@dataclass(frozen=True)
class DrillRequest:
    source: str  # DIR or s3://BUCKET/PREFIX
    backup_id: str | None = None
    sample: int | None = None
    paths: tuple[Path, ...] = ()
    recovery_shares: tuple[Path, ...] = ()
    keystore_shares: tuple[Path, ...] = ()
    bao_unseal_keys: Path | None = None
    bao_token_file: Path | None = None
    registry_blobs: str | None = None
    registry_data: Path | None = None
    rto: float | None = None
    rpo: float | None = None
    signer_keys: tuple[str, ...] = ()
    witness: Path | None = None


@dataclass
class Step:
    name: str
    seconds: float = 0.0
    ok: bool = True
    detail: str = ""


@dataclass
class DrillReport:
    request: DrillRequest
    started: float
    steps: list[Step] = field(default_factory=list)
    backup: dict[str, Any] = field(default_factory=dict)
    keys: str = ""
    keystore: str = ""
    findings: Findings = field(default_factory=Findings)
    audit: AuditFindings | None = None
    failures: list[Failure] = field(default_factory=list)
    rto: dict[str, Any] = field(default_factory=dict)
    rpo: dict[str, Any] = field(default_factory=dict)
    stopped_by: str | None = None  # the error class that stopped the drill
    unlocked: list[str] = field(default_factory=list)  # recovery keys this drill unlocked
    checked_at: float | None = None  # the clock when everything was restored and checked
    record: Path | None = None
    record_sha256: str = ""

    @property
    def all_failures(self) -> list[Failure]:
        return [*self.failures, *self.findings.failures, *(self.audit.failures if self.audit else [])]

    @property
    def result(self) -> str:
        if self.stopped_by is not None:
            return self.stopped_by
        return "DrillFailed" if self.all_failures else "ok"

    def raise_if_failed(self) -> None:
        failures = self.all_failures
        if failures or self.stopped_by is not None:
            first = failures[0].line() if failures else str(self.stopped_by)
            raise DrillFailed(f"the restore drill failed ({len(failures)} failures; first: {printable(first)[:300]})")

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.request.source,
            "backup": self.backup,
            "started": self.started,
            "result": self.result,
            "keys": self.keys,
            "keystore": self.keystore,
            "steps": [vars(s) for s in self.steps],
            "artifacts": self.findings.to_json(),
            "audit": self.audit.to_json() if self.audit else None,
            "rto": self.rto,
            "rpo": self.rpo,
            "failures": [vars(f) for f in self.all_failures],
        }


class _Steps:
    def __init__(self, report: DrillReport, clock: Callable[[], float]) -> None:
        self.report, self.clock = report, clock

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Step]:
        s = Step(name)
        self.report.steps.append(s)
        t = self.clock()
        try:
            yield s
        except BaseException as e:
            s.ok = False
            s.detail = s.detail or f"{type(e).__name__}: {printable(str(e))[:300]}"
            raise
        finally:
            s.seconds = round(self.clock() - t, 6)


def _targets(report: DrillReport, req: DrillRequest, loc: Locations, restored: set[str]) -> Targets:
    meta = blobs = None
    if "registry" in restored:
        if req.registry_blobs is None and req.registry_data is None:
            report.failures.append(
                Failure("registry", "the backup holds a registry: give --registry-blobs or --registry-data to check it")
            )
        else:
            assert loc.registry_data is not None
            meta = open_meta(None, loc.registry_data)
            data = req.registry_data or loc.registry_data
            try:
                blobs = open_blobs(req.registry_blobs, data)
            except ValueError as e:
                raise BackupError(str(e)) from None
    return Targets(meta, blobs, req.paths, req.sample)


def _restore(
    stack: contextlib.ExitStack, req: DrillRequest, parts: dict[str, bytes], manifest: Any, loc: Locations
) -> tuple[Locations, str | None]:
    from modelseal.recovery.baosnap import temporary_bao
    from modelseal.recovery.restoreparts import restore_part

    kinds = {e.name: e.kind for e in manifest.parts}
    for name, data in parts.items():
        if name == "config":
            data = drillwork.without_audit_key(data)
        if kinds[name] != "bao-snapshot":
            restore_part(name, kinds[name], data, loc, replace=True)
    token = None
    snapshot = next((data for name, data in parts.items() if kinds[name] == "bao-snapshot"), None)
    if snapshot is not None:
        if req.bao_unseal_keys is None:
            raise BackupError("the backup holds an OpenBao snapshot: give its unseal keys (--bao-unseal-keys FILE)")
        token = drillenv.read_token(req.bao_token_file)
        if token is None:
            raise BackupError("the backup holds an OpenBao snapshot: give its token (--bao-token-file FILE)")
        keys = drillenv.secret_lines([req.bao_unseal_keys], "OpenBao unseal key")
        work = loc.home.parent / drillwork.BAO_FOLDER
        work.mkdir(mode=0o700, exist_ok=True)
        bao = stack.enter_context(temporary_bao(work, snapshot, keys, token))
        loc = Locations(loc.home, loc.registry_db, loc.registry_data, loc.governance_db, loc.audit, bao)
    return loc, token


def _targets_of(live: Locations) -> tuple[float | None, float | None]:
    table = config_table("backup", live.home)
    rto = parse_duration(table["rto"], "[backup] rto") if "rto" in table else None
    rpo = parse_duration(table["rpo"], "[backup] rpo") if "rpo" in table else None
    return rto, rpo


def _live_log(live: Locations, sink: AuditSink) -> MerkleAuditLog | None:
    if isinstance(sink, MerkleAuditLog):
        return sink
    try:
        return MerkleAuditLog(live.audit)
    except ModelsealError:
        return None


def _restore_and_check(
    report: DrillReport,
    req: DrillRequest,
    parts: dict[str, bytes],
    manifest: Any,
    steps: _Steps,
    audit: tuple[dict[str, Any], MerkleAuditLog | None, dict[str, Any] | None],
    live: Locations,
) -> None:
    """The parts into a throwaway environment, then its checks (removed on the way out)."""
    trusted, live_log, checkpoint = audit
    with drillwork.work_folder(live.home) as root, contextlib.ExitStack() as stack:
        (root / "home").mkdir(mode=0o700)
        loc = Locations(root / "home", None, root / "registry", None, root / "home" / "audit.db", None)
        with steps.step("restore"):
            loc, token = _restore(stack, req, parts, manifest, loc)
            restored = set(parts)
            parts.clear()  # the plaintext is in the temporary environment now
        passphrase = None
        if "keystore" in restored:
            with steps.step("open keystore"):
                passphrase, report.keystore = drillenv.open_keystore(keystore_path(loc.home), req.keystore_shares)
        if "audit" in restored:
            with steps.step("check audit log"):
                entry = next(e for e in manifest.parts if e.name == "audit")
                head = recorded_head(entry.meta)
                report.audit = check_audit(loc.audit, trusted, head, scratch=root, live=live_log, checkpoint=checkpoint)
        else:
            report.failures.append(Failure("audit log", "the backup holds no audit log"))
        with drillenv.isolated(loc.home, loc.bao, token), steps.step("check artifacts") as s:
            restored_svc = drillenv.restored_service(loc.home, passphrase)
            targets = _targets(report, req, loc, restored)
            (root / "scratch").mkdir(mode=0o700)
            report.findings = check_artifacts(targets, trust_policy(restored_svc), restored_svc, root / "scratch")
            s.detail = f"{len(report.findings.checked)} passed, {len(report.findings.failures)} failed"
            if targets.meta is not None:
                targets.meta.close()
            if not report.findings.checked and not report.findings.failures:
                f = report.findings
                what = f"no artifact was checked ({f.registry_total} in the restored registry, {len(req.paths)} --path)"
                report.failures.append(Failure("artifacts", what + ": a drill that checks nothing proves nothing"))
        report.checked_at = steps.clock()  # restored and checked: the RTO stops here, before the cleanup


def _run(
    report: DrillReport, req: DrillRequest, live: Locations, svc: KeyService, sink: AuditSink, steps: _Steps
) -> Any:
    from modelseal.recovery.sealing import load_verified

    with steps.step("verify backup"):
        store, manifest = load_verified(req.source, req.backup_id, signer_keys=req.signer_keys, home=live.home)
        report.backup = {
            "id": manifest.id,
            "sequence": manifest.sequence,
            "created": manifest.created,
            "env": manifest.env,
            "host": manifest.host,
            "parts": [e.name for e in manifest.parts],
            "signer_key": manifest.signer,  # the backup signing key that signed the manifest
        }
    try:
        live_log = _live_log(live, sink)
        trusted = live_log.trusted_keys() if live_log is not None else {}
        checkpoint = read_checkpoint(req.witness) if req.witness is not None else None
        with steps.step("unseal parts"):
            parts, report.keys = drillenv.unseal_parts(
                store, manifest, manifest.parts, svc, req.recovery_shares, report.unlocked
            )
        _restore_and_check(report, req, parts, manifest, steps, (trusted, live_log, checkpoint), live)
    finally:
        store.close()
    return manifest


def run_drill(
    req: DrillRequest,
    live: Locations,
    svc: KeyService,
    sink: AuditSink,
    *,
    now: Callable[[], float] = time.time,
    clock: Callable[[], float] = time.monotonic,
    check: bool = True,
) -> DrillReport:
    """The drill of the module docstring; ``DrillFailed`` (after the record) on any failure
    (``check=False``: the report all the same, for the caller to print first)."""
    if req.sample is not None and (isinstance(req.sample, bool) or not isinstance(req.sample, int) or req.sample < 1):
        raise BackupError("a drill samples at least one artifact (sample >= 1, or None for all)")
    report = DrillReport(req, now())
    steps = _Steps(report, clock)
    t0 = clock()
    rto_target, rpo_target = req.rto, req.rpo
    try:
        if rto_target is None or rpo_target is None:
            configured = _targets_of(live)
            rto_target = rto_target if rto_target is not None else configured[0]
            rpo_target = rpo_target if rpo_target is not None else configured[1]
        _run(report, req, live, svc, sink, steps)
    except Exception as e:  # whatever stopped it is the drill's result (a Ctrl-C is not: no record)
        report.stopped_by = type(e).__name__
        report.failures.append(Failure("drill", f"stopped at {_last(report)}: {type(e).__name__}: {str(e)[:300]}"))
    finally:
        drillenv.forget_recovery(report.unlocked, svc)
    measured = (report.checked_at if report.checked_at is not None else clock()) - t0
    _objectives(report, measured, rto_target, rpo_target)
    report.record, report.record_sha256 = records.write_record(
        records.DRILL, report.to_json(), live.home, sink, result=report.result, started=report.started
    )
    if check:
        report.raise_if_failed()
    return report


def _last(report: DrillReport) -> str:
    return report.steps[-1].name if report.steps else "the start"


NO_TARGET = "no target set"


def _objectives(report: DrillReport, measured: float, rto: float | None, rpo: float | None) -> None:
    """RTO and RPO against their targets; no target is a failure (not measured against one)."""
    report.rto = {"seconds": round(measured, 3), "target": rto, "ok": rto is not None and measured <= rto}
    created = report.backup.get("created")
    age = report.started - created if isinstance(created, int | float) else None
    after = report.audit.events_after if report.audit else None
    ok = rpo is not None and age is not None and age <= rpo
    report.rpo = {"backup_age_seconds": None if age is None else round(age, 3), "events_after": after}
    report.rpo.update(target=rpo, ok=ok)
    for name, target, flag in (("RTO", rto, "--rto"), ("RPO", rpo, "--rpo")):
        if target is None:
            (report.rto if name == "RTO" else report.rpo)["note"] = NO_TARGET
            what = f"{NO_TARGET} ({flag} or config.toml [backup] {name.lower()}): not measured against an objective"
            report.failures.append(Failure(name, what))
    if rto is not None and not report.rto["ok"]:
        report.failures.append(Failure("RTO", f"the recovery took {measured:.1f} s, over the target of {rto:g} s"))
    if rpo is not None and age is not None and not ok:
        report.failures.append(Failure("RPO", f"the backup is {age:.0f} s old, over the target of {rpo:g} s"))


def _shown(target: object) -> str:
    if not isinstance(target, float | int):
        return f"{NO_TARGET}: not measured against an objective (FAILED)"
    return f"target {target:g} s"


def table(report: DrillReport) -> str:
    """The drill as a table: each step and its time, then the checks and the objectives."""
    lines = [f"{'step':<18} {'seconds':>9}  result", "-" * 72]
    for s in report.steps:
        lines.append(f"{s.name:<18} {s.seconds:>9.3f}  {'ok' if s.ok else 'FAILED'}  {printable(s.detail)[:120]}")
    f = report.findings
    lines.append(f"artifacts: {f.registry_total} in the registry, {f.sampled} sampled, {len(f.checked)} passed")
    if report.audit is not None:
        a = report.audit
        lines.append(f"audit log: {a.restored_size} entries restored, {a.events_after} live entries after the backup")
    rto, rpo = report.rto, report.rpo
    lines.append(f"RTO: {rto.get('seconds')} s, {_shown(rto.get('target'))}")
    age, after = rpo.get("backup_age_seconds"), rpo.get("events_after")
    lines.append(f"RPO: backup {age} s old, {after} audit entries since, {_shown(rpo.get('target'))}")
    for fail in report.all_failures:
        lines.append(f"FAILED {printable(fail.line())[:400]}")
    lines.append(f"result: {report.result}; record {report.record}")
    return "\n".join(lines)


__all__ = ["DrillReport", "DrillRequest", "Step", "parse_duration", "run_drill", "table"]
