"""Debian's Chromium for the tests that render in a real browser (the evidence report, the
web console): where it is and the flags every such test runs it with, headless and with
nothing of its own on the network (no QUIC, no background fetches, no updates, no sync)."""

from __future__ import annotations

import shutil

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

__all__ = ["CHROMIUM", "FLAGS"]
