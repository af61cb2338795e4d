"""report.html of an evidence bundle, rendered in headless Chromium (Debian ``chromium``): the
screenshot is not blank, the expected headings are in the DOM, nothing is loaded from
anywhere (no script, no external ``src``/``href``), and data is escaped, never markup."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog
from modelseal.evidence.bundle import Sources, export
from modelseal.evidence.model import SECTIONS, Window, canonical
from modelseal.keys.service import KeyService
from modelseal.telemetry.scanmodel import TLS_WEAK_PROTOCOL, Finding, ScanReport
from tests.chromium import CHROMIUM, FLAGS
from tests.conftest import Env

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="chromium is not installed (Debian package chromium; scripts/test.sh installs it)",
)
HOSTILE = '<script>alert(1)</script><img src="http://203.0.113.9/x.png">'


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={tmp / 'profile'}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, timeout=120, check=True)


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[str] = []
        self.headings: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.refs += [v or "" for k, v in attrs if k in ("src", "href", "srcset", "action", "poster", "data")]
        if tag in ("h1", "h2"):
            self._in, self._text = tag, ""

    def handle_data(self, data: str) -> None:
        if self._in:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self.headings.append(self._text.strip())
            self._in = None


@pytest.fixture
def bundle(env: Env, tmp_path: Path) -> Path:
    log = MerkleAuditLog(env.home / "audit.db")
    svc = KeyService(sink=log)
    svc.create("local:report-kek")
    svc.rotate("local:report-kek")
    folder = env.home / "evidence" / "drills"
    folder.mkdir(parents=True, mode=0o700)
    data = canonical({"format": "modelseal-backup-drill/v1", "started": time.time(), "note": HOSTILE})
    (folder / "drill-1.json").write_bytes(data)
    log.emit(
        AuditEvent(
            "backup-drill", "evidence:evidence/drills/drill-1.json", "ok", artifact=hashlib.sha256(data).hexdigest()
        )
    )
    scan = ScanReport("tls://127.0.0.1:8443")
    scan.add(Finding(TLS_WEAK_PROTOCOL, "tls://127.0.0.1:8443", HOSTILE))
    day = time.strftime("%Y-%m-%d", time.gmtime())
    src = Sources(env.home, env.home / "audit.db", tls_reports=({**scan.to_json(), "source": "test"},))
    return export(tmp_path / "bundle", Window.parse(day, day), src, KeyService()).folder


def test_chromium_renders_the_report_with_its_headings(bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    page = (bundle / "report.html").as_uri()
    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", page)
    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
        grey = img.convert("L")
        dark = sum(grey.histogram()[:200])  # text, rules and table borders
        assert dark > 0.01 * 1280 * 2400, "the screenshot is (nearly) blank"
        assert len(img.convert("RGB").getcolors(1 << 20) or []) > 10  # more than a flat fill
    dom = _Dom()
    dom.feed(_chromium(tmp_path, "--dump-dom", page).stdout.decode())
    assert dom.headings[0].startswith("Compliance evidence")
    assert {"Summary", "Control index", *(t for _, t in SECTIONS.values())} <= set(dom.headings)
    assert "script" not in dom.tags and "img" not in dom.tags and "link" not in dom.tags
    assert dom.refs and all(r.startswith("#") for r in dom.refs), [r for r in dom.refs if not r.startswith("#")]


def test_data_is_escaped_never_markup(bundle: Path) -> None:
    text = (bundle / "report.html").read_text()
    assert "<script" not in text and "<img" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "default-src 'none'" in text  # the browser is told too: nothing may load
    tls = json.loads((bundle / "tls.json").read_text())
    assert tls["items"]["tls.scans"][0]["findings"][0]["detail"] == HOSTILE  # the JSON keeps the data as it was
