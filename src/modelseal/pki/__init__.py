"""Layer 4 (beside signing), reserved: the internal CA, SPIFFE-style identities, certificate issue,
renewal and revocation (the registry and transport issue). Its private keys live in keys (layer 3).

Nothing here yet; docs/architecture.md says what may import what.
"""
