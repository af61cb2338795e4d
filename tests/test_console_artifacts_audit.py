"""The console's Artifacts and Audit log pages: the verified view of the
audit log (filters, paging, the inclusion proof checked by the server), the repository walk,
and proof.js in real Chromium: a proof verifies in the browser, a tampered one shows FAILED."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from modelseal.audit import merkle
from modelseal.audit.events import AuditEvent
from modelseal.audit.log import MerkleAuditLog
from modelseal.registry import layout
from modelseal.server import console_artifacts, console_usage
from modelseal.server.console_audit import AuditView, Filters
from modelseal.server.console_page import _ENV
from tests.chromium import CHROMIUM, FLAGS
from tests.conftest import Env

STATIC = Path(console_artifacts.__file__).with_name("console_static")


@pytest.fixture
def log(tmp_path: Path) -> MerkleAuditLog:
    audit = MerkleAuditLog(tmp_path / "audit.db")
    for i in range(37):
        op = "unwrap" if i % 3 else "rotate"
        audit.emit(
            AuditEvent(
                op,
                f"local:key-{i % 5}",
                "ok" if i % 7 else "denied",
                1,
                actor=f"spiffe://t/user/u{i % 2}",
                time=1_700_000_000.0 + i,
            )
        )
    return audit


def _view(log: MerkleAuditLog) -> AuditView:
    return AuditView(log, cache_seconds=0.0)


def test_filters_and_pages_newest_first(log: MerkleAuditLog) -> None:
    view = _view(log)
    assert view.status().ok and view.status().size == 37
    page = view.page(Filters(), None, n=10)
    assert [e["entry"] for e in page.rows] == list(range(37, 27, -1))
    assert page.before == 28
    rest = view.page(Filters(), page.before, n=100)
    assert [e["entry"] for e in rest.rows] == list(range(27, 0, -1)) and rest.before is None
    rotates = view.page(Filters(operation="rotate"), None, n=100).rows
    assert rotates and all(e["operation"] == "rotate" for e in rotates) and len(rotates) == 13
    keyed = view.page(Filters(key="key-3", result="denied"), None, n=100).rows
    assert [e["entry"] for e in keyed] == [e for e in range(37, 0, -1) if (e - 1) % 5 == 3 and (e - 1) % 7 == 0]
    window = view.page(Filters(since=1_700_000_010.0, until=1_700_000_012.0), None).rows
    assert [e["entry"] for e in window] == [12, 11]
    bounded = view.page(Filters(actor="nobody"), None, n=10, scan=5)
    assert bounded.rows == [] and bounded.scanned == (33, 37) and bounded.before == 33


def test_the_server_checks_each_proof_against_the_signed_head(log: MerkleAuditLog) -> None:
    view = _view(log)
    proof = view.prove(5, log.trusted_keys())
    assert proof is not None and proof.server_ok and proof.size == 37
    leaf = merkle.leaf_hash(proof.body.encode())
    path = [bytes.fromhex(h) for h in proof.path]
    assert merkle.verify_inclusion(4, 37, leaf, path, bytes.fromhex(proof.root))
    assert view.prove(38, log.trusted_keys()) is None and view.prove(0, log.trusted_keys()) is None
    other = view.prove(5, {})  # no configured key: the head's signature is not trusted
    assert other is not None and not other.server_ok


def test_a_row_forged_behind_the_logs_back_is_not_shown(log: MerkleAuditLog, tmp_path: Path) -> None:
    import sqlite3

    view = _view(log)
    assert view.status().ok
    con = sqlite3.connect(tmp_path / "audit.db")
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]
    for t in tables:
        con.execute(f"DROP TRIGGER {t}")
    (table,) = next(iter(con.execute("SELECT name FROM sqlite_master WHERE type='table' AND sql LIKE '%seq%'")))
    cols = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
    body = next(c for c in cols if c in ("event", "body", "data"))
    con.execute(f"UPDATE {table} SET {body} = replace({body}, 'rotate', 'create') WHERE seq = 4")
    con.commit()
    con.close()
    # the view verified before: the changed row no longer hashes to its verified leaf
    entries = [e["entry"] for e in view.page(Filters(), None, n=100).rows]
    assert 4 not in entries and len(entries) == 36
    assert view.prove(4, log.trusted_keys()) is None
    fresh = _view(log)  # verifying from the start: the batch holding the changed entry is not shown
    assert not fresh.status().ok and "entry 4" in fresh.status().reason
    assert all(e["entry"] < 4 for e in fresh.page(Filters(), None, n=100).rows)


class _Meta:
    def __init__(self, rows: list[tuple[str, str]]) -> None:
        self.rows = sorted(rows)

    def manifest_page(self, after: tuple[str, str] | None, n: int) -> list[tuple[str, str, str | None]]:
        found: list[tuple[str, str, str | None]] = [(r, d, None) for r, d in self.rows]
        return [x for x in found if after is None or (x[0], x[1]) > after][:n]


class _Reg:
    def __init__(self, rows: list[tuple[str, str]]) -> None:
        self.meta = _Meta(rows)


def test_repositories_are_walked_one_name_at_a_time() -> None:
    reg: Any = _Reg(
        [
            ("a/m", "sha256:" + "1" * 64),
            ("a/m", "sha512:" + "2" * 128),
            ("b", "sha256:" + "3" * 64),
            ("c", "sha256:" + "4" * 64),
        ]
    )
    assert console_artifacts.repository_names(reg, None, 2) == (["a/m", "b"], True)
    assert console_artifacts.repository_names(reg, "b", 5) == (["c"], False)
    assert console_artifacts.repository_names(reg, "c", 5) == ([], False)


def _proof_html(log: MerkleAuditLog, entry: int) -> str:
    view = _view(log)
    proof = view.prove(entry, log.trusted_keys())
    assert proof is not None
    return _ENV.get_template("audit_proof.html").render(
        title="Audit entry",
        identity=None,
        csrf="",
        expires=None,
        nav=[],
        here="",
        proof=proof,
        event={"entry": str(entry)},
    )


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian chromium is not installed")
def test_proof_js_verifies_in_chromium_and_fails_on_tampering(log: MerkleAuditLog, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    pages = {"/ok": _proof_html(log, 7), "/one": _proof_html(log, 37)}
    good = pages["/ok"]
    root = re.search(r'data-testid="sth-root">([0-9a-f]{64})<', good)
    assert root is not None
    wrong = ("0" if root.group(1)[0] != "0" else "1") + root.group(1)[1:]
    pages["/wrong-root"] = good.replace(root.group(1), wrong)
    pages["/wrong-path"] = re.sub(
        r'data-path="([0-9a-f])', lambda m: 'data-path="' + ("a" if m.group(1) != "a" else "b"), good
    )
    csp = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            ctx = browser.new_context()
            page = ctx.new_page()

            def serve(route: Any) -> None:
                path = route.request.url.split("console.test", 1)[1]
                if path.startswith("/ui/static/"):
                    f = STATIC / path.rsplit("/", 1)[1]
                    if not f.is_file():  # console.css is CORE's: not needed here
                        route.fulfill(status=404, body=b"")
                        return
                    kind = "text/javascript" if f.suffix == ".js" else "text/css"
                    route.fulfill(status=200, body=f.read_bytes(), content_type=kind)
                else:
                    route.fulfill(
                        status=200, body=pages[path], content_type="text/html", headers={"Content-Security-Policy": csp}
                    )

            page.route("https://console.test/**", serve)
            results = {}
            for path in pages:
                page.goto("https://console.test" + path)
                page.wait_for_selector('[data-testid="proof-browser"]:not([data-result="pending"])')
                results[path] = page.locator('[data-testid="proof-browser"]').inner_text()
            assert results == {
                "/ok": "verified in this browser",
                "/one": "verified in this browser",
                "/wrong-root": "FAILED",
                "/wrong-path": "FAILED",
            }
            page.goto("https://console.test/ok")
            page.wait_for_selector('[data-testid="proof-browser"][data-result="verified"]')
            altered = page.evaluate(
                """() => { const s = document.querySelector('[data-testid="proof"]');
                s.dataset.body = s.dataset.body.replace('"ok"', '"no"').replace('"denied"', '"ok"');
                return window.modelsealProof.check(s); }"""
            )
            assert altered is False
            assert page.locator('[data-testid="proof-browser"]').inner_text() == "FAILED"
        finally:
            browser.close()


def _page(template: str, **values: Any) -> str:
    return _ENV.get_template(template).render(
        title="t", identity="spiffe://t/user/a", csrf="x", expires=None, nav=[], here="", **values
    )


def test_the_templates_render_and_escape_registry_and_log_text(log: MerkleAuditLog) -> None:
    from modelseal.server.console_artifacts import Signature, Tagged
    from modelseal.server.console_audit import shown

    t = Tagged("v1<b>", "sha256:" + "a" * 64, "file", 1, 10, "dev", "suite", "f" * 64)
    t.recipients = [("local", "<script>k</script>", 3)]
    t.signatures = [Signature("sha256:" + "b" * 64, "2026-01-01T00:00:00Z", "signed", "signed as m")]
    html = _page("artifact_repo.html", repo="r", rows=[t], trust_note="n", next_last="v1<b>")
    assert "<script>k" not in html and "&lt;script&gt;k" in html and 'data-verifies="yes"' in html
    assert 'data-version="3"' in html and "v1&lt;b&gt;" in html
    listing = _page("artifacts.html", configured=True, repos=["a/b"], after=None, next_after="a/b")
    assert "name=a/b" in listing and 'data-testid="artifacts-next"' in listing
    view = _view(log)
    page = view.page(Filters(), None, n=5)
    values = dict.fromkeys(("op", "actor", "key", "result", "from", "to"), "")
    audit = _page(
        "audit.html",
        configured=True,
        values=values,
        rows=[shown(e) for e in page.rows],
        scanned=page.scanned,
        older="before=33",
        verified=view.status(),
    )
    assert audit.count('data-testid="audit-row"') == 5 and 'href="/ui/audit/proof?entry=37"' in audit
    assert "<script" not in audit  # no inline script anywhere
    proof = _proof_html(log, 3)
    assert re.findall(r"<script[^>]*>", proof) == ['<script src="/ui/static/proof.js" defer>']
    assert " style=" not in proof + audit + html


def _blob(reg: Any, repo: str, data: bytes) -> layout.Descriptor:
    upload = reg.start_upload(repo, "spiffe://t/user/p")
    digest = layout.sha256_digest(data)
    reg.finish(repo, upload, "spiffe://t/user/p", digest, None, [data], len(data))
    return layout.Descriptor("x", digest, len(data))


def test_a_tag_with_its_recipients_and_signatures_verified_under_the_policy(env: Env, tmp_path: Path) -> None:
    import os

    import modelseal
    from modelseal.registry.service import open_registry
    from modelseal.signing.signers import P256, PemSigner, generate, private_pem
    from modelseal.signing.trust import load_policy
    from modelseal.telemetry.scansig import TrustCheck

    s = generate(P256)
    (tmp_path / "rel.pem").write_bytes(private_pem(s, None))
    (tmp_path / "rel.pub").write_text(s.public.pem())
    policy = tmp_path / "trust.toml"
    policy.write_text(
        f'version = 1\nstrict = true\n[signers.release]\nkeys = ["{tmp_path / "rel.pub"}"]\n'
        '[[rules]]\nartifacts = ["*"]\nenvironments = ["*"]\nsigners = ["release"]\n'
    )
    os.chmod(policy, 0o600)
    src = tmp_path / "m.src"
    src.write_bytes(os.urandom(5000))
    dst = tmp_path / "m.mseal"
    modelseal.seal(
        src, dst, "local:test-kek", keys=env.svc, sign_key=PemSigner.from_file(tmp_path / "rel.pem"), name="m"
    )
    reg = open_registry(tmp_path / "reg", content="any")
    try:
        sealed = _blob(reg, "team/m", dst.read_bytes())
        _blob(reg, "team/m", layout.EMPTY_BYTES)
        body = layout.artifact_manifest([layout.layer_for(".", sealed.digest, sealed.size)])
        digest, _, _ = reg.put_manifest("team/m", "v1", body, layout.IMAGE_MANIFEST)
        sig = _blob(reg, "team/m", Path(f"{dst}.msig").read_bytes())
        other = tmp_path / "o.mseal"  # signed by the same key, but over other bytes: not this artifact's
        modelseal.seal(
            src, other, "local:test-kek", keys=env.svc, sign_key=PemSigner.from_file(tmp_path / "rel.pem"), name="m"
        )
        forged = _blob(reg, "team/m", Path(f"{other}.msig").read_bytes())
        subject = layout.Descriptor(layout.IMAGE_MANIFEST, digest, len(body))
        for d, when in ((sig, "2026-01-01T00:00:00Z"), (forged, "2026-01-02T00:00:00Z")):
            ref = layout.signature_manifest(layout.Descriptor(layout.SIGNATURES, d.digest, d.size), subject, when)
            reg.put_manifest("team/m", layout.sha256_digest(ref), ref, layout.IMAGE_MANIFEST)
        t = console_artifacts.describe(reg, "team/m", "v1", TrustCheck(load_policy(policy)))
        assert t.problem == "" and t.kind == "file" and t.digest == digest and t.env
        assert [(k.rsplit(":", 1)[-1], v) for _, k, v in t.recipients] == [("test-kek", 1)], t.recipients
        assert [x.verifies for x in t.signatures] == [False, True], t.signatures  # newest (forged) first
        none = console_artifacts.describe(reg, "team/m", "v1", TrustCheck(None))
        assert all(not x.verifies for x in none.signatures)  # no policy: never "verifies"
        gone = console_artifacts.describe(reg, "team/m", "nope", TrustCheck(None))
        assert gone.problem
        assert console_artifacts.repository_names(reg, None, 5) == (["team/m"], False)
    finally:
        reg.close()


class _Allow:
    """A stand-in decider: ``pull`` only on repositories named in ``pull``, ``audit.read`` if ``audit``."""

    def __init__(self, pull: set[str], audit: bool) -> None:
        self.pull, self.audit, self.asked = pull, audit, []  # type: ignore[var-annotated]

    def decide(self, ident: Any, action: str, res: Any, ctx: Any = None, source: Any = None, **_: Any) -> Any:
        from modelseal.governance.model import Decision

        self.asked.append((action, res.type, res.id))
        ok = (action == "pull" and res.id in self.pull) or (action == "audit.read" and self.audit)
        return Decision(ok, (), "" if ok else "denied")

    async def authorize(self, request: Any, action: str, res: Any, ctx: Any = None) -> Any:
        from modelseal.server import authz

        d = self.decide(None, action, res)
        if not d.allowed:
            raise authz.Refusal(403, "DENIED", "denied")
        return d


def test_the_routes_decide_by_pull_and_audit_read(log: MerkleAuditLog, tmp_path: Path) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from modelseal.pki.identity import parse
    from modelseal.registry.service import open_registry
    from modelseal.server import authz, console_audit
    from modelseal.server.console_page import CONSOLE, POOL, ConsoleDeps
    from modelseal.server.identity import IDENTITY

    reg = open_registry(tmp_path / "reg", content="any")
    for repo in ("a/one", "b/two"):
        d = _blob(reg, repo, b"{}")
        body = layout.encode(
            {
                "schemaVersion": 2,
                "mediaType": layout.IMAGE_MANIFEST,
                "config": {"mediaType": layout.EMPTY, "digest": d.digest, "size": 2},
                "layers": [],
            }
        )
        reg.put_manifest(repo, "t1", body, layout.IMAGE_MANIFEST)
    decider = _Allow({"b/two"}, audit=True)

    @web.middleware
    async def who(request: web.Request, handler: Any) -> web.StreamResponse:
        request[IDENTITY] = parse("spiffe://example.org/dev/user/reader1")
        try:
            return await handler(request)
        except authz.Refusal as r:
            return web.Response(status=r.status_code, text=r.reason_line)

    async def go() -> dict[str, tuple[int, str]]:
        app = web.Application(middlewares=[who])
        app[CONSOLE] = ConsoleDeps(home=tmp_path, registry=reg, audit=log)
        app[POOL] = ThreadPoolExecutor(2)
        app[authz.AUTHZ] = decider  # type: ignore[assignment]
        console_usage.install(app, log)  # the worker's one view of the log, as server.console installs it
        console_artifacts.add_routes(app)
        console_audit.add_routes(app)
        out = {}
        async with TestClient(TestServer(app)) as c:
            for path in (
                "/ui/artifacts",
                "/ui/artifacts/repo?name=b/two",
                "/ui/artifacts/repo?name=a/one",
                "/ui/artifacts/repo?name=..",
                "/ui/audit?op=rotate",
                "/ui/audit?from=yesterday",
                "/ui/audit/proof?entry=3",
                "/ui/audit/proof?entry=99",
            ):
                r = await c.get(path)
                out[path] = (r.status, await r.text())
        app[POOL].shutdown()
        return out

    try:
        got = asyncio.run(go())
    finally:
        reg.close()
    assert got["/ui/artifacts"][0] == 200 and 'data-repo="b/two"' in got["/ui/artifacts"][1]
    assert 'data-repo="a/one"' not in got["/ui/artifacts"][1]
    assert (
        got["/ui/artifacts/repo?name=b/two"][0] == 200
        and "not a modelseal artifact" in got["/ui/artifacts/repo?name=b/two"][1]
    )
    assert got["/ui/artifacts/repo?name=a/one"][0] == 403
    assert got["/ui/artifacts/repo?name=.."][0] == 400
    audit = got["/ui/audit?op=rotate"]
    assert audit[0] == 200 and audit[1].count('data-testid="audit-row"') == 13 and 'data-ok="yes"' in audit[1]
    assert got["/ui/audit?from=yesterday"][0] == 400
    proof = got["/ui/audit/proof?entry=3"]
    assert proof[0] == 200 and 'data-result="verified"' in proof[1] and "verified by the server" in proof[1]
    assert got["/ui/audit/proof?entry=99"][0] == 404
    assert ("audit.read", "Audit", "log") in decider.asked and ("pull", "Repository", "a/one") in decider.asked
