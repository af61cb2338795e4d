"""The web console's sessions and one-time sign-in links (docs/console.md): being built (issue 16)."""

from __future__ import annotations

__all__: list[str] = []
