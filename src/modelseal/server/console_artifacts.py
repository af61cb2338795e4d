"""The console's Artifacts page (docs/console.md): being built (issue 16)."""

from __future__ import annotations

from aiohttp import web

from modelseal.server.console_page import PREFIX, nav


def add_routes(app: web.Application) -> None:
    """Register ``{PREFIX}/artifacts`` and its place in the navigation."""
    nav(f"{PREFIX}/artifacts", "Artifacts")


__all__ = ["add_routes"]
