"""Layer 2, audit: the event shape, the sinks, the RFC 9162 Merkle log and its SQLite/PostgreSQL stores.

Events carry key URIs, versions, artifact ids and outcomes, never a secret. Knows nothing of key
providers, signatures or recipes.
"""
