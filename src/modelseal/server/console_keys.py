"""The console's Keys page (docs/console.md): being built (issue 16)."""

from __future__ import annotations

from aiohttp import web

from modelseal.server.console_page import PREFIX, nav


def add_routes(app: web.Application) -> None:
    """Register ``{PREFIX}/keys`` and its place in the navigation."""
    nav(f"{PREFIX}/keys", "Keys")


__all__ = ["add_routes"]
