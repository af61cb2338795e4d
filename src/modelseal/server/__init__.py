"""Layer 7, reserved: ``modelseal serve``, the mTLS shell over the registry, the key broker,
governance and telemetry. A handler parses, authorizes, calls a recipe or store and maps the typed
error to a status code; only the CLI sits above it.

Nothing here yet; docs/architecture.md says what may import what.
"""
