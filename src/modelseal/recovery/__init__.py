"""Layer 8: recovery (docs/recovery.md): the offline recovery key, sealed, signed and chained
backups of everything but the artifacts, restore drills, compartmentalised restores and the
incident runbooks (key and certificate compromise). docs/architecture.md names the modules.
"""
