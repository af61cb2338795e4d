"""The scheduling units (deploy/systemd/modelseal-backup*.{service,timer}, docs/recovery.md
"Scheduling"): systemd-analyze verify accepts them, and the command lines they run parse with
modelseal's own CLI (a renamed flag would fail here, not at 02:15 on a Sunday)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from modelseal.cli import build_parser

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
NAMES = (
    "modelseal-backup.service",
    "modelseal-backup.timer",
    "modelseal-backup-drill.service",
    "modelseal-backup-drill.timer",
)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not on this machine")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(UNITS / n) for n in NAMES)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr.lower() and "error" not in proc.stderr.lower(), proc.stderr


def _command(unit: str) -> list[str]:
    text = (UNITS / unit).read_text().replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if x.startswith("ExecStart=")]
    inner = shlex.split(line.removeprefix("ExecStart="))[-1]  # /bin/sh -c '...'
    words = shlex.split(inner.replace("%d", "/run/credentials/x"))
    return words[words.index("/opt/modelseal/bin/modelseal") + 1 :]


@pytest.mark.parametrize(
    ("unit", "command"), [("modelseal-backup.service", "create"), ("modelseal-backup-drill.service", "drill")]
)
def test_the_units_run_commands_the_cli_takes(unit: str, command: str) -> None:
    argv = _command(unit)
    assert argv[:2] == ["backup", command]
    args = build_parser().parse_args(argv)
    assert args.backup_cmd == command
    if command == "drill":
        assert args.source == "/var/backups/modelseal" and args.sample == 20
        assert (args.rto, args.rpo) == (4 * 3600, 26 * 3600)  # a drill without targets fails
    else:
        assert args.to == "/var/backups/modelseal" and args.bao_token_file == "/run/credentials/x/bao-token"


def test_the_timers_start_their_services() -> None:
    for timer, every in (("modelseal-backup.timer", "*-*-* 02:15:00"), ("modelseal-backup-drill.timer", "Sun *-*-*")):
        text = (UNITS / timer).read_text()
        assert f"Unit={timer.replace('.timer', '.service')}" in text
        assert f"OnCalendar={every}" in text and "Persistent=true" in text
