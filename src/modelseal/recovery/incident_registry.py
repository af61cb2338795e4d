"""The registry side of a key-compromise incident (docs/recovery.md, "Incident: key compromise").

Finding: with the registry's own metadata store (``--registry-data``, ``--registry-db``, as
``modelseal serve`` takes them; read only) every manifest of every repository (or of the
``--repo`` ones) is judged, tagged or not: a tag that moved on leaves the exposed manifest
reachable by digest, and a push by digest never had a tag. The OCI API has no catalog here
(a ``/v2/_catalog`` would let any client enumerate every repository name), so with ``--repo``
alone only what the repositories' tags name is reached, and the plan says so. A tag of the
form ``sha256-<64 hex>`` is skipped only when it holds a referrers index (the tag-scheme
fallback); any other tag is an artifact's. A modelseal artifact's primary layer (the sealed
file, or a folder's ``manifest.mseal``) has its header read with ranged GETs
(``RemoteHeader``: the bytes of the header and its slots, nothing more) and judged as a
local one is (``incident_find.judge``). Transfers always go over the API, mutual TLS with
the CA pins, as ``modelseal push`` makes them (``registry.settings``).

Replacing: the artifact is pulled by its digest (never by a tag that may move meanwhile)
into a work folder outside ``$MODELSEAL_HOME`` (the ciphertext cache, ``registry.settings``:
data never sits beside the keys), re-encrypted and re-signed there, pushed under each tag
that still names the old digest (a tag moved meanwhile by someone else is left alone, and
reported; an untagged manifest is not pushed again: nothing names it), and then the old
manifest, its signature referrers and its fallback index are deleted, so the garbage
collector reclaims the exposed ciphertext. Each step is safe to repeat: a push of the same
bytes gives the same digest, a deleted manifest is a 404. Every operation checks that the
record names this session's registry: a record of another registry is never applied here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

from modelseal.errors import IncidentError, ModelsealError, RegistryError
from modelseal.keys.service import KeyService
from modelseal.recovery.incident_find import Findings, Found, History, header_of, judge
from modelseal.registry import layout, renewing, settings, transfer
from modelseal.registry.client import Repository
from modelseal.registry.names import check_name
from modelseal.registry.reference import parse_endpoint, parse_reference
from modelseal.registry.transport import Transport
from modelseal.signing.sigfile import SignatureFile

MAX_MANIFESTS = 1_000_000
PAGE = 1000


def check_db_url(db: str) -> None:
    """A ``--registry-db`` carries no password (``registry.sqlmeta.open_meta``'s rule): a flag is
    visible to every user of the host, and the incident's journal and report record the URL."""
    parts = urlsplit(db)
    if parts.password is not None or "password" in parse_qs(parts.query):
        raise ValueError("--registry-db must not carry a password: use PGPASSFILE or PGPASSWORD (docs/deploy.md)")


def shown_db(db: str) -> str:
    """The URL without user, password or query, as the journal and the report record it."""
    parts = urlsplit(db)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


@dataclass(frozen=True)
class RegistryTarget:
    """Where the registry is and how to reach it, all the operator's."""

    host: str  # HOST:PORT
    repos: tuple[str, ...] = ()  # none: every repository of the catalog
    tls_dir: str | None = None
    pins: tuple[str, ...] = ()
    data: str | None = None  # the registry's --data, for its catalog
    db: str | None = None  # the registry's --db

    def __post_init__(self) -> None:
        if self.db is not None:
            check_db_url(self.db)

    @property
    def has_catalog(self) -> bool:
        return self.data is not None or self.db is not None

    def to_json(self) -> dict[str, object]:
        catalog = self.data if self.data is not None else shown_db(self.db) if self.db is not None else None
        return {"host": self.host, "repos": list(self.repos), "catalog": catalog}


@dataclass
class Session:
    """One transport to the registry for the whole run; ``repo(name)`` its repositories."""

    target: RegistryTarget
    transport: Transport
    _repos: dict[str, Repository] = field(default_factory=dict)

    def repo(self, name: str) -> Repository:
        if name not in self._repos:
            self._repos[name] = Repository(self.transport, name)
        return self._repos[name]

    def ref(self, repo: str, suffix: str) -> str:
        return f"{self.target.host}/{repo}{suffix}"

    def close(self) -> None:
        self.transport.close()


def connect(target: RegistryTarget, svc: KeyService, *, renew: bool = True) -> Session:
    """One transport to the registry. ``renew``: renew the client certificate if it is due, as
    ``push`` does (a dry run does not: it changes nothing)."""
    endpoint = parse_endpoint(target.host)
    s = settings.load(endpoints=[str(endpoint)], tls_dir=target.tls_dir, pins=list(target.pins) or None)
    ref = parse_reference(f"{endpoint}/probe:latest")  # only its endpoint is used
    transport = Transport(settings.endpoints_for(ref, s), settings.require_tls_dir(s), s.pins, sink=svc.sink)
    if renew:
        renewing.renew_if_due(transport)
    return Session(target, transport)


def catalog(target: RegistryTarget) -> dict[str, list[str]]:
    """Every manifest digest of the registry's metadata store, by repository (read only, in
    pages), signature referrers left out (they hold no sealed header)."""
    from modelseal.registry.sqlmeta import open_meta

    if not target.has_catalog:
        raise ValueError(
            "name the repositories with --repo, or give the registry's --registry-data (and --registry-db) "
            "to read its catalog"
        )
    data = Path(target.data) if target.data else Path("/nonexistent")
    if target.db is None and not (data / "registry.db").is_file():
        raise RegistryError(f"{data} holds no registry database (registry.db)")
    meta = open_meta(target.db, data)
    try:
        out: dict[str, list[str]] = {}
        after: tuple[str, str] | None = None
        seen = 0
        while seen < MAX_MANIFESTS:
            page = meta.manifest_page(after, PAGE)
            for repo, digest, kind in page:
                if kind != layout.SIGNATURES:
                    out.setdefault(repo, []).append(digest)
            seen += len(page)
            if len(page) < PAGE:
                return out
            after = (page[-1][0], page[-1][1])
        raise RegistryError(f"the catalog has more than {MAX_MANIFESTS} manifests: name the repositories with --repo")
    finally:
        meta.close()


class RemoteHeader:
    """A ``CipherSource`` over one blob of the registry: ranged GETs, for headers only."""

    def __init__(self, repo: Repository, descriptor: layout.Descriptor) -> None:
        self._repo, self._d = repo, descriptor

    @property
    def size(self) -> int:
        return self._d.size

    def readinto_at(self, buf: memoryview, offset: int) -> int:
        if offset >= self._d.size or not len(buf):
            return 0
        end = min(self._d.size, offset + len(buf)) - 1
        got = 0
        with self._repo.blob(self._d.digest, offset, end) as resp:
            while got < end - offset + 1:
                chunk = resp.read(end - offset + 1 - got)
                if not chunk:
                    break
                buf[got : got + len(chunk)] = chunk
                got += len(chunk)
        return got

    def close(self) -> None:
        return None


def _signed(repo: Repository, digest: str) -> bool:
    sigs, _ = transfer.fetch_signatures(repo, digest)
    for data in sigs:
        try:
            if SignatureFile.parse(data).signatures:
                return True
        except ModelsealError:
            continue
    return False


def _tagged(repo: Repository) -> dict[str, tuple[bytes, list[str]]]:
    by_digest: dict[str, tuple[bytes, list[str]]] = {}
    for tag in repo.tags():
        got = repo.get_manifest(tag)
        if got is not None and not layout.is_fallback_index(tag, got[0]):
            by_digest.setdefault(got[1], (got[0], []))[1].append(tag)
    return by_digest


def _judge(
    svc: KeyService,
    session: Session,
    name: str,
    digest: str,
    body: bytes,
    tags: list[str],
    key: tuple[str, Collection[int], History],
    out: Findings,
) -> Found | None:
    """The manifest as a finding if it is an exposed modelseal artifact (problems into ``out``)."""
    canon, versions, hist = key
    repo = session.repo(name)
    try:
        layers = layout.parse_artifact(body)
    except RegistryError:
        return None  # not a modelseal artifact: no sealed header to judge
    ref = "oci://" + session.ref(name, "@" + digest)
    try:
        primary = layers[0]
        raw = header_of(RemoteHeader(repo, primary.descriptor))
        got = judge(svc, raw, canon, versions, hist, ref, out)
        if got is None:
            return None
        size = sum(x.descriptor.size for x in layers)
        folder = primary.path == layout.MANIFEST_PATH
        signed = _signed(repo, digest)
    except ModelsealError as e:
        out.problems.append(f"{session.ref(name, '@' + digest)}: its header cannot be read ({type(e).__name__})")
        return None
    aid, hit = got
    return Found(ref, "registry", session.ref(name, ""), aid, hit, signed, size, digest, sorted(tags), folder)


def in_registry(
    svc: KeyService, session: Session, canon: str, versions: Collection[int], hist: History | None = None
) -> Findings:
    """Every artifact of the target's repositories a compromised version protects, one
    ``Found`` per manifest digest with all the tags naming it (none: untagged)."""
    out = Findings()
    target, key = session.target, (canon, versions, hist or History())
    if target.has_catalog or not target.repos:
        names = catalog(target)  # neither: ValueError, name them
        if target.repos:
            names = {r: names.get(r, []) for r in target.repos}
    else:
        names = {r: [] for r in target.repos}
        out.notes.append(
            f"registry {target.host}: --repo without its metadata store (--registry-data, --registry-db): only "
            "manifests a tag names are reached, untagged ones (a tag moved on, a push by digest) are not"
        )
    for name, digests in sorted(names.items()):
        try:
            check_name(name)
            repo = session.repo(name)
            tagged = _tagged(repo)
        except ModelsealError as e:
            out.problems.append(f"{session.ref(name, '')}: cannot list it ({str(e)[:200]})")
            continue
        for digest in sorted({*digests, *tagged}):
            try:
                got = tagged.get(digest) or (_body(repo, digest), [])
            except ModelsealError as e:
                out.problems.append(f"{session.ref(name, '@' + digest)}: cannot read it ({str(e)[:200]})")
                continue
            if got[0] is not None:
                f = _judge(svc, session, name, digest, got[0], got[1], key, out)
                if f is not None:
                    out.found.append(f)
    return out


def _body(repo: Repository, digest: str) -> bytes | None:
    got = repo.get_manifest(digest)
    return None if got is None else got[0]


def find_one(
    svc: KeyService, session: Session, item: dict[str, object], key: tuple[str, Collection[int], History]
) -> tuple[bool, Found | None]:
    """A journaled manifest judged again: (present, the finding if it is exposed)."""
    name, digest = _where(session, item)
    body = _body(session.repo(name), digest)
    if body is None:
        return False, None
    return True, _judge(svc, session, name, digest, body, _strings(item.get("tags")), key, Findings())


def work_path(work: Path, item: dict[str, object]) -> Path:
    """Where the pulled copy of ``item`` lives: a folder per record (its ref: registry, repository
    and digest) in the work folder."""
    folder = hashlib.sha256(str(item["ref"]).encode()).hexdigest()[:24]
    return work / folder / ("artifact" if item.get("folder") else "artifact.sealed")


def pull(session: Session, item: dict[str, object], dst: Path, digest: str | None = None) -> None:
    """The artifact by its old digest (or ``digest``) into ``dst`` (replacing a copy a crashed run left)."""
    repo, old = _where(session, item)
    dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    ref = session.ref(repo, "@" + (digest or old))
    transfer.pull(ref, dst, verify=False, force=True, transport=session.transport)


def present(session: Session, item: dict[str, object]) -> bool:
    repo, digest = _where(session, item)
    return session.repo(repo).get_manifest(digest) is not None


def replace_tags(session: Session, item: dict[str, object], artifact: Path) -> tuple[str, list[str], list[str]]:
    """Push ``artifact`` under each of the item's tags that still names the old digest (or
    already the new one); returns the new digest, the tags moved and the tags left alone."""
    repo_name, old = _where(session, item)
    repo = session.repo(repo_name)
    moved, left = [], []
    new = ""
    for tag in _strings(item.get("tags")):
        got = repo.get_manifest(tag)
        now = got[1] if got is not None else None
        if now not in (old, item.get("new_digest")) and now is not None:
            left.append(tag)  # moved by someone else meanwhile: theirs, not ours to overwrite
            continue
        pushed = transfer.push(artifact, session.ref(repo_name, ":" + tag), transport=session.transport)
        new = pushed.digest
        moved.append(tag)
    # No tag left to move (all moved by others): nothing names the re-encrypted copy, so it
    # is not pushed; the old manifest is deleted all the same (its ciphertext is exposed).
    return new, moved, left


def delete_old(session: Session, item: dict[str, object]) -> int:
    """Delete the old manifest, its signature referrers and its fallback index (each a 404 if
    gone already); returns how many manifests were deleted."""
    repo_name, old = _where(session, item)
    repo = session.repo(repo_name)
    gone = 0
    found = repo.referrers(old, layout.SIGNATURES)
    if found is None:
        index = repo.get_manifest(layout.fallback_tag(old))
        if index is not None:
            found = layout.parse_index(index[0])
            repo.delete_manifest(index[1])
            gone += 1
    for d in found or []:
        repo.delete_manifest(d.digest)
        gone += 1
    if repo.get_manifest(old) is not None:
        repo.delete_manifest(old)
        gone += 1
    return gone


def tag_digests(session: Session, item: dict[str, object], tags: Sequence[str]) -> dict[str, str | None]:
    repo_name, _ = _where(session, item)
    repo = session.repo(repo_name)
    out: dict[str, str | None] = {}
    for tag in tags:
        got = repo.get_manifest(tag)
        out[tag] = got[1] if got is not None else None
    return out


def host_of(item: dict[str, object]) -> str:
    return str(item["location"]).split("/", 1)[0]


def _where(session: Session, item: dict[str, object]) -> tuple[str, str]:
    """(repository, digest) of a record, which must be of this session's registry."""
    host, repo = str(item["location"]).split("/", 1)
    if host != session.target.host:
        raise IncidentError(f"{item['ref']} is an artifact of {host}, not of {session.target.host}")
    return repo, str(item["digest"])


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


__all__ = [
    "RegistryTarget",
    "RemoteHeader",
    "Session",
    "catalog",
    "check_db_url",
    "connect",
    "delete_old",
    "find_one",
    "host_of",
    "in_registry",
    "present",
    "pull",
    "replace_tags",
    "shown_db",
    "tag_digests",
    "work_path",
]
