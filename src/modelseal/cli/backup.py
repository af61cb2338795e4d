"""The ``modelseal backup`` commands (docs/recovery.md): ``backup keygen`` makes the offline
recovery key and splits it, ``backup create`` seals a chained, signed backup, ``backup list``
and ``backup verify`` read one back; ``backup drill`` and ``backup restore`` are in
``cli.drill``. Thin: ``modelseal.recovery`` does the work.
"""

from __future__ import annotations

from typing import Any

from modelseal.cli import drill


def add_backup(sub: Any) -> None:
    p = sub.add_parser("backup", help="encrypted, chained backups, restore drills and restores (docs/recovery.md)")
    bsub = p.add_subparsers(dest="backup_cmd", required=True)
    drill.add_drill_commands(bsub)
