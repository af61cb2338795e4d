"""Layer 7: ``modelseal serve``, the mTLS shell over the registry, the key broker,
governance and telemetry. A handler parses, authorizes, calls a recipe or store and maps the typed
error to a status code; only the CLI sits above it.

Now: ``tls`` (the TLS 1.3 contexts), ``identity`` (who calls), ``app`` (``GET /v2/``, the
listener). docs/architecture.md says what may import what.
"""
