"""``modelseal backup drill`` and ``modelseal backup restore`` (docs/recovery.md). Thin:
``modelseal.recovery`` does the work.
"""

from __future__ import annotations

from typing import Any


def add_drill_commands(bsub: Any) -> None:
    """Add ``drill`` and ``restore`` to the ``backup`` group's subparsers."""
