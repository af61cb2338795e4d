"""Layer 6 (beside the loaders), reserved: encrypted, chained backups and restore drills.

Nothing here yet; docs/architecture.md says what may import what.
"""
