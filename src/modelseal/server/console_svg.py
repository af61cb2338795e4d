"""Server-side SVG charts of the web console (docs/console.md): being built (issue 16)."""

from __future__ import annotations

__all__: list[str] = []
