"""The garbage collector's queries over the metadata store (``registry.gc`` drives them).

Each candidate is listed by a read, then dropped by a transaction that re-checks the
condition, so a push or a mount that touched the row meanwhile wins.
"""

from __future__ import annotations

from modelseal.registry.sqldb import HOLD_TTL, Database, Q


class GcRows(Database):
    def stale_links(self, cutoff: float, limit: int) -> list[tuple[str, str]]:
        """Links older than ``cutoff`` that no manifest of their repository references."""
        rows = self.run(
            lambda q: q(
                "SELECT l.repo, l.digest FROM reg_links l WHERE l.linked < ? AND NOT EXISTS"
                " (SELECT 1 FROM reg_refs r WHERE r.repo = l.repo AND r.digest = l.digest) LIMIT ?",
                cutoff,
                limit,
            ).fetchall(),
            False,
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    def drop_stale_link(self, repo: str, digest: str, cutoff: float) -> bool:
        def tx(q: Q) -> bool:
            return bool(
                q(
                    "DELETE FROM reg_links WHERE repo = ? AND digest = ? AND linked < ? AND NOT EXISTS"
                    " (SELECT 1 FROM reg_refs r WHERE r.repo = ? AND r.digest = ?)",
                    repo,
                    digest,
                    cutoff,
                    repo,
                    digest,
                ).rowcount
            )

        return self.run(tx)

    def orphan_blobs(self, cutoff: float, limit: int) -> list[str]:
        rows = self.run(
            lambda q: q(
                "SELECT b.digest FROM reg_blobs b WHERE b.touched < ? AND NOT EXISTS"
                " (SELECT 1 FROM reg_links l WHERE l.digest = b.digest) LIMIT ?",
                cutoff,
                limit,
            ).fetchall(),
            False,
        )
        return [str(r[0]) for r in rows]

    def drop_orphan_blob(self, digest: str, cutoff: float) -> bool:
        def tx(q: Q) -> bool:
            return bool(
                q(
                    "DELETE FROM reg_blobs WHERE digest = ? AND touched < ? AND NOT EXISTS"
                    " (SELECT 1 FROM reg_links l WHERE l.digest = ?)",
                    digest,
                    cutoff,
                    digest,
                ).rowcount
            )

        return self.run(tx)

    def hold_sweep(self, storage: str, holder: str, now: float) -> bool:
        """Claim ``storage`` for deletion from the blob store: only if no blob row names it and no
        live upload holds it. Stale holds of dead processes are cleared on the way."""

        def tx(q: Q) -> bool:
            q("DELETE FROM reg_holds WHERE storage = ? AND since <= ?", storage, now - HOLD_TTL)
            if q("SELECT 1 FROM reg_blobs WHERE storage = ?", storage).fetchone():
                return False
            if q("SELECT 1 FROM reg_holds WHERE storage = ?", storage).fetchone():
                return False
            q("INSERT INTO reg_holds VALUES (?, ?, 'sweep', ?)", storage, holder, now)
            return True

        return self.run(tx)

    def storage_known(self, storage: str) -> bool:
        return bool(self.run(lambda q: q("SELECT 1 FROM reg_blobs WHERE storage = ?", storage).fetchone(), False))

    def upload_known(self, upload: str) -> bool:
        return bool(self.run(lambda q: q("SELECT 1 FROM reg_uploads WHERE id = ?", upload).fetchone(), False))

    def uploads_idle(self, cutoff: float, limit: int) -> list[str]:
        rows = self.run(
            lambda q: q(
                "SELECT id FROM reg_uploads WHERE touched < ? ORDER BY touched LIMIT ?", cutoff, limit
            ).fetchall(),
            False,
        )
        return [str(r[0]) for r in rows]

    def upload_delete_idle(self, upload: str, cutoff: float) -> bool:
        return bool(
            self.run(lambda q: q("DELETE FROM reg_uploads WHERE id = ? AND touched < ?", upload, cutoff).rowcount)
        )


__all__ = ["GcRows"]
