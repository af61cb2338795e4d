"""The registry's tables under its metadata store (``registry.sqlmeta``), on the shared SQL
plumbing of ``util.sqldb``: the PostgreSQL schema sorts names and tags in bytewise ``"C"``
order, as SQLite's ``BINARY`` does, which is the order the OCI spec asks for.
"""

from __future__ import annotations

from modelseal.errors import RegistryError
from modelseal.util.sqldb import Q, SqlDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reg_repositories (name TEXT{C} PRIMARY KEY, created {REAL} NOT NULL);
CREATE TABLE IF NOT EXISTS reg_blobs (
    digest TEXT PRIMARY KEY, storage TEXT NOT NULL, size BIGINT NOT NULL, kind TEXT NOT NULL,
    touched {REAL} NOT NULL);
CREATE INDEX IF NOT EXISTS reg_blobs_storage ON reg_blobs (storage);
CREATE TABLE IF NOT EXISTS reg_links (
    repo TEXT NOT NULL, digest TEXT NOT NULL, linked {REAL} NOT NULL, PRIMARY KEY (repo, digest));
CREATE INDEX IF NOT EXISTS reg_links_digest ON reg_links (digest);
CREATE INDEX IF NOT EXISTS reg_links_linked ON reg_links (linked);
CREATE TABLE IF NOT EXISTS reg_manifests (
    repo TEXT NOT NULL, digest TEXT NOT NULL, media_type TEXT NOT NULL, body {BLOB} NOT NULL,
    size BIGINT NOT NULL, subject TEXT, artifact_type TEXT, annotations TEXT, created {REAL} NOT NULL,
    PRIMARY KEY (repo, digest));
CREATE INDEX IF NOT EXISTS reg_manifests_subject ON reg_manifests (repo, subject);
CREATE TABLE IF NOT EXISTS reg_refs (
    repo TEXT NOT NULL, manifest TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (repo, manifest, digest));
CREATE INDEX IF NOT EXISTS reg_refs_digest ON reg_refs (repo, digest);
CREATE TABLE IF NOT EXISTS reg_tags (
    repo TEXT NOT NULL, tag TEXT{C} NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (repo, tag));
CREATE INDEX IF NOT EXISTS reg_tags_digest ON reg_tags (repo, digest);
CREATE TABLE IF NOT EXISTS reg_uploads (
    id TEXT PRIMARY KEY, repo TEXT NOT NULL, owner TEXT NOT NULL, received BIGINT NOT NULL,
    parts TEXT NOT NULL, next_part INTEGER NOT NULL, created {REAL} NOT NULL, touched {REAL} NOT NULL);
CREATE INDEX IF NOT EXISTS reg_uploads_owner ON reg_uploads (owner);
CREATE INDEX IF NOT EXISTS reg_uploads_touched ON reg_uploads (touched);
CREATE TABLE IF NOT EXISTS reg_holds (
    storage TEXT NOT NULL, holder TEXT NOT NULL, kind TEXT NOT NULL, since {REAL} NOT NULL,
    PRIMARY KEY (storage, holder));
"""
HOLD_TTL = 3600.0  # a pending/sweep hold older than this was left by a dead process


class Busy(RegistryError):
    """The blob is being swept right now; try again."""


class Database(SqlDatabase):
    """One SQLite file or one PostgreSQL database holding the registry's tables."""

    SCHEMA = _SCHEMA
    ERROR = RegistryError
    LABEL = "the registry database"
    LOCK = 7369237


__all__ = ["HOLD_TTL", "Busy", "Database", "Q"]
