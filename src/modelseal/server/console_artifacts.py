"""The console's Artifacts page (docs/console.md): the repositories the signed-in identity
may ``pull``, and per repository its tags, each tag's manifest digest, its signature
referrers and whether each verifies under this server's trust policy, and the recipients
and key versions its sealed header names.

Decided exactly as the OCI API decides a read (``server.oci``): ``pull`` on the
``Repository`` of this server's environment, asked for every repository listed (a denial
there only hides it) and required for a repository's page (a refusal is the console's
one-line 403). Read directly over the server's ``registry.service.Registry`` in the
console's pool, ciphertext only: a header is read by ranged reads of its primary layer
(``format.file.read_raw``: the core header and its two slots, as
``recovery.incident_registry.RemoteHeader`` reads one over the API), never a chunk, and
no key is used, so the recipients shown are the newest well-formed slot's, not
authenticated (that needs the key). A signature file is judged as ``modelseal scan``
judges one (``telemetry.scansig.TrustCheck``: ``signing.evaluation.evaluate`` on the
headers), newest referrer first; without a trust policy a signature can only be checked
against the key it carries, and the page says so.

Bounded: a page lists at most ``PAGE_REPOS`` repositories after asking about at most
``SCAN_REPOS`` (the registry has no catalog API: the metadata store is walked one
repository at a time, ``manifest_page`` after ``(name, "~")``, which sorts after every
digest), and at most ``PAGE_TAGS`` tags with ``MAX_SIGS`` signature referrers each (a
signature file over ``MAX_SIG_READ`` is not read). Every text from the registry is cut and
escaped by the template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from modelseal.errors import ModelsealError, RegistryError, RegistryRefused
from modelseal.format.envelope import artifact_id, parse_slots
from modelseal.format.file import read_raw
from modelseal.format.header import KIND_MANIFEST
from modelseal.recipes.context import trust_policy
from modelseal.registry import layout, names
from modelseal.registry.meta import BlobRow
from modelseal.registry.service import Registry
from modelseal.server import authz
from modelseal.server.console_page import PREFIX, allowed, cut, deps, nav, render, require, resource, run
from modelseal.signing.trust import TrustPolicy
from modelseal.telemetry.scansig import SIGNED, TrustCheck

PAGE_REPOS = 25
SCAN_REPOS = 200
PAGE_TAGS = 20
MAX_SIGS = 4
MAX_SIG_READ = 1 << 20  # a signature file is a few KiB; a bigger one is not read here
_NEXT_REPO = "~"  # sorts after "sha256:..." and "sha512:...": the next repository's first manifest
_TEXT = 200


def repository_names(reg: Registry, after: str | None, n: int) -> tuple[list[str], bool]:
    """Up to ``n`` repository names after ``after`` (that hold a manifest), in order, and
    whether more follow."""
    out: list[str] = []
    cursor = None if after is None else (after, _NEXT_REPO)
    while len(out) <= n:
        page = reg.meta.manifest_page(cursor, 1)
        if not page:
            return out, False
        out.append(page[0][0])
        cursor = (page[0][0], _NEXT_REPO)
    return out[:n], True


class BlobSource:
    """A ``format.source.CipherSource`` over one blob of the registry (ranged reads)."""

    def __init__(self, reg: Registry, row: BlobRow) -> None:
        self._reg, self._row = reg, row

    @property
    def size(self) -> int:
        return self._row.size

    def readinto_at(self, buf: memoryview, offset: int) -> int:
        if offset >= self._row.size or not len(buf):
            return 0
        got = 0
        for chunk in self._reg.read_blob(self._row, offset, min(len(buf), self._row.size - offset)):
            buf[got : got + len(chunk)] = chunk
            got += len(chunk)
        return got

    def close(self) -> None:
        return None


@dataclass
class Signature:
    digest: str
    created: str
    status: str  # scansig's: signed, unverified, unsigned, untrusted, revoked
    detail: str

    @property
    def verifies(self) -> bool:
        return self.status == SIGNED


@dataclass
class Tagged:
    """One tag of a repository as the page shows it."""

    tag: str
    digest: str = ""
    kind: str = ""  # file, folder, referrers index, other
    layers: int = 0
    size: int = 0
    env: str = ""
    suite: str = ""
    artifact: str = ""
    recipients: list[tuple[str, str, int]] = field(default_factory=list)  # (scheme, key id, version)
    signatures: list[Signature] = field(default_factory=list)
    more_signatures: int = 0
    problem: str = ""


def _signature_files(reg: Registry, repo: str, digest: str) -> tuple[list[tuple[layout.Descriptor, bytes | str]], int]:
    """The newest ``MAX_SIGS`` signature referrers of ``digest`` with their signature file
    (or why it cannot be read), and how many more there are."""
    refs = []
    for r in reg.referrers(repo, digest, layout.SIGNATURES):
        d, size, media, notes = r.get("digest"), r.get("size"), r.get("mediaType"), r.get("annotations")
        if isinstance(d, str) and isinstance(size, int) and isinstance(media, str):
            kept = {str(k): str(v) for k, v in notes.items()} if isinstance(notes, dict) else {}
            refs.append(layout.Descriptor(media, d, size, kept, layout.SIGNATURES))
    newest = layout.newest_signatures(refs)
    out: list[tuple[layout.Descriptor, bytes | str]] = []
    for ref in newest[:MAX_SIGS]:
        try:
            body = reg.get_manifest(repo, ref.digest).body or b""
            sig = layout.parse_signature_manifest(body, digest)
            if sig.size > MAX_SIG_READ:
                out.append((ref, f"its signature file is over {MAX_SIG_READ >> 20} MiB: not read here"))
                continue
            row = reg.blob(repo, sig.digest)
            data = b"".join(reg.read_blob(row, 0, min(row.size, MAX_SIG_READ)))
        except ModelsealError as e:
            out.append((ref, f"its signature file cannot be read ({type(e).__name__})"))
            continue
        if layout.sha256_digest(data) != sig.digest:
            out.append((ref, "its signature file does not hash to its digest"))
            continue
        out.append((ref, data))
    return out, max(0, len(newest) - MAX_SIGS)


def describe(reg: Registry, repo: str, tag: str, trust: TrustCheck) -> Tagged:
    """What the tag ``tag`` of ``repo`` names: headers and signature files only."""
    t = Tagged(cut(tag))
    try:
        row = reg.get_manifest(repo, tag)
    except RegistryRefused:
        t.problem = "the tag is gone (deleted or moved meanwhile)"
        return t
    t.digest, body = row.digest, row.body or b""
    try:
        layers = layout.parse_artifact(body)
    except RegistryError:
        t.kind = "referrers index" if layout.is_fallback_index(tag, body) else "not a modelseal artifact"
        return t
    primary = layers[0]
    t.kind = "folder" if primary.path == layout.MANIFEST_PATH else "file"
    t.layers, t.size = len(layers), sum(x.descriptor.size for x in layers)
    try:
        raw = read_raw(BlobSource(reg, reg.blob(repo, primary.descriptor.digest)))
        if (raw.core.kind == KIND_MANIFEST) != (t.kind == "folder"):
            raise RegistryError("the layer's header is not of its media type")
    except ModelsealError as e:
        t.problem = f"its sealed header cannot be read ({type(e).__name__})"
        return t
    context = dict(raw.core.context)
    t.env, t.suite, t.artifact = cut(context.get("env", "")), cut(raw.core.suite), artifact_id(raw.core.binding)
    slots = parse_slots(raw.slots)
    if slots:
        t.recipients = [(cut(r.scheme, 40), cut(r.key_id), r.key_version) for r in slots[0][1].recipients]
    try:
        found, t.more_signatures = _signature_files(reg, repo, t.digest)
    except ModelsealError as e:
        t.problem = f"its signature referrers cannot be listed ({type(e).__name__})"
        return t
    for ref, data in found:
        created = cut(ref.annotations.get(layout.CREATED_ANNOTATION, ""), 40)
        if isinstance(data, str):
            t.signatures.append(Signature(ref.digest, created, "untrusted", data))
            continue
        verdict = trust.judge(raw, primary.path, data)
        t.signatures.append(Signature(ref.digest, created, verdict.status, cut(verdict.detail, 240)))
    return t


def describe_page(reg: Registry, repo: str, tags: list[str], policy: TrustPolicy | None) -> list[Tagged]:
    trust = TrustCheck(policy)  # one per page: each signature file parsed once
    return [describe(reg, repo, tag, trust) for tag in tags]


def load_trust(svc: Any) -> tuple[TrustPolicy | None, str]:
    """The server's trust policy (``recipes.context.trust_policy`` over its key service), and
    a one-line note on what the verdicts mean."""
    if svc is None:
        return (
            None,
            "this server has no key service configured: no trust policy, signatures are checked against "
            "the keys they carry only",
        )
    try:
        policy = trust_policy(svc)
    except ModelsealError as e:
        raise authz.Refusal(503, "UNAVAILABLE", f"the trust policy cannot be loaded: {cut(e, 200)}") from None
    if policy is None:
        return None, "no trust policy is configured: signatures are checked against the keys they carry only"
    return (
        policy,
        "signatures are judged under this server's trust policy, on the headers "
        "(modelseal verify also hashes every chunk)",
    )


def _name(request: web.Request, key: str, required: bool) -> str | None:
    text = request.query.get(key, "")
    if not text:
        if required:
            raise authz.Refusal(400, "INVALID", f"{key} is missing")
        return None
    try:
        return names.check_name(text)
    except RegistryRefused as e:
        raise authz.Refusal(400, "INVALID", f"{key}: {cut(e)}") from None


def _registry(request: web.Request) -> Registry | None:
    reg = deps(request).registry
    return reg if isinstance(reg, Registry) else None


async def list_page(request: web.Request) -> web.Response:
    """``GET /ui/artifacts[?after=NAME]``: the repositories the identity may pull."""
    reg = _registry(request)
    if reg is None:
        return render(request, "artifacts.html", title="Artifacts", configured=False, repos=[], after=None)
    after = _name(request, "after", False)
    candidates, more = await run(request, repository_names, reg, after, SCAN_REPOS)
    shown: list[str] = []
    asked = 0
    for name in candidates:
        asked += 1
        if await allowed(request, "pull", resource(request, "Repository", name)):
            shown.append(name)
            if len(shown) >= PAGE_REPOS:
                break
    rest = more or asked < len(candidates)
    nxt = candidates[asked - 1] if rest and asked else None
    return render(
        request, "artifacts.html", title="Artifacts", configured=True, repos=shown, after=after, next_after=nxt
    )


async def repo_page(request: web.Request) -> web.Response:
    """``GET /ui/artifacts/repo?name=NAME[&last=TAG]``: one repository, for an identity that may pull it."""
    reg = _registry(request)
    name = _name(request, "name", True)
    assert name is not None
    await require(request, "pull", resource(request, "Repository", name))
    if reg is None:
        raise authz.Refusal(503, "UNAVAILABLE", "this server has no registry configured")
    last = request.query.get("last") or None
    try:
        if last is not None:
            names.check_tag(last)
        tags, more = await run(request, reg.tags, name, PAGE_TAGS, last)
    except RegistryRefused as e:
        raise authz.Refusal(e.status or 400, e.code or "INVALID", cut(e)) from None
    policy, note = await run(request, load_trust, deps(request).svc)
    rows = await run(request, describe_page, reg, name, tags, policy)
    return render(
        request,
        "artifact_repo.html",
        title=f"Repository {cut(name)}",
        repo=name,
        rows=rows,
        trust_note=note,
        next_last=tags[-1] if more and tags else None,
    )


def add_routes(app: web.Application) -> None:
    """Register ``{PREFIX}/artifacts`` and its place in the navigation."""
    nav(f"{PREFIX}/artifacts", "Artifacts")
    app.router.add_get(f"{PREFIX}/artifacts", list_page)
    app.router.add_get(f"{PREFIX}/artifacts/repo", repo_page)


__all__ = ["BlobSource", "Tagged", "add_routes", "describe", "describe_page", "load_trust", "repository_names"]
