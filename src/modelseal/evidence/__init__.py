"""Layer 6 (beside the loaders), reserved: the signed compliance evidence bundle an auditor checks.

Nothing here yet; docs/architecture.md says what may import what.
"""
