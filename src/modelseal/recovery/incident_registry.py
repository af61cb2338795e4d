"""The registry side of a key-compromise incident (docs/recovery.md, "Incident: key compromise").

Finding: every tag of each repository (``--repo``, or every repository of the registry's
catalog) is resolved to its manifest; a modelseal artifact's primary layer (the sealed file,
or a folder's ``manifest.mseal``) has its header read with ranged GETs (``RemoteHeader``:
the bytes of the header and its slots, nothing more) and checked as a local one is
(``incident_find.compromised_in``). The OCI API has no catalog of repositories here (a
``/v2/_catalog`` would let any client enumerate every repository name), so the catalog is
read from the registry's own metadata store (``--registry-data``, ``--registry-db``, as
``modelseal serve`` takes them), read only; transfers always go over the API, mutual TLS
with the CA pins, as ``modelseal push`` makes them (``registry.settings``).

Replacing: the artifact is pulled by its digest (never by a tag that may move meanwhile)
into a work folder outside ``$MODELSEAL_HOME`` (the ciphertext cache, ``registry.settings``:
data never sits beside the keys), re-encrypted and re-signed there, pushed under each tag
that still names the old digest (a tag moved meanwhile by someone else is left alone, and
reported), and then the old manifest, its signature referrers and its fallback index are
deleted, so the garbage collector reclaims the exposed ciphertext. Each step is safe to
repeat: a push of the same bytes gives the same digest, a deleted manifest is a 404.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelseal.errors import ModelsealError, RegistryError
from modelseal.format.envelope import artifact_id
from modelseal.keys.service import KeyService
from modelseal.recovery.incident_find import Findings, Found, compromised_in, header_of
from modelseal.registry import layout, renewing, settings, transfer
from modelseal.registry.client import Repository
from modelseal.registry.names import check_name
from modelseal.registry.reference import parse_endpoint, parse_reference
from modelseal.registry.transport import Transport
from modelseal.signing.sigfile import SignatureFile

MAX_REPOSITORIES = 100_000
LAST_DIGEST = "sha256:" + "f" * 64  # no manifest digest sorts after it (modelseal keeps sha256 only)


@dataclass(frozen=True)
class RegistryTarget:
    """Where the registry is and how to reach it, all the operator's."""

    host: str  # HOST:PORT
    repos: tuple[str, ...] = ()  # none: every repository of the catalog
    tls_dir: str | None = None
    pins: tuple[str, ...] = ()
    data: str | None = None  # the registry's --data, for its catalog
    db: str | None = None  # the registry's --db

    def to_json(self) -> dict[str, object]:
        return {"host": self.host, "repos": list(self.repos), "catalog": self.data or self.db}


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


def catalog(target: RegistryTarget) -> list[str]:
    """Every repository of the registry's metadata store (read only, one query per repository)."""
    from modelseal.registry.sqlmeta import open_meta

    if target.data is None and target.db is None:
        raise ValueError(
            "name the repositories with --repo, or give the registry's --registry-data (and --registry-db) "
            "to read its catalog"
        )
    data = Path(target.data) if target.data else Path("/nonexistent")
    if target.db is None and not (data / "registry.db").is_file():
        raise RegistryError(f"{data} holds no registry database (registry.db)")
    meta = open_meta(target.db, data)
    try:
        repos: list[str] = []
        after: tuple[str, str] | None = None
        while len(repos) < MAX_REPOSITORIES:
            page = meta.manifest_page(after, 1)
            if not page:
                return repos
            repos.append(page[0][0])
            after = (page[0][0], LAST_DIGEST)  # past every digest of that repository
        raise RegistryError(f"the catalog has more than {MAX_REPOSITORIES} repositories: name them with --repo")
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


def in_registry(
    svc: KeyService, session: Session, canon: str, versions: Collection[int], exposed_ids: Collection[str]
) -> Findings:
    """Every tagged artifact of the target's repositories a compromised version protects,
    one ``Found`` per manifest digest with all the tags naming it."""
    out = Findings()
    names = list(session.target.repos) or catalog(session.target)
    for name in names:
        try:
            check_name(name)
            repo = session.repo(name)
            by_digest: dict[str, tuple[bytes, list[str]]] = {}
            for tag in repo.tags():
                if tag.startswith("sha256-"):
                    continue  # a referrers fallback index, not an artifact
                got = repo.get_manifest(tag)
                if got is not None:
                    by_digest.setdefault(got[1], (got[0], []))[1].append(tag)
        except ModelsealError as e:
            out.problems.append(f"{session.ref(name, '')}: cannot list it ({str(e)[:200]})")
            continue
        for digest, (body, tags) in sorted(by_digest.items()):
            try:
                layers = layout.parse_artifact(body)
            except RegistryError:
                continue  # not a modelseal artifact: no sealed header to judge
            try:
                primary = layers[0]
                raw = header_of(RemoteHeader(repo, primary.descriptor))
                aid = artifact_id(raw.core.binding)
                hit = compromised_in(svc, raw, canon, versions)
                if not hit and aid not in exposed_ids:
                    continue
                size = sum(x.descriptor.size for x in layers)
                folder = primary.path == layout.MANIFEST_PATH
                signed = _signed(repo, digest)
            except ModelsealError as e:
                where = session.ref(name, "@" + digest)
                out.problems.append(f"{where}: its header cannot be read ({type(e).__name__})")
                continue
            ref = "oci://" + session.ref(name, "@" + digest)
            loc = session.ref(name, "")
            out.found.append(Found(ref, "registry", loc, aid, hit, signed, size, digest, sorted(tags), folder))
    return out


def work_path(work: Path, item: dict[str, object]) -> Path:
    """Where the pulled copy of ``item`` lives: a folder per artifact in the work folder."""
    ref = str(item["ref"])
    digest = ref.rsplit("@sha256:", 1)[-1][:24]
    return work / digest / ("artifact" if item.get("folder") else "artifact.sealed")


def pull(session: Session, item: dict[str, object], dst: Path) -> None:
    """The old artifact by its digest into ``dst`` (replacing a copy a crashed run left)."""
    repo, digest = _where(item)
    dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    transfer.pull(session.ref(repo, "@" + digest), dst, verify=False, force=True, transport=session.transport)


def present(session: Session, item: dict[str, object]) -> bool:
    repo, digest = _where(item)
    return session.repo(repo).get_manifest(digest) is not None


def replace_tags(session: Session, item: dict[str, object], artifact: Path) -> tuple[str, list[str], list[str]]:
    """Push ``artifact`` under each of the item's tags that still names the old digest (or
    already the new one); returns the new digest, the tags moved and the tags left alone."""
    repo_name, old = _where(item)
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
    repo_name, old = _where(item)
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
    repo_name, _ = _where(item)
    repo = session.repo(repo_name)
    out: dict[str, str | None] = {}
    for tag in tags:
        got = repo.get_manifest(tag)
        out[tag] = got[1] if got is not None else None
    return out


def _where(item: dict[str, object]) -> tuple[str, str]:
    loc = str(item["location"])
    repo = loc.split("/", 1)[1]
    digest = str(item["digest"])
    return repo, digest


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


__all__ = [
    "RegistryTarget",
    "RemoteHeader",
    "Session",
    "catalog",
    "connect",
    "delete_old",
    "in_registry",
    "present",
    "pull",
    "replace_tags",
    "tag_digests",
    "work_path",
]
