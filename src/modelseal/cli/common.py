"""Shared pieces of the CLI commands: the progress bar, argument parsers for contexts and
durations, plain/JSON report printing, and escaping of untrusted text for the terminal.
No command lives here.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class ProgressBar:
    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = max(total, 1), label, 0
        self.enabled = sys.stderr.isatty()
        self._last = 0.0
        self._start = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = min(1.0, self.done / self.total)
            rate = self.done / max(now - self._start, 1e-6) / 1e6
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {rate:8.1f} MB/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write("\n")


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def parse_context(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise ValueError(f"--context takes KEY=VALUE, got {pair!r}")
        if k in out:
            raise ValueError(f"--context key {k!r} given twice")
        out[k] = v
    return out


def escape(value: object, *, backslash: bool = True) -> str:
    """``value`` as one line of plain text that cannot forge output.

    Text read from an artifact, a signature file, a database or a server may hold line
    breaks, terminal escape sequences or bidirectional overrides; printed as is, it
    could add lines to a report or hide what follows. Every character that is not
    printable (``str.isprintable``: controls, format characters such as U+202E, line and
    paragraph separators, unassigned code points) becomes ``\\xHH``, ``\\uHHHH`` or
    ``\\UHHHHHHHH``, and a backslash becomes ``\\\\``, so the escaping is unambiguous.
    Ordinary text is returned unchanged. ``backslash=False`` leaves backslashes alone, for
    error lines whose parts were escaped already: still one line, never a forged one.
    """
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and ("\\" not in text or not backslash):
        return text
    out = []
    for ch in text:
        if ch == "\\" and backslash:
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) <= 0xFF:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


def print_report(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, sort_keys=True))  # ensure_ascii: every control character escaped
        return
    for k, v in obj.items():
        print(f"{escape(k):18} {escape(v) if not isinstance(v, dict | list) else json.dumps(v)}")


def fmt_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_days(text: str) -> float:
    units = {"d": 1.0, "h": 1 / 24, "w": 7.0}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
        if not math.isfinite(value) or value < 0:
            raise ValueError
        return value
    except ValueError:
        raise ValueError(f"--older-than takes a duration like 90d, 12h or 2w, got {text!r}") from None
