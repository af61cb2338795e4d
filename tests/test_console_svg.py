"""The console's server-side SVG charts (issue 16, helper B): every text escaped, numbers
formatted by the code, no style attribute, an accessible name, and the same bytes for the
same data; empty, one-bucket and many-bucket charts."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from modelseal.server import console_svg
from modelseal.server.console_svg import MAX_BUCKETS, column_chart, meter

NS = "{http://www.w3.org/2000/svg}"
HOSTILE = '"><script>alert(1)</script><rect onload="x" style="a" & \x00\x1b[31m'


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # well-formed XML: no raw control character, every & escaped
    assert root.tag == f"{NS}svg" and root.get("role") == "img" and root.get("aria-label")
    assert root[0].tag == f"{NS}title" and root[0].text == root.get("aria-label")
    for el in root.iter():
        assert "style" not in el.attrib and not any(a.startswith("on") for a in el.attrib)
        assert el.tag.removeprefix(NS) in {"svg", "title", "rect", "line", "text"}
    assert " id=" not in svg  # several charts on one page never share an id
    return root


def rects(root: ET.Element) -> list[ET.Element]:
    return [r for r in root.iter(f"{NS}rect") if r.find(f"{NS}title") is not None]


def test_a_hostile_label_series_and_title_are_escaped() -> None:
    svg = column_chart(HOSTILE, [HOSTILE, "b"], [(HOSTILE, [3, 1])])
    root = parse(svg)
    assert "<script" not in svg and "<rect onload" not in svg and "&lt;rect onload=&quot;x&quot;" in svg
    assert "&lt;script&gt;" in svg and "&quot;" in svg and "&amp;" in svg
    assert "\x00" not in svg and "\x1b" not in svg and "\\x00" in svg and "\\x1b" in svg
    [first, _second] = rects(root)
    assert (first.findtext(f"{NS}title") or "").endswith(": 3 " + console_svg.printable(HOSTILE)[:40])
    m = meter(HOSTILE, 1, 2)
    parse(m)
    assert "<script" not in m and "&lt;script&gt;" in m


def test_empty_data_says_no_data() -> None:
    for svg in (column_chart("Use", [], []), column_chart("Use", ["01-01", "01-02"], [("wrap", [0, 0])])):
        root = parse(svg)
        assert rects(root) == []
        assert "no data" in [t.text for t in root.iter(f"{NS}text")]
    assert "n/a" in meter("Coverage", 0, 0) and 'width="0"' not in meter("Coverage", 0, 0)


def test_one_bucket_stacks_its_series_in_order() -> None:
    root = parse(column_chart("Use", ["03-04"], [("wrap", [4]), ("unwrap", [6]), ("rotate", [0])]))
    bars = rects(root)
    assert [b.findtext(f"{NS}title") for b in bars] == ["03-04: 4 wrap", "03-04: 6 unwrap"]
    assert [b.get("fill") for b in bars] == list(console_svg.PALETTE[:2])
    (wrap_y, wrap_h), (un_y, un_h) = ((float(b.get("y", "")), float(b.get("height", ""))) for b in bars)
    assert un_y + un_h == wrap_y and abs(un_h / wrap_h - 1.5) < 1e-6  # stacked, to scale
    labels = [t.text for t in root.iter(f"{NS}text")]
    assert "03-04" in labels and "10" in labels and "wrap (4)" in labels and "rotate (0)" in labels


def test_many_buckets_are_bounded_thinned_and_deterministic() -> None:
    n = MAX_BUCKETS + 50
    buckets = [f"d{i}" for i in range(n)]
    series = [("wrap", [i % 7 for i in range(n)]), ("failed", [1] * n)]
    svg = column_chart("Use", buckets, series)
    assert svg == column_chart("Use", buckets, series)
    root = parse(svg)
    titles = [b.findtext(f"{NS}title") or "" for b in rects(root)]
    assert not any(t.startswith("d49:") for t in titles) and any(t.startswith(f"d{n - 1}:") for t in titles)
    shown = [t.text for t in root.iter(f"{NS}text") if (t.text or "").startswith("d")]
    assert 10 <= len(shown) <= 14 and shown[0] == "d50"
    for value in re.findall(r' (?:x|y|x1|x2|y1|y2|width|height)="([^"]+)"', svg):
        assert re.fullmatch(r"-?[0-9]+(\.[0-9]{1,2})?", value), value


def test_series_beyond_the_palette_are_summed_and_bad_counts_are_zero() -> None:
    series = [(f"s{i}", [1]) for i in range(12)] + [("neg", [-5])]
    root = parse(column_chart("Use", ["x"], series))
    titles = [b.findtext(f"{NS}title") for b in rects(root)]
    assert titles[-1] == "x: 5 other" and len(titles) == console_svg.MAX_SERIES


def test_meter_clamps_and_formats() -> None:
    assert "66.7 %" in meter("Coverage", 2, 3)
    full = parse(meter("Coverage", 5, 3))
    bars = [r for r in full.iter(f"{NS}rect")]
    assert bars[1].get("width") == bars[0].get("width") and "100 %" in ET.tostring(full, encoding="unicode")
    assert console_svg.number(float("nan")) == "0" and console_svg.number(2.0) == "2"
    assert console_svg.number(1 / 3) == "0.33"
