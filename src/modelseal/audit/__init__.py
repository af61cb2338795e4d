"""Layer 2, audit: the event shape, the sinks, the RFC 9162 Merkle log (``log``, its checks in ``checks``),
the audit keys a host accepts in a shared log (``hosts``) and the SQLite/PostgreSQL stores.

Events carry key URIs, versions, artifact ids and outcomes, never a secret. Knows nothing of key
providers, signatures or recipes.
"""
