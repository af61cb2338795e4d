"""``SqlMeta``: the metadata store (``registry.meta``) in SQL, one implementation for SQLite
and PostgreSQL 15. The plumbing (connections, transactions, schema) is ``registry.sqldb``;
the garbage collector's queries are ``registry.sqlgc``; here are the API's: repositories,
uploads (compare-and-set appends), blobs and links, manifests, tags and referrers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from modelseal.registry.meta import BlobRow, ManifestRow, NewManifest, Referrer, Upload
from modelseal.registry.sqldb import HOLD_TTL, Busy, Q
from modelseal.registry.sqlgc import GcRows


def _parts(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(",") if p)


class SqlMeta(GcRows):
    """The metadata store over one SQLite file or one PostgreSQL database."""

    @classmethod
    def sqlite(cls, path: Path) -> SqlMeta:
        return cls("sqlite", str(path))

    @classmethod
    def postgres(cls, url: str) -> SqlMeta:
        return cls("pg", url)

    # -- repositories -------------------------------------------------------------------

    def repo_exists(self, repo: str) -> bool:
        return bool(self.run(lambda q: q("SELECT 1 FROM reg_repositories WHERE name = ?", repo).fetchone(), False))

    # -- uploads ------------------------------------------------------------------------

    def upload_create(self, upload: str, repo: str, owner: str, now: float, max_open: int) -> bool:
        """Open an upload; False if ``owner`` already has ``max_open`` uploads open."""

        def tx(q: Q) -> bool:
            (n,) = q("SELECT COUNT(*) FROM reg_uploads WHERE owner = ?", owner).fetchone()
            if int(n) >= max_open:
                return False
            q("INSERT INTO reg_repositories VALUES (?, ?) ON CONFLICT DO NOTHING", repo, now)
            q("INSERT INTO reg_uploads VALUES (?, ?, ?, 0, '', 0, ?, ?)", upload, repo, owner, now, now)
            return True

        return self.run(tx)

    def upload_get(self, upload: str) -> Upload | None:
        row = self.run(
            lambda q: q(
                "SELECT id, repo, owner, received, parts, created, touched FROM reg_uploads WHERE id = ?", upload
            ).fetchone(),
            False,
        )
        if row is None:
            return None
        return Upload(row[0], row[1], row[2], int(row[3]), _parts(row[4]), float(row[5]), float(row[6]))

    def upload_reserve(self, upload: str, now: float) -> int | None:
        """A fresh part index for ``upload`` (never handed out twice), or None if it is gone."""

        def tx(q: Q) -> int | None:
            row = q("SELECT next_part FROM reg_uploads WHERE id = ?", upload).fetchone()
            if row is None:
                return None
            q("UPDATE reg_uploads SET next_part = ?, touched = ? WHERE id = ?", int(row[0]) + 1, now, upload)
            return int(row[0])

        return self.run(tx)

    def upload_advance(self, upload: str, expect: int, part: int, size: int, now: float) -> bool:
        """Append ``part`` of ``size`` bytes if the upload still has ``expect`` bytes
        (compare-and-set: a concurrent append at the same offset loses)."""

        def tx(q: Q) -> bool:
            row = q("SELECT received, parts FROM reg_uploads WHERE id = ?", upload).fetchone()
            if row is None or int(row[0]) != expect:
                return False
            parts = f"{row[1]},{part}" if row[1] else str(part)
            q(
                "UPDATE reg_uploads SET received = ?, parts = ?, touched = ? WHERE id = ?",
                expect + size,
                parts,
                now,
                upload,
            )
            return True

        return self.run(tx)

    def upload_delete(self, upload: str) -> bool:
        return bool(self.run(lambda q: q("DELETE FROM reg_uploads WHERE id = ?", upload).rowcount))

    # -- blobs and links ----------------------------------------------------------------

    def hold_pending(self, storage: str, holder: str, now: float) -> None:
        """Keep the sweeper off ``storage`` while an upload assembles it; ``Busy`` if it is being swept."""

        def tx(q: Q) -> None:
            sweep = q(
                "SELECT 1 FROM reg_holds WHERE storage = ? AND kind = 'sweep' AND since > ?", storage, now - HOLD_TTL
            ).fetchone()
            if sweep:
                raise Busy("the blob is being garbage-collected; retry the request")
            q(
                "INSERT INTO reg_holds VALUES (?, ?, 'pending', ?)"
                " ON CONFLICT (storage, holder) DO UPDATE SET since = ?",
                storage,
                holder,
                now,
                now,
            )

        self.run(tx)

    def release(self, storage: str, holder: str) -> None:
        self.run(lambda q: q("DELETE FROM reg_holds WHERE storage = ? AND holder = ?", storage, holder))

    def blob_record(self, row: BlobRow, repo: str, holder: str, now: float) -> None:
        """Make a verified blob visible in ``repo`` (and release the upload's hold), in one step."""

        def tx(q: Q) -> None:
            q(
                "INSERT INTO reg_blobs VALUES (?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET touched = ?,"
                " kind = CASE WHEN excluded.kind = 'unchecked' THEN reg_blobs.kind ELSE excluded.kind END",
                row.digest,
                row.storage,
                row.size,
                row.kind,
                now,
                now,
            )
            q("INSERT INTO reg_repositories VALUES (?, ?) ON CONFLICT DO NOTHING", repo, now)
            q(
                "INSERT INTO reg_links VALUES (?, ?, ?) ON CONFLICT (repo, digest) DO UPDATE SET linked = ?",
                repo,
                row.digest,
                now,
                now,
            )
            q("DELETE FROM reg_holds WHERE storage = ? AND holder = ?", row.storage, holder)

        self.run(tx)

    def blob_in_repo(self, repo: str, digest: str) -> BlobRow | None:
        row = self.run(
            lambda q: q(
                "SELECT b.digest, b.storage, b.size, b.kind FROM reg_links l JOIN reg_blobs b ON b.digest = l.digest"
                " WHERE l.repo = ? AND l.digest = ?",
                repo,
                digest,
            ).fetchone(),
            False,
        )
        return None if row is None else BlobRow(row[0], row[1], int(row[2]), row[3])

    def blob_link(self, repo: str, digest: str, now: float) -> BlobRow | None:
        """Link a known blob into ``repo`` (a mount); None if the registry has no such blob."""

        def tx(q: Q) -> BlobRow | None:
            row = q("SELECT digest, storage, size, kind FROM reg_blobs WHERE digest = ?", digest).fetchone()
            if row is None:
                return None
            q("UPDATE reg_blobs SET touched = ? WHERE digest = ?", now, digest)
            q("INSERT INTO reg_repositories VALUES (?, ?) ON CONFLICT DO NOTHING", repo, now)
            q(
                "INSERT INTO reg_links VALUES (?, ?, ?) ON CONFLICT (repo, digest) DO UPDATE SET linked = ?",
                repo,
                digest,
                now,
                now,
            )
            return BlobRow(row[0], row[1], int(row[2]), row[3])

        return self.run(tx)

    def blob_unlink(self, repo: str, digest: str) -> bool:
        return bool(self.run(lambda q: q("DELETE FROM reg_links WHERE repo = ? AND digest = ?", repo, digest).rowcount))

    def repos_with_blob(self, digest: str, limit: int = 50) -> list[str]:
        rows = self.run(
            lambda q: q("SELECT repo FROM reg_links WHERE digest = ? ORDER BY repo LIMIT ?", digest, limit).fetchall(),
            False,
        )
        return [str(r[0]) for r in rows]

    def kinds(self, repo: str, digests: Iterable[str]) -> dict[str, str]:
        wanted = sorted(set(digests))

        def read(q: Q) -> dict[str, str]:
            out: dict[str, str] = {}
            for d in wanted:
                row = q(
                    "SELECT b.kind FROM reg_links l JOIN reg_blobs b ON b.digest = l.digest"
                    " WHERE l.repo = ? AND l.digest = ?",
                    repo,
                    d,
                ).fetchone()
                if row is not None:
                    out[d] = str(row[0])
            return out

        return self.run(read, False)

    # -- manifests, tags, referrers -------------------------------------------------------

    def manifest_put(self, m: NewManifest, now: float) -> list[str]:
        """Store ``m`` and its tags; returns the referenced digests missing from the repository
        (then nothing is stored)."""

        def tx(q: Q) -> list[str]:
            missing = []
            for digest, is_manifest, must_exist in m.refs:
                if is_manifest:
                    found = q("SELECT 1 FROM reg_manifests WHERE repo = ? AND digest = ?", m.repo, digest).fetchone()
                else:
                    found = q("SELECT 1 FROM reg_links WHERE repo = ? AND digest = ?", m.repo, digest).fetchone()
                    if found:  # touched, so the sweeper's grace starts again for what is now referenced
                        q("UPDATE reg_links SET linked = ? WHERE repo = ? AND digest = ?", now, m.repo, digest)
                if not found and must_exist:
                    missing.append(digest)
            if missing:
                return missing
            q("INSERT INTO reg_repositories VALUES (?, ?) ON CONFLICT DO NOTHING", m.repo, now)
            exists = q("SELECT 1 FROM reg_manifests WHERE repo = ? AND digest = ?", m.repo, m.digest).fetchone()
            if not exists:
                q(
                    "INSERT INTO reg_manifests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    m.repo,
                    m.digest,
                    m.media_type,
                    m.body,
                    len(m.body),
                    m.subject,
                    m.artifact_type,
                    m.annotations,
                    now,
                )
                for digest, _, _ in m.refs:
                    q("INSERT INTO reg_refs VALUES (?, ?, ?) ON CONFLICT DO NOTHING", m.repo, m.digest, digest)
            for tag in m.tags:
                q(
                    "INSERT INTO reg_tags VALUES (?, ?, ?) ON CONFLICT (repo, tag) DO UPDATE SET digest = ?",
                    m.repo,
                    tag,
                    m.digest,
                    m.digest,
                )
            return []

        return self.run(tx)

    def manifest_get(self, repo: str, digest: str | None, tag: str | None, body: bool) -> ManifestRow | None:
        cols = "m.digest, m.media_type, m.size" + (", m.body" if body else "")

        def read(q: Q) -> Any:
            if tag is not None:
                return q(
                    f"SELECT {cols} FROM reg_tags t JOIN reg_manifests m ON m.repo = t.repo AND m.digest = t.digest"  # noqa: S608 (fixed columns)
                    " WHERE t.repo = ? AND t.tag = ?",
                    repo,
                    tag,
                ).fetchone()
            return q(f"SELECT {cols} FROM reg_manifests m WHERE m.repo = ? AND m.digest = ?", repo, digest).fetchone()  # noqa: S608

        row = self.run(read, False)
        if row is None:
            return None
        return ManifestRow(row[0], row[1], int(row[2]), bytes(row[3]) if body else None)

    def manifest_delete(self, repo: str, digest: str) -> bool:
        def tx(q: Q) -> bool:
            if not q("DELETE FROM reg_manifests WHERE repo = ? AND digest = ?", repo, digest).rowcount:
                return False
            q("DELETE FROM reg_tags WHERE repo = ? AND digest = ?", repo, digest)
            q("DELETE FROM reg_refs WHERE repo = ? AND manifest = ?", repo, digest)
            return True

        return self.run(tx)

    def tag_delete(self, repo: str, tag: str) -> bool:
        return bool(self.run(lambda q: q("DELETE FROM reg_tags WHERE repo = ? AND tag = ?", repo, tag).rowcount))

    def tags(self, repo: str, last: str | None, n: int) -> list[str]:
        def read(q: Q) -> list[Any]:
            if last is None:
                return list(q("SELECT tag FROM reg_tags WHERE repo = ? ORDER BY tag LIMIT ?", repo, n).fetchall())
            return list(
                q("SELECT tag FROM reg_tags WHERE repo = ? AND tag > ? ORDER BY tag LIMIT ?", repo, last, n).fetchall()
            )

        return [str(r[0]) for r in self.run(read, False)]

    def manifest_page(self, after: tuple[str, str] | None, n: int) -> list[tuple[str, str, str | None]]:
        """(repo, digest, artifact type) of up to ``n`` manifests after ``after`` in (repo,
        digest) order: a cursor over every manifest (``telemetry.scanregistry``). A row-value
        comparison (SQLite 3.15+, PostgreSQL), which the primary key (repo, digest) serves as
        an index range: each page costs its own rows, not a scan from the start."""

        def read(q: Q) -> list[Any]:
            sql = "SELECT repo, digest, artifact_type FROM reg_manifests"
            if after is None:
                return list(q(sql + " ORDER BY repo, digest LIMIT ?", n).fetchall())
            repo, digest = after
            page = " WHERE (repo, digest) > (?, ?) ORDER BY repo, digest LIMIT ?"
            return list(q(sql + page, repo, digest, n).fetchall())

        return [(str(r[0]), str(r[1]), r[2]) for r in self.run(read, False)]

    def referrers(self, repo: str, subject: str, artifact_type: str | None, limit: int) -> list[Referrer]:
        def read(q: Q) -> list[Any]:
            sql = (
                "SELECT digest, media_type, size, artifact_type, annotations FROM reg_manifests"
                " WHERE repo = ? AND subject = ?"
            )
            if artifact_type is None:
                return list(q(sql + " ORDER BY digest LIMIT ?", repo, subject, limit).fetchall())
            return list(
                q(
                    sql + " AND artifact_type = ? ORDER BY digest LIMIT ?", repo, subject, artifact_type, limit
                ).fetchall()
            )

        return [Referrer(r[0], r[1], int(r[2]), r[3], r[4]) for r in self.run(read, False)]

    def annotations_json(self, annotations: object) -> str | None:
        return None if not annotations else json.dumps(annotations, sort_keys=True, separators=(",", ":"))


def open_meta(db: str | None, data: Path) -> SqlMeta:
    """The store for ``--db URL``: None is ``DATA/registry.db`` (SQLite), ``sqlite:///ABS/PATH``
    a SQLite file elsewhere, ``postgresql://...``/``postgres://...`` a PostgreSQL database."""
    if db is None:
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        return SqlMeta.sqlite(data / "registry.db")
    parts = urlsplit(db)
    if parts.scheme == "sqlite" and parts.path.startswith("/") and not parts.netloc:
        return SqlMeta.sqlite(Path(parts.path))
    if parts.scheme in ("postgresql", "postgres"):
        if parts.password is not None or "password" in parse_qs(parts.query):
            # a flag is visible to every user of the host (ps, /proc/PID/cmdline)
            raise ValueError("--db must not carry a password: use PGPASSFILE or PGPASSWORD (docs/deploy.md)")
        return SqlMeta.postgres(db)
    raise ValueError("--db takes postgresql://... or sqlite:///PATH")


__all__ = ["Busy", "SqlMeta", "open_meta"]
