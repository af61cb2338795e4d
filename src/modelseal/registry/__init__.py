"""Layer 6 (beside the loaders), reserved: the OCI distribution registry that stores ciphertext only,
its metadata store (SQLite/PostgreSQL), its blob stores (folder/S3), and push/pull.

Nothing here yet; docs/architecture.md says what may import what.
"""
