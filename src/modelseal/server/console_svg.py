"""Server-side SVG charts of the web console (docs/console.md): a stacked column chart of
counts over time buckets (a key's operations per day) and a horizontal meter (a share, such
as the protection coverage of the registry).

Pure functions from data to one SVG string, which a template inserts as markup (the only
markup a page hands its template, ``console_page``). So this module owns the escaping: every
text (a label, a series name, a title) is cut to one printable line and XML-escaped, quotes
included, and every number is formatted here, never taken as text. The console's
Content-Security-Policy allows no ``style`` attribute or element, so colours and sizes are
presentation attributes (``fill``, ``stroke``, ``font-size``) and ``class``. Each chart is
``role="img"`` with an ``aria-label`` and a ``<title>`` first (no ``id``: several charts on
one page never collide), each column segment its own ``<title>`` with its count. Output
depends on the arguments only: the same data gives the same bytes.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from modelseal.keys.service import printable

# Colour-blind safe (Okabe and Ito), in the order series are given.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
MAX_TEXT = 80
MAX_BUCKETS = 400
MAX_SERIES = len(PALETTE)
_FONT = 'font-family="system-ui, sans-serif"'


def text(value: object, n: int = MAX_TEXT) -> str:
    """``value`` as one printable line of at most ``n`` characters, XML-escaped (quotes too)."""
    return html.escape(printable(str(value))[:n], quote=True)


def number(value: float) -> str:
    """A count or a coordinate as SVG and people read it: an integer without a fraction, else
    at most two decimals; a non-finite value is 0."""
    if not math.isfinite(value):
        return "0"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _nice_top(peak: int) -> int:
    """The top of the count axis: the peak rounded up to 1, 2 or 5 times a power of ten."""
    if peak <= 1:
        return 1
    scale: int = 10 ** math.floor(math.log10(peak))
    for step in (1, 2, 5, 10):
        if peak <= step * scale:
            return step * scale
    return 10 * scale


def _open(width: int, height: int, label: str, css: str) -> list[str]:
    safe = text(label, 200)
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{safe}" class="{css}">',
        f"<title>{safe}</title>",
    ]


def column_chart(
    title: str,
    buckets: Sequence[str],
    series: Sequence[tuple[str, Sequence[int]]],
    *,
    width: int = 640,
    height: int = 220,
) -> str:
    """Stacked columns, one per bucket (``buckets``: their labels, oldest first), one
    segment per series (``series``: name and one count per bucket), with a count axis, the
    bucket labels (thinned out to about a dozen) and a legend. At most ``MAX_BUCKETS``
    buckets (the newest kept) and ``MAX_SERIES`` series (the rest summed as "other");
    negative counts are 0. No bucket: a chart saying "no data"."""
    width, height = max(200, min(width, 2000)), max(120, min(height, 1000))
    buckets = list(buckets)[-MAX_BUCKETS:]
    n = len(buckets)
    rows = _series(series, n)
    totals = [sum(r[1][i] for r in rows) for i in range(n)]
    out = _open(width, height, title, "chart columns")
    left, right, top, bottom = 44, 8, 8, 40 + (16 if rows else 0)
    plot_w, plot_h = width - left - right, height - top - bottom
    base = top + plot_h
    out.append(f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#555555" stroke-width="1"/>')
    if n == 0 or not any(totals):
        out.append(
            f'<text x="{number(left + plot_w / 2)}" y="{number(top + plot_h / 2)}" text-anchor="middle" '
            f'{_FONT} font-size="13" fill="#555555">no data</text>'
        )
        if n == 0:
            out.append("</svg>")
            return "".join(out)
    peak = _nice_top(max(totals, default=0))
    for tick in (0, peak // 2, peak) if peak >= 2 else (0, peak):
        y = base - plot_h * tick / peak
        out.append(
            f'<line x1="{left - 4}" y1="{number(y)}" x2="{left + plot_w}" y2="{number(y)}" '
            f'stroke="#dddddd" stroke-width="1"/>'
            f'<text x="{left - 6}" y="{number(y + 4)}" text-anchor="end" {_FONT} font-size="11" '
            f'fill="#333333">{number(tick)}</text>'
        )
    slot = plot_w / n
    bar = max(1.0, slot * 0.8)
    every = max(1, math.ceil(n / 12))
    for i, label in enumerate(buckets):
        x = left + slot * i + (slot - bar) / 2
        y = float(base)
        for (name, counts), colour in zip(rows, PALETTE, strict=False):
            count = counts[i]
            if count <= 0:
                continue
            h = plot_h * count / peak
            y -= h
            out.append(
                f'<rect x="{number(x)}" y="{number(y)}" width="{number(bar)}" height="{number(h)}" '
                f'fill="{colour}"><title>{text(label, 40)}: {number(count)} {text(name, 40)}</title></rect>'
            )
        if i % every == 0:
            cx = left + slot * i + slot / 2
            out.append(
                f'<text x="{number(cx)}" y="{base + 14}" text-anchor="middle" {_FONT} font-size="10" '
                f'fill="#333333">{text(label, 12)}</text>'
            )
    out.extend(_legend(rows, left, height - 10))
    out.append("</svg>")
    return "".join(out)


def _series(series: Sequence[tuple[str, Sequence[int]]], n: int) -> list[tuple[str, list[int]]]:
    """Each series padded or cut to ``n`` counts, negatives as 0; series past ``MAX_SERIES - 1``
    summed into "other" when there are more than ``MAX_SERIES``."""
    rows = []
    for name, counts in series:
        fixed = [max(0, int(c)) for c in list(counts)[-n:]] if n else []
        rows.append((str(name), [0] * (n - len(fixed)) + fixed))
    if len(rows) > MAX_SERIES:
        rest = rows[MAX_SERIES - 1 :]
        rows = [*rows[: MAX_SERIES - 1], ("other", [sum(r[1][i] for r in rest) for i in range(n)])]
    return rows


def _legend(rows: Sequence[tuple[str, Sequence[int]]], x0: int, y: int) -> list[str]:
    out = []
    x = x0
    for (name, counts), colour in zip(rows, PALETTE, strict=False):
        label = f"{text(name, 24)} ({number(sum(counts))})"
        out.append(
            f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{x + 14}" y="{y}" {_FONT} font-size="11" fill="#333333">{label}</text>'
        )
        x += 24 + 7 * (len(printable(name)[:24]) + len(number(sum(counts))) + 3)
    return out


def meter(title: str, part: float, whole: float, *, width: int = 240, height: int = 28) -> str:
    """A horizontal bar filled ``part / whole`` (clamped to 0..1) with the percentage beside
    it; ``whole`` of 0 (nothing to measure) shows an empty bar and "n/a"."""
    width, height = max(80, min(width, 1000)), max(16, min(height, 200))
    known = math.isfinite(part) and math.isfinite(whole) and whole > 0
    share = min(1.0, max(0.0, part / whole)) if known else 0.0
    shown = f"{number(round(share * 100, 1))} %" if known else "n/a"
    label = f"{title}: {shown}"
    out = _open(width, height, label, "chart meter")
    bar_w, bar_h = width - 64, height - 8
    out.append(f'<rect x="0" y="4" width="{bar_w}" height="{bar_h}" fill="#eeeeee" stroke="#999999" stroke-width="1"/>')
    if share > 0:
        colour = "#176e2e" if share >= 0.95 else "#b26b00" if share >= 0.8 else "#a4161a"
        out.append(f'<rect x="0" y="4" width="{number(bar_w * share)}" height="{bar_h}" fill="{colour}"/>')
    out.append(
        f'<text x="{bar_w + 6}" y="{number(4 + bar_h / 2 + 4)}" {_FONT} font-size="12" '
        f'fill="#222222">{text(shown)}</text></svg>'
    )
    return "".join(out)


__all__ = ["MAX_BUCKETS", "MAX_SERIES", "PALETTE", "column_chart", "meter", "number", "text"]
