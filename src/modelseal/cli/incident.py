"""The ``modelseal incident`` commands (docs/recovery.md): ``incident key-compromise`` and
``incident cert-compromise``, the runbooks as commands. Thin: ``modelseal.recovery`` does the work.
"""

from __future__ import annotations

from typing import Any


def add_incident(sub: Any) -> None:
    p = sub.add_parser("incident", help="incident runbooks as commands: key-compromise, cert-compromise")
    p.add_subparsers(dest="incident_cmd", required=True)
