"""The ``modelseal evidence`` commands (docs/evidence.md): ``evidence export`` writes the signed
compliance bundle (JSON and a self-contained HTML report), ``evidence verify`` checks one.
Thin: ``modelseal.evidence`` does the work.
"""

from __future__ import annotations

from typing import Any


def add_evidence(sub: Any) -> None:
    p = sub.add_parser("evidence", help="the signed compliance evidence bundle: export, verify (docs/evidence.md)")
    p.add_subparsers(dest="evidence_cmd", required=True)
