"""``report.html``: the bundle for a person (docs/evidence.md, "The report").

One self-contained page: inline CSS only, no script, no image, no font, no link out (a
Content-Security-Policy of ``default-src 'none'`` says so to the browser as well), so it
renders the same offline and cannot call anywhere. A heading per section and for the control
index. Every value that came from data (key names, identities, reasons, record fields) goes
through ``html.escape``; nothing read is ever markup. The JSON files are the evidence; the
page shows them, bounded (``MAX_ROWS`` rows per table, the rest counted).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from modelseal.evidence.controls import EVIDENCED, NONE
from modelseal.evidence.model import ITEMS, SECTIONS, utc

MAX_ROWS = 1000
MAX_COLUMNS = 12
MAX_CELL = 300
_TIME_KEYS = {"time", "started", "finished", "generated", "checked"}

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1b1f24;background:#fff}
h1{font-size:24px;margin:0 0 8px}h2{font-size:19px;border-bottom:2px solid #2d6cdf;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:20px 0 6px}table{border-collapse:collapse;margin:6px 0 12px;width:100%}
th,td{border:1px solid #c9d1d9;padding:3px 6px;text-align:left;vertical-align:top;word-break:break-word}
th{background:#eef2f7}.ok{color:#116329;font-weight:600}.none{color:#a40e26;font-weight:600}
.warn{color:#9a6700;font-weight:600}
.attn{background:#fff8c5;border-left:4px solid #bf8700;padding:4px 8px;margin:4px 0}
.gap{background:#ffebe9;border-left:4px solid #cf222e;padding:4px 8px;margin:4px 0}
.muted{color:#57606a}code{font-size:12px}.st{white-space:nowrap}
"""


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def cell(key: str, value: Any) -> str:
    """One value as escaped text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in _TIME_KEYS and isinstance(value, int | float):
        return e(utc(value))
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        text = ", ".join(str(v) for v in value)
    elif isinstance(value, dict | list):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    else:
        text = str(value)
    return e(text if len(text) <= MAX_CELL else text[:MAX_CELL] + "...")


def table(entries: Sequence[Mapping[str, Any]]) -> str:
    if not entries:
        return '<p class="muted">None in the window.</p>'
    cols: list[str] = []
    for entry in entries[:MAX_ROWS]:
        cols.extend(k for k in entry if k not in cols)
    shown, rest = cols[:MAX_COLUMNS], cols[MAX_COLUMNS:]
    head = "".join(f"<th>{e(c)}</th>" for c in shown) + ("<th>more</th>" if rest else "")
    rows = []
    for entry in entries[:MAX_ROWS]:
        tds = "".join(f"<td>{cell(c, entry.get(c))}</td>" for c in shown)
        if rest:
            tds += f"<td>{cell('more', {k: entry[k] for k in rest if k in entry})}</td>"
        rows.append(f"<tr>{tds}</tr>")
    more = (
        f'<p class="muted">{len(entries) - MAX_ROWS} more rows in the JSON file.</p>' if len(entries) > MAX_ROWS else ""
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}"


def _notes(lines: Sequence[str], css: str) -> str:
    return "".join(f'<div class="{css}">{e(line)}</div>' for line in lines)


def _summary(index: Mapping[str, Any]) -> str:
    v = index.get("audit", {})
    state = '<span class="ok">verifies</span>' if v.get("ok") else '<span class="none">DOES NOT VERIFY</span>'
    rows = [
        ("Window", f"{index['window']['from']} to {index['window']['to']} (end excluded)"),
        ("Host", index.get("host", "")),
        ("Generated", utc(index.get("generated"))),
        ("Signed by audit key", index.get("signer_key_id", "")),
    ]
    body = "".join(f"<tr><th>{e(k)}</th><td>{e(val)}</td></tr>" for k, val in rows)
    why = f" ({e(v.get('reason'))})" if v.get("reason") else ""
    body += f"<tr><th>Audit log</th><td>{state}: {e(v.get('entries', 0))} entries{why}</td></tr>"
    return f'<section id="summary"><h2>Summary</h2><table>{body}</table></section>'


def _index(controls: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for c in controls:
        status = c["status"]
        css = "ok" if status == EVIDENCED else "none" if status == NONE else "warn"
        items = "<br>".join(
            f'<a href="#{e(i["item"])}">{e(i["item"])}</a> ({e(i.get("qualifying"))} of {e(i["count"])})'
            + (" <i>state at export</i>" if i.get("as_of") == "state at export" else "")
            for i in c["items"]
        )
        rows.append(
            f"<tr><td>{e(c['framework'])}</td><td><b>{e(c['ref'])}</b></td><td>{e(c['title'])}</td>"
            f'<td class="{css} st">{e(status)}</td><td>{items}</td></tr>'
        )
    head = (
        "<tr><th>framework</th><th>control</th><th>what it asks</th><th>status</th>"
        "<th>items (qualifying of entries)</th></tr>"
    )
    body = "".join(rows)
    table_html = f"<table><thead>{head}</thead><tbody>{body}</tbody></table>"
    return f'<section id="controls"><h2>Control index</h2>{table_html}</section>'


def _section(name: str, doc: Mapping[str, Any]) -> str:
    parts = [f'<section id="{e(name)}"><h2>{e(SECTIONS[name][1])}</h2>', _notes(doc.get("gaps", []), "gap")]
    attention = doc.get("attention", {})
    for item, entries in doc.get("items", {}).items():
        parts.append(
            f'<h3 id="{e(item)}">{e(ITEMS.get(item, item))} <span class="muted">({e(item)}, {len(entries)})</span></h3>'
        )
        parts.append(_notes(attention.get(item, []), "attn"))
        parts.append(table(entries))
    if name == "audit" and doc.get("tree_head"):
        th = doc["tree_head"]
        parts.append("<h3>Signed tree head</h3>")
        parts.append(table([{k: th.get(k) for k in ("size", "head", "key_id", "signature")}]))
        parts.append(f'<p class="muted">{len(doc.get("proofs", []))} inclusion proofs in audit.json.</p>')
    parts.append("</section>")
    return "".join(parts)


def render(index: Mapping[str, Any], sections: Mapping[str, Mapping[str, Any]]) -> bytes:
    """The page, as UTF-8 bytes (a lone surrogate in data becomes ``?``, never an error)."""
    nav = " | ".join(f'<a href="#{e(n)}">{e(t)}</a>' for n, (_, t) in SECTIONS.items())
    body = [
        f"<h1>Compliance evidence: {e(index['window']['from'])} to {e(index['window']['to'])}</h1>",
        f'<p class="muted">modelseal evidence bundle ({e(index.get("format", ""))}). Check it with '
        "<code>modelseal evidence verify DIR --signer-key HEX</code>: the JSON files are the evidence, "
        f'this page shows them.</p><p><a href="#controls">Control index</a> | {nav}</p>',
        _summary(index),
        _index(index["controls"]),
        *(_section(n, sections[n]) for n in SECTIONS),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>Compliance evidence {e(index['window']['from'])} to {e(index['window']['to'])}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
    return page.encode("utf-8", errors="replace")


__all__ = ["MAX_ROWS", "render"]
